//! The session protocol's messages. Field numbers are the wire contract (see `docs/PROTOCOL.md`).
//!
//! Frames that carry a number or a payload have a hand-written `Debug` that prints neither, so a
//! frame that ends up in a log line cannot leak one.

use bytes::Bytes;

/// One frame of the session protocol.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Frame {
    #[prost(
        oneof = "Kind",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 39, 40, 41, 42, 43"
    )]
    pub kind: Option<Kind>,
}

/// What a frame carries.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Kind {
    #[prost(message, tag = "1")]
    Login(Login),
    #[prost(message, tag = "2")]
    Ping(Ping),
    #[prost(message, tag = "3")]
    Send(Send),
    #[prost(message, tag = "4")]
    Ack(Ack),
    #[prost(message, tag = "5")]
    ReceiptAck(ReceiptAck),
    #[prost(message, tag = "6")]
    Lookup(Lookup),
    #[prost(message, tag = "7")]
    Devices(DevicesRequest),
    #[prost(message, tag = "8")]
    Disable(Disable),
    #[prost(message, tag = "9")]
    KeysUpload(KeysUpload),
    #[prost(message, tag = "10")]
    KeysClaim(KeysClaim),
    #[prost(message, tag = "11")]
    LinkCodeRequest(LinkCodeRequest),
    #[prost(message, tag = "12")]
    RemoveDevice(RemoveDevice),
    #[prost(message, tag = "13")]
    Vouch(Vouch),
    #[prost(message, tag = "14")]
    Withdraw(Withdraw),
    #[prost(message, tag = "16")]
    MissedSeen(MissedSeen),
    #[prost(message, tag = "17")]
    Evaluate(Evaluate),
    #[prost(message, tag = "18")]
    PresenceSet(PresenceSet),
    #[prost(message, tag = "19")]
    Rekey(Rekey),
    #[prost(message, tag = "20")]
    LoginResult(LoginResult),
    #[prost(message, tag = "21")]
    Pong(Pong),
    #[prost(message, tag = "22")]
    SendResult(SendResult),
    #[prost(message, tag = "23")]
    Deliver(Deliver),
    #[prost(message, tag = "24")]
    AckResult(AckResult),
    #[prost(message, tag = "25")]
    Receipt(Receipt),
    #[prost(message, tag = "26")]
    LookupResult(LookupResult),
    #[prost(message, tag = "27")]
    DeviceList(DeviceList),
    #[prost(message, tag = "28")]
    DisableResult(DisableResult),
    #[prost(message, tag = "29")]
    SignedOut(SignedOut),
    #[prost(message, tag = "30")]
    Error(Error),
    #[prost(message, tag = "31")]
    KeysUploadResult(KeysUploadResult),
    #[prost(message, tag = "32")]
    KeysClaimResult(KeysClaimResult),
    #[prost(message, tag = "33")]
    LinkCode(LinkCode),
    #[prost(message, tag = "34")]
    LinkCompleted(LinkCompleted),
    #[prost(message, tag = "35")]
    RemoveDeviceResult(RemoveDeviceResult),
    #[prost(message, tag = "36")]
    VouchResult(VouchResult),
    #[prost(message, tag = "37")]
    WithdrawResult(WithdrawResult),
    #[prost(message, tag = "39")]
    Missed(Missed),
    #[prost(message, tag = "40")]
    EvaluateResult(EvaluateResult),
    #[prost(message, tag = "41")]
    PresenceSetResult(PresenceSetResult),
    #[prost(message, tag = "42")]
    RekeyResult(RekeyResult),
    #[prost(message, tag = "43")]
    Settled(Settled),
}

