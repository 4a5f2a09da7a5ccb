//! The in-memory engine: the reference model of the [`Store`] contract.
//!
//! Plain maps under one mutex, each operation a short function over them, written to be
//! obviously right rather than fast: queues are found by scanning every message. Every answer is
//! the one the SQLite engine gives, including its refusals (E1 and full queues through
//! `tidings_core::delivery`, duplicates, withdrawals and decision records, expiry receipts, key
//! claims, vouchers, and what a deleted device or account takes with it); the model test
//! (`crates/store/tests/model.rs`) holds every engine to it. Server unit tests use it as a store
//! that costs nothing to make.
//!
//! It must never be used where data has to survive the process: nothing is written anywhere.
//! Every write is durable at once, so a [`Completion`] it hands back is answered at once.
//! Account ids are its own (counted from 1), as another engine's are.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use tidings_core::delivery::{receipt_expires_at, AccountDevice, QueueLimits, Usage};
use tidings_core::fallback::Withdrawal;
use tidings_core::verification::{CodePolicy, CodeRecord};
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use crate::{
    AccountDevices, AccountId, AckKind, Acked, Actor, Admission, Admitted, Backlog, Claimed,
    ClaimedKey, Completion, Device, Enqueued, ExpiredMessage, HeldAck, IdentityKeys, KeyStatus,
    Linked, ListedDevice, NewMessage, Pending, PendingReceipt, Pseudonym, Published, QueueCursor,
    Registered, Rekeyed, Result, Route, SignedKey, Store, StoreError, Voucher, DECISION_MARGIN,
};

/// Receipts one call of [`Store::receipts`] hands out at most (as the SQLite engine does).
const RECEIPTS_PER_READ: usize = 1000;

/// The in-memory engine. Cheap to make; each one is a store of its own.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the contents: they hold keys and message payloads.
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

/// Everything stored.
#[derive(Default)]
struct State {
    /// The last account id handed out: ids are never handed out again (the contract).
    last_account: i64,
    accounts: HashMap<AccountId, Account>,
    devices: HashMap<DeviceId, DeviceRow>,
    /// The last queue position handed out; every message takes the next one.
    last_position: i64,
    /// Messages still held, by queue position (so in the order they were stored).
    messages: BTreeMap<i64, Message>,
    /// Messages' decision records, by sending device and id (never a receiver device): withdrawn,
    /// or delivered (a receiver device showed a copy, stored or held). Each lives until the
    /// message's TTL ends plus [`DECISION_MARGIN`].
    withdrawn: HashMap<(DeviceId, MessageId), Decision>,
    /// Receipts waiting for sending devices, by device and message id, with when they end
    /// ([`receipt_expires_at`]).
    receipts: BTreeMap<(DeviceId, MessageId), (ReceiptKind, Millis)>,
    codes: HashMap<Pseudonym, CodeRecord>,
}

/// A decision record: when it ends (the message's TTL plus [`DECISION_MARGIN`]), and whether the
/// message was delivered (else withdrawn).
#[derive(Clone, Copy)]
struct Decision {
    ends: Millis,
    delivered: bool,
}

struct Account {
    pseudonym: Pseudonym,
    /// The version of the OPRF key `pseudonym` is under.
    key_version: u32,
    /// Its pseudonym under the previous key, once it moved ([`Store::rekey_account`]).
    previous: Option<Pseudonym>,
    /// Its devices, in the order they were added.
    devices: Vec<DeviceId>,
}

struct DeviceRow {
    account: AccountId,
    public_key: [u8; 32],
    identity: Option<IdentityKeys>,
    voucher: Option<Voucher>,
    /// Unclaimed one-time keys, by public key (a claim hands out the lowest first).
    one_time_keys: BTreeMap<[u8; 32], [u8; 64]>,
    fallback: Option<SignedKey>,
    /// Own messages not kept for it ([`Backlog::missed`]).
    missed: u32,
    /// SHA-256 of its contact token, once registered.
    contact_token_hash: Option<[u8; 32]>,
}

