//! Where Tidings keeps what must survive a restart, behind one narrow trait.
//!
//! # Layout
//! - this file: [`Store`], the only way the server reaches stored data, and its value types:
//!   what a write's answer promises ([`Durability`], [`Completion`]), the queue position a
//!   reader pages with ([`QueueCursor`]), and what a sync reports ([`SyncReport`]);
//! - [`sqlite`]: the embedded engine (one file, group commit, secure deletion);
//! - [`postgres`]: the engine over a PostgreSQL database (transactions with row locks, for
//!   several nodes over one database);
//! - [`memory`]: the reference model of the contract, plain maps in memory, for tests.
//!
//! The rules of what a message may be stored with are not here but in `tidings_core::delivery`,
//! so that every engine applies the same ones. Nothing above [`Store`] may assume that the store lives in this process or that every account
//! fits in memory.
//!
//! What is stored, and nothing more: account pseudonyms (never numbers), device ids and public
//! keys (login key, Olm identity keys, unclaimed one-time keys and a fallback key), undelivered
//! message copies (opaque ciphertexts, one per device), pending receipts (message ids), and
//! verification-code records keyed by pseudonym. No lookup, no contact list, no delivered message.
//! This crate never logs a pseudonym, key or payload.

use std::future::Future;

use bytes::Bytes;
pub use tidings_core::delivery::DeviceDifference;
use tidings_core::delivery::{self, AccountDevice, Addressees, CopyCheck, Room};
pub use tidings_core::delivery::{QueueLimits, Usage};
use tidings_core::fallback::Withdrawal;
use tidings_core::verification::CodeRecord;
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

pub mod memory;
pub mod postgres;
pub mod sqlite;

/// A number's pseudonym: the VOPRF output under the server's key, truncated to 32 bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pseudonym(pub [u8; 32]);

impl std::fmt::Debug for Pseudonym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonym(<redacted>)")
    }
}

/// An account's internal id. Never leaves the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccountId(pub i64);

/// The device an operation that changes an account is done for, with that device's account.
/// The engine checks, in the operation's own transaction, that the device is still one of the
/// account's and answers [`StoreError::Revoked`] otherwise: a request that was already running
/// when its device was removed (or its account disabled) cannot act once that has committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Actor {
    pub account: AccountId,
    pub device: DeviceId,
}

/// What moving an account to another OPRF key did ([`Store::rekey_account`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rekeyed {
    /// The account's pseudonym is now the new one; the old one is kept as its previous
    /// pseudonym (it still names the account until [`Store::forget_previous_pseudonyms`]).
    Moved,
    /// The account had the new pseudonym already: nothing changed but its recorded version.
    AlreadyMoved,
    /// The account's pseudonym is neither: nothing changed.
    NotItsPseudonym,
}

/// A registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub id: DeviceId,
    pub account: AccountId,
    /// The account's pseudonym: what the server keys an account's budgets by, so that they
    /// outlive an opt-out and a new registration of the number.
    pub pseudonym: Pseudonym,
    pub public_key: [u8; 32],
}

/// An account's devices, as routing needs them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDevices {
    pub account: AccountId,
    /// Each device and how many message copies wait in its queue.
    pub devices: Vec<(DeviceId, u32)>,
}

/// An account's devices, as a send routes on them: no queue lengths (the write that stores a
/// message checks those), so that an engine can answer from memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub account: AccountId,
    pub devices: Vec<DeviceId>,
}

/// The result of binding a device to a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub account: AccountId,
    /// Devices of the same account that were deleted (a replaced phone).
    pub removed: Vec<DeviceId>,
}

/// A device's public Olm identity keys. They never change for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdentityKeys {
    /// Curve25519 identity key.
    pub identity_key: [u8; 32],
    /// Ed25519 signing key.
    pub signing_key: [u8; 32],
}

/// A device of the same account that vouched for a device (it approved its link), with its
/// signature over the device's id and identity keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Voucher {
    pub by: DeviceId,
    pub signature: [u8; 64],
}

/// A device's published keys, as the directory lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListedDevice {
    pub id: DeviceId,
    /// `None` until the device publishes its identity keys.
    pub identity: Option<IdentityKeys>,
    pub voucher: Option<Voucher>,
}

/// A published one-time or fallback key with its owner's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedKey {
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

/// What publishing keys did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Stored; the device now has this many unclaimed one-time keys.
    Stored { one_time_keys: u32 },
    /// The device already published different identity keys; nothing was stored.
    IdentityMismatch,
    /// Storing these would leave more unclaimed one-time keys than allowed; nothing was stored.
    TooMany,
}

