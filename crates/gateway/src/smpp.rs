//! SMPP 3.4 to an SMSC or an aggregator: bind, `submit_sm`, `enquire_link`, delivery receipts,
//! and the SMS phones send to the account (`deliver_sm` that is not a receipt, [`Link::receive`]).
//!
//! The PDUs are encoded and decoded by the `rusmpp` crate; this module owns the session: one TCP
//! connection bound as a transmitter or transceiver, kept between sends and kept alive with
//! `enquire_link` while idle, opened again (with backoff) when it is lost.
//!
//! The rule that keeps a message from being lost or doubled: each part of a message is in one of
//! three states — not written, accepted (`submit_sm_resp` OK) or in flight (written, no answer
//! yet). Only a part that was never written is ever submitted again, after a reconnect, with the
//! same concatenation reference. A part in flight when the connection dies may or may not have
//! reached the SMSC, so it is not resent: the send then ends as [`SendError::Unknown`], which
//! the route never retries. Throttling answers (`ESME_RTHROTTLED`, `ESME_RMSGQFUL`) mean the
//! SMSC did not take the part, so it is resubmitted after a pause, a few times.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rusmpp::pdus::{BindTransceiver, BindTransmitter, SubmitSm};
use rusmpp::tlvs::{MessageSubmissionRequestTlvValue, TlvTag, TlvValue};
use rusmpp::tokio_codec::CommandCodec;
use rusmpp::types::{COctetString, OctetString};
use rusmpp::values::{
    DataCoding, EsmClass, InterfaceVersion, Npi, RegisteredDelivery, ServiceType, Ton,
};
use rusmpp::{Command, CommandStatus, Pdu};
use serde::{Deserialize, Serialize};
use tidings_sms::Part;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio_util::codec::{Decoder as _, Encoder as _};

use crate::{Received, SendError, Sent, Sms, MAX_RECEIVED};

/// Time allowed to connect and bind.
const BIND_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for the answer to one `submit_sm` or `enquire_link`.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts per send before the SMSC counts as unavailable.
const CONNECT_ATTEMPTS: u32 = 4;
/// Throttling answers per send before giving up (the route retries the message later).
const THROTTLE_ATTEMPTS: u32 = 5;
/// First pause after a refused connection or a throttling answer; it doubles each time.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// Receipts kept while waiting for them to be claimed by their send.
const MAX_RECEIPTS: usize = 1000;

/// How the session binds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BindMode {
    /// Send and receive on one connection; delivery receipts arrive here.
    #[default]
    Transceiver,
    /// Send only; the SMSC keeps receipts for a receiver bind (none is made).
    Transmitter,
}

/// How a long message is split into concatenated parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Concatenation {
    /// A user data header in `short_message` with the UDHI bit in `esm_class` (most SMSCs).
    #[default]
    Udh,
    /// The `sar_msg_ref_num`, `sar_total_segments` and `sar_segment_seqnum` TLVs.
    Sar,
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

fn default_enquire_link() -> u64 {
    30
}

/// An SMPP account, as the profile or server config holds it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmppConfig {
    /// `host:port` of the SMSC, such as `smpp.example.net:2775`.
    pub address: String,
    /// The account's `system_id` (at most 15 characters).
    pub system_id: String,
    /// The account's password (at most 8 characters).
    pub password: String,
    /// `system_type`, if the provider asks for one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub system_type: String,
    /// Transceiver (default) or transmitter.
    #[serde(default, skip_serializing_if = "is_default")]
    pub bind: BindMode,
    /// UDH (default) or SAR.
    #[serde(default, skip_serializing_if = "is_default")]
    pub concatenation: Concatenation,
    /// Seconds of silence before an `enquire_link` checks the connection.
    #[serde(default = "default_enquire_link")]
    pub enquire_link_seconds: u64,
    /// Seconds a send waits for the delivery receipt after the SMSC accepted the message; 0
    /// (the default) requests none. Only a transceiver bind receives receipts.
    #[serde(default, skip_serializing_if = "is_default")]
    pub receipt_wait_seconds: u64,
}

impl std::fmt::Debug for SmppConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Smpp")
            .field("address", &self.address)
            .field("system_id", &self.system_id)
            .field("bind", &self.bind)
            .field("concatenation", &self.concatenation)
            .finish_non_exhaustive()
    }
}

