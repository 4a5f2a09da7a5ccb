//! Live sessions on this node: which devices are online, and how to reach their sessions.
//!
//! Only sessions are kept here, never accounts or numbers: the hub is as large as the number of
//! open connections. With other nodes ([`crate::bus`]), what is for a device with no session here
//! is handed to the node that serves it.

use std::collections::{hash_map, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};

use prost::Message as _;
use tidings_core::presence::{Secret, Setting};
use tidings_core::Millis;
use tidings_proto::frame::Frame;
use tidings_proto::id::DeviceId;
use tokio::sync::Notify;

use crate::bus::Bus;

/// Lets the sessions a task has just woken (by pushing to their mailboxes) run before the task
/// goes on. The runtime runs the task woken last first, so without this a request's own answer
/// (or a system call of its next step) would go before the frames it pushed to others, which are
/// what the other side is waiting for.
pub async fn let_woken_run() {
    tokio::task::yield_now().await;
}

/// Frames queued per session before the session counts as slow.
pub const SESSION_QUEUE: usize = 1024;
/// Bytes queued per session (as they will be written, length prefixes included). A delivery
/// that would pass it closes the session: its client has stopped taking what is written (the
/// socket's buffers are full behind the queue), and every copy is still stored, so its device
/// gets them at its next login. What waits for room (the stored queue's drain, answers) waits.
pub const SESSION_QUEUE_BYTES: usize = 1024 * 1024;

/// What a busy session's mailbox has for it ([`Mailbox::next_event`]).
#[derive(Debug)]
pub enum MailEvent {
    /// Its queue overflowed: the session is to close.
    Overflowed,
    Message(Outbound),
    /// Woken without a message: look at the heartbeat deadline and the shutdown.
    Woken,
}

/// What a session is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Write this frame.
    Frame(Frame),
    /// Write a delivery (counted as one).
    Deliver(Frame),
    /// The device was signed out (replaced, removed or disabled): say so and close.
    SignOut(&'static str),
}

impl Outbound {
    /// The bytes this takes once written, as counted against [`SESSION_QUEUE_BYTES`].
    fn wire_len(&self) -> usize {
        match self {
            Outbound::Frame(frame) | Outbound::Deliver(frame) => 4 + frame.encoded_len(),
            Outbound::SignOut(_) => 0,
        }
    }
}

/// A session's queue of frames to write: bounded, and holding no allocation while empty, so an
/// idle session costs only this struct (96 bytes with its reference counts: everything but the
/// heartbeat deadline sits under one lock, and a wait for room is made only when a sender finds
/// the queue full). A channel would keep a block of slots per session.
/// Its one reader is the session's task, whose waker it keeps (no wait list is needed).
#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    /// The session's heartbeat deadline on the session clock ([`crate::clock::session_ms`]), for
    /// the hub's sweep.
    heard_until: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Outbound>,
    /// The bytes the queue holds ([`Outbound::wire_len`]), at most [`SESSION_QUEUE_BYTES`]
    /// (and one sign-out).
    bytes: u32,
    /// The session's task while it waits for a message or a wake-up.
    reader: Option<Waker>,
    /// Senders waiting for room: made by the first sender that finds the queue full (and kept),
    /// woken one per message taken, and all when the mailbox closes.
    room: Option<Arc<Notify>>,
    /// Woken without a message (heartbeat sweep, shutdown) since the session last looked.
    woken: bool,
    /// Nothing more is queued: the session ended, was signed out (with `revoked`), or its queue
    /// overflowed (without `revoked`, while the session still runs; see [`Mailbox::overflowed`]).
    closed: bool,
    /// Set when a delivery did not fit; the session re-reads the store.
    behind: bool,
    /// The device was signed out: the session serves no further request. Kept apart from the
    /// queue (which a device that stops reading can fill) so that a revocation always holds.
    revoked: bool,
}

