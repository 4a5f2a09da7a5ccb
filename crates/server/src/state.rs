//! What every handler shares: configuration, store, keys, live sessions, limits and metrics.
//!
//! The limiters and link codes live in memory only and are bounded ([`LIMITER_CAPACITY`], and the
//! `limiter_capacity` setting for the registration limits in [`AbuseLimits`]): a restart forgets
//! them, and nothing here is ever written to storage or logged. The budgets of logged-in requests
//! (lookups, key claims, sends, links) are an account's, kept under its [`BudgetKey`]: a device is
//! free to make, so budgets per device would be no bound at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tidings_core::limits::{TokenBucket, Window, WindowTable};
use tidings_core::routing::Retention;
use tidings_core::verification::CodePolicy;
use tidings_core::{Millis, DAY, HOUR, MINUTE};
use tidings_proto::id::DeviceId;
use tidings_store::{AccountId, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::abuse::AbuseLimits;
use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::inbound::Declarations;
use crate::keys::{BudgetKey, ServerKeys};
use crate::metrics::Metrics;
use crate::resume::Resumption;

/// Most addresses or devices tracked by one in-memory limiter before it refuses new ones.
pub const LIMITER_CAPACITY: usize = 1_000_000;

/// Shared server state, over any storage engine: handlers reach stored data only through `S`.
#[derive(Debug)]
pub struct State<S: Store> {
    pub config: ServerConfig,
    pub store: S,
    pub keys: ServerKeys,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    pub gateway: Gateway,
    pub retention: Retention,
    pub code_policy: CodePolicy,
    /// Registration limits by address block and SMS budgets.
    pub abuse: AbuseLimits,
    pub lookup_budgets: Mutex<HashMap<BudgetKey, TokenBucket>>,
    pub send_budgets: Mutex<HashMap<BudgetKey, TokenBucket>>,
    /// Sends this node may let through without asking an account's owner node.
    pub send_leases: crate::budget::Leases,
    pub claim_budgets: Mutex<HashMap<BudgetKey, TokenBucket>>,
    /// When each account linked a device, over the last day ([`State::links_per_day`]).
    pub links: Mutex<WindowTable<BudgetKey>>,
    /// When each device last checked a sender it holds a copy from for free, by (asking device,
    /// sender device, which check) ([`State::take_free_sender_check`]). Device ids only: never a
    /// number.
    pub free_sender_checks: Mutex<WindowTable<(DeviceId, DeviceId, SenderCheck)>>,
    /// `Rekey` requests refused, by device ([`REKEY_REFUSALS`]).
    pub rekey_refusals: Mutex<WindowTable<DeviceId>>,
    /// Live link codes, by SHA-256 of the code. Kept in memory only: a restart forgets them.
    pub link_offers: Mutex<HashMap<[u8; 32], LinkOffer>>,
    /// Registrations by own SMS waiting for their SMS. In memory only.
    pub declarations: Declarations,
    /// The resumption tokens issued and not yet used. In memory only.
    pub resumption: Resumption,
    /// Copies pushed without a disk write, until each is settled. In memory only.
    pub held: crate::held::Held,
    pub shutdown: CancellationToken,
    pub tasks: TaskTracker,
    pub openapi_json: std::sync::OnceLock<String>,
}

/// A link code waiting for the device that will use it.
#[derive(Debug, Clone, Copy)]
pub struct LinkOffer {
    pub account: AccountId,
    /// The device that asked for the code; told when a device joins with it.
    pub approver: DeviceId,
    pub expires_at: Millis,
}

/// The free checks of a held copy's sender: one per (asking device, sender device) an hour.
pub const FREE_SENDER_CHECK: Window = Window {
    max: 1,
    period: HOUR,
};

/// The two free checks of a held copy's sender: evaluating the number the delivery claims (one
/// blinded element), then listing that account's devices. Each is free once an hour per pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenderCheck {
    Evaluation,
    Devices,
}

/// `Rekey` requests a device may have refused (a number not its own): an honest client sends
/// its own number once per rotation, so a few per day leave no oracle of whose number is whose.
pub const REKEY_REFUSALS: Window = Window {
    max: 3,
    period: DAY,
};

/// How long a link code stays valid.
pub const LINK_CODE_LIFETIME: Millis = 10 * MINUTE;

/// Takes `n` from an account's token bucket, creating a full one on first use.
pub fn take_budget(
    budgets: &Mutex<HashMap<BudgetKey, TokenBucket>>,
    account: BudgetKey,
    n: u32,
    capacity: u32,
    per_second: f64,
    now: Millis,
) -> Result<(), Millis> {
    take_budget_and_more(budgets, account, n, 0, capacity, per_second, now).map(|_| ())
}

