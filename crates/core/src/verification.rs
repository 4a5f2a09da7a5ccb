//! One-time verification codes: when one may be sent and how an attempt is judged.
//!
//! The caller hashes codes (a keyed hash the core never sees the key of) and hands the hashes in;
//! the comparison here is constant-time. A record lives per number pseudonym and holds the live
//! code, its attempt count and the times of recent sends, which bound how often a number can be
//! sent a code (SMS pumping).

use subtle::ConstantTimeEq;

use crate::limits::Window;
use crate::{Millis, HOUR, MINUTE};

/// The verification rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodePolicy {
    /// How long a code stays valid.
    pub code_ttl: Millis,
    /// Wrong attempts allowed per code.
    pub max_attempts: u32,
    /// Short-term limit on codes per number.
    pub per_number_short: Window,
    /// Long-term limit on codes per number.
    pub per_number_long: Window,
}

impl Default for CodePolicy {
    fn default() -> Self {
        Self {
            code_ttl: 10 * MINUTE,
            max_attempts: 5,
            per_number_short: Window {
                max: 1,
                period: 2 * MINUTE,
            },
            per_number_long: Window {
                max: 2,
                period: 8 * HOUR,
            },
        }
    }
}

/// A live code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveCode {
    /// Keyed hash of the code.
    pub hash: [u8; 32],
    /// When it stops being valid.
    pub expires_at: Millis,
    /// Wrong attempts so far.
    pub attempts: u32,
}

/// What is kept per number pseudonym while codes are in play.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeRecord {
    /// The live code, if any.
    pub live: Option<LiveCode>,
    /// When codes were sent to this number recently (pruned to the longest window).
    pub sent_at: Vec<Millis>,
}

impl CodeRecord {
    /// True when nothing in the record still matters, so it can be deleted.
    pub fn is_spent(&self, policy: &CodePolicy, now: Millis) -> bool {
        let live = self.live.as_ref().is_some_and(|code| code.expires_at > now);
        let recent = policy.per_number_long.check(&self.sent_at, now).is_err()
            || self
                .sent_at
                .iter()
                .any(|t| t + policy.per_number_long.period > now);
        !live && !recent
    }
}

/// Whether a new code may be sent now; `Err` carries the milliseconds to wait.
pub fn may_send(policy: &CodePolicy, record: &CodeRecord, now: Millis) -> Result<(), Millis> {
    let short = policy.per_number_short.check(&record.sent_at, now);
    let long = policy.per_number_long.check(&record.sent_at, now);
    match (short, long) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(a), Err(b)) => Err(a.max(b)),
        (Err(wait), _) | (_, Err(wait)) => Err(wait),
    }
}

/// Records that a new code with `hash` was sent now; it replaces any earlier code.
pub fn issue(policy: &CodePolicy, record: &mut CodeRecord, hash: [u8; 32], now: Millis) {
    policy.per_number_long.prune(&mut record.sent_at, now);
    record.sent_at.push(now);
    record.live = Some(LiveCode {
        hash,
        expires_at: now + policy.code_ttl,
        attempts: 0,
    });
}

/// How an attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// The code is right. It has been consumed.
    Accepted,
    /// The code is wrong; this many attempts are left.
    Wrong { attempts_left: u32 },
    /// There is no live code: never sent, expired or consumed.
    NoCode,
    /// The attempts for this code are used up; a new code must be requested.
    TooManyAttempts,
}

/// Judges an attempt and updates the record (the caller stores it back).
pub fn attempt(
    policy: &CodePolicy,
    record: &mut CodeRecord,
    presented: &[u8; 32],
    now: Millis,
) -> Attempt {
    let Some(code) = record.live.as_mut() else {
        return Attempt::NoCode;
    };
    if code.expires_at <= now {
        record.live = None;
        return Attempt::NoCode;
    }
    if code.attempts >= policy.max_attempts {
        return Attempt::TooManyAttempts;
    }
    if bool::from(code.hash.ct_eq(presented)) {
        record.live = None;
        return Attempt::Accepted;
    }
    code.attempts += 1;
    let attempts_left = policy.max_attempts - code.attempts;
    if attempts_left == 0 {
        return Attempt::TooManyAttempts;
    }
    Attempt::Wrong { attempts_left }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RIGHT: [u8; 32] = [1; 32];
    const WRONG: [u8; 32] = [2; 32];

    #[test]
    fn send_limits_per_number() {
        let policy = CodePolicy::default();
        let mut record = CodeRecord::default();
        let steps: &[(Millis, Result<(), Millis>)] = &[
            (0, Ok(())),
            (MINUTE, Err(MINUTE)),
            (2 * MINUTE, Ok(())),
            (3 * MINUTE, Err(8 * HOUR - 3 * MINUTE)),
            (8 * HOUR, Ok(())),
        ];
        for (now, expected) in steps {
            let got = may_send(&policy, &record, *now);
            assert_eq!(got, *expected, "at {now}");
            if got.is_ok() {
                issue(&policy, &mut record, RIGHT, *now);
            }
        }
        assert!(record.sent_at.len() <= 2);
    }

    #[test]
    fn attempts_expiry_and_single_use() {
        let policy = CodePolicy::default();
        let check = |record: &mut CodeRecord, code: &[u8; 32], now, expected| {
            assert_eq!(attempt(&policy, record, code, now), expected, "at {now}");
        };
        let mut record = CodeRecord::default();
        check(&mut record, &RIGHT, 0, Attempt::NoCode);
        issue(&policy, &mut record, RIGHT, 0);
        for left in (1..5).rev() {
            check(
                &mut record,
                &WRONG,
                1,
                Attempt::Wrong {
                    attempts_left: left,
                },
            );
        }
        check(&mut record, &WRONG, 1, Attempt::TooManyAttempts);
        check(&mut record, &RIGHT, 1, Attempt::TooManyAttempts);

        let mut record = CodeRecord::default();
        issue(&policy, &mut record, RIGHT, 0);
        check(&mut record, &WRONG, 1, Attempt::Wrong { attempts_left: 4 });
        check(&mut record, &RIGHT, 2, Attempt::Accepted);
        check(&mut record, &RIGHT, 3, Attempt::NoCode);

        let mut record = CodeRecord::default();
        issue(&policy, &mut record, RIGHT, 0);
        check(&mut record, &RIGHT, 10 * MINUTE, Attempt::NoCode);
        assert!(!record.is_spent(&policy, 10 * MINUTE));
        assert!(record.is_spent(&policy, 8 * HOUR + 1));
    }
}