impl Kind {
    /// The request id an answer carries (lookup, device list, disable, error), if any.
    pub fn answer_to(&self) -> Option<u64> {
        match self {
            Kind::LookupResult(r) => Some(r.request_id),
            Kind::DeviceList(r) => Some(r.request_id),
            Kind::DisableResult(r) => Some(r.request_id),
            Kind::KeysUploadResult(r) => Some(r.request_id),
            Kind::KeysClaimResult(r) => Some(r.request_id),
            Kind::LinkCode(r) => Some(r.request_id),
            Kind::RemoveDeviceResult(r) => Some(r.request_id),
            Kind::VouchResult(r) => Some(r.request_id),
            Kind::EvaluateResult(r) => Some(r.request_id),
            Kind::PresenceSetResult(r) => Some(r.request_id),
            Kind::RekeyResult(r) => Some(r.request_id),
            Kind::Error(e) if e.request_id != 0 => Some(e.request_id),
            _ => None,
        }
    }
}

impl From<Kind> for Frame {
    fn from(kind: Kind) -> Self {
        Frame { kind: Some(kind) }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Login {
    #[prost(bytes = "vec", tag = "1")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
    #[prost(bool, tag = "3")]
    pub listen: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LoginResult {
    #[prost(uint64, tag = "1")]
    pub server_time_ms: u64,
    #[prost(uint32, tag = "2")]
    pub heartbeat_seconds: u32,
    /// Unclaimed one-time keys the server holds for this device.
    #[prost(uint32, tag = "3")]
    pub one_time_keys: u32,
    /// Whether this device has published its identity keys and a fallback key.
    #[prost(bool, tag = "4")]
    pub keys_published: bool,
    /// The version of the OPRF key the server evaluates with now: above the client's pinned one,
    /// the key was rotated (the client pins the new one and sends `Rekey`).
    #[prost(uint32, tag = "5")]
    pub oprf_key_version: u32,
    /// A fresh resumption token for this device's next connect (sent in the
    /// `Tidings-Resume` header of `GET /v1/connect`): single use, valid for a bounded time;
    /// empty when the server issues none. Opaque to the client.
    #[prost(bytes = "vec", tag = "6")]
    pub resume_token: Vec<u8>,
}

/// Sent at the start of a listening session while own messages were not kept for this device:
/// its queue had no room when another device of its account sent them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Missed {
    #[prost(uint32, tag = "1")]
    pub messages: u32,
}

/// The device has shown its user a `Missed` count: the server forgets that many.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MissedSeen {
    #[prost(uint32, tag = "1")]
    pub messages: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    #[prost(uint64, tag = "1")]
    pub nonce: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SendMode {
    Queue = 0,
    NowOrNever = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Send {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// A number in clear: refused since tidings/2 (numbers are blinded on the device); the
    /// receiver is `to_account`.
    #[prost(string, tag = "2")]
    pub to: String,
    #[prost(enumeration = "SendMode", tag = "3")]
    pub mode: i32,
    #[prost(uint32, tag = "4")]
    pub ttl_seconds: u32,
    /// Unused since end-to-end encryption: a send carries `copies`. Kept so old field numbers
    /// keep their meaning.
    #[prost(bytes = "bytes", tag = "5")]
    pub payload: Bytes,
    /// One encrypted copy per device that must receive the message.
    #[prost(message, repeated, tag = "6")]
    pub copies: Vec<Copy>,
    /// The receiver's contact token, when the sender holds one (it came inside a message from
    /// the receiver, `Content::sender_contact_token`). With it the copies count as a contact's;
    /// without it, or with one that is not the receiver's, as a stranger's (a small pool per
    /// device, a short TTL). The server hashes it, compares, and keeps neither.
    #[prost(bytes = "vec", tag = "40")]
    pub receiver_contact_token: Vec<u8>,
    /// The receiver's account: its 32-byte pseudonym, which the client derived with
    /// `Evaluate`. Since tidings/2 the only way to name a receiver (`to` must be empty).
    #[prost(bytes = "vec", tag = "41")]
    pub to_account: Vec<u8>,
    /// Proofs that the sender may see the receiver's devices online (at most
    /// `MAX_SEND_PROOFS`). Without a valid one, a device that shows itself only to its
    /// contacts counts as offline for this send's answer: `NOW_OR_NEVER` is refused as not
    /// reachable and `QUEUE` answered `QUEUED`.
    #[prost(message, repeated, tag = "42")]
    pub presence_proofs: Vec<PresenceProof>,
    /// This id may have been sent before (the client sends an unsettled message again after a
    /// reconnect or a restart, re-encrypted for the current devices).
    #[prost(bool, tag = "43")]
    pub resend: bool,
}

impl std::fmt::Debug for Send {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Send")
            .field("mode", &self.mode)
            .field("ttl_seconds", &self.ttl_seconds)
            .field("payload_len", &self.payload.len())
            .field("copies", &self.copies.len())
            .finish_non_exhaustive()
    }
}

/// The copy of a message for one device: that device's Olm ciphertext (an `Envelope`).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Copy {
    #[prost(bytes = "vec", tag = "1")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "bytes", tag = "2")]
    pub payload: Bytes,
}

impl std::fmt::Debug for Copy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Copy")
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SendOutcome {
    Accepted = 0,
    Queued = 1,
    RefusedNotReachable = 2,
    NotAUser = 3,
    RefusedQueueFull = 4,
    RateLimited = 5,
    Invalid = 6,
    Unavailable = 7,
    DevicesChanged = 8,
    /// The sending account has as many bytes waiting across all queues as the server keeps for
    /// one account; nothing was stored.
    RefusedOverQuota = 9,
    /// The sender presented none of the receiver's contact tokens (a stranger), and a receiver
    /// device's stranger pool (the room all strangers share in its queue) is full; nothing was
    /// stored.
    RefusedStrangerPoolFull = 10,
}

impl SendOutcome {
    /// The name used in `--json` output, logs-free metrics labels and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            SendOutcome::Accepted => "accepted",
            SendOutcome::Queued => "queued",
            SendOutcome::RefusedNotReachable => "refused_not_reachable",
            SendOutcome::NotAUser => "not_a_user",
            SendOutcome::RefusedQueueFull => "refused_queue_full",
            SendOutcome::RateLimited => "rate_limited",
            SendOutcome::Invalid => "invalid",
            SendOutcome::Unavailable => "unavailable",
            SendOutcome::DevicesChanged => "devices_changed",
            SendOutcome::RefusedOverQuota => "refused_over_quota",
            SendOutcome::RefusedStrangerPoolFull => "refused_stranger_pool_full",
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SendResult {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(enumeration = "SendOutcome", tag = "2")]
    pub outcome: i32,
    #[prost(string, tag = "3")]
    pub detail: String,
    /// `DEVICES_CHANGED`: receiver devices that need a copy and got none.
    #[prost(bytes = "vec", repeated, tag = "4")]
    pub missing_devices: Vec<Vec<u8>>,
    /// `DEVICES_CHANGED`: the sender's own other devices that need a copy and got none.
    #[prost(bytes = "vec", repeated, tag = "5")]
    pub missing_own_devices: Vec<Vec<u8>>,
    /// `DEVICES_CHANGED`: copies addressed to devices that must not get one (gone, or unknown).
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub extra_devices: Vec<Vec<u8>>,
    /// `ACCEPTED`/`QUEUED`: the sender's own other devices whose queues had no room: the message
    /// was stored without their copies, so they miss it.
    #[prost(bytes = "vec", repeated, tag = "7")]
    pub skipped_own_devices: Vec<Vec<u8>>,
    /// `RATE_LIMITED`: how long until the send would be accepted, in milliseconds (0: unknown).
    #[prost(uint64, tag = "8")]
    pub retry_after_ms: u64,
    /// `ACCEPTED`/`QUEUED`: the TTL the server applied, in seconds, when it is shorter than the
    /// send asked: the sender is a stranger of the receiver, whose messages are kept at most
    /// 3 days. 0: kept as long as asked.
    #[prost(uint32, tag = "9")]
    pub ttl_seconds: u32,
    /// `ACCEPTED`/`QUEUED`: every copy was durable on the server or had a durable decision
    /// record when this answer went out. False: a later `Settled` names the id.
    #[prost(bool, tag = "10")]
    pub settled: bool,
}

/// Server to the sending device: these messages are settled (every copy durable on the server
/// or decided, durably), so the sending client may forget them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Settled {
    #[prost(bytes = "vec", repeated, tag = "1")]
    pub ids: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Deliver {
    #[prost(bytes = "vec", tag = "1")]
    pub sender_device: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    #[prost(uint64, tag = "3")]
    pub sent_at_ms: u64,
    #[prost(bytes = "bytes", tag = "4")]
    pub payload: Bytes,
}

impl std::fmt::Debug for Deliver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliver")
            .field("sent_at_ms", &self.sent_at_ms)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    #[prost(bytes = "vec", tag = "1")]
    pub sender_device: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// The device will not show this copy (it could not be decrypted, its sender is not who it
    /// claims, or it repeats one already shown): the copy is set aside without a receipt, and
    /// the message's sender sees what it would see for a device that never came online (a
    /// withdraw answers `WITHDRAWN`, the TTL's end an `EXPIRED` receipt).
    #[prost(bool, tag = "3")]
    pub discard: bool,
    /// The device showed the message but sends its sender no receipt (a sender it never wrote
    /// to, while it does not show itself to everyone): the copy is deleted, a withdraw answers
    /// `DELIVERED`, and no receipt is stored.
    #[prost(bool, tag = "4")]
    pub no_receipt: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum AckStatus {
    Confirmed = 0,
    Unknown = 1,
    /// The sender withdrew the message before this acknowledgement: never show it.
    Withdrawn = 2,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AckResult {
    #[prost(bytes = "vec", tag = "1")]
    pub sender_device: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    #[prost(enumeration = "AckStatus", tag = "3")]
    pub status: i32,
}

/// Asks the server to withdraw a message this device sent and no receiver device has taken.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Withdraw {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum WithdrawState {
    /// A receiver device acknowledged it first.
    Delivered = 0,
    /// Every copy is deleted; no device will show it.
    Withdrawn = 1,
    /// The server holds no such message (never stored, or expired).
    Unknown = 2,
    /// Not answered: the asking number's discovery budget is used up (a withdraw's outcome tells
    /// whether the receiver took the message). Nothing was withdrawn; `retry_after_ms` says when
    /// to ask again.
    RateLimited = 3,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WithdrawResult {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(enumeration = "WithdrawState", tag = "2")]
    pub state: i32,
    /// `RATE_LIMITED`: milliseconds until a withdraw would be answered (0: no wait given).
    #[prost(uint64, tag = "3")]
    pub retry_after_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ReceiptKind {
    Delivered = 0,
    Expired = 1,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Receipt {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(enumeration = "ReceiptKind", tag = "2")]
    pub kind: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReceiptAck {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Presence {
    NotAUser = 0,
    Offline = 1,
    Online = 2,
}

impl Presence {
    /// The name used in `--json` output and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::NotAUser => "not_a_user",
            Presence::Offline => "offline",
            Presence::Online => "online",
        }
    }
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Lookup {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// Numbers in clear: refused since tidings/2.
    #[prost(string, repeated, tag = "2")]
    pub numbers: Vec<String>,
    /// The accounts asked about: 32-byte pseudonyms the client derived with `Evaluate`.
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub accounts: Vec<Vec<u8>>,
    /// Proofs that the asker may see devices of the looked-up accounts online (at most
    /// `MAX_LOOKUP_PROOFS`).
    #[prost(message, repeated, tag = "4")]
    pub proofs: Vec<PresenceProof>,
}

/// Who may see a device online.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum PresenceMode {
    /// Only those holding a presence token of the device (by default, whoever it wrote to).
    Contacts = 0,
    /// Everyone who knows the number.
    Everyone = 1,
    /// Nobody: always shown as not reachable now.
    Nobody = 2,
}

/// Sets who may see this session's device online, for as long as the session lasts (the server
/// keeps it in memory only). A session that sent none shows its device to nobody.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct PresenceSet {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(enumeration = "PresenceMode", tag = "2")]
    pub mode: i32,
    /// The device's presence key, `PRESENCE_KEY_BYTES` (may be empty in mode `NOBODY`).
    #[prost(bytes = "vec", tag = "3")]
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PresenceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceSet")
            .field("request_id", &self.request_id)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PresenceSetResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

/// A proof that the asking device may see one device online now: `mac` is
/// `tidings_core::presence::proof` of the token that device handed the asker, for the current
/// or the previous hour.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct PresenceProof {
    /// The pseudonym of the account the device belongs to (32 bytes), or empty.
    #[prost(bytes = "vec", tag = "1")]
    pub account: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub mac: Vec<u8>,
}

impl std::fmt::Debug for PresenceProof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresenceProof").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup")
            .field("request_id", &self.request_id)
            .field("count", &(self.numbers.len() + self.accounts.len()))
            .finish()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct LookupEntry {
    /// Never set since tidings/2.
    #[prost(string, tag = "1")]
    pub number: String,
    #[prost(enumeration = "Presence", tag = "2")]
    pub presence: i32,
    /// The account this entry answers for, as asked.
    #[prost(bytes = "vec", tag = "3")]
    pub account: Vec<u8>,
}

