//! Who is logged in on a session: the device that proved its key at login, its account, and the
//! budgets it draws from (its account's).
//!
//! Made only by the session's login, after the signature over the server's challenge verified,
//! or by `GET /v1/connect` after a resumption token held and the store still had its device
//! (`crate::resume`); every request handler acts for exactly this device and never for one named in a frame.

use tidings_proto::id::DeviceId;
use tidings_store::{AccountId, Actor};

use crate::keys::BudgetKey;

/// Who is logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub device: DeviceId,
    pub account: AccountId,
    /// The account's budgets (lookups, key claims, sends, links).
    pub budgets: BudgetKey,
}

impl Identity {
    /// This device as the actor of a store operation, which checks that it still exists.
    pub fn actor(&self) -> Actor {
        Actor {
            account: self.account,
            device: self.device,
        }
    }
}
