//! The Tidings server: registration over HTTP, sessions over an upgraded connection, routing and
//! delivery over a [`tidings_store::Store`].
//!
//! # Layout
//! Modules depend one way: no two of them use each other, directly or through a third. Only
//! [`config`], [`keys`] (read by the privacy tests), [`Server`] and [`SyncObserver`] are public.
//! - this file: [`Server`], generic over the storage engine: binding the public and the metrics
//!   address, their accept loops and graceful shutdown; the engine itself is opened by the
//!   caller (the binary);
//! - [`config`]: settings from flags, environment, file and defaults;
//! - [`keys`]: the OPRF and code keys (outside the data directory);
//! - `connection`: one accepted connection: TLS, HTTP/1 with upgrades, its `Peer` and `Slot`;
//! - `http`: the HTTP routes (registration, link, upgrade, operations) and their OpenAPI document;
//! - `gateway`: where verification SMS go, and where the SMPP session's and the modem's received
//!   SMS are read;
//! - `inbound`: registration by the user's own SMS: the declarations (by pseudonym, codes as
//!   keyed hashes, in memory) that an SMS from the declared number proves;
//! - `receiver`: the trusted inbound sources (SMPP and modem polling, Kannel on the metrics
//!   address) that hand each received SMS to `inbound`;
//! - `session`: one upgraded connection, from login to close: reads frames, runs requests,
//!   writes answers and deliveries;
//! - `identity`: who is logged in on a session;
//! - `request`: the one `Request` a frame carries, and its dispatch to a handler;
//! - `send`: a session's sends, decided concurrently and stored and pushed in the order read;
//! - `delivery`: a device's queue and receipts, acknowledgements and withdraws;
//! - `discovery`: which answers about another account are charged to the asking account's
//!   discovery budget (evaluations, lookups, device lists, sends, withdraws, key claims), and the
//!   charge;
//! - `evaluate`: the OPRF evaluation of blinded numbers, charged to the discovery budget;
//! - `rotation`: OPRF key rotation while serving: `Rekey`, moving a registrant's account to the
//!   current key, and what the start does about the previous key;
//! - `lookup`: lookups and device lists by pseudonym;
//! - `presence`: who may see a session's device online (`PresenceSet`, in memory only) and the
//!   shape of the proofs that lookups and sends present;
//! - `directory`: device keys (publish, claim), link codes, vouches, removing a device,
//!   disabling an account;
//! - `reply`: the one way a handler answers, and the one shape of an error frame;
//! - `hub`: the live sessions of this node and their mailboxes;
//! - `state`: what handlers share, and the per-device budgets;
//! - `abuse`: the registration limits by address block (behind trusted proxies too) and the SMS
//!   budgets against pumping and number bombing;
//! - `sweeps`: expiry, the heartbeat sweep, pruning and scrubbing on intervals;
//! - `clock`: the wall clock and the monotonic session clock;
//! - `metrics`: Prometheus counters, and the router of the metrics address (`metrics_listen`);
//! - `testing` (tests only): a state over a store in a temporary directory and logged-in
//!   devices, for the unit tests beside `session`, `http` and each handler (`*/tests.rs`).
//!
//! The server must never log or store a phone number, a message payload, a code or a key in
//! clear. The only number it ever receives is a registrant's own, in the HTTP registration
//! requests and in `Rekey` (the device's own, after a key rotation), where it becomes a
//! pseudonym at once and is dropped; every session request names
//! accounts by the pseudonym the client derived with `evaluate` (blinded, promise P3).

mod abuse;
mod budget;
mod bus;
mod clock;
pub mod config;
mod connection;
mod delivery;
mod directory;
mod discovery;
mod evaluate;
mod gateway;
mod held;
mod http;
mod hub;
mod identity;
mod inbound;
pub mod keys;
mod lookup;
mod metrics;
mod presence;
mod receiver;
mod reply;
mod request;
mod resume;
mod rotation;
mod send;
mod session;
mod state;
mod sweeps;
#[cfg(test)]
mod testing;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tidings_store::{Store, SyncReport};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A session's queue bounds, for tests that fill one queue up to either bound.
pub use crate::hub::{SESSION_QUEUE, SESSION_QUEUE_BYTES};

