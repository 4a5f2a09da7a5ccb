//! SMS transports: how an SMS leaves a Tidings client (fallback) or server (verification codes).
//!
//! One type, [`Transport`], chosen by configuration:
//! - `outbox` writes each SMS as a JSON file into a directory (development and tests), readable
//!   only by the user running it (files 0600 in a 0700 directory);
//! - `kannel` hands it to Kannel's HTTP `sendsms` interface;
//! - `smpp` submits it over SMPP 3.4 to an SMSC or aggregator ([`smpp`]);
//! - `modem` sends it through a GSM/LTE modem on a serial port with AT commands ([`modem`]).
//!
//! The same transports also receive (mobile-originated SMS, [`Transport::receive`]): the SMPP
//! session answers the SMSC's `deliver_sm` and keeps what it carried, the modem lists, reads and
//! deletes its stored messages. Kannel and the outbox receive nothing here (Kannel calls its
//! owner over HTTP instead).
//!
//! Every failure is a [`SendError`] that says whether trying again is safe: a request that may
//! have reached the gateway is never retried here, so an SMS is not sent twice. The message text
//! is checked against the part limit with the shared encoder (`tidings-sms`) before anything is
//! sent. This crate never logs; callers must not log the numbers or texts they pass in.

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod modem;
pub mod smpp;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tidings_sms::{DataCoding, SplitOptions};
use tokio::io::AsyncWriteExt as _;

/// Time allowed for one gateway request.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts to a gateway that refuses connections (safe: nothing was sent).
const CONNECT_ATTEMPTS: u32 = 3;
/// The `outbox` directory's mode: its files hold numbers and codes.
const OUTBOX_DIR_MODE: u32 = 0o700;
/// The mode of each `outbox` file.
const OUTBOX_FILE_MODE: u32 = 0o600;

/// One SMS.
#[derive(Clone, PartialEq, Eq)]
pub struct Sms {
    /// Sender id: the user's own number for a fallback, the operator's name for codes.
    pub from: String,
    /// Receiver, E.164.
    pub to: String,
    /// The text, any Unicode.
    pub text: String,
}

impl std::fmt::Debug for Sms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sms")
            .field("chars", &self.text.chars().count())
            .finish_non_exhaustive()
    }
}

/// One SMS received from a phone: the sender as the network gave it, and the text.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    /// The sender: E.164 with `+` when the network said it is international, else as given.
    pub from: String,
    /// The text, decoded.
    pub text: String,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("chars", &self.text.chars().count())
            .finish_non_exhaustive()
    }
}

/// Most received SMS a transport holds until they are taken: a flood of them is dropped
/// rather than held without bound.
pub const MAX_RECEIVED: usize = 256;

/// Why an SMS was not sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The text needs more parts than allowed.
    #[error("the message needs {needed} SMS parts; at most {limit} are allowed: shorten it")]
    TooLong { needed: usize, limit: u8 },
    /// The gateway refused it for good (bad number, bad credentials, bad request).
    #[error("the SMS gateway refused the message: {0}")]
    Rejected(String),
    /// The gateway is down or throttling; the message was not sent and may be retried.
    #[error("the SMS gateway is unavailable: {0}; the message is kept and will be retried")]
    Unavailable(String),
    /// The outcome is unknown (the request may have reached the gateway); retrying could send twice.
    #[error("the SMS gateway did not answer: {0}")]
    Unknown(String),
}

impl SendError {
    /// Whether sending again is safe and may succeed.
    pub fn retry_is_safe(&self) -> bool {
        matches!(self, SendError::Unavailable(_))
    }
}

/// What a transport learned about an SMS it sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sent {
    /// SMS parts handed over.
    pub parts: usize,
    /// The SMSC's delivery receipt, if one arrived while the send waited for it (SMPP only).
    pub receipt: Option<smpp::Receipt>,
}

impl Sent {
    /// A short note for the user about what is known beyond "sent", or an empty string.
    pub fn note(&self) -> String {
        match &self.receipt {
            Some(receipt) => format!("the SMSC reports the SMS {}", receipt.describe()),
            None => String::new(),
        }
    }
}

