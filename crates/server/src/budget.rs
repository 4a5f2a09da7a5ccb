//! An account's budgets and rate limits, whichever node its devices reach.
//!
//! Each account's budgets (lookups and discovery, key claims, sends, links) are kept in memory
//! by one node, its *owner*: the node that ranks first for the account's budget key among the
//! nodes this one hears from (rendezvous hashing, [`crate::bus::Bus::owner`]). A node charges a
//! budget it does not own by asking its owner over the bus, so a client that spreads its
//! requests over every node still draws from one budget, and no charge is ever written (P4).
//! On a single node, or while the bus is down or the owner does not answer in time, the node
//! charges its own copy: a node cut off from the others cannot let more through than one node
//! would. When an owner dies its accounts' budgets start afresh on the next owner, as they do
//! when a single node restarts.
//!
//! Sends are charged once per message, so an account that sends fast through a node that does not
//! own its budget would cost a round trip over the bus per message. Such a node asks the owner
//! for a few sends more than it needs ([`Leases`]) once the account has sent through it within the
//! last second, and lets the next sends through from them; the owner has taken them from the one
//! budget, so nothing is multiplied, and a lease unused after a second is dropped (the account
//! then had fewer sends, never more).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tidings_core::{Millis, HOUR};
use tidings_store::Store;

use crate::keys::BudgetKey;
use crate::state::{take_budget, take_budget_and_more, Shared};

/// How long sends taken ahead for an account stay this node's to let through.
pub const LEASE_MS: Millis = 1000;

/// Accounts with sends taken ahead, at most (beyond it, sends are asked one by one).
const LEASES_MAX: usize = 100_000;

/// Sends taken ahead from accounts' owner nodes, by account: in memory only.
#[derive(Default)]
pub struct Leases(Mutex<HashMap<BudgetKey, Lease>>);

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map_or(0, |leases| leases.len());
        f.debug_struct("Leases").field("accounts", &held).finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Sends left to let through.
    left: u32,
    /// When the owner was last asked.
    asked: Millis,
    /// When a question for more went out, while it is under way: the sends meanwhile ask for
    /// themselves only, so that a burst of sends takes one lease, not one each. One unanswered
    /// (it may still be taken at the owner) blocks another for [`LEASE_MS`].
    asking: Option<Millis>,
}

impl Leases {
    /// Lets `units` through from a lease taken within [`LEASE_MS`]; otherwise says how many to
    /// ask for beyond them: a few when the account asked within the last [`LEASE_MS`] (it is
    /// sending fast) and no question for more is under way, else none.
    fn take(&self, key: BudgetKey, units: u32, chunk: u32, now: Millis) -> Result<(), u32> {
        let mut leases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match leases.get_mut(&key) {
            Some(lease) if now.saturating_sub(lease.asked) < LEASE_MS => {
                if lease.left >= units {
                    lease.left -= units;
                    Ok(())
                } else if lease
                    .asking
                    .is_some_and(|at| now.saturating_sub(at) < LEASE_MS)
                {
                    Err(0)
                } else {
                    lease.asking = Some(now);
                    Err(chunk)
                }
            }
            _ => Err(0),
        }
    }

    /// Keeps what the owner granted beyond what was asked for (`more`: the question asked for
    /// more, and was answered).
    fn keep(&self, key: BudgetKey, granted: u32, more: bool, now: Millis) {
        let mut leases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lease) = leases.get_mut(&key) {
            if now.saturating_sub(lease.asked) < LEASE_MS {
                lease.left = lease.left.saturating_add(granted);
                lease.asked = now;
            } else {
                *lease = Lease {
                    left: granted,
                    asked: now,
                    asking: lease.asking,
                };
            }
            if more {
                lease.asking = None;
            }
            return;
        }
        if leases.len() >= LEASES_MAX {
            leases.retain(|_, lease| now.saturating_sub(lease.asked) < LEASE_MS);
            if leases.len() >= LEASES_MAX {
                return;
            }
        }
        leases.insert(
            key,
            Lease {
                left: granted,
                asked: now,
                asking: None,
            },
        );
    }

    /// Forgets leases past their time.
    pub fn prune(&self, now: Millis) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, lease| now.saturating_sub(lease.asked) < LEASE_MS);
    }
}

/// Which budget a charge draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Lookups and everything else that tells about another account ([`crate::discovery`]).
    Discovery,
    /// Claims of other devices' one-time keys.
    KeyClaims,
    /// Messages sent.
    Sends,
    /// Devices linked in a day: `record` counts one (a link that happens); otherwise this only
    /// asks whether one would be allowed (a link code).
    Links { record: bool },
}