/// Whether a device has anything waiting, as a session checks when it starts, and whether it is
/// still registered at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backlog {
    /// The device still exists: false when it was removed after its login read it (the session
    /// that registered in between is then signed out).
    pub registered: bool,
    /// Copies are queued for it.
    pub queued: bool,
    /// Receipts are waiting for it.
    pub receipts: bool,
    /// Messages from its own account's other devices that were not kept for it (its queue had
    /// no room) and that it has not yet been told of.
    pub missed: u32,
}

/// A device's key supply, as a login reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyStatus {
    pub one_time_keys: u32,
    /// Identity keys and a fallback key are published.
    pub published: bool,
}

/// One device's key, handed out by a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimedKey {
    pub device: DeviceId,
    pub identity: IdentityKeys,
    pub key: SignedKey,
    /// No one-time key was left: this is the device's fallback key.
    pub fallback: bool,
    pub voucher: Option<Voucher>,
}

/// What a claim did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Claimed {
    /// One key per device that has published keys (a one-time key is deleted as it is handed out).
    pub keys: Vec<ClaimedKey>,
    /// Requested devices that are not devices of the account.
    pub unknown: Vec<DeviceId>,
}

/// What linking a device to an account did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linked {
    Added,
    /// The account already has the most devices allowed; nothing was stored.
    TooManyDevices,
}

/// A message to store: one copy (ciphertext) per device. The copies must name exactly the
/// receiver's devices that have published keys and the sender's other such devices (rule E1,
/// [`tidings_core::delivery::check_copies`]).
#[derive(Clone)]
pub struct NewMessage {
    pub sender_device: DeviceId,
    pub sender_account: AccountId,
    pub id: MessageId,
    pub receiver: AccountId,
    pub sent_at: Millis,
    pub expires_at: Millis,
    pub copies: Vec<(DeviceId, Bytes)>,
    /// Devices that must get a copy but whose copy is decided already (it was pushed, held, and
    /// acknowledged): the copy check counts them as addressed, and nothing is stored for them.
    /// Empty but when the server stores a held message's undecided copies.
    pub decided: Vec<DeviceId>,
    /// SHA-256 of the contact token the send presented for the receiver, if any: checked against
    /// the receiver's devices in the write that stores the copies, and never stored.
    pub contact_token_hash: Option<[u8; 32]>,
}

/// How long a message's decision record outlives the message's TTL: a sending client that was
/// offline when its message was settled sends it again once it is back, and the record then
/// still answers for the copies already decided.
pub const DECISION_MARGIN: Millis = tidings_core::DAY;

/// A held copy's acknowledgement, as the server names it to [`Store::ack_held`]: the copy was
/// pushed to a live session of `device`, one of the receiver's devices, and never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldAck {
    pub device: DeviceId,
    pub sender_device: DeviceId,
    pub id: MessageId,
    pub sent_at: Millis,
    /// When the message's TTL ends.
    pub expires_at: Millis,
}

/// What the delivery rules decided for a message, in the trait's answers.
pub(crate) enum Admission {
    /// Store a copy for each of these devices; the message's copies for the sender's own devices
    /// named second are not stored (their queues had no room), and the answer names them.
    Admitted(Admitted),
    /// Store nothing and answer this.
    Refused(Enqueued),
}

/// A message the delivery rules let in, and how to store it.
pub(crate) struct Admitted {
    pub(crate) addressees: Addressees,
    /// The sender's own devices whose copies are not stored (their queues had no room).
    pub(crate) skipped: Vec<DeviceId>,
    /// The sender is not a contact of the receiver: its copies count in the stranger pools.
    pub(crate) stranger: bool,
    /// When the message is deleted if undelivered: a stranger's at most
    /// [`delivery::STRANGER_TTL`] after it was sent.
    pub(crate) expires_at: Millis,
}

