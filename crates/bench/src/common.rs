//! What every driver shares: user identities, the message tag carried in payloads, client
//! sockets bound to a chosen loopback source address, TLS with a pinned certificate, and the
//! counters and histograms a relay step fills.

use std::cell::{Cell, RefCell};
use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Time allowed for one TCP connect.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Time allowed for one login exchange (each round trip of it).
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Payload bytes of every relayed message, for every target.
pub const PAYLOAD_BYTES: usize = 64;

static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Prints a progress line on stderr, stamped with the seconds since the harness started.
pub fn say(text: &str) {
    use std::io::Write as _;
    let start = START.get_or_init(std::time::Instant::now);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "[{:>7.1}s] {text}", start.elapsed().as_secs_f64());
}

/// The digits of user `index`'s number: German mobile `+49151` and eight digits.
pub fn digits(index: u32) -> String {
    format!("49151{index:08}")
}

/// User `index`'s number in E.164.
pub fn number(index: u32) -> String {
    format!("+{}", digits(index))
}

/// A number of the same plan that no benchmark user holds.
pub fn non_user_number(j: u32) -> String {
    format!("+49151{:08}", 90_000_000 + j)
}

/// The password of user `index` (MQTT and XMPP).
pub fn password(index: u32) -> String {
    format!("pw{}", digits(index))
}

/// The device key of user `index`: derived, so that every worker can rebuild it.
pub fn device_key(index: u32) -> ed25519_dalek::SigningKey {
    let mut hasher = Sha256::new();
    hasher.update(b"tidings-bench device key\n");
    hasher.update(index.to_be_bytes());
    let seed: [u8; 32] = hasher.finalize().into();
    ed25519_dalek::SigningKey::from_bytes(&seed)
}

/// Nanoseconds since the worker started; every timestamp of a worker is on this clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    pub fn new() -> Self {
        Clock(Instant::now())
    }
    pub fn ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    pub fn at(&self, ns: u64) -> Instant {
        self.0 + Duration::from_nanos(ns)
    }
}

/// What a relayed message carries so that its receiver and its receipt can be timed: the step,
/// the pair, the sequence number within the step, and the scheduled send time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    pub step: u16,
    pub pair: u32,
    pub seq: u32,
    /// Scheduled send time on the worker's clock (48 bits kept: 78 hours).
    pub t_ns: u64,
}

pub const TAG_BYTES: usize = 16;
const T_MASK: u64 = (1 << 48) - 1;

impl Tag {
    /// 16 bytes; also Tidings' message id (unique per sending device within a run).
    pub fn to_bytes(self) -> [u8; TAG_BYTES] {
        let mut out = [0u8; TAG_BYTES];
        out[0..2].copy_from_slice(&self.step.to_be_bytes());
        out[2..6].copy_from_slice(&self.pair.to_be_bytes());
        out[6..10].copy_from_slice(&self.seq.to_be_bytes());
        out[10..16].copy_from_slice(&(self.t_ns & T_MASK).to_be_bytes()[2..8]);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<Tag> {
        let b = bytes.get(..TAG_BYTES)?;
        let mut t = [0u8; 8];
        t[2..8].copy_from_slice(&b[10..16]);
        Some(Tag {
            step: u16::from_be_bytes([b[0], b[1]]),
            pair: u32::from_be_bytes([b[2], b[3], b[4], b[5]]),
            seq: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
            t_ns: u64::from_be_bytes(t),
        })
    }

    /// 32 hex digits (XMPP ids and bodies).
    pub fn to_hex(self) -> String {
        let mut s = String::with_capacity(32);
        for b in self.to_bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    pub fn from_hex(text: &str) -> Option<Tag> {
        let text = text.get(..32)?;
        let mut bytes = [0u8; TAG_BYTES];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Tag::from_bytes(&bytes)
    }
}

/// The kind byte that starts a payload on targets whose messages and receipts share a topic.
pub const KIND_MESSAGE: u8 = b'M';
pub const KIND_RECEIPT: u8 = b'R';

/// A 64-byte message payload: kind, tag, filler.
pub fn message_payload(tag: Tag) -> Vec<u8> {
    let mut out = Vec::with_capacity(PAYLOAD_BYTES);
    out.push(KIND_MESSAGE);
    out.extend_from_slice(&tag.to_bytes());
    out.resize(PAYLOAD_BYTES, b'x');
    out
}

/// A receipt payload: kind and the tag of the message it confirms.
pub fn receipt_payload(tag: Tag) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + TAG_BYTES);
    out.push(KIND_RECEIPT);
    out.extend_from_slice(&tag.to_bytes());
    out
}

/// Splits a payload into its kind and tag.
pub fn parse_payload(payload: &[u8]) -> Option<(u8, Tag)> {
    let kind = *payload.first()?;
    Some((kind, Tag::from_bytes(payload.get(1..)?)?))
}

/// A byte stream to a server: plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}
pub type BoxIo = Box<dyn Io>;

/// Opens a TCP connection from `src` (port chosen by the kernel) to `dst`.
pub async fn tcp_connect(src: Ipv4Addr, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let socket = TcpSocket::new_v4().context("socket")?;
    socket
        .bind(SocketAddr::from((src, 0)))
        .with_context(|| format!("bind {src}"))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst))
        .await
        .map_err(|_| anyhow::anyhow!("connect to {dst} timed out"))?
        .with_context(|| format!("connect to {dst}"))?;
    stream.set_nodelay(true).context("nodelay")?;
    Ok(stream)
}