/// [`take_budget`], then up to `more` tokens beyond `n` if the bucket has them (a lease for
/// another node, [`crate::budget`]); how many more it took.
pub fn take_budget_and_more(
    budgets: &Mutex<HashMap<BudgetKey, TokenBucket>>,
    account: BudgetKey,
    n: u32,
    more: u32,
    capacity: u32,
    per_second: f64,
    now: Millis,
) -> Result<u32, Millis> {
    let Ok(mut map) = budgets.lock() else {
        return Err(MINUTE);
    };
    if map.len() >= LIMITER_CAPACITY && !map.contains_key(&account) {
        map.retain(|_, bucket| !bucket.is_full(now));
    }
    let bucket = map
        .entry(account)
        .or_insert_with(|| TokenBucket::new(capacity, per_second, now));
    bucket.try_take(n, now)?;
    Ok(if more > 0 {
        bucket.take_up_to(more, now)
    } else {
        0
    })
}

impl<S: Store> State<S> {
    /// The state of a server that has not started yet: no session, no limiter entry.
    pub fn new(config: ServerConfig, store: S, keys: ServerKeys, metrics: Arc<Metrics>) -> Self {
        let gateway = Gateway::new(config.gateway.clone(), config.sms_from.clone());
        let abuse = AbuseLimits::new(config.limiter_capacity, keys.abuse_hash_key());
        let declarations = Declarations::new(config.code_policy.max_attempts);
        let config_resume_seconds = config.resume_token_seconds;
        let held = crate::held::Held::new(config.ack_window_ms, config.held_bytes);
        Self {
            code_policy: config.code_policy,
            config,
            store,
            keys,
            hub: Arc::default(),
            metrics,
            gateway,
            retention: Retention::default(),
            abuse,
            lookup_budgets: Mutex::default(),
            claim_budgets: Mutex::default(),
            links: Mutex::new(WindowTable::new(LIMITER_CAPACITY)),
            free_sender_checks: Mutex::new(WindowTable::new(LIMITER_CAPACITY)),
            rekey_refusals: Mutex::new(WindowTable::new(LIMITER_CAPACITY)),
            link_offers: Mutex::default(),
            declarations,
            resumption: Resumption::new(config_resume_seconds, crate::resume::WINDOW),
            held,
            send_budgets: Mutex::default(),
            send_leases: crate::budget::Leases::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            openapi_json: std::sync::OnceLock::new(),
        }
    }

    /// The limit on devices linked to one account.
    pub fn links_per_day(&self) -> Window {
        Window {
            max: self.config.links_per_day,
            period: DAY,
        }
    }

    /// Whether the account may link a device now; `Err` carries the wait. `record` counts the
    /// link when it is allowed (a link that happens), otherwise this only asks (a link code).
    pub fn check_link(&self, account: BudgetKey, now: Millis, record: bool) -> Result<(), Millis> {
        let window = self.links_per_day();
        let Ok(mut links) = self.links.lock() else {
            return Err(MINUTE);
        };
        links.check(&account, window, now)?;
        if record {
            links.record(account, window, now);
        }
        Ok(())
    }

    /// Whether `asking` may check `sender` (a device it holds a copy from) without paying the
    /// lookup budget, and if so counts the check: once per pair per [`FREE_SENDER_CHECK`]. A
    /// second check about the same sender could only be a sweep of numbers for its owner (an
    /// honest client remembers the answer), so it is charged like any lookup.
    pub fn take_free_sender_check(
        &self,
        asking: DeviceId,
        sender: DeviceId,
        check: SenderCheck,
        now: Millis,
    ) -> bool {
        let Ok(mut checks) = self.free_sender_checks.lock() else {
            return false;
        };
        let key = (asking, sender, check);
        if checks.check(&key, FREE_SENDER_CHECK, now).is_err() {
            return false;
        }
        checks.record(key, FREE_SENDER_CHECK, now);
        true
    }

    /// Forgets limiter entries that no longer restrict anyone, so memory follows activity.
    pub fn prune_limiters(&self, now: Millis) {
        self.abuse.prune(now);
        self.declarations.prune(now);
        if let Ok(mut offers) = self.link_offers.lock() {
            offers.retain(|_, offer| offer.expires_at > now);
        }
        if let Ok(mut links) = self.links.lock() {
            links.prune(DAY, now);
        }
        if let Ok(mut checks) = self.free_sender_checks.lock() {
            checks.prune(FREE_SENDER_CHECK.period, now);
        }
        if let Ok(mut refusals) = self.rekey_refusals.lock() {
            refusals.prune(REKEY_REFUSALS.period, now);
        }
        self.send_leases.prune(now);
        for budgets in [
            &self.lookup_budgets,
            &self.send_budgets,
            &self.claim_budgets,
        ] {
            if let Ok(mut map) = budgets.lock() {
                map.retain(|_, bucket| !bucket.is_full(now));
            }
        }
    }
}

/// Shared state as handlers hold it.
pub type Shared<S> = Arc<State<S>>;
