//! The Tidings client library: what an app embeds to message over Tidings.
//!
//! # Layout
//! - [`profile`]: the on-device state: server address, device key, registration, routing;
//! - [`defaults`]: every default the command line and apps start from (profile directory,
//!   waits, TTL, SMS transport settings);
//! - [`clock`]: the one reader of the wall clock; deadlines from the core become instants here;
//! - [`net`]: connecting to the server (TCP or TLS with a CA or a pinned certificate), HTTP
//!   requests and the upgrade to a session;
//! - [`session`]: a logged-in session: frames in and out, heartbeats;
//! - [`vault`]: the passphrase-derived key (Argon2id) and sealing (XChaCha20-Poly1305);
//! - [`e2e`]: end-to-end encryption: the Olm account and sessions, trust, safety numbers;
//! - [`inbox`]: the local store: the sealed end-to-end state and received messages, changed
//!   together in one transaction so each message is decrypted once and shown once; and each
//!   outgoing message with its state, from before its first copy leaves until it is settled;
//! - [`account`]: an opened, registered profile: sessions, the local store, publishing keys,
//!   the directory and key claims; the only way to the network after registering;
//! - [`link_secret`]: the secret that binds a device link to the user who approved it: the link
//!   string, and the new device's proof over its keys;
//! - [`registration`]: joining and leaving: register, verify, link and approve a device, list
//!   and remove devices, opt out;
//! - [`outgoing`]: the content and its encrypted copies, the "devices changed" re-encryption,
//!   and the direct send over IP, driven by `tidings_core::fallback`, committed before it is
//!   sent and kept until settled;
//! - [`route`]: sending with SMS fallback (IP, withdraw, SMS — never two of them), stored in the
//!   profile and resumed; and the resend of unsettled IP-only messages;
//! - [`incoming`]: listening: decrypt, judge the sender, store, acknowledge, show once;
//! - [`discovery`]: blinding numbers into the pseudonyms that name accounts (the server never
//!   sees a contact's number), the pinned discovery key, the learned pseudonyms;
//! - [`contacts`]: lookup, safety numbers, trust;
//! - [`client`]: [`client::Client`], the one type an app embeds: every operation above as a
//!   method.
//!
//! Modules depend one way: `client` on the operation modules; `incoming` on `route`; `route` on
//! `outgoing`; all of them on `account`, which alone opens sessions (`registration` also makes
//! the HTTP requests that come before there is an account).
//!
//! Promise P1 lives here: nothing in this crate opens a socket or resolves a name for a profile
//! that has not been registered by its user ([`account::Account::open`] refuses, and so does
//! [`client::Client::open`] on top of it). The device key never leaves the profile directory;
//! nothing here logs a number, a message or a key. Promise P5 lives here too: a message leaves
//! this crate only as Olm ciphertext, one per device, and what the profile keeps of messages and
//! keys is sealed under the user's passphrase.

pub mod account;
pub mod client;
pub mod clock;
pub mod contacts;
pub mod defaults;
pub mod discovery;
pub mod e2e;
pub mod inbox;
pub mod incoming;
pub mod link_secret;
pub mod net;
pub mod outgoing;
pub mod profile;
pub mod registration;
pub mod route;
pub mod session;
pub mod vault;

/// Why a client operation failed. Each message says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "this profile is not registered: run `tidings register <number> --server <url>` first"
    )]
    NotRegistered,
    #[error(
        "registration is not finished: run `tidings verify <code>` with the code from the SMS"
    )]
    NotVerified,
    #[error("{0}")]
    InvalidNumber(#[from] tidings_proto::number::NumberError),
    #[error("profile problem: {0}")]
    Profile(String),
    #[error("cannot reach the server: {0}")]
    Network(String),
    #[error("the server refused: {0}")]
    Refused(String),
    /// A refusal that says when to try again (HTTP `429` with `retry_after`, or a session's
    /// `RATE_LIMITED` with `retry_after_ms`).
    #[error("{message}; try again in {}", wait_text(*retry_after))]
    RetryLater {
        message: String,
        retry_after: std::time::Duration,
    },
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error("signed out by the server: {0}")]
    SignedOut(String),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("local message store failed: {0}")]
    Inbox(String),
    #[error("{0}")]
    Passphrase(String),
    #[error(transparent)]
    Vault(#[from] vault::VaultError),
    #[error(transparent)]
    Crypto(#[from] e2e::CryptoError),
    #[error(transparent)]
    LinkString(#[from] link_secret::LinkStringError),
    #[error("refused to link: {0}")]
    LinkNotProven(String),
    #[error("the server's discovery key changed (or the server is misbehaving): its answer does not verify under the key this profile pinned, so nothing was looked up or sent. If the operator announced a new key, run `tidings repin` to pin the one the server shows now")]
    DiscoveryKeyChanged,
    #[error("the safety number with {number} changed: it has {count} new identity key(s) (a new phone, a re-registration, a new device, or someone in between). Nothing was sent. Compare `tidings fingerprint {number}` with them, then run `tidings trust {number}`")]
    IdentityChanged { number: String, count: usize },
}

impl From<tidings_proto::frame::Error> for ClientError {
    /// An `Error` frame: a refusal that carries a wait says when to try again.
    fn from(error: tidings_proto::frame::Error) -> Self {
        match retry_after(error.retry_after_ms) {
            Some(retry_after) => ClientError::RetryLater {
                message: error.message,
                retry_after,
            },
            None => ClientError::Refused(error.message),
        }
    }
}

/// The wait a session's refusal carries (`retry_after_ms`, 0 for none), rounded up to whole
/// seconds so that it is never shown shorter than it is.
pub fn retry_after(retry_after_ms: u64) -> Option<std::time::Duration> {
    (retry_after_ms > 0).then(|| std::time::Duration::from_secs(retry_after_ms.div_ceil(1000)))
}

impl From<rusqlite::Error> for ClientError {
    fn from(e: rusqlite::Error) -> Self {
        ClientError::Inbox(e.to_string())
    }
}

/// A wait for a person: "45 s", "4 min 10 s", "7 h 59 min", "2 d 3 h" (two units at most, the
/// smaller rounded down).
pub fn wait_text(wait: std::time::Duration) -> String {
    let seconds = wait.as_secs();
    let (minute, hour, day) = (60, 3_600, 86_400);
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big} {big_unit}")
        } else {
            format!("{big} {big_unit} {small} {small_unit}")
        }
    };
    if seconds >= day {
        two(seconds / day, "d", seconds % day / hour, "h")
    } else if seconds >= hour {
        two(seconds / hour, "h", seconds % hour / minute, "min")
    } else if seconds >= minute {
        two(seconds / minute, "min", seconds % minute, "s")
    } else {
        format!("{seconds} s")
    }
}

/// Shorthand for client results.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use std::time::Duration;

    #[test]
    fn a_wait_is_said_in_two_units_at_most() {
        let check = |seconds: u64, expected: &str| {
            assert_eq!(super::wait_text(Duration::from_secs(seconds)), expected);
        };
        check(0, "0 s");
        check(45, "45 s");
        check(60, "1 min");
        check(250, "4 min 10 s");
        check(3_600, "1 h");
        check(28_799, "7 h 59 min");
        check(86_400 + 3 * 3_600 + 59, "1 d 3 h");
    }
}
