//! Live sessions on this node: which devices are online, and how to reach their sessions.
//!
//! Only sessions are kept here, never accounts or numbers: the hub is as large as the number of
//! open connections. A multi-node deployment replaces the reach-a-device half with a bus; the
//! server only uses the methods below.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use tidings_proto::frame::Frame;
use tidings_proto::id::DeviceId;
use tokio::sync::Notify;

/// Frames queued per session before the session counts as slow.
pub const SESSION_QUEUE: usize = 1024;

/// What a session is asked to do.
#[derive(Debug)]
pub enum Outbound {
    /// Write this frame.
    Frame(Frame),
    /// Write a delivery; `seq` is its place in the device's stored queue.
    Deliver { seq: i64, frame: Frame },
    /// The device was signed out (replaced, removed or disabled): say so and close.
    SignOut(&'static str),
}

/// A session's queue of frames to write: bounded, and holding no allocation while empty, so an
/// idle session costs only this struct. (A channel would keep a block of slots per session.)
/// Its one reader is the session's task, whose waker it keeps (no wait list is needed).
#[derive(Debug, Default)]
pub struct Mailbox {
    inner: Mutex<Inner>,
    /// The session's heartbeat deadline (on [`clock_ms`]), for the hub's sweep.
    heard_until: AtomicU64,
    closed: AtomicBool,
    /// Set when a delivery did not fit; the session re-reads the store.
    behind: AtomicBool,
    room: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    queue: VecDeque<Outbound>,
    /// The session's task while it waits for a message or a wake-up.
    reader: Option<Waker>,
    /// Woken without a message (heartbeat sweep, shutdown) since the session last looked.
    woken: bool,
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
}

/// Wakes the session's task taken from its mailbox, outside the mailbox's lock.
fn wake_reader(reader: Option<Waker>) {
    if let Some(reader) = reader {
        reader.wake();
    }
}

/// The start of the monotonic clock that heartbeat deadlines are kept on: a step of the wall
/// clock must neither close every idle session nor keep dead ones.
fn clock_start() -> std::time::Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *START.get_or_init(std::time::Instant::now)
}

