//! Device keys and the devices of a number: publishing identity, one-time and fallback keys,
//! claiming them to open end-to-end sessions, link codes that add a device, vouching for one,
//! removing a device, and disabling the whole account.
//!
//! The server checks every key's signature before storing it, so a client never receives a key
//! its owner did not sign; the client checks again, so a server cannot forge one either. Nothing
//! here logs a number, a key or a code.

use ed25519_dalek::{Signature, VerifyingKey};
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use tidings_proto::frame::{self, ErrorCode, Kind};
use tidings_proto::id::DeviceId;
use tidings_proto::{MAX_DEVICES, MAX_ONE_TIME_KEYS_PER_UPLOAD, MAX_ONE_TIME_KEYS_STORED};
use tidings_store::{IdentityKeys, Published, SignedKey, Store, Voucher};

use crate::budget::Budget;
use crate::clock::now_ms;
use crate::discovery::{self, Disclosure, BUDGET_USED_UP};
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::reply::{error, rate_limited, reply, storage_unavailable, store_failed};
use crate::state::{LinkOffer, Shared, LIMITER_CAPACITY, LINK_CODE_LIFETIME};

#[cfg(test)]
mod tests;

/// Parses identity keys: a 32-byte Curve25519 key and a valid Ed25519 key.
pub fn identity_keys(identity_key: &[u8], signing_key: &[u8]) -> Option<IdentityKeys> {
    let identity_key = <[u8; 32]>::try_from(identity_key).ok()?;
    let signing_key = <[u8; 32]>::try_from(signing_key).ok()?;
    VerifyingKey::from_bytes(&signing_key).ok()?;
    Some(IdentityKeys {
        identity_key,
        signing_key,
    })
}

/// Parses a signed key and checks its signature by the device's signing key.
fn signed_key(
    device: DeviceId,
    signing_key: &VerifyingKey,
    fallback: bool,
    key: &frame::SignedKey,
) -> Option<SignedKey> {
    let public_key = <[u8; 32]>::try_from(key.public_key.as_slice()).ok()?;
    let signature = <[u8; 64]>::try_from(key.signature.as_slice()).ok()?;
    let transcript =
        tidings_proto::transcript::one_time_key(device.as_bytes(), fallback, &public_key);
    signing_key
        .verify_strict(&transcript, &Signature::from_bytes(&signature))
        .ok()?;
    Some(SignedKey {
        public_key,
        signature,
    })
}

/// Handles `KeysUpload`.
pub async fn upload<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    upload: frame::KeysUpload,
    outbox: &Outbox,
) {
    let request_id = upload.request_id;
    if upload.one_time_keys.len() > MAX_ONE_TIME_KEYS_PER_UPLOAD {
        let message = format!("at most {MAX_ONE_TIME_KEYS_PER_UPLOAD} one-time keys per upload");
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, &message, request_id),
        )
        .await;
    }
    let Some(keys) = identity_keys(&upload.identity_key, &upload.signing_key) else {
        return reply(
            outbox,
            error(
                ErrorCode::InvalidRequest,
                "identity keys must be a 32-byte Curve25519 key and a 32-byte Ed25519 key",
                request_id,
            ),
        )
        .await;
    };
    let Ok(verifier) = VerifyingKey::from_bytes(&keys.signing_key) else {
        return;
    };
    let contact_token_hash = match upload.contact_token_hash.len() {
        0 => None,
        _ => match <[u8; 32]>::try_from(upload.contact_token_hash.as_slice()) {
            Ok(hash) => Some(hash),
            Err(_) => {
                let message = "contact_token_hash must be 32 bytes (SHA-256): nothing was stored";
                return reply(
                    outbox,
                    error(ErrorCode::InvalidRequest, message, request_id),
                )
                .await;
            }
        },
    };
    let mut one_time = Vec::with_capacity(upload.one_time_keys.len());
    for key in &upload.one_time_keys {
        match signed_key(identity.device, &verifier, false, key) {
            Some(key) => one_time.push(key),
            None => {
                let message = "a one-time key is malformed or its signature does not verify: nothing was stored";
                return reply(
                    outbox,
                    error(ErrorCode::InvalidRequest, message, request_id),
                )
                .await;
            }
        }
    }
    let fallback = match &upload.fallback_key {
        None => None,
        Some(key) => match signed_key(identity.device, &verifier, true, key) {
            Some(key) => Some(key),
            None => {
                let message = "the fallback key is malformed or its signature does not verify: nothing was stored";
                return reply(
                    outbox,
                    error(ErrorCode::InvalidRequest, message, request_id),
                )
                .await;
            }
        },
    };
    match state
        .store
        .publish_keys(
            identity.device,
            keys,
            one_time,
            fallback,
            MAX_ONE_TIME_KEYS_STORED,
        )
        .await
    {
        Ok(Published::Stored { one_time_keys }) => {
            if let Some(hash) = contact_token_hash {
                if let Err(e) = state.store.set_contact_token(identity.device, hash).await {
                    tracing::warn!(error = %e, "storing a contact token hash failed");
                    let message = "the contact token could not be stored: upload it again";
                    return reply(outbox, error(ErrorCode::Unavailable, message, request_id)).await;
                }
            }
            reply(
                outbox,
                Kind::KeysUploadResult(frame::KeysUploadResult {
                    request_id,
                    one_time_keys,
                }),
            )
            .await;
        }
        Ok(Published::IdentityMismatch) => {
            let message = "this device's identity keys are already published and cannot change: register the device again";
            reply(
                outbox,
                error(ErrorCode::InvalidRequest, message, request_id),
            )
            .await;
        }
        Ok(Published::TooMany) => {
            let message = format!(
                "at most {MAX_ONE_TIME_KEYS_STORED} unclaimed one-time keys per device: upload fewer"
            );
            reply(
                outbox,
                error(ErrorCode::InvalidRequest, &message, request_id),
            )
            .await;
        }
        Err(e) => {
            let answer = store_failed(&e, "while publishing keys", "upload again", request_id);
            reply(outbox, answer).await;
        }
    }
}

