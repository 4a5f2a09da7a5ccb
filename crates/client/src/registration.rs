//! Joining and leaving: registering a number (a code the server sends by SMS, or the user's own
//! SMS to the service number), linking another device to it,
//! listing and removing this number's devices, and opting out.
//!
//! [`register`] is the first time a profile touches the network: it runs only because its user
//! asked to opt in (promise P1). Every step after it starts from an opened [`Account`]. Nothing
//! here logs a number, a code or a key.

use std::time::Duration;

use ed25519_dalek::Signer as _;
use tidings_proto::frame::{self, Kind};
use tidings_proto::id::DeviceId;
use tidings_proto::number::E164;
use tokio::time::Instant;

use crate::account::{key_of, Account};
use crate::e2e::{device_fingerprint, Crypto};
use crate::inbox::{Change, Inbox};
use crate::link_secret::LinkString;
use crate::net::Endpoint;
use crate::profile::{Profile, ProfileData, Trust};
use crate::session::Session;
use crate::vault::Passphrase;
use crate::{ClientError, Result};

/// One device of this number, as `tidings devices` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub id: DeviceId,
    /// The device's Curve25519 identity key, once it has published one.
    pub identity_key: Option<[u8; 32]>,
    pub this_device: bool,
}

/// The reason in a refusal from the HTTP API, for the user.
fn api_message(body: &serde_json::Value) -> String {
    body.get("message")
        .and_then(|m| m.as_str())
        .unwrap_or("no details")
        .to_string()
}

/// A refusal from the HTTP API: one that says when to try again (`retry_after`, from the body
/// or the `Retry-After` header) becomes [`ClientError::RetryLater`].
fn refusal(body: &serde_json::Value, message: String) -> ClientError {
    match body.get("retry_after").and_then(serde_json::Value::as_u64) {
        Some(seconds) => ClientError::RetryLater {
            message,
            retry_after: Duration::from_secs(seconds),
        },
        None => ClientError::Refused(message),
    }
}

/// Step one of opting in: stores the number and server in the profile and asks the server to
/// send a code by SMS (the device key is made at [`verify`], sealed under the passphrase). This is the first time the profile touches the network.
pub async fn register(profile: &Profile, number: &str, server: &str, trust: Trust) -> Result<E164> {
    let (number, endpoint) = save_registration(profile, number, server, trust)?;
    let (status, body) = endpoint
        .post_json(
            "/v1/registration/code",
            &serde_json::json!({ "number": number.as_str() }),
        )
        .await?;
    if status != hyper::StatusCode::ACCEPTED {
        return Err(refusal(&body, api_message(&body)));
    }
    Ok(number)
}

/// What the user's phone must text to register by its own SMS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSms {
    pub number: E164,
    /// The code to send back (and sign) when completing.
    pub code: String,
    /// The number to text.
    pub service_number: String,
    /// The exact text to send.
    pub text: String,
    /// Seconds the code stays valid.
    pub expires_in: u64,
}

/// Step one of opting in by the user's own SMS: stores the number and server in the profile and
/// declares the number; the server sends nothing. The user then texts [`OwnSms::text`] from the
/// number to [`OwnSms::service_number`], and [`verify_own_sms`] completes.
pub async fn register_own_sms(
    profile: &Profile,
    number: &str,
    server: &str,
    trust: Trust,
) -> Result<OwnSms> {
    let (number, endpoint) = save_registration(profile, number, server, trust)?;
    let (status, body) = endpoint
        .post_json(
            "/v1/registration/inbound",
            &serde_json::json!({ "number": number.as_str() }),
        )
        .await?;
    if status != hyper::StatusCode::CREATED {
        return Err(refusal(&body, api_message(&body)));
    }
    let field = |name: &str| {
        body.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| ClientError::Protocol(format!("the declaration's answer has no {name}")))
    };
    Ok(OwnSms {
        code: field("code")?,
        service_number: field("service_number")?,
        text: field("text")?,
        expires_in: body
            .get("expires_in")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0),
        number,
    })
}

