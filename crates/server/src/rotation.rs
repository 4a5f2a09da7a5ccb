//! OPRF key rotation on the live server: what the start does about the key file's previous key,
//! moving an account to the current key (`Rekey` by its own device, or a registration or link by
//! its number), and the gauge of accounts still on the previous key.
//!
//! After `tidings server rotate-oprf-key` the server holds two keys. An account's pseudonym is
//! under the key it was made or last moved under (`accounts.key_version`); a move keeps the old
//! pseudonym as the account's previous one, and every lookup by pseudonym matches either, so a
//! contact's client that still names the account under the previous key reaches it. Once
//! `tidings_accounts_on_previous_oprf_key` is 0 (or low enough), the operator retires the
//! previous key; the next start forgets every previous pseudonym.
//!
//! `Rekey` carries the device's own number in clear, as registration does: it is checked, turned
//! into pseudonyms and dropped, never logged nor stored. A number that is not the account's is
//! refused, and a device has only [`REKEY_REFUSALS`] of those a day, so `Rekey` is no oracle of
//! whose number is whose.

use tidings_proto::frame::{self, ErrorCode, Kind};
use tidings_proto::number::E164;
use tidings_store::{AccountId, Pseudonym, Rekeyed, Store, StoreError};

use crate::clock::now_ms;
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::reply::{error, rate_limited, reply, storage_unavailable, store_failed};
use crate::state::{Shared, REKEY_REFUSALS};

/// Run once when the server starts, before it serves: without a previous key, forgets every
/// account's previous pseudonym (nothing evaluates under that key any more); counts the accounts
/// on each key version for the gauge, and warns of accounts on a key the server no longer holds
/// (their contacts cannot find them until they register again).
pub async fn at_start<S: Store>(state: &Shared<S>) {
    let keys = &state.keys;
    if keys.previous_version().is_none() {
        match state.store.forget_previous_pseudonyms().await {
            Ok(0) => {}
            Ok(forgotten) => tracing::info!(
                forgotten,
                "the previous OPRF key is retired: forgot the accounts' pseudonyms under it"
            ),
            Err(e) => tracing::warn!(error = %e, "could not forget the previous pseudonyms"),
        }
    }
    let counts = match state.store.accounts_by_key_version().await {
        Ok(counts) => counts,
        Err(e) => {
            tracing::warn!(error = %e, "could not count the accounts by OPRF key version");
            return;
        }
    };
    let on = |held: Option<u32>| {
        counts
            .iter()
            .filter(|(version, _)| Some(*version) == held)
            .map(|(_, n)| *n)
            .sum::<u64>()
    };
    let on_previous = on(keys.previous_version());
    set_on_previous(state, on_previous);
    let orphaned: u64 = counts
        .iter()
        .filter(|(version, _)| {
            *version != keys.current_version() && Some(*version) != keys.previous_version()
        })
        .map(|(_, n)| *n)
        .sum();
    if orphaned > 0 {
        tracing::warn!(
            accounts = orphaned,
            current_version = keys.current_version(),
            "accounts are on an OPRF key this server no longer holds (retired before they moved): nobody can find them until they register again"
        );
    }
    if let Some(previous) = keys.previous_version() {
        tracing::info!(
            accounts = on_previous,
            previous_version = previous,
            current_version = keys.current_version(),
            "accounts still on the previous OPRF key; retire it once none is left"
        );
    }
}

fn set_on_previous<S: Store>(state: &Shared<S>, accounts: u64) {
    state
        .metrics
        .accounts_on_previous_oprf_key
        .set(i64::try_from(accounts).unwrap_or(i64::MAX));
}

/// Moves `account` from `from` (its pseudonym under the previous key) to `to` (under the current
/// one); the gauge follows.
async fn move_account<S: Store>(
    state: &Shared<S>,
    account: AccountId,
    from: Pseudonym,
    to: Pseudonym,
) -> Result<Rekeyed, StoreError> {
    let version = state.keys.current_version();
    let moved = state
        .store
        .rekey_account(account, from, to, version)
        .await?;
    if moved == Rekeyed::Moved {
        state.metrics.accounts_on_previous_oprf_key.dec();
    }
    Ok(moved)
}