/// Trusts exactly one server certificate: the one whose DER bytes hash to `pin`.
#[derive(Debug)]
struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.pin {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server certificate does not match the pinned SHA-256".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS client configuration that trusts the pinned certificate only. Session resumption is
/// off, so every connect pays a full handshake (the cold-start cost).
pub fn tls_connector(pin_hex: &str) -> anyhow::Result<tokio_rustls::TlsConnector> {
    let mut pin = [0u8; 32];
    if pin_hex.len() != 64 {
        bail!("the TLS pin must be 64 hex digits");
    }
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&pin_hex[2 * i..2 * i + 2], 16).context("TLS pin")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier { pin, provider }))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A histogram of microseconds, 1 µs to 10 minutes, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    #[allow(clippy::unwrap_used)] // constant, valid bounds
    // Constant bounds that satisfy the crate's rules (low ≥ 1, high ≥ 2 × low, 0–5 significant
    // figures), so this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

/// Records a latency in microseconds from nanoseconds, clamped into the histogram's range.
pub fn record_ns(hist: &mut Histogram<u64>, ns: u64) {
    let us = (ns / 1000).clamp(1, 600_000_000);
    hist.saturating_record(us);
}

/// Serialises a histogram to base64 text for the event line.
pub fn hist_to_text(hist: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    if V2Serializer::new().serialize(hist, &mut bytes).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Reads a histogram written by [`hist_to_text`]; an empty one for empty or bad text.
pub fn hist_from_text(text: &str) -> Histogram<u64> {
    let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(text) else {
        return histogram();
    };
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .unwrap_or_else(|_| histogram())
}

/// Counters and histograms of the current relay step, shared by all pairs of a worker.
#[derive(Debug)]
pub struct StepStats {
    pub step: Cell<u16>,
    pub scheduled: Cell<u64>,
    pub sent: Cell<u64>,
    pub refused: Cell<u64>,
    pub rate_limited: Cell<u64>,
    pub delivered: Cell<u64>,
    pub receipts: Cell<u64>,
    pub window_waits: Cell<u64>,
    /// Messages handed over more than 2 ms after their time without a window wait: the
    /// generator fell behind its own schedule.
    pub late: Cell<u64>,
    pub last_receipt_ns: Cell<u64>,
    pub e2e: RefCell<Histogram<u64>>,
    pub deliver: RefCell<Histogram<u64>>,
    pub first_error: RefCell<Option<String>>,
    pub clock: Clock,
}

impl StepStats {
    pub fn new(clock: Clock) -> Rc<Self> {
        Rc::new(StepStats {
            step: Cell::new(0),
            scheduled: Cell::new(0),
            sent: Cell::new(0),
            refused: Cell::new(0),
            rate_limited: Cell::new(0),
            delivered: Cell::new(0),
            receipts: Cell::new(0),
            window_waits: Cell::new(0),
            late: Cell::new(0),
            last_receipt_ns: Cell::new(0),
            e2e: RefCell::new(histogram()),
            deliver: RefCell::new(histogram()),
            first_error: RefCell::new(None),
            clock,
        })
    }

    /// Starts a new step: every counter back to zero.
    pub fn reset(&self, step: u16) {
        self.step.set(step);
        for cell in [
            &self.scheduled,
            &self.sent,
            &self.refused,
            &self.rate_limited,
            &self.delivered,
            &self.receipts,
            &self.window_waits,
            &self.late,
            &self.last_receipt_ns,
        ] {
            cell.set(0);
        }
        self.e2e.borrow_mut().reset();
        self.deliver.borrow_mut().reset();
        self.first_error.replace(None);
    }

    pub fn error(&self, message: impl Into<String>) {
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(message.into());
        }
    }

    /// A message reached its receiver.
    pub fn on_deliver(&self, tag: Tag) {
        if tag.step != self.step.get() {
            return;
        }
        self.delivered.set(self.delivered.get() + 1);
        let now = self.clock.ns();
        record_ns(&mut self.deliver.borrow_mut(), now.saturating_sub(tag.t_ns));
    }

    /// A receipt reached the sender; true if it belongs to the current step.
    pub fn on_receipt(&self, tag: Tag) -> bool {
        if tag.step != self.step.get() {
            return false;
        }
        self.receipts.set(self.receipts.get() + 1);
        let now = self.clock.ns();
        self.last_receipt_ns.set(now);
        record_ns(&mut self.e2e.borrow_mut(), now.saturating_sub(tag.t_ns));
        true
    }

    /// The server refused a message of the current step; true if it belongs to it.
    pub fn on_refused(&self, tag: Tag, rate_limited: bool) -> bool {
        if tag.step != self.step.get() {
            return false;
        }
        self.refused.set(self.refused.get() + 1);
        if rate_limited {
            self.rate_limited.set(self.rate_limited.get() + 1);
        }
        true
    }
}

/// One pair's window: messages sent whose receipt (or refusal) has not come back yet.
#[derive(Debug, Default)]
pub struct Window {
    pub in_flight: Cell<u32>,
    pub freed: Notify,
}

impl Window {
    pub fn take(&self) {
        self.in_flight.set(self.in_flight.get() + 1);
    }
    pub fn give(&self) {
        self.in_flight.set(self.in_flight.get().saturating_sub(1));
        self.freed.notify_one();
    }
}

/// Keeps the first error of many concurrent operations and counts the rest.
#[derive(Debug, Default)]
pub struct Errors {
    pub count: Cell<u64>,
    pub first: RefCell<Option<String>>,
}

impl Errors {
    pub fn add(&self, error: &anyhow::Error) {
        self.count.set(self.count.get() + 1);
        let mut first = self.first.borrow_mut();
        if first.is_none() {
            *first = Some(format!("{error:#}"));
        }
    }
    pub fn first(&self) -> Option<String> {
        self.first.borrow().clone()
    }
}