impl std::fmt::Debug for LookupEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LookupEntry").finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LookupResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(message, repeated, tag = "2")]
    pub entries: Vec<LookupEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct DevicesRequest {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// A number in clear: refused since tidings/2.
    #[prost(string, tag = "2")]
    pub number: String,
    /// The account whose devices are asked for: its 32-byte pseudonym.
    #[prost(bytes = "vec", tag = "3")]
    pub account: Vec<u8>,
    /// The sender stamped on a delivery the asking device holds: the request checks whether that
    /// device is one of the number's, at no lookup budget the first time in an hour for that
    /// sender device (charged after that); the list is then given only if it is (empty
    /// otherwise, as for a number that is not a user).
    #[prost(bytes = "vec", tag = "30")]
    pub sender_device: Vec<u8>,
}

impl std::fmt::Debug for DevicesRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevicesRequest")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceList {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub device_ids: Vec<Vec<u8>>,
    /// The same devices with their published identity keys (devices that have not published
    /// any are listed in `device_ids` only).
    #[prost(message, repeated, tag = "3")]
    pub devices: Vec<DeviceKeys>,
}

/// A device's public identity keys, as its owner published them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeviceKeys {
    #[prost(bytes = "vec", tag = "1")]
    pub device_id: Vec<u8>,
    /// Olm Curve25519 identity key, 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    /// Olm Ed25519 signing key, 32 bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub signing_key: Vec<u8>,
    /// The device of the same number that approved this one's link, if one did.
    #[prost(bytes = "vec", tag = "4")]
    pub voucher: Vec<u8>,
    /// The voucher's Ed25519 signature over `transcript::vouch` for this device.
    #[prost(bytes = "vec", tag = "5")]
    pub voucher_signature: Vec<u8>,
}

