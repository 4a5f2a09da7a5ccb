//! When a silent session counts as dead.
//!
//! Clients ping every `interval`; a session from which nothing at all has arrived for
//! [`MISSED_BEATS`] intervals is closed, so it stops counting as online within about three
//! intervals (30 seconds with the default of 10). The server's session moves its deadline with
//! [`deadline`] on every frame it reads, and closes once the deadline has passed.

use crate::{Millis, SECOND};

/// Default interval between client pings.
pub const DEFAULT_INTERVAL: Millis = 10 * SECOND;
/// How many intervals of silence end a session.
pub const MISSED_BEATS: u64 = 3;

/// The time after which a session last heard from at `last_heard` is dead.
pub fn deadline(last_heard: Millis, interval: Millis) -> Millis {
    last_heard.saturating_add(interval.saturating_mul(MISSED_BEATS))
}

/// Whether a session last heard from at `last_heard` is dead at `now`.
pub fn is_dead(last_heard: Millis, interval: Millis, now: Millis) -> bool {
    now >= deadline(last_heard, interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_after_three_silent_intervals() {
        let check = |last, now, dead| assert_eq!(is_dead(last, DEFAULT_INTERVAL, now), dead);
        check(0, 0, false);
        check(0, 29 * SECOND, false);
        check(0, 30 * SECOND, true);
        check(5 * SECOND, 30 * SECOND, false);
    }
}
