//! `tidings`: the server and the command-line client in one binary. This file only parses
//! arguments, installs logging, dispatches each subcommand and maps results to exit codes; the
//! flags are in `cli.rs`, the client commands in `commands.rs`, and the work in the
//! `tidings-server` and `tidings-client` crates.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;
use serde_json::json;
use tidings_client::ClientError;
use tidings_server::config::{ServerArgs, StoreEngine};

use crate::cli::{Cli, Command, EXIT_NOT_REGISTERED};
use crate::commands::Context;

/// The PostgreSQL driver logs each statement's parameters at debug level: pseudonyms, keys,
/// code hashes and payloads. Its log stops at info whatever `--log` asks.
const POSTGRES_DRIVER_LOG: &str = "tokio_postgres=info";

fn init_logging(filter: Option<&str>, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter.unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let filter = match POSTGRES_DRIVER_LOG.parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// The server's runtime threads: one fewer than the cores (at least one), because the store's
/// writer is a thread of its own that a busy server keeps running. With one runtime thread per
/// core the two kinds took turns on the same cores: on two cores, one runtime thread served the
/// relay with 9-11 % less CPU per message (docs/BENCHMARKS.md, change 22). `None` when
/// `TOKIO_WORKER_THREADS` is set: tokio then takes that count.
fn server_worker_threads() -> Option<usize> {
    if std::env::var_os("TOKIO_WORKER_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Some(cores.saturating_sub(1).max(1))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let is_server = matches!(&cli.command, Command::Server(server) if server.action.is_none());
    init_logging(cli.log.as_deref(), if is_server { "info" } else { "warn" });
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if is_server {
        if let Some(threads) = server_worker_threads() {
            builder.worker_threads(threads);
        }
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            let not_registered = matches!(
                e.downcast_ref::<ClientError>(),
                Some(ClientError::NotRegistered | ClientError::NotVerified)
            );
            if json {
                println!("{}", json!({ "error": e.to_string() }));
            } else {
                eprintln!("error: {e:#}");
            }
            if not_registered {
                ExitCode::from(EXIT_NOT_REGISTERED)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// Runs one subcommand.
async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let context = Context::new(cli.profile, cli.json, cli.passphrase_file);
    match cli.command {
        Command::Server(server) => match server.action {
            None => serve(server.args).await,
            Some(action) => commands::server_key(action, &server.args),
        },
        Command::Register(args) => commands::register(&context, args).await,
        Command::Verify { code } => commands::verify(&context, &code).await,
        Command::Send(args) => commands::send(&context, args).await,
        Command::Listen { count, timeout } => commands::listen(&context, count, timeout).await,
        Command::Link(args) => commands::link(&context, args).await,
        Command::Devices { remove } => commands::devices(&context, remove).await,
        Command::Fingerprint { number } => commands::fingerprint(&context, &number).await,
        Command::Trust { number } => commands::trust(&context, &number).await,
        Command::Lookup { numbers } => commands::lookup(&context, &numbers).await,
        Command::Repin => commands::repin(&context).await,
        Command::Disable => commands::disable(&context).await,
        Command::Settings(settings) => commands::settings(&context, *settings).await,
        Command::Status => commands::status(&context),
        Command::History => commands::history(&context),
    }
}

async fn serve(args: ServerArgs) -> anyhow::Result<ExitCode> {
    let config = args.resolve()?;
    // The one place the server's storage engine is chosen.
    match config.store.clone() {
        StoreEngine::Sqlite => {
            let data_dir = config.data_dir.clone();
            let server = tidings_server::Server::bind(config, |observer| {
                let options = tidings_store::sqlite::SqliteOptions {
                    // As many as the writer's queue holds: under load a batch's one sync is
                    // shared by more writes (at 1,024 the relay's peaks were 14-17 % lower, the
                    // durable store's 21 %; docs/BENCHMARKS.md, change 21).
                    max_batch: tidings_store::sqlite::WRITER_QUEUE,
                    sync_observer: Some(observer),
                };
                Ok(tidings_store::sqlite::SqliteStore::open(
                    &data_dir, options,
                )?)
            })
            .await?;
            run_server(server, &args).await
        }
        StoreEngine::Postgres { url } => {
            let store =
                connect_postgres(&url, &config.store, key_chain_file(&config.key_file)).await?;
            // Every commit is durable when it returns: there is no sync of the server's to
            // observe (crates/store/src/postgres/mod.rs).
            let server = tidings_server::Server::bind(config, move |_observer| Ok(store)).await?;
            run_server(server, &args).await
        }
    }
}

/// Seconds a connection to PostgreSQL may take to open, unless the URL says otherwise: a
/// database that cannot be reached fails the start in this time instead of the system's TCP
/// timeout (minutes).
const POSTGRES_CONNECT_TIMEOUT_SECONDS: u32 = 10;

/// The key chain file that seals the copies waiting in PostgreSQL: beside the key file, with the
/// extension `chain` (`server.key` → `server.chain`). Like the key file, every node holds a copy.
fn key_chain_file(key_file: &std::path::Path) -> std::path::PathBuf {
    key_file.with_extension("chain")
}

/// Connects the PostgreSQL engine; the error names the database without the URL's password.
async fn connect_postgres(
    url: &str,
    engine: &StoreEngine,
    key_chain: std::path::PathBuf,
) -> anyhow::Result<tidings_store::postgres::PostgresStore> {
    let url = if url.contains("connect_timeout=") {
        url.to_string()
    } else {
        let separator = if url.contains('?') { '&' } else { '?' };
        format!("{url}{separator}connect_timeout={POSTGRES_CONNECT_TIMEOUT_SECONDS}")
    };
    tracing::info!(store = %engine.describe(), "connecting to PostgreSQL");
    tidings_store::postgres::PostgresStore::connect(
        &url,
        tidings_store::postgres::PostgresOptions::new(key_chain),
    )
    .await
    .map_err(|e| {
        anyhow::anyhow!(
            "cannot open the PostgreSQL store at {}: {e}; check that PostgreSQL runs there and that the URL's user, password, host, port and database are right",
            engine.describe()
        )
    })
}

/// Serves on an opened server until SIGTERM or Ctrl-C.
async fn run_server<S: tidings_store::Store>(
    server: tidings_server::Server<S>,
    args: &ServerArgs,
) -> anyhow::Result<ExitCode> {
    let address = server.local_addr()?;
    let scheme = if server_tls(args) { "https" } else { "http" };
    println!("tidings server listening on {scheme}://{address}");
    if let Some(metrics) = server.metrics_addr()? {
        tracing::info!("metrics on http://{metrics}/metrics");
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("signal received");
        signal.cancel();
    });
    server.run(shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

fn server_tls(args: &ServerArgs) -> bool {
    args.resolve().map(|c| c.tls.is_some()).unwrap_or(false)
}

/// jemalloc, for the Rust code and (its `malloc` unprefixed) for SQLite's C code: sizes kept
/// apart in slabs, and freed pages given back by its background thread (settings in
/// `.cargo/config.toml`). Why: docs/ARCHITECTURE.md, dependencies.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
