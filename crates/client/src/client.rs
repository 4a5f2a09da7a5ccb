//! The operations a user asks for. Each opens what it needs and nothing more; an unregistered
//! profile opens nothing at all.

use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey};
use prost::Message as _;
use rand::RngCore as _;
use tidings_proto::frame::{
    self, AckStatus, Content, Envelope, Kind, Presence, ReceiptKind, SendMode, SendOutcome,
};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::e2e::{Crypto, TrustCheck};
use crate::inbox::{Change, Inbox, Received};
use crate::net::Endpoint;
use crate::profile::{Profile, ProfileData, Trust};
use crate::session::{KeySupply, Session};
use crate::vault::Passphrase;
use crate::{ClientError, Result};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The `Instant` at which the wall-clock time `at` (Unix milliseconds) is reached.
fn instant_at(at: tidings_core::Millis) -> Instant {
    let now = crate::route::now_ms();
    Instant::now() + Duration::from_millis(at.saturating_sub(now).min(365 * 24 * 3600 * 1000))
}

fn api_message(body: &serde_json::Value) -> String {
    body.get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("no details")
        .to_string()
}

/// Step one of opting in: stores the number and server in the profile, makes the device key, and
/// asks the server to send a code by SMS. This is the first time the profile touches the network.
pub async fn register(profile: &Profile, number: &str, server: &str, trust: Trust) -> Result<E164> {
    let number = E164::parse(number)?;
    let endpoint = Endpoint::parse(server, trust.clone())?;
    let existing = profile.load()?;
    let existing_routing = existing
        .as_ref()
        .map(|d| d.routing.clone())
        .unwrap_or_default();
    if let Some(existing) = existing {
        if existing.device_id.is_some() && existing.number != number.as_str() {
            return Err(ClientError::Profile(
                "this profile is registered to another number: use another --profile, or `tidings disable` first".into(),
            ));
        }
    }
    profile.device_key()?;
    profile.save(&ProfileData {
        number: number.as_str().to_string(),
        server: server.to_string(),
        trust,
        device_id: None,
        routing: existing_routing,
    })?;
    let (status, body) = endpoint
        .post_json(
            "/v1/registration/code",
            &serde_json::json!({ "number": number.as_str() }),
        )
        .await?;
    if status != hyper::StatusCode::ACCEPTED {
        return Err(ClientError::Refused(api_message(&body)));
    }
    Ok(number)
}

/// Step two: proves the code and binds the device key, then makes this device's encryption keys
/// (sealed under `passphrase`) and publishes them. Returns how many earlier devices of the
/// number were signed out.
pub async fn verify(profile: &Profile, code: &str, passphrase: &Passphrase) -> Result<u32> {
    let mut data = profile.load()?.ok_or(ClientError::NotRegistered)?;
    let key = profile.device_key()?;
    // Unlocked before the code is spent, so a wrong passphrase costs no code.
    let mut inbox = Inbox::open(profile.dir(), passphrase)?;
    let endpoint = Endpoint::parse(&data.server, data.trust.clone())?;
    let code = code.trim();
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&tidings_proto::transcript::register(
        &data.number,
        code,
        &public,
    ));
    let body = serde_json::json!({
        "number": data.number,
        "code": code,
        "device_key": tidings_proto::id::to_text(&public),
        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
    });
    let (status, body) = endpoint.post_json("/v1/registration/verify", &body).await?;
    if status != hyper::StatusCode::OK {
        let mut message = api_message(&body);
        if let Some(left) = body
            .get("attempts_left")
            .and_then(serde_json::Value::as_u64)
        {
            message.push_str(&format!(" ({left} attempts left)"));
        }
        return Err(ClientError::Refused(message));
    }
    let device_id = body
        .get("device_id")
        .and_then(|d| d.as_str())
        .and_then(DeviceId::from_text)
        .ok_or_else(|| ClientError::Protocol("verify answered without a device id".into()))?;
    // A registration is a new identity: peers see the change and are warned. What this profile
    // trusted is kept.
    inbox.replace_crypto(Crypto::replacing)?;
    data.device_id = Some(device_id.to_text());
    profile.save(&data)?;
    let client = Client::open(profile.clone())?.with_passphrase(passphrase.clone());
    let mut session = client.session(false).await?;
    client.ensure_keys(&mut inbox, &mut session).await?;
    Ok(body
        .get("replaced_devices")
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
}

