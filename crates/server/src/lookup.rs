//! The two requests whose whole job is to tell whether an account exists: a lookup (online,
//! offline, not a user) and the device list of an account. Both name accounts by pseudonym (the
//! client derived it from the number with `Evaluate`, see [`crate::evaluate`]; a request that
//! carries a number is refused, promise P3), and both draw from the asking account's discovery
//! budget ([`crate::discovery`], shared by all its devices, kept across an opt-out and a new
//! registration, and the same budget evaluations draw from), so neither is a free way to
//! enumerate (promise P8).
//!
//! Reads only: nothing about a lookup is written or logged, neither the accounts asked about nor
//! who asked (promise P4).

use tidings_core::presence::Secret;
use tidings_proto::frame::{self, ErrorCode, Frame, Kind, Presence};
use tidings_proto::id::DeviceId;
use tidings_proto::{MAX_LOOKUP_NUMBERS, MAX_LOOKUP_PROOFS, PSEUDONYM_BYTES};
use tidings_store::{Pseudonym, Store};

use crate::clock::now_ms;
use crate::discovery::{self, Disclosure, BUDGET_USED_UP};
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::presence::parse_proofs;
use crate::reply::{error, rate_limited, reply, storage_unavailable};
use crate::state::{SenderCheck, Shared};

#[cfg(test)]
mod tests;

/// Why a request that names a contact by number is refused: since tidings/2 the client blinds
/// numbers and names accounts by pseudonym, so the server never sees a contact's number.
pub const NUMBERS_ARE_BLINDED: &str =
    "numbers are blinded on the device since tidings/2: name accounts by pseudonym (see Evaluate)";

/// An account named in a request: exactly [`PSEUDONYM_BYTES`] bytes.
pub fn account_of(bytes: &[u8]) -> Option<Pseudonym> {
    <[u8; PSEUDONYM_BYTES]>::try_from(bytes).ok().map(Pseudonym)
}

/// The refusal of a request that names an account with anything but a 32-byte pseudonym.
pub fn not_an_account(request_id: u64) -> Frame {
    error(
        ErrorCode::InvalidRequest,
        format!("accounts are named by their {PSEUDONYM_BYTES}-byte pseudonym"),
        request_id,
    )
}

/// Handles `Lookup`: the presence of each account, in order.
pub async fn lookup<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    lookup: frame::Lookup,
    outbox: &Outbox,
) {
    let request_id = lookup.request_id;
    if !lookup.numbers.is_empty() {
        let answer = error(ErrorCode::InvalidRequest, NUMBERS_ARE_BLINDED, request_id);
        return reply(outbox, answer).await;
    }
    if lookup.accounts.len() > MAX_LOOKUP_NUMBERS {
        let message = format!("at most {MAX_LOOKUP_NUMBERS} accounts per lookup");
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, message, request_id),
        )
        .await;
    }
    let Some(pseudonyms) = lookup
        .accounts
        .iter()
        .map(|a| account_of(a))
        .collect::<Option<Vec<_>>>()
    else {
        return reply(outbox, not_an_account(request_id)).await;
    };
    let proofs = match parse_proofs(&lookup.proofs, MAX_LOOKUP_PROOFS) {
        Ok(proofs) => proofs,
        Err(message) => {
            return reply(
                outbox,
                error(ErrorCode::InvalidRequest, message, request_id),
            )
            .await
        }
    };
    let asked = Disclosure::Lookup {
        accounts: pseudonyms.len(),
    };
    if let Err(wait) = discovery::charge(state, identity, asked).await {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    state.metrics.lookups.inc_by(pseudonyms.len() as u64);
    let Ok(presences) = presences(state, identity, &pseudonyms, &proofs).await else {
        return reply(outbox, storage_unavailable("try again", request_id)).await;
    };
    let entries = lookup
        .accounts
        .into_iter()
        .zip(presences)
        .map(|(account, presence)| frame::LookupEntry {
            account,
            presence: presence as i32,
            ..frame::LookupEntry::default()
        })
        .collect();
    reply(
        outbox,
        Kind::LookupResult(frame::LookupResult {
            request_id,
            entries,
        }),
    )
    .await;
}