impl Inner {
    /// Keeps the waiting task's waker (cloned only when it changed).
    fn wait(&mut self, cx: &Context<'_>) {
        if !self
            .reader
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            self.reader = Some(cx.waker().clone());
        }
    }

    /// Whether a message of `size` bytes has room: under both bounds, or the queue is empty (so
    /// that any frame fits an empty queue).
    fn has_room(&self, size: usize) -> bool {
        self.queue.is_empty()
            || (self.queue.len() < SESSION_QUEUE
                && self.bytes as usize + size <= SESSION_QUEUE_BYTES)
    }

    /// Queues a message of `size` bytes if the mailbox is open and has room; gives it back
    /// otherwise. The answer on success is the reader to wake, once the lock is released.
    // Giving the message back is the point of the `Err`; it is moved once, never stored there.
    #[allow(clippy::result_large_err)]
    fn push(&mut self, message: Outbound, size: usize) -> Result<Option<Waker>, Outbound> {
        if self.closed || !self.has_room(size) {
            return Err(message);
        }
        self.queue.push_back(message);
        // At most the bound plus one frame: fits.
        self.bytes = self
            .bytes
            .saturating_add(u32::try_from(size).unwrap_or(u32::MAX));
        Ok(self.reader.take())
    }
}

/// Wakes the session's task taken from its mailbox, outside the mailbox's lock.
fn wake_reader(reader: Option<Waker>) {
    if let Some(reader) = reader {
        reader.wake();
    }
}