impl NewMessage {
    /// Applies the delivery rules (`tidings_core::delivery`: E1, then room in the queues, the
    /// sender's own devices without room skipped) to this
    /// message against the devices an engine read in the write that is to store it: `receiver`
    /// the receiving account's, `own` the sending account's (empty when they are one account),
    /// each with what the sending account has waiting in its queue, and `sender_bytes` what the
    /// sending account has waiting across every queue. Fails with [`StoreError::NoSuchAccount`]
    /// when the receiver has no device to get a copy.
    pub(crate) fn admit(
        &self,
        receiver: &[AccountDevice],
        own: &[AccountDevice],
        sender_bytes: u64,
        limits: QueueLimits,
    ) -> Result<Admission> {
        let addressed: Vec<DeviceId> = self
            .copies
            .iter()
            .map(|(d, _)| *d)
            .chain(self.decided.iter().copied())
            .collect();
        let addressees = match delivery::check_copies(self.sender_device, receiver, own, &addressed)
        {
            CopyCheck::Complete(addressees) => addressees,
            CopyCheck::DevicesChanged(difference) => {
                return Ok(Admission::Refused(Enqueued::DevicesChanged(difference)))
            }
            CopyCheck::NoReceiverDevice => return Err(StoreError::NoSuchAccount),
        };
        let mut addressees = addressees;
        // A decided copy is stored nowhere: its device's queue is not looked at.
        addressees
            .receiver
            .retain(|d| !self.decided.contains(&d.id));
        addressees.own.retain(|d| !self.decided.contains(&d.id));
        let skipped = delivery::own_without_room(
            addressees.own.iter().map(|d| (d, self.copy_bytes(d.id))),
            limits,
        );
        addressees.own.retain(|d| !skipped.contains(&d.id));
        let copies = addressees
            .devices()
            .map(|device| (device, self.copy_bytes(device.id)));
        match delivery::room_for(copies, sender_bytes, limits) {
            Room::Fits => {}
            Room::QueueFull => return Ok(Admission::Refused(Enqueued::QueueFull)),
            Room::OverQuota => return Ok(Admission::Refused(Enqueued::OverQuota)),
        }
        let within_account = self.sender_account == self.receiver;
        let stranger = !delivery::from_contact(within_account, self.contact_token_hash, receiver);
        if stranger && !delivery::stranger_pool_has_room(&addressees.receiver, limits) {
            return Ok(Admission::Refused(Enqueued::StrangerPoolFull));
        }
        let expires_at = if stranger {
            delivery::stranger_expires_at(self.sent_at, self.expires_at)
        } else {
            self.expires_at
        };
        Ok(Admission::Admitted(Admitted {
            addressees,
            skipped,
            stranger,
            expires_at,
        }))
    }

    /// [`Store::screen`]'s decision on the devices an engine read (`receiver` the receiving
    /// account's, `own` the sending account's, empty when they are one account), once it found
    /// the message neither stored nor decided withdrawn: every copy names a different device, the
    /// copies (with [`NewMessage::decided`]) name exactly the devices that must get one, and the
    /// sender is a contact of the receiver.
    pub(crate) fn screens(&self, receiver: &[AccountDevice], own: &[AccountDevice]) -> bool {
        let mut addressed: Vec<DeviceId> = Vec::with_capacity(self.copies.len());
        for (device, _) in &self.copies {
            if addressed.contains(device) {
                // Refused by the write that would store it.
                return false;
            }
            addressed.push(*device);
        }
        addressed.extend(self.decided.iter().copied());
        let within_account = self.sender_account == self.receiver;
        matches!(
            delivery::check_copies(self.sender_device, receiver, own, &addressed),
            CopyCheck::Complete(_)
        ) && delivery::from_contact(within_account, self.contact_token_hash, receiver)
    }

    /// The size of the copy for `device`, as queues count it (0 if there is none).
    pub fn copy_bytes(&self, device: DeviceId) -> u64 {
        self.copies
            .iter()
            .find(|(d, _)| *d == device)
            .map_or(0, |(_, payload)| payload.len() as u64)
    }
}

impl Admission {
    /// What to answer once the admitted copies are stored, but for `skipped`, kept until
    /// `expires_at` (a stranger's, sooner than the `asked`).
    pub(crate) fn stored(skipped: Vec<DeviceId>, asked: Millis, expires_at: Millis) -> Enqueued {
        if expires_at < asked {
            Enqueued::StoredShortened {
                skipped,
                expires_at,
            }
        } else if skipped.is_empty() {
            Enqueued::Stored
        } else {
            Enqueued::StoredSkipping(skipped)
        }
    }
}

impl std::fmt::Debug for NewMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewMessage")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What storing a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    /// Stored and synced.
    Stored,
    /// Stored and synced, except the copies for these of the sender's own other devices: their
    /// queues had no room (see `tidings_core::delivery::own_without_room`). Each such device
    /// counts one more missed message ([`Backlog::missed`]).
    StoredSkipping(Vec<DeviceId>),
    /// Stored and synced (but for the copies `skipped`, as in [`Enqueued::StoredSkipping`]), to be
    /// kept only until `expires_at`, sooner than the message asked: its sender is a stranger of
    /// the receiver (`tidings_core::delivery::stranger_expires_at`).
    StoredShortened {
        skipped: Vec<DeviceId>,
        expires_at: Millis,
    },
    /// This sender device already has a message with this id held; nothing new was stored.
    Duplicate,
    /// A receiver device's queue is at its limit, or the sending account's share of it is;
    /// nothing was stored.
    QueueFull,
    /// The sending account's storage quota across every queue would be passed; nothing was
    /// stored.
    OverQuota,
    /// The sender presented no contact token of the receiver, and a receiver device's stranger
    /// pool is full; nothing was stored.
    StrangerPoolFull,
    /// The copies do not match the devices that must get one; nothing was stored.
    DevicesChanged(DeviceDifference),
}

/// A position in a device's queue, for paging through it with [`Store::pending`]. Opaque: only
/// the engine that handed it out knows what it stands for; positions of one device's queue are
/// ordered as its copies are (oldest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueCursor(i64);

