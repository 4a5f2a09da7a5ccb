//! The server's two clocks, and the only place that reads either.
//!
//! The wall clock ([`now_ms`]) dates what is stored and compared with stored times: a message's
//! send time and expiry, a code's issue time, a limiter's window. The session clock
//! ([`session_ms`]) is monotonic and only measures heartbeat silence: a step of the wall clock
//! must neither close every idle session nor keep dead ones. Nothing here ever mixes the two.

use tidings_core::Millis;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
        .unwrap_or(0)
}

/// The start of the session clock: the first time any part of the server read it.
fn session_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Milliseconds on the session clock.
pub fn session_ms() -> Millis {
    Millis::try_from(session_start().elapsed().as_millis()).unwrap_or(Millis::MAX)
}
