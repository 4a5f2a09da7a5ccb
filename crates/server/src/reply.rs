//! How a session answers: the one way an answer leaves a request handler ([`reply`]), and the
//! one shape of an error frame ([`error`], [`fatal`]).
//!
//! An error's message is for the person at the client: it says what to do next and never
//! repeats a number, a key, a code or a payload from the request it answers.

use tidings_core::Millis;
use tidings_proto::frame::{self, ErrorCode, Frame, Kind};
use tidings_store::StoreError;

use crate::hub::{Outbound, Outbox};

/// Queues an answer for the session, waiting for room. A session that is gone drops it: the
/// request's effect stands, and its client learns of it on its next login.
pub async fn reply(outbox: &Outbox, answer: impl Into<Frame>) {
    let _ = outbox.send(Outbound::Frame(answer.into())).await;
}

/// An error answer to the request `request_id` (0: to none in particular); the session goes on.
pub fn error(code: ErrorCode, message: impl Into<String>, request_id: u64) -> Frame {
    error_frame(code, message.into(), false, request_id, 0)
}

/// The answer to a request refused for a budget or a rate: `RATE_LIMITED`, with the wait until
/// it would be served ([`retry_after_ms`]), so that the client says when to try again.
pub fn rate_limited(message: impl Into<String>, wait: Millis, request_id: u64) -> Frame {
    error_frame(
        ErrorCode::RateLimited,
        message.into(),
        false,
        request_id,
        retry_after_ms(wait),
    )
}

/// A budget's wait as the wire says it: at least 1 ms, and 0 (no wait given) when no wait would
/// let the request through ([`Millis::MAX`] from the budget: a request larger than the whole
/// budget, or a budget that never refills).
pub fn retry_after_ms(wait: Millis) -> u64 {
    if wait == Millis::MAX {
        0
    } else {
        wait.max(1)
    }
}

/// The answer to a request that storage could not serve; `retry` says what to do next, such as
/// "try again" or "upload again".
pub fn storage_unavailable(retry: &str, request_id: u64) -> Frame {
    error(
        ErrorCode::Unavailable,
        format!("storage unavailable: {retry}"),
        request_id,
    )
}

/// The answer to a request that storage did not carry out: refused because the requesting device
/// was removed, or its account disabled, while the request ran ([`StoreError::Revoked`], checked
/// in the operation's own transaction), or failed (logged, with `what` was being done).
pub fn store_failed(error_: &StoreError, what: &str, retry: &str, request_id: u64) -> Frame {
    if matches!(error_, StoreError::Revoked) {
        return error(
            ErrorCode::AuthFailed,
            "this device is no longer registered: register again",
            request_id,
        );
    }
    tracing::warn!(error = %error_, "storage failed {what}");
    storage_unavailable(retry, request_id)
}

/// An error after which the session ends.
pub fn fatal(code: ErrorCode, message: impl Into<String>) -> Frame {
    error_frame(code, message.into(), true, 0, 0)
}

fn error_frame(
    code: ErrorCode,
    message: String,
    fatal: bool,
    request_id: u64,
    retry_after_ms: Millis,
) -> Frame {
    Kind::Error(frame::Error {
        code: code as i32,
        message,
        fatal,
        request_id,
        retry_after_ms,
    })
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_is_at_least_a_millisecond_and_none_when_no_wait_would_do() {
        for (wait, expected) in [(0, 1), (1, 1), (3_600_000, 3_600_000), (Millis::MAX, 0)] {
            assert_eq!(retry_after_ms(wait), expected, "{wait}");
        }
    }
}