impl Budget {
    /// The byte a budget question carries.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Discovery => 1,
            Self::KeyClaims => 2,
            Self::Sends => 3,
            Self::Links { record: false } => 4,
            Self::Links { record: true } => 5,
        }
    }

    pub fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Discovery,
            2 => Self::KeyClaims,
            3 => Self::Sends,
            4 => Self::Links { record: false },
            5 => Self::Links { record: true },
            _ => return None,
        })
    }
}

/// Takes `units` from an account's `budget` at its owner node; `Err` with the wait until it
/// would allow them.
pub async fn take<S: Store>(
    state: &Shared<S>,
    budget: Budget,
    key: BudgetKey,
    units: u32,
    now: Millis,
) -> Result<(), Millis> {
    if let Some(bus) = state.hub.bus() {
        if let Some(owner) = bus.owner(&key) {
            let more = match budget {
                Budget::Sends => {
                    let chunk = (state.config.send_per_second / 10)
                        .clamp(1, (state.config.send_burst / 4).max(1));
                    match state.send_leases.take(key, units, chunk, now) {
                        Ok(()) => return Ok(()),
                        Err(more) => more,
                    }
                }
                _ => 0,
            };
            let answer = bus.ask_budget(owner, budget, key, units, more, now).await;
            if budget == Budget::Sends {
                let granted = match answer {
                    Some(Ok(granted)) => granted,
                    _ => 0,
                };
                // A question for more that went unanswered may still have been taken at the
                // owner (it answers late): no other is asked until this lease's time is up, so
                // that a slow owner loses the account at most one lease a second.
                state
                    .send_leases
                    .keep(key, granted, more > 0 && answer.is_some(), now);
            }
            if let Some(answer) = answer {
                return answer.map(|_| ());
            }
        }
    }
    take_here(state, budget, key, units, 0, now).map(|_| ())
}

/// Takes `units` from this node's copy of an account's `budget`, and up to `more` beyond them
/// for another node to let through ([`Leases`]; token buckets only); how many more it took.
pub fn take_here<S: Store>(
    state: &Shared<S>,
    budget: Budget,
    key: BudgetKey,
    units: u32,
    more: u32,
    now: Millis,
) -> Result<u32, Millis> {
    let config = &state.config;
    let per_hour = |n: u32| f64::from(n) / (HOUR as f64 / 1000.0);
    let taken = match budget {
        Budget::Discovery => take_budget(
            &state.lookup_budgets,
            key,
            units,
            config.lookup_burst,
            per_hour(config.lookup_per_hour),
            now,
        ),
        Budget::KeyClaims => take_budget(
            &state.claim_budgets,
            key,
            units,
            config.key_claim_burst,
            per_hour(config.key_claims_per_hour),
            now,
        ),
        Budget::Sends => {
            return take_budget_and_more(
                &state.send_budgets,
                key,
                units,
                more,
                config.send_burst,
                f64::from(config.send_per_second),
                now,
            )
        }
        Budget::Links { record } => state.check_link(key, now, record),
    };
    taken.map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_lets_through_only_what_the_owner_granted_and_only_for_a_second() {
        let leases = Leases::default();
        let key = BudgetKey::from_bytes([7; 32]);
        // Never asked: ask for the send alone.
        assert_eq!(leases.take(key, 1, 10, 1_000), Err(0));
        leases.keep(key, 0, false, 1_000);
        // Asked within the second: sending fast, ask for a few more, once at a time.
        assert_eq!(leases.take(key, 1, 10, 1_100), Err(10));
        assert_eq!(
            leases.take(key, 1, 10, 1_100),
            Err(0),
            "one question for more"
        );
        leases.keep(key, 0, false, 1_100);
        leases.keep(key, 3, true, 1_100);
        for _ in 0..3 {
            assert_eq!(leases.take(key, 1, 10, 1_200), Ok(()));
        }
        assert_eq!(leases.take(key, 1, 10, 1_200), Err(10));
        // The owner refused: nothing granted, and the next send may ask again.
        leases.keep(key, 0, true, 1_300);
        assert_eq!(leases.take(key, 1, 10, 1_300), Err(10));
        // The owner did not answer (it may still take them): no more questions for more until
        // the lease's time is up.
        leases.keep(key, 0, false, 1_400);
        assert_eq!(leases.take(key, 1, 10, 1_450), Err(0));
        leases.keep(key, 0, false, 1_500);
        assert_eq!(
            leases.take(key, 1, 10, 1_300 + LEASE_MS),
            Err(10),
            "a second after the unanswered question"
        );
        // What is left after a second is not this node's any more.
        leases.keep(key, 5, true, 2_000);
        assert_eq!(leases.take(key, 1, 10, 2_000 + LEASE_MS), Err(0));
        leases.prune(2_000 + LEASE_MS);
        assert!(leases.0.lock().expect("not poisoned").is_empty());
    }
}
