//! Copies held in memory (deliver first). A message whose every copy goes to a device with a
//! live session on this node, from a contact, is pushed at once with no disk write on the way,
//! and held here until each copy is settled: *decided* (its device acknowledged it and the
//! message's `DELIVERED` record is durable, or the message was decided withdrawn) or *stored*
//! (it waited past the acknowledgement window, or no session could take it). Once every copy is
//! settled the sending device is told `Settled`.
//!
//! A crash loses what is held here and nothing else: the sending client keeps every unsettled
//! message and sends it again (or withdraws it and sends an SMS), and a receiver shows a message
//! only once its decision is durable. Copies for one device are pushed in their session's order
//! (the send's push turn) whether held or stored, so a held copy never lets a later one overtake
//! it.
//!
//! Bounded by the bytes it holds (`held_bytes`): past it a message is stored before it is
//! pushed. Holds ciphertexts and ids only, and never logs one.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tidings_core::failpoint::failpoint;
use tidings_core::Millis;
use tidings_proto::frame::{self, Kind};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::{AccountId, Enqueued, NewMessage, Store};
use tokio::sync::Notify;

use crate::clock::now_ms;
use crate::delivery::deliver_frame;
use crate::metrics::Outcome;
use crate::state::Shared;

/// What a held copy costs beyond its payload, as the bound counts it (the copy's entry, its
/// message's share and its deadline): so that copies with tiny payloads are bounded too.
pub const COPY_OVERHEAD: usize = 128;

/// A message as the server names it: its sending device and id.
pub type Key = (DeviceId, MessageId);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyState {
    /// Pushed; no acknowledgement yet.
    Pushed,
    /// Its device's acknowledgement is being decided.
    Deciding,
    /// Being stored.
    Storing,
    /// Decided or stored.
    Settled,
}

#[derive(Debug)]
struct HeldCopy {
    device: DeviceId,
    payload: Bytes,
    /// A copy for the receiver's device (rather than the sender's own other device): only its
    /// acknowledgement is a delivery, and only it is withdrawn.
    to_receiver: bool,
    state: CopyState,
    /// Once stored, the copy is offered again to the device's sessions registered from this
    /// number on: those that had not registered when it was pushed (0: every session, for a copy
    /// no session took).
    offered_from: u64,
}

#[derive(Debug)]
struct Entry {
    sender_account: AccountId,
    receiver: AccountId,
    sent_at: Millis,
    expires_at: Millis,
    contact_token_hash: Option<[u8; 32]>,
    copies: Vec<HeldCopy>,
    /// Storing has begun (it happens at most once per message).
    storing: bool,
    /// The send's answer has gone to the sender: `Settled` never comes before it.
    answered: bool,
    /// Its window has ended: `Settled` never comes before that either, so that when it comes
    /// tells the sender nothing of when each device acknowledged it.
    due: bool,
    /// The sender was sent its `Delivered` receipt (at the first acknowledgement of a receiver's
    /// copy that asked for one).
    receipted: bool,
    bytes: usize,
}

impl Entry {
    fn is_settled(&self) -> bool {
        self.answered && self.due && self.copies.iter().all(|c| c.state == CopyState::Settled)
    }

    fn copy(&mut self, device: DeviceId) -> Option<&mut HeldCopy> {
        self.copies.iter_mut().find(|c| c.device == device)
    }
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// When each held message's window ends, in the order they were held (one window for all,
    /// so the deadlines grow).
    deadlines: VecDeque<(Millis, Key)>,
    bytes: usize,
}

/// What an acknowledgement finds here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForAck {
    /// A held copy, now being decided by this acknowledgement.
    Held {
        to_receiver: bool,
        sent_at: Millis,
        expires_at: Millis,
        /// The first acknowledgement of a receiver's copy that asked for a receipt: the sender's
        /// receipt goes now, before anything is written (a receipt settles nothing).
        receipt_now: bool,
    },
    /// Being stored: to be acknowledged as a stored copy once it is.
    Storing,
    /// Not held here: a stored copy, or none.
    NotHeld,
}