/// The number's pseudonym under the current key, for a registration or a link that proved the
/// number: its account, if it is still on the previous key, is moved to the current one first,
/// so that the registration finds it rather than making a second account.
pub async fn registrant_pseudonym<S: Store>(
    state: &Shared<S>,
    number: &E164,
) -> anyhow::Result<Pseudonym> {
    let current = state.keys.pseudonym(number)?;
    let Some(previous_version) = state.keys.previous_version() else {
        return Ok(current);
    };
    let Some(previous) = state.keys.pseudonym_under(previous_version, number) else {
        return Ok(current);
    };
    let previous = previous?;
    if let Some(account) = state.store.account(previous).await? {
        match move_account(state, account.account, previous, current).await {
            // Deleted meanwhile: the registration makes a new account.
            Ok(_) | Err(StoreError::NoSuchAccount) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(current)
}

/// Handles `Rekey`: checks that the number is the asking account's (its pseudonym under the
/// current or the previous key is the account's) and moves the account to the current key.
pub async fn rekey<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::Rekey,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    let now = now_ms();
    let refusals_left = match state.rekey_refusals.lock() {
        Ok(refusals) => refusals.check(&identity.device, REKEY_REFUSALS, now),
        Err(_) => Err(REKEY_REFUSALS.period),
    };
    if let Err(wait) = refusals_left {
        let message = "too many Rekey requests with a number that is not this account's";
        return reply(outbox, rate_limited(message, wait, request_id)).await;
    }
    let Ok(number) = E164::parse(&request.number) else {
        let message = "number is not a phone number in E.164 form (+ and country code)";
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, message, request_id),
        )
        .await;
    };
    let device = match state.store.device(identity.device).await {
        Ok(Some(device)) if device.account == identity.account => device,
        Ok(_) => {
            let answer = store_failed(
                &StoreError::Revoked,
                "while moving an account to the current OPRF key",
                "",
                request_id,
            );
            return reply(outbox, answer).await;
        }
        Err(_) => return reply(outbox, storage_unavailable("try again", request_id)).await,
    };
    let keys = &state.keys;
    let (Ok(current), previous) = (
        keys.pseudonym(&number),
        keys.previous_version()
            .and_then(|version| keys.pseudonym_under(version, &number))
            .and_then(Result::ok),
    ) else {
        let answer = error(ErrorCode::Unavailable, "try again", request_id);
        return reply(outbox, answer).await;
    };
    let from = if device.pseudonym == current {
        current
    } else if previous == Some(device.pseudonym) {
        device.pseudonym
    } else {
        if let Ok(mut refusals) = state.rekey_refusals.lock() {
            refusals.record(identity.device, REKEY_REFUSALS, now);
        }
        let message = "that number is not this account's: Rekey takes the device's own number (an account left on a retired key registers again)";
        return reply(
            outbox,
            error(ErrorCode::InvalidRequest, message, request_id),
        )
        .await;
    };
    match move_account(state, identity.account, from, current).await {
        Ok(Rekeyed::Moved | Rekeyed::AlreadyMoved) => {
            let answer = Kind::RekeyResult(frame::RekeyResult {
                request_id,
                account: current.0.to_vec(),
                key_version: keys.current_version(),
            });
            reply(outbox, answer).await;
        }
        // Another request moved it between the read and the write: ask again.
        Ok(Rekeyed::NotItsPseudonym) => {
            reply(outbox, storage_unavailable("try again", request_id)).await;
        }
        Err(e) => {
            let answer = store_failed(
                &e,
                "while moving an account to the current OPRF key",
                "try again",
                request_id,
            );
            reply(outbox, answer).await;
        }
    }
}