impl QueueCursor {
    /// Before the first copy of any queue.
    pub const START: QueueCursor = QueueCursor(0);

    /// The cursor at an engine's position (made only by engines).
    pub(crate) fn at(position: i64) -> Self {
        Self(position)
    }

    /// The engine's position this cursor stands for.
    pub(crate) fn position(self) -> i64 {
        self.0
    }
}

/// One copy waiting for a device.
#[derive(Clone)]
pub struct Pending {
    /// Its position in the device's queue: the next page starts after it.
    pub cursor: QueueCursor,
    pub sender_device: DeviceId,
    pub id: MessageId,
    pub sent_at: Millis,
    pub payload: Bytes,
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("cursor", &self.cursor)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// What acknowledging a copy did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acked {
    /// No such copy for this device (a replay, or already deleted).
    Unknown,
    /// The copy is deleted. `first` is true for the message's first acknowledgement; a
    /// `Delivered` receipt for the sender device was stored in the same transaction.
    Confirmed { first: bool },
    /// The sender withdrew the message; the device must not show it.
    Withdrawn,
}

/// How a device settles a copy it was delivered (promise P7: no receipt reveals a device to a
/// sender it does not show itself to; the device decides, the server keeps no list).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckKind {
    /// Shown: the copy is deleted, and the message's first such acknowledgement by a receiver
    /// device stores the sender's `Delivered` receipt.
    #[default]
    Shown,
    /// Shown, without a receipt: the copy is deleted and the message counts as delivered (a
    /// withdraw answers delivered, no `Expired` receipt comes), but no receipt is stored.
    ShownWithoutReceipt,
    /// Not shown (it could not be decrypted, or its sender is not who it claims): the copy is
    /// set aside, never handed out again, and otherwise kept as if its device had never come
    /// for it until the message's TTL ends, so that its sender sees what it would see for a
    /// device that is offline (a withdraw answers withdrawn, the TTL's end an `Expired`
    /// receipt).
    Discarded,
}

/// A receipt waiting for a sending device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingReceipt {
    pub id: MessageId,
    pub kind: ReceiptKind,
}

/// A receipt produced by expiry, addressed to the device that sent the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiredMessage {
    pub sender_device: DeviceId,
    pub id: MessageId,
}

/// What a storage sync covered, for tests and audits of durability (no content, no keys). An
/// engine reports each point at which writes became durable (a commit with its sync).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncReport {
    /// Counts syncs since the store opened.
    pub seq: u64,
    /// Operations committed by this sync.
    pub operations: usize,
    /// Ids of the messages this sync made durable.
    pub messages: Vec<(DeviceId, MessageId)>,
}

/// Called after every sync with what it covered, before any write in it is answered as durable.
/// Used by tests, metrics and audits of durability; it must not block for long (an engine may
/// call it from its writer).
pub type SyncObserver = std::sync::Arc<dyn Fn(&SyncReport) + Send + Sync>;

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (its own error is the source); the operation may be tried again.
    #[error("storage engine failed: {0}")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("storage is closed")]
    Closed,
    #[error("no such account")]
    NoSuchAccount,
    /// The device an operation was done for ([`Actor`]) is no longer one of its account's.
    #[error("the device is no longer registered")]
    Revoked,
}

impl StoreError {
    /// An engine failure described in words (no source of its own).
    pub(crate) fn engine(message: impl Into<String>) -> Self {
        StoreError::Engine(message.into().into())
    }
}

/// Shorthand for storage results.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// How far a write has come when it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// It has executed and is visible to later operations, but a crash may still lose it. An
    /// engine without such a point answers only once the write is durable.
    Executed,
    /// It is durable: a crash of the server no longer loses it.
    Durable,
}

/// The outcome of a write handed to the engine, which comes later: once the write has executed
/// ([`Completion::executed`], [`Durability::Executed`]) and once it is durable
/// ([`Completion::durable`], [`Durability::Durable`]). Made only by engines; an engine without a
/// separate executed point answers both at once, when the write is durable.
#[derive(Debug)]
pub struct Completion<T> {
    executed: Early<T>,
    durable: Final<T>,
}

/// The early answer of a [`Completion`].
#[derive(Debug)]
enum Early<T> {
    /// The engine answers once the write has executed.
    Coming(tokio::sync::oneshot::Receiver<T>),
    /// The engine has no separate executed point: the early answer is the durable one.
    WithDurable,
    /// Given already.
    Taken,
}

/// The durable answer of a [`Completion`].
#[derive(Debug)]
enum Final<T> {
    Coming(tokio::sync::oneshot::Receiver<Result<T>>),
    Known(Result<T>),
}