/// A held message's copies to store: the message (with only the copies not yet settled, and
/// the devices whose copies are decided), and whom to offer each stored copy to again.
#[derive(Debug)]
pub struct ToStore {
    pub message: NewMessage,
    pub offers: Vec<(DeviceId, u64)>,
}

/// How long storing a held message waits for an acknowledgement of one of its copies that is
/// being decided, at most, in steps of [`DECIDING_STEP_MS`] (a decision is one storage write).
const DECIDING_WAIT_MS: u64 = 5_000;
const DECIDING_STEP_MS: u64 = 5;

/// The copies this node holds in memory.
#[derive(Debug)]
pub struct Held {
    inner: Mutex<Inner>,
    /// How long a copy waits for its acknowledgement before it is stored; 0: nothing is held.
    window: Millis,
    max_bytes: usize,
    /// Woken whenever a message's storing ends.
    stored: Notify,
}

impl Held {
    pub fn new(window: Millis, max_bytes: usize) -> Self {
        Self {
            inner: Mutex::default(),
            window,
            max_bytes,
            stored: Notify::new(),
        }
    }

    /// Whether deliver first is on.
    pub fn enabled(&self) -> bool {
        self.window > 0
    }

    /// The acknowledgement window.
    pub fn window(&self) -> Millis {
        self.window
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds a message whose copies are about to be pushed (`receiver_devices`: the receiver's;
    /// the others are the sender's own), offered to the sessions registered before
    /// `offered_from`. False when it is held already or there is no room: then it is stored
    /// before it is pushed.
    pub fn hold(
        &self,
        message: &NewMessage,
        receiver_devices: &[DeviceId],
        offered_from: u64,
        now: Millis,
    ) -> bool {
        let key = (message.sender_device, message.id);
        let bytes: usize = message
            .copies
            .iter()
            .map(|(_, p)| p.len() + COPY_OVERHEAD)
            .sum();
        let mut inner = self.inner();
        if inner.entries.contains_key(&key) || inner.bytes + bytes > self.max_bytes {
            return false;
        }
        let copies = message
            .copies
            .iter()
            .map(|(device, payload)| HeldCopy {
                device: *device,
                payload: payload.clone(),
                to_receiver: receiver_devices.contains(device),
                state: CopyState::Pushed,
                offered_from,
            })
            .collect();
        inner.entries.insert(
            key,
            Entry {
                sender_account: message.sender_account,
                receiver: message.receiver,
                sent_at: message.sent_at,
                expires_at: message.expires_at,
                contact_token_hash: message.contact_token_hash,
                copies,
                storing: false,
                answered: false,
                due: false,
                receipted: false,
                bytes,
            },
        );
        inner.bytes += bytes;
        inner
            .deadlines
            .push_back((now.saturating_add(self.window), key));
        true
    }

    /// The send's answer went to the sender. True when the message is settled now (every copy
    /// was settled before the answer went).
    pub fn answered(&self, key: Key) -> bool {
        let mut inner = self.inner();
        let Some(entry) = inner.entries.get_mut(&key) else {
            return false;
        };
        entry.answered = true;
        settle_if_done(&mut inner, key)
    }

    /// Every message held now.
    pub fn keys(&self) -> Vec<Key> {
        self.inner().entries.keys().copied().collect()
    }

    /// Whether a message is held.
    pub fn is_held(&self, key: Key) -> bool {
        self.inner().entries.contains_key(&key)
    }

    /// When a held message's TTL ends (None: not held).
    pub fn expires_at(&self, key: Key) -> Option<Millis> {
        self.inner().entries.get(&key).map(|e| e.expires_at)
    }

    /// A copy's push found no session to take it: once stored, it goes to every session.
    pub fn not_taken(&self, key: Key, device: DeviceId) {
        if let Some(copy) = self
            .inner()
            .entries
            .get_mut(&key)
            .and_then(|e| e.copy(device))
        {
            copy.offered_from = 0;
        }
    }

    /// What `device`'s acknowledgement of a message finds (`receipt`: it asks for the sender's
    /// receipt); a held copy is now being decided.
    pub fn for_ack(&self, key: Key, device: DeviceId, receipt: bool) -> ForAck {
        let mut inner = self.inner();
        let Some(entry) = inner.entries.get_mut(&key) else {
            return ForAck::NotHeld;
        };
        let (sent_at, expires_at, receipted) = (entry.sent_at, entry.expires_at, entry.receipted);
        match entry.copy(device) {
            Some(copy) if copy.state == CopyState::Pushed => {
                copy.state = CopyState::Deciding;
                let to_receiver = copy.to_receiver;
                let receipt_now = to_receiver && receipt && !receipted;
                entry.receipted |= receipt_now;
                ForAck::Held {
                    to_receiver,
                    sent_at,
                    expires_at,
                    receipt_now,
                }
            }
            Some(copy) if copy.state == CopyState::Storing => ForAck::Storing,
            _ => ForAck::NotHeld,
        }
    }

    /// An acknowledgement's decision ended: `settled` when it was decided (confirmed or
    /// withdrawn), otherwise (it failed) the copy is held again, to be stored when its window
    /// ends. True when the whole message is settled now (and forgotten here).
    pub fn decided(&self, key: Key, device: DeviceId, settled: bool) -> bool {
        let mut inner = self.inner();
        let Some(entry) = inner.entries.get_mut(&key) else {
            return false;
        };
        if let Some(copy) = entry.copy(device) {
            if copy.state == CopyState::Deciding {
                copy.state = if settled {
                    CopyState::Settled
                } else {
                    CopyState::Pushed
                };
            }
        }
        settle_if_done(&mut inner, key)
    }

    /// Whether a copy of the message is being decided (its acknowledgement's record is being
    /// written).
    pub fn deciding(&self, key: Key) -> bool {
        self.inner().entries.get(&key).is_some_and(|entry| {
            entry
                .copies
                .iter()
                .any(|copy| copy.state == CopyState::Deciding)
        })
    }

    /// The message was decided withdrawn: its copies for the receiver are settled (the record
    /// decides them). True when the whole message is settled now.
    pub fn withdrawn(&self, key: Key) -> bool {
        let mut inner = self.inner();
        let Some(entry) = inner.entries.get_mut(&key) else {
            return false;
        };
        for copy in entry.copies.iter_mut().filter(|c| c.to_receiver) {
            if copy.state == CopyState::Pushed {
                copy.state = CopyState::Settled;
            }
        }
        settle_if_done(&mut inner, key)
    }

    /// The held messages whose window has ended at `now`: those settled already are forgotten
    /// and returned as settled (the sender is to be told), the others returned as due (their
    /// copies not yet settled are to be stored).
    pub fn due(&self, now: Millis) -> (Vec<Key>, Vec<Key>) {
        let mut inner = self.inner();
        let (mut settled, mut due) = (Vec::new(), Vec::new());
        while inner
            .deadlines
            .front()
            .is_some_and(|(deadline, _)| *deadline <= now)
        {
            let Some((_, key)) = inner.deadlines.pop_front() else {
                break;
            };
            let Some(entry) = inner.entries.get_mut(&key) else {
                continue;
            };
            entry.due = true;
            if settle_if_done(&mut inner, key) {
                settled.push(key);
            } else {
                due.push(key);
            }
        }
        (settled, due)
    }

    /// Starts storing a held message's copies that are not settled yet, once per message. None
    /// when it is not held, is being stored, has nothing left to store, or (unless
    /// `deciding_counts`, when the copies being decided count as decided) a copy's
    /// acknowledgement is being decided.
    pub fn start_storing(&self, key: Key, deciding_counts: bool) -> Option<ToStore> {
        let mut inner = self.inner();
        let entry = inner.entries.get_mut(&key)?;
        if entry.storing
            || (!deciding_counts
                && entry
                    .copies
                    .iter()
                    .any(|copy| copy.state == CopyState::Deciding))
        {
            return None;
        }
        let mut copies = Vec::new();
        let mut decided = Vec::new();
        let mut offers = Vec::new();
        for copy in &mut entry.copies {
            match copy.state {
                CopyState::Pushed => {
                    copy.state = CopyState::Storing;
                    copies.push((copy.device, copy.payload.clone()));
                    offers.push((copy.device, copy.offered_from));
                }
                CopyState::Deciding | CopyState::Settled => decided.push(copy.device),
                CopyState::Storing => {}
            }
        }
        if copies.is_empty() {
            return None;
        }
        entry.storing = true;
        Some(ToStore {
            message: NewMessage {
                sender_device: key.0,
                sender_account: entry.sender_account,
                id: key.1,
                receiver: entry.receiver,
                sent_at: entry.sent_at,
                expires_at: entry.expires_at,
                copies,
                decided,
                contact_token_hash: entry.contact_token_hash,
            },
            offers,
        })
    }

    /// Storing ended: `stored` (the copies are settled), or not (refused or failed: the message
    /// is forgotten here and never reported settled, so its sender sends it again). True when the
    /// message is settled now.
    pub fn stored(&self, key: Key, stored: bool) -> bool {
        let settled = {
            let mut inner = self.inner();
            if stored {
                if let Some(entry) = inner.entries.get_mut(&key) {
                    for copy in &mut entry.copies {
                        if copy.state == CopyState::Storing {
                            copy.state = CopyState::Settled;
                        }
                    }
                }
                settle_if_done(&mut inner, key)
            } else {
                forget(&mut inner, key);
                false
            }
        };
        self.stored.notify_waiters();
        settled
    }

    /// Waits until `device`'s copy of a message is no longer being stored.
    pub async fn wait_stored(&self, key: Key, device: DeviceId) {
        loop {
            let stored = self.stored.notified();
            tokio::pin!(stored);
            stored.as_mut().enable();
            let storing = self
                .inner()
                .entries
                .get_mut(&key)
                .and_then(|e| e.copy(device))
                .is_some_and(|c| c.state == CopyState::Storing);
            if !storing {
                return;
            }
            stored.await;
        }
    }

    /// The bytes held now.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.inner().bytes
    }
}

/// Forgets a message once every copy is settled; whether it was.
fn settle_if_done(inner: &mut Inner, key: Key) -> bool {
    if inner.entries.get(&key).is_some_and(Entry::is_settled) {
        forget(inner, key);
        true
    } else {
        false
    }
}

fn forget(inner: &mut Inner, key: Key) {
    if let Some(entry) = inner.entries.remove(&key) {
        inner.bytes = inner.bytes.saturating_sub(entry.bytes);
    }
}

/// Tells the sending device that a message is settled.
pub fn settle<S: Store>(state: &Shared<S>, key: Key) {
    failpoint("server-settled-before");
    let frame = Kind::Settled(frame::Settled {
        ids: vec![key.1.as_bytes().to_vec()],
    })
    .into();
    state.hub.notify(&key.0, &frame);
}

/// Stores a held message's copies that are not settled yet (at the end of its window, or when
/// a copy could not be pushed or is to be set aside), then offers each again to the device's
/// sessions that did not have it.
pub async fn store_held<S: Store>(state: &Shared<S>, key: Key) {
    // A copy whose acknowledgement is being decided is decided first: the others stored before
    // its record is durable, a crash between the two would leave a stored message and an
    // acknowledged copy with neither a copy nor a record, which a withdraw of the rest could
    // decide withdrawn while that device showed it. A decision that fails holds its copy again,
    // and it is stored with the rest.
    let mut waited = 0;
    let ToStore { message, offers } = loop {
        if let Some(to_store) = state.held.start_storing(key, waited >= DECIDING_WAIT_MS) {
            break to_store;
        }
        if !state.held.deciding(key) {
            // Not held, being stored, or nothing left to store.
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(DECIDING_STEP_MS)).await;
        waited += DECIDING_STEP_MS;
    };
    let sent_at = message.sent_at;
    let copies = message.copies.clone();
    failpoint("server-held-store-before");
    let stored = match state
        .store
        .enqueue(message, state.config.queue_limits)
        .await
        .inspect(|_| crate::bus::share_new_strangers(state))
    {
        Ok(
            Enqueued::Stored
            | Enqueued::StoredSkipping(_)
            | Enqueued::StoredShortened { .. }
            // Stored already (a resend), or decided withdrawn: nothing more to keep.
            | Enqueued::Duplicate,
        ) => true,
        Ok(refused) => {
            tracing::info!(
                answer = ?refused,
                "a held message could not be stored: its sender sends it again"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed while storing a held message");
            false
        }
    };
    failpoint("server-held-store-after");
    state
        .metrics
        .held_copies
        .get_or_create(&Outcome {
            outcome: if stored { "stored" } else { "unstored" },
        })
        .inc_by(copies.len() as u64);
    if stored {
        for ((device, payload), (_, offered_from)) in copies.into_iter().zip(offers) {
            let frame = deliver_frame(key.0, key.1, sent_at, payload);
            state.hub.deliver_from(&device, &frame, offered_from);
        }
    }
    if state.held.stored(key, stored) {
        settle(state, key);
    }
}

/// Stores every message still held, at shutdown once the sessions have ended (no
/// acknowledgement can come any more): what was settled needs nothing, the rest is kept.
pub async fn store_all<S: Store>(state: &Shared<S>) {
    for key in state.held.keys() {
        store_held(state, key).await;
    }
}

/// Stores every held message whose window has ended (run every quarter window by
/// `crate::sweeps`), each in a task of its own.
pub async fn store_due<S: Store>(state: Shared<S>) {
    let (settled, due) = state.held.due(now_ms());
    for key in settled {
        settle(&state, key);
    }
    for key in due {
        let task_state = state.clone();
        state
            .tasks
            .spawn(async move { store_held(&task_state, key).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: u8, devices: &[u8]) -> NewMessage {
        NewMessage {
            sender_device: DeviceId([1; 16]),
            sender_account: AccountId(1),
            id: MessageId([id; 16]),
            receiver: AccountId(2),
            sent_at: 10,
            expires_at: 1_000,
            copies: devices
                .iter()
                .map(|d| (DeviceId([*d; 16]), Bytes::from(vec![*d; 100])))
                .collect(),
            decided: Vec::new(),
            contact_token_hash: None,
        }
    }

    #[test]
    fn a_message_is_settled_once_every_copy_is_decided_or_stored() {
        let held = Held::new(100, 1 << 20);
        let m = message(1, &[2, 3]);
        let key = (m.sender_device, m.id);
        assert!(held.hold(&m, &[DeviceId([2; 16])], 0, 0));
        assert!(!held.hold(&m, &[], 0, 0), "held once");
        assert!(!held.answered(key));
        assert_eq!(held.bytes(), 200 + 2 * COPY_OVERHEAD);
        assert_eq!(
            held.for_ack(key, DeviceId([2; 16]), true),
            ForAck::Held {
                to_receiver: true,
                sent_at: 10,
                expires_at: 1_000,
                receipt_now: true,
            }
        );
        assert_eq!(held.for_ack(key, DeviceId([2; 16]), true), ForAck::NotHeld);
        assert!(!held.decided(key, DeviceId([2; 16]), true));
        assert_eq!(held.due(99), (vec![], vec![]));
        assert_eq!(held.due(100), (vec![], vec![key]), "due, a copy to store");
        let to_store = held.start_storing(key, false).expect("one copy left");
        assert_eq!(to_store.message.copies.len(), 1);
        assert_eq!(to_store.message.decided, vec![DeviceId([2; 16])]);
        assert!(held.start_storing(key, true).is_none(), "stored once");
        assert_eq!(held.for_ack(key, DeviceId([3; 16]), true), ForAck::Storing);
        assert!(held.stored(key, true));
        assert!(!held.is_held(key));
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn a_failed_decision_holds_the_copy_again_and_a_withdraw_settles_the_receivers_copies() {
        let held = Held::new(100, 1 << 20);
        let m = message(1, &[2, 3]);
        let key = (m.sender_device, m.id);
        assert!(held.hold(&m, &[DeviceId([2; 16])], 0, 0));
        assert!(matches!(
            held.for_ack(key, DeviceId([2; 16]), true),
            ForAck::Held { .. }
        ));
        assert!(!held.decided(key, DeviceId([2; 16]), false));
        assert!(!held.withdrawn(key), "the sender's own copy is not settled");
        assert!(matches!(
            held.for_ack(key, DeviceId([3; 16]), true),
            ForAck::Held {
                to_receiver: false,
                ..
            }
        ));
        assert!(
            !held.decided(key, DeviceId([3; 16]), true),
            "every copy settled, but the send not answered yet"
        );
        assert!(
            !held.answered(key),
            "answered, but its window has not ended"
        );
        assert_eq!(
            held.due(100),
            (vec![key], vec![]),
            "settled at the window's end"
        );
        assert!(!held.is_held(key));
    }

    #[test]
    fn storing_waits_for_a_copy_being_decided_and_stores_it_if_its_decision_failed() {
        let held = Held::new(100, 1 << 20);
        let m = message(1, &[2, 3]);
        let key = (m.sender_device, m.id);
        assert!(held.hold(&m, &[DeviceId([2; 16]), DeviceId([3; 16])], 0, 0));
        assert!(matches!(
            held.for_ack(key, DeviceId([2; 16]), true),
            ForAck::Held { .. }
        ));
        assert!(held.deciding(key));
        assert!(
            held.start_storing(key, false).is_none(),
            "not while a copy's record is being written"
        );
        // Its decision failed: the copy is held again and stored with the other.
        assert!(!held.decided(key, DeviceId([2; 16]), false));
        assert!(!held.deciding(key));
        let to_store = held.start_storing(key, false).expect("both copies");
        assert_eq!(to_store.message.copies.len(), 2);
        assert!(to_store.message.decided.is_empty());
    }

    #[test]
    fn a_copy_decided_after_the_answer_settles_the_message() {
        let held = Held::new(100, 1 << 20);
        let m = message(1, &[3]);
        let key = (m.sender_device, m.id);
        assert!(held.hold(&m, &[], 0, 0));
        assert!(!held.answered(key));
        assert!(matches!(
            held.for_ack(key, DeviceId([3; 16]), true),
            ForAck::Held {
                to_receiver: false,
                ..
            }
        ));
        assert_eq!(
            held.due(100),
            (vec![], vec![key]),
            "its copy still undecided"
        );
        assert!(
            held.decided(key, DeviceId([3; 16]), true),
            "decided after its window"
        );
    }

    #[test]
    fn holding_is_bounded_by_bytes() {
        let held = Held::new(100, 250 + 2 * COPY_OVERHEAD);
        assert!(held.hold(&message(1, &[2, 3]), &[], 0, 0));
        assert!(!held.hold(&message(2, &[2]), &[], 0, 0));
        let key = (DeviceId([1; 16]), MessageId([1; 16]));
        assert!(!held.stored(key, false), "refused: forgotten, not settled");
        assert!(held.hold(&message(2, &[2]), &[], 0, 0));
    }

    #[test]
    fn copies_with_empty_payloads_are_bounded_too() {
        let held = Held::new(100, 10 * COPY_OVERHEAD);
        let empty = |id: u8| NewMessage {
            copies: vec![(DeviceId([2; 16]), Bytes::new())],
            ..message(id, &[])
        };
        let taken = (0..=20u8)
            .filter(|id| held.hold(&empty(*id), &[], 0, 0))
            .count();
        assert_eq!(taken, 10);
    }
}