/// The presence of each account, in order, as the asking device may see it: online only where a
/// device of the account shows itself to it (its mode, and the proofs presented); a user is
/// otherwise offline, whether or not one of its devices is online. The accounts are read in one
/// store call.
async fn presences<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    pseudonyms: &[Pseudonym],
    proofs: &[(DeviceId, Secret)],
) -> Result<Vec<Presence>, ()> {
    let now = now_ms();
    let accounts = state
        .store
        .accounts(pseudonyms.to_vec())
        .await
        .map_err(|_| ())?;
    let mut presences = Vec::with_capacity(accounts.len());
    for account in &accounts {
        presences.push(match account {
            None => Presence::NotAUser,
            Some(account) => {
                let devices: Vec<DeviceId> = account.devices.iter().map(|(d, _)| *d).collect();
                let shown =
                    crate::bus::count_visible(&state.hub, &devices, identity.device, proofs, now)
                        .await;
                if shown > 0 {
                    Presence::Online
                } else {
                    Presence::Offline
                }
            }
        });
    }
    Ok(presences)
}

/// Handles `DevicesRequest`: the devices of an account, with the keys they published (none for
/// an account that does not exist). Charged to the lookup budget, except for the asking
/// device's own number, and the first check in an hour of a delivery's stamped sender
/// (`sender_device`, a device with a copy waiting for the asking one). A check of a stamped sender
/// lists the number's devices only if that device is one of them, whether it was free or charged.
pub async fn devices<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::DevicesRequest,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    if !request.number.is_empty() {
        let answer = error(ErrorCode::InvalidRequest, NUMBERS_ARE_BLINDED, request_id);
        return reply(outbox, answer).await;
    }
    let Some(pseudonym) = account_of(&request.account) else {
        return reply(outbox, not_an_account(request_id)).await;
    };
    // Checking the sender stamped on a delivery this device holds is free once an hour: a
    // spoofer must not be able to spend its receiver's budget, and a receiver must not be able
    // to sweep numbers for the owner of a device it holds one copy from. It tells only whether
    // that one device is the number's, never whether the number is a user (see below).
    let sender_check = match DeviceId::from_slice(&request.sender_device) {
        Some(sender) => match state.store.holds_copy_from(identity.device, sender).await {
            Ok(true) => Some(sender),
            Ok(false) => None,
            Err(_) => return reply(outbox, storage_unavailable("try again", request_id)).await,
        },
        None => None,
    };
    // A device listing its own number's devices (to remove one, or to know them when it joins)
    // learns nothing about anyone else: that is free too, or a spent budget would lock a user
    // out of managing their own devices.
    let own = state.keys.budget_key(&pseudonym) == identity.budgets;
    let free_sender_check = !own
        && sender_check.is_some_and(|sender| {
            state.take_free_sender_check(identity.device, sender, SenderCheck::Devices, now_ms())
        });
    let asked = Disclosure::DeviceList {
        own,
        free_sender_check,
    };
    if let Err(wait) = discovery::charge(state, identity, asked).await {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    let mut device_ids = Vec::new();
    let mut devices = Vec::new();
    let listed = match state.store.account(pseudonym).await {
        Ok(Some(account)) => state.store.device_keys(account.account).await.map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    let Ok(mut listed) = listed else {
        return reply(outbox, storage_unavailable("try again", request_id)).await;
    };
    // A free check whose sender is not one of the number's devices is answered as a number
    // that is not a user: it reveals nothing the budget would have paid for.
    if let Some(sender) = sender_check {
        if !listed.iter().flatten().any(|device| device.id == sender) {
            listed = None;
        }
    }
    for device in listed.into_iter().flatten() {
        device_ids.push(device.id.as_bytes().to_vec());
        if let Some(keys) = device.identity {
            devices.push(frame::DeviceKeys {
                device_id: device.id.as_bytes().to_vec(),
                identity_key: keys.identity_key.to_vec(),
                signing_key: keys.signing_key.to_vec(),
                voucher: device
                    .voucher
                    .map(|v| v.by.as_bytes().to_vec())
                    .unwrap_or_default(),
                voucher_signature: device
                    .voucher
                    .map(|v| v.signature.to_vec())
                    .unwrap_or_default(),
            });
        }
    }
    reply(
        outbox,
        Kind::DeviceList(frame::DeviceList {
            request_id,
            device_ids,
            devices,
        }),
    )
    .await;
}