/// A delivery receipt from the SMSC (`deliver_sm` with the receipt bit in `esm_class`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The final state as the SMSC wrote it: `DELIVRD`, `UNDELIV`, `EXPIRED`, `REJECTD`, ...
    pub state: String,
}

impl Receipt {
    /// The state in words.
    pub fn describe(&self) -> String {
        match self.state.as_str() {
            "DELIVRD" => "delivered to the phone".into(),
            "UNDELIV" => "undeliverable".into(),
            "EXPIRED" => "expired before the phone could be reached".into(),
            "REJECTD" => "rejected by the network".into(),
            "DELETED" => "deleted by the SMSC".into(),
            "ENROUTE" | "ACCEPTD" => "accepted, not yet delivered".into(),
            other => format!("in state {other}"),
        }
    }

    fn is_final(&self) -> bool {
        !matches!(self.state.as_str(), "ENROUTE" | "ACCEPTD")
    }
}

/// Why the link failed, before it is mapped onto a [`SendError`].
#[derive(Debug)]
enum LinkError {
    /// The connection is gone (closed, reset, unbound by the SMSC).
    Closed(String),
    /// No answer in time.
    Timeout,
}

/// One bound connection.
struct Session {
    stream: TcpStream,
    codec: CommandCodec,
    buffer: BytesMut,
    next_sequence: u32,
    last_traffic: Instant,
    /// SMS from phones, answered and not yet taken by [`Link::receive`].
    received: Vec<Received>,
}

/// The outcome of writing one request.
enum Written {
    /// Nothing reached the socket: the request was certainly not sent.
    Nothing(String),
    /// Some bytes may have reached the SMSC before the error.
    Partly(String),
    Whole,
}

impl Session {
    fn sequence(&mut self) -> u32 {
        let sequence = self.next_sequence;
        // Sequence numbers run from 1 to 0x7FFFFFFF (SMPP 3.4 §3.2).
        self.next_sequence = if sequence >= 0x7FFF_FFFF {
            1
        } else {
            sequence + 1
        };
        sequence
    }

    async fn write(&mut self, command: &Command) -> Written {
        let mut bytes = BytesMut::new();
        if let Err(e) = self.codec.encode(command, &mut bytes) {
            return Written::Nothing(e.to_string());
        }
        let mut offset = 0;
        while offset < bytes.len() {
            match self.stream.write(&bytes[offset..]).await {
                Ok(0) if offset == 0 => return Written::Nothing("connection closed".into()),
                Ok(0) => return Written::Partly("connection closed".into()),
                Ok(n) => offset += n,
                Err(e) if offset == 0 => return Written::Nothing(e.to_string()),
                Err(e) => return Written::Partly(e.to_string()),
            }
        }
        self.last_traffic = Instant::now();
        Written::Whole
    }

