//! One upgraded connection: login, then frames in both directions until the client leaves, the
//! heartbeat lapses, the device is signed out, or the server shuts down.
//!
//! Requests that touch storage run as tasks of the session (bounded in number), so a send waiting
//! for its sync does not hold up the next frame. The session decides no request itself: each
//! frame becomes a `Request` that `request` dispatches to its handler. Everything the session
//! writes goes through one bounded queue and is coalesced into as few writes as the socket allows.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::{Signature, VerifyingKey};
use tidings_core::{heartbeat, Millis, SECOND};
use tidings_proto::codec::{self, CodecError};
use tidings_proto::frame::{self, ErrorCode, Frame, Kind};
use tidings_proto::id::DeviceId;
use tidings_store::{Backlog, Store};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::io::poll_read_buf;

use crate::clock::{now_ms, session_ms};
use crate::connection::{SessionSlot, Slot};
use crate::delivery::{drain_queue, send_pending_receipts};
use crate::hub::{MailEvent, Mailbox, Outbound, Outbox, Registration, TooManySessions};
use crate::identity::Identity;
use crate::reply::{error, fatal};
use crate::request::Request;
use crate::send::SendOrder;
use crate::state::Shared;

#[cfg(test)]
mod tests;

/// Time a client has to log in after the upgrade.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests of one session being served at once; past this the session stops reading.
const MAX_IN_FLIGHT: usize = 256;
/// How long a shutdown waits for a session's requests to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Room made for each read of a busy session, at least. A read that fills its room leaves the
/// socket marked readable, so the next costs a system call that finds nothing; with room to
/// spare, one read takes what came (a frame is usually a few hundred bytes) and the runtime knows
/// the socket is drained.
const READ_ROOM: usize = 4096;

async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, frame: &Frame) -> std::io::Result<()> {
    writer.write_all(&codec::encode_to_bytes(frame)).await?;
    writer.flush().await
}

/// Runs `work`, for at most `limit` once it first waits; `None` if it waited longer. The timer is
/// made only when the work waits: a socket with room takes a session's bytes at once, and a timer
/// made around every write (a runtime handle, a clock read and a deadline) cost about 130
/// instructions per write, for nothing when the write never waits.
async fn within<F: std::future::Future>(limit: Duration, work: F) -> Option<F::Output> {
    let mut work = std::pin::pin!(work);
    let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
    match first {
        Poll::Ready(output) => Some(output),
        Poll::Pending => tokio::time::timeout(limit, work).await.ok(),
    }
}

