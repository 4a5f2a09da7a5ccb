//! One accepted TCP connection: its TLS handshake, HTTP/1 with upgrades, and its graceful close
//! at shutdown; and what the HTTP layer learns about it ([`Peer`], [`Slot`]).
//!
//! This module moves bytes and never reads them: what a request means is decided in `http`, and
//! what an upgraded session does in `session`. A connection that does not finish its handshake or
//! its headers in time is dropped, so a slow client cannot hold a slot, and one address (and one
//! wide address block) holds only so many connections that have not logged in ([`PreLogin`]).

use std::collections::{hash_map, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::Context as _;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tidings_core::limits::AddressBlock;
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

/// The connection's slot in the connection limit, and its place among its address block's
/// connections that have not logged in. Every request of the connection holds a clone; a session
/// keeps it after the upgrade and, once logged in, keeps only the slot ([`Slot::logged_in`]).
/// Each is given back when its last holder drops it.
#[derive(Debug, Clone)]
pub struct Slot {
    permit: Arc<OwnedSemaphorePermit>,
    /// A separate allocation, so that a logged-in session does not keep it.
    _not_logged_in: Arc<PreLoginCount>,
}

/// A logged-in session's slot in the connection limit.
#[derive(Debug)]
pub struct SessionSlot {
    _permit: Arc<OwnedSemaphorePermit>,
}

impl Slot {
    /// Holds `permit` and `not_logged_in` for the connection and whatever outlives its HTTP
    /// part.
    pub fn new(permit: OwnedSemaphorePermit, not_logged_in: PreLoginCount) -> Self {
        Self {
            permit: Arc::new(permit),
            _not_logged_in: Arc::new(not_logged_in),
        }
    }

    /// The connection's session has logged in: it no longer counts against its address block
    /// (once the connection's HTTP part, which ended at the upgrade, has let go of it too).
    pub fn logged_in(self) -> SessionSlot {
        SessionSlot {
            _permit: self.permit,
        }
    }
}

/// Connections that have not logged in (plain HTTP ones, and sessions before `Login`), counted
/// per narrow address block (an IPv4 address, an IPv6 /64: what one client can cheaply hold) and
/// per wide one (an IPv4 /24, an IPv6 /48: what a client holding many addresses holds, such as
/// the 65,536 /64s of a /48). Each is bounded in time by the header, body and login timeouts;
/// this bounds how many one client holds at once, so that it cannot take the connection limit or
/// the file descriptors.
#[derive(Debug)]
pub struct PreLogin {
    /// Narrow and wide blocks alike (their prefixes differ, so their keys never meet).
    counts: Mutex<HashMap<AddressBlock, usize>>,
    per_address: usize,
    per_block: usize,
}

impl PreLogin {
    /// At most `per_address` connections not logged in per narrow address block, and at most
    /// `per_block` per wide one.
    pub fn new(per_address: usize, per_block: usize) -> Arc<Self> {
        Arc::new(Self {
            counts: Mutex::default(),
            per_address,
            per_block,
        })
    }

    /// Counts a new connection from `ip`; `None` when its address or its wide block holds as
    /// many as it may.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<PreLoginCount> {
        let blocks = AddressBlock::of_client(ip);
        let mut counts = self.counts();
        let full = blocks
            .iter()
            .zip([self.per_address, self.per_block])
            .any(|(block, most)| counts.get(block).is_some_and(|count| *count >= most));
        if full {
            return None;
        }
        for block in blocks {
            *counts.entry(block).or_insert(0) += 1;
        }
        Some(PreLoginCount {
            pre_login: Arc::clone(self),
            blocks,
        })
    }

    /// The table; nothing panics while holding it.
    fn counts(&self) -> MutexGuard<'_, HashMap<AddressBlock, usize>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One connection counted in [`PreLogin`]; dropping it gives its place back.
#[derive(Debug)]
pub struct PreLoginCount {
    pre_login: Arc<PreLogin>,
    blocks: [AddressBlock; 2],
}

impl Drop for PreLoginCount {
    fn drop(&mut self) {
        let mut counts = self.pre_login.counts();
        for block in self.blocks {
            if let hash_map::Entry::Occupied(mut entry) = counts.entry(block) {
                *entry.get_mut() -= 1;
                if *entry.get() == 0 {
                    entry.remove();
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn connections_not_logged_in_are_counted_per_address_and_ipv6_64() {
        let pre_login = PreLogin::new(2, 5);
        // Two addresses of one IPv6 /64 count together; another /64 and an IPv4 address do not.
        let first = pre_login.admit(ip("2001:db8::1"));
        let second = pre_login.admit(ip("2001:db8::ffff:2"));
        assert!(first.is_some() && second.is_some());
        assert!(
            pre_login.admit(ip("2001:db8::3")).is_none(),
            "the /64 is full"
        );
        let other_64 = pre_login.admit(ip("2001:db8:0:1::1"));
        assert!(other_64.is_some(), "the next /64 is another block");
        let v4 = [
            pre_login.admit(ip("192.0.2.1")),
            pre_login.admit(ip("192.0.2.1")),
        ];
        assert!(v4.iter().all(Option::is_some));
        assert!(
            pre_login.admit(ip("192.0.2.1")).is_none(),
            "the address is full"
        );
        assert!(
            pre_login.admit(ip("192.0.2.2")).is_some(),
            "an IPv4 block is one address"
        );
        // A place given back is taken again; a block with none left is forgotten.
        drop(first);
        assert!(pre_login.admit(ip("2001:db8::4")).is_some());
        drop((second, other_64, v4));
        assert!(
            pre_login.counts().is_empty(),
            "no block is kept without a connection"
        );
    }

    #[test]
    fn connections_not_logged_in_are_counted_per_wide_block_too() {
        let pre_login = PreLogin::new(2, 3);
        // Three /64s of one /48 fill it, though each holds one connection.
        let held: Vec<_> = ["2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1"]
            .into_iter()
            .map(|address| pre_login.admit(ip(address)))
            .collect();
        assert!(held.iter().all(Option::is_some));
        assert!(
            pre_login.admit(ip("2001:db8:0:4::1")).is_none(),
            "the /48 is full"
        );
        assert!(
            pre_login.admit(ip("2001:db8:1::1")).is_some(),
            "the next /48 is another block"
        );
        // Likewise three addresses of one IPv4 /24.
        let v4: Vec<_> = ["192.0.2.1", "192.0.2.2", "192.0.2.3"]
            .into_iter()
            .map(|address| pre_login.admit(ip(address)))
            .collect();
        assert!(v4.iter().all(Option::is_some));
        assert!(
            pre_login.admit(ip("192.0.2.4")).is_none(),
            "the /24 is full"
        );
        assert!(pre_login.admit(ip("192.0.3.1")).is_some());
        // A refused connection counted nowhere: one given back makes room again.
        drop(v4);
        assert!(pre_login.admit(ip("192.0.2.4")).is_some());
        drop(held);
        assert!(pre_login.admit(ip("2001:db8:0:4::1")).is_some());
        assert!(
            pre_login.counts().is_empty(),
            "no block is kept without a connection"
        );
    }
}