    /// The next command from the SMSC, waiting until `deadline`.
    async fn read(&mut self, deadline: Instant) -> Result<Command, LinkError> {
        loop {
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(command)) => {
                    self.last_traffic = Instant::now();
                    return Ok(command);
                }
                Ok(None) => {}
                Err(e) => return Err(LinkError::Closed(format!("unreadable PDU: {e}"))),
            }
            let read =
                tokio::time::timeout_at(deadline.into(), self.stream.read_buf(&mut self.buffer))
                    .await;
            match read {
                Err(_) => return Err(LinkError::Timeout),
                Ok(Ok(0)) => {
                    return Err(LinkError::Closed("the SMSC closed the connection".into()))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(LinkError::Closed(e.to_string())),
            }
        }
    }

    /// Answers what the SMSC asks of us; returns the command if it is not such a request.
    async fn answer_request(
        &mut self,
        command: Command,
        receipts: &mut HashMap<String, Receipt>,
    ) -> Result<Option<Command>, LinkError> {
        let sequence = command.sequence_number();
        let answer = match command.pdu() {
            Some(Pdu::EnquireLink) => Pdu::EnquireLinkResp,
            Some(Pdu::DeliverSm(deliver)) => {
                if let Some((id, receipt)) = parse_receipt(deliver) {
                    if receipts.len() >= MAX_RECEIPTS {
                        receipts.clear();
                    }
                    receipts.insert(id, receipt);
                } else if let Some(sms) = parse_received(deliver) {
                    // Answered either way, so that the SMSC does not send it again; past the
                    // bound it is dropped.
                    if self.received.len() < MAX_RECEIVED {
                        self.received.push(sms);
                    }
                }
                Pdu::DeliverSmResp(Default::default())
            }
            Some(Pdu::Unbind) => {
                let _ = self
                    .write(&Command::new(
                        CommandStatus::EsmeRok,
                        sequence,
                        Pdu::UnbindResp,
                    ))
                    .await;
                return Err(LinkError::Closed("the SMSC unbound the session".into()));
            }
            _ => return Ok(Some(command)),
        };
        match self
            .write(&Command::new(CommandStatus::EsmeRok, sequence, answer))
            .await
        {
            Written::Whole => Ok(None),
            Written::Nothing(e) | Written::Partly(e) => Err(LinkError::Closed(e)),
        }
    }

    /// Handles whatever the SMSC has already sent, without waiting. Fails if the connection is
    /// known to be gone, which proves that a request not yet written will not be lost in it.
    async fn drain(&mut self, receipts: &mut HashMap<String, Receipt>) -> Result<(), LinkError> {
        loop {
            match self.codec.decode(&mut self.buffer) {
                Ok(Some(command)) => {
                    self.answer_request(command, receipts).await?;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(LinkError::Closed(format!("unreadable PDU: {e}"))),
            }
            let mut chunk = [0u8; 4096];
            match self.stream.try_read(&mut chunk) {
                Ok(0) => return Err(LinkError::Closed("the SMSC closed the connection".into())),
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(LinkError::Closed(e.to_string())),
            }
        }
    }

    /// Sends a request and waits for the response with its sequence number, answering the
    /// SMSC's own requests meanwhile.
    async fn request(
        &mut self,
        pdu: Pdu,
        receipts: &mut HashMap<String, Receipt>,
    ) -> Result<Command, (Written, Option<LinkError>)> {
        let sequence = self.sequence();
        match self
            .write(&Command::new(CommandStatus::EsmeRok, sequence, pdu))
            .await
        {
            Written::Whole => {}
            other => return Err((other, None)),
        }
        let deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let command = self
                .read(deadline)
                .await
                .map_err(|e| (Written::Whole, Some(e)))?;
            if command.sequence_number() == sequence {
                return Ok(command);
            }
            // A late answer to an earlier request, or a request from the SMSC.
            self.answer_request(command, receipts)
                .await
                .map_err(|e| (Written::Whole, Some(e)))?;
        }
    }
}

/// Reads an SMS a phone sent to the account: the sender (with `+` when its type of number is
/// international) and the text (UCS-2 for data coding 8, else the SMSC's default alphabet read
/// as text), without a user data header.
fn parse_received(deliver: &rusmpp::pdus::DeliverSm) -> Option<Received> {
    let source = String::from_utf8_lossy(deliver.source_addr.as_ref())
        .trim_end_matches('\0')
        .to_string();
    if source.is_empty() {
        return None;
    }
    let from = if deliver.source_addr_ton == Ton::International
        && source.bytes().all(|b| b.is_ascii_digit())
    {
        format!("+{source}")
    } else {
        source
    };
    let mut body: &[u8] = deliver.short_message().as_ref();
    if u8::from(deliver.esm_class) & tidings_sms::SMPP_ESM_CLASS_UDHI != 0 {
        let header = usize::from(*body.first()?) + 1;
        body = body.get(header..)?;
    }
    let text = if u8::from(deliver.data_coding) == 8 {
        let units: Vec<u16> = body
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(body).into_owned()
    };
    Some(Received { from, text })
}

