//! The Tidings client library: what an app embeds to message over Tidings.
//!
//! # Layout
//! - [`profile`]: the on-device state: server address, device key, registration;
//! - [`net`]: connecting to the server (TCP or TLS with a CA or a pinned certificate), HTTP
//!   requests and the upgrade to a session;
//! - [`session`]: a logged-in session: frames in and out, heartbeats;
//! - [`inbox`]: received messages, stored before they are acknowledged so each is shown once;
//! - [`route`]: sending with SMS fallback (IP, withdraw, SMS — never two of them);
//! - [`client`]: the operations a user asks for: register, verify, send, listen, look up, disable.
//!
//! Promise P1 lives here: nothing in this crate opens a socket or resolves a name for a profile
//! that has not been registered by its user ([`client::Client::open`] refuses). The device key
//! never leaves the profile directory; nothing here logs a number, a message or a key.

pub mod client;
pub mod inbox;
pub mod net;
pub mod profile;
pub mod route;
pub mod session;

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
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    #[error("signed out by the server: {0}")]
    SignedOut(String),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("local message store failed: {0}")]
    Inbox(String),
}

impl From<rusqlite::Error> for ClientError {
    fn from(e: rusqlite::Error) -> Self {
        ClientError::Inbox(e.to_string())
    }
}

/// Shorthand for client results.
pub type Result<T, E = ClientError> = std::result::Result<T, E>;