/// Joins a number that is registered on another device, with the link code `tidings link` shows
/// there. The other devices stay signed in. Makes and publishes this device's keys.
pub async fn link(
    profile: &Profile,
    number: &str,
    code: &str,
    server: &str,
    trust: Trust,
    passphrase: &Passphrase,
) -> Result<DeviceId> {
    let number = E164::parse(number)?;
    let endpoint = Endpoint::parse(server, trust.clone())?;
    if profile.load()?.is_some_and(|d| d.device_id.is_some()) {
        return Err(ClientError::Profile(
            "this profile is already registered: link with a new --profile".into(),
        ));
    }
    let key = profile.device_key()?;
    let mut inbox = Inbox::open(profile.dir(), passphrase)?;
    let (identity_key, signing_key) = inbox.replace_crypto(Crypto::replacing)?.identity_keys();
    let public = key.verifying_key().to_bytes();
    let code = code.trim();
    let signature = key.sign(&tidings_proto::transcript::link(
        number.as_str(),
        code,
        &public,
        &identity_key,
        &signing_key,
    ));
    let body = serde_json::json!({
        "number": number.as_str(),
        "code": code,
        "device_key": tidings_proto::id::to_text(&public),
        "identity_key": tidings_proto::id::to_text(&identity_key),
        "signing_key": tidings_proto::id::to_text(&signing_key),
        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
    });
    let (status, body) = endpoint.post_json("/v1/registration/link", &body).await?;
    if status != hyper::StatusCode::OK {
        return Err(ClientError::Refused(api_message(&body)));
    }
    let device_id = body
        .get("device_id")
        .and_then(|d| d.as_str())
        .and_then(DeviceId::from_text)
        .ok_or_else(|| ClientError::Protocol("link answered without a device id".into()))?;
    profile.save(&ProfileData {
        number: number.as_str().to_string(),
        server: server.to_string(),
        trust,
        device_id: Some(device_id.to_text()),
        routing: Default::default(),
    })?;
    let client = Client::open(profile.clone())?.with_passphrase(passphrase.clone());
    let mut session = client.session(false).await?;
    client.ensure_keys(&mut inbox, &mut session).await?;
    Ok(device_id)
}

/// What happened to a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    pub id: MessageId,
    pub outcome: SendOutcome,
    /// The receipt, if one arrived while waiting.
    pub receipt: Option<ReceiptKind>,
    /// Encrypted copies sent (every device of the receiver and this number's other devices).
    pub copies: usize,
}

/// Something `listen` reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message, shown for the first time.
    Message(Received),
    /// A receipt for a message this device sent.
    Receipt { id: MessageId, kind: ReceiptKind },
    /// A routed message (SMS fallback) finished: `outcome` as in `route::outcome_name`.
    Routed {
        id: MessageId,
        outcome: &'static str,
        detail: String,
    },
    /// A delivery that could not be decrypted or did not hold together; it was discarded.
    Rejected {
        sender_device: DeviceId,
        id: MessageId,
        reason: String,
    },
}

/// One device of this number, as `tidings devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: DeviceId,
    /// The device's Curve25519 identity key, once it has published one.
    pub identity_key: Option<[u8; 32]>,
    pub this_device: bool,
}

/// The safety number with a contact, and how their keys stand with this device's trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub number: String,
    pub safety_number: String,
    pub devices: usize,
    /// Keys of theirs not trusted here (zero when everything is trusted or nothing was yet).
    pub untrusted: usize,
    /// Whether anything was trusted for them before.
    pub known: bool,
}

/// A registered profile, ready to talk to its server.
#[derive(Debug)]
pub struct Client {
    profile: Profile,
    data: ProfileData,
    device: DeviceId,
    key: SigningKey,
    endpoint: Endpoint,
    passphrase: Option<Passphrase>,
    /// The passphrase's key, derived once per client (the KDF is slow on purpose).
    vault: std::sync::OnceLock<crate::vault::Vault>,
}

/// How many times a send is retried after the server named devices it lacked copies for.
const SEND_ATTEMPTS: usize = 4;

fn key_of(bytes: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).ok()
}

/// Decrypts a delivery into its content, checking that it holds together. The error is the
/// reason to show.
fn open_delivery(
    crypto: &mut Crypto,
    sender_device: DeviceId,
    deliver: &frame::Deliver,
) -> std::result::Result<(Content, [u8; 32]), String> {
    let envelope = Envelope::decode(deliver.payload.clone())
        .map_err(|_| "not an encrypted envelope".to_string())?;
    let (plaintext, sender_key) = crypto
        .decrypt(sender_device, &envelope)
        .map_err(|e| e.to_string())?;
    let content = Content::decode(&plaintext[..])
        .map_err(|_| "the decrypted content is malformed".to_string())?;
    if content.id != deliver.id {
        return Err(
            "the message id inside does not match the one outside (replayed under another id)"
                .into(),
        );
    }
    Ok((content, sender_key))
}

impl Client {
    /// Opens a registered profile. Fails, without touching the network, for a profile that has
    /// not been registered and verified (promise P1).
    pub fn open(profile: Profile) -> Result<Self> {
        let data = profile.load()?.ok_or(ClientError::NotRegistered)?;
        let device = data
            .device_id
            .as_deref()
            .and_then(DeviceId::from_text)
            .ok_or(ClientError::NotVerified)?;
        let key = profile.device_key()?;
        let endpoint = Endpoint::parse(&data.server, data.trust.clone())?;
        Ok(Self {
            profile,
            data,
            device,
            key,
            endpoint,
            passphrase: None,
            vault: std::sync::OnceLock::new(),
        })
    }

    /// Gives the client the passphrase that unlocks the profile's keys and messages (needed to
    /// send, receive, and check or change trust).
    pub fn with_passphrase(mut self, passphrase: Passphrase) -> Self {
        self.passphrase = Some(passphrase);
        self
    }

    /// The profile's own number.
    pub fn number(&self) -> &str {
        &self.data.number
    }

