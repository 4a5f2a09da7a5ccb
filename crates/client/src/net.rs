//! Reaching the server: TCP or TLS, JSON requests, and the upgrade to a session.
//!
//! Only [`crate::account::Account`] and [`crate::registration`] call into this module, and only
//! for a profile its user has registered (or is registering): this is where the opt-in promise
//! would break, so nothing else may open a connection.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::profile::Trust;
use crate::{ClientError, Result};

/// Time allowed for connecting and for each HTTP exchange.
pub const NETWORK_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest HTTP response body read.
const MAX_RESPONSE: usize = 256 * 1024;

/// A byte stream to the server, plain or TLS.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Where the server is and how to trust it: one or more addresses of the same service (its
/// nodes), tried in turn.
#[derive(Debug, Clone)]
pub struct Endpoint {
    addresses: Arc<[Address]>,
    trust: Trust,
    /// The address that answered last, tried first next time.
    preferred: Arc<AtomicUsize>,
}

/// One address of the server.
#[derive(Debug)]
struct Address {
    tls: bool,
    host: String,
    port: u16,
}

impl Address {
    /// Parses `http://host:port` or `https://host:port`.
    fn parse(url: &str) -> Result<Self> {
        let uri: hyper::Uri = url.parse().map_err(|_| {
            ClientError::Profile(format!(
                "`{url}` is not a URL such as https://tidings.example:7433"
            ))
        })?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Profile(
                    "the server URL must start with http:// or https://".into(),
                ))
            }
        };
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Profile("the server URL has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Ok(Self { tls, host, port })
    }

    fn is_loopback(&self) -> bool {
        self.host == "localhost" || self.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    }

    fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Opens a byte stream (TCP, then TLS if the URL says https).
    async fn connect(&self, trust: &Trust) -> Result<Box<dyn Stream>> {
        let tcp = tokio::time::timeout(
            NETWORK_TIMEOUT,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| ClientError::Network(format!("{}: {e}", self.authority())))?;
        let _ = tcp.set_nodelay(true);
        if !self.tls {
            return Ok(Box::new(tcp));
        }
        let config = tls_config(trust)?;
        let name = ServerName::try_from(self.host.clone()).map_err(|_| {
            ClientError::Profile(format!("`{}` is not a valid server name", self.host))
        })?;
        let tls = tokio::time::timeout(
            NETWORK_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| ClientError::Timeout)?
        .map_err(|e| ClientError::Network(format!("TLS with {}: {e}", self.authority())))?;
        Ok(Box::new(tls))
    }
}

impl Endpoint {
    /// Parses `http://host:port` or `https://host:port`, or several such URLs separated by
    /// commas: addresses of the same service, each trusted the same way. A plain-HTTP server
    /// that is not on this machine is refused unless `trust.insecure` is set.
    pub fn parse(urls: &str, trust: Trust) -> Result<Self> {
        let addresses = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(Address::parse)
            .collect::<Result<Vec<_>>>()?;
        if addresses.is_empty() {
            return Err(ClientError::Profile("no server URL was given".into()));
        }
        if !trust.insecure && addresses.iter().any(|a| !a.tls && !a.is_loopback()) {
            return Err(ClientError::Profile(
                "refusing plain HTTP to a server that is not on this machine: use https://, or pass --insecure".into(),
            ));
        }
        Ok(Self {
            addresses: addresses.into(),
            trust,
            preferred: Arc::default(),
        })
    }