/// A Curve25519 one-time or fallback key with the device's Ed25519 signature over
/// `transcript::one_time_key`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SignedKey {
    #[prost(bytes = "vec", tag = "1")]
    pub public_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

/// Publishes the device's identity keys (first time only; they never change), one-time keys and
/// a fallback key (replacing the previous one).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysUpload {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signing_key: Vec<u8>,
    #[prost(message, repeated, tag = "4")]
    pub one_time_keys: Vec<SignedKey>,
    #[prost(message, optional, tag = "5")]
    pub fallback_key: Option<SignedKey>,
    /// SHA-256 of this device's contact token (32 bytes; empty leaves the one held as it is).
    #[prost(bytes = "vec", tag = "40")]
    pub contact_token_hash: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysUploadResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// Unclaimed one-time keys the server now holds for this device.
    #[prost(uint32, tag = "2")]
    pub one_time_keys: u32,
}

/// Claims one key per device of `number` (all its devices, or the ones in `device_ids`).
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct KeysClaim {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// A number in clear: refused since tidings/2.
    #[prost(string, tag = "2")]
    pub number: String,
    #[prost(bytes = "vec", repeated, tag = "3")]
    pub device_ids: Vec<Vec<u8>>,
    /// The account whose keys are claimed: its 32-byte pseudonym.
    #[prost(bytes = "vec", tag = "4")]
    pub account: Vec<u8>,
}