use crate::config::ServerConfig;
use crate::connection::{PreLogin, Slot, SHUTDOWN_GRACE};
use crate::metrics::Metrics;
use crate::state::{Shared, State};

/// The listen backlog: bursts of connects must not overflow it (the kernel default of 128 does).
const BACKLOG: u32 = 4096;

/// Connections the metrics address serves at once: it is for one scraper and an operator.
const METRICS_CONNECTIONS: usize = 16;

/// A listening socket on `address`.
fn listen(address: SocketAddr) -> anyhow::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket
        .bind(address)
        .with_context(|| format!("cannot listen on {address}"))?;
    Ok(socket.listen(BACKLOG)?)
}

/// Which connections one listening address takes: at most as many at once as `slots` holds, of
/// which at most `pre_login`'s caps per address and per address block not yet logged in; `counted` counts those
/// accepted (the public port's; a scrape of the metrics address should not change what it reads).
struct Admission {
    slots: Arc<Semaphore>,
    pre_login: Arc<PreLogin>,
    counted: Option<prometheus_client::metrics::counter::Counter>,
}

/// Accepts connections on `listener` as `admission` allows and serves `router` on each, until
/// `shutdown` is cancelled; then the listener is closed.
async fn accept<S: Store>(
    state: Shared<S>,
    listener: TcpListener,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    admission: Admission,
    shutdown: CancellationToken,
) {
    let Admission {
        slots,
        pre_login,
        counted,
    } = admission;
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
        let Some(not_logged_in) = pre_login.admit(peer.ip()) else {
            // The address block holds as many connections not logged in as it may.
            drop(stream);
            continue;
        };
        if let Some(counted) = &counted {
            counted.inc();
        }
        let _ = stream.set_nodelay(true);
        let slot = Slot::new(slot, not_logged_in);
        let serving = connection::serve(
            state.shutdown.clone(),
            router.clone(),
            tls.clone(),
            stream,
            peer,
            slot,
        );
        state.tasks.spawn(serving);
    }
}

/// What the store is told after every sync: the server counts syncs and batch sizes, and with
/// `--sync-trace` writes each sync's message ids to a file.
pub use tidings_store::SyncObserver;

/// A server bound to its port, ready to run, over the storage engine `S`.
pub struct Server<S: Store> {
    state: Shared<S>,
    listener: TcpListener,
    /// The operator's address for `/metrics`, if it is on.
    metrics_listener: Option<TcpListener>,
    tls: Option<TlsAcceptor>,
}

impl<S: Store> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