    /// Opens a byte stream to the first address that answers, starting with the one that
    /// answered last; returns it with the address's `host:port` (the request's `Host`). When
    /// none answers, the error names each address's failure.
    async fn connect(&self) -> Result<(Box<dyn Stream>, String)> {
        let count = self.addresses.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut failures = Vec::new();
        for index in (0..count).map(|k| (first + k) % count) {
            let address = &self.addresses[index];
            match address.connect(&self.trust).await {
                Ok(stream) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok((stream, address.authority()));
                }
                // A refusal of the configuration (a bad name, an unreadable CA file) is the
                // same at every address.
                Err(e @ ClientError::Profile(_)) => return Err(e),
                Err(e) if count == 1 => return Err(e),
                Err(e) => failures.push(format!("{}: {e}", address.authority())),
            }
        }
        Err(ClientError::Network(format!(
            "no address of the server answered ({})",
            failures.join("; ")
        )))
    }

    /// Sends one JSON request and returns the status and the JSON body (with `retry_after` taken
    /// from a `Retry-After` header when the body does not say it).
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<(StatusCode, serde_json::Value)> {
        self.json_request(Method::POST, path, Some(body)).await
    }

    /// Sends one `GET` and returns the status and the JSON body.
    pub async fn get_json(&self, path: &str) -> Result<(StatusCode, serde_json::Value)> {
        self.json_request(Method::GET, path, None).await
    }

    async fn json_request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value)> {
        let (stream, authority) = self.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(
                body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string())),
            ))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok());
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?
                .to_bytes();
            let mut json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
            // A refusal that says when to try again only in its header says it in the body too,
            // where the caller reads it.
            if let (Some(seconds), Some(body)) = (retry_after, json.as_object_mut()) {
                body.entry("retry_after").or_insert(seconds.into());
            }
            Ok::<_, ClientError>((status, json))
        };
        let result = tokio::time::timeout(NETWORK_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?;
        driver.abort();
        result
    }

    /// Opens a session connection: `GET /v1/connect` with `Upgrade: tidings/3`, presenting
    /// `resume` (a resumption token, and whether the session listens) if given. Returns the
    /// upgraded stream and how the session logs in.
    pub async fn upgrade(
        &self,
        resume: Option<(&[u8], bool)>,
    ) -> Result<(Box<dyn Stream>, Upgraded)> {
        let (stream, authority) = self.connect().await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?;
        tokio::spawn(connection.with_upgrades());
        let mut request = Request::builder()
            .method(Method::GET)
            .uri("/v1/connect")
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, tidings_proto::UPGRADE_PROTOCOL);
        if let Some((token, listen)) = resume {
            request = request
                .header(
                    tidings_proto::RESUME_HEADER,
                    tidings_proto::id::to_text(token),
                )
                .header(tidings_proto::LISTEN_HEADER, if listen { "1" } else { "0" });
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let exchange = async {
            let mut response = sender
                .send_request(request)
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                return Err(ClientError::Protocol(format!(
                    "expected 101 from /v1/connect, got {}",
                    response.status()
                )));
            }
            let headers = response.headers();
            let upgraded_as = if headers
                .get(tidings_proto::RESUMED_HEADER)
                .is_some_and(|v| v.as_bytes() == b"1")
            {
                Upgraded::Resumed
            } else {
                let challenge = headers
                    .get(tidings_proto::CHALLENGE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(tidings_proto::id::from_text)
                    .filter(|c| c.len() == 32)
                    .ok_or_else(|| {
                        ClientError::Protocol("the upgrade carried no valid challenge".into())
                    })?;
                Upgraded::Challenge(challenge)
            };
            let upgraded = hyper::upgrade::on(&mut response)
                .await
                .map_err(|e| ClientError::Network(e.to_string()))?;
            Ok::<_, ClientError>((
                Box::new(TokioIo::new(upgraded)) as Box<dyn Stream>,
                upgraded_as,
            ))
        };
        tokio::time::timeout(NETWORK_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Timeout)?
    }
}

/// How an upgraded connection logs in.
#[derive(Debug)]
pub enum Upgraded {
    /// By signing this challenge in a `Login`.
    Challenge(Vec<u8>),
    /// Already: the resumption token held, and `LoginResult` comes next.
    Resumed,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(trust: &Trust) -> Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Profile(e.to_string()))?;
    let config = if let Some(pin) = &trust.pin_sha256 {
        let pin = parse_pin(pin)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                pin,
                provider: provider(),
            }))
            .with_no_client_auth()
    } else if let Some(ca_file) = &trust.ca_file {
        let file = std::fs::File::open(ca_file).map_err(|e| {
            ClientError::Profile(format!("cannot open CA file {}: {e}", ca_file.display()))
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
            let cert = cert
                .map_err(|e| ClientError::Profile(format!("CA file {}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| ClientError::Profile(format!("CA file {}: {e}", ca_file.display())))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        return Err(ClientError::Profile(
            "an https server needs --ca <file> or --pin <sha256 of its certificate>".into(),
        ));
    };
    Ok(Arc::new(config))
}

/// Parses 64 hex digits (colons allowed) into a SHA-256 pin.
pub fn parse_pin(text: &str) -> Result<[u8; 32]> {
    let hex: String = text.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return Err(ClientError::Profile(
            "a pin is the SHA-256 of the certificate: 64 hex digits".into(),
        ));
    }
    let mut pin = [0u8; 32];
    for (i, byte) in pin.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| {
            ClientError::Profile("a pin is the SHA-256 of the certificate: 64 hex digits".into())
        })?;
    }
    Ok(pin)
}

/// Trusts exactly one certificate, named by its SHA-256. Signatures are still checked.
#[derive(Debug)]
struct PinnedCertificate {
    pin: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let digest: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if digest == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