/// Saves the number and server in the profile before the first request to the server.
fn save_registration(
    profile: &Profile,
    number: &str,
    server: &str,
    trust: Trust,
) -> Result<(E164, Endpoint)> {
    let number = E164::parse(number)?;
    let endpoint = Endpoint::parse(server, trust.clone())?;
    let existing = profile.load()?;
    let existing_routing = existing
        .as_ref()
        .map(|d| d.routing.clone())
        .unwrap_or_default();
    let existing_presence = existing.as_ref().map(|d| d.presence).unwrap_or_default();
    if let Some(existing) = existing {
        if existing.device_id.is_some() && existing.number != number.as_str() {
            return Err(ClientError::Profile(
                "this profile is registered to another number: use another --profile, or `tidings disable` first".into(),
            ));
        }
    }
    profile.save(&ProfileData {
        number: number.as_str().to_string(),
        server: server.to_string(),
        trust,
        device_id: None,
        routing: existing_routing,
        presence: existing_presence,
        oprf_key: None,
        previous_oprf_key: None,
    })?;
    Ok((number, endpoint))
}

/// How a registration proves its number.
enum Proof {
    /// The code the server sent by SMS.
    Code,
    /// The user's own SMS: the server is asked until it has seen it, or until the deadline.
    OwnSms { until: Instant },
}

/// Seconds one completion request asks the server to wait for the SMS.
const OWN_SMS_WAIT_SECONDS: u64 = 20;

/// Step two: proves the code and binds the device key, then makes this device's encryption keys
/// (sealed under `passphrase`) and publishes them. Returns how many earlier devices of the
/// number were signed out.
pub async fn verify(profile: &Profile, code: &str, passphrase: &Passphrase) -> Result<u32> {
    bind_device(profile, code.trim(), passphrase, Proof::Code).await
}

/// Step two of opting in by own SMS: waits (up to `wait`) for the server to see the SMS from the
/// number, then binds the device key and makes and publishes this device's keys like [`verify`].
pub async fn verify_own_sms(
    profile: &Profile,
    code: &str,
    passphrase: &Passphrase,
    wait: Duration,
) -> Result<u32> {
    let until = Instant::now() + wait;
    bind_device(profile, code.trim(), passphrase, Proof::OwnSms { until }).await
}

/// Proves the number, binds the device key and makes this device's keys.
async fn bind_device(
    profile: &Profile,
    code: &str,
    passphrase: &Passphrase,
    proof: Proof,
) -> Result<u32> {
    let mut data = profile.load()?.ok_or(ClientError::NotRegistered)?;
    // Unlocked before the code is spent, so a wrong passphrase costs no code.
    let mut inbox = Inbox::open(profile.dir(), passphrase)?;
    let key = profile.device_key(inbox.vault())?;
    let endpoint = Endpoint::parse(&data.server, data.trust.clone())?;
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&tidings_proto::transcript::register(
        &data.number,
        code,
        &public,
    ));
    let mut body = serde_json::json!({
        "number": data.number,
        "code": code,
        "device_key": tidings_proto::id::to_text(&public),
        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
    });
    let (status, body) = match proof {
        Proof::Code => endpoint.post_json("/v1/registration/verify", &body).await?,
        Proof::OwnSms { until } => loop {
            let left = until.saturating_duration_since(Instant::now()).as_secs();
            body["wait_seconds"] = left.min(OWN_SMS_WAIT_SECONDS).into();
            let (status, answer) = endpoint
                .post_json("/v1/registration/inbound/complete", &body)
                .await?;
            let waiting = status == hyper::StatusCode::CONFLICT;
            if !waiting || left == 0 {
                break (status, answer);
            }
        },
    };
    if status != hyper::StatusCode::OK {
        let mut message = api_message(&body);
        if let Some(left) = body
            .get("attempts_left")
            .and_then(serde_json::Value::as_u64)
        {
            message.push_str(&format!(" ({left} attempts left)"));
        }
        return Err(refusal(&body, message));
    }
    let device_id = body
        .get("device_id")
        .and_then(|d| d.as_str())
        .and_then(DeviceId::from_text)
        .ok_or_else(|| ClientError::Protocol("verify answered without a device id".into()))?;
    // A registration is a new identity: peers see the change and are warned. What this profile
    // trusted is kept, and its own key is trusted for its own number from now on, so that a
    // later device of the number is trusted only with a vouch.
    let own = data.number.clone();
    inbox.replace_crypto(|old| {
        let mut crypto = Crypto::replacing(old);
        crypto.trust_itself(&own);
        crypto
    })?;
    data.device_id = Some(device_id.to_text());
    data.oprf_key = crate::discovery::pinned_key_of(&body);
    data.previous_oprf_key = None;
    profile.save(&data)?;
    let account = Account::open(profile.clone())?
        .with_passphrase(passphrase.clone())
        .with_vault(inbox.vault().clone());
    account.learn_previous_key().await?;
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
    crate::discovery::learn_own(&mut inbox, &data, &body)?;
    Ok(body
        .get("replaced_devices")
        .and_then(serde_json::Value::as_u64)
        .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)))
}