struct Message {
    sender_device: DeviceId,
    /// The sending device's account when it was stored: what it has waiting counts against it.
    sender_account: AccountId,
    id: MessageId,
    receiver: AccountId,
    sent_at: Millis,
    expires_at: Millis,
    /// A receiver device has acknowledged it.
    delivered: bool,
    /// Each device's copy, and whether it goes to the receiver (not the sender's own device).
    copies: BTreeMap<DeviceId, (Bytes, bool)>,
    /// The devices among `copies` that set their copy aside ([`AckKind::Discarded`]): never
    /// handed out again, otherwise kept as if never fetched.
    discarded: std::collections::BTreeSet<DeviceId>,
    /// From a sender that presented no contact token of the receiver: its copies count in the
    /// stranger pools. Forgotten at a [`MemoryStore::restart`], as a persistent engine forgets
    /// it.
    stranger: bool,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// What a restart of an engine that keeps its data leaves: everything but which waiting
    /// copies are strangers', which an engine holds in memory only and never writes (it is a
    /// hint of who is whose contact); they count as contacts' from then on. The model test
    /// calls it where it opens the SQLite engine again.
    pub fn restart(&self) -> Result<()> {
        let mut state = self.state()?;
        for message in state.messages.values_mut() {
            message.stranger = false;
        }
        Ok(())
    }

    /// The stored state, for one operation. An operation that panicked part-way may have left
    /// it half-changed, so a poisoned lock is an engine failure.
    fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))
    }
}

impl State {
    /// Refuses an operation whose actor is no longer a device of its account ([`Actor`]).
    fn check_actor(&self, actor: Actor) -> Result<()> {
        match self.devices.get(&actor.device) {
            Some(row) if row.account == actor.account => Ok(()),
            _ => Err(StoreError::Revoked),
        }
    }

    fn device(&self, id: DeviceId) -> Option<Device> {
        let row = self.devices.get(&id)?;
        Some(Device {
            id,
            account: row.account,
            pseudonym: self.accounts.get(&row.account)?.pseudonym,
            public_key: row.public_key,
        })
    }

    /// Copies waiting for a device, expired or not.
    fn queue_length(&self, device: DeviceId) -> u64 {
        let copies = self.messages.values();
        copies.filter(|m| m.copies.contains_key(&device)).count() as u64
    }

    fn key_status(&self, device: DeviceId) -> KeyStatus {
        match self.devices.get(&device) {
            None => KeyStatus::default(),
            Some(row) => KeyStatus {
                one_time_keys: u32::try_from(row.one_time_keys.len()).unwrap_or(u32::MAX),
                published: row.identity.is_some() && row.fallback.is_some(),
            },
        }
    }

    /// The account a pseudonym names: its pseudonym, or its previous one. Every lookup of an
    /// account by pseudonym goes through here.
    fn account_of(&self, pseudonym: Pseudonym) -> Option<AccountId> {
        self.accounts
            .iter()
            .find(|(_, account)| {
                account.pseudonym == pseudonym || account.previous == Some(pseudonym)
            })
            .map(|(id, _)| *id)
    }

    fn rekey_account(
        &mut self,
        account: AccountId,
        old: Pseudonym,
        new: Pseudonym,
        key_version: u32,
    ) -> Result<Rekeyed> {
        let clash = self.accounts.iter().any(|(id, other)| {
            *id != account
                && [Some(other.pseudonym), other.previous]
                    .iter()
                    .any(|p| *p == Some(old) || *p == Some(new))
        });
        let row = self
            .accounts
            .get_mut(&account)
            .ok_or(StoreError::NoSuchAccount)?;
        if row.pseudonym == new {
            row.key_version = key_version;
            return Ok(Rekeyed::AlreadyMoved);
        }
        if row.pseudonym != old {
            return Ok(Rekeyed::NotItsPseudonym);
        }
        if clash {
            return Err(StoreError::engine("the pseudonym names another account"));
        }
        row.previous = Some(old);
        row.pseudonym = new;
        row.key_version = key_version;
        Ok(Rekeyed::Moved)
    }

    fn devices_of(&self, account: AccountId) -> Vec<DeviceId> {
        self.accounts
            .get(&account)
            .map(|account| account.devices.clone())
            .unwrap_or_default()
    }

    fn account_devices(&self, pseudonym: Pseudonym) -> Option<AccountDevices> {
        let account = self.account_of(pseudonym)?;
        let devices = self.devices_of(account).into_iter();
        Some(AccountDevices {
            account,
            devices: devices
                .map(|d| (d, u32::try_from(self.queue_length(d)).unwrap_or(u32::MAX)))
                .collect(),
        })
    }

    /// An account's devices as the delivery rules read them, with what `sender` has waiting in
    /// each one's queue.
    fn delivery_devices(&self, account: AccountId, sender: AccountId) -> Vec<AccountDevice> {
        self.devices_of(account)
            .into_iter()
            .map(|id| AccountDevice {
                id,
                keyed: self.devices.get(&id).is_some_and(|d| d.identity.is_some()),
                queued: self.queue_length(id),
                from_sender: self.usage(sender, Some(id)),
                strangers: self
                    .messages
                    .values()
                    // Only the receiver's copies of a stranger's message are in a pool.
                    .filter(|m| m.stranger && m.copies.get(&id).is_some_and(|(_, r)| *r))
                    .count() as u64,
                contact_token_hash: self.devices.get(&id).and_then(|d| d.contact_token_hash),
            })
            .collect()
    }