impl<T> Completion<T> {
    /// A write answered once durable through `durable`, and once executed through `executed`
    /// if the engine has that point.
    pub(crate) fn pending(
        executed: Option<tokio::sync::oneshot::Receiver<T>>,
        durable: tokio::sync::oneshot::Receiver<Result<T>>,
    ) -> Self {
        Self {
            executed: executed.map_or(Early::WithDurable, Early::Coming),
            durable: Final::Coming(durable),
        }
    }

    /// A write that is durable already, with this outcome.
    pub(crate) fn done(outcome: Result<T>) -> Self {
        Self {
            executed: Early::WithDurable,
            durable: Final::Known(outcome),
        }
    }

    /// Waits until the write is durable (or has failed); the outcome as committed.
    pub async fn durable(self) -> Result<T> {
        match self.durable {
            Final::Known(outcome) => outcome,
            Final::Coming(answer) => answer.await.map_err(|_| StoreError::Closed)?,
        }
    }
}

impl<T: Clone> Completion<T> {
    /// The outcome once the write has executed, possibly before it is durable (and lost if the
    /// server stops before that); a caller may act on it where acting on a lost write is safe.
    /// `None` if the write failed (then [`Completion::durable`] says why) or this was asked
    /// before.
    pub async fn executed(&mut self) -> Option<T> {
        match std::mem::replace(&mut self.executed, Early::Taken) {
            Early::Taken => None,
            Early::Coming(answer) => answer.await.ok(),
            Early::WithDurable => {
                if let Final::Coming(answer) = &mut self.durable {
                    let outcome = answer.await.unwrap_or(Err(StoreError::Closed));
                    self.durable = Final::Known(outcome);
                }
                match &self.durable {
                    Final::Known(Ok(value)) => Some(value.clone()),
                    _ => None,
                }
            }
        }
    }
}

