//! The operations a user asks for. Each opens what it needs and nothing more; an unregistered
//! profile opens nothing at all.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey};
use prost::Message as _;
use rand::RngCore as _;
use tidings_proto::frame::{
    self, AckStatus, Content, Kind, Presence, ReceiptKind, SendMode, SendOutcome,
};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tokio::time::Instant;

use crate::inbox::{Inbox, Received};
use crate::net::Endpoint;
use crate::profile::{Profile, ProfileData, Trust};
use crate::session::Session;
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

/// Step two: proves the code and binds the device key. Returns how many earlier devices of the
/// number were signed out.
pub async fn verify(profile: &Profile, code: &str) -> Result<u32> {
    let mut data = profile.load()?.ok_or(ClientError::NotRegistered)?;
    let key = profile.device_key()?;
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
    data.device_id = Some(device_id.to_text());
    profile.save(&data)?;
    Ok(body
        .get("replaced_devices")
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
}

/// What happened to a sent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReport {
    pub id: MessageId,
    pub outcome: SendOutcome,
    /// The receipt, if one arrived while waiting.
    pub receipt: Option<ReceiptKind>,
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
}

/// A registered profile, ready to talk to its server.
#[derive(Debug)]
pub struct Client {
    profile: Profile,
    data: ProfileData,
    device: DeviceId,
    key: SigningKey,
    endpoint: Endpoint,
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
        })
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

    /// Sends a text. Waits up to `wait` for the server's answer and, for an accepted message, for
    /// its receipt.
    pub async fn send(
        &self,
        to: &str,
        text: &str,
        mode: SendMode,
        ttl_seconds: u32,
        wait: Duration,
    ) -> Result<SendReport> {
        let to = E164::parse(to)?;
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let id = MessageId(id);
        let content = Content {
            from: self.data.number.clone(),
            text: text.to_string(),
            sent_at_ms: now_ms(),
        };
        let payload = Bytes::from(content.encode_to_vec());
        if payload.len() > tidings_proto::MAX_PAYLOAD_BYTES {
            return Err(ClientError::Refused(format!(
                "the message is too long: at most {} bytes",
                tidings_proto::MAX_PAYLOAD_BYTES - 64
            )));
        }
        let mut session = self.session(false).await?;
        session
            .send(Kind::Send(frame::Send {
                id: id.as_bytes().to_vec(),
                to: to.as_str().to_string(),
                mode: mode as i32,
                ttl_seconds,
                payload,
            }))
            .await?;
        let deadline = Instant::now() + wait;
        let mut outcome = None;
        let mut receipt = None;
        while let Some(kind) = session.recv(deadline).await? {
            match kind {
                Kind::SendResult(result) if result.id == id.as_bytes() => {
                    let answered =
                        SendOutcome::try_from(result.outcome).unwrap_or(SendOutcome::Invalid);
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
        Ok(SendReport {
            id,
            outcome,
            receipt,
        })
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
        let inbox = Inbox::open(self.profile.dir())?;
        let mut router = crate::route::Router::new(self, &inbox, &self.data.routing, false)?;
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
    /// registration and the device key.
    pub async fn disable(self) -> Result<()> {
        let mut session = self.session(false).await?;
        let request_id = session.request_id();
        match session
            .call(Kind::Disable(frame::Disable { request_id }), request_id)
            .await?
        {
            Kind::DisableResult(_) => self.profile.forget_registration(),
            Kind::Error(e) => Err(ClientError::Refused(e.message)),
            _ => Err(ClientError::Protocol("unexpected answer to disable".into())),
        }
    }

    /// Receives until `handle` returns false or `until` passes. Each message is stored, then
    /// acknowledged, then shown once the server confirms the acknowledgement.
    pub async fn listen(
        &self,
        until: Option<Instant>,
        mut handle: impl FnMut(Event) -> bool,
    ) -> Result<()> {
        let inbox = Inbox::open(self.profile.dir())?;
        let mut router = crate::route::Router::new(self, &inbox, &self.data.routing, true)?;
        let mut directory: HashMap<String, Vec<DeviceId>> = HashMap::new();
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let user_deadline = until.unwrap_or(far);
        let mut session = Some(self.session(true).await?);
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
                    if !inbox.contains(sender_device, id)? {
                        let content = Content::decode(deliver.payload.clone()).unwrap_or_default();
                        let verified = self
                            .sender_belongs(open, &mut directory, &content.from, sender_device)
                            .await?;
                        inbox.store(&Received {
                            sender_device,
                            id,
                            from: content.from,
                            text: content.text,
                            sent_at_ms: content.sent_at_ms,
                            sender_verified: verified,
                        })?;
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

    /// Whether `device` is one of the devices the server lists for `claimed`.
    async fn sender_belongs(
        &self,
        session: &mut Session,
        directory: &mut HashMap<String, Vec<DeviceId>>,
        claimed: &str,
        device: DeviceId,
    ) -> Result<bool> {
        if directory
            .get(claimed)
            .is_some_and(|devices| devices.contains(&device))
        {
            return Ok(true);
        }
        let request_id = session.request_id();
        let request = Kind::Devices(frame::DevicesRequest {
            request_id,
            number: claimed.to_string(),
        });
        match session.call(request, request_id).await? {
            Kind::DeviceList(list) => {
                let devices: Vec<DeviceId> = list
                    .device_ids
                    .iter()
                    .filter_map(|d| DeviceId::from_slice(d))
                    .collect();
                let belongs = devices.contains(&device);
                directory.insert(claimed.to_string(), devices);
                Ok(belongs)
            }
            // A directory error (such as the lookup budget) leaves the sender unverified.
            _ => Ok(false),
        }
    }
}