/// A transport as it is configured (profile or server config).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transport", rename_all = "lowercase", deny_unknown_fields)]
pub enum TransportConfig {
    /// Files in a directory.
    Outbox { dir: PathBuf },
    /// Kannel's `sendsms` interface, such as `http://127.0.0.1:13013`.
    Kannel {
        url: String,
        username: String,
        password: String,
    },
    /// An SMPP 3.4 account at an SMSC or aggregator.
    Smpp(smpp::SmppConfig),
    /// A GSM/LTE modem on a serial port.
    Modem(modem::ModemConfig),
}

impl std::fmt::Debug for TransportConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportConfig::Outbox { dir } => f.debug_struct("Outbox").field("dir", dir).finish(),
            TransportConfig::Kannel { url, .. } => f
                .debug_struct("Kannel")
                .field("url", url)
                .finish_non_exhaustive(),
            TransportConfig::Smpp(config) => config.fmt(f),
            TransportConfig::Modem(config) => config.fmt(f),
        }
    }
}

/// A ready transport.
#[derive(Debug)]
pub struct Transport {
    config: TransportConfig,
    max_parts: u8,
    counter: AtomicU64,
    /// The concatenation reference of the next long message. It starts from the clock so that
    /// two processes (two `tidings send` commands) rarely pick the same one for one receiver.
    reference: AtomicU64,
    /// The SMPP session, kept between sends (and kept alive) when the transport is SMPP.
    smpp: Option<Arc<smpp::Link>>,
    /// One user of the modem's port at a time: a send and a read of received messages.
    modem: tokio::sync::Mutex<()>,
}