/// The session is gone; nothing more can be queued for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closed;

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Queues a message if there is room; gives it back if the mailbox is full or closed.
    // Giving the message back is the point of the `Err`; it is moved once, never stored there.
    #[allow(clippy::result_large_err)]
    pub fn try_send(&self, message: Outbound) -> Result<(), Outbound> {
        let size = message.wire_len();
        let reader = self.inner().push(message, size)?;
        wake_reader(reader);
        Ok(())
    }

    /// Queues a delivery if there is room. Otherwise, when the queue holds as many frames as it
    /// may, marks the session behind, so that it reads its device's queue from the store again;
    /// when it holds as many bytes as it may, closes the session (its client takes nothing; the
    /// copies are stored and go out at the next login). Whether the delivery was queued.
    fn offer(&self, message: Outbound) -> bool {
        let size = message.wire_len();
        let (reader, room, dropped) = {
            let mut inner = self.inner();
            let message = match inner.push(message, size) {
                Ok(reader) => {
                    drop(inner);
                    wake_reader(reader);
                    return true;
                }
                Err(message) => message,
            };
            if inner.closed {
                return false;
            }
            if inner.queue.len() >= SESSION_QUEUE {
                inner.behind = true;
                return false;
            }
            // Over the byte bound: the queue is let go at once, and the session wakes to close.
            inner.closed = true;
            inner.bytes = 0;
            let dropped = (std::mem::take(&mut inner.queue), message);
            (inner.reader.take(), inner.room.clone(), dropped)
        };
        drop(dropped);
        wake_reader(reader);
        if let Some(room) = room {
            room.notify_waiters();
        }
        false
    }

    /// Queues a message, waiting for room.
    pub async fn send(&self, mut message: Outbound) -> Result<(), Closed> {
        let size = message.wire_len();
        loop {
            message = match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(back) => back,
            };
            let room = {
                let mut inner = self.inner();
                if inner.closed {
                    return Err(Closed);
                }
                Arc::clone(inner.room.get_or_insert_with(Arc::default))
            };
            let mut room = std::pin::pin!(room.notified());
            // Registered before the mailbox is looked at again: a message taken or a close from
            // here on wakes it.
            room.as_mut().enable();
            let still_full = {
                let inner = self.inner();
                !inner.closed && !inner.has_room(size)
            };
            if still_full {
                room.await;
            }
        }
    }

    /// Takes the oldest message, if any; frees the queue's memory once it is empty.
    pub fn try_recv(&self) -> Option<Outbound> {
        self.take(None)
    }

    /// Takes the oldest message, or (with a context) leaves the task's waker to be woken by
    /// the next one.
    fn take(&self, cx: Option<&Context<'_>>) -> Option<Outbound> {
        let (message, room) = {
            let mut inner = self.inner();
            let message = inner.queue.pop_front();
            if let Some(message) = &message {
                let size = u32::try_from(message.wire_len()).unwrap_or(u32::MAX);
                inner.bytes = inner.bytes.saturating_sub(size);
            }
            if inner.queue.is_empty() && inner.queue.capacity() > 0 {
                inner.queue = VecDeque::new();
            }
            match (&message, cx) {
                (Some(_), _) => (message, inner.room.clone()),
                (None, Some(cx)) => {
                    inner.wait(cx);
                    (None, None)
                }
                (None, None) => (None, None),
            }
        };
        // One place freed: one waiting sender (or the next to wait) may take it.
        if let Some(room) = room {
            room.notify_one();
        }
        message
    }

    /// Waits for the next message. Cancel-safe: a message is only taken when it is returned.
    /// Only the session's own task waits on its mailbox (one waker is kept, not a list).
    pub async fn recv(&self) -> Outbound {
        std::future::poll_fn(|cx| match self.take(Some(cx)) {
            Some(message) => Poll::Ready(message),
            None => Poll::Pending,
        })
        .await
    }

    /// The next thing a busy session must look at: its queue overflowed, a message, or a wake-up
    /// without one (the heartbeat sweep or a shutdown: the session looks at its deadline and
    /// the shutdown again). Cancel-safe, and only the session's own task waits on it, as for
    /// [`Mailbox::recv`]. A busy session so needs no timer and no shutdown future of its own.
    pub async fn next_event(&self) -> MailEvent {
        std::future::poll_fn(|cx| {
            if self.is_overflowed() {
                return Poll::Ready(MailEvent::Overflowed);
            }
            if let Some(message) = self.take(Some(cx)) {
                return Poll::Ready(MailEvent::Message(message));
            }
            if std::mem::take(&mut self.inner().woken) {
                return Poll::Ready(MailEvent::Woken);
            }
            Poll::Pending
        })
        .await
    }

    /// Ready with `true` when something is queued, with `false` when the session was woken to
    /// look at its state again (which may be spuriously); takes nothing. Otherwise the task is
    /// woken by either. Only the session's own task polls it, as for [`Mailbox::recv`].
    pub fn poll_woken(&self, cx: &Context<'_>) -> Poll<bool> {
        let mut inner = self.inner();
        if !inner.queue.is_empty() || inner.behind {
            return Poll::Ready(true);
        }
        if std::mem::take(&mut inner.woken) {
            return Poll::Ready(false);
        }
        inner.wait(cx);
        Poll::Pending
    }

    /// Makes the session read its device's queue from the store again, and wakes it.
    pub fn fall_behind(&self) {
        let reader = {
            let mut inner = self.inner();
            inner.behind = true;
            inner.woken = true;
            inner.reader.take()
        };
        wake_reader(reader);
    }

    /// Wakes the session's idle wait without a message.
    pub fn wake(&self) {
        let reader = {
            let mut inner = self.inner();
            inner.woken = true;
            inner.reader.take()
        };
        wake_reader(reader);
    }

    /// Moves the session's heartbeat deadline.
    pub fn heard_until(&self, deadline_ms: u64) {
        self.heard_until.store(deadline_ms, Ordering::Relaxed);
    }

    /// Whether the heartbeat deadline has passed at `now_ms`.
    pub fn lapsed(&self, now_ms: u64) -> bool {
        now_ms >= self.heard_until.load(Ordering::Relaxed)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner().queue.is_empty()
    }

    /// Whether a delivery was dropped for lack of room since the last call (and clears it).
    pub fn take_behind(&self) -> bool {
        std::mem::take(&mut self.inner().behind)
    }

    /// Signs the session out, whatever its queue holds: `SignOut` goes after what is queued (one
    /// past the bound if the queue is full, so that it is never dropped; what is queued, such as
    /// the answer to the `Disable` that signed the account out, is still written), nothing more
    /// can be queued, and the session is woken. From here on it runs no further request
    /// ([`Mailbox::is_revoked`]), even before it reaches the `SignOut`.
    pub fn revoke(&self, reason: &'static str) {
        let (reader, room) = {
            let mut inner = self.inner();
            if !inner.revoked {
                inner.revoked = true;
                inner.closed = true;
                inner.queue.push_back(Outbound::SignOut(reason));
            }
            (inner.reader.take(), inner.room.clone())
        };
        wake_reader(reader);
        if let Some(room) = room {
            room.notify_waiters();
        }
    }

    /// Whether the session was signed out: checked before each request is run.
    pub fn is_revoked(&self) -> bool {
        self.inner().revoked
    }

    /// Ready once a delivery found the queue over its byte bound ([`SESSION_QUEUE_BYTES`]):
    /// the session is to close. Otherwise the session's task is woken by it. Only the session's
    /// own task polls it, as for [`Mailbox::recv`]; meaningful while the session runs (its own
    /// close at the end also closes the mailbox).
    pub fn poll_overflowed(&self, cx: &Context<'_>) -> Poll<()> {
        let mut inner = self.inner();
        if inner.closed && !inner.revoked {
            return Poll::Ready(());
        }
        inner.wait(cx);
        Poll::Pending
    }

    /// Whether the queue overflowed (see [`Mailbox::poll_overflowed`]), without waiting.
    pub fn is_overflowed(&self) -> bool {
        let inner = self.inner();
        inner.closed && !inner.revoked
    }

    /// [`Mailbox::poll_overflowed`] as a future.
    pub async fn overflowed(&self) {
        std::future::poll_fn(|cx| self.poll_overflowed(cx)).await;
    }

    /// Refuses further messages and wakes anyone waiting for room. The session's waker is
    /// dropped, so that answers still holding the mailbox do not keep its task's memory.
    pub fn close(&self) {
        let (reader, room) = {
            let mut inner = self.inner();
            inner.closed = true;
            (inner.reader.take(), inner.room.clone())
        };
        drop(reader);
        if let Some(room) = room {
            room.notify_waiters();
        }
    }

    /// The queue and the reader's waker. Nothing panics while holding the lock, so a poisoned
    /// lock (which could only come from an allocation failure) still holds a whole queue.
    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A session's mailbox, shared by the session and everything that answers it.