/// Milliseconds on the heartbeat clock.
pub fn clock_ms() -> u64 {
    u64::try_from(clock_start().elapsed().as_millis()).unwrap_or(u64::MAX)
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
        if self.closed.load(Ordering::Acquire) {
            return Err(message);
        }
        let reader = {
            let mut inner = self.inner();
            if inner.queue.len() >= SESSION_QUEUE {
                return Err(message);
            }
            inner.queue.push_back(message);
            inner.reader.take()
        };
        wake_reader(reader);
        Ok(())
    }

    /// Queues a message, waiting for room.
    pub async fn send(&self, mut message: Outbound) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            match self.try_send(message) {
                Ok(()) => return Ok(()),
                Err(back) if self.closed.load(Ordering::Acquire) => {
                    drop(back);
                    return Err(Closed);
                }
                Err(back) => message = back,
            }
            room.await;
        }
    }

    /// Takes the oldest message, if any; frees the queue's memory once it is empty.
    pub fn try_recv(&self) -> Option<Outbound> {
        self.take(None)
    }

    /// Takes the oldest message, or (with a context) leaves the task's waker to be woken by
    /// the next one.
    fn take(&self, cx: Option<&Context<'_>>) -> Option<Outbound> {
        let message = {
            let mut inner = self.inner();
            let message = inner.queue.pop_front();
            if inner.queue.is_empty() && inner.queue.capacity() > 0 {
                inner.queue = VecDeque::new();
            }
            if let (None, Some(cx)) = (&message, cx) {
                inner.wait(cx);
            }
            message
        };
        if message.is_some() {
            self.room.notify_waiters();
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

    /// Ready with `true` when something is queued, with `false` when the session was woken to
    /// look at its state again (which may be spuriously); takes nothing. Otherwise the task is
    /// woken by either. Only the session's own task polls it, as for [`Mailbox::recv`].
    pub fn poll_woken(&self, cx: &Context<'_>) -> Poll<bool> {
        let mut inner = self.inner();
        if !inner.queue.is_empty() {
            return Poll::Ready(true);
        }
        if std::mem::take(&mut inner.woken) {
            return Poll::Ready(false);
        }
        inner.wait(cx);
        Poll::Pending
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

    /// The heartbeat deadline as an instant, for a session that waits on a timer of its own.
    pub fn deadline(&self) -> tokio::time::Instant {
        let after = std::time::Duration::from_millis(self.heard_until.load(Ordering::Relaxed));
        tokio::time::Instant::from_std(clock_start() + after)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.inner().queue.is_empty()
    }

    /// Whether a delivery was dropped for lack of room since the last call (and clears it).
    pub fn take_behind(&self) -> bool {
        self.behind.swap(false, Ordering::AcqRel)
    }

    /// Refuses further messages and wakes anyone waiting for room. The session's waker is
    /// dropped, so that answers still holding the mailbox do not keep its task's memory.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.room.notify_waiters();
        let reader = self.inner().reader.take();
        drop(reader);
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
}

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

/// The live sessions of this node.
#[derive(Debug, Default)]
pub struct Hub {
    sessions: Mutex<HashMap<DeviceId, Vec<Entry>>>,
    next: AtomicU64,
}

impl Hub {
    /// Registers a logged-in session. Session numbers are drawn under the lock, so they grow
    /// in the order sessions become visible (see [`Hub::notify`]).
    pub fn add(self: &Arc<Self>, device: DeviceId, listen: bool, tx: Outbox) -> Registration {
        let mut sessions = self.sessions.lock().ok();
        let session = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(sessions) = sessions.as_mut() {
            // Room for one session: most devices hold one (an empty `Vec` would grow to four).
            sessions
                .entry(device)
                .or_insert_with(|| Vec::with_capacity(1))
                .push(Entry {
                    session,
                    listen,
                    tx,
                });
        }
        drop(sessions);
        Registration {
            hub: Arc::clone(self),
            device,
            session,
        }
    }

    fn remove(&self, device: DeviceId, session: u64) {
        if let Ok(mut sessions) = self.sessions.lock() {
            if let Some(entries) = sessions.get_mut(&device) {
                entries.retain(|entry| entry.session != session);
                if entries.is_empty() {
                    sessions.remove(&device);
                }
            }
        }
    }

    /// Wakes every session whose heartbeat deadline has passed at `now_ms` (or every session),
    /// so that an idle one notices and closes: one sweep instead of a timer per session.
    pub fn wake_lapsed(&self, now_ms: Option<u64>) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for entry in sessions.values().flatten() {
            if now_ms.is_none_or(|now| entry.tx.lapsed(now)) {
                entry.tx.wake();
            }
        }
    }

    /// Whether the device holds a live listening session.
    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.sessions
            .lock()
            .map(|sessions| {
                sessions
                    .get(device)
                    .is_some_and(|entries| entries.iter().any(|e| e.listen))
            })
            .unwrap_or(false)
    }

    /// How many of these devices are online.
    pub fn count_online<'a>(&self, devices: impl IntoIterator<Item = &'a DeviceId>) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        devices
            .into_iter()
            .filter(|device| {
                sessions
                    .get(device)
                    .is_some_and(|entries| entries.iter().any(|e| e.listen))
            })
            .count()
    }

    /// Offers a delivery to every listening session of a device; returns how many took it.
    pub fn deliver(&self, device: &DeviceId, seq: i64, frame: &Frame) -> usize {
        let Ok(sessions) = self.sessions.lock() else {
            return 0;
        };
        let Some(entries) = sessions.get(device) else {
            return 0;
        };
        let mut delivered = 0;
        for entry in entries.iter().filter(|e| e.listen) {
            match entry.tx.try_send(Outbound::Deliver {
                seq,
                frame: frame.clone(),
            }) {
                Ok(()) => delivered += 1,
                Err(_) => entry.tx.behind.store(true, Ordering::Release),
            }
        }
        delivered
    }

    /// Sends a frame to every session of a device (listening or not), dropping it for a session
    /// whose queue is full (receipts stay stored and are sent again at the next login).
    pub fn notify(&self, device: &DeviceId, frame: &Frame) {
        self.notify_from(device, frame, 0);
    }

    /// [`Hub::notify`] for the sessions registered from `first` on; returns the number the
    /// next session will get, so that a caller can later reach exactly the sessions that
    /// registered after this call.
    pub fn notify_from(&self, device: &DeviceId, frame: &Frame, first: u64) -> u64 {
        let Ok(sessions) = self.sessions.lock() else {
            return first;
        };
        if let Some(entries) = sessions.get(device) {
            for entry in entries.iter().filter(|entry| entry.session >= first) {
                let _ = entry.tx.try_send(Outbound::Frame(frame.clone()));
            }
        }
        self.next.load(Ordering::Relaxed)
    }

    /// Signs out every session of these devices.
    pub fn sign_out(&self, devices: &[DeviceId], reason: &'static str) {
        let Ok(sessions) = self.sessions.lock() else {
            return;
        };
        for device in devices {
            if let Some(entries) = sessions.get(device) {
                for entry in entries {
                    // A full queue must not keep a signed-out session alive: close it the hard
                    // way by marking it behind too; the session checks its device on re-read.
                    if entry.tx.try_send(Outbound::SignOut(reason)).is_err() {
                        entry.tx.behind.store(true, Ordering::Release);
                    }
                }
            }
        }
    }

    /// Live sessions on this node.
    pub fn session_count(&self) -> usize {
        self.sessions
            .lock()
            .map(|s| s.values().map(Vec::len).sum())
            .unwrap_or(0)
    }
}