    /// How this profile routes messages.
    pub fn routing(&self) -> &crate::profile::Routing {
        &self.data.routing
    }

    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// Opens a session.
    pub async fn session(&self, listen: bool) -> Result<Session> {
        Session::open(&self.endpoint, self.device, &self.key, listen).await
    }

    /// Opens the local store with the passphrase.
    pub fn inbox(&self) -> Result<Inbox> {
        if let Some(vault) = self.vault.get() {
            return Inbox::open_unlocked(self.profile.dir(), vault.clone());
        }
        let passphrase = self.passphrase.as_ref().ok_or_else(|| {
            ClientError::Passphrase(
                "this needs the profile's passphrase: set TIDINGS_PASSPHRASE or pass --passphrase-file".into(),
            )
        })?;
        let inbox = Inbox::open(self.profile.dir(), passphrase)?;
        let _ = self.vault.set(inbox.vault().clone());
        Ok(inbox)
    }

    /// Publishes identity keys, one-time keys and a fallback key if the server holds too few.
    pub async fn ensure_keys(&self, inbox: &mut Inbox, session: &mut Session) -> Result<()> {
        let supply = session.key_supply();
        let request_id = session.request_id();
        let upload = inbox.update(|_, crypto| {
            Ok(
                match crypto.keys_to_publish(self.device, supply, request_id) {
                    Some(upload) => Change::Save(Some(upload)),
                    None => Change::Unchanged(None),
                },
            )
        })?;
        let Some(upload) = upload else {
            return Ok(());
        };
        match session.call(Kind::KeysUpload(upload), request_id).await? {
            Kind::KeysUploadResult(result) => {
                session.set_key_supply(KeySupply {
                    one_time_keys: result.one_time_keys,
                    published: true,
                });
                Ok(())
            }
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a key upload".into(),
            )),
        }
    }

    /// The devices the server lists for `number`, with their identity keys.
    pub async fn directory(
        &self,
        session: &mut Session,
        number: &str,
    ) -> Result<Vec<frame::DeviceKeys>> {
        let request_id = session.request_id();
        let request = Kind::Devices(frame::DevicesRequest {
            request_id,
            number: number.to_string(),
        });
        match session.call(request, request_id).await? {
            Kind::DeviceList(list) => Ok(list.devices),
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a device list request".into(),
            )),
        }
    }

    /// Claims one key per device of `number` (or of `only`).
    pub async fn claim(
        &self,
        session: &mut Session,
        number: &str,
        only: &[DeviceId],
    ) -> Result<Vec<frame::ClaimedKey>> {
        let request_id = session.request_id();
        let request = Kind::KeysClaim(frame::KeysClaim {
            request_id,
            number: number.to_string(),
            device_ids: only.iter().map(|d| d.as_bytes().to_vec()).collect(),
        });
        match session.call(request, request_id).await? {
            Kind::KeysClaimResult(result) => Ok(result.devices),
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a key claim".into(),
            )),
        }
    }

    /// Sends a text, end-to-end encrypted for every device of the receiver and this number's
    /// other devices. Waits up to `wait` for the server's answer and, for an accepted message,
    /// for its receipt.
    pub async fn send(
        &self,
        to: &str,
        text: &str,
        mode: SendMode,
        ttl_seconds: u32,
        wait: Duration,
    ) -> Result<SendReport> {
        let to = E164::parse(to)?;
        let to = to.as_str().to_string();
        let own = self.data.number.clone();
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id = MessageId(id);
        let plaintext = Zeroizing::new(
            Content {
                from: own.clone(),
                text: text.to_string(),
                sent_at_ms: now_ms(),
                id: id.as_bytes().to_vec(),
                to: to.clone(),
            }
            .encode_to_vec(),
        );
        let mut inbox = self.inbox()?;
        let mut session = self.session(false).await?;
        self.ensure_keys(&mut inbox, &mut session).await?;

        // A first message to a number: claim keys for all its devices now rather than learn
        // them from a refused send.
        let mut claimed: Vec<(String, Vec<frame::ClaimedKey>)> = Vec::new();
        if inbox.look(|crypto| crypto.devices_of(&to).is_empty())? {
            claimed.push((to.clone(), self.claim(&mut session, &to, &[]).await?));
        }
        let mut forget: Vec<DeviceId> = Vec::new();
        for _ in 0..SEND_ATTEMPTS {
            let copies =
                self.encrypt_copies(&mut inbox, &mut claimed, &mut forget, &to, &plaintext)?;
            let total: usize = copies.iter().map(|c| c.payload.len()).sum();
            if total > tidings_proto::MAX_PAYLOAD_BYTES {
                return Err(ClientError::Refused(format!(
                    "the message is too long: its {} encrypted copies come to {total} bytes, at most {} are allowed",
                    copies.len(),
                    tidings_proto::MAX_PAYLOAD_BYTES
                )));
            }
            let count = copies.len();
            session
                .send(Kind::Send(frame::Send {
                    id: id.as_bytes().to_vec(),
                    to: to.clone(),
                    mode: mode as i32,
                    ttl_seconds,
                    payload: Bytes::new(),
                    copies,
                }))
                .await?;
            let changed = match self.await_send(&mut session, id, wait).await? {
                SendAnswer::Done { outcome, receipt } => {
                    return Ok(SendReport {
                        id,
                        outcome,
                        receipt,
                        copies: count,
                    })
                }
                SendAnswer::Changed(changed) => changed,
            };
            // The server named the devices that differ: drop the gone ones, claim keys for the
            // new ones, and try again. No device is skipped.
            let devices = |list: &[Vec<u8>]| -> Vec<DeviceId> {
                list.iter()
                    .filter_map(|d| DeviceId::from_slice(d))
                    .collect()
            };
            forget = devices(&changed.extra_devices);
            let missing = devices(&changed.missing_devices);
            if !missing.is_empty() {
                claimed.push((to.clone(), self.claim(&mut session, &to, &missing).await?));
            }
            let missing_own = devices(&changed.missing_own_devices);
            if !missing_own.is_empty() {
                claimed.push((
                    own.clone(),
                    self.claim(&mut session, &own, &missing_own).await?,
                ));
            }
        }
        Err(ClientError::Refused(
            "the receiver's devices kept changing while sending: try again".into(),
        ))
    }

    /// Encrypts one copy of `plaintext` per device that must get one (the receiver's and this
    /// number's other devices), after opening sessions with `claimed` keys and forgetting the
    /// `forget` devices. Trust is checked first: a changed key stops everything.
    fn encrypt_copies(
        &self,
        inbox: &mut Inbox,
        claimed: &mut Vec<(String, Vec<frame::ClaimedKey>)>,
        forget: &mut Vec<DeviceId>,
        to: &str,
        plaintext: &[u8],
    ) -> Result<Vec<frame::Copy>> {
        let own = self.data.number.as_str();
        inbox.update(|_, crypto| {
            for device in forget.drain(..) {
                crypto.forget_device(device);
            }
            for (number, keys) in claimed.drain(..) {
                for key in &keys {
                    crypto.open_session(&number, key)?;
                }
            }
            let mut numbers = vec![to];
            if own != to {
                numbers.push(own);
            }
            for number in numbers {
                let keys: Vec<[u8; 32]> = crypto
                    .devices_of(number)
                    .into_iter()
                    .filter(|device| *device != self.device)
                    .filter_map(|device| crypto.device(device).map(|k| k.identity_key))
                    .collect();
                if keys.is_empty() {
                    continue;
                }
                if let TrustCheck::Changed(new) = crypto.check_trust(number, &keys) {
                    // A new device vouched for by a trusted device of the number is accepted.
                    let untrusted = crypto.accept_vouched(number, &new);
                    if !untrusted.is_empty() {
                        return Err(ClientError::IdentityChanged {
                            number: number.to_string(),
                            count: untrusted.len(),
                        });
                    }
                }
            }
            let mut targets = crypto.devices_of(to);
            if own != to {
                targets.extend(crypto.devices_of(own));
            }
            targets.retain(|device| *device != self.device);
            let mut copies = Vec::with_capacity(targets.len());
            for device in targets {
                let envelope = crypto.encrypt(device, plaintext)?;
                copies.push(frame::Copy {
                    device_id: device.as_bytes().to_vec(),
                    payload: Bytes::from(envelope.encode_to_vec()),
                });
            }
            // Saved before the copies leave: a used message key is never used again, even if
            // this process dies right after.
            Ok(Change::Save(copies))
        })
    }

    /// Builds an encrypted `Send` for `to` without sending it, claiming whatever keys are
    /// needed first (for apps and tests that pipeline many sends on one session).
    pub async fn prepare_send(&self, to: &str, text: &str, id: MessageId) -> Result<frame::Send> {
        self.prepare(to, text, id, None).await
    }

    /// [`Client::prepare_send`] for many messages to one receiver, claiming keys once.
    pub async fn prepare_sends(
        &self,
        to: &str,
        messages: &[(MessageId, String)],
    ) -> Result<Vec<frame::Send>> {
        self.prepare_batch(to, messages, None).await
    }

    /// Like [`Client::prepare_send`], but the encrypted content claims to come from
    /// `claimed_from`. For tests of the receiver's sender check only: receivers flag it.
    pub async fn danger_prepare_send_claiming(
        &self,
        claimed_from: &str,
        to: &str,
        text: &str,
        id: MessageId,
    ) -> Result<frame::Send> {
        self.prepare(to, text, id, Some(claimed_from)).await
    }

    async fn prepare(
        &self,
        to: &str,
        text: &str,
        id: MessageId,
        claimed_from: Option<&str>,
    ) -> Result<frame::Send> {
        let mut sends = self
            .prepare_batch(to, &[(id, text.to_string())], claimed_from)
            .await?;
        sends
            .pop()
            .ok_or_else(|| ClientError::Protocol("nothing was prepared".into()))
    }

    async fn prepare_batch(
        &self,
        to: &str,
        messages: &[(MessageId, String)],
        claimed_from: Option<&str>,
    ) -> Result<Vec<frame::Send>> {
        let to = E164::parse(to)?.as_str().to_string();
        let own = self.data.number.clone();
        let mut inbox = self.inbox()?;
        let mut session = self.session(false).await?;
        self.ensure_keys(&mut inbox, &mut session).await?;
        let (known_to, known_own) =
            inbox.look(|crypto| (crypto.devices_of(&to), crypto.devices_of(&own)))?;
        let mut claimed = Vec::new();
        if known_to.is_empty() {
            claimed.push((to.clone(), self.claim(&mut session, &to, &[]).await?));
        }
        if own != to {
            let missing: Vec<DeviceId> = self
                .directory(&mut session, &own)
                .await?
                .iter()
                .filter_map(|d| DeviceId::from_slice(&d.device_id))
                .filter(|d| *d != self.device && !known_own.contains(d))
                .collect();
            if !missing.is_empty() {
                claimed.push((own.clone(), self.claim(&mut session, &own, &missing).await?));
            }
        }
        let mut sends = Vec::with_capacity(messages.len());
        for (id, text) in messages {
            let plaintext = Zeroizing::new(
                Content {
                    from: claimed_from.unwrap_or(&own).to_string(),
                    text: text.clone(),
                    sent_at_ms: now_ms(),
                    id: id.as_bytes().to_vec(),
                    to: to.clone(),
                }
                .encode_to_vec(),
            );
            let copies =
                self.encrypt_copies(&mut inbox, &mut claimed, &mut Vec::new(), &to, &plaintext)?;
            sends.push(frame::Send {
                id: id.as_bytes().to_vec(),
                to: to.clone(),
                mode: SendMode::Queue as i32,
                ttl_seconds: 0,
                payload: Bytes::new(),
                copies,
            });
        }
        Ok(sends)
    }

    async fn await_send(
        &self,
        session: &mut Session,
        id: MessageId,
        wait: Duration,
    ) -> Result<SendAnswer> {
        let deadline = Instant::now() + wait;
        let mut outcome = None;
        let mut receipt = None;
        while let Some(kind) = session.recv(deadline).await? {
            match kind {
                Kind::SendResult(result) if result.id == id.as_bytes() => {
                    let answered =
                        SendOutcome::try_from(result.outcome).unwrap_or(SendOutcome::Invalid);
                    if answered == SendOutcome::DevicesChanged {
                        return Ok(SendAnswer::Changed(result));
                    }
                    outcome = Some(answered);
                    if answered != SendOutcome::Accepted || receipt.is_some() {
                        break;
                    }
                }
                Kind::Receipt(r) => {
                    session
                        .send(Kind::ReceiptAck(frame::ReceiptAck { id: r.id.clone() }))
                        .await?;
                    if r.id == id.as_bytes() {
                        receipt = ReceiptKind::try_from(r.kind).ok();
                        if outcome.is_some() {
                            break;
                        }
                    }
                }
                Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
                Kind::Error(e) if e.fatal => return Err(ClientError::Refused(e.message)),
                _ => {}
            }
        }
        let outcome = outcome.ok_or(ClientError::Timeout)?;
        Ok(SendAnswer::Done { outcome, receipt })
    }

    /// Sends a text along `route` (IP, SMS fallback, or both in turn), waiting up to `wait` for
    /// it to finish. What is still pending then is kept in the profile and carried on by
    /// `listen`.
    pub async fn send_routed(
        &self,
        to: &str,
        text: &str,
        route: tidings_core::fallback::Route,
        wait: Duration,
    ) -> Result<crate::route::Status> {
        let to = E164::parse(to)?;
        let mut router = crate::route::Router::new(self, &self.data.routing, false)?;
        let mut session = None;
        let id = router.start(&mut session, to.as_str(), text, route).await?;
        let deadline = Instant::now() + wait;
        while router.status(id).outcome.is_none() && Instant::now() < deadline {
            let wake = router
                .next_wake()
                .map_or(deadline, |at| instant_at(at).min(deadline));
            match session.as_mut() {
                Some(open) => match open.recv(wake).await {
                    Ok(Some(kind)) => {
                        if let Kind::Receipt(receipt) = &kind {
                            open.send(Kind::ReceiptAck(frame::ReceiptAck {
                                id: receipt.id.clone(),
                            }))
                            .await?;
                        }
                        router.on_frame(&kind, &mut session).await?;
                    }
                    Ok(None) => router.tick(&mut session).await?,
                    Err(_) => router.on_session_lost(&mut session).await?,
                },
                None => {
                    tokio::time::sleep_until(wake).await;
                    router.tick(&mut session).await?;
                }
            }
        }
        Ok(router.status(id))
    }

    /// Looks up numbers: online, offline or not a user. Order follows `numbers`.
    pub async fn lookup(&self, numbers: &[String]) -> Result<Vec<(String, Presence)>> {
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        let request = Kind::Lookup(frame::Lookup {
            request_id,
            numbers: numbers.to_vec(),
        });
        match session.call(request, request_id).await? {
            Kind::LookupResult(result) => Ok(result
                .entries
                .into_iter()
                .map(|e| {
                    (
                        e.number,
                        Presence::try_from(e.presence).unwrap_or(Presence::NotAUser),
                    )
                })
                .collect()),
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a lookup".into(),
            )),
        }
    }

    /// Opts out: the server deletes the account and everything of it; the profile forgets the
    /// registration, the device key and the encryption keys.
    pub async fn disable(self) -> Result<()> {
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        match session
            .call(Kind::Disable(frame::Disable { request_id }), request_id)
            .await?
        {
            Kind::DisableResult(_) => {
                Inbox::forget_keys(self.profile.dir())?;
                self.profile.forget_registration()
            }
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol("unexpected answer to disable".into())),
        }
    }

    /// This number's devices.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        let request = Kind::Devices(frame::DevicesRequest {
            request_id,
            number: self.data.number.clone(),
        });
        match session.call(request, request_id).await? {
            Kind::DeviceList(list) => Ok(list
                .device_ids
                .iter()
                .filter_map(|d| DeviceId::from_slice(d))
                .map(|id| DeviceInfo {
                    id,
                    identity_key: list
                        .devices
                        .iter()
                        .find(|keys| keys.device_id == id.as_bytes())
                        .and_then(|keys| key_of(&keys.identity_key)),
                    this_device: id == self.device,
                })
                .collect()),
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a device list request".into(),
            )),
        }
    }

    /// Removes a device of this number: the server deletes its keys and queue and signs it out.
    /// Removing this device also forgets its registration here.
    pub async fn remove_device(&self, device: DeviceId) -> Result<()> {
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        let request = Kind::RemoveDevice(frame::RemoveDevice {
            request_id,
            device_id: device.as_bytes().to_vec(),
        });
        match session.call(request, request_id).await? {
            Kind::RemoveDeviceResult(_) => {
                if device == self.device {
                    Inbox::forget_keys(self.profile.dir())?;
                    self.profile.forget_registration()?;
                }
                Ok(())
            }
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a device removal".into(),
            )),
        }
    }

    /// Shows a link code for a new device (through `show`), then waits up to `wait` for a device
    /// to join with it. The joined device's identity key is trusted here at once: this device
    /// approved it.
    pub async fn approve_link(
        &self,
        show: impl FnOnce(&str, u32),
        wait: Duration,
    ) -> Result<Option<DeviceId>> {
        let mut inbox = self.inbox()?;
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        let request = Kind::LinkCodeRequest(frame::LinkCodeRequest { request_id });
        match session.call(request, request_id).await? {
            Kind::LinkCode(code) => show(&code.code, code.expires_in),
            Kind::Error(e) => return Err(ClientError::Refused(e.message)),
            _ => {
                return Err(ClientError::Protocol(
                    "unexpected answer to a link code request".into(),
                ))
            }
        }
        let deadline = Instant::now() + wait;
        while let Some(kind) = session.recv(deadline).await? {
            match kind {
                Kind::LinkCompleted(done) => {
                    let Some(device) = DeviceId::from_slice(&done.device_id) else {
                        continue;
                    };
                    let keys = frame::DeviceKeys {
                        device_id: done.device_id.clone(),
                        identity_key: done.identity_key.clone(),
                        signing_key: done.signing_key.clone(),
                        ..Default::default()
                    };
                    let own = self.data.number.clone();
                    let signature = inbox.update(|_, crypto| {
                        crypto.learn_device(device, &own, &keys);
                        if let Some(key) = key_of(&done.identity_key) {
                            crypto.trust(&own, &[key]);
                        }
                        let signature =
                            crypto.vouch_for(device, &done.identity_key, &done.signing_key);
                        Ok(Change::Save(signature))
                    })?;
                    // Vouching lets this number's contacts accept the new device without a
                    // safety-number check: it was approved by a device they already trust.
                    let request_id = session.request_id();
                    let vouch = Kind::Vouch(frame::Vouch {
                        request_id,
                        device_id: done.device_id.clone(),
                        signature,
                    });
                    match session.call(vouch, request_id).await? {
                        Kind::VouchResult(_) => {}
                        Kind::Error(e) => return Err(ClientError::Refused(e.message)),
                        _ => {
                            return Err(ClientError::Protocol(
                                "unexpected answer to a vouch".into(),
                            ))
                        }
                    }
                    return Ok(Some(device));
                }
                Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
                Kind::Error(e) if e.fatal => return Err(ClientError::Refused(e.message)),
                _ => {}
            }
        }
        Ok(None)
    }

    /// The safety number with `number`, from the directory's current keys of both sides.
    pub async fn fingerprint(&self, number: &str) -> Result<Fingerprint> {
        let number = E164::parse(number)?.as_str().to_string();
        let mut inbox = self.inbox()?;
        let mut session = self.session(false).await?;
        let mine: Vec<[u8; 32]> = self
            .directory(&mut session, &self.data.number)
            .await?
            .iter()
            .filter_map(|d| key_of(&d.identity_key))
            .collect();
        let theirs: Vec<[u8; 32]> = self
            .directory(&mut session, &number)
            .await?
            .iter()
            .filter_map(|d| key_of(&d.identity_key))
            .collect();
        if theirs.is_empty() {
            return Err(ClientError::Refused(
                "that number has no devices with published keys (not a user?)".into(),
            ));
        }
        let trusted: Vec<Option<bool>> = inbox.look(|crypto| {
            theirs
                .iter()
                .map(|key| crypto.is_trusted(&number, key))
                .collect()
        })?;
        Ok(Fingerprint {
            safety_number: crate::e2e::safety_number(
                (&self.data.number, &mine),
                (&number, &theirs),
            ),
            devices: theirs.len(),
            untrusted: trusted.iter().filter(|t| **t == Some(false)).count(),
            known: trusted.iter().any(Option::is_some),
            number,
        })
    }

    /// Trusts the identity keys the directory lists for `number` now (after comparing safety
    /// numbers). Returns how many keys that is.
    pub async fn trust(&self, number: &str) -> Result<usize> {
        let number = E164::parse(number)?.as_str().to_string();
        let mut inbox = self.inbox()?;
        let mut session = self.session(false).await?;
        let listed = self.directory(&mut session, &number).await?;
        inbox.update(|_, crypto| {
            let keys: Vec<[u8; 32]> = listed
                .iter()
                .filter_map(|d| key_of(&d.identity_key))
                .collect();
            crypto.trust(&number, &keys);
            Ok(Change::Save(keys.len()))
        })
    }

    /// Receives until `handle` returns false or `until` passes. Each message is decrypted and
    /// stored (with the new session state, in one local transaction), then acknowledged, then
    /// shown once the server confirms the acknowledgement.
    pub async fn listen(
        &self,
        until: Option<Instant>,
        mut handle: impl FnMut(Event) -> bool,
    ) -> Result<()> {
        let mut inbox = self.inbox()?;
        // Messages stored and acknowledged by an earlier run that stopped before showing them.
        for message in inbox.take_unshown()? {
            if !handle(Event::Message(message)) {
                return Ok(());
            }
        }
        let mut router = crate::route::Router::new(self, &self.data.routing, true)?;
        let mut session = Some(self.session(true).await?);
        if let Some(open) = session.as_mut() {
            self.ensure_keys(&mut inbox, open).await?;
        }
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let user_deadline = until.unwrap_or(far);
        // Messages left pending by an earlier run (a delayed fallback, an SMS to retry) go on.
        router.tick(&mut session).await?;
        loop {
            for (id, outcome, detail) in router.take_finished() {
                let outcome = crate::route::outcome_name(outcome);
                if !handle(Event::Routed {
                    id,
                    outcome,
                    detail,
                }) {
                    return Ok(());
                }
            }
            let deadline = router
                .next_wake()
                .map_or(user_deadline, |at| instant_at(at).min(user_deadline));
            let Some(open) = session.as_mut() else {
                return Err(ClientError::Network(
                    "the session ended; pending messages resume at the next listen".into(),
                ));
            };
            let Some(kind) = open.recv(deadline).await? else {
                if Instant::now() >= user_deadline {
                    return Ok(());
                }
                router.tick(&mut session).await?;
                continue;
            };
            if let Kind::Receipt(receipt) = &kind {
                open.send(Kind::ReceiptAck(frame::ReceiptAck {
                    id: receipt.id.clone(),
                }))
                .await?;
            }
            if router.on_frame(&kind, &mut session).await? {
                continue;
            }
            let Some(open) = session.as_mut() else {
                continue;
            };
            match kind {
                Kind::Deliver(deliver) => {
                    let (Some(sender_device), Some(id)) = (
                        DeviceId::from_slice(&deliver.sender_device),
                        MessageId::from_slice(&deliver.id),
                    ) else {
                        continue;
                    };
                    if let Err(reason) = self
                        .receive(&mut inbox, open, sender_device, id, &deliver)
                        .await?
                    {
                        // Discarded for good: acknowledged below so the server deletes it, and
                        // reported once.
                        if !handle(Event::Rejected {
                            sender_device,
                            id,
                            reason,
                        }) {
                            return Ok(());
                        }
                    }
                    open.send(Kind::Ack(frame::Ack {
                        sender_device: deliver.sender_device,
                        id: deliver.id,
                    }))
                    .await?;
                }
                Kind::AckResult(result) => {
                    let (Some(sender_device), Some(id)) = (
                        DeviceId::from_slice(&result.sender_device),
                        MessageId::from_slice(&result.id),
                    ) else {
                        continue;
                    };
                    if AckStatus::try_from(result.status) == Ok(AckStatus::Withdrawn) {
                        // The sender withdrew it (and sends it as SMS): never show it here.
                        inbox.discard(sender_device, id)?;
                        continue;
                    }
                    // CONFIRMED: the server deleted our copy. UNKNOWN: an earlier acknowledgement
                    // (ours, before a restart) already did. Either way it is ours to show once.
                    if let Some(message) = inbox.take_to_show(sender_device, id)? {
                        if !handle(Event::Message(message)) {
                            return Ok(());
                        }
                    }
                }
                Kind::Receipt(receipt) => {
                    if let (Some(id), Ok(kind)) = (
                        MessageId::from_slice(&receipt.id),
                        ReceiptKind::try_from(receipt.kind),
                    ) {
                        if !handle(Event::Receipt { id, kind }) {
                            return Ok(());
                        }
                    }
                }
                Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
                Kind::Error(e) if e.fatal => return Err(ClientError::Refused(e.message)),
                _ => {}
            }
        }
    }

    /// Decrypts, checks and stores one delivery. `Ok(Err(reason))`: the delivery is rejected.
    async fn receive(
        &self,
        inbox: &mut Inbox,
        session: &mut Session,
        sender_device: DeviceId,
        id: MessageId,
        deliver: &frame::Deliver,
    ) -> Result<std::result::Result<(), String>> {
        if inbox.read(|tx| tx.contains(sender_device, id))? {
            return Ok(Ok(()));
        }
        // The usual case, in one transaction: a device already checked for the number its
        // message claims. Decrypted, checked, stored and the session saved together.
        let fast = inbox.update(|tx, crypto| {
            let (content, sender_key) = match open_delivery(crypto, sender_device, deliver) {
                Ok(opened) => opened,
                Err(reason) => return Ok(Change::Abandon(Some(Err(reason)))),
            };
            let checked = crypto.device(sender_device).is_some_and(|known| {
                known.number.as_deref() == Some(content.from.as_str())
                    && known.identity_key == sender_key
            });
            let Some(trusted) = crypto.is_trusted(&content.from, &sender_key) else {
                return Ok(Change::Abandon(None));
            };
            if !checked {
                return Ok(Change::Abandon(None));
            }
            let warning =
                (!trusted && sender_device != self.device).then(|| changed_warning(&content.from));
            tx.store(&received(sender_device, id, content, true, warning))?;
            Ok(Change::Save(Some(Ok(()))))
        })?;
        if let Some(done) = fast {
            return Ok(done);
        }
        // A device seen for the first time: a trial decryption on a throwaway copy tells who the
        // message claims to be from, which is checked against the directory before anything
        // is kept; then the real decryption, stored with the advanced session.
        let mut trial = inbox.snapshot()?;
        let claimed = match open_delivery(&mut trial, sender_device, deliver) {
            Ok((content, _)) => content.from,
            Err(reason) => return Ok(Err(reason)),
        };
        let listed = match E164::parse(&claimed) {
            Err(_) => None,
            Ok(number) => match self.directory(session, number.as_str()).await {
                Ok(listed) => Some(listed),
                Err(ClientError::Refused(_)) => None,
                Err(e) => return Err(e),
            },
        };
        inbox.update(|tx, crypto| {
            if tx.contains(sender_device, id)? {
                return Ok(Change::Unchanged(Ok(())));
            }
            let (content, sender_key) = match open_delivery(crypto, sender_device, deliver) {
                Ok(opened) => opened,
                Err(reason) => return Ok(Change::Abandon(Err(reason))),
            };
            let (verified, warning) = self.judge_sender(
                crypto,
                listed.as_deref(),
                &content.from,
                sender_device,
                sender_key,
            );
            tx.store(&received(sender_device, id, content, verified, warning))?;
            Ok(Change::Save(Ok(())))
        })
    }

    /// Whether the sending device, holding `sender_key`, is a device of `claimed` in the
    /// directory (`listed`; `None` if it could not be asked), and whether that key is trusted for
    /// `claimed` (trusting the listed keys if nothing was trusted for it yet). Returns
    /// (verified, warning).
    fn judge_sender(
        &self,
        crypto: &mut Crypto,
        listed: Option<&[frame::DeviceKeys]>,
        claimed: &str,
        sender_device: DeviceId,
        sender_key: [u8; 32],
    ) -> (bool, Option<String>) {
        let Some(listed) = listed else {
            return (
                false,
                Some(format!(
                    "this message claims to be from {claimed}, which could not be checked now"
                )),
            );
        };
        let Some(entry) = listed.iter().find(|d| {
            d.device_id == sender_device.as_bytes() && key_of(&d.identity_key) == Some(sender_key)
        }) else {
            return (
                false,
                Some(format!(
                    "this message claims to be from {claimed} but was sent by a device that is not theirs"
                )),
            );
        };
        // Every listed device is learnt: a voucher's signing key may be needed below.
        for listed_device in listed {
            if let Some(device) = DeviceId::from_slice(&listed_device.device_id) {
                crypto.learn_device(device, claimed, listed_device);
            }
        }
        crypto.learn_device(sender_device, claimed, entry);
        let trusted = match crypto.is_trusted(claimed, &sender_key) {
            Some(false) => crypto.accept_vouched(claimed, &[sender_key]).is_empty(),
            Some(true) => true,
            None => {
                let keys: Vec<[u8; 32]> = listed
                    .iter()
                    .filter_map(|d| key_of(&d.identity_key))
                    .collect();
                crypto.check_trust(claimed, &keys);
                true
            }
        };
        if trusted || sender_device == self.device {
            (true, None)
        } else {
            (true, Some(changed_warning(claimed)))
        }
    }
}

fn changed_warning(number: &str) -> String {
    format!(
        "the safety number with {number} changed: this comes from a key you have not trusted; compare `tidings fingerprint {number}` with them"
    )
}

fn received(
    sender_device: DeviceId,
    id: MessageId,
    content: Content,
    sender_verified: bool,
    warning: Option<String>,
) -> Received {
    Received {
        sender_device,
        id,
        from: content.from,
        to: content.to,
        text: content.text,
        sent_at_ms: content.sent_at_ms,
        sender_verified,
        warning,
    }
}

/// The server's answer to one send attempt.
enum SendAnswer {
    Done {
        outcome: SendOutcome,
        receipt: Option<ReceiptKind>,
    },
    Changed(frame::SendResult),
}
