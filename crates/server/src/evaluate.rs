//! `Evaluate`: the server's half of client-side blinding (RFC 9497 VOPRF, ristretto255-SHA512).
//! The client blinds each number, the server multiplies the blinded elements by its OPRF key and
//! proves it used that key (one batch DLEQ proof), and the client unblinds the answer into the
//! number's pseudonym, the account key the server stores. The server never sees the number
//! (promise P3).
//!
//! An evaluation answers nothing about registration by itself, but its result is what a lookup
//! or a send needs, so every element is charged to the asking account's discovery budget
//! ([`crate::discovery`]) before it is evaluated (promise P8). One exception keeps a receiver's budget out of spoofers' reach:
//! checking the number a delivery claims, with `sender_device` naming a device that has a copy
//! waiting for the asking device, one element, is free once an hour per (asking device, sender
//! device), like the device list check that follows it ([`crate::lookup::devices`]).
//!
//! Nothing about an evaluation is written or logged.

use tidings_proto::frame::{self, ErrorCode, Kind};
use tidings_proto::id::DeviceId;
use tidings_proto::{MAX_LOOKUP_NUMBERS, PSEUDONYM_BYTES};
use tidings_store::Store;

use crate::clock::now_ms;
use crate::discovery::{self, Disclosure, BUDGET_USED_UP};
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::keys::EvaluateError;
use crate::reply::{error, rate_limited, reply, storage_unavailable};
use crate::state::{SenderCheck, Shared};

/// Handles `Evaluate`: the evaluated elements in order, with one proof for the batch.
pub async fn evaluate<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::Evaluate,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    let invalid = |message: String| error(ErrorCode::InvalidRequest, message, request_id);
    if request.blinded.is_empty() || request.blinded.len() > MAX_LOOKUP_NUMBERS {
        let message = format!("an evaluation carries 1 to {MAX_LOOKUP_NUMBERS} blinded elements");
        return reply(outbox, invalid(message)).await;
    }
    // The current key, or the previous one while it is held (a contact not yet moved to the
    // current key is found under it); 0 asks for the current one.
    let key_version = match request.key_version {
        0 => state.keys.current_version(),
        asked if Some(asked) == state.keys.previous_version() => asked,
        asked if asked == state.keys.current_version() => asked,
        asked => {
            let message = format!(
                "the server's discovery key is version {}, not {asked}: pin it again",
                state.keys.current_version()
            );
            return reply(outbox, invalid(message)).await;
        }
    };
    // A wrong length is refused before any budget is charged; a value that is not a point is
    // found while evaluating, after.
    if let Some(place) = request
        .blinded
        .iter()
        .position(|b| b.len() != PSEUDONYM_BYTES)
    {
        return reply(
            outbox,
            invalid(EvaluateError::WrongLength(place).to_string()),
        )
        .await;
    }
    let free_sender_check = match DeviceId::from_slice(&request.sender_device) {
        Some(sender) if request.blinded.len() == 1 => {
            match state.store.holds_copy_from(identity.device, sender).await {
                Ok(holds) => {
                    holds
                        && state.take_free_sender_check(
                            identity.device,
                            sender,
                            SenderCheck::Evaluation,
                            now_ms(),
                        )
                }
                Err(_) => return reply(outbox, storage_unavailable("try again", request_id)).await,
            }
        }
        _ => false,
    };
    let asked = Disclosure::Evaluation {
        elements: request.blinded.len(),
        free_sender_check,
    };
    if let Err(wait) = discovery::charge(state, identity, asked).await {
        return reply(outbox, rate_limited(BUDGET_USED_UP, wait, request_id)).await;
    }
    state
        .metrics
        .evaluations
        .inc_by(request.blinded.len() as u64);
    // Up to 1,000 scalar multiplications and a batch proof: tens of milliseconds that must not
    // hold up the sessions sharing a runtime thread.
    let computing = state.clone();
    let blinded = request.blinded;
    let evaluated =
        tokio::task::spawn_blocking(move || computing.keys.evaluate_blinded(key_version, &blinded))
            .await;
    let evaluated = match evaluated {
        Ok(Some(Ok(evaluated))) => evaluated,
        Ok(Some(Err(e @ (EvaluateError::WrongLength(_) | EvaluateError::NotAnElement(_))))) => {
            return reply(outbox, invalid(e.to_string())).await;
        }
        // The key is held for the server's lifetime: `None` cannot come; answered as a failure.
        Ok(Some(Err(EvaluateError::Failed)) | None) | Err(_) => {
            let answer = error(
                ErrorCode::Unavailable,
                "the evaluation failed: try again",
                request_id,
            );
            return reply(outbox, answer).await;
        }
    };
    reply(
        outbox,
        Kind::EvaluateResult(frame::EvaluateResult {
            request_id,
            evaluated: evaluated.elements,
            proof: evaluated.proof,
            key_version,
        }),
    )
    .await;
}
