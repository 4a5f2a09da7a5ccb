//! The two requests whose whole job is to tell whether a number is a user: a lookup (online,
//! offline, not a user) and the device list of a number. Both draw from the asking account's
//! discovery budget ([`crate::discovery`], shared by all its devices, and kept across an opt-out
//! and a new registration), so neither is a free way to enumerate numbers (the server's part of
//! promise P8 so far: the numbers are not yet blinded on the client).
//!
//! Reads only: nothing about a lookup is written or logged, neither the numbers asked about nor
//! who asked (promise P4).

use tidings_core::presence::Secret;
use tidings_proto::frame::{self, ErrorCode, Kind, Presence};
use tidings_proto::id::DeviceId;
use tidings_proto::number::E164;
use tidings_proto::{MAX_LOOKUP_NUMBERS, MAX_LOOKUP_PROOFS};
use tidings_store::Store;

use crate::clock::now_ms;
use crate::discovery::{self, Disclosure, BUDGET_USED_UP};
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::presence::parse_proofs;
use crate::reply::{error, rate_limited, reply, storage_unavailable};
use crate::state::Shared;

#[cfg(test)]
mod tests;

/// Handles `Lookup`: the presence of each number, in order.
pub async fn lookup<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    lookup: frame::Lookup,
    outbox: &Outbox,
) {
    let request_id = lookup.request_id;
    if lookup.numbers.len() > MAX_LOOKUP_NUMBERS {
        let message = format!("at most {MAX_LOOKUP_NUMBERS} numbers per lookup");
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, message, request_id),
        )
        .await;
    }
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
        numbers: lookup.numbers.len(),
    };
    if let Err(wait) = discovery::charge(state, identity, asked) {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    state.metrics.lookups.inc_by(lookup.numbers.len() as u64);
    let Ok(presences) = presences(state, identity, &lookup.numbers, &proofs).await else {
        return reply(outbox, storage_unavailable("try again", request_id)).await;
    };
    let entries = lookup
        .numbers
        .into_iter()
        .zip(presences)
        .map(|(number, presence)| frame::LookupEntry {
            number,
            presence: presence as i32,
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

/// The presence of each number, in order, as the asking device may see it: online only where a
/// device of the number shows itself to it (its mode, and the proofs presented); a user is
/// otherwise offline, whether or not one of its devices is online. The pseudonyms are computed on the blocking pool (up
/// to 1,000 parses and OPRF evaluations when none is cached: tens of milliseconds that must not
/// hold up the sessions sharing a runtime thread) and the accounts read in one store call.
async fn presences<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    numbers: &[String],
    proofs: &[(DeviceId, Secret)],
) -> Result<Vec<Presence>, ()> {
    let computing = state.clone();
    let numbers = numbers.to_vec();
    let pseudonyms: Vec<Option<_>> = tokio::task::spawn_blocking(move || {
        numbers
            .iter()
            .map(|number| computing.keys.pseudonym_of(number))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| ())?
    .map_err(|_| ())?;
    let wanted: Vec<_> = pseudonyms.iter().flatten().copied().collect();
    let now = now_ms();
    let mut accounts = state
        .store
        .accounts(wanted)
        .await
        .map_err(|_| ())?
        .into_iter();
    Ok(pseudonyms
        .iter()
        .map(
            |pseudonym| match pseudonym.and_then(|_| accounts.next().flatten()) {
                None => Presence::NotAUser,
                Some(account)
                    if state.hub.count_visible(
                        account.devices.iter().map(|(d, _)| d),
                        identity.device,
                        proofs,
                        now,
                    ) > 0 =>
                {
                    Presence::Online
                }
                Some(_) => Presence::Offline,
            },
        )
        .collect())
}

/// Handles `DevicesRequest`: the devices of a number, with the keys they published (none for a
/// number that is not a user or not valid). Charged to the lookup budget, except for the asking
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
    let pseudonym = match E164::parse(&request.number) {
        Ok(number) => match state.keys.pseudonym(&number) {
            Ok(pseudonym) => Some(pseudonym),
            Err(_) => return reply(outbox, storage_unavailable("try again", request_id)).await,
        },
        Err(_) => None,
    };
    // A device listing its own number's devices (to remove one, or to know them when it joins)
    // learns nothing about anyone else: that is free too, or a spent budget would lock a user
    // out of managing their own devices.
    let own = pseudonym.is_some_and(|p| state.keys.budget_key(&p) == identity.budgets);
    let free_sender_check = !own
        && sender_check
            .is_some_and(|sender| state.take_free_sender_check(identity.device, sender, now_ms()));
    let asked = Disclosure::DeviceList {
        own,
        free_sender_check,
    };
    if let Err(wait) = discovery::charge(state, identity, asked) {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    let mut device_ids = Vec::new();
    let mut devices = Vec::new();
    if let Some(pseudonym) = pseudonym {
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