/// What a device that joined a number learnt: its id and fingerprint, and the number's other
/// devices as the directory listed them when it joined (trusted from then on: their fingerprints
/// are for the user to compare with the screen of the device that showed the link string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub device: DeviceId,
    pub fingerprint: String,
    pub others: Vec<(DeviceId, String)>,
}

/// What `tidings link` shows on the approving device: the one string to carry to the new device
/// (the server's code and the secret), how long it lives, and this device's fingerprint.
#[derive(Debug)]
pub struct LinkOffer {
    pub link: String,
    pub expires_in: u32,
    pub fingerprint: String,
}

/// A device that joined with the link string and proved its secret, now vouched for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Approved {
    pub device: DeviceId,
    pub fingerprint: String,
}

/// Joins a number that is registered on another device, with the link string `tidings link`
/// shows there (the server's code, and a secret this device proves it knows without sending it).
/// The other devices stay signed in. Makes and publishes this device's keys, and trusts the
/// number's devices listed now.
pub async fn link(
    profile: &Profile,
    number: &str,
    link: &str,
    server: &str,
    trust: Trust,
    passphrase: &Passphrase,
) -> Result<Joined> {
    let number = E164::parse(number)?;
    let link = LinkString::parse(link)?;
    let endpoint = Endpoint::parse(server, trust.clone())?;
    if profile.load()?.is_some_and(|d| d.device_id.is_some()) {
        return Err(ClientError::Profile(
            "this profile is already registered: link with a new --profile".into(),
        ));
    }
    let mut inbox = Inbox::open(profile.dir(), passphrase)?;
    let key = profile.device_key(inbox.vault())?;
    let (identity_key, signing_key) = inbox.replace_crypto(Crypto::replacing)?.identity_keys();
    let public = key.verifying_key().to_bytes();
    let code = link.code();
    // The server gives this device the id its login key, the number and the code make; the proof
    // covers it, so that the approving device vouches for this device and no other.
    let expected_id = DeviceId(tidings_proto::transcript::link_device_id(
        number.as_str(),
        code,
        &public,
    ));
    let proof = link.proof(
        number.as_str(),
        expected_id.as_bytes(),
        &identity_key,
        &signing_key,
    );
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
        "proof": tidings_proto::id::to_text(&proof),
    });
    let (status, body) = endpoint.post_json("/v1/registration/link", &body).await?;
    if status != hyper::StatusCode::OK {
        return Err(refusal(&body, api_message(&body)));
    }
    let device_id = body
        .get("device_id")
        .and_then(|d| d.as_str())
        .and_then(DeviceId::from_text)
        .ok_or_else(|| ClientError::Protocol("link answered without a device id".into()))?;
    if device_id != expected_id {
        return Err(ClientError::Protocol(
            "the server gave this device another id than its login key and the link code make, so the device that showed the link string would refuse it: link again with a new `tidings link` and a new --profile".into(),
        ));
    }
    let data = ProfileData {
        number: number.as_str().to_string(),
        server: server.to_string(),
        trust,
        device_id: Some(device_id.to_text()),
        routing: Default::default(),
        presence: Default::default(),
        oprf_key: crate::discovery::pinned_key_of(&body),
        previous_oprf_key: None,
    };
    profile.save(&data)?;
    crate::discovery::learn_own(&mut inbox, &data, &body)?;
    let account = Account::open(profile.clone())?
        .with_passphrase(passphrase.clone())
        .with_vault(inbox.vault().clone());
    account.learn_previous_key().await?;
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
    // This device and the number's devices listed now are trusted for the number; a device that
    // joins later is trusted only with a vouch from one of them. The user compares the listed
    // fingerprints with the approving device's screen.
    let listed = account.directory(&mut session, number.as_str()).await?;
    let own = number.as_str().to_string();
    let others = inbox.update(|_, crypto| {
        crypto.trust_itself(&own);
        let mut others = Vec::new();
        for entry in &listed {
            let (Some(id), Some(key)) = (
                DeviceId::from_slice(&entry.device_id),
                key_of(&entry.identity_key),
            ) else {
                continue;
            };
            if id != device_id {
                crypto.trust(&own, &[key]);
                others.push((id, device_fingerprint(&key)));
            }
        }
        Ok(Change::Save(others))
    })?;
    Ok(Joined {
        device: device_id,
        fingerprint: device_fingerprint(&identity_key),
        others,
    })
}