impl std::fmt::Debug for KeysClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeysClaim")
            .field("request_id", &self.request_id)
            .field("devices", &self.device_ids.len())
            .finish_non_exhaustive()
    }
}

/// One claimed key: a one-time key (handed out once) or, when none is left, the fallback key.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ClaimedKey {
    #[prost(bytes = "vec", tag = "1")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signing_key: Vec<u8>,
    #[prost(message, optional, tag = "4")]
    pub key: Option<SignedKey>,
    #[prost(bool, tag = "5")]
    pub fallback: bool,
    /// As in [`DeviceKeys`].
    #[prost(bytes = "vec", tag = "6")]
    pub voucher: Vec<u8>,
    #[prost(bytes = "vec", tag = "7")]
    pub voucher_signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeysClaimResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(message, repeated, tag = "2")]
    pub devices: Vec<ClaimedKey>,
}

/// Asks for a one-time code that lets a new device join this device's number.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkCodeRequest {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct LinkCode {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(string, tag = "2")]
    pub code: String,
    #[prost(uint32, tag = "3")]
    pub expires_in: u32,
}

impl std::fmt::Debug for LinkCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkCode")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// Tells the device that asked for a link code that a device joined with it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct LinkCompleted {
    #[prost(bytes = "vec", tag = "1")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub identity_key: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signing_key: Vec<u8>,
    /// The new device's proof that it knows the secret its user was shown with the code, relayed
    /// from its link request: the server can neither check nor make one.
    #[prost(bytes = "vec", tag = "4")]
    pub proof: Vec<u8>,
}

