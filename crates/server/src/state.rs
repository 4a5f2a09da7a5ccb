//! What every handler shares: configuration, store, keys, live sessions, limits and metrics.
//!
//! The limiters and link codes live in memory only and are bounded ([`LIMITER_CAPACITY`]): a
//! restart forgets them, and nothing here is ever written to storage or logged.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tidings_core::limits::{TokenBucket, Window};
use tidings_core::routing::Retention;
use tidings_core::verification::CodePolicy;
use tidings_core::{Millis, MINUTE};
use tidings_proto::id::DeviceId;
use tidings_store::{AccountId, Store};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ServerConfig;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::keys::ServerKeys;
use crate::metrics::Metrics;

/// The period of the per-address registration limits.
pub const ADDRESS_WINDOW: Millis = 5 * MINUTE;
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
    pub code_requests: Mutex<HashMap<IpAddr, Vec<Millis>>>,
    pub verify_requests: Mutex<HashMap<IpAddr, Vec<Millis>>>,
    pub lookup_budgets: Mutex<HashMap<DeviceId, TokenBucket>>,
    pub send_budgets: Mutex<HashMap<DeviceId, TokenBucket>>,
    pub claim_budgets: Mutex<HashMap<DeviceId, TokenBucket>>,
    /// Live link codes, by SHA-256 of the code. Kept in memory only: a restart forgets them.
    pub link_offers: Mutex<HashMap<[u8; 32], LinkOffer>>,
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

/// How long a link code stays valid.
pub const LINK_CODE_LIFETIME: Millis = 10 * MINUTE;

/// Records an event for `address` in a sliding-window limiter; `Err` carries the wait.
pub fn check_window(
    limiter: &Mutex<HashMap<IpAddr, Vec<Millis>>>,
    window: Window,
    address: IpAddr,
    now: Millis,
) -> Result<(), Millis> {
    let Ok(mut map) = limiter.lock() else {
        return Err(MINUTE);
    };
    if map.len() >= LIMITER_CAPACITY && !map.contains_key(&address) {
        map.retain(|_, times| times.iter().any(|t| t + window.period > now));
        if map.len() >= LIMITER_CAPACITY {
            return Err(window.period);
        }
    }
    let times = map.entry(address).or_default();
    window.prune(times, now);
    window.check(times, now)?;
    times.push(now);
    Ok(())
}

/// Takes `n` from a device's token bucket, creating a full one on first use.
pub fn take_budget(
    budgets: &Mutex<HashMap<DeviceId, TokenBucket>>,
    device: DeviceId,
    n: u32,
    capacity: u32,
    per_second: f64,
    now: Millis,
) -> Result<(), Millis> {
    let Ok(mut map) = budgets.lock() else {
        return Err(MINUTE);
    };
    if map.len() >= LIMITER_CAPACITY && !map.contains_key(&device) {
        map.retain(|_, bucket| !bucket.is_full(now));
    }
    map.entry(device)
        .or_insert_with(|| TokenBucket::new(capacity, per_second, now))
        .try_take(n, now)
}

impl<S: Store> State<S> {
    /// The state of a server that has not started yet: no session, no limiter entry.
    pub fn new(config: ServerConfig, store: S, keys: ServerKeys, metrics: Arc<Metrics>) -> Self {
        let gateway = Gateway::new(config.gateway.clone(), config.sms_from.clone());
        Self {
            code_policy: config.code_policy,
            config,
            store,
            keys,
            hub: Arc::default(),
            metrics,
            gateway,
            retention: Retention::default(),
            code_requests: Mutex::default(),
            verify_requests: Mutex::default(),
            lookup_budgets: Mutex::default(),
            claim_budgets: Mutex::default(),
            link_offers: Mutex::default(),
            send_budgets: Mutex::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            openapi_json: std::sync::OnceLock::new(),
        }
    }

    /// The limit on code requests per client address.
    pub fn codes_per_address(&self) -> Window {
        Window {
            max: self.config.codes_per_address,
            period: ADDRESS_WINDOW,
        }
    }

    /// The limit on verification attempts per client address.
    pub fn verifies_per_address(&self) -> Window {
        Window {
            max: self.config.verifies_per_address,
            period: ADDRESS_WINDOW,
        }
    }

    /// Forgets limiter entries that no longer restrict anyone, so memory follows activity.
    pub fn prune_limiters(&self, now: Millis) {
        for limiter in [&self.code_requests, &self.verify_requests] {
            if let Ok(mut map) = limiter.lock() {
                map.retain(|_, times| times.iter().any(|t| t + ADDRESS_WINDOW > now));
            }
        }
        if let Ok(mut offers) = self.link_offers.lock() {
            offers.retain(|_, offer| offer.expires_at > now);
        }
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