/// Handles `KeysClaim`. Claims of another number's keys draw from the account's claim budget, so
/// one account cannot drain a user's one-time keys (the fallback key keeps sessions possible
/// anyway), and those that list devices the asker did not name from its discovery budget.
pub async fn claim<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    claim: frame::KeysClaim,
    outbox: &Outbox,
) {
    let request_id = claim.request_id;
    if !claim.number.is_empty() {
        let answer = error(
            ErrorCode::InvalidRequest,
            crate::lookup::NUMBERS_ARE_BLINDED,
            request_id,
        );
        return reply(outbox, answer).await;
    }
    let Some(pseudonym) = crate::lookup::account_of(&claim.account) else {
        return reply(outbox, crate::lookup::not_an_account(request_id)).await;
    };
    if claim.device_ids.len() > MAX_DEVICES {
        let message = format!("at most {MAX_DEVICES} devices per claim");
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, &message, request_id),
        )
        .await;
    }
    let Some(only) = claim
        .device_ids
        .iter()
        .map(|d| DeviceId::from_slice(d))
        .collect::<Option<Vec<_>>>()
    else {
        return reply(
            outbox,
            error(
                ErrorCode::InvalidRequest,
                "device ids are 16 bytes",
                request_id,
            ),
        )
        .await;
    };
    let account = match state.store.account(pseudonym).await {
        Ok(account) => account,
        Err(e) => {
            tracing::warn!(error = %e, "storage failed during a key claim");
            return reply(outbox, storage_unavailable("try again", request_id)).await;
        }
    };
    // A claim that lists devices the asker did not name tells whether the number is a user:
    // charged to the discovery budget first, before anything is told.
    let own = account
        .as_ref()
        .is_some_and(|a| a.account == identity.account);
    let devices: Option<Vec<DeviceId>> = account
        .as_ref()
        .map(|a| a.devices.iter().map(|(device, _)| *device).collect());
    let asked = Disclosure::KeysClaim {
        own,
        account: devices.as_deref(),
        named: &only,
    };
    if let Err(wait) = discovery::charge(state, identity, asked).await {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    // Every claim of another number's keys costs at least one from the claim budget, including a
    // claim for a number that is not a user, so that one account cannot drain a user's keys.
    if !own {
        let cost = match &account {
            Some(account) if only.is_empty() => account.devices.len(),
            _ => only.len(),
        }
        .max(1);
        if let Err(wait) = crate::budget::take(
            state,
            Budget::KeyClaims,
            identity.budgets,
            u32::try_from(cost).unwrap_or(u32::MAX),
            now_ms(),
        )
        .await
        {
            let answer = rate_limited("too many key claims", wait, request_id);
            return reply(outbox, answer).await;
        }
    }
    // A number that is not a user has no devices: the same empty answer a device list gives.
    let Some(account) = account else {
        return reply(
            outbox,
            Kind::KeysClaimResult(frame::KeysClaimResult {
                request_id,
                devices: Vec::new(),
            }),
        )
        .await;
    };
    let claimed = match state
        .store
        .claim_keys(identity.actor(), account.account, only)
        .await
    {
        Ok(claimed) => claimed,
        Err(e) => {
            let answer = store_failed(&e, "during a key claim", "try again", request_id);
            return reply(outbox, answer).await;
        }
    };
    if !claimed.unknown.is_empty() {
        return reply(
            outbox,
            error(
                ErrorCode::InvalidRequest,
                "no such device for that number: fetch its device list again",
                request_id,
            ),
        )
        .await;
    }
    let devices = claimed
        .keys
        .into_iter()
        .map(|key| frame::ClaimedKey {
            device_id: key.device.as_bytes().to_vec(),
            identity_key: key.identity.identity_key.to_vec(),
            signing_key: key.identity.signing_key.to_vec(),
            key: Some(frame::SignedKey {
                public_key: key.key.public_key.to_vec(),
                signature: key.key.signature.to_vec(),
            }),
            fallback: key.fallback,
            voucher: key
                .voucher
                .map(|v| v.by.as_bytes().to_vec())
                .unwrap_or_default(),
            voucher_signature: key
                .voucher
                .map(|v| v.signature.to_vec())
                .unwrap_or_default(),
        })
        .collect();
    reply(
        outbox,
        Kind::KeysClaimResult(frame::KeysClaimResult {
            request_id,
            devices,
        }),
    )
    .await;
}