/// Reads a delivery receipt: the `receipted_message_id` and `message_state` TLVs where the SMSC
/// sends them, otherwise the `id:... stat:...` text of SMPP 3.4 Appendix B.
fn parse_receipt(deliver: &rusmpp::pdus::DeliverSm) -> Option<(String, Receipt)> {
    // Bits 2..5 of esm_class: 0b0001 is an SMSC delivery receipt.
    if u8::from(deliver.esm_class) & 0x3C != 0x04 {
        return None;
    }
    let text = String::from_utf8_lossy(deliver.short_message().as_ref()).into_owned();
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|word| word.strip_prefix(name))
            .map(str::to_string)
    };
    let mut id = field("id:");
    let mut state = field("stat:");
    for tlv in deliver.tlvs() {
        match (tlv.tag(), tlv.value()) {
            (TlvTag::ReceiptedMessageId, Some(TlvValue::ReceiptedMessageId(value))) => {
                id = Some(String::from_utf8_lossy(value.as_ref()).into_owned());
            }
            (TlvTag::MessageState, Some(TlvValue::MessageState(value))) if state.is_none() => {
                state = Some(format!("{value:?}").to_uppercase());
            }
            _ => {}
        }
    }
    Some((id?, Receipt { state: state? }))
}

/// Every command in `bytes` and the receipt each carries, decoded as the session decodes what
/// the SMSC sends; stops at the first unreadable PDU. For the fuzz targets.
#[cfg(feature = "fuzzing")]
pub(crate) fn commands_in(bytes: &[u8]) -> Vec<(Command, Option<(String, Receipt)>)> {
    let mut codec = CommandCodec::new();
    let mut buffer = BytesMut::from(bytes);
    let mut commands = Vec::new();
    while let Ok(Some(command)) = codec.decode(&mut buffer) {
        let receipt = match command.pdu() {
            Some(Pdu::DeliverSm(deliver)) => {
                // An SMS from a phone is read as the session reads it, too.
                let _ = parse_received(deliver);
                parse_receipt(deliver)
            }
            _ => None,
        };
        commands.push((command, receipt));
    }
    commands
}

/// An SMPP C-octet string of at most `MAX - 1` ASCII characters.
fn c_string<const MIN: usize, const MAX: usize>(
    value: &str,
    name: &str,
) -> Result<COctetString<MIN, MAX>, SendError> {
    let mut bytes = value.as_bytes().to_vec();
    bytes.push(0);
    COctetString::from_vec(bytes).map_err(|_| {
        SendError::Rejected(format!(
            "the SMPP {name} must be ASCII and at most {} characters: check the settings",
            MAX - 1
        ))
    })
}

fn refusal(status: CommandStatus) -> String {
    format!("{status:?} (0x{:08X})", u32::from(status))
}

/// The state a part of a message is in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PartState {
    NotWritten,
    Accepted(String),
    InFlight(String),
}

/// What the link holds between sends.
struct LinkState {
    session: Option<Session>,
    receipts: HashMap<String, Receipt>,
    keepalive_started: bool,
}

/// An SMPP account with its session, shared by every send of one [`crate::Transport`].
pub struct Link {
    config: SmppConfig,
    state: Mutex<LinkState>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link for `config`; nothing is opened until the first send.
    pub fn new(config: SmppConfig) -> Self {
        Self {
            config,
            state: Mutex::new(LinkState {
                session: None,
                receipts: HashMap::new(),
                keepalive_started: false,
            }),
        }
    }

    /// Connects and binds, once.
    async fn open(&self) -> Result<Session, SendError> {
        let address = self.config.address.as_str();
        let stream = tokio::time::timeout(BIND_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| {
                SendError::Unavailable(format!("connecting to the SMSC at {address} timed out"))
            })?
            .map_err(|e| {
                SendError::Unavailable(format!("cannot connect to the SMSC at {address}: {e}"))
            })?;
        let _ = stream.set_nodelay(true);
        let mut session = Session {
            stream,
            codec: CommandCodec::new(),
            buffer: BytesMut::new(),
            next_sequence: 1,
            last_traffic: Instant::now(),
            received: Vec::new(),
        };
        let system_id = c_string(&self.config.system_id, "system_id")?;
        let password = c_string(&self.config.password, "password")?;
        let system_type = c_string(&self.config.system_type, "system_type")?;
        let bind = match self.config.bind {
            BindMode::Transceiver => Pdu::BindTransceiver(
                BindTransceiver::builder()
                    .system_id(system_id)
                    .password(password)
                    .system_type(system_type)
                    .interface_version(InterfaceVersion::Smpp3_4)
                    .build(),
            ),
            BindMode::Transmitter => Pdu::BindTransmitter(
                BindTransmitter::builder()
                    .system_id(system_id)
                    .password(password)
                    .system_type(system_type)
                    .interface_version(InterfaceVersion::Smpp3_4)
                    .build(),
            ),
        };
        let mut receipts = HashMap::new();
        let answer = tokio::time::timeout(BIND_TIMEOUT, session.request(bind, &mut receipts))
            .await
            .map_err(|_| {
                SendError::Unavailable(format!("the SMSC at {address} did not answer the bind"))
            })?
            .map_err(|(_, e)| {
                SendError::Unavailable(format!(
                    "the SMSC at {address} dropped the bind: {}",
                    e.map_or_else(|| "write failed".into(), |e| format!("{e:?}"))
                ))
            })?;
        match answer.status() {
            CommandStatus::EsmeRok => Ok(session),
            status @ (CommandStatus::EsmeRinvpaswd | CommandStatus::EsmeRinvsysid) => {
                Err(SendError::Rejected(format!(
                    "the SMSC refused the login {}: check system_id and password",
                    refusal(status)
                )))
            }
            status => Err(SendError::Unavailable(format!(
                "the SMSC refused the bind {}",
                refusal(status)
            ))),
        }
    }

