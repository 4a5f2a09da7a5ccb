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

use tidings_core::{Millis, HOUR};
use tidings_store::Store;

use crate::keys::BudgetKey;
use crate::state::{take_budget, Shared};

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
            if let Some(answer) = bus.ask_budget(owner, budget, key, units, now).await {
                return answer;
            }
        }
    }
    take_here(state, budget, key, units, now)
}

/// Takes `units` from this node's copy of an account's `budget`.
pub fn take_here<S: Store>(
    state: &Shared<S>,
    budget: Budget,
    key: BudgetKey,
    units: u32,
    now: Millis,
) -> Result<(), Millis> {
    let config = &state.config;
    let per_hour = |n: u32| f64::from(n) / (HOUR as f64 / 1000.0);
    match budget {
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
        Budget::Sends => take_budget(
            &state.send_budgets,
            key,
            units,
            config.send_burst,
            f64::from(config.send_per_second),
            now,
        ),
        Budget::Links { record } => state.check_link(key, now, record),
    }
}