/// Reads until one whole frame of at most `limit` bytes is buffered; a longer one is refused as
/// soon as its length is read. `Ok(None)` is a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut BytesMut,
    limit: usize,
) -> Result<Option<Frame>, CodecError> {
    loop {
        if let Some(frame) = codec::decode_within(buf, limit)? {
            return Ok(Some(frame));
        }
        if let Some(needed) = codec::needed_within(buf, limit)? {
            buf.reserve(needed.saturating_sub(buf.len()));
        } else {
            buf.reserve(64);
        }
        match reader.read_buf(buf).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// How a connection being upgraded logs in: by signing the challenge its upgrade carried, or
/// already logged in by a resumption token its upgrade request presented.
pub enum Opening {
    Challenge([u8; 32]),
    Resumed(Resumed),
}

/// A device that a resumption token logged in ([`crate::resume`]): its session registered in
/// the hub, then the device checked in the store by the one read that also says what waits for
/// it (a login reads the device, then, once registered, its backlog).
pub struct Resumed {
    opened: Opened,
    keys: tidings_store::KeyStatus,
    backlog: Backlog,
}

/// Why a device whose token held is not resumed; the client then logs in by challenge.
#[derive(Debug)]
pub enum NotResumed {
    /// The device is no longer registered (removed, replaced or disabled).
    DeviceGone,
    /// The device holds as many sessions as it may (the challenge login then says so).
    TooManySessions,
    /// The store failed.
    Unavailable(tidings_store::StoreError),
}

impl Resumed {
    /// Registers a session of `device` in the hub, then reads the device in the store: it must
    /// still exist. Registered first, as a login's session is before its backlog is read, so
    /// that nothing stored after the read can miss it (that is pushed). A refusal drops the
    /// registration.
    pub async fn open<S: Store>(
        state: &Shared<S>,
        device: DeviceId,
        listen: bool,
    ) -> Result<Self, NotResumed> {
        let entry = HubEntry::add(state, device, listen)
            .map_err(|TooManySessions| NotResumed::TooManySessions)?;
        let (stored, keys, backlog) = match state.store.resume_device(device).await {
            Ok(Some(read)) => read,
            Ok(None) => return Err(NotResumed::DeviceGone),
            Err(e) => return Err(NotResumed::Unavailable(e)),
        };
        let identity = Identity {
            device,
            account: stored.account,
            budgets: state.keys.budget_key(&stored.pseudonym),
        };
        Ok(Self {
            opened: entry.with(identity),
            keys,
            backlog,
        })
    }
}

/// Runs a session on a connection being upgraded: waits for the upgrade, logs the client in,
/// then serves it; `slot` (the connection's place under the limit) is held until it ends. Not
/// an `async fn`: the opening (upgrade, login, registration) runs boxed and is gone once the
/// session is open, so the task of an idle connection holds the open session once and little
/// else (an `async fn` keeps its arguments beside what they are moved into).
pub fn start<S: Store>(
    state: Shared<S>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    opening: Opening,
    slot: Option<Slot>,
) -> impl std::future::Future<Output = ()> + Send {
    let opening = Box::pin(open_upgraded(state, on_upgrade, opening, slot));
    async move {
        // `let … else`: the opening's result is not kept beside the session it holds.
        let Some(serving) = opening.await else {
            return;
        };
        serving.await;
    }
}

/// Waits for the upgrade and opens the session on it; the answer is the open session's future.
/// A plain TCP connection is taken back from hyper (bytes hyper read past the upgrade request go
/// first), so an idle session holds no boxed stream; TLS runs on hyper's upgraded stream, and
/// its sessions (rarer, and heavier anyway) are boxed so that plain ones are not sized for them.
/// `None`: the connection is done.
async fn open_upgraded<S: Store>(
    state: Shared<S>,
    on_upgrade: hyper::upgrade::OnUpgrade,
    opening: Opening,
    slot: Option<Slot>,
) -> Option<impl std::future::Future<Output = ()> + Send> {
    use hyper_util::rt::TokioIo;
    use tokio_util::either::Either;
    let upgraded = on_upgrade.await.ok()?;
    Some(
        match upgraded.downcast::<TokioIo<tokio::net::TcpStream>>() {
            Ok(parts) => {
                let io = parts.io.into_inner();
                // Copied out, so that hyper's whole read buffer (which `read_buf` is a view of) is
                // freed now rather than held for the life of the session.
                let read = BytesMut::from(&parts.read_buf[..]);
                drop(parts.read_buf);
                let live = open(state, io, read, opening, slot).await?;
                Either::Left(live.run())
            }
            Err(upgraded) => {
                let live = open(
                    state,
                    TokioIo::new(upgraded),
                    BytesMut::new(),
                    opening,
                    slot,
                )
                .await?;
                Either::Right(Box::pin(live.run()))
            }
        },
    )
}

/// Logs the client in (unless a resumption token did) and registers its session. `None`: the
/// connection is done.
async fn open<S, Io>(
    state: Shared<S>,
    mut io: Io,
    mut buf: BytesMut,
    opening: Opening,
    slot: Option<Slot>,
) -> Option<Live<S, Io>>
where
    S: Store,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (opened, keys, backlog) = match opening {
        Opening::Challenge(challenge) => {
            let (identity, listen, keys) = log_in(&state, &mut io, &mut buf, &challenge).await?;
            // The session is registered before the login is answered, so that the device's
            // bound on sessions is checked and taken at once. What is queued for it meanwhile
            // is written after `LoginResult`.
            let Ok(opened) = Opened::register(&state, identity, listen) else {
                tracing::debug!("login refused: the device holds as many sessions as it may");
                let most = state.config.sessions_per_device;
                let refusal = fatal(
                    ErrorCode::TooManySessions,
                    format!("this device already has {most} sessions open, the most it may: close one (a lost one closes after its heartbeat lapses) and try again"),
                );
                let _ = write_frame(&mut io, &refusal).await;
                return None;
            };
            (opened, keys, None)
        }
        Opening::Resumed(Resumed {
            opened,
            keys,
            backlog,
        }) => (opened, keys, Some(backlog)),
    };
    let device = opened.identity.device;
    let login_result: Frame = Kind::LoginResult(frame::LoginResult {
        server_time_ms: now_ms(),
        heartbeat_seconds: state.config.heartbeat_seconds,
        one_time_keys: keys.one_time_keys,
        keys_published: keys.published,
        oprf_key_version: state.keys.current_version(),
        // A fresh token at every login and resumption: the one presented is used up.
        resume_token: state.resumption.issue(&state.keys, device, now_ms()),
    })
    .into();
    write_frame(&mut io, &login_result).await.ok()?;
    let slot = slot.map(Slot::logged_in);
    Some(register(state, io, buf, opened, backlog, slot).await)
}

/// A session that logged in and took its place in the hub.
struct Opened {
    identity: Identity,
    entry: HubEntry,
}

impl Opened {
    /// Registers a logged-in session in the hub, unless its device holds as many sessions as
    /// it may.
    fn register<S: Store>(
        state: &Shared<S>,
        identity: Identity,
        listen: bool,
    ) -> Result<Self, TooManySessions> {
        Ok(HubEntry::add(state, identity.device, listen)?.with(identity))
    }
}

/// A session's place in the hub, taken before its device's identity is known in full (a
/// resumed connect registers, then reads the device).
struct HubEntry {
    listen: bool,
    tx: Outbox,
    registration: Registration,
    heartbeat_interval: Millis,
}

impl HubEntry {
    /// Registers a session of `device` in the hub, unless the device holds as many sessions as
    /// it may. Its heartbeat deadline is set before the hub's sweep can see it.
    fn add<S: Store>(
        state: &Shared<S>,
        device: DeviceId,
        listen: bool,
    ) -> Result<Self, TooManySessions> {
        let tx = Mailbox::new();
        let heartbeat_interval = Millis::from(state.config.heartbeat_seconds) * SECOND;
        tx.heard_until(heartbeat::deadline(session_ms(), heartbeat_interval));
        let most = state.config.sessions_per_device;
        let registration = state.hub.add(device, listen, tx.clone(), most)?;
        Ok(Self {
            listen,
            tx,
            registration,
            heartbeat_interval,
        })
    }

    /// The registered session of `identity`, whose device this entry was added for.
    fn with(self, identity: Identity) -> Opened {
        Opened {
            identity,
            entry: self,
        }
    }
}

/// Starts what waits for a logged-in session's device; `backlog`: already read, after the
/// session registered (a resumed connect's read).
async fn register<S, Io>(
    state: Shared<S>,
    io: Io,
    buf: BytesMut,
    opened: Opened,
    backlog: Option<Backlog>,
    slot: Option<SessionSlot>,
) -> Live<S, Io>
where
    S: Store,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Opened {
        identity,
        entry:
            HubEntry {
                listen,
                tx,
                registration,
                heartbeat_interval,
            },
    } = opened;
    let mut live = Live {
        state,
        identity,
        listen,
        io,
        buf,
        tx,
        registration: Some(registration),
        tasks: None,
        send_order: None,
        heartbeat_interval,
        _slot: slot,
    };
    live.heard();
    live.state.metrics.sessions_active.inc();
    tracing::debug!(listen = listen, "session started");
    // What waits for the device is read once it is registered, so that nothing stored after the
    // read can miss it (that is pushed); a session with nothing waiting starts no reader. The
    // same read checks that the device still exists: a removal that committed after the login
    // read the device signed out every session registered by then, but not this one if it
    // registered later. (A storage error keeps the session: the login has just read the device.)
    let backlog = match backlog {
        Some(backlog) => backlog,
        None => live
            .state
            .store
            .backlog(identity.device)
            .await
            .unwrap_or(Backlog {
                registered: true,
                queued: true,
                receipts: true,
                missed: 0,
            }),
    };
    if !backlog.registered {
        tracing::debug!("session signed out: its device was removed while it logged in");
        live.tx
            .revoke("this device is no longer registered (removed, replaced or disabled)");
        return live;
    }
    if backlog.receipts {
        let receipts = send_pending_receipts(live.state.clone(), identity.device, live.tx.clone());
        live.tasks().spawn(receipts);
    }
    if listen && backlog.missed > 0 {
        // Told before the queue drains, at every listening start until the device says it has
        // shown the count (`MissedSeen`).
        let missed: Frame = Kind::Missed(frame::Missed {
            messages: backlog.missed,
        })
        .into();
        let tx = live.tx.clone();
        live.tasks().spawn(async move {
            let _ = tx.send(Outbound::Frame(missed)).await;
        });
    }
    if listen && backlog.queued {
        live.spawn_drain();
    }
    live
}

