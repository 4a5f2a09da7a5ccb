//! One accepted TCP connection: its TLS handshake, HTTP/1 with upgrades, and its graceful close
//! at shutdown; and what the HTTP layer learns about it ([`Peer`], [`Slot`]).
//!
//! This module moves bytes and never reads them: what a request means is decided in `http`, and
//! what an upgraded session does in `session`. A connection that does not finish its handshake or
//! its headers in time is dropped, so a slow client cannot hold a slot.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

/// Time a connection has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may take to finish its request in progress once shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// The client address of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The connection's slot in the connection limit; a session keeps it after the upgrade, and the
/// slot is given back when the last holder drops it.
#[derive(Debug, Clone)]
pub struct Slot {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Slot {
    /// Holds `permit` for the connection and whatever outlives its HTTP part.
    pub fn new(permit: OwnedSemaphorePermit) -> Self {
        Self {
            _permit: Arc::new(permit),
        }
    }
}

/// The TLS acceptor for a PEM certificate chain and its private key.
pub fn tls_acceptor(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .with_context(|| format!("cannot open TLS certificate {}", cert.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("TLS certificate {} is not PEM", cert.display()))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key)
            .with_context(|| format!("cannot open TLS key {}", key.display()))?,
    ))
    .with_context(|| format!("TLS key {} is not PEM", key.display()))?
    .with_context(|| format!("no private key in {}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("the TLS certificate and key do not fit together")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Serves HTTP on one connection (after the TLS handshake, with `tls`) until the client closes
/// it or, once `shutdown` is cancelled, its request in progress is done. Every request carries
/// the connection's [`Peer`] and [`Slot`].
pub async fn serve(
    shutdown: CancellationToken,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
) {
    let service = router.map_request(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(Peer(peer));
        request.extensions_mut().insert(slot.clone());
        request
    });
    let service = TowerToHyperService::new(service);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 * 1024);
    match tls {
        None => {
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            drive(&shutdown, connection).await;
        }
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            drive(&shutdown, connection).await;
        }
    }
}

/// Runs an HTTP connection, closing it gracefully when the server shuts down.
async fn drive<C>(shutdown: &CancellationToken, connection: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulConnection,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = shutdown.cancelled() => {
            connection.as_mut().graceful();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}

/// The graceful-shutdown call of hyper's connection types.
trait GracefulConnection {
    /// Finish the request in progress, then close.
    fn graceful(self: std::pin::Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S::ResBody: hyper::body::Body + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
