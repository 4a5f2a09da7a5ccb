//! A logged-in session: frames in and out over the upgraded connection, with heartbeats.

use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::{Signer as _, SigningKey};
use tidings_core::failpoint::failpoint;
use tidings_proto::codec;
use tidings_proto::frame::{self, Frame, Kind};
use tidings_proto::id::DeviceId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::net::{Endpoint, Stream, Upgraded, NETWORK_TIMEOUT};
use crate::{ClientError, Result};

/// A session with the server.
pub struct Session {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    heartbeat: Duration,
    last_sent: Instant,
    next_request: u64,
    deferred: std::collections::VecDeque<Kind>,
    keys: KeySupply,
    /// Whether the login asked for deliveries.
    listening: bool,
    /// The version of the server's OPRF key, as its login answer reported it (0: not said).
    oprf_key_version: u32,
    /// The resumption token the login answer carried, until taken.
    resume_token: Vec<u8>,
    /// Whether this session was opened by a resumption token rather than a signature.
    resumed: bool,
}

/// What the server holds of this device's keys, as its login answer reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeySupply {
    pub one_time_keys: u32,
    pub published: bool,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects, upgrades and logs in: with `resume_token` (from the last login's answer) if
    /// the server takes it, else with the device key. `listen` asks for deliveries and makes
    /// the account show as online while the session lives.
    pub async fn open(
        endpoint: &Endpoint,
        device: DeviceId,
        key: &SigningKey,
        listen: bool,
        resume_token: Option<&[u8]>,
    ) -> Result<Self> {
        let (stream, upgraded) = endpoint
            .upgrade(resume_token.map(|token| (token, listen)))
            .await?;
        let mut session = Self {
            stream,
            buf: BytesMut::new(),
            heartbeat: Duration::from_secs(10),
            last_sent: Instant::now(),
            next_request: 1,
            deferred: std::collections::VecDeque::new(),
            keys: KeySupply::default(),
            listening: listen,
            oprf_key_version: 0,
            resume_token: Vec::new(),
            resumed: matches!(upgraded, Upgraded::Resumed),
        };
        if let Upgraded::Challenge(challenge) = upgraded {
            let signature = key.sign(&tidings_proto::transcript::login(
                &challenge,
                device.as_bytes(),
            ));
            session
                .send(Kind::Login(frame::Login {
                    device_id: device.as_bytes().to_vec(),
                    signature: signature.to_bytes().to_vec(),
                    listen,
                }))
                .await?;
        }
        match session.recv(Instant::now() + NETWORK_TIMEOUT).await? {
            Some(Kind::LoginResult(result)) => {
                session.heartbeat = Duration::from_secs(u64::from(result.heartbeat_seconds.max(1)));
                session.keys = KeySupply {
                    one_time_keys: result.one_time_keys,
                    published: result.keys_published,
                };
                session.oprf_key_version = result.oprf_key_version;
                session.resume_token = result.resume_token;
                Ok(session)
            }
            Some(Kind::Error(error)) if error.code == frame::ErrorCode::AuthFailed as i32 => {
                Err(ClientError::Refused(format!(
                    "{}; this device is no longer registered (replaced, removed or disabled)",
                    error.message
                )))
            }
            Some(Kind::Error(error)) => Err(error.into()),
            Some(_) => Err(ClientError::Protocol("expected LoginResult".into())),
            None => Err(ClientError::Timeout),
        }
    }

    /// The resumption token the login answer carried (empty if the server issues none), for
    /// the caller to keep; a second call gives an empty one.
    pub fn take_resume_token(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.resume_token)
    }

    /// Whether a resumption token logged this session in (no signature was made).
    pub fn was_resumed(&self) -> bool {
        self.resumed
    }

    /// Whether this session asked for deliveries at login.
    pub fn is_listening(&self) -> bool {
        self.listening
    }

    /// The version of the OPRF key the server evaluates with now, as of the login (0 from a
    /// server that does not say).
    pub fn oprf_key_version(&self) -> u32 {
        self.oprf_key_version
    }

    /// This device's keys on the server, as of the login.
    pub fn key_supply(&self) -> KeySupply {
        self.keys
    }

    /// Records the server's count after an upload.
    pub fn set_key_supply(&mut self, keys: KeySupply) {
        self.keys = keys;
    }

    /// The heartbeat interval the server asked for at login.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// A fresh request id for this session.
    pub fn request_id(&mut self) -> u64 {
        let id = self.next_request;
        self.next_request += 1;
        id
    }

    /// Sends a request carrying `request_id` and returns the frame that answers it (its result or
    /// an `Error` with the same id). Frames that arrive meanwhile are deferred, in order, for the
    /// caller's next [`Session::recv`]; a sign-out or a fatal error ends the wait.
    pub async fn call(&mut self, request: Kind, request_id: u64) -> Result<Kind> {
        self.send(request).await?;
        let deadline = Instant::now() + NETWORK_TIMEOUT;
        let mut others = Vec::new();
        let answer = loop {
            match self.recv_fresh(deadline).await {
                Err(e) => break Err(e),
                Ok(None) => break Err(ClientError::Timeout),
                Ok(Some(kind)) if kind.answer_to() == Some(request_id) => break Ok(kind),
                Ok(Some(Kind::SignedOut(s))) => break Err(ClientError::SignedOut(s.reason)),
                Ok(Some(Kind::Error(e))) if e.fatal => break Err(e.into()),
                Ok(Some(other)) => others.push(other),
            }
        };
        for other in others {
            self.defer(other);
        }
        answer
    }

    /// Puts a frame back, to be returned by the next [`Session::recv`] (in arrival order), for a
    /// caller that waits for one particular answer while other frames arrive.
    pub fn defer(&mut self, kind: Kind) {
        self.deferred.push_back(kind);
    }

    /// Sends several frames in one write, so that they reach the server together (pipelining).
    pub async fn send_many(&mut self, kinds: impl IntoIterator<Item = Kind>) -> Result<()> {
        let mut bytes = bytes::BytesMut::new();
        let mut after = Vec::new();
        for kind in kinds {
            let (before, then) = failpoints(&kind);
            before.into_iter().for_each(failpoint);
            after.extend(then);
            codec::encode(&Frame::from(kind), &mut bytes);
        }
        let write = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(NETWORK_TIMEOUT, write)
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|e| ClientError::Network(e.to_string()))?;
        self.last_sent = Instant::now();
        after.into_iter().for_each(failpoint);
        Ok(())
    }

    /// Sends one frame.
    pub async fn send(&mut self, kind: Kind) -> Result<()> {
        self.send_many([kind]).await
    }

    /// The next frame from the server, or `None` when `deadline` passes first. Sends heartbeats
    /// while it waits. A closed connection is an error.
    pub async fn recv(&mut self, deadline: Instant) -> Result<Option<Kind>> {
        if let Some(kind) = self.deferred.pop_front() {
            return Ok(Some(kind));
        }
        self.recv_fresh(deadline).await
    }

    /// Like [`Session::recv`], but only frames from the wire, not deferred ones.
    pub async fn recv_fresh(&mut self, deadline: Instant) -> Result<Option<Kind>> {
        loop {
            match codec::decode(&mut self.buf) {
                Ok(Some(Frame { kind: Some(kind) })) => return Ok(Some(kind)),
                Ok(Some(Frame { kind: None })) => continue,
                Ok(None) => {}
                Err(e) => return Err(ClientError::Protocol(e.to_string())),
            }
            // A deadline already passed answers `None` before the socket is read, whatever has
            // arrived: a wait of zero is a wait of zero, not a race with the server's answer.
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let ping_at = self.last_sent + self.heartbeat;
            tokio::select! {
                read = self.stream.read_buf(&mut self.buf) => {
                    match read {
                        Ok(0) => return Err(ClientError::Network("the server closed the connection".into())),
                        Ok(_) => {}
                        Err(e) => return Err(ClientError::Network(e.to_string())),
                    }
                }
                () = tokio::time::sleep_until(deadline.min(ping_at)) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    self.send(Kind::Ping(frame::Ping { nonce: 0 })).await?;
                }
            }
        }
    }
}

/// The failpoints (`tidings_core::failpoint`) before and after a frame of this kind is written:
/// a message's copies before and after they leave, an acknowledgement after it left.
fn failpoints(kind: &Kind) -> (Option<&'static str>, Option<&'static str>) {
    match kind {
        Kind::Send(_) => (Some("client-send-before"), Some("client-send-after")),
        Kind::Ack(_) => (None, Some("client-ack-after")),
        _ => (None, None),
    }
}