/// The SHA-256 of a link code: the form in which the server holds it.
pub fn link_code_hash(code: &str) -> [u8; 32] {
    let normalised: String = code.chars().filter(char::is_ascii_digit).collect();
    Sha256::digest(normalised.as_bytes()).into()
}

/// The refusal of a link beyond the account's daily limit; when to try again goes beside it
/// (`retry_after` over HTTP, `retry_after_ms` in a session), and the client words it.
pub fn too_many_links(links_per_day: usize) -> String {
    format!("at most {links_per_day} devices may be linked to a number a day")
}

/// Handles `LinkCodeRequest`: a fresh 12-digit code, valid 10 minutes, that lets one new device
/// join this device's number. A new request replaces this device's earlier code. Refused once the
/// account has linked its devices for the day (the link itself counts, [`State::check_link`]).
///
/// [`State::check_link`]: crate::state::State::check_link
pub async fn link_code<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::LinkCodeRequest,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    match state.store.devices_of(identity.account).await {
        Ok(devices) if devices.len() >= MAX_DEVICES => {
            let message = format!(
                "this number already has {MAX_DEVICES} devices: remove one with `tidings devices --remove <id>` first"
            );
            return reply(
                outbox,
                error(ErrorCode::InvalidRequest, &message, request_id),
            )
            .await;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "storage failed during a link request");
            return reply(outbox, storage_unavailable("try again", request_id)).await;
        }
    }
    let links = Budget::Links { record: false };
    if let Err(wait) = crate::budget::take(state, links, identity.budgets, 1, now_ms()).await {
        let message = too_many_links(state.config.links_per_day);
        return reply(outbox, rate_limited(message, wait, request_id)).await;
    }
    let digits: String = {
        let mut rng = rand::rngs::OsRng;
        (0..12)
            .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
            .collect()
    };
    let code = format!("{}-{}-{}", &digits[0..4], &digits[4..8], &digits[8..12]);
    let now = now_ms();
    let stored = match state.link_offers.lock() {
        Ok(mut offers) => {
            offers.retain(|_, offer| offer.approver != identity.device && offer.expires_at > now);
            let room = offers.len() < LIMITER_CAPACITY;
            if room {
                offers.insert(
                    link_code_hash(&code),
                    LinkOffer {
                        account: identity.account,
                        approver: identity.device,
                        expires_at: now + LINK_CODE_LIFETIME,
                    },
                );
            }
            room
        }
        Err(_) => false,
    };
    if !stored {
        return reply(
            outbox,
            error(
                ErrorCode::Unavailable,
                "too many link codes pending: try again later",
                request_id,
            ),
        )
        .await;
    }
    reply(
        outbox,
        Kind::LinkCode(frame::LinkCode {
            request_id,
            code,
            expires_in: u32::try_from(LINK_CODE_LIFETIME / 1000).unwrap_or(600),
        }),
    )
    .await;
}