    /// What `sender` has waiting in `device`'s queue, or in every queue when `device` is `None`.
    fn usage(&self, sender: AccountId, device: Option<DeviceId>) -> Usage {
        self.messages
            .values()
            .filter(|m| m.sender_account == sender)
            .flat_map(|m| &m.copies)
            .filter(|(d, _)| device.is_none_or(|device| **d == device))
            .fold(Usage::default(), |usage, (_, (payload, _))| {
                usage.plus_copy(payload.len() as u64)
            })
    }

    fn listed(&self, id: DeviceId) -> Option<ListedDevice> {
        self.devices.get(&id).map(|row| ListedDevice {
            id,
            identity: row.identity,
            voucher: row.voucher,
        })
    }

    /// Deletes the messages `doomed` selects, with all their copies.
    fn delete_messages(&mut self, doomed: impl Fn(&Message) -> bool) {
        self.messages.retain(|_, message| !doomed(message));
    }

    /// Deletes a device with its copies (and each message left without a copy), its receipts
    /// and its keys.
    fn delete_device(&mut self, device: DeviceId) {
        self.messages.retain(|_, message| {
            message.discarded.remove(&device);
            let had_a_copy = message.copies.remove(&device).is_some();
            !(had_a_copy && message.copies.is_empty())
        });
        self.receipts.retain(|(d, _), _| *d != device);
        if let Some(row) = self.devices.remove(&device) {
            if let Some(account) = self.accounts.get_mut(&row.account) {
                account.devices.retain(|d| *d != device);
            }
        }
    }

    /// Stores a receipt for a sending device, if it still exists, until `expires_at`; true if
    /// it did.
    fn store_receipt(
        &mut self,
        device: DeviceId,
        id: MessageId,
        kind: ReceiptKind,
        expires_at: Millis,
    ) -> bool {
        if !self.devices.contains_key(&device) {
            return false;
        }
        self.receipts.insert((device, id), (kind, expires_at));
        true
    }

    fn message_position(&self, sender_device: DeviceId, id: MessageId) -> Option<i64> {
        self.messages
            .iter()
            .find(|(_, m)| m.sender_device == sender_device && m.id == id)
            .map(|(position, _)| *position)
    }

    fn register_device(
        &mut self,
        pseudonym: Pseudonym,
        key_version: u32,
        device: DeviceId,
        public_key: [u8; 32],
    ) -> Result<Registered> {
        let existing = self.account_of(pseudonym);
        if let Some(other) = self.devices.get(&device) {
            if Some(other.account) != existing {
                return Err(StoreError::engine("the device is another account's"));
            }
        }
        let account = match existing {
            Some(account) => account,
            None => {
                self.last_account += 1;
                let account = AccountId(self.last_account);
                let devices = Vec::new();
                let row = Account {
                    pseudonym,
                    key_version,
                    previous: None,
                    devices,
                };
                self.accounts.insert(account, row);
                account
            }
        };
        // Messages queued for the account go, with the copies the senders' other devices hold;
        // then the old devices with theirs.
        self.delete_messages(|m| m.receiver == account);
        let removed = self.devices_of(account);
        for old in &removed {
            self.delete_device(*old);
        }
        self.insert_device(account, device, public_key, None);
        Ok(Registered { account, removed })
    }

    fn insert_device(
        &mut self,
        account: AccountId,
        device: DeviceId,
        public_key: [u8; 32],
        identity: Option<IdentityKeys>,
    ) {
        let row = DeviceRow {
            account,
            public_key,
            identity,
            voucher: None,
            one_time_keys: BTreeMap::new(),
            fallback: None,
            missed: 0,
            contact_token_hash: None,
        };
        self.devices.insert(device, row);
        if let Some(account) = self.accounts.get_mut(&account) {
            account.devices.push(device);
        }
    }

    fn add_device(
        &mut self,
        (account, device, public_key): (AccountId, DeviceId, [u8; 32]),
        identity: IdentityKeys,
        max_devices: usize,
    ) -> Result<Linked> {
        let count = self.devices_of(account).len();
        if count == 0 {
            return Err(StoreError::NoSuchAccount);
        }
        if count >= max_devices {
            return Ok(Linked::TooManyDevices);
        }
        if self.devices.contains_key(&device) {
            return Err(StoreError::engine("the device exists already"));
        }
        self.insert_device(account, device, public_key, Some(identity));
        Ok(Linked::Added)
    }

