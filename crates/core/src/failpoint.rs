//! Named failpoints for the crash test: a process stops dead at a durability point, as if it had
//! been killed with `kill -9` there.
//!
//! `failpoint("name")` aborts the process (`std::process::abort`: no destructor, no flush, no
//! answer) when the environment variable `TIDINGS_FAILPOINT` is `name`, or `name@N` to abort at
//! the N-th time the point is reached (counted from 1, in this process). The variable is read
//! once, at the first failpoint reached; without it a failpoint costs one atomic load and a
//! comparison with `None`. It is compiled in always: it only reads the environment of the
//! process, which whoever starts the process already controls (the one exception to this
//! crate's "no I/O", kept here so that the server, the store and the client share one
//! implementation).
//!
//! The names are listed in [`NAMES`], so that the crash test and this code cannot drift.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable that arms a failpoint.
pub const VARIABLE: &str = "TIDINGS_FAILPOINT";

/// Every failpoint the code has, one per durability point. Server: the push of a copy to a live
/// session (`server-push-*`); the decision of a held copy's acknowledgement, around its record's
/// write (`server-held-decision-*`); the storing of held copies whose window ended
/// (`server-held-store-*`); the `Settled` to a sender (`server-settled-before`); the SQLite writer's batch: before its transaction begins, before
/// and after the commit that syncs it (a lazy batch's commit, which does not sync, counts too),
/// and after its operations were answered (`store-*`); each answer of a send, an
/// acknowledgement and a withdraw (`server-*-answer-*`). Client: after the local commit of an
/// outgoing message or of a received one, before and after a frame of a send goes out, after an
/// acknowledgement went out.
pub const NAMES: &[&str] = &[
    "server-push-before",
    "server-push-after",
    "server-held-decision-before",
    "server-held-decision-after",
    "server-held-store-before",
    "server-held-store-after",
    "server-settled-before",
    "store-transaction-before",
    "store-sync-before",
    "store-sync-after",
    "store-transaction-after",
    "server-send-answer-before",
    "server-send-answer-after",
    "server-ack-answer-before",
    "server-ack-answer-after",
    "server-withdraw-answer-before",
    "server-withdraw-answer-after",
    "client-outgoing-committed",
    "client-send-before",
    "client-send-after",
    "client-received-committed",
    "client-ack-after",
];

/// The armed failpoint: its name and the hit that aborts (1 for the first).
struct Armed {
    name: String,
    at_hit: u64,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

/// Reads `name` or `name@N`; `None` for an empty value or an `N` that is not a positive number.
fn parse(value: &str) -> Option<Armed> {
    let value = value.trim();
    let (name, at_hit) = match value.split_once('@') {
        Some((name, n)) => (name, n.parse::<u64>().ok().filter(|n| *n > 0)?),
        None => (value, 1),
    };
    (!name.is_empty()).then(|| Armed {
        name: name.to_string(),
        at_hit,
    })
}

/// Whether the `hit`-th reaching of `name` is where the armed failpoint aborts.
fn fires(armed: &Armed, name: &str, hit: impl FnOnce() -> u64) -> bool {
    armed.name == name && hit() == armed.at_hit
}

/// Aborts the process here if `TIDINGS_FAILPOINT` names this point (at this hit).
pub fn failpoint(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var(VARIABLE).ok().as_deref().and_then(parse));
    if let Some(armed) = armed {
        if fires(armed, name, || HITS.fetch_add(1, Ordering::Relaxed) + 1) {
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hits_are_read_as_written() {
        let check = |value: &str, expected: Option<(&str, u64)>| {
            let parsed = parse(value).map(|a| (a.name, a.at_hit));
            assert_eq!(
                parsed.as_ref().map(|(n, h)| (n.as_str(), *h)),
                expected,
                "{value}"
            );
        };
        check("store-sync-after", Some(("store-sync-after", 1)));
        check("client-send-before@3", Some(("client-send-before", 3)));
        check("", None);
        check("x@0", None);
        check("x@many", None);
    }

    #[test]
    fn only_the_named_point_fires_and_only_at_its_hit() {
        let armed = Armed {
            name: "store-sync-after".into(),
            at_hit: 2,
        };
        assert!(!fires(&armed, "store-sync-before", || 2));
        assert!(!fires(&armed, "store-sync-after", || 1));
        assert!(fires(&armed, "store-sync-after", || 2));
        assert!(!fires(&armed, "store-sync-after", || 3));
    }

    #[test]
    fn every_name_is_unique() {
        let mut names = NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), NAMES.len());
    }
}