    /// The bound session, opening one (with backoff) if there is none or it is gone.
    async fn ensure(&self, state: &mut LinkState) -> Result<(), SendError> {
        if let Some(session) = state.session.as_mut() {
            if session.drain(&mut state.receipts).await.is_ok() {
                return Ok(());
            }
            state.session = None;
        }
        let mut pause = FIRST_BACKOFF;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.open().await {
                Ok(session) => {
                    state.session = Some(session);
                    return Ok(());
                }
                Err(e @ SendError::Rejected(_)) => return Err(e),
                Err(e) if attempt >= CONNECT_ATTEMPTS => return Err(e),
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }

    /// Starts the idle keep-alive once, when a runtime is there to run it.
    fn start_keepalive(self: &Arc<Self>, state: &mut LinkState) {
        if state.keepalive_started || self.config.enquire_link_seconds == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        state.keepalive_started = true;
        let link = Arc::downgrade(self);
        let interval = Duration::from_secs(self.config.enquire_link_seconds);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(interval / 2).await;
                let Some(link) = link.upgrade() else { return };
                // A send in progress keeps the link busy, and so alive.
                let Ok(mut guard) = link.state.try_lock() else {
                    continue;
                };
                let state = &mut *guard;
                let Some(session) = state.session.as_mut() else {
                    continue;
                };
                let alive = match session.drain(&mut state.receipts).await {
                    Err(_) => false,
                    Ok(()) if session.last_traffic.elapsed() < interval => true,
                    Ok(()) => session
                        .request(Pdu::EnquireLink, &mut state.receipts)
                        .await
                        .is_ok(),
                };
                if !alive {
                    // Opened again by the next send.
                    state.session = None;
                }
            }
        });
    }

    /// The SMS phones sent to the account since the last call: binds if there is no session
    /// (a transceiver bind receives them), answers what the SMSC sent meanwhile and takes them.
    pub async fn receive(self: &Arc<Self>) -> Result<Vec<Received>, SendError> {
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        self.start_keepalive(state);
        // Taken before `ensure`, which drops a session it finds dead along with what it held.
        let mut received = state
            .session
            .as_mut()
            .map(|session| std::mem::take(&mut session.received))
            .unwrap_or_default();
        self.ensure(state).await?;
        if let Some(session) = state.session.as_mut() {
            received.append(&mut session.received);
        }
        Ok(received)
    }

    /// Sends the parts of one message, reconnecting as needed; see the module comment.
    pub async fn send(
        self: &Arc<Self>,
        sms: &Sms,
        parts: Vec<Part>,
        reference: u16,
    ) -> Result<Sent, SendError> {
        let (source_ton, source_npi, source) = source_address(&sms.from)?;
        let destination = sms.to.strip_prefix('+').unwrap_or(&sms.to);
        let destination = c_string(destination, "receiver's number")?;
        let wants_receipt =
            self.config.bind == BindMode::Transceiver && self.config.receipt_wait_seconds > 0;
        let total = parts.len();
        let mut states = vec![PartState::NotWritten; total];
        let mut guard = self.state.lock().await;
        let state = &mut *guard;
        self.start_keepalive(state);
        let mut throttled = 0;
        let mut reconnects = 0;
        let mut index = 0;
        while index < total {
            if states[index] != PartState::NotWritten {
                index += 1;
                continue;
            }
            if let Err(e) = self.ensure(state).await {
                return Err(finish_early(&states, e));
            }
            let Some(session) = state.session.as_mut() else {
                continue;
            };
            let pdu = submit_pdu(
                &parts[index],
                self.config.concatenation,
                reference,
                (source_ton, source_npi, source.clone()),
                destination.clone(),
                wants_receipt,
            )?;
            match session.request(pdu, &mut state.receipts).await {
                Ok(answer) => match (answer.status(), answer.pdu()) {
                    (CommandStatus::EsmeRok, Some(Pdu::SubmitSmResp(resp))) => {
                        let id = String::from_utf8_lossy(resp.message_id().as_ref())
                            .trim_end_matches('\0')
                            .to_string();
                        states[index] = PartState::Accepted(id);
                        index += 1;
                    }
                    (CommandStatus::EsmeRok, _) => {
                        states[index] =
                            PartState::InFlight("the SMSC answered with another PDU".into());
                        state.session = None;
                    }
                    (status @ (CommandStatus::EsmeRthrottled | CommandStatus::EsmeRmsgqful), _) => {
                        throttled += 1;
                        if throttled >= THROTTLE_ATTEMPTS {
                            return Err(finish_early(
                                &states,
                                SendError::Unavailable(format!(
                                    "the SMSC is throttling {}",
                                    refusal(status)
                                )),
                            ));
                        }
                        tokio::time::sleep(FIRST_BACKOFF * 2u32.pow(throttled - 1)).await;
                    }
                    (status, _) => {
                        return Err(finish_early(
                            &states,
                            SendError::Rejected(format!(
                                "the SMSC refused part {} of {total} {}",
                                index + 1,
                                refusal(status)
                            )),
                        ));
                    }
                },
                Err((Written::Nothing(_), _)) => {
                    // Certainly not sent: the next turn reconnects and writes it again.
                    state.session = None;
                    reconnects += 1;
                }
                Err((Written::Partly(e), _))
                | Err((Written::Whole, Some(LinkError::Closed(e)))) => {
                    states[index] = PartState::InFlight(e);
                    state.session = None;
                    index += 1;
                    reconnects += 1;
                }
                Err((Written::Whole, _)) => {
                    states[index] = PartState::InFlight("the SMSC did not answer in time".into());
                    state.session = None;
                    index += 1;
                }
            }
            if reconnects > CONNECT_ATTEMPTS {
                return Err(finish_early(
                    &states,
                    SendError::Unavailable("the SMSC keeps dropping the connection".into()),
                ));
            }
        }
        if let Some((number, reason)) = states.iter().enumerate().find_map(|(i, s)| match s {
            PartState::InFlight(reason) => Some((i + 1, reason.clone())),
            _ => None,
        }) {
            return Err(SendError::Unknown(format!(
                "the connection to the SMSC was lost before it confirmed part {number} of \
                 {total} ({reason}); it was not sent again so that it cannot arrive twice"
            )));
        }
        let ids: Vec<String> = states
            .iter()
            .filter_map(|s| match s {
                PartState::Accepted(id) => Some(id.clone()),
                _ => None,
            })
            .collect();
        let receipt = if wants_receipt {
            self.wait_for_receipt(state, &ids).await
        } else {
            None
        };
        Ok(Sent {
            parts: total,
            receipt,
        })
    }

    /// Waits up to `receipt_wait_seconds` for final receipts of every part. The worst one is
    /// reported (a message is delivered only if every part is).
    async fn wait_for_receipt(&self, state: &mut LinkState, ids: &[String]) -> Option<Receipt> {
        let deadline = Instant::now() + Duration::from_secs(self.config.receipt_wait_seconds);
        loop {
            let found: Vec<&Receipt> = ids.iter().filter_map(|id| state.receipts.get(id)).collect();
            if found.len() == ids.len() && found.iter().all(|r| r.is_final()) {
                let worst = found
                    .iter()
                    .find(|r| r.state != "DELIVRD")
                    .or(found.first())
                    .map(|r| (*r).clone());
                for id in ids {
                    state.receipts.remove(id);
                }
                return worst;
            }
            let session = state.session.as_mut()?;
            let command = match session.read(deadline).await {
                Ok(command) => command,
                Err(LinkError::Timeout) => {
                    return ids.iter().find_map(|id| state.receipts.remove(id));
                }
                Err(LinkError::Closed(_)) => {
                    state.session = None;
                    return ids.iter().find_map(|id| state.receipts.remove(id));
                }
            };
            if session
                .answer_request(command, &mut state.receipts)
                .await
                .is_err()
            {
                state.session = None;
            }
        }
    }
}