/// Handles `RemoveDevice`: the device, its keys, its queue and its receipts go at once, and its
/// sessions are signed out.
pub async fn remove<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::RemoveDevice,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    let Some(device) = DeviceId::from_slice(&request.device_id) else {
        return reply(
            outbox,
            error(
                ErrorCode::InvalidRequest,
                "device ids are 16 bytes",
                request_id,
            ),
        )
        .await;
    };
    match state.store.remove_device(identity.actor(), device).await {
        Ok(true) => {
            reply(
                outbox,
                Kind::RemoveDeviceResult(frame::RemoveDeviceResult { request_id }),
            )
            .await;
            state
                .hub
                .sign_out(&[device], "this device was removed from its number");
            tracing::info!("a device was removed");
        }
        Ok(false) => {
            reply(
                outbox,
                error(
                    ErrorCode::InvalidRequest,
                    "no such device on your number: list them with `tidings devices`",
                    request_id,
                ),
            )
            .await;
        }
        Err(e) => {
            let answer = store_failed(&e, "while removing a device", "remove again", request_id);
            reply(outbox, answer).await;
        }
    }
}

/// Handles `Vouch`: the logged-in device signs for another device of its number (one it approved
/// linking). The signature is checked with the voucher's own signing key; the first voucher of a
/// device is kept.
pub async fn vouch<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    vouch: frame::Vouch,
    outbox: &Outbox,
) {
    let request_id = vouch.request_id;
    let invalid = |message: &'static str| {
        reply(
            outbox,
            error(ErrorCode::InvalidRequest, message, request_id),
        )
    };
    let (Some(device), Ok(signature)) = (
        DeviceId::from_slice(&vouch.device_id),
        <[u8; 64]>::try_from(vouch.signature.as_slice()),
    ) else {
        return invalid("a vouch needs a 16-byte device id and a 64-byte signature").await;
    };
    let listed = match state.store.device_keys(identity.account).await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "storage failed during a vouch");
            return reply(outbox, storage_unavailable("try again", request_id)).await;
        }
    };
    let keys_of = |id: DeviceId| listed.iter().find(|d| d.id == id).and_then(|d| d.identity);
    let (Some(voucher), Some(target)) = (keys_of(identity.device), keys_of(device)) else {
        return invalid("both devices must be of your number and have published keys").await;
    };
    let Ok(verifier) = VerifyingKey::from_bytes(&voucher.signing_key) else {
        return;
    };
    let transcript = tidings_proto::transcript::vouch(
        device.as_bytes(),
        &target.identity_key,
        &target.signing_key,
    );
    if verifier
        .verify_strict(&transcript, &Signature::from_bytes(&signature))
        .is_err()
    {
        return invalid("the vouch signature does not verify").await;
    }
    let voucher = Voucher {
        by: identity.device,
        signature,
    };
    match state
        .store
        .set_voucher(identity.account, device, voucher)
        .await
    {
        Ok(_) => {
            reply(outbox, Kind::VouchResult(frame::VouchResult { request_id })).await;
        }
        Err(e) => {
            let answer = store_failed(&e, "during a vouch", "try again", request_id);
            reply(outbox, answer).await;
        }
    }
}

/// Handles `Disable`: everything of the account goes at once, and its sessions are signed out.
pub async fn disable<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::Disable,
    outbox: &Outbox,
) {
    match state.store.delete_account(identity.actor()).await {
        Ok(devices) => {
            reply(
                outbox,
                Kind::DisableResult(frame::DisableResult {
                    request_id: request.request_id,
                }),
            )
            .await;
            state.hub.sign_out(&devices, "the account was disabled");
            tracing::info!("an account was disabled and deleted");
        }
        Err(e) => {
            let answer = store_failed(
                &e,
                "while deleting an account",
                "disable again",
                request.request_id,
            );
            reply(outbox, answer).await;
        }
    }
}