/// Shows a link string for a new device (through `show`): the server's link code and a secret
/// drawn here that never leaves this device but on the user's screen. Then waits up to `wait` for
/// a device to join with it. A device that proves the secret is trusted here at once (this
/// device approved it) and vouched for; one that does not (someone else who holds this device's
/// login key, or the server, linked a device of its own) is refused and removed.
pub async fn approve_link(
    account: &Account,
    show: impl FnOnce(&LinkOffer),
    wait: Duration,
) -> Result<Option<Approved>> {
    let mut inbox = account.inbox()?;
    let (own_key, _) = inbox.look(Crypto::identity_keys)?;
    let mut session = account.session(false).await?;
    let request_id = session.request_id();
    let request = Kind::LinkCodeRequest(frame::LinkCodeRequest { request_id });
    let link = match session.call(request, request_id).await? {
        Kind::LinkCode(code) => {
            let link = LinkString::new(&code.code).map_err(|_| {
                ClientError::Protocol("the server's link code is not 12 digits".into())
            })?;
            show(&LinkOffer {
                link: link.to_text(),
                expires_in: code.expires_in,
                fingerprint: device_fingerprint(&own_key),
            });
            link
        }
        Kind::Error(e) => return Err(e.into()),
        _ => {
            return Err(ClientError::Protocol(
                "unexpected answer to a link code request".into(),
            ))
        }
    };
    let own = account.number().to_string();
    let deadline = Instant::now() + wait;
    while let Some(kind) = session.recv(deadline).await? {
        match kind {
            Kind::LinkCompleted(done) => {
                let (Some(device), Some(identity_key)) = (
                    DeviceId::from_slice(&done.device_id),
                    key_of(&done.identity_key),
                ) else {
                    continue;
                };
                if !link.proof_holds(
                    &own,
                    &done.device_id,
                    &done.identity_key,
                    &done.signing_key,
                    &done.proof,
                ) {
                    return Err(refuse_unproven(&mut session, device).await);
                }
                let keys = frame::DeviceKeys {
                    device_id: done.device_id.clone(),
                    identity_key: done.identity_key.clone(),
                    signing_key: done.signing_key.clone(),
                    ..Default::default()
                };
                let signature = inbox.update(|_, crypto| {
                    crypto.learn_device(device, &own, &keys);
                    crypto.trust(&own, &[identity_key]);
                    let signature = crypto.vouch_for(device, &done.identity_key, &done.signing_key);
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
                    Kind::Error(e) => return Err(e.into()),
                    _ => return Err(ClientError::Protocol("unexpected answer to a vouch".into())),
                }
                return Ok(Some(Approved {
                    device,
                    fingerprint: device_fingerprint(&identity_key),
                }));
            }
            Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
            Kind::Error(e) if e.fatal => return Err(e.into()),
            _ => {}
        }
    }
    Ok(None)
}

/// Removes a device that joined with this device's link code without proving the secret, and
/// says what happened.
async fn refuse_unproven(session: &mut Session, device: DeviceId) -> ClientError {
    let request_id = session.request_id();
    let request = Kind::RemoveDevice(frame::RemoveDevice {
        request_id,
        device_id: device.as_bytes().to_vec(),
    });
    let removed = matches!(
        session.call(request, request_id).await,
        Ok(Kind::RemoveDeviceResult(_))
    );
    let what_now = if removed {
        "it was removed from this number".to_string()
    } else {
        format!("remove it with `tidings devices --remove {device}`")
    };
    ClientError::LinkNotProven(format!(
        "device {device} joined with this device's link code but did not prove the secret shown here, so it was not trusted or vouched for and {what_now}. Someone who holds this device's login key, or the server, linked a device of its own (or the link string was mistyped): run `tidings link` again for a new one"
    ))
}

/// This number's devices.
pub async fn devices(account: &Account) -> Result<Vec<DeviceInfo>> {
    let mut session = account.session(false).await?;
    let own = account.pseudonym(&mut session, account.number()).await?;
    let request_id = session.request_id();
    let request = Kind::Devices(frame::DevicesRequest {
        request_id,
        account: own.to_vec(),
        ..frame::DevicesRequest::default()
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
                this_device: id == account.device(),
            })
            .collect()),
        Kind::Error(e) => Err(e.into()),
        _ => Err(ClientError::Protocol(
            "unexpected answer to a device list request".into(),
        )),
    }
}

