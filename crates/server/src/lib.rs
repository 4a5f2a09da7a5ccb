//! The Tidings server: registration over HTTP, sessions over an upgraded connection, routing and
//! delivery over a [`tidings_store::Store`].
//!
//! # Layout
//! - [`config`]: settings from flags, environment, file and defaults;
//! - [`keys`]: the OPRF and code keys (outside the data directory);
//! - [`gateway`]: where verification SMS go;
//! - [`http`]: the HTTP routes and their OpenAPI document;
//! - [`session`]: one upgraded connection, from login to close;
//! - [`requests`]: what a session's frames ask for (send, ack, lookup, devices, disable);
//! - [`directory`]: device keys (publish, claim), link codes, removing a device;
//! - [`hub`]: the live sessions of this node;
//! - [`state`]: what handlers share, and the in-memory rate limiters;
//! - [`metrics`]: Prometheus counters;
//! - this file: binding, TLS, the accept loop, background sweeps and graceful shutdown.
//!
//! The server must never log or store a phone number, a message payload, a code or a key in
//! clear; numbers become pseudonyms at the edge and are dropped.

pub mod config;
pub mod directory;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod keys;
pub mod metrics;
pub mod requests;
pub mod session;
pub mod state;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tidings_core::routing::Retention;
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{Store as _, SyncReport};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

use crate::config::ServerConfig;
use crate::http::{Peer, Slot};
use crate::metrics::Metrics;
use crate::state::{now_ms, Shared, State};

/// The listen backlog: bursts of connects must not overflow it (the kernel default of 128 does).
const BACKLOG: u32 = 4096;
/// Time a connection has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for sessions to finish what they started.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// A server bound to its port, ready to run.
pub struct Server {
    state: Shared,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn sync_observer(
    metrics: Arc<Metrics>,
    trace: Option<std::path::PathBuf>,
) -> anyhow::Result<tidings_store::SyncObserver> {
    let trace = match trace {
        Some(path) => Some(Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open sync trace {}", path.display()))?,
        )),
        None => None,
    };
    Ok(Arc::new(move |report: &SyncReport| {
        metrics.syncs.inc();
        metrics.sync_batch.observe(report.operations as f64);
        if let Some(file) = &trace {
            let ids: Vec<String> = report
                .messages
                .iter()
                .map(|(device, id)| format!("{device}/{id}"))
                .collect();
            if let Ok(mut file) = file.lock() {
                let _ = writeln!(
                    file,
                    "sync {} operations={} messages={}",
                    report.seq,
                    report.operations,
                    ids.join(",")
                );
            }
        }
    }))
}

fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<TlsAcceptor> {
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

impl Server {
    /// Opens storage and keys and binds the port.
    pub async fn bind(config: ServerConfig) -> anyhow::Result<Self> {
        if config.key_file.starts_with(&config.data_dir) {
            tracing::warn!("the key file is inside the data directory: a copy of the data directory then includes the key");
        }
        let keys = keys::ServerKeys::load_or_create(&config.key_file)?;
        let metrics = Arc::new(Metrics::new());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let workers = runtime.metrics().num_workers();
            metrics
                .runtime_workers
                .set(i64::try_from(workers).unwrap_or(i64::MAX));
        }
        std::fs::create_dir_all(&config.data_dir).with_context(|| {
            format!("cannot create data directory {}", config.data_dir.display())
        })?;
        {
            use std::os::unix::fs::PermissionsExt as _;
            let _ =
                std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700));
        }
        let store = SqliteStore::open(
            &config.data_dir,
            SqliteOptions {
                // As many as the writer's queue holds: under load a batch's one sync is shared
                // by more writes (at 1,024 the relay's peaks were 14-17 % lower, the durable
                // store's 21 %; docs/BENCHMARKS.md, change 21).
                max_batch: tidings_store::sqlite::WRITER_QUEUE,
                sync_observer: Some(sync_observer(
                    Arc::clone(&metrics),
                    config.sync_trace.clone(),
                )?),
            },
        )
        .context("cannot open the data store")?;
        let gateway = gateway::Gateway::new(config.gateway.clone(), config.sms_from.clone());
        let tls = match &config.tls {
            Some((cert, key)) => Some(load_tls(cert, key)?),
            None => None,
        };
        let socket = if config.listen.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.set_nodelay(true)?;
        socket
            .bind(config.listen)
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let listener = socket.listen(BACKLOG)?;
        let state = Arc::new(State {
            code_policy: config.code_policy,
            config,
            store,
            keys,
            hub: Arc::default(),
            metrics,
            gateway,
            retention: Retention::default(),
            code_requests: Mutex::default(),
            verify_requests: Mutex::default(),
            lookup_budgets: Mutex::default(),
            claim_budgets: Mutex::default(),
            link_offers: Mutex::default(),
            send_budgets: Mutex::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            openapi_json: std::sync::OnceLock::new(),
        });
        Ok(Self {
            state,
            listener,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets every session finish
    /// what it started, and returns once storage has synced everything it accepted.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            state,
            listener,
            tls,
        } = self;
        let router = http::router(state.clone());
        let slots = Arc::new(Semaphore::new(state.config.max_connections));
        spawn_sweeps(&state);
        loop {
            let (stream, peer) = tokio::select! {
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and similar: pause instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                // At the connection limit: close at once rather than queue.
                drop(stream);
                continue;
            };
            state.metrics.connections.inc();
            let _ = stream.set_nodelay(true);
            let router = router.clone();
            let tls = tls.clone();
            let connection_state = state.clone();
            state.tasks.spawn(async move {
                let slot = Slot(Arc::new(slot));
                serve_connection(connection_state, router, tls, stream, peer, slot).await;
            });
        }
        drop(listener);
        tracing::info!("shutting down: finishing sessions");
        state.shutdown.cancel();
        // Idle sessions wait on their mailbox only: wake them to see the shutdown.
        state.hub.wake_lapsed(None);
        state.tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, state.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some sessions did not finish in time");
        }
        // A final scrub so that nothing deleted lingers in the write-ahead log.
        let _ = state.store.scrub().await;
        tracing::info!("stopped");
        Ok(())
    }
}

async fn serve_connection(
    state: Shared,
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
            drive(state, connection).await;
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
            drive(state, connection).await;
        }
    }
}

/// Runs an HTTP connection, closing it gracefully when the server shuts down.
async fn drive<C>(state: Shared, connection: C)
where
    C: std::future::Future<Output = Result<(), hyper::Error>> + GracefulConnection,
{
    let mut connection = std::pin::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = state.shutdown.cancelled() => {
            connection.as_mut().graceful();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, connection).await;
        }
    }
}

/// The graceful-shutdown call of hyper's connection types.
pub trait GracefulConnection {
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

/// Runs `work` every `period` until shutdown.
fn every<F, Fut>(state: &Shared, period: Duration, mut work: F)
where
    F: FnMut(Shared) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let state_for_task = state.clone();
    state.tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = state_for_task.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            work(state_for_task.clone()).await;
        }
    });
}

/// Expiry, code pruning, limiter pruning and scrubbing, each on its own interval.
fn spawn_sweeps(state: &Shared) {
    every(state, Duration::from_secs(1), |state| async move {
        match state.store.expire(now_ms(), 1000).await {
            Ok(expired) => {
                state.metrics.expired.inc_by(expired.len() as u64);
                for message in expired {
                    let receipt =
                        tidings_proto::frame::Kind::Receipt(tidings_proto::frame::Receipt {
                            id: message.id.as_bytes().to_vec(),
                            kind: tidings_proto::frame::ReceiptKind::Expired as i32,
                        })
                        .into();
                    state.hub.notify(&message.sender_device, &receipt);
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    });
    // The heartbeat sweep: an idle session keeps no timer of its own.
    every(state, Duration::from_millis(500), |state| async move {
        state.hub.wake_lapsed(Some(hub::clock_ms()));
    });
    every(state, Duration::from_secs(60), |state| async move {
        let now = now_ms();
        state.prune_limiters(now);
        if let Err(e) = state.store.prune_codes(now).await {
            tracing::warn!(error = %e, "code pruning failed");
        }
    });
    let scrub_interval = Duration::from_millis(state.config.scrub_interval_ms);
    every(state, scrub_interval, |state| async move {
        if let Err(e) = state.store.scrub().await {
            tracing::debug!(error = %e, "scrub deferred");
        }
    });
}