/// The error for a send that stopped before every part was accepted: parts already accepted
/// turn a retryable failure into a non-retryable one, since trying again would send them twice.
fn finish_early(states: &[PartState], error: SendError) -> SendError {
    let accepted = states
        .iter()
        .filter(|s| matches!(s, PartState::Accepted(_)))
        .count();
    let in_flight = states.iter().any(|s| matches!(s, PartState::InFlight(_)));
    if accepted == 0 && !in_flight {
        return error;
    }
    SendError::Unknown(format!(
        "{error}; {accepted} of {} parts had already been accepted, so the message is not sent \
         again (the receiver may see an incomplete message)",
        states.len()
    ))
}

/// The SMPP source address: a `+` number is international (TON 1, NPI 1), digits alone are
/// left to the SMSC (TON 0, NPI 1), anything else is an alphanumeric sender id (TON 5, NPI 0).
fn source_address(from: &str) -> Result<(Ton, Npi, COctetString<1, 21>), SendError> {
    let digits = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit());
    let (ton, npi, value) = match from.strip_prefix('+') {
        Some(number) if digits(number) => (Ton::International, Npi::Isdn, number),
        _ if digits(from) => (Ton::Unknown, Npi::Isdn, from),
        _ if from.chars().count() <= 11 && from.is_ascii() => {
            (Ton::Alphanumeric, Npi::Unknown, from)
        }
        _ => {
            return Err(SendError::Rejected(
                "the sender id must be a number or at most 11 ASCII characters".into(),
            ))
        }
    };
    let value = c_string(value, "sender id")?;
    Ok((ton, npi, value))
}

