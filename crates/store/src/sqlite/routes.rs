//! The route cache: the device ids of accounts that sends went to, held in memory so that a
//! send reads no table.
//!
//! It must never answer with devices older than a device change that has been answered: the
//! writer drops it before it answers a batch that added or deleted devices.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::{Pseudonym, Route};

/// Routes held in memory at most; past this the cache starts again from empty.
pub const ROUTE_CACHE_ENTRIES: usize = 65_536;

/// The routes of accounts that sends went to, so that a send reads no table: device ids only,
/// which change only when a device is added or deleted. The writer drops every route once a
/// batch that changed devices has committed, before it answers the batch. A route read from the
/// database is kept only if no such batch committed since the read began: a read that began
/// before a change and ended after it could otherwise keep the old devices.
#[derive(Default)]
pub(super) struct RouteCache {
    inner: Mutex<Routes>,
}

#[derive(Default)]
pub(super) struct Routes {
    /// Counts the times the routes were dropped.
    generation: u64,
    routes: HashMap<Pseudonym, Route>,
}

impl RouteCache {
    /// The routes. Every change to them is one map operation, so a panic elsewhere while the
    /// lock was held leaves them whole: a poisoned lock is taken as it is.
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The route held for a pseudonym, and the generation to insert a route read now under.
    pub(super) fn get(&self, pseudonym: &Pseudonym) -> (u64, Option<Route>) {
        let inner = self.lock();
        (inner.generation, inner.routes.get(pseudonym).cloned())
    }

    /// Keeps a route read from the database, unless devices changed since `generation`.
    pub(super) fn insert(&self, generation: u64, pseudonym: Pseudonym, route: Route) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.routes.len() >= ROUTE_CACHE_ENTRIES {
            inner.routes.clear();
        }
        inner.routes.insert(pseudonym, route);
    }

    /// Drops every route (devices were added or deleted).
    pub(super) fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.routes.clear();
    }
}
