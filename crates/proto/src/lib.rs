//! The Tidings wire protocol, as types. `docs/PROTOCOL.md` is the prose version of this crate.
//!
//! # Layout
//! - [`frame`]: the session protocol's protobuf messages (`Frame` and everything inside it);
//! - [`codec`]: turning bytes into frames and frames into bytes (length prefix, size bound);
//! - [`http`]: the JSON bodies of the registration API;
//! - [`transcript`]: the exact byte strings a device signs, shared by client and server;
//! - [`number`]: parsing and normalising phone numbers to E.164;
//! - [`id`]: fixed-size identifiers and their base64url text form.
//!
//! This crate performs no I/O and keeps no state. It must never grow a field for a hardware
//! identifier (IMEI, IMSI, serial, MAC): unknown fields are dropped on decode, never kept.

pub mod codec;
pub mod frame;
pub mod http;
pub mod id;
pub mod number;
pub mod transcript;

/// Largest message payload a client may send, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;
/// Largest encoded frame either side accepts: the payload plus room for headers.
pub const MAX_FRAME_BYTES: usize = 80 * 1024;
/// Largest `Login` frame the server reads: it arrives before the client is known, so it is held
/// to what a login needs (about 90 bytes) with room for a few more fields.
pub const MAX_LOGIN_FRAME_BYTES: usize = 256;
/// Most devices one number may have.
pub const MAX_DEVICES: usize = 6;
/// Most copies in one `Send`: every device of the receiver and the sender's other devices.
pub const MAX_COPIES: usize = 2 * MAX_DEVICES - 1;
/// Most one-time keys in one `KeysUpload`.
pub const MAX_ONE_TIME_KEYS_PER_UPLOAD: usize = 100;
/// Most unclaimed one-time keys the server keeps for one device.
pub const MAX_ONE_TIME_KEYS_STORED: u32 = 100;
/// Length of a contact token (`Content::sender_contact_token`, `Send::receiver_contact_token`):
/// 256 random bits made on the device.
pub const CONTACT_TOKEN_BYTES: usize = 32;
/// Largest number of numbers in one `Lookup`, and of blinded elements in one `Evaluate`.
pub const MAX_LOOKUP_NUMBERS: usize = 1000;
/// Length of a presence key (`PresenceSet::key`), of a presence token
/// (`Content::sender_presence_token`) and of a proof's MAC (`PresenceProof::mac`).
pub const PRESENCE_KEY_BYTES: usize = 32;
/// Most presence proofs in one `Lookup` (a client asking about more contacts splits its lookup).
pub const MAX_LOOKUP_PROOFS: usize = 512;
/// Most presence proofs in one `Send`: one per device of the receiver.
pub const MAX_SEND_PROOFS: usize = MAX_DEVICES;
/// Bytes of an account's pseudonym, as requests name accounts since tidings/2.
pub const PSEUDONYM_BYTES: usize = 32;
/// The token in `Upgrade:` that opens a session.
pub const UPGRADE_PROTOCOL: &str = "tidings/3";
/// The response header that carries the login challenge.
pub const CHALLENGE_HEADER: &str = "tidings-challenge";
/// The request header of `GET /v1/connect` that carries a resumption token (base64url), in place
/// of the challenge login.
pub const RESUME_HEADER: &str = "tidings-resume";
/// The request header that says whether a resumed session listens (`1`) or not (`0`, or
/// absent): what `Login.listen` says in a challenge login.
pub const LISTEN_HEADER: &str = "tidings-listen";
/// The response header that says the token was accepted (`1`): the session is logged in and its
/// `LoginResult` follows the upgrade; the client sends no `Login`. Absent: the challenge login.
pub const RESUMED_HEADER: &str = "tidings-resumed";
/// Largest resumption token either side accepts, in bytes.
pub const MAX_RESUME_TOKEN_BYTES: usize = 128;