/// Removes a device of the logged-in device's own number, with its keys and queue.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveDevice {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub device_id: Vec<u8>,
}

/// Asks the server to evaluate its OPRF on blinded numbers (RFC 9497 VOPRF, ristretto255-SHA512):
/// the client unblinds the answer into each number's pseudonym without the server seeing the
/// number. At most `MAX_LOOKUP_NUMBERS` elements; each costs one from the account's lookup budget.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Evaluate {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// Blinded elements, 32 bytes each (compressed ristretto255 points).
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub blinded: Vec<Vec<u8>>,
    /// The sender stamped on a delivery the asking device holds, to check the number that
    /// delivery claims (one element): free once an hour per sender device.
    #[prost(bytes = "vec", tag = "3")]
    pub sender_device: Vec<u8>,
    /// The key version the client pinned (0: whichever is current).
    #[prost(uint32, tag = "4")]
    pub key_version: u32,
}

/// Moves the asking device's account to the server's current OPRF key: `number` is the device's
/// own (as in registration, the only number in clear this protocol carries); the server checks
/// that it is the account's and stores its pseudonym under the current key.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Rekey {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// The device's own number, E.164.
    #[prost(string, tag = "2")]
    pub number: String,
}

impl std::fmt::Debug for Rekey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekey")
            .field("request_id", &self.request_id)
            .finish_non_exhaustive()
    }
}

/// The account's pseudonym under the current key, and that key's version.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RekeyResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub account: Vec<u8>,
    #[prost(uint32, tag = "3")]
    pub key_version: u32,
}

