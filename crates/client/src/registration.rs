//! Joining and leaving: registering a number (code by SMS), linking another device to it,
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
use crate::e2e::Crypto;
use crate::inbox::{Change, Inbox};
use crate::net::Endpoint;
use crate::profile::{Profile, ProfileData, Trust};
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
    let account = Account::open(profile.clone())?.with_passphrase(passphrase.clone());
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
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
    let account = Account::open(profile.clone())?.with_passphrase(passphrase.clone());
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
    Ok(device_id)
}

/// Shows a link code for a new device (through `show`), then waits up to `wait` for a device
/// to join with it. The joined device's identity key is trusted here at once: this device
/// approved it.
pub async fn approve_link(
    account: &Account,
    show: impl FnOnce(&str, u32),
    wait: Duration,
) -> Result<Option<DeviceId>> {
    let mut inbox = account.inbox()?;
    let mut session = account.session(false).await?;
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
                let own = account.number().to_string();
                let signature = inbox.update(|_, crypto| {
                    crypto.learn_device(device, &own, &keys);
                    if let Some(key) = key_of(&done.identity_key) {
                        crypto.trust(&own, &[key]);
                    }
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
                    Kind::Error(e) => return Err(ClientError::Refused(e.message)),
                    _ => return Err(ClientError::Protocol("unexpected answer to a vouch".into())),
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

/// This number's devices.
pub async fn devices(account: &Account) -> Result<Vec<DeviceInfo>> {
    let mut session = account.session(false).await?;
    let request_id = session.request_id();
    let request = Kind::Devices(frame::DevicesRequest {
        request_id,
        number: account.number().to_string(),
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
        Kind::Error(e) => Err(ClientError::Refused(e.message)),
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
        Kind::Error(e) => Err(ClientError::Refused(e.message)),
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
        Kind::Error(e) => Err(ClientError::Refused(e.message)),
        _ => Err(ClientError::Protocol("unexpected answer to disable".into())),
    }
}
