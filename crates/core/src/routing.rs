//! What a send is answered and whether anything is stored.
//!
//! The answer depends only on the receiver's state as the sender's lookup would see it (not a
//! user, offline, online to this sender: see `presence`) plus the sender's own limits, so a send
//! reveals no more than a lookup.

use tidings_proto::frame::{SendMode, SendOutcome};

use crate::{Millis, DAY, SECOND};

/// Bounds on how long messages are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// TTL of a `QUEUE` message that asks for none.
    pub default_ttl: Millis,
    /// Longest TTL a sender may ask for.
    pub max_ttl: Millis,
    /// How long a `NOW_OR_NEVER` message is held for devices online at the time of sending.
    pub now_or_never_ttl: Millis,
}

impl Default for Retention {
    fn default() -> Self {
        Self {
            default_ttl: 7 * DAY,
            max_ttl: 30 * DAY,
            now_or_never_ttl: 60 * SECOND,
        }
    }
}

/// The receiver, as far as routing may know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receiver {
    /// No account has this number.
    NotAUser,
    /// An account, and how many of its devices hold a live listening session that shows itself
    /// online to the sender (a device hidden from it counts as offline). Whether a queue is
    /// full is decided by the write that stores the message, in the same transaction.
    User { devices_online: usize },
}

/// What to do with a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Store nothing; answer this.
    Refuse(SendOutcome),
    /// Store a copy per receiver device until `expires_at`; answer `outcome` once the copy is
    /// synced or (for `Accepted`) once a receiver device acknowledged it, whichever comes first.
    Store {
        outcome: SendOutcome,
        expires_at: Millis,
    },
}

/// Decides a send. `ttl_seconds` is the sender's request (0 = default).
pub fn decide(
    retention: &Retention,
    mode: SendMode,
    ttl_seconds: u32,
    receiver: Receiver,
    now: Millis,
) -> Decision {
    let devices_online = match receiver {
        Receiver::NotAUser => return Decision::Refuse(SendOutcome::NotAUser),
        Receiver::User { devices_online } => devices_online,
    };
    let ttl = match mode {
        SendMode::NowOrNever if devices_online == 0 => {
            return Decision::Refuse(SendOutcome::RefusedNotReachable)
        }
        SendMode::NowOrNever => retention.now_or_never_ttl,
        SendMode::Queue if ttl_seconds == 0 => retention.default_ttl,
        SendMode::Queue => (Millis::from(ttl_seconds) * SECOND).min(retention.max_ttl),
    };
    let outcome = if devices_online > 0 {
        SendOutcome::Accepted
    } else {
        SendOutcome::Queued
    };
    Decision::Store {
        outcome,
        expires_at: now.saturating_add(ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SendMode::{NowOrNever, Queue};

    fn user(devices_online: usize) -> Receiver {
        Receiver::User { devices_online }
    }

    #[test]
    fn every_receiver_state_and_mode() {
        let r = Retention::default();
        let now = 1_000;
        let check = |mode, ttl, receiver, expected| {
            assert_eq!(
                decide(&r, mode, ttl, receiver, now),
                expected,
                "{mode:?} {ttl} {receiver:?}"
            );
        };
        check(
            Queue,
            0,
            Receiver::NotAUser,
            Decision::Refuse(SendOutcome::NotAUser),
        );
        check(
            NowOrNever,
            0,
            Receiver::NotAUser,
            Decision::Refuse(SendOutcome::NotAUser),
        );
        check(
            NowOrNever,
            0,
            user(0),
            Decision::Refuse(SendOutcome::RefusedNotReachable),
        );
        check(
            NowOrNever,
            0,
            user(2),
            Decision::Store {
                outcome: SendOutcome::Accepted,
                expires_at: now + 60 * SECOND,
            },
        );
        check(
            Queue,
            0,
            user(0),
            Decision::Store {
                outcome: SendOutcome::Queued,
                expires_at: now + 7 * DAY,
            },
        );
        check(
            Queue,
            5,
            user(1),
            Decision::Store {
                outcome: SendOutcome::Accepted,
                expires_at: now + 5 * SECOND,
            },
        );
        check(
            Queue,
            u32::MAX,
            user(0),
            Decision::Store {
                outcome: SendOutcome::Queued,
                expires_at: now + 30 * DAY,
            },
        );
    }
}