/// The evaluated elements, in order, with one batch DLEQ proof for all of them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EvaluateResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    /// Evaluated elements, 32 bytes each.
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub evaluated: Vec<Vec<u8>>,
    /// The batch proof (64 bytes: two scalars).
    #[prost(bytes = "vec", tag = "3")]
    pub proof: Vec<u8>,
    /// The version of the key that evaluated.
    #[prost(uint32, tag = "4")]
    pub key_version: u32,
}

/// The logged-in device vouches for a device it approved: its signature over
/// `transcript::vouch`, which lets contacts accept the new device's keys.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Vouch {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
    #[prost(bytes = "vec", tag = "2")]
    pub device_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VouchResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RemoveDeviceResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Disable {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DisableResult {
    #[prost(uint64, tag = "1")]
    pub request_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SignedOut {
    #[prost(string, tag = "1")]
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    Protocol = 0,
    AuthFailed = 1,
    RateLimited = 2,
    InvalidRequest = 3,
    Unavailable = 4,
    /// The device already holds as many sessions as the server allows; fatal, at login.
    TooManySessions = 8,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Error {
    #[prost(enumeration = "ErrorCode", tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(bool, tag = "3")]
    pub fatal: bool,
    #[prost(uint64, tag = "4")]
    pub request_id: u64,
    /// `RATE_LIMITED`: how long until the request would be served, in milliseconds (0: unknown).
    #[prost(uint64, tag = "5")]
    pub retry_after_ms: u64,
}

/// The client-side content of a message payload. The server never decodes it.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Content {
    #[prost(string, tag = "1")]
    pub from: String,
    #[prost(string, tag = "2")]
    pub text: String,
    #[prost(uint64, tag = "3")]
    pub sent_at_ms: u64,
    /// The message id, so a server cannot pass a ciphertext off under another id.
    #[prost(bytes = "vec", tag = "4")]
    pub id: Vec<u8>,
    /// The receiver's number, so the sender's other devices can show where it went.
    #[prost(string, tag = "5")]
    pub to: String,
    /// The sending device's contact token: whoever gets this message can attach it to what they
    /// send back (`Send::receiver_contact_token`) and count as a contact.
    #[prost(bytes = "vec", tag = "40")]
    pub sender_contact_token: Vec<u8>,
    /// The sending device's presence token for the receiving device (a copy each): with it the
    /// receiving device may ask whether the sending device is online, however it shows itself.
    #[prost(bytes = "vec", tag = "41")]
    pub sender_presence_token: Vec<u8>,
}

/// What a copy's payload holds: one Olm message. The server never decodes it.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct Envelope {
    /// Olm message type: 0 pre-key (opens a session), 1 normal.
    #[prost(uint32, tag = "1")]
    pub olm_type: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("olm_type", &self.olm_type)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("sent_at_ms", &self.sent_at_ms)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind survives encoding and decoding. A tag missing from `Frame`'s oneof list would
    /// be skipped on decode, silently; this catches it.
    #[test]
    fn every_kind_round_trips() {
        let id = vec![7u8; 16];
        let kinds = vec![
            Kind::Login(Login {
                device_id: id.clone(),
                signature: vec![1; 64],
                listen: true,
            }),
            Kind::Ping(Ping { nonce: 1 }),
            Kind::Send(Send {
                id: id.clone(),
                to_account: vec![5; 32],
                mode: 1,
                ttl_seconds: 2,
                payload: Bytes::from_static(b"p"),
                ..Default::default()
            }),
            Kind::Ack(Ack {
                sender_device: id.clone(),
                id: id.clone(),
                discard: true,
                no_receipt: true,
            }),
            Kind::PresenceSet(PresenceSet {
                request_id: 1,
                mode: PresenceMode::Everyone as i32,
                key: vec![3; 32],
            }),
            Kind::PresenceSetResult(PresenceSetResult { request_id: 1 }),
            Kind::ReceiptAck(ReceiptAck { id: id.clone() }),
            Kind::Settled(Settled {
                ids: vec![id.clone()],
            }),
            Kind::Lookup(Lookup {
                request_id: 1,
                accounts: vec![vec![5; 32]],
                proofs: vec![PresenceProof {
                    account: vec![1; 32],
                    device_id: id.clone(),
                    mac: vec![2; 32],
                }],
                ..Default::default()
            }),
            Kind::Devices(DevicesRequest {
                request_id: 1,
                account: vec![5; 32],
                sender_device: vec![7; 16],
                ..Default::default()
            }),
            Kind::Disable(Disable { request_id: 1 }),
            Kind::Withdraw(Withdraw { id: id.clone() }),
            Kind::LoginResult(LoginResult {
                server_time_ms: 1,
                heartbeat_seconds: 10,
                ..Default::default()
            }),
            Kind::Pong(Pong { nonce: 1 }),
            Kind::SendResult(SendResult {
                id: id.clone(),
                outcome: 1,
                detail: "d".into(),
                ttl_seconds: 259_200,
                settled: true,
                ..Default::default()
            }),
            Kind::Deliver(Deliver {
                sender_device: id.clone(),
                id: id.clone(),
                sent_at_ms: 1,
                payload: Bytes::from_static(b"p"),
            }),
            Kind::AckResult(AckResult {
                sender_device: id.clone(),
                id: id.clone(),
                status: 2,
            }),
            Kind::Receipt(Receipt {
                id: id.clone(),
                kind: 1,
            }),
            Kind::LookupResult(LookupResult {
                request_id: 1,
                entries: vec![LookupEntry {
                    account: vec![5; 32],
                    presence: 2,
                    ..Default::default()
                }],
            }),
            Kind::DeviceList(DeviceList {
                request_id: 1,
                device_ids: vec![id.clone()],
                ..Default::default()
            }),
            Kind::DisableResult(DisableResult { request_id: 1 }),
            Kind::SignedOut(SignedOut { reason: "r".into() }),
            Kind::Error(Error {
                code: 1,
                message: "m".into(),
                fatal: true,
                request_id: 3,
                retry_after_ms: 5,
            }),
            Kind::WithdrawResult(WithdrawResult {
                id,
                state: 3,
                retry_after_ms: 7,
            }),
            Kind::KeysUpload(Default::default()),
            Kind::KeysClaim(Default::default()),
            Kind::LinkCodeRequest(Default::default()),
            Kind::RemoveDevice(Default::default()),
            Kind::KeysUploadResult(Default::default()),
            Kind::KeysClaimResult(Default::default()),
            Kind::LinkCode(Default::default()),
            Kind::LinkCompleted(Default::default()),
            Kind::RemoveDeviceResult(Default::default()),
            Kind::Vouch(Default::default()),
            Kind::VouchResult(Default::default()),
            Kind::Evaluate(Evaluate {
                request_id: 4,
                blinded: vec![vec![1; 32]],
                sender_device: vec![7; 16],
                key_version: 1,
            }),
            Kind::EvaluateResult(EvaluateResult {
                request_id: 4,
                evaluated: vec![vec![2; 32]],
                proof: vec![3; 64],
                key_version: 1,
            }),
            Kind::Rekey(Rekey {
                request_id: 5,
                number: "+14155550100".into(),
            }),
            Kind::RekeyResult(RekeyResult {
                request_id: 5,
                account: vec![6; 32],
                key_version: 2,
            }),
        ];
        for kind in kinds {
            // Also the empty message of each kind: its tag alone must select it.
            let frame = Frame::from(kind);
            let decoded =
                <Frame as prost::Message>::decode(prost::Message::encode_to_vec(&frame).as_slice())
                    .expect("decodes");
            assert_eq!(decoded, frame);
        }
    }
}