/// One `submit_sm` for one part.
fn submit_pdu(
    part: &Part,
    concatenation: Concatenation,
    reference: u16,
    (source_ton, source_npi, source): (Ton, Npi, COctetString<1, 21>),
    destination: COctetString<1, 21>,
    wants_receipt: bool,
) -> Result<Pdu, SendError> {
    let sar = match (concatenation, part.concat) {
        (Concatenation::Sar, Some(concat)) => Some(concat),
        _ => None,
    };
    let (esm_class, short_message) = if sar.is_some() {
        (0, part.user_data.clone())
    } else {
        (part.esm_class(), part.short_message())
    };
    let short_message = OctetString::from_vec(short_message)
        .map_err(|_| SendError::Rejected("an SMS part is longer than SMPP allows".into()))?;
    let mut tlvs: Vec<MessageSubmissionRequestTlvValue> = Vec::new();
    if let Some(concat) = sar {
        tlvs.push(MessageSubmissionRequestTlvValue::SarMsgRefNum(reference));
        tlvs.push(MessageSubmissionRequestTlvValue::SarTotalSegments(
            concat.total,
        ));
        tlvs.push(MessageSubmissionRequestTlvValue::SarSegmentSeqnum(
            concat.sequence,
        ));
    }
    Ok(Pdu::SubmitSm(
        SubmitSm::builder()
            .service_type(ServiceType::default())
            .source_addr_ton(source_ton)
            .source_addr_npi(source_npi)
            .source_addr(source)
            .dest_addr_ton(Ton::International)
            .dest_addr_npi(Npi::Isdn)
            .destination_addr(destination)
            .esm_class(EsmClass::from(esm_class))
            .registered_delivery(RegisteredDelivery::from(u8::from(wants_receipt)))
            .data_coding(DataCoding::from(part.coding.smpp_data_coding()))
            .short_message(short_message)
            .tlvs(tlvs)
            .build(),
    ))
}