    fn publish_keys(
        &mut self,
        device: DeviceId,
        identity: IdentityKeys,
        one_time_keys: Vec<SignedKey>,
        fallback: Option<SignedKey>,
        max_stored: u32,
    ) -> Result<Published> {
        // The device is the actor: gone, it publishes nothing.
        let row = self.devices.get_mut(&device).ok_or(StoreError::Revoked)?;
        match row.identity {
            Some(existing) if existing != identity => return Ok(Published::IdentityMismatch),
            Some(_) => {}
            // Stored even if the keys below are refused, as the SQLite engine does.
            None => row.identity = Some(identity),
        }
        let held = u32::try_from(row.one_time_keys.len()).unwrap_or(u32::MAX);
        let new = u32::try_from(one_time_keys.len()).unwrap_or(u32::MAX);
        if held.saturating_add(new) > max_stored {
            return Ok(Published::TooMany);
        }
        for key in one_time_keys {
            // A key published again keeps its first signature.
            row.one_time_keys
                .entry(key.public_key)
                .or_insert(key.signature);
        }
        let count = u32::try_from(row.one_time_keys.len()).unwrap_or(u32::MAX);
        if fallback.is_some() {
            row.fallback = fallback;
        }
        Ok(Published::Stored {
            one_time_keys: count,
        })
    }

    fn claim_keys(&mut self, account: AccountId, only: &[DeviceId]) -> Claimed {
        let devices = self.devices_of(account);
        let unknown: Vec<DeviceId> = only
            .iter()
            .copied()
            .filter(|d| !devices.contains(d))
            .collect();
        // A claim naming a device that is not there hands out nothing at all.
        if !unknown.is_empty() {
            return Claimed {
                keys: Vec::new(),
                unknown,
            };
        }
        let mut keys = Vec::new();
        for device in devices {
            if !only.is_empty() && !only.contains(&device) {
                continue;
            }
            let Some(row) = self.devices.get_mut(&device) else {
                continue;
            };
            let Some(identity) = row.identity else {
                continue;
            };
            let one_time = row
                .one_time_keys
                .pop_first()
                .map(|(public_key, signature)| SignedKey {
                    public_key,
                    signature,
                });
            let (key, fallback) = match one_time {
                Some(key) => (Some(key), false),
                None => (row.fallback, true),
            };
            if let Some(key) = key {
                keys.push(ClaimedKey {
                    device,
                    identity,
                    key,
                    fallback,
                    voucher: row.voucher,
                });
            }
        }
        Claimed { keys, unknown }
    }