/// How a session ends: closed in order (requests already read finish and are answered), or
/// aborted after a protocol error.
enum End {
    Close,
    Abort,
}

/// A logged-in session's state, kept across its idle waits and busy stretches.
struct Live<S: Store, Io> {
    state: Shared<S>,
    identity: Identity,
    listen: bool,
    /// The connection, whole: a read waits (in the idle wait or the busy stretch's select) and
    /// writes run after it, never both at once, so it needs no split (whose shared half would
    /// cost an allocation per session).
    io: Io,
    /// Bytes read and not yet decoded.
    buf: BytesMut,
    tx: Outbox,
    /// Dropped when the session stops counting as online.
    registration: Option<Registration>,
    /// The session's requests in flight; made when the first one starts and dropped while idle
    /// (an empty `JoinSet` still holds an allocation).
    tasks: Option<JoinSet<()>>,
    /// Made at the first send: a session that only listens never needs one.
    send_order: Option<Arc<SendOrder>>,
    /// The interval between the client's heartbeats; the session may stay silent for
    /// [`heartbeat::MISSED_BEATS`] of them. Its deadline is kept in its mailbox, where the hub's
    /// sweep reads it.
    heartbeat_interval: Millis,
    /// The connection's place under the connection limit, given back when the session ends.
    _slot: Option<SessionSlot>,
}