pub type Outbox = Arc<Mailbox>;

#[derive(Debug)]
struct Entry {
    session: u64,
    listen: bool,
    tx: Outbox,
    /// Who may see the device online while this session lasts (`PresenceSet`); none yet: nobody.
    /// Kept here only, in memory, and gone with the session.
    presence: Option<Box<Setting>>,
}

/// The device holds as many sessions as it may; the newest is refused, never an older one (a
/// client that lost its connection gets in again once the lost session's heartbeat lapses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManySessions;

/// A session's registration, removed from the hub when dropped.
#[derive(Debug)]
pub struct Registration {
    hub: Arc<Hub>,
    device: DeviceId,
    session: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(self.device, self.session);
    }
}

/// Each device's live sessions: the first in one table, any further ones (a device logged in
/// twice, briefly, while a new connection replaces an old one) in a second. Most devices hold
/// one session, which then costs a slot in the first table and no allocation of its own.
#[derive(Debug, Default)]
struct Sessions {
    first: HashMap<DeviceId, Entry>,
    more: HashMap<DeviceId, Vec<Entry>>,
}

impl Sessions {
    /// Adds a session; true when it is its device's first here.
    fn add(&mut self, device: DeviceId, entry: Entry) -> bool {
        match self.first.entry(device) {
            hash_map::Entry::Vacant(slot) => {
                slot.insert(entry);
                true
            }
            hash_map::Entry::Occupied(_) => {
                self.more.entry(device).or_default().push(entry);
                false
            }
        }
    }

    /// Removes a session; true when its device has none left here.
    fn remove(&mut self, device: DeviceId, session: u64) -> bool {
        if self
            .first
            .get(&device)
            .is_some_and(|entry| entry.session == session)
        {
            // Another session of the device, if any, takes the first table's slot.
            let next = self.more.get_mut(&device).and_then(Vec::pop);
            if self.more.get(&device).is_some_and(Vec::is_empty) {
                self.more.remove(&device);
            }
            match next {
                Some(next) => {
                    self.first.insert(device, next);
                }
                None => {
                    self.first.remove(&device);
                    return true;
                }
            }
        } else if let Some(others) = self.more.get_mut(&device) {
            others.retain(|entry| entry.session != session);
            if others.is_empty() {
                self.more.remove(&device);
            }
        }
        false
    }

    /// The sessions of one device.
    fn of(&self, device: &DeviceId) -> impl Iterator<Item = &Entry> {
        let more = self.more.get(device).into_iter().flatten();
        self.first.get(device).into_iter().chain(more)
    }

    fn all(&self) -> impl Iterator<Item = &Entry> {
        self.first.values().chain(self.more.values().flatten())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.first.len() + self.more.values().map(Vec::len).sum::<usize>()
    }
}

/// The live sessions of this node.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: Mutex<Sessions>,
    next: AtomicU64,
    /// The other nodes, when there are ([`crate::bus`]): told which devices are served here,
    /// and handed what is for a device served elsewhere.
    bus: OnceLock<Arc<Bus>>,
}