fn sync_observer(
    metrics: Arc<Metrics>,
    trace: Option<std::path::PathBuf>,
) -> anyhow::Result<SyncObserver> {
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

impl<S: Store> Server<S> {
    /// Opens keys and storage and binds the port. `open_store` opens the engine (SQLite in
    /// `config.data_dir`, created before it is called, or one the caller connected already) and
    /// hands every sync report to the observer it is given; the engine is chosen by the caller,
    /// not here.
    pub async fn bind<F>(config: ServerConfig, open_store: F) -> anyhow::Result<Self>
    where
        F: FnOnce(SyncObserver) -> anyhow::Result<S>,
    {
        if config.key_file.starts_with(&config.data_dir) {
            tracing::warn!("the key file is inside the data directory: a copy of the data directory then includes the key");
        }
        if let tidings_gateway::TransportConfig::Outbox { dir } = &config.gateway {
            // The default: it needs nothing to set up, so a production server can end up with it.
            tracing::warn!(
                dir = %dir.display(),
                "the outbox SMS gateway is for testing only: it writes each code to a file instead of sending it; set sms_gateway to kannel, smpp or modem"
            );
        }
        if config.tls.is_none() && !config.listen.ip().is_loopback() {
            // Registration numbers, codes and login challenges would cross the network in the
            // clear unless a TLS proxy sits in front on the same machine.
            tracing::warn!(
                listen = %config.listen,
                "listening without TLS on a non-loopback address: clients reach it in plain TCP; set tls_cert and tls_key, or listen on loopback behind a TLS proxy"
            );
        }
        if let Some(metrics) = config.metrics_listen.filter(|a| !a.ip().is_loopback()) {
            // The counters say how busy the server is and when: for the operator's eyes only.
            tracing::warn!(
                metrics_listen = %metrics,
                "metrics are served on a non-loopback address: anyone who can reach it can read them; keep it behind a firewall"
            );
        }
        let keys = keys::ServerKeys::load_or_create(&config.key_file)?;
        let metrics = Arc::new(Metrics::new(&config.node_name));
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
        let observer = sync_observer(Arc::clone(&metrics), config.sync_trace.clone())?;
        let store = open_store(observer).context("cannot open the data store")?;
        let tls = match &config.tls {
            Some((cert, key)) => Some(connection::tls_acceptor(cert, key)?),
            None => None,
        };
        let listener = listen(config.listen)?;
        let metrics_listener = match config.metrics_listen {
            Some(address) => Some(listen(address).context(
                "cannot serve metrics: set metrics_listen to a free address, or to off",
            )?),
            None => None,
        };
        let bus = match &config.bus {
            Some((url, prefix)) => Some(bus::Bus::connect(url, prefix, &config.node_name).await?),
            None => None,
        };
        let state = Arc::new(State::new(config, store, keys, metrics));
        if let Some(bus) = bus {
            state.hub.join(bus);
        }
        Ok(Self {
            state,
            listener,
            metrics_listener,
            tls,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The address that serves `/metrics`, if it is on.
    pub fn metrics_addr(&self) -> anyhow::Result<Option<SocketAddr>> {
        Ok(match &self.metrics_listener {
            Some(listener) => Some(listener.local_addr()?),
            None => None,
        })
    }

    /// Serves until `shutdown` is cancelled, then stops accepting, lets every session finish
    /// what it started, and returns once storage has synced everything it accepted.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Server {
            state,
            listener,
            metrics_listener,
            tls,
        } = self;
        let router = http::router(state.clone());
        let slots = Arc::new(Semaphore::new(state.config.max_connections));
        let pre_login = PreLogin::new(
            state.config.pre_login_connections_per_address,
            state.config.pre_login_connections_per_block,
        );
        rotation::at_start(&state).await;
        sweeps::spawn(&state);
        if let Some(bus) = state.hub.bus() {
            state
                .tasks
                .spawn(bus::run(Arc::clone(&state), Arc::clone(bus)));
        }
        receiver::spawn(&state);
        if let Some(metrics_listener) = metrics_listener {
            // The operator's address also takes SMS from Kannel: only it may claim a sender.
            let operator_router = metrics::router(Arc::clone(&state.metrics))
                .merge(receiver::router(Arc::clone(&state)));
            let accepting = accept(
                Arc::clone(&state),
                metrics_listener,
                operator_router,
                None,
                Admission {
                    slots: Arc::new(Semaphore::new(METRICS_CONNECTIONS)),
                    pre_login: PreLogin::new(METRICS_CONNECTIONS, METRICS_CONNECTIONS),
                    counted: None,
                },
                shutdown.clone(),
            );
            state.tasks.spawn(accepting);
        }
        let admission = Admission {
            slots,
            pre_login,
            counted: Some(state.metrics.connections.clone()),
        };
        // The accept loop runs as a task of the runtime, not on the thread that awaits `run`
        // (the binary's main thread, outside the runtime's worker threads): there, an accept
        // could cost two cross-thread wake-ups (the worker that polls the sockets woke the
        // main thread, whose spawned connection then woke a worker). On a worker, a connection
        // it accepts starts on the same thread.
        let accepting = tokio::spawn(accept(
            Arc::clone(&state),
            listener,
            router,
            tls,
            admission,
            shutdown,
        ));
        if accepting.await.is_err() {
            tracing::warn!("the accept loop ended abnormally");
        }
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
        // What is still held in memory is stored: no acknowledgement can come any more.
        crate::held::store_all(&state).await;
        // A final scrub so that nothing deleted lingers in the write-ahead log.
        let _ = state.store.scrub().await;
        tracing::info!("stopped");
        Ok(())
    }
}