impl<S, Io> Live<S, Io>
where
    S: Store,
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Serves the session, then ends it. Not an `async fn` taking `self`: that would keep the
    /// session twice in the task (the argument and the local it is moved into); the block below
    /// owns it once and lends it to [`Live::serve`].
    fn run(self) -> impl std::future::Future<Output = ()> + Send {
        let mut live = self;
        async move {
            let ended = live.serve().await;
            // The device no longer counts as online from here on.
            live.registration = None;
            match ended {
                End::Close => Box::pin(live.close()).await,
                End::Abort => {
                    // The connection is being dropped: answers have nowhere to go.
                    live.tx.close();
                    let tasks = live.tasks.take().unwrap_or_default();
                    Box::pin(finish(&live.state, tasks)).await;
                }
            }
        }
    }

    /// Serves the session until it ends. An idle session waits in a small future of its own;
    /// everything a busy stretch needs runs boxed, allocated while traffic flows. So an idle
    /// session's task holds little more than its socket and its mailbox. Idle or busy, its
    /// heartbeat deadline is checked by the hub's sweep and shutdown reaches it through the
    /// mailbox ([`Mailbox::next_event`]), so it keeps no timer and no cancellation future of its
    /// own: none is registered and dropped again on every turn of a busy session's loop.
    async fn serve(&mut self) -> End {
        loop {
            if self.is_idle() {
                self.release_buffers();
                if !self.idle_wait().await {
                    return self.ending();
                }
            }
            if let Some(end) = Box::pin(self.busy()).await {
                return end;
            }
        }
    }

    /// How a session that is to end ends: aborted when its queue overflowed (its client takes
    /// nothing, so nothing more is written), closed in order otherwise.
    fn ending(&self) -> End {
        if self.tx.is_overflowed() {
            tracing::debug!("session closed: more was queued for it than its queue's byte bound");
            End::Abort
        } else {
            End::Close
        }
    }

    /// A frame was read: the heartbeat deadline moves on.
    fn heard(&mut self) {
        let deadline = heartbeat::deadline(session_ms(), self.heartbeat_interval);
        self.tx.heard_until(deadline);
    }

    fn is_idle(&self) -> bool {
        self.tasks.as_ref().is_none_or(JoinSet::is_empty)
            && self.tx.is_empty()
            && self.buf.is_empty()
    }

    fn tasks(&mut self) -> &mut JoinSet<()> {
        self.tasks.get_or_insert_with(JoinSet::new)
    }

    /// An idle session holds no buffers and no task set: they are made again when traffic comes.
    fn release_buffers(&mut self) {
        if self.tasks.as_ref().is_some_and(JoinSet::is_empty) {
            self.tasks = None;
        }
        if self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    fn spawn_drain(&mut self) {
        let drain = drain_queue(self.state.clone(), self.identity.device, self.tx.clone());
        self.tasks().spawn(drain);
    }

    /// Waits, with nothing in flight, for a frame or a message to write; the hub's wake-up
    /// (heartbeat sweep, shutdown) makes it look again. False when the session is to end.
    /// Polled by hand: an idle session's task holds this future, so it keeps no `select!` state,
    /// no wait-list entry and no read buffer (a read makes room for [`READ_ROOM`] bytes; when
    /// nothing came, they are freed at once).
    fn idle_wait(&mut self) -> impl std::future::Future<Output = bool> + Send + '_ {
        std::future::poll_fn(move |cx| {
            loop {
                if self.state.shutdown.is_cancelled() {
                    return Poll::Ready(false);
                }
                if self.tx.lapsed(session_ms()) {
                    tracing::debug!("session closed: heartbeat lapsed");
                    return Poll::Ready(false);
                }
                if self.tx.poll_overflowed(cx).is_ready() {
                    return Poll::Ready(false);
                }
                match self.tx.poll_woken(cx) {
                    Poll::Ready(true) => return Poll::Ready(true),
                    // Woken to look at the deadline and the shutdown again.
                    Poll::Ready(false) => {}
                    Poll::Pending => break,
                }
            }
            self.buf.reserve(READ_ROOM);
            match poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(false),
                Poll::Ready(Ok(_)) => {
                    self.heard();
                    Poll::Ready(true)
                }
                Poll::Pending => {
                    // Nothing came: the buffer the read made room in is not kept while idle.
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    Poll::Pending
                }
            }
        })
    }

    /// Serves frames and writes until the session is idle again (`None`) or ends. The output
    /// buffer lives here: an idle session has none.
    async fn busy(&mut self) -> Option<End> {
        let mut out = BytesMut::new();
        self.drain_if_behind();
        if !self.buf.is_empty() {
            if let Some(end) = self.serve_input(&mut out).await {
                return Some(end);
            }
        }
        loop {
            if self.is_idle() {
                return None;
            }
            tokio::select! {
                biased;
                event = self.tx.next_event() => match event {
                    MailEvent::Overflowed => return Some(self.ending()),
                    MailEvent::Message(message) => {
                        if self.write_mail(message, &mut out).await {
                            return Some(self.ending());
                        }
                    }
                    MailEvent::Woken => {
                        self.drain_if_behind();
                        if self.state.shutdown.is_cancelled() {
                            return Some(End::Close);
                        }
                        if self.tx.lapsed(session_ms()) {
                            tracing::debug!("session closed: heartbeat lapsed");
                            return Some(End::Close);
                        }
                    }
                },
                read = self.io.read_buf(&mut self.buf), if self.tasks.as_ref().map_or(0, JoinSet::len) < MAX_IN_FLIGHT => {
                    match read {
                        Ok(0) | Err(_) => return Some(End::Close),
                        Ok(_) => {}
                    }
                    self.heard();
                    if let Some(end) = self.serve_input(&mut out).await {
                        return Some(end);
                    }
                }
                Some(_) = join_next(&mut self.tasks) => {}
            }
        }
    }

    /// Writes a message from the mailbox and whatever else is queued behind it (up to 64 KiB
    /// at once). True when the session must close (written, signed out, or the socket failed).
    async fn write_mail(&mut self, message: Outbound, out: &mut BytesMut) -> bool {
        let mut signed_out = encode_outbound(message, out, &self.state);
        while out.len() < 64 * 1024 {
            match self.tx.try_recv() {
                Some(message) => signed_out |= encode_outbound(message, out, &self.state),
                None => break,
            }
        }
        if !self.write_out(out).await {
            return true;
        }
        if signed_out {
            return true;
        }
        self.drain_if_behind();
        false
    }

    /// Reads the device's queue from the store again if a delivery did not fit or the node
    /// was told to ([`Mailbox::fall_behind`]).
    fn drain_if_behind(&mut self) {
        if self.tx.take_behind() && self.listen {
            self.spawn_drain();
        }
    }

    /// Handles every whole frame read so far and writes the inline answers.
    async fn serve_input(&mut self, out: &mut BytesMut) -> Option<End> {
        loop {
            if self.tx.is_revoked() {
                // Signed out: nothing more read is served; the mailbox holds the `SignOut` that
                // ends the session.
                self.buf.clear();
                break;
            }
            match codec::decode(&mut self.buf) {
                Ok(Some(frame)) => self.dispatch(frame, out),
                Ok(None) => break,
                Err(e) => {
                    codec::encode(&fatal(ErrorCode::Protocol, e.to_string()), out);
                    let limit = self.write_timeout();
                    let _ = within(limit, async {
                        let _ = self.io.write_all(out).await;
                        let _ = self.io.shutdown().await;
                    })
                    .await;
                    return Some(End::Abort);
                }
            }
        }
        let needed = codec::needed(&self.buf).ok().flatten().unwrap_or(0);
        self.buf
            .reserve(needed.saturating_sub(self.buf.len()).max(READ_ROOM));
        if !out.is_empty() && !self.write_out(out).await {
            return Some(End::Close);
        }
        None
    }

    /// Serves one frame: answered at once into `out` when that needs nothing else (a ping, a
    /// frame that is not a request), otherwise run as a task of the session.
    fn dispatch(&mut self, frame: Frame, out: &mut BytesMut) {
        let request = match Request::from_frame(frame) {
            Ok(request) => request,
            Err(not_a_request) => {
                if let Some(complaint) = not_a_request.complaint() {
                    codec::encode(&error(ErrorCode::Protocol, complaint, 0), out);
                }
                return;
            }
        };
        if let Some(answer) = request.inline_answer() {
            codec::encode(&answer, out);
            return;
        }
        let mut task = Box::pin(request.run(
            self.state.clone(),
            self.identity,
            self.tx.clone(),
            &mut self.send_order,
        ));
        // Run at once, on this task: most requests finish without waiting (an acknowledgement,
        // a send pushed to live sessions), and a task of their own would cost a spawn and a
        // turn of the scheduler on the path of every message. One that must wait goes on as a
        // task of the session. Polling it again there with that task's waker is what every
        // future allows. It first lets the tasks it woke run (the receivers' sessions write
        // before its answer, as it asked by yielding).
        let mut cx = Context::from_waker(Waker::noop());
        if task.as_mut().poll(&mut cx).is_pending() {
            self.tasks().spawn(async move {
                crate::hub::let_woken_run().await;
                task.await;
            });
        }
    }

    /// How long one write may wait for the client to take its bytes: as long as a client may stay
    /// silent ([`heartbeat::MISSED_BEATS`] intervals). A client that takes nothing for that long
    /// is gone; its session must not keep its connection, its queue and its device's presence.
    fn write_timeout(&self) -> Duration {
        Duration::from_millis(
            self.heartbeat_interval
                .saturating_mul(heartbeat::MISSED_BEATS),
        )
    }

    /// Writes and flushes what is encoded in `out`, then empties it. False if the socket failed,
    /// the write waited past [`Live::write_timeout`], or the queue overflowed meanwhile (the
    /// client is not taking what is written).
    async fn write_out(&mut self, out: &mut BytesMut) -> bool {
        let limit = self.write_timeout();
        let (io, tx) = (&mut self.io, &self.tx);
        let write = async { io.write_all(out).await.is_ok() && io.flush().await.is_ok() };
        let written = tokio::select! {
            biased;
            written = within(limit, write) => written.unwrap_or(false),
            () = tx.overflowed() => false,
        };
        if !written {
            tracing::debug!("session closed: a write failed or waited too long");
        }
        out.clear();
        written
    }

    /// Lets requests already read finish (their answers are written if the socket still takes
    /// them), so a shutdown loses nothing that was in flight; then closes the connection.
    async fn close(mut self) {
        let mut tasks = self.tasks.take().unwrap_or_default();
        let mut out = BytesMut::new();
        let drain = async {
            while !tasks.is_empty() || !self.tx.is_empty() {
                tokio::select! {
                    Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                    message = self.tx.recv() => {
                        encode_outbound(message, &mut out, &self.state);
                        let _ = self.io.write_all(&out).await;
                        out.clear();
                    }
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
        self.tx.close();
        let limit = self.write_timeout();
        let _ = within(limit, async {
            let _ = self.io.flush().await;
            let _ = self.io.shutdown().await;
        })
        .await;
        self.state.metrics.sessions_active.dec();
    }
}

/// The login phase: reads `Login` and checks it (or answers why not). `None`: the connection is
/// done (refused, timed out or gone). Runs inside the boxed opening (see [`start`]), so that
/// its state does not widen the session future that every idle connection keeps.
async fn log_in<S, Io>(
    state: &Shared<S>,
    io: &mut Io,
    buf: &mut BytesMut,
    challenge: &[u8; 32],
) -> Option<(Identity, bool, tidings_store::KeyStatus)>
where
    S: Store,
    Io: AsyncRead + AsyncWrite + Unpin,
{
    // The login is read before the client is known: it is held to a small bound of its own.
    let read = read_frame(io, buf, tidings_proto::MAX_LOGIN_FRAME_BYTES);
    let login = match tokio::time::timeout(LOGIN_TIMEOUT, read).await {
        Ok(Ok(Some(Frame {
            kind: Some(Kind::Login(login)),
        }))) => login,
        Ok(Ok(None)) => return None,
        Ok(Err(e)) => {
            let _ = write_frame(io, &fatal(ErrorCode::Protocol, e.to_string())).await;
            return None;
        }
        Ok(Ok(Some(_))) => {
            let complaint = fatal(ErrorCode::Protocol, "the first frame must be Login");
            let _ = write_frame(io, &complaint).await;
            return None;
        }
        Err(_) => return None,
    };
    // The key status tells the client whether to publish or replenish its keys.
    let (identity, keys) = match authenticate(state, &login, challenge).await {
        Ok(authenticated) => authenticated,
        Err((code, message)) => {
            let _ = write_frame(io, &fatal(code, message)).await;
            return None;
        }
    };
    Some((identity, login.listen, keys))
}

/// The next finished request of a session, if it has any in flight; never ready otherwise.
async fn join_next(tasks: &mut Option<JoinSet<()>>) -> Option<()> {
    match tasks {
        Some(tasks) => tasks.join_next().await.map(|_| ()),
        None => std::future::pending().await,
    }
}

async fn finish<S: Store>(state: &Shared<S>, mut tasks: JoinSet<()>) {
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    state.metrics.sessions_active.dec();
}

/// Encodes an outbound message; true when the session must close after writing it.
fn encode_outbound<S: Store>(message: Outbound, out: &mut BytesMut, state: &Shared<S>) -> bool {
    match message {
        Outbound::Frame(frame) => {
            codec::encode(&frame, out);
            false
        }
        Outbound::Deliver(frame) => {
            state.metrics.deliveries.inc();
            codec::encode(&frame, out);
            false
        }
        Outbound::SignOut(reason) => {
            codec::encode(
                &Kind::SignedOut(frame::SignedOut {
                    reason: reason.into(),
                })
                .into(),
                out,
            );
            true
        }
    }
}

async fn authenticate<S: Store>(
    state: &Shared<S>,
    login: &frame::Login,
    challenge: &[u8; 32],
) -> Result<(Identity, tidings_store::KeyStatus), (ErrorCode, &'static str)> {
    const FAILED: (ErrorCode, &str) = (
        ErrorCode::AuthFailed,
        "unknown device or bad signature: register again",
    );
    let device = DeviceId::from_slice(&login.device_id).ok_or(FAILED)?;
    let signature = Signature::from_slice(&login.signature).map_err(|_| FAILED)?;
    let (stored, keys) = state
        .store
        .login_device(device)
        .await
        .map_err(|_| {
            (
                ErrorCode::Unavailable,
                "storage unavailable: try again shortly",
            )
        })?
        .ok_or(FAILED)?;
    let key = VerifyingKey::from_bytes(&stored.public_key).map_err(|_| FAILED)?;
    key.verify_strict(
        &tidings_proto::transcript::login(challenge, device.as_bytes()),
        &signature,
    )
    .map_err(|_| FAILED)?;
    Ok((
        Identity {
            device,
            account: stored.account,
            budgets: state.keys.budget_key(&stored.pseudonym),
        },
        keys,
    ))
}