impl Hub {
    /// Registers a logged-in session, unless its device holds `most` sessions already (checked
    /// and added under one lock, so that logins at once cannot pass the bound together).
    /// Session numbers are drawn under the lock, so they grow in the order sessions become
    /// visible (see [`Hub::notify`]).
    pub fn add(
        self: &Arc<Self>,
        device: DeviceId,
        listen: bool,
        tx: Outbox,
        most: usize,
    ) -> Result<Registration, TooManySessions> {
        let mut sessions = self.sessions.lock().ok();
        if let Some(sessions) = sessions.as_mut() {
            if sessions.of(&device).count() >= most {
                return Err(TooManySessions);
            }
        }
        let session = self.next.fetch_add(1, Ordering::Relaxed);
        let first = sessions.as_mut().is_some_and(|sessions| {
            sessions.add(
                device,
                Entry {
                    session,
                    listen,
                    tx,
                    presence: None,
                },
            )
        });
        drop(sessions);
        if first {
            if let Some(bus) = self.bus.get() {
                bus.announce(device, true);
            }
        }
        Ok(Registration {
            hub: Arc::clone(self),
            device,
            session,
        })
    }

    fn remove(&self, device: DeviceId, session: u64) {
        let gone = self
            .sessions
            .lock()
            .is_ok_and(|mut sessions| sessions.remove(device, session));
        if gone {
            if let Some(bus) = self.bus.get() {
                bus.announce(device, false);
            }
        }
    }

    /// Links this node's hub to the other nodes (once, when the server starts).
    pub fn join(&self, bus: Arc<Bus>) {
        let _ = self.bus.set(bus);
    }

    /// The link to the other nodes, if there are.
    pub fn bus(&self) -> Option<&Arc<Bus>> {
        self.bus.get()
    }

    /// The devices with a session here.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.sessions
            .lock()
            .map(|sessions| sessions.first.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Makes the listening sessions numbered from `first` to before `until` read their
    /// device's queue from the store again.
    pub fn fall_behind_from(&self, first: u64, until: u64) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for entry in sessions
            .all()
            .filter(|e| e.listen && (first..until).contains(&e.session))
        {
            entry.tx.fall_behind();
        }
    }