    fn set_voucher(
        &mut self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> Result<bool> {
        self.check_actor(Actor {
            account,
            device: voucher.by,
        })?;
        Ok(match self.devices.get_mut(&device) {
            Some(row) if row.account == account && row.voucher.is_none() => {
                row.voucher = Some(voucher);
                true
            }
            _ => false,
        })
    }

    fn delete_account(&mut self, account: AccountId) -> Result<Vec<DeviceId>> {
        let Some(pseudonym) = self.accounts.get(&account).map(|a| a.pseudonym) else {
            return Err(StoreError::NoSuchAccount);
        };
        let devices = self.devices_of(account);
        // Undelivered messages the account sent go too: opting out leaves nothing behind.
        self.delete_messages(|m| devices.contains(&m.sender_device) || m.receiver == account);
        self.withdrawn
            .retain(|(sender, _), _| !devices.contains(sender));
        self.codes.remove(&pseudonym);
        for device in &devices {
            self.delete_device(*device);
        }
        self.accounts.remove(&account);
        Ok(devices)
    }

    fn enqueue(&mut self, message: NewMessage, limits: QueueLimits) -> Result<Enqueued> {
        // Stored already, or decided withdrawn (a resend never brings back what was withdrawn).
        if self
            .message_position(message.sender_device, message.id)
            .is_some()
            || self.record(message.sender_device, message.id) == Some(false)
        {
            return Ok(Enqueued::Duplicate);
        }
        let sender = message.sender_account;
        let receiver = self.delivery_devices(message.receiver, sender);
        let own = if sender == message.receiver {
            Vec::new()
        } else {
            self.delivery_devices(sender, sender)
        };
        let sender_bytes = self.usage(sender, None).bytes;
        let Admitted {
            addressees,
            skipped,
            stranger,
            expires_at,
        } = match message.admit(&receiver, &own, sender_bytes, limits)? {
            Admission::Admitted(admitted) => admitted,
            Admission::Refused(answer) => return Ok(answer),
        };
        let mut copies = BTreeMap::new();
        for (device, payload) in message.copies {
            // A decided copy is stored nowhere.
            if skipped.contains(&device) || message.decided.contains(&device) {
                continue;
            }
            let copy = (payload, addressees.to_receiver(device));
            if copies.insert(device, copy).is_some() {
                return Err(StoreError::engine("two copies for one device"));
            }
        }
        // Only once nothing can fail: a failed send leaves nothing behind, as in SQLite (whose
        // savepoint takes the count back).
        for device in &skipped {
            if let Some(row) = self.devices.get_mut(device) {
                row.missed = row.missed.saturating_add(1);
            }
        }
        // Every copy decided already or skipped: nothing to store.
        if copies.is_empty() {
            return Ok(Admission::stored(skipped, message.expires_at, expires_at));
        }
        self.last_position += 1;
        let stored = Message {
            sender_device: message.sender_device,
            sender_account: sender,
            id: message.id,
            receiver: message.receiver,
            sent_at: message.sent_at,
            expires_at,
            delivered: false,
            copies,
            discarded: Default::default(),
            stranger,
        };
        self.messages.insert(self.last_position, stored);
        Ok(Admission::stored(skipped, message.expires_at, expires_at))
    }

    fn pending(
        &self,
        device: DeviceId,
        after: QueueCursor,
        limit: usize,
        now: Millis,
    ) -> Vec<Pending> {
        let later = self
            .messages
            .range((Bound::Excluded(after.position()), Bound::Unbounded));
        later
            .filter(|(_, m)| m.expires_at > now)
            .filter(|(_, m)| !m.discarded.contains(&device))
            .filter_map(|(position, m)| {
                let (payload, _) = m.copies.get(&device)?;
                Some(Pending {
                    cursor: QueueCursor::at(*position),
                    sender_device: m.sender_device,
                    id: m.id,
                    sent_at: m.sent_at,
                    payload: payload.clone(),
                })
            })
            .take(limit)
            .collect()
    }

    /// The message's decision record: `Some(true)` delivered, `Some(false)` withdrawn.
    fn record(&self, sender_device: DeviceId, id: MessageId) -> Option<bool> {
        self.withdrawn
            .get(&(sender_device, id))
            .map(|record| record.delivered)
    }

    /// Writes a message's decision record, kept until `expires_at` (its TTL) plus
    /// [`DECISION_MARGIN`].
    fn decide(
        &mut self,
        sender_device: DeviceId,
        id: MessageId,
        expires_at: Millis,
        delivered: bool,
    ) {
        let record = Decision {
            ends: expires_at.saturating_add(DECISION_MARGIN),
            delivered,
        };
        self.withdrawn.insert((sender_device, id), record);
    }

    fn ack(
        &mut self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Acked {
        // No copy for this device: answered from what is left (see `Store::ack_as`). A copy
        // set aside is known only as withdrawn; `elsewhere`: the message is still stored.
        let gone = |state: &State, set_aside: bool, elsewhere: bool| match state
            .record(sender_device, id)
        {
            Some(false) => Acked::Withdrawn,
            _ if set_aside => Acked::Unknown,
            Some(true) => Acked::Confirmed { first: false },
            None if elsewhere => Acked::Confirmed { first: false },
            None => Acked::Unknown,
        };
        let Some(position) = self.message_position(sender_device, id) else {
            return gone(self, false, false);
        };
        let Some(message) = self.messages.get_mut(&position) else {
            return gone(self, false, false);
        };
        if message.discarded.contains(&device) {
            return gone(self, true, true);
        }
        if !message.copies.contains_key(&device) {
            return gone(self, false, true);
        }
        if kind == AckKind::Discarded {
            // Kept as if never fetched: a withdraw and the TTL's end treat it as waiting.
            message.discarded.insert(device);
            return Acked::Confirmed { first: false };
        }
        let Some((_, to_receiver)) = message.copies.remove(&device) else {
            return gone(self, false, true);
        };
        let delivered = message.delivered;
        let expires_at = message.expires_at;
        let receipt_ends = receipt_expires_at(message.sent_at, message.expires_at);
        // The last copy takes the message with it.
        if message.copies.is_empty() {
            self.messages.remove(&position);
        } else if to_receiver {
            message.delivered = true;
        }
        // The sender's own other devices taking their copies is not a delivery.
        if !to_receiver {
            return Acked::Confirmed { first: false };
        }
        // A copy shown decides the message delivered, unless it was decided before (another
        // copy shown, stored or held): then there is no second receipt.
        let decided = self.record(sender_device, id).is_some();
        if !decided {
            self.decide(sender_device, id, expires_at, true);
        }
        if delivered || decided || kind == AckKind::ShownWithoutReceipt {
            return Acked::Confirmed { first: false };
        }
        self.store_receipt(sender_device, id, ReceiptKind::Delivered, receipt_ends);
        Acked::Confirmed { first: true }
    }

    fn ack_held(&mut self, copy: HeldAck, kind: AckKind) -> Result<Acked> {
        if kind == AckKind::Discarded {
            return Err(StoreError::engine(
                "a held copy is not acknowledged as discarded",
            ));
        }
        let HeldAck {
            sender_device, id, ..
        } = copy;
        Ok(match self.record(sender_device, id) {
            Some(false) => Acked::Withdrawn,
            Some(true) => Acked::Confirmed { first: false },
            None => {
                self.decide(sender_device, id, copy.expires_at, true);
                let shown = kind == AckKind::Shown;
                if shown {
                    let ends = receipt_expires_at(copy.sent_at, copy.expires_at);
                    self.store_receipt(sender_device, id, ReceiptKind::Delivered, ends);
                }
                Acked::Confirmed { first: shown }
            }
        })
    }

    /// [`Store::screen`].
    fn screen(&self, message: &NewMessage) -> bool {
        let sender = message.sender_account;
        let receiver = self.delivery_devices(message.receiver, sender);
        let own = if sender == message.receiver {
            Vec::new()
        } else {
            self.delivery_devices(sender, sender)
        };
        message.screens(&receiver, &own)
    }

    fn withdraw(
        &mut self,
        sender_device: DeviceId,
        id: MessageId,
        held_until: Option<Millis>,
    ) -> Withdrawal {
        let record = self.record(sender_device, id);
        let Some(position) = self.message_position(sender_device, id) else {
            let delivered = self
                .receipts
                .get(&(sender_device, id))
                .is_some_and(|(kind, _)| *kind == ReceiptKind::Delivered);
            return match record {
                _ if delivered => Withdrawal::Delivered,
                Some(true) => Withdrawal::Delivered,
                Some(false) => Withdrawal::Withdrawn,
                None => match held_until {
                    // Nothing stored, nothing decided, and copies held: decided withdrawn.
                    Some(until) => {
                        self.decide(sender_device, id, until, false);
                        Withdrawal::Withdrawn
                    }
                    None => Withdrawal::Unknown,
                },
            };
        };
        let Some(message) = self.messages.get_mut(&position) else {
            return Withdrawal::Unknown;
        };
        if message.delivered || record == Some(true) {
            return Withdrawal::Delivered;
        }
        // The receiver's copies go (those set aside too); the sender's own other devices keep
        // theirs. The record lives until the message's TTL would have ended, and the margin.
        message.copies.retain(|_, (_, to_receiver)| !*to_receiver);
        let copies = &message.copies;
        message
            .discarded
            .retain(|device| copies.contains_key(device));
        let expires_at = message.expires_at;
        if message.copies.is_empty() {
            self.messages.remove(&position);
        }
        self.decide(sender_device, id, expires_at, false);
        Withdrawal::Withdrawn
    }

    fn expire(&mut self, now: Millis, limit: usize) -> Vec<ExpiredMessage> {
        // The oldest deadlines first, as the SQLite engine's index on them yields them.
        let mut ended: Vec<(Millis, i64)> = self
            .messages
            .iter()
            .filter(|(_, m)| m.expires_at <= now)
            .map(|(position, m)| (m.expires_at, *position))
            .collect();
        // A sweep that finds no message, receipt or decision record to expire writes nothing
        // (as in the SQLite engine, whose idle sweeps only look).
        if ended.is_empty()
            && !self.receipts.values().any(|(_, ends)| *ends <= now)
            && !self.withdrawn.values().any(|record| record.ends <= now)
        {
            return Vec::new();
        }
        ended.sort_unstable();
        ended.truncate(limit);
        self.receipts.retain(|_, (_, ends)| *ends > now);
        let mut receipts = Vec::new();
        for (_, position) in ended {
            let Some(message) = self.messages.remove(&position) else {
                continue;
            };
            let (sender_device, id) = (message.sender_device, message.id);
            let receipt_ends = receipt_expires_at(message.sent_at, message.expires_at);
            // A message decided delivered (a copy shown, stored or held) has no `Expired`
            // receipt.
            let delivered = message.delivered || self.record(sender_device, id) == Some(true);
            if !delivered
                && self.store_receipt(sender_device, id, ReceiptKind::Expired, receipt_ends)
            {
                receipts.push(ExpiredMessage { sender_device, id });
            }
        }
        // Decision records last: an expired message's record still said whether it was
        // delivered.
        self.withdrawn.retain(|_, record| record.ends > now);
        receipts
    }

    fn backlog(&self, device: DeviceId) -> Backlog {
        Backlog {
            registered: self.devices.contains_key(&device),
            queued: self.queue_length(device) > 0,
            receipts: self.receipts.keys().any(|(d, _)| *d == device),
            missed: self.devices.get(&device).map_or(0, |d| d.missed),
        }
    }

    fn receipts(&self, device: DeviceId) -> Vec<PendingReceipt> {
        self.receipts
            .iter()
            .filter(|((d, _), _)| *d == device)
            .map(|((_, id), (kind, _))| PendingReceipt {
                id: *id,
                kind: *kind,
            })
            .take(RECEIPTS_PER_READ)
            .collect()
    }

    fn prune_codes(&mut self, now: Millis) -> usize {
        let policy = CodePolicy::default();
        let before = self.codes.len();
        self.codes
            .retain(|_, record| !record.is_spent(&policy, now));
        before - self.codes.len()
    }
}

impl Store for MemoryStore {
    async fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        Ok(self.state()?.device(id))
    }

    async fn login_device(&self, id: DeviceId) -> Result<Option<(Device, KeyStatus)>> {
        let state = self.state()?;
        Ok(state
            .device(id)
            .map(|device| (device, state.key_status(id))))
    }

    async fn account(&self, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
        Ok(self.state()?.account_devices(pseudonym))
    }

    async fn route(&self, pseudonym: Pseudonym) -> Result<Option<Route>> {
        let state = self.state()?;
        Ok(state.account_of(pseudonym).map(|account| Route {
            account,
            devices: state.devices_of(account),
        }))
    }

    async fn accounts(&self, pseudonyms: Vec<Pseudonym>) -> Result<Vec<Option<AccountDevices>>> {
        let state = self.state()?;
        Ok(pseudonyms
            .into_iter()
            .map(|pseudonym| state.account_devices(pseudonym))
            .collect())
    }

    async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceId>> {
        Ok(self.state()?.devices_of(account))
    }

    async fn register_device(
        &self,
        pseudonym: Pseudonym,
        key_version: u32,
        device: DeviceId,
        public_key: [u8; 32],
        _now: Millis,
    ) -> Result<Registered> {
        self.state()?
            .register_device(pseudonym, key_version, device, public_key)
    }

    async fn add_device(
        &self,
        approver: Actor,
        device: DeviceId,
        public_key: [u8; 32],
        identity: IdentityKeys,
        max_devices: usize,
        _now: Millis,
    ) -> Result<Linked> {
        let mut state = self.state()?;
        state.check_actor(approver)?;
        state.add_device(
            (approver.account, device, public_key),
            identity,
            max_devices,
        )
    }

    async fn remove_device(&self, actor: Actor, device: DeviceId) -> Result<bool> {
        let mut state = self.state()?;
        state.check_actor(actor)?;
        if state.devices.get(&device).map(|d| d.account) != Some(actor.account) {
            return Ok(false);
        }
        state.delete_device(device);
        Ok(true)
    }

    async fn publish_keys(
        &self,
        device: DeviceId,
        identity: IdentityKeys,
        one_time_keys: Vec<SignedKey>,
        fallback: Option<SignedKey>,
        max_stored: u32,
    ) -> Result<Published> {
        self.state()?
            .publish_keys(device, identity, one_time_keys, fallback, max_stored)
    }

    async fn set_contact_token(&self, device: DeviceId, hash: [u8; 32]) -> Result<()> {
        let mut state = self.state()?;
        let row = state.devices.get_mut(&device).ok_or(StoreError::Revoked)?;
        row.contact_token_hash = Some(hash);
        Ok(())
    }

    async fn key_status(&self, device: DeviceId) -> Result<KeyStatus> {
        Ok(self.state()?.key_status(device))
    }

    async fn claim_keys(
        &self,
        claimer: Actor,
        account: AccountId,
        only: Vec<DeviceId>,
    ) -> Result<Claimed> {
        let mut state = self.state()?;
        state.check_actor(claimer)?;
        Ok(state.claim_keys(account, &only))
    }

    async fn device_keys(&self, account: AccountId) -> Result<Vec<ListedDevice>> {
        let state = self.state()?;
        let devices = state.devices_of(account).into_iter();
        Ok(devices.filter_map(|device| state.listed(device)).collect())
    }

    async fn set_voucher(
        &self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> Result<bool> {
        self.state()?.set_voucher(account, device, voucher)
    }

    async fn delete_account(&self, actor: Actor) -> Result<Vec<DeviceId>> {
        let mut state = self.state()?;
        state.check_actor(actor)?;
        state.delete_account(actor.account)
    }

    async fn update_code_record<R, F>(&self, pseudonym: Pseudonym, update: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Option<CodeRecord>) -> R + Send + 'static,
    {
        let mut state = self.state()?;
        let mut record = state.codes.get(&pseudonym).cloned();
        let value = update(&mut record);
        match record {
            Some(record) => state.codes.insert(pseudonym, record),
            None => state.codes.remove(&pseudonym),
        };
        Ok(value)
    }

    async fn enqueue(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Enqueued> {
        self.state()?.enqueue(message, limits.into())
    }

    async fn enqueue_submit(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Completion<Enqueued>> {
        // Stored (in the order submitted) before this returns, and durable at once.
        let outcome = self.state()?.enqueue(message, limits.into());
        Ok(Completion::done(outcome))
    }

    async fn pending(
        &self,
        device: DeviceId,
        after: QueueCursor,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<Pending>> {
        Ok(self.state()?.pending(device, after, limit, now))
    }

    async fn holds_copy_from(&self, device: DeviceId, sender_device: DeviceId) -> Result<bool> {
        Ok(self.state()?.messages.values().any(|m| {
            m.sender_device == sender_device
                && m.copies.contains_key(&device)
                && !m.discarded.contains(&device)
        }))
    }

    async fn ack_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Acked> {
        Ok(self.state()?.ack(device, sender_device, id, kind))
    }

    async fn ack_staged_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Completion<Acked>> {
        let acked = self.state()?.ack(device, sender_device, id, kind);
        Ok(Completion::done(Ok(acked)))
    }

    async fn screen(&self, message: &NewMessage) -> Result<bool> {
        Ok(self.state()?.screen(message))
    }

    async fn ack_held(&self, copy: HeldAck, kind: AckKind) -> Result<Completion<Acked>> {
        let acked = self.state()?.ack_held(copy, kind)?;
        Ok(Completion::done(Ok(acked)))
    }

    async fn withdraw_held(
        &self,
        sender_device: DeviceId,
        id: MessageId,
        held_until: Option<Millis>,
    ) -> Result<Withdrawal> {
        Ok(self.state()?.withdraw(sender_device, id, held_until))
    }

    async fn expire(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredMessage>> {
        Ok(self.state()?.expire(now, limit))
    }

    async fn backlog(&self, device: DeviceId) -> Result<Backlog> {
        Ok(self.state()?.backlog(device))
    }

    async fn clear_missed(&self, device: DeviceId, seen: u32) -> Result<()> {
        if let Some(row) = self.state()?.devices.get_mut(&device) {
            row.missed = row.missed.saturating_sub(seen);
        }
        Ok(())
    }

    async fn receipts(&self, device: DeviceId) -> Result<Vec<PendingReceipt>> {
        Ok(self.state()?.receipts(device))
    }

    async fn ack_receipt(&self, device: DeviceId, id: MessageId) -> Result<()> {
        self.state()?.receipts.remove(&(device, id));
        Ok(())
    }

    async fn rekey_account(
        &self,
        account: AccountId,
        old: Pseudonym,
        new: Pseudonym,
        key_version: u32,
    ) -> Result<Rekeyed> {
        self.state()?.rekey_account(account, old, new, key_version)
    }

    async fn accounts_by_key_version(&self) -> Result<Vec<(u32, u64)>> {
        let state = self.state()?;
        let mut counts = BTreeMap::<u32, u64>::new();
        for account in state.accounts.values() {
            *counts.entry(account.key_version).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }

    async fn forget_previous_pseudonyms(&self) -> Result<u64> {
        let mut state = self.state()?;
        let mut forgotten = 0;
        for account in state.accounts.values_mut() {
            forgotten += u64::from(account.previous.take().is_some());
        }
        Ok(forgotten)
    }

    async fn prune_codes(&self, now: Millis) -> Result<usize> {
        Ok(self.state()?.prune_codes(now))
    }

    async fn scrub(&self) -> Result<()> {
        // Nothing is written anywhere, so no deleted byte remains to scrub.
        Ok(())
    }
}