impl Transport {
    /// A transport for `config`, refusing texts longer than `max_parts` SMS parts.
    pub fn new(config: TransportConfig, max_parts: u8) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::from(d.subsec_nanos()) ^ d.as_secs())
            .unwrap_or(0);
        let smpp = match &config {
            TransportConfig::Smpp(settings) => Some(Arc::new(smpp::Link::new(settings.clone()))),
            _ => None,
        };
        Self {
            config,
            max_parts,
            counter: AtomicU64::new(0),
            reference: AtomicU64::new(seed),
            smpp,
            modem: tokio::sync::Mutex::new(()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// Checks the length, then sends.
    pub async fn send(&self, sms: &Sms) -> Result<Sent, SendError> {
        let reference = self.reference.fetch_add(1, Ordering::Relaxed);
        let options = SplitOptions {
            max_parts: self.max_parts,
            // Truncation is the point: the header holds 8 bits (16 for SMPP's SAR).
            reference: reference as u8,
        };
        let parts = tidings_sms::split(&sms.text, &options).map_err(|e| match e {
            tidings_sms::EncodeError::TooManyParts { needed, limit } => {
                SendError::TooLong { needed, limit }
            }
            other => SendError::Rejected(other.to_string()),
        })?;
        let coding = parts.first().map_or(DataCoding::Gsm7, |part| part.coding);
        let count = parts.len();
        let sent = Sent {
            parts: count,
            receipt: None,
        };
        match &self.config {
            TransportConfig::Outbox { dir } => {
                self.write_outbox(dir, sms, count).await.map(|()| sent)
            }
            TransportConfig::Kannel {
                url,
                username,
                password,
            } => send_kannel(url, username, password, sms, coding)
                .await
                .map(|()| sent),
            TransportConfig::Smpp(_) => match &self.smpp {
                Some(link) => link.send(sms, parts, reference as u16).await,
                None => Err(SendError::Rejected("the SMPP link is missing".into())),
            },
            TransportConfig::Modem(settings) => {
                let _port = self.modem.lock().await;
                modem::send(settings.clone(), sms, &options).await
            }
        }
    }

    /// The SMS received since the last call (at most [`MAX_RECEIVED`]): what the SMSC delivered
    /// on the SMPP session (opening it if needed), or what the modem had stored (read and
    /// deleted from it). Kannel and the outbox receive nothing this way.
    pub async fn receive(&self) -> Result<Vec<Received>, SendError> {
        match &self.config {
            TransportConfig::Smpp(_) => match &self.smpp {
                Some(link) => link.receive().await,
                None => Ok(Vec::new()),
            },
            TransportConfig::Modem(settings) => {
                let _port = self.modem.lock().await;
                modem::receive(settings.clone()).await
            }
            TransportConfig::Outbox { .. } | TransportConfig::Kannel { .. } => Ok(Vec::new()),
        }
    }

    async fn write_outbox(
        &self,
        dir: &std::path::Path,
        sms: &Sms,
        parts: usize,
    ) -> Result<(), SendError> {
        // The files hold numbers and codes: only this user may list or read them, whatever the
        // umask. A directory that already existed is narrowed too.
        tokio::fs::DirBuilder::new()
            .recursive(true)
            .mode(OUTBOX_DIR_MODE)
            .create(dir)
            .await
            .map_err(|e| SendError::Unavailable(format!("outbox: {e}")))?;
        tokio::fs::set_permissions(dir, std::fs::Permissions::from_mode(OUTBOX_DIR_MODE))
            .await
            .map_err(|e| SendError::Unavailable(format!("outbox: {e}")))?;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!("{stamp}-{}-{n}.json", std::process::id());
        let body =
            serde_json::json!({ "from": sms.from, "to": sms.to, "text": sms.text, "parts": parts })
                .to_string();
        let temp = dir.join(format!(".{name}.tmp"));
        let written = async {
            let mut file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(OUTBOX_FILE_MODE)
                .open(&temp)
                .await?;
            file.write_all(body.as_bytes()).await?;
            file.flush().await
        };
        written
            .await
            .map_err(|e| SendError::Unavailable(format!("outbox: {e}")))?;
        tokio::fs::rename(&temp, dir.join(&name))
            .await
            .map_err(|e| SendError::Unavailable(format!("outbox: {e}")))
    }
}

/// Kannel's `sendsms`: `GET /cgi-bin/sendsms?username&password&from&to&text&coding&charset`.
/// Kannel answers 202 ("0: Accepted for delivery" or "3: Queued for later delivery"); it splits
/// long texts into concatenated parts itself.
async fn send_kannel(
    url: &str,
    username: &str,
    password: &str,
    sms: &Sms,
    coding: DataCoding,
) -> Result<(), SendError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| SendError::Rejected(format!("`{url}` is not a Kannel URL")))?;
    let host = uri
        .host()
        .ok_or_else(|| SendError::Rejected("the Kannel URL has no host".into()))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let coding = match coding {
        DataCoding::Gsm7 => "0",
        DataCoding::Ucs2 => "2",
    };
    let query = serde_urlencoded::to_string([
        ("username", username),
        ("password", password),
        ("from", sms.from.as_str()),
        ("to", sms.to.as_str()),
        ("text", sms.text.as_str()),
        ("charset", "UTF-8"),
        ("coding", coding),
    ])
    .map_err(|e| SendError::Rejected(e.to_string()))?;
    let path = format!(
        "{}/cgi-bin/sendsms?{query}",
        uri.path().trim_end_matches('/')
    );

    // Connecting is retried: a refused connection means nothing was sent.
    let mut attempt = 0;
    let stream = loop {
        attempt += 1;
        match tokio::time::timeout(
            TIMEOUT,
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(stream)) => break stream,
            Ok(Err(e)) if attempt >= CONNECT_ATTEMPTS => {
                return Err(SendError::Unavailable(format!(
                    "cannot connect to Kannel at {host}:{port}: {e}"
                )))
            }
            Err(_) if attempt >= CONNECT_ATTEMPTS => {
                return Err(SendError::Unavailable(format!(
                    "connecting to Kannel at {host}:{port} timed out"
                )))
            }
            _ => tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await,
        }
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| SendError::Unavailable(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .body(Empty::new())
            .map_err(|e| SendError::Rejected(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| SendError::Unknown(e.to_string()))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), 4096)
            .collect()
            .await
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        driver.abort();
        Ok::<_, SendError>((status, body))
    };
    let (status, body) = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| SendError::Unknown("Kannel did not answer in time".into()))??;
    if status.is_success() {
        Ok(())
    } else if status == hyper::StatusCode::SERVICE_UNAVAILABLE
        || status == hyper::StatusCode::TOO_MANY_REQUESTS
    {
        // Kannel refuses before queueing anything when it is throttling or its queue is full.
        Err(SendError::Unavailable(format!("{status}: {body}")))
    } else {
        Err(SendError::Rejected(format!("{status}: {body}")))
    }
}