    /// Wakes every session whose heartbeat deadline has passed at `now_ms` (or every session),
    /// so that an idle one notices and closes: one sweep instead of a timer per session.
    pub fn wake_lapsed(&self, now_ms: Option<u64>) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for entry in sessions.all() {
            if now_ms.is_none_or(|now| entry.tx.lapsed(now)) {
                entry.tx.wake();
            }
        }
    }

    /// Whether the device holds a live listening session here.
    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.sessions
            .lock()
            .map(|sessions| sessions.of(device).any(|e| e.listen))
            .unwrap_or(false)
    }

    /// Sets who may see the device online through the session whose mailbox is `outbox`, while
    /// it lasts; false if that session is no longer registered.
    pub fn set_presence(&self, device: &DeviceId, outbox: &Outbox, setting: Setting) -> bool {
        let Ok(mut sessions) = self.sessions.lock() else {
            return false;
        };
        let Sessions { first, more } = &mut *sessions;
        let mut entries = first
            .get_mut(device)
            .into_iter()
            .chain(more.get_mut(device).into_iter().flatten());
        match entries.find(|entry| Arc::ptr_eq(&entry.tx, outbox)) {
            Some(entry) => {
                entry.presence = Some(Box::new(setting));
                true
            }
            None => false,
        }
    }

    /// How many of these devices show themselves online to the device `asker`, which presented
    /// `proofs` (a MAC per device) at `now`: a device in mode everyone, or in mode contacts with
    /// a valid proof. Every answer that could tell a sender whether a receiver is online goes
    /// through here (P7).
    pub fn count_visible<'a>(
        &self,
        devices: impl IntoIterator<Item = &'a DeviceId>,
        asker: DeviceId,
        proofs: &[(DeviceId, Secret)],
        now: Millis,
    ) -> usize {
        // The settings are copied out under the lock and the proofs checked after it, so that
        // no HMAC is computed while every session's delivery waits for the hub.
        let settings: Vec<(DeviceId, Vec<Setting>)> = {
            let Ok(sessions) = self.sessions.lock() else {
                return 0;
            };
            devices
                .into_iter()
                .map(|device| {
                    let listening = sessions.of(device).filter(|entry| entry.listen);
                    let shown = listening.filter_map(|entry| entry.presence.as_deref().cloned());
                    (*device, shown.collect())
                })
                .collect()
        };
        settings
            .iter()
            .filter(|(device, settings)| {
                let mac = proofs
                    .iter()
                    .find(|(proven, _)| proven == device)
                    .map(|(_, mac)| mac);
                settings
                    .iter()
                    .any(|setting| setting.shows_to(asker, mac, now))
            })
            .count()
    }

    /// How many of these devices are online, whoever they show themselves to.
    #[cfg(test)]
    pub fn count_online<'a>(&self, devices: impl IntoIterator<Item = &'a DeviceId>) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        devices
            .into_iter()
            .filter(|device| sessions.of(device).any(|e| e.listen))
            .count()
    }

    /// The number the next session to register will get (see [`Hub::deliver_from`]).
    pub fn next_session(&self) -> u64 {
        self.next.load(Ordering::Relaxed)
    }

    /// Offers a stored copy to every listening session of a device, or, when none here took
    /// it, to the node that serves the device, if another one does; returns how many sessions
    /// here took it.
    pub fn deliver(&self, device: &DeviceId, frame: &Frame) -> usize {
        self.deliver_from(device, frame, 0)
    }

    /// [`Hub::deliver`] to the sessions registered from `first` on (those that had not
    /// registered when an earlier offer of the same copy was made).
    pub fn deliver_from(&self, device: &DeviceId, frame: &Frame, first: u64) -> usize {
        let delivered = self.deliver_here(device, frame, first);
        if delivered == 0 {
            if let Some(bus) = self.bus.get() {
                bus.forward(device, frame, true);
            }
        }
        delivered
    }

    /// [`Hub::deliver_from`] to this node's sessions only: for a held copy, which never leaves
    /// its node ([`crate::held`]).
    pub fn deliver_here(&self, device: &DeviceId, frame: &Frame, first: u64) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        let mut delivered = 0;
        for entry in sessions
            .of(device)
            .filter(|e| e.listen && e.session >= first)
        {
            if entry.tx.offer(Outbound::Deliver(frame.clone())) {
                delivered += 1;
            }
        }
        delivered
    }

    /// Sends a frame to every session of a device (listening or not), dropping it for a session
    /// whose queue is full (receipts stay stored and are sent again at the next login); when the
    /// device has no session here, to the node that serves it, if another one does.
    pub fn notify(&self, device: &DeviceId, frame: &Frame) {
        self.notify_from(device, frame, 0);
    }

    /// [`Hub::notify`] for the sessions registered from `first` on; returns the number the
    /// next session will get, so that a caller can later reach exactly the sessions that
    /// registered after this call. Only the first offer (`first` 0) goes to another node.
    pub fn notify_from(&self, device: &DeviceId, frame: &Frame, first: u64) -> u64 {
        let Ok(sessions) = self.sessions.lock() else {
            return first;
        };
        let mut here = false;
        for entry in sessions.of(device) {
            here = true;
            if entry.session >= first {
                let _ = entry.tx.try_send(Outbound::Frame(frame.clone()));
            }
        }
        let next = self.next.load(Ordering::Relaxed);
        drop(sessions);
        if !here && first == 0 {
            if let Some(bus) = self.bus.get() {
                bus.forward(device, frame, false);
            }
        }
        next
    }

    /// Signs out every session of these devices, here and on every other node.
    pub fn sign_out(&self, devices: &[DeviceId], reason: &'static str) {
        self.sign_out_here(devices, reason);
        if let Some(bus) = self.bus.get() {
            bus.sign_out(devices, reason);
        }
    }

    /// Signs out this node's sessions of these devices.
    pub fn sign_out_here(&self, devices: &[DeviceId], reason: &'static str) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for entry in devices.iter().flat_map(|device| sessions.of(device)) {
            // Out of band of the queue: a full queue must not keep a signed-out session alive.
            entry.tx.revoke(reason);
        }
    }

    /// Live sessions on this node.
    #[cfg(test)]
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .map(|sessions| sessions.len())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_proto::frame::{Kind, Ping};

    fn ping(nonce: u64) -> Outbound {
        Outbound::Frame(Kind::Ping(Ping { nonce }).into())
    }

    fn nonce(message: Option<Outbound>) -> Option<u64> {
        match message? {
            Outbound::Frame(Frame {
                kind: Some(Kind::Ping(Ping { nonce })),
            }) => Some(nonce),
            other => panic!("not a ping: {other:?}"),
        }
    }

    fn full_mailbox() -> Outbox {
        let mailbox = Mailbox::new();
        for n in 0..SESSION_QUEUE as u64 {
            assert!(mailbox.try_send(ping(n)).is_ok());
        }
        assert!(
            mailbox.try_send(ping(u64::MAX)).is_err(),
            "the queue is bounded"
        );
        mailbox
    }

    #[test]
    fn an_idle_mailbox_fits_in_96_bytes() {
        // With its two reference counts: the allocator's 96-byte class. Memory per idle
        // connection is measured by the benchmark's idle phase; this keeps the mailbox's share.
        assert!(std::mem::size_of::<Mailbox>() + 16 <= 96);
    }

    #[tokio::test]
    async fn a_sender_waits_for_room_and_is_queued_when_a_message_is_taken() {
        let mailbox = full_mailbox();
        let waiting = tokio::spawn({
            let mailbox = Arc::clone(&mailbox);
            async move { mailbox.send(ping(9_999)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "a full mailbox holds its sender back"
        );
        assert_eq!(nonce(mailbox.try_recv()), Some(0));
        let sent = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert_eq!(sent.ok().and_then(Result::ok), Some(Ok(())));
        for n in 1..SESSION_QUEUE as u64 {
            assert_eq!(nonce(mailbox.try_recv()), Some(n));
        }
        assert_eq!(
            nonce(mailbox.try_recv()),
            Some(9_999),
            "queued behind the others"
        );
        assert_eq!(nonce(mailbox.try_recv()), None);
    }

    #[tokio::test]
    async fn closing_a_full_mailbox_releases_its_waiting_senders() {
        let mailbox = full_mailbox();
        let waiting: Vec<_> = (0..3)
            .map(|n| {
                let mailbox = Arc::clone(&mailbox);
                tokio::spawn(async move { mailbox.send(ping(n)).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        mailbox.close();
        for sender in waiting {
            let sent = tokio::time::timeout(std::time::Duration::from_secs(5), sender).await;
            assert_eq!(sent.ok().and_then(Result::ok), Some(Err(Closed)));
        }
        assert!(
            mailbox.try_send(ping(0)).is_err(),
            "a closed mailbox takes nothing"
        );
    }

    #[test]
    fn a_sign_out_holds_whatever_the_queue_holds() {
        let hub = Arc::new(Hub::default());
        let device = DeviceId([9; DeviceId::LEN]);
        for (mailbox, queued) in [(Mailbox::new(), 0), (full_mailbox(), SESSION_QUEUE)] {
            let _registration = hub.add(device, true, Arc::clone(&mailbox), usize::MAX);
            assert!(!mailbox.is_revoked());
            hub.sign_out(&[device], "removed");
            assert!(mailbox.is_revoked());
            assert!(mailbox.try_send(ping(1)).is_err(), "nothing more is queued");
            for n in 0..queued as u64 {
                assert_eq!(nonce(mailbox.try_recv()), Some(n), "what was queued stays");
            }
            assert!(
                matches!(mailbox.try_recv(), Some(Outbound::SignOut("removed"))),
                "the sign-out comes after, even past the bound"
            );
            assert!(mailbox.try_recv().is_none());
        }
    }

    #[test]
    fn a_delivery_past_the_byte_bound_closes_the_session_and_lets_its_queue_go() {
        let hub = Arc::new(Hub::default());
        let device = DeviceId([5; DeviceId::LEN]);
        let mailbox = Mailbox::new();
        let _registration = hub.add(device, true, Arc::clone(&mailbox), usize::MAX);
        let deliver: Frame = Kind::Deliver(tidings_proto::frame::Deliver {
            payload: bytes::Bytes::from(vec![1u8; 60 * 1024]),
            ..Default::default()
        })
        .into();
        let size = 4 + deliver.encoded_len();
        let fit = SESSION_QUEUE_BYTES / size;
        for n in 0..fit {
            assert_eq!(hub.deliver(&device, &deliver), 1, "delivery {n} fits");
        }
        let cx = Context::from_waker(Waker::noop());
        assert!(mailbox.poll_overflowed(&cx).is_pending());
        assert_eq!(hub.deliver(&device, &deliver), 0, "one more does not fit");
        assert!(
            mailbox.poll_overflowed(&cx).is_ready(),
            "the session is to close"
        );
        assert!(mailbox.is_empty(), "its queue is let go");
        assert!(!mailbox.take_behind(), "it is not read again: it closes");
        assert!(mailbox.try_send(ping(1)).is_err(), "nothing more is queued");
        // A sign-out still reaches a revoked mailbox's session, which is not an overflow.
        let revoked = Mailbox::new();
        revoked.revoke("removed");
        assert!(revoked.poll_overflowed(&cx).is_pending());
    }

    #[test]
    fn a_delivery_that_does_not_fit_marks_the_session_behind() {
        let hub = Arc::new(Hub::default());
        let device = DeviceId([7; DeviceId::LEN]);
        let mailbox = full_mailbox();
        let _registration = hub.add(device, true, Arc::clone(&mailbox), usize::MAX);
        let frame: Frame = Kind::Ping(Ping { nonce: 1 }).into();
        assert_eq!(hub.deliver(&device, &frame), 0);
        assert!(mailbox.take_behind());
        assert!(!mailbox.take_behind(), "taken once");
    }

    #[test]
    fn a_device_keeps_its_other_sessions_when_one_ends() {
        let hub = Arc::new(Hub::default());
        let device = DeviceId([1; DeviceId::LEN]);
        let other = DeviceId([2; DeviceId::LEN]);
        let frame: Frame = Kind::Ping(Ping { nonce: 1 }).into();
        let boxes: Vec<Outbox> = (0..3).map(|_| Mailbox::new()).collect();
        let mut registrations: Vec<Option<Registration>> = boxes
            .iter()
            .map(|mailbox| hub.add(device, true, Arc::clone(mailbox), 3).ok())
            .collect();
        assert_eq!(
            hub.add(device, false, Mailbox::new(), 3).err(),
            Some(TooManySessions),
            "a fourth session is over the bound of three"
        );
        let _other = hub.add(other, false, Mailbox::new(), 3);
        assert_eq!(hub.session_count(), 4);
        assert_eq!(hub.deliver(&device, &frame), 3);
        assert!(
            !hub.is_online(&other),
            "a session that does not listen is not online"
        );

        // A session kept beside the first ends, then the first (the other takes its place).
        for (ended, left) in [(1, 2), (0, 1)] {
            registrations[ended] = None;
            assert_eq!(hub.session_count(), left + 1);
            assert_eq!(hub.deliver(&device, &frame), left);
            assert!(hub.is_online(&device));
            assert_eq!(hub.count_online([&device, &other]), 1);
        }
        registrations[2] = None;
        assert!(!hub.is_online(&device));
        assert_eq!(hub.deliver(&device, &frame), 0);
        assert_eq!(hub.session_count(), 1);

        // Each mailbox got exactly the deliveries made while its session was registered.
        let counts: Vec<usize> = boxes
            .iter()
            .map(|mailbox| std::iter::from_fn(|| mailbox.try_recv()).count())
            .collect();
        assert_eq!(counts, [2, 1, 3]);
    }

    #[test]
    fn a_device_is_visible_only_as_its_listening_sessions_setting_allows() {
        use tidings_core::presence::{proof, token, Mode};
        let hub = Arc::new(Hub::default());
        let device = DeviceId([1; DeviceId::LEN]);
        let asker = DeviceId([2; DeviceId::LEN]);
        let (listening, quiet) = (Mailbox::new(), Mailbox::new());
        let _listen = hub.add(device, true, Arc::clone(&listening), 4).ok();
        let _quiet = hub.add(device, false, Arc::clone(&quiet), 4).ok();
        let key = [9; 32];
        let mac = proof(&token(&key, asker), 0);
        let visible =
            |proofs: &[(DeviceId, Secret)]| hub.count_visible([&device], asker, proofs, 0);
        // Online, but no setting yet: shown to nobody.
        assert_eq!(visible(&[(device, mac)]), 0);
        // A session that does not listen shows nothing, whatever it sets.
        let everyone = Setting {
            mode: Mode::Everyone,
            key,
        };
        assert!(hub.set_presence(&device, &quiet, everyone));
        assert_eq!(visible(&[]), 0);
        let contacts = Setting {
            mode: Mode::Contacts,
            key,
        };
        assert!(hub.set_presence(&device, &listening, contacts));
        assert_eq!(visible(&[]), 0);
        assert_eq!(visible(&[(device, mac)]), 1);
        assert_eq!(visible(&[(asker, mac)]), 0);
        assert!(!hub.set_presence(
            &device,
            &Mailbox::new(),
            Setting {
                mode: Mode::Nobody,
                key
            }
        ));
    }
}