/// Removes a device of this number: the server deletes its keys and queue and signs it out.
/// Removing this device also forgets its registration here.
pub async fn remove_device(account: &Account, device: DeviceId) -> Result<()> {
    let mut session = account.session(false).await?;
    let request_id = session.request_id();
    let request = Kind::RemoveDevice(frame::RemoveDevice {
        request_id,
        device_id: device.as_bytes().to_vec(),
    });
    match session.call(request, request_id).await? {
        Kind::RemoveDeviceResult(_) => {
            if device == account.device() {
                Inbox::forget_keys(account.profile().dir())?;
                account.profile().forget_registration()?;
            }
            Ok(())
        }
        Kind::Error(e) => Err(e.into()),
        _ => Err(ClientError::Protocol(
            "unexpected answer to a device removal".into(),
        )),
    }
}

/// Opts out: the server deletes the account and everything of it; the profile forgets the
/// registration, the device key and the encryption keys.
pub async fn disable(account: Account) -> Result<()> {
    let mut session = account.session(false).await?;
    let request_id = session.request_id();
    match session
        .call(Kind::Disable(frame::Disable { request_id }), request_id)
        .await?
    {
        Kind::DisableResult(_) => {
            Inbox::forget_keys(account.profile().dir())?;
            account.profile().forget_registration()
        }
        Kind::Error(e) => Err(e.into()),
        _ => Err(ClientError::Protocol("unexpected answer to disable".into())),
    }
}
