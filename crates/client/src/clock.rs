//! The one place this crate reads the wall clock: the core's rules take the time as an argument
//! ([`tidings_core::Millis`]), and the I/O layers turn the core's deadlines into tokio instants.
//! Nothing else here calls `SystemTime::now`.

use std::time::Duration;

use tidings_core::{Millis, DAY};
use tokio::time::Instant;

/// Milliseconds since the Unix epoch (0 for a clock set before it).
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// The `Instant` at which the wall-clock time `at` is reached, at most a year from now.
pub fn instant_at(at: Millis) -> Instant {
    let wait = at.saturating_sub(now_ms()).min(365 * DAY);
    Instant::now() + Duration::from_millis(wait)
}

/// An `Instant` far enough away to stand for "never" (a hundred years).
pub fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_follow_the_wall_clock_and_stay_within_a_year() {
        let now = now_ms();
        assert!(now > 1_600_000_000_000, "a clock after 2020");
        let soon = instant_at(now + 2_000);
        let wait = soon.saturating_duration_since(Instant::now());
        assert!(wait <= Duration::from_secs(2) && wait > Duration::from_millis(1_500));
        // A time already past is now; a time far away is a year at most.
        assert!(instant_at(0) <= Instant::now());
        let capped = instant_at(Millis::MAX).saturating_duration_since(Instant::now());
        assert!(capped <= Duration::from_millis(365 * DAY));
        assert!(far_future() > Instant::now() + Duration::from_millis(365 * DAY));
    }
}
