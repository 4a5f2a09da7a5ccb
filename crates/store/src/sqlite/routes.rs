//! What sends read instead of the tables, held in memory: the device ids of accounts that sends
//! went to (routes, by pseudonym), and each account's devices as a screen reads them (whether
//! keyed, their contact token hashes), so that a send reads no table.
//!
//! Neither may ever answer with devices older than a change that has been answered: the writer
//! drops routes before it answers a batch that added or deleted devices, and the screened devices
//! also before it answers one that published keys or set a contact token.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tidings_core::delivery::AccountDevice;

use crate::{AccountId, Pseudonym, Route};

/// Entries held in memory at most, per cache; past this a cache starts again from empty.
pub const ROUTE_CACHE_ENTRIES: usize = 65_536;

/// The routes of accounts that sends went to: device ids only, which change only when a device
/// is added or deleted.
pub(super) type RouteCache = Cache<Pseudonym, Route>;

/// The devices of accounts that deliver-first sends were screened against
/// ([`Store::screen`](crate::Store::screen)).
pub(super) type ScreenCache = Cache<AccountId, Vec<AccountDevice>>;

/// Values read from the database, held until the writer drops them all. A value read from the
/// database is kept only if no drop happened since the read began: a read that began before a
/// change and ended after it could otherwise keep the old value.
pub(super) struct Cache<K, V> {
    inner: Mutex<Held<K, V>>,
}

impl<K, V> Default for Cache<K, V> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Held {
                generation: 0,
                values: HashMap::new(),
            }),
        }
    }
}

pub(super) struct Held<K, V> {
    /// Counts the times the values were dropped.
    generation: u64,
    values: HashMap<K, V>,
}

impl<K: Eq + Hash, V: Clone> Cache<K, V> {
    /// The values. Every change to them is one map operation, so a panic elsewhere while the
    /// lock was held leaves them whole: a poisoned lock is taken as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Held<K, V>> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The value held for a key, and the generation to insert a value read now under.
    pub(super) fn get(&self, key: &K) -> (u64, Option<V>) {
        let inner = self.lock();
        (inner.generation, inner.values.get(key).cloned())
    }

    /// Keeps a value read from the database, unless the values were dropped since
    /// `generation`.
    pub(super) fn insert(&self, generation: u64, key: K, value: V) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.values.len() >= ROUTE_CACHE_ENTRIES {
            inner.values.clear();
        }
        inner.values.insert(key, value);
    }

    /// Drops every value (what they were read from changed).
    pub(super) fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.values.clear();
    }
}