/// Everything the server stores, as operations of the domain.
///
/// Durability: every write is answered only once it is durable ([`Durability::Durable`]), except
/// where its documentation says otherwise ([`Store::ack_receipt`]) or it hands back a
/// [`Completion`], which says itself how far the write has come.
///
/// Order: writes submitted by one sending device are stored in the order they were submitted
/// ([`Store::enqueue_submit`]); writes of different devices may be stored in any order. A read
/// sees every write whose answer has come (for a [`Completion`], its durable one).
pub trait Store: Send + Sync + 'static {
    /// The device with this id, if it is registered.
    fn device(&self, id: DeviceId) -> impl Future<Output = Result<Option<Device>>> + Send;

    /// [`Store::device`] and [`Store::key_status`] in one read, as a login needs them.
    fn login_device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<(Device, KeyStatus)>>> + Send;

    /// [`Store::login_device`] and [`Store::backlog`] in one read, as a resumed connect needs
    /// them: its session is registered before the read, so that nothing stored after the read
    /// can miss it, and the read checks that the device still exists. `None`: it does not.
    fn resume_device(
        &self,
        id: DeviceId,
    ) -> impl Future<Output = Result<Option<(Device, KeyStatus, Backlog)>>> + Send {
        async move {
            let Some((device, keys)) = self.login_device(id).await? else {
                return Ok(None);
            };
            let backlog = self.backlog(id).await?;
            Ok(backlog.registered.then_some((device, keys, backlog)))
        }
    }

    /// The account behind a pseudonym and its devices.
    fn account(
        &self,
        pseudonym: Pseudonym,
    ) -> impl Future<Output = Result<Option<AccountDevices>>> + Send;

    /// The account behind a pseudonym and its devices, as a send needs them. Engines may answer
    /// from memory; an answer never lags a device change that has been answered.
    fn route(&self, pseudonym: Pseudonym) -> impl Future<Output = Result<Option<Route>>> + Send;

    /// [`Store::account`] for many pseudonyms in one read, answers in the same order.
    fn accounts(
        &self,
        pseudonyms: Vec<Pseudonym>,
    ) -> impl Future<Output = Result<Vec<Option<AccountDevices>>>> + Send;

    /// The devices of an account.
    fn devices_of(&self, account: AccountId) -> impl Future<Output = Result<Vec<DeviceId>>> + Send;

    /// Binds a new device to the number's account (creating it, its pseudonym under the OPRF key
    /// of `key_version`), deleting every other device of that account with its queue and
    /// receipts. A created account's id was never handed out before, even to an account since
    /// deleted.
    fn register_device(
        &self,
        pseudonym: Pseudonym,
        key_version: u32,
        device: DeviceId,
        public_key: [u8; 32],
        now: Millis,
    ) -> impl Future<Output = Result<Registered>> + Send;

    /// Adds a device to the account of `approver` (the device that asked for the link code),
    /// keeping the others, unless the account already has `max_devices`.
    fn add_device(
        &self,
        approver: Actor,
        device: DeviceId,
        public_key: [u8; 32],
        identity: IdentityKeys,
        max_devices: usize,
        now: Millis,
    ) -> impl Future<Output = Result<Linked>> + Send;

    /// Removes one device of the actor's account (the actor itself included) with its keys, queue
    /// and receipts. False if the device is not one of the account's.
    fn remove_device(
        &self,
        actor: Actor,
        device: DeviceId,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Publishes a device's identity keys (stored once, never changed), one-time keys and
    /// fallback key (replacing the previous one). The device is the actor: gone, it is
    /// [`StoreError::Revoked`].
    fn publish_keys(
        &self,
        device: DeviceId,
        identity: IdentityKeys,
        one_time_keys: Vec<SignedKey>,
        fallback: Option<SignedKey>,
        max_stored: u32,
    ) -> impl Future<Output = Result<Published>> + Send;

    /// Registers the SHA-256 of a device's contact token (replacing the one it had): a send that
    /// presents the token counts as a contact's of the device's account. The device is the
    /// actor: gone, it is [`StoreError::Revoked`].
    fn set_contact_token(
        &self,
        device: DeviceId,
        hash: [u8; 32],
    ) -> impl Future<Output = Result<()>> + Send;

    /// How many one-time keys a device has left, and whether its keys are published.
    fn key_status(&self, device: DeviceId) -> impl Future<Output = Result<KeyStatus>> + Send;

    /// Hands out one key per device of the account (or of `only`, if not empty): a one-time key,
    /// deleted as it is handed out, or the fallback key when none is left. If `only` names a
    /// device that is not the account's, nothing is handed out and `unknown` names it. The
    /// claimer is the actor.
    fn claim_keys(
        &self,
        claimer: Actor,
        account: AccountId,
        only: Vec<DeviceId>,
    ) -> impl Future<Output = Result<Claimed>> + Send;

    /// The account's devices with their identity keys and vouchers.
    fn device_keys(
        &self,
        account: AccountId,
    ) -> impl Future<Output = Result<Vec<ListedDevice>>> + Send;

    /// Records that another device of the account vouched for `device` (first voucher only).
    /// False if `device` is not the account's or already has a voucher. The voucher's device is
    /// the actor: no longer the account's, it is [`StoreError::Revoked`].
    fn set_voucher(
        &self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes the actor's account with everything that belongs to it; returns its devices.
    fn delete_account(&self, actor: Actor) -> impl Future<Output = Result<Vec<DeviceId>>> + Send;

    /// Reads and rewrites a number's code record atomically. `update` gets the current record
    /// (empty if none) and returns a value; the record it leaves is stored (deleted if `None`).
    fn update_code_record<R, F>(
        &self,
        pseudonym: Pseudonym,
        update: F,
    ) -> impl Future<Output = Result<R>> + Send
    where
        R: Send + 'static,
        F: FnOnce(&mut Option<CodeRecord>) -> R + Send + 'static;

    /// Stores a message with its copies, refusing if they do not match the devices that must get
    /// one or if a queue, or the sending account's share of one or its quota, would pass
    /// `limits` (a bare number bounds each device's queue only). A message stored already, or
    /// decided withdrawn, is [`Enqueued::Duplicate`]: a resend never brings back over IP what was
    /// sent as SMS. Engines count what each sending
    /// account has waiting per device and in all; a copy counts as its payload's bytes.
    fn enqueue(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> impl Future<Output = Result<Enqueued>> + Send;

    /// [`Store::enqueue`] in two steps: resolves once the message's place is taken, and hands
    /// back its [`Completion`]. Messages of one sending device submitted one after the other
    /// (each submitted once the previous one resolved) are stored in that order, whatever their
    /// outcomes: a sender's pipelined messages keep their order in the receiver's queue, which
    /// its Olm ratchet needs, while each waits for its own sync.
    fn enqueue_submit(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> impl Future<Output = Result<Completion<Enqueued>>> + Send;

    /// Copies waiting for a device, oldest first, after the cursor `after` (a copy's
    /// [`Pending::cursor`], or [`QueueCursor::START`]), not expired at `now`.
    fn pending(
        &self,
        device: DeviceId,
        after: QueueCursor,
        limit: usize,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<Pending>>> + Send;

    /// Deletes a device's copy on its acknowledgement that it showed the message
    /// ([`AckKind::Shown`]).
    fn ack(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
    ) -> impl Future<Output = Result<Acked>> + Send {
        self.ack_as(device, sender_device, id, AckKind::Shown)
    }

    /// Settles a device's copy as `kind` says ([`AckKind`]). A copy set aside
    /// ([`AckKind::Discarded`]) is never handed out again, and acknowledging it again is
    /// [`Acked::Unknown`]. A receiver device's copy shown writes the message's `DELIVERED`
    /// decision record (kept until the message's TTL ends plus [`DECISION_MARGIN`]) in the same
    /// write, unless it has one. An acknowledgement of a copy no longer stored (its device acknowledged
    /// it before and never heard the answer) is answered from what is left: a `WITHDRAWN` record
    /// [`Acked::Withdrawn`]; a `DELIVERED` record, or the message still stored for other
    /// devices, `Confirmed { first: false }`; nothing, [`Acked::Unknown`] (the device must not
    /// show it).
    fn ack_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> impl Future<Output = Result<Acked>> + Send;

    /// [`Store::ack`], answered through a [`Completion`] also once it has executed, before it is
    /// durable: a `Delivered` receipt may go to the sender then, because the message itself is
    /// already durable (a crash before the sync delivers it again and the receipt with it;
    /// nothing is shown twice).
    fn ack_staged(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
    ) -> impl Future<Output = Result<Completion<Acked>>> + Send {
        self.ack_staged_as(device, sender_device, id, AckKind::Shown)
    }

    /// [`Store::ack_as`] through a [`Completion`], as [`Store::ack_staged`].
    fn ack_staged_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> impl Future<Output = Result<Completion<Acked>>> + Send;

    /// Withdraws a message its sender no longer wants delivered over IP. Ends in exactly one
    /// state: delivered (an acknowledgement came first), withdrawn (every copy deleted, and later
    /// acknowledgements are told so until the message's TTL ends), or unknown.
    fn withdraw(
        &self,
        sender_device: DeviceId,
        id: MessageId,
    ) -> impl Future<Output = Result<Withdrawal>> + Send {
        self.withdraw_held(sender_device, id, None)
    }

    /// [`Store::withdraw`] of a message whose copies the server may hold in memory
    /// ([`Store::ack_held`]). Decided against the message's decision record in one write: a
    /// `DELIVERED` record (or a stored copy's acknowledgement) answers delivered. With
    /// `held_until` (the server holds copies of it, and the message's TTL ends then), a message
    /// with nothing stored and no record is decided withdrawn: its `WITHDRAWN` record is written,
    /// kept until `held_until` plus [`DECISION_MARGIN`], and every later acknowledgement of it,
    /// held or stored, is answered [`Acked::Withdrawn`].
    fn withdraw_held(
        &self,
        sender_device: DeviceId,
        id: MessageId,
        held_until: Option<Millis>,
    ) -> impl Future<Output = Result<Withdrawal>> + Send;

    /// Whether a message may be pushed to its devices' live sessions before anything is stored
    /// (deliver first), read without writing (an engine may answer from memory what it keeps up
    /// to date with every device, key and contact token change): its copies name exactly the
    /// devices that must get one (E1, with [`NewMessage::decided`]), and the sender is a contact
    /// of the receiver (a stranger's message takes the stored path, where the stranger pools
    /// apply). Whether the id was sent before is not looked at: a held copy's acknowledgement is
    /// decided against the message's record ([`Store::ack_held`]), so a message decided withdrawn
    /// is never shown, and one stored is shown once. Queue room is not looked at either: a held
    /// copy that must wait is stored then, under the limits of that moment. `false` also when the
    /// receiver has no device: [`Store::enqueue`] gives every refusal its answer.
    fn screen(&self, message: &NewMessage) -> impl Future<Output = Result<bool>> + Send;

    /// Decides a copy that was pushed to a live session of a receiver's device without being
    /// stored (a held copy), on that device's acknowledgement `kind` ([`AckKind::Shown`] or
    /// [`AckKind::ShownWithoutReceipt`]; a held copy to be discarded is stored first and then
    /// acknowledged as a stored one). In one write, against the message's decision record:
    /// `WITHDRAWN` answers [`Acked::Withdrawn`]; `DELIVERED` answers `Confirmed { first: false }`;
    /// none writes a `DELIVERED` record (kept until `copy.expires_at` plus [`DECISION_MARGIN`])
    /// and, for [`AckKind::Shown`], the sender's `Delivered` receipt, answering
    /// `Confirmed { first: true }` (`first: false` without a receipt). Answered through a
    /// [`Completion`] as [`Store::ack_staged`]: once executed (the receipt may go then) and once
    /// durable (only then may the device be told `CONFIRMED`).
    fn ack_held(
        &self,
        copy: HeldAck,
        kind: AckKind,
    ) -> impl Future<Output = Result<Completion<Acked>>> + Send;

    /// Deletes messages whose TTL ended at `now` (at most `limit`), storing `Expired` receipts for
    /// the ones not decided delivered, receipts whose wait ended at `now`
    /// (`tidings_core::delivery::receipt_expires_at`, decided when each is stored), and decision
    /// records whose time ended (after the messages they decide). Returns the new `Expired`
    /// receipts.
    fn expire(
        &self,
        now: Millis,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<ExpiredMessage>>> + Send;

    /// Whether a copy from `sender_device` waits for `device` (a point read: the check of a
    /// delivery's stamped sender is free only for the device that holds such a copy).
    fn holds_copy_from(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Whether copies or receipts wait for a device (a point read: a session that has nothing
    /// waiting starts no reader for either).
    fn backlog(&self, device: DeviceId) -> impl Future<Output = Result<Backlog>> + Send;

    /// Forgets `seen` of a device's missed messages ([`Backlog::missed`]) once it has shown them.
    fn clear_missed(&self, device: DeviceId, seen: u32) -> impl Future<Output = Result<()>> + Send;

    /// Receipts waiting for a sending device.
    fn receipts(
        &self,
        device: DeviceId,
    ) -> impl Future<Output = Result<Vec<PendingReceipt>>> + Send;

    /// Deletes a receipt once its device has taken it. Answered once executed
    /// ([`Durability::Executed`]), without waiting for a sync: a deletion lost in a crash only
    /// means the receipt is sent again.
    fn ack_receipt(
        &self,
        device: DeviceId,
        id: MessageId,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Moves an account to the OPRF key of `key_version`, in one transaction: if its pseudonym is
    /// still `old`, it becomes `new` and `old` is kept as its previous pseudonym (both name the
    /// account: every lookup by pseudonym matches either); if it is `new` already, only the
    /// version is recorded. [`StoreError::NoSuchAccount`] if the account is gone; an engine
    /// failure, with nothing changed, if `old` or `new` names another account.
    fn rekey_account(
        &self,
        account: AccountId,
        old: Pseudonym,
        new: Pseudonym,
        key_version: u32,
    ) -> impl Future<Output = Result<Rekeyed>> + Send;

    /// How many accounts have their pseudonym under each OPRF key version, by version.
    fn accounts_by_key_version(&self) -> impl Future<Output = Result<Vec<(u32, u64)>>> + Send;

    /// Forgets every account's previous pseudonym (run when the server starts without a previous
    /// OPRF key: nothing can evaluate under it any more). Returns how many were forgotten.
    fn forget_previous_pseudonyms(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes code records that no longer matter at `now`.
    fn prune_codes(&self, now: Millis) -> impl Future<Output = Result<usize>> + Send;

    /// Makes deleted bytes unreadable in the data files (the bound on deletion latency).
    fn scrub(&self) -> impl Future<Output = Result<()>> + Send;

    /// The queue positions of strangers' messages this store stored since the last call (each
    /// with its receiving account), for
    /// the stores of the other nodes over the same database ([`Store::strangers_elsewhere`]):
    /// which copies are strangers' is never written, so with several nodes each must be told to
    /// count them in the stranger pools. An engine one process owns has none to tell.
    fn new_strangers(&self) -> Vec<(i64, AccountId)> {
        Vec::new()
    }

    /// Counts the strangers' messages at these queue positions (each with its receiving
    /// account), stored by another node's store, in the stranger pools from now on.
    fn strangers_elsewhere(&self, positions: &[(i64, AccountId)]) {
        let _ = positions;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A completion whose engine has no separate executed point answers both at once; one
    /// with such a point answers each when it comes, and the early answer only once.
    #[tokio::test]
    async fn a_completion_answers_at_each_durability() {
        let mut done = Completion::done(Ok(7));
        assert_eq!(done.executed().await, Some(7));
        assert_eq!(done.executed().await, None, "answered once");
        assert_eq!(done.durable().await.ok(), Some(7));

        let (reply, answer) = tokio::sync::oneshot::channel();
        let mut at_durable = Completion::pending(None, answer);
        let _ = reply.send(Ok(8));
        assert_eq!(at_durable.executed().await, Some(8), "the durable answer");
        assert_eq!(at_durable.durable().await.ok(), Some(8));

        let (early_reply, early) = tokio::sync::oneshot::channel();
        let (reply, answer) = tokio::sync::oneshot::channel::<Result<u8>>();
        let mut staged = Completion::pending(Some(early), answer);
        let _ = early_reply.send(9);
        assert_eq!(
            staged.executed().await,
            Some(9),
            "before the durable answer"
        );
        drop(reply);
        assert!(matches!(staged.durable().await, Err(StoreError::Closed)));

        let (reply, answer) = tokio::sync::oneshot::channel::<Result<u8>>();
        let mut failed = Completion::pending(None, answer);
        let _ = reply.send(Err(StoreError::engine("disk full")));
        assert_eq!(
            failed.executed().await,
            None,
            "a failure has no early answer"
        );
        assert!(matches!(failed.durable().await, Err(StoreError::Engine(_))));
    }

    /// An engine's own error stays reachable as the source.
    #[test]
    fn an_engine_error_keeps_its_source() {
        let error = StoreError::engine("disk full");
        assert_eq!(error.to_string(), "storage engine failed: disk full");
        let source = std::error::Error::source(&error).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("disk full"));
    }
}
