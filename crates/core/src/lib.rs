//! The decisions Tidings makes, with no I/O and no clock of its own.
//!
//! Every function here takes the current time as an argument ([`Millis`], milliseconds since the
//! Unix epoch) and returns a decision; the server and client carry the decisions out. That keeps
//! each rule testable with a simulated clock and keeps the rules in one place.
//!
//! # Layout
//! - [`limits`]: token buckets and sliding windows for every rate the service bounds;
//! - [`verification`]: one-time codes: when one may be sent, how an attempt is judged;
//! - [`routing`]: what a send is answered and whether anything is stored;
//! - [`delivery`]: which devices a stored message must reach (E1) and when a queue is full;
//! - [`fallback`]: the sender's state machine for every outgoing message: the IP send, the
//!   re-encryption when devices changed, receipts, the withdraw and the SMS, never two of them;
//! - [`heartbeat`]: when a silent session counts as dead;
//! - [`presence`]: who may see a device online: its owner's mode, and the tokens and proofs
//!   that let the people it wrote to see it;
//! - [`oprf`]: the server's evaluation of blinded numbers, checked element by element, with its
//!   batch proof (the key and the randomness come in from the caller);
//! - [`failpoint`]: named points where a process aborts when the crash test says so.
//!
//! This crate must never do I/O, read a clock, spawn, log, or see a phone number in clear: it is
//! handed pseudonyms, device ids and counts. The one exception is [`failpoint`], which reads one
//! environment variable once.

pub mod delivery;
pub mod failpoint;
pub mod fallback;
pub mod heartbeat;
pub mod limits;
pub mod oprf;
pub mod presence;
pub mod routing;
pub mod verification;

/// Milliseconds since the Unix epoch. Time always comes in from outside.
pub type Millis = u64;

/// One second, in [`Millis`].
pub const SECOND: Millis = 1000;
/// One minute, in [`Millis`].
pub const MINUTE: Millis = 60 * SECOND;
/// One hour, in [`Millis`].
pub const HOUR: Millis = 60 * MINUTE;
/// One day, in [`Millis`].
pub const DAY: Millis = 24 * HOUR;
