//! Server configuration: defaults, a TOML file, environment variables and flags.
//!
//! Precedence, highest first: command-line flag, environment variable (`TIDINGS_*`), config file
//! (`--config`, `TIDINGS_CONFIG`, or `$XDG_CONFIG_HOME/tidings/server.toml` if it exists),
//! built-in default. Every setting has all four forms; `docs/CONFIGURATION.md` lists them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;
use tidings_core::limits::AddressBlock;

/// Devices a number may link per day unless configured otherwise: enough to set up a few
/// computers, too few to make fresh devices a way around anything.
pub const LINKS_PER_DAY: usize = 5;

/// Settings as given by flags and environment; each is optional so that the file and the
/// defaults can fill what is not given.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerArgs {
    /// Config file (TOML). Default: $XDG_CONFIG_HOME/tidings/server.toml, if it exists
    #[arg(long, env = "TIDINGS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7433]
    #[arg(long, env = "TIDINGS_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address that serves /metrics to the operator, apart from the public port, or `off`
    /// [default: 127.0.0.1:9464]
    #[arg(long, env = "TIDINGS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// This node's name, given in /metrics as `tidings_node_info{node="..."}` (1-64 letters,
    /// digits, `.`, `_`, `-`) [default: the machine's host name]
    #[arg(long, env = "TIDINGS_NODE_NAME")]
    pub node_name: Option<String>,
    /// Directory holding all server state [default: $XDG_DATA_HOME/tidings/server]
    #[arg(long, env = "TIDINGS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where accounts and messages are stored: `sqlite` (in the data directory) or a
    /// postgres://user@host:port/database URL (prefer the environment variable or the config
    /// file when it holds a password) [default: sqlite]
    #[arg(long, env = "TIDINGS_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// The NATS server the nodes of one deployment share, as nats://host:port, or the servers of
    /// a NATS cluster separated by commas (several nodes over one PostgreSQL store); none for a
    /// single node [default: none]
    #[arg(long, env = "TIDINGS_BUS", hide_env_values = true)]
    pub bus: Option<String>,
    /// The first part of every NATS subject this deployment uses, so that several deployments
    /// can share one NATS (1-32 letters, digits, `_`, `-`) [default: tidings]
    #[arg(long, env = "TIDINGS_BUS_PREFIX")]
    pub bus_prefix: Option<String>,
    /// The server's secret key file (OPRF and code keys), kept outside the data directory
    /// [default: $XDG_CONFIG_HOME/tidings/server.key]
    #[arg(long, env = "TIDINGS_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); with --tls-key, the server speaks only TLS
    #[arg(long, env = "TIDINGS_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, env = "TIDINGS_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// SMS gateway for verification codes: `outbox`, `kannel`, `smpp` or `modem` [default: outbox]
    #[arg(long, env = "TIDINGS_SMS_GATEWAY")]
    pub sms_gateway: Option<String>,
    /// Directory the `outbox` gateway writes each SMS to [default: $XDG_DATA_HOME/tidings/outbox]
    #[arg(long, env = "TIDINGS_OUTBOX_DIR")]
    pub outbox_dir: Option<PathBuf>,
    /// Kannel's sendsms interface, such as http://127.0.0.1:13013 (with --sms-gateway kannel)
    #[arg(long, env = "TIDINGS_KANNEL_URL")]
    pub kannel_url: Option<String>,
    /// Kannel sendsms-user name
    #[arg(long, env = "TIDINGS_KANNEL_USERNAME")]
    pub kannel_username: Option<String>,
    /// Kannel sendsms-user password (prefer the environment variable or the config file)
    #[arg(long, env = "TIDINGS_KANNEL_PASSWORD", hide_env_values = true)]
    pub kannel_password: Option<String>,
    /// SMSC address host:port (with --sms-gateway smpp)
    #[arg(long, env = "TIDINGS_SMPP_ADDRESS")]
    pub smpp_address: Option<String>,
    /// SMPP system_id of the account
    #[arg(long, env = "TIDINGS_SMPP_SYSTEM_ID")]
    pub smpp_system_id: Option<String>,
    /// SMPP password (prefer the environment variable or the config file)
    #[arg(long, env = "TIDINGS_SMPP_PASSWORD", hide_env_values = true)]
    pub smpp_password: Option<String>,
    /// SMPP system_type, if the provider asks for one [default: empty]
    #[arg(long, env = "TIDINGS_SMPP_SYSTEM_TYPE")]
    pub smpp_system_type: Option<String>,
    /// SMPP bind: `transceiver` or `transmitter` [default: transceiver]
    #[arg(long, env = "TIDINGS_SMPP_BIND")]
    pub smpp_bind: Option<String>,
    /// Seconds of silence before an SMPP enquire_link [default: 30]
    #[arg(long, env = "TIDINGS_SMPP_ENQUIRE_LINK_SECONDS")]
    pub smpp_enquire_link_seconds: Option<u64>,
    /// Serial port of the modem, such as /dev/ttyUSB0 (with --sms-gateway modem)
    #[arg(long, env = "TIDINGS_MODEM_PORT")]
    pub modem_port: Option<PathBuf>,
    /// Modem line speed in baud [default: 115200]
    #[arg(long, env = "TIDINGS_MODEM_BAUD")]
    pub modem_baud: Option<u32>,
    /// Seconds the modem may take to send one SMS part [default: 60]
    #[arg(long, env = "TIDINGS_MODEM_TIMEOUT_SECONDS")]
    pub modem_timeout_seconds: Option<u64>,
    /// Sender id on verification SMS [default: Tidings]
    #[arg(long, env = "TIDINGS_SMS_FROM")]
    pub sms_from: Option<String>,
    /// Offer registration by the user's own SMS (`true` or `false`; needs sms_service_number)
    /// [default: false]
    #[arg(long, env = "TIDINGS_INBOUND_REGISTRATION")]
    pub inbound_registration: Option<bool>,
    /// The number users text to register by their own SMS, in E.164 form: the number of the
    /// modem's SIM, the SMPP account or the Kannel SMSC that delivers to this server
    #[arg(long, env = "TIDINGS_SMS_SERVICE_NUMBER")]
    pub sms_service_number: Option<String>,
    /// Seconds a code for registration by own SMS stays valid [default: 600]
    #[arg(long, env = "TIDINGS_INBOUND_CODE_SECONDS")]
    pub inbound_code_seconds: Option<u64>,
    /// Seconds between client heartbeats; a session silent for three is closed [default: 10]
    #[arg(long, env = "TIDINGS_HEARTBEAT_SECONDS")]
    pub heartbeat_seconds: Option<u32>,
    /// Most simultaneous connections [default: 100000]
    #[arg(long, env = "TIDINGS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most connections not yet logged in (HTTP ones included) per client address (IPv4) or
    /// IPv6 /64; more are closed at once [default: 64]
    #[arg(long, env = "TIDINGS_PRE_LOGIN_CONNECTIONS_PER_ADDRESS")]
    pub pre_login_connections_per_address: Option<usize>,
    /// Most connections not yet logged in (HTTP ones included) per IPv4 /24 or IPv6 /48, however
    /// many addresses of it they come from; more are closed at once [default: 1024]
    #[arg(long, env = "TIDINGS_PRE_LOGIN_CONNECTIONS_PER_BLOCK")]
    pub pre_login_connections_per_block: Option<usize>,
    /// Most sessions one device may hold at once; a login past it is refused [default: 4]
    #[arg(long, env = "TIDINGS_SESSIONS_PER_DEVICE")]
    pub sessions_per_device: Option<usize>,
    /// Seconds a resumption token stays valid, at most 86400; 0 issues none (every connect
    /// logs in by challenge) [default: 86400]
    #[arg(long, env = "TIDINGS_RESUME_TOKEN_SECONDS")]
    pub resume_token_seconds: Option<u64>,
    /// Seconds a request's body may take to arrive after its headers; later it is answered 408
    /// and the connection closed [default: 10]
    #[arg(long, env = "TIDINGS_BODY_TIMEOUT_SECONDS")]
    pub body_timeout_seconds: Option<u64>,
    /// Milliseconds between scrubs that remove deleted bytes from the data files
    /// [default: 2000 with SQLite, 60000 with PostgreSQL]
    #[arg(long, env = "TIDINGS_SCRUB_INTERVAL_MS")]
    pub scrub_interval_ms: Option<u64>,
    /// Milliseconds a copy pushed to a live session waits in memory for its device's
    /// acknowledgement before it is stored; 0 stores every message before it is pushed
    /// [default: 1000]
    #[arg(long, env = "TIDINGS_ACK_WINDOW_MS")]
    pub ack_window_ms: Option<u64>,
    /// Bytes of copies held in memory waiting for an acknowledgement, at most; past it a message
    /// is stored before it is pushed [default: 67108864]
    #[arg(long, env = "TIDINGS_HELD_BYTES")]
    pub held_bytes: Option<usize>,
    /// Messages a device may send at once before the rate limit [default: 200]
    #[arg(long, env = "TIDINGS_SEND_BURST")]
    pub send_burst: Option<u32>,
    /// Messages a device's send budget regains per second [default: 100]
    #[arg(long, env = "TIDINGS_SEND_PER_SECOND")]
    pub send_per_second: Option<u32>,
    /// Copies one sending account may have waiting for one device [default: 500]
    #[arg(long, env = "TIDINGS_QUEUE_COPIES_PER_SENDER")]
    pub queue_copies_per_sender: Option<u32>,
    /// Bytes one sending account may have waiting for one device [default: 8388608]
    #[arg(long, env = "TIDINGS_QUEUE_BYTES_PER_SENDER")]
    pub queue_bytes_per_sender: Option<u64>,
    /// Bytes one account may have waiting across all receivers [default: 67108864]
    #[arg(long, env = "TIDINGS_QUEUED_BYTES_PER_ACCOUNT")]
    pub queued_bytes_per_account: Option<u64>,
    /// Copies all strangers together may have waiting for one device [default: 200]
    #[arg(long, env = "TIDINGS_STRANGER_POOL_COPIES")]
    pub stranger_pool_copies: Option<u32>,
    /// Discovery budget of an account (all its devices): evaluations of blinded numbers plus
    /// answers that tell whether another account is a user or online (lookups, device lists,
    /// sends naming none of the receiver's devices, withdraws, key claims), at once before the
    /// rate limit [default: 10000]
    #[arg(long, env = "TIDINGS_LOOKUP_BURST")]
    pub lookup_burst: Option<u32>,
    /// What an account's discovery budget regains per hour [default: 200]
    #[arg(long, env = "TIDINGS_LOOKUP_PER_HOUR")]
    pub lookup_per_hour: Option<u32>,
    /// Other users' one-time keys a device may claim at once before the rate limit [default: 100]
    #[arg(long, env = "TIDINGS_KEY_CLAIM_BURST")]
    pub key_claim_burst: Option<u32>,
    /// Other users' one-time keys a device's claim budget regains per hour [default: 100]
    #[arg(long, env = "TIDINGS_KEY_CLAIMS_PER_HOUR")]
    pub key_claims_per_hour: Option<u32>,
    /// Devices a number may link per day (a day from each link) [default: 5]
    #[arg(long, env = "TIDINGS_LINKS_PER_DAY")]
    pub links_per_day: Option<usize>,
    /// Code requests allowed per client address per 5 minutes [default: 5]
    #[arg(long, env = "TIDINGS_CODES_PER_ADDRESS")]
    pub codes_per_address: Option<usize>,
    /// Verification attempts allowed per client address per 5 minutes [default: 30]
    #[arg(long, env = "TIDINGS_VERIFIES_PER_ADDRESS")]
    pub verifies_per_address: Option<usize>,
    /// Code requests allowed per wide address block (IPv4 /24, IPv6 /48) per 5 minutes
    /// [default: 20]
    #[arg(long, env = "TIDINGS_CODES_PER_ADDRESS_BLOCK")]
    pub codes_per_address_block: Option<usize>,
    /// Verification and link attempts allowed per wide address block (IPv4 /24, IPv6 /48) per
    /// 5 minutes [default: 120]
    #[arg(long, env = "TIDINGS_VERIFIES_PER_ADDRESS_BLOCK")]
    pub verifies_per_address_block: Option<usize>,
    /// Reverse proxies whose X-Forwarded-For is believed: addresses or blocks, comma-separated
    /// (such as 127.0.0.1,10.0.0.0/8) [default: none]
    #[arg(long, env = "TIDINGS_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Verification codes sent per hour in all [default: 1000]
    #[arg(long, env = "TIDINGS_CODES_PER_HOUR")]
    pub codes_per_hour: Option<usize>,
    /// Verification codes sent per country calling code per hour [default: 200]
    #[arg(long, env = "TIDINGS_CODES_PER_COUNTRY_PER_HOUR")]
    pub codes_per_country_per_hour: Option<usize>,
    /// Verification codes sent per number prefix (all but the last 3 digits) per hour
    /// [default: 10]
    #[arg(long, env = "TIDINGS_CODES_PER_PREFIX_PER_HOUR")]
    pub codes_per_prefix_per_hour: Option<usize>,
    /// SMS sent to one number per 24 hours, whether its codes are used or not [default: 5]
    #[arg(long, env = "TIDINGS_SMS_PER_NUMBER_PER_DAY")]
    pub sms_per_number_per_day: Option<usize>,
    /// Most entries (address blocks, numbers, prefixes) each registration limiter holds; when
    /// full, the oldest are forgotten [default: 1000000]
    #[arg(long, env = "TIDINGS_LIMITER_CAPACITY")]
    pub limiter_capacity: Option<usize>,
    /// Seconds between two codes for the same number [default: 120]
    #[arg(long, env = "TIDINGS_CODE_INTERVAL_SECONDS")]
    pub code_interval_seconds: Option<u64>,
    /// Codes per number per 8 hours [default: 2]
    #[arg(long, env = "TIDINGS_CODES_PER_NUMBER")]
    pub codes_per_number: Option<usize>,
    /// Append a line per storage sync to this file (durability audits and tests)
    #[arg(long, env = "TIDINGS_SYNC_TRACE")]
    pub sync_trace: Option<PathBuf>,
}

/// The same settings in the config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    metrics_listen: Option<String>,
    node_name: Option<String>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    bus: Option<String>,
    bus_prefix: Option<String>,
    key_file: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    sms_gateway: Option<String>,
    outbox_dir: Option<PathBuf>,
    kannel_url: Option<String>,
    kannel_username: Option<String>,
    kannel_password: Option<String>,
    smpp_address: Option<String>,
    smpp_system_id: Option<String>,
    smpp_password: Option<String>,
    smpp_system_type: Option<String>,
    smpp_bind: Option<String>,
    smpp_enquire_link_seconds: Option<u64>,
    modem_port: Option<PathBuf>,
    modem_baud: Option<u32>,
    modem_timeout_seconds: Option<u64>,
    sms_from: Option<String>,
    inbound_registration: Option<bool>,
    sms_service_number: Option<String>,
    inbound_code_seconds: Option<u64>,
    heartbeat_seconds: Option<u32>,
    max_connections: Option<usize>,
    pre_login_connections_per_address: Option<usize>,
    pre_login_connections_per_block: Option<usize>,
    sessions_per_device: Option<usize>,
    resume_token_seconds: Option<u64>,
    body_timeout_seconds: Option<u64>,
    scrub_interval_ms: Option<u64>,
    ack_window_ms: Option<u64>,
    held_bytes: Option<usize>,
    send_burst: Option<u32>,
    send_per_second: Option<u32>,
    queue_copies_per_sender: Option<u32>,
    queue_bytes_per_sender: Option<u64>,
    queued_bytes_per_account: Option<u64>,
    stranger_pool_copies: Option<u32>,
    lookup_burst: Option<u32>,
    lookup_per_hour: Option<u32>,
    key_claim_burst: Option<u32>,
    key_claims_per_hour: Option<u32>,
    links_per_day: Option<usize>,
    codes_per_address: Option<usize>,
    verifies_per_address: Option<usize>,
    codes_per_address_block: Option<usize>,
    verifies_per_address_block: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    codes_per_hour: Option<usize>,
    codes_per_country_per_hour: Option<usize>,
    codes_per_prefix_per_hour: Option<usize>,
    sms_per_number_per_day: Option<usize>,
    limiter_capacity: Option<usize>,
    code_interval_seconds: Option<u64>,
    codes_per_number: Option<usize>,
    sync_trace: Option<PathBuf>,
}

/// Resolved configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Where `/metrics` is served; `None` when turned off.
    pub metrics_listen: Option<SocketAddr>,
    /// This node's name, given in `/metrics` (`tidings_node_info`).
    pub node_name: String,
    pub data_dir: PathBuf,
    /// The storage engine the server runs on.
    pub store: StoreEngine,
    /// The NATS URL of the deployment's bus, and its subjects' prefix ([`crate::bus`]).
    pub bus: Option<(String, String)>,
    pub key_file: PathBuf,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub gateway: tidings_gateway::TransportConfig,
    pub sms_from: String,
    /// The number users text to register by their own SMS; `None` when that is not offered.
    pub inbound: Option<InboundRegistration>,
    pub heartbeat_seconds: u32,
    pub max_connections: usize,
    pub pre_login_connections_per_address: usize,
    pub pre_login_connections_per_block: usize,
    pub sessions_per_device: usize,
    /// How long a resumption token stays valid, in seconds (at most a day); 0: none issued.
    pub resume_token_seconds: u64,
    /// What a request's body may take to arrive after its headers.
    pub body_timeout: std::time::Duration,
    pub scrub_interval_ms: u64,
    /// How long a held copy waits for its acknowledgement before it is stored (0: deliver first
    /// is off, every message is stored before it is pushed).
    pub ack_window_ms: u64,
    /// Bytes of held copies at most.
    pub held_bytes: usize,
    pub send_burst: u32,
    pub send_per_second: u32,
    /// What a message may be stored with: each device's queue, and one sender's share of it and
    /// of all queues.
    pub queue_limits: tidings_core::delivery::QueueLimits,
    pub lookup_burst: u32,
    pub lookup_per_hour: u32,
    pub key_claim_burst: u32,
    pub key_claims_per_hour: u32,
    pub links_per_day: usize,
    pub codes_per_address: usize,
    pub verifies_per_address: usize,
    pub codes_per_address_block: usize,
    pub verifies_per_address_block: usize,
    /// The proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<AddressBlock>,
    pub codes_per_hour: usize,
    pub codes_per_country_per_hour: usize,
    pub codes_per_prefix_per_hour: usize,
    pub sms_per_number_per_day: usize,
    pub limiter_capacity: usize,
    pub code_policy: tidings_core::verification::CodePolicy,
    pub sync_trace: Option<PathBuf>,
}

/// How long a held copy waits for its acknowledgement unless configured otherwise (see
/// docs/BENCHMARKS.md for the acknowledgement times it was chosen from).
pub const DEFAULT_ACK_WINDOW_MS: u64 = 1000;
/// Bytes of held copies at most unless configured otherwise.
pub const DEFAULT_HELD_BYTES: usize = 64 * 1024 * 1024;

/// Milliseconds between scrubs on SQLite unless configured otherwise: a scrub truncates the WAL,
/// which is cheap, and bounds how long a delivered message stays in the data files (P5).
pub const SQLITE_SCRUB_INTERVAL_MS: u64 = 2_000;

/// Milliseconds between scrubs on PostgreSQL unless configured otherwise. There a scrub is a
/// `VACUUM` of the tables that hold payloads, keys and receipts: it reads every page of them, so
/// every 2 s would keep a busy database vacuuming; autovacuum runs besides it. It bounds nothing
/// on disk either way (docs/ARCHITECTURE.md, "Deleted bytes on PostgreSQL").
pub const POSTGRES_SCRUB_INTERVAL_MS: u64 = 60_000;

/// The storage engine, from the `store` setting.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreEngine {
    /// The embedded SQLite database in the data directory (the default).
    Sqlite,
    /// One PostgreSQL database, by its connection URL (which may hold a password).
    Postgres { url: String },
}

impl StoreEngine {
    /// Parses the `store` setting: `sqlite`, or a `postgres://` / `postgresql://` URL.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if text == "sqlite" {
            return Ok(Self::Sqlite);
        }
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Self::Postgres { url: text.into() });
        }
        // The value is not repeated: a connection string in another form may hold a password
        // where `redact_url` does not look.
        anyhow::bail!("store must be sqlite or a postgres://user@host:port/database URL")
    }

    /// The engine named for logs and errors, without any password.
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite => "sqlite".into(),
            Self::Postgres { url } => redact_url(url),
        }
    }
}

impl std::fmt::Debug for StoreEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, wherever a configuration is printed.
        f.write_str(&self.describe())
    }
}

/// `url` with the password it holds, in its user part or as a `password=` parameter, replaced
/// by `***`.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(at) => url.split_at(at + 3),
        None => ("", url),
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (user_info, host) = authority.split_at(at);
            match user_info.find(':') {
                Some(colon) => format!("{}:***{host}", &user_info[..colon]),
                None => authority.to_string(),
            }
        }
        None => authority.to_string(),
    };
    let path = match path.split_once('?') {
        Some((before, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => {
                        format!("{key}=***")
                    }
                    _ => pair.to_string(),
                })
                .collect();
            format!("{before}?{}", query.join("&"))
        }
        None => path.to_string(),
    };
    format!("{scheme}{authority}{path}")
}

/// Registration by the user's own SMS, when it is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRegistration {
    /// The number to text, E.164.
    pub service_number: tidings_proto::number::E164,
    /// How long a code stays valid, in milliseconds.
    pub code_ttl: tidings_core::Millis,
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/"))
}

/// `$XDG_CONFIG_HOME/tidings`, or `~/.config/tidings`.
pub fn config_home() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".config"))
        .join("tidings")
}

/// `$XDG_DATA_HOME/tidings`, or `~/.local/share/tidings`.
pub fn data_home() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| home().join(".local/share"))
        .join("tidings")
}

/// The default metrics address: loopback, the port Prometheus exporters commonly use.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9464);

/// Checks the bus setting: nats:// URLs.
fn bus_url(url: &str) -> anyhow::Result<String> {
    let valid = url.len() <= 4096
        && url
            .split(',')
            .map(str::trim)
            .all(|one| one.starts_with("nats://") || one.starts_with("tls://"));
    if !valid {
        anyhow::bail!("bus must be a nats://host:port URL, or several separated by commas");
    }
    Ok(url.to_string())
}

/// Checks the bus prefix: the first token of NATS subjects.
fn bus_prefix(prefix: Option<String>) -> anyhow::Result<String> {
    let prefix = prefix.unwrap_or_else(|| "tidings".to_string());
    let valid = (1..=32).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        anyhow::bail!("bus_prefix `{prefix}` must be 1-32 letters, digits, `_` or `-`");
    }
    Ok(prefix)
}

/// Checks a node name given by the operator: it becomes a label value in `/metrics`.
fn node_name(name: &str) -> anyhow::Result<String> {
    let valid = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        anyhow::bail!(
            "node_name `{name}` must be 1-64 letters, digits, `.`, `_` or `-`, such as tidings-1"
        );
    }
    Ok(name.to_string())
}

/// The machine's host name, as the kernel holds it, when it is a valid node name; else
/// `tidings`.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .and_then(|name| node_name(name.trim()).ok())
        .unwrap_or_else(|| "tidings".to_string())
}

/// `off`, or an address and port.
fn metrics_address(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        anyhow::anyhow!(
            "metrics_listen `{text}` is not an address and port (such as 127.0.0.1:9464) nor `off`"
        )
    })
}

fn read_file(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("config file {} is not valid", path.display()))
}

impl ServerArgs {
    /// Applies the precedence rules: flags and environment, then the file, then defaults.
    pub fn resolve(&self) -> anyhow::Result<ServerConfig> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => {
                let default = config_home().join("server.toml");
                if default.exists() {
                    read_file(&default)?
                } else {
                    FileConfig::default()
                }
            }
        };
        let tls = match (
            self.tls_cert.clone().or(file.tls_cert),
            self.tls_key.clone().or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => anyhow::bail!("TLS needs both a certificate and a key: set tls_cert and tls_key"),
        };
        let gateway = match self
            .sms_gateway
            .clone()
            .or(file.sms_gateway)
            .as_deref()
            .unwrap_or("outbox")
        {
            "outbox" => tidings_gateway::TransportConfig::Outbox {
                dir: self
                    .outbox_dir
                    .clone()
                    .or(file.outbox_dir)
                    .unwrap_or_else(|| data_home().join("outbox")),
            },
            "kannel" => tidings_gateway::TransportConfig::Kannel {
                url: self.kannel_url.clone().or(file.kannel_url).context(
                    "the kannel gateway needs kannel_url (such as http://127.0.0.1:13013)",
                )?,
                username: self
                    .kannel_username
                    .clone()
                    .or(file.kannel_username)
                    .context("the kannel gateway needs kannel_username")?,
                password: self
                    .kannel_password
                    .clone()
                    .or(file.kannel_password)
                    .context("the kannel gateway needs kannel_password")?,
            },
            "smpp" => tidings_gateway::TransportConfig::Smpp(tidings_gateway::smpp::SmppConfig {
                address: self.smpp_address.clone().or(file.smpp_address).context(
                    "the smpp gateway needs smpp_address (such as smpp.example.net:2775)",
                )?,
                system_id: self
                    .smpp_system_id
                    .clone()
                    .or(file.smpp_system_id)
                    .context("the smpp gateway needs smpp_system_id")?,
                password: self
                    .smpp_password
                    .clone()
                    .or(file.smpp_password)
                    .context("the smpp gateway needs smpp_password")?,
                system_type: self
                    .smpp_system_type
                    .clone()
                    .or(file.smpp_system_type)
                    .unwrap_or_default(),
                bind: match self
                    .smpp_bind
                    .clone()
                    .or(file.smpp_bind)
                    .as_deref()
                    .unwrap_or("transceiver")
                {
                    "transceiver" => tidings_gateway::smpp::BindMode::Transceiver,
                    "transmitter" => tidings_gateway::smpp::BindMode::Transmitter,
                    other => anyhow::bail!(
                        "unknown SMPP bind `{other}`: use `transceiver` or `transmitter`"
                    ),
                },
                // Codes are one part, so the concatenation style does not matter here.
                concatenation: tidings_gateway::smpp::Concatenation::Udh,
                enquire_link_seconds: self
                    .smpp_enquire_link_seconds
                    .or(file.smpp_enquire_link_seconds)
                    .unwrap_or(30),
                // The code's fate is the user's to see; the server does not wait for receipts.
                receipt_wait_seconds: 0,
            }),
            "modem" => {
                tidings_gateway::TransportConfig::Modem(tidings_gateway::modem::ModemConfig {
                    port: self
                        .modem_port
                        .clone()
                        .or(file.modem_port)
                        .context("the modem gateway needs modem_port (such as /dev/ttyUSB0)")?,
                    baud: self.modem_baud.or(file.modem_baud).unwrap_or(115_200),
                    timeout_seconds: self
                        .modem_timeout_seconds
                        .or(file.modem_timeout_seconds)
                        .unwrap_or(60),
                })
            }
            other => anyhow::bail!(
                "unknown SMS gateway `{other}`: use `outbox`, `kannel`, `smpp` or `modem`"
            ),
        };
        let inbound = if self
            .inbound_registration
            .or(file.inbound_registration)
            .unwrap_or(false)
        {
            let number = self
                .sms_service_number
                .clone()
                .or(file.sms_service_number)
                .context("inbound_registration needs sms_service_number: the number users text")?;
            let service_number = tidings_proto::number::E164::parse(&number)
                .map_err(|e| anyhow::anyhow!("sms_service_number: {e}"))?;
            let seconds = self
                .inbound_code_seconds
                .or(file.inbound_code_seconds)
                .unwrap_or(600);
            if seconds == 0 {
                anyhow::bail!("inbound_code_seconds must be at least 1");
            }
            if let tidings_gateway::TransportConfig::Smpp(smpp) = &gateway {
                if smpp.bind == tidings_gateway::smpp::BindMode::Transmitter {
                    anyhow::bail!(
                        "inbound_registration over SMPP needs smpp_bind = transceiver: a transmitter bind receives no SMS"
                    );
                }
            }
            Some(InboundRegistration {
                service_number,
                code_ttl: seconds.saturating_mul(1000),
            })
        } else {
            None
        };
        let heartbeat_seconds = self
            .heartbeat_seconds
            .or(file.heartbeat_seconds)
            .unwrap_or(10);
        if heartbeat_seconds == 0 {
            anyhow::bail!("heartbeat_seconds must be at least 1");
        }
        let resume_token_seconds = self
            .resume_token_seconds
            .or(file.resume_token_seconds)
            .unwrap_or(crate::resume::MAX_LIFETIME_SECONDS);
        if resume_token_seconds > crate::resume::MAX_LIFETIME_SECONDS {
            anyhow::bail!(
                "resume_token_seconds must be at most {} (a day)",
                crate::resume::MAX_LIFETIME_SECONDS
            );
        }
        let store = match self.store.clone().or(file.store) {
            Some(text) => StoreEngine::parse(&text)?,
            None => StoreEngine::Sqlite,
        };
        let default_scrub_interval_ms = match store {
            StoreEngine::Sqlite => SQLITE_SCRUB_INTERVAL_MS,
            StoreEngine::Postgres { .. } => POSTGRES_SCRUB_INTERVAL_MS,
        };
        let config = ServerConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7433))),
            metrics_listen: match self.metrics_listen.clone().or(file.metrics_listen) {
                Some(text) => metrics_address(&text)?,
                None => Some(DEFAULT_METRICS_LISTEN),
            },
            node_name: match self.node_name.clone().or(file.node_name) {
                Some(name) => node_name(&name)?,
                None => default_node_name(),
            },
            data_dir: self
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| data_home().join("server")),
            store,
            bus: match self.bus.clone().or(file.bus) {
                Some(url) => Some((
                    bus_url(&url)?,
                    bus_prefix(self.bus_prefix.clone().or(file.bus_prefix))?,
                )),
                None => None,
            },
            key_file: self
                .key_file
                .clone()
                .or(file.key_file)
                .unwrap_or_else(|| config_home().join("server.key")),
            tls,
            gateway,
            sms_from: self
                .sms_from
                .clone()
                .or(file.sms_from)
                .unwrap_or_else(|| "Tidings".into()),
            inbound,
            heartbeat_seconds,
            max_connections: self
                .max_connections
                .or(file.max_connections)
                .unwrap_or(100_000),
            pre_login_connections_per_address: self
                .pre_login_connections_per_address
                .or(file.pre_login_connections_per_address)
                .unwrap_or(64),
            pre_login_connections_per_block: self
                .pre_login_connections_per_block
                .or(file.pre_login_connections_per_block)
                .unwrap_or(1024),
            sessions_per_device: self
                .sessions_per_device
                .or(file.sessions_per_device)
                .unwrap_or(4),
            resume_token_seconds,
            body_timeout: std::time::Duration::from_secs(
                self.body_timeout_seconds
                    .or(file.body_timeout_seconds)
                    .unwrap_or(10),
            ),
            scrub_interval_ms: self
                .scrub_interval_ms
                .or(file.scrub_interval_ms)
                .unwrap_or(default_scrub_interval_ms)
                .max(10),
            ack_window_ms: self
                .ack_window_ms
                .or(file.ack_window_ms)
                .unwrap_or(DEFAULT_ACK_WINDOW_MS),
            held_bytes: self
                .held_bytes
                .or(file.held_bytes)
                .unwrap_or(DEFAULT_HELD_BYTES),
            send_burst: self.send_burst.or(file.send_burst).unwrap_or(200),
            send_per_second: self.send_per_second.or(file.send_per_second).unwrap_or(100),
            queue_limits: {
                let default = tidings_core::delivery::QueueLimits::DEFAULT;
                tidings_core::delivery::QueueLimits {
                    sender_copies: self
                        .queue_copies_per_sender
                        .or(file.queue_copies_per_sender)
                        .unwrap_or(default.sender_copies),
                    sender_bytes: self
                        .queue_bytes_per_sender
                        .or(file.queue_bytes_per_sender)
                        .unwrap_or(default.sender_bytes),
                    account_bytes: self
                        .queued_bytes_per_account
                        .or(file.queued_bytes_per_account)
                        .unwrap_or(default.account_bytes),
                    stranger_copies: self
                        .stranger_pool_copies
                        .or(file.stranger_pool_copies)
                        .unwrap_or(default.stranger_copies),
                    ..default
                }
            },
            lookup_burst: self.lookup_burst.or(file.lookup_burst).unwrap_or(10_000),
            lookup_per_hour: self.lookup_per_hour.or(file.lookup_per_hour).unwrap_or(200),
            key_claim_burst: self.key_claim_burst.or(file.key_claim_burst).unwrap_or(100),
            key_claims_per_hour: self
                .key_claims_per_hour
                .or(file.key_claims_per_hour)
                .unwrap_or(100),
            links_per_day: self
                .links_per_day
                .or(file.links_per_day)
                .unwrap_or(LINKS_PER_DAY),
            codes_per_address: self
                .codes_per_address
                .or(file.codes_per_address)
                .unwrap_or(5),
            verifies_per_address: self
                .verifies_per_address
                .or(file.verifies_per_address)
                .unwrap_or(30),
            codes_per_address_block: self
                .codes_per_address_block
                .or(file.codes_per_address_block)
                .unwrap_or(20),
            verifies_per_address_block: self
                .verifies_per_address_block
                .or(file.verifies_per_address_block)
                .unwrap_or(120),
            trusted_proxies: trusted_proxies(
                self.trusted_proxies
                    .clone()
                    .or(file.trusted_proxies)
                    .unwrap_or_default(),
            )?,
            codes_per_hour: self.codes_per_hour.or(file.codes_per_hour).unwrap_or(1000),
            codes_per_country_per_hour: self
                .codes_per_country_per_hour
                .or(file.codes_per_country_per_hour)
                .unwrap_or(200),
            codes_per_prefix_per_hour: self
                .codes_per_prefix_per_hour
                .or(file.codes_per_prefix_per_hour)
                .unwrap_or(10),
            sms_per_number_per_day: self
                .sms_per_number_per_day
                .or(file.sms_per_number_per_day)
                .unwrap_or(5),
            limiter_capacity: self
                .limiter_capacity
                .or(file.limiter_capacity)
                .unwrap_or(1_000_000),
            code_policy: {
                let mut policy = tidings_core::verification::CodePolicy::default();
                if let Some(seconds) = self.code_interval_seconds.or(file.code_interval_seconds) {
                    policy.per_number_short.period = seconds.saturating_mul(1000);
                }
                if let Some(count) = self.codes_per_number.or(file.codes_per_number) {
                    policy.per_number_long.max = count.max(1);
                }
                policy
            },
            sync_trace: self.sync_trace.clone().or(file.sync_trace),
        };
        config.validate()?;
        Ok(config)
    }
}

/// Parses the trusted proxies: addresses or blocks such as `10.0.0.0/8`.
fn trusted_proxies(entries: Vec<String>) -> anyhow::Result<Vec<AddressBlock>> {
    entries
        .iter()
        .filter(|entry| !entry.trim().is_empty())
        .map(|entry| {
            AddressBlock::parse(entry).with_context(|| {
                format!(
                    "trusted_proxies: `{entry}` is not an address or a block such as 10.0.0.0/8"
                )
            })
        })
        .collect()
}

impl ServerConfig {
    /// Refuses values that would switch a service off instead of limiting it: a limit of 0
    /// refuses every request it guards, which is never what an operator meant.
    pub fn validate(&self) -> anyhow::Result<()> {
        let zero = [
            ("codes_per_address", self.codes_per_address == 0),
            ("verifies_per_address", self.verifies_per_address == 0),
            ("codes_per_address_block", self.codes_per_address_block == 0),
            (
                "verifies_per_address_block",
                self.verifies_per_address_block == 0,
            ),
            ("codes_per_hour", self.codes_per_hour == 0),
            (
                "codes_per_country_per_hour",
                self.codes_per_country_per_hour == 0,
            ),
            (
                "codes_per_prefix_per_hour",
                self.codes_per_prefix_per_hour == 0,
            ),
            ("sms_per_number_per_day", self.sms_per_number_per_day == 0),
            ("limiter_capacity", self.limiter_capacity == 0),
            ("max_connections", self.max_connections == 0),
            (
                "pre_login_connections_per_address",
                self.pre_login_connections_per_address == 0,
            ),
            (
                "pre_login_connections_per_block",
                self.pre_login_connections_per_block == 0,
            ),
            ("sessions_per_device", self.sessions_per_device == 0),
            ("body_timeout_seconds", self.body_timeout.is_zero()),
            ("send_burst", self.send_burst == 0),
            ("lookup_burst", self.lookup_burst == 0),
            ("key_claim_burst", self.key_claim_burst == 0),
            ("links_per_day", self.links_per_day == 0),
            (
                "queue_copies_per_sender",
                self.queue_limits.sender_copies == 0,
            ),
            (
                "queue_bytes_per_sender",
                self.queue_limits.sender_bytes == 0,
            ),
            (
                "queued_bytes_per_account",
                self.queue_limits.account_bytes == 0,
            ),
            (
                "stranger_pool_copies",
                self.queue_limits.stranger_copies == 0,
            ),
        ];
        for (setting, is_zero) in zero {
            if is_zero {
                anyhow::bail!(
                    "{setting} must be at least 1: 0 would refuse every request it limits"
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change to the settings, as a case of a table.
    type Settings<'a> = &'a dyn Fn(&mut ServerArgs);

    /// The settings resolved from `settings` alone (an empty config file), or the error's text.
    fn resolve(settings: impl FnOnce(&mut ServerArgs)) -> Result<ServerConfig, String> {
        let file = std::env::temp_dir().join(format!(
            "tidings-config-{}-{:?}.toml",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::write(&file, "").expect("config file");
        let mut args = ServerArgs {
            config: Some(file.clone()),
            ..Default::default()
        };
        settings(&mut args);
        let resolved = args.resolve().map_err(|e| format!("{e:#}"));
        let _ = std::fs::remove_file(&file);
        resolved
    }

    #[test]
    fn registration_by_own_sms_needs_a_service_number_and_a_receiving_gateway() {
        let off = resolve(|_| {}).expect("the defaults");
        assert_eq!(off.inbound, None);
        let on = resolve(|args| {
            args.inbound_registration = Some(true);
            args.sms_service_number = Some("+49 151 99990000".into());
            args.inbound_code_seconds = Some(30);
        })
        .expect("on");
        let inbound = on.inbound.expect("offered");
        assert_eq!(inbound.service_number.as_str(), "+4915199990000");
        assert_eq!(inbound.code_ttl, 30_000);

        let refused: &[(Settings, &str)] = &[
            (
                &|args| args.inbound_registration = Some(true),
                "needs sms_service_number",
            ),
            (
                &|args| {
                    args.inbound_registration = Some(true);
                    args.sms_service_number = Some("12".into());
                },
                "sms_service_number",
            ),
            (
                &|args| {
                    args.inbound_registration = Some(true);
                    args.sms_service_number = Some("+4915199990000".into());
                    args.inbound_code_seconds = Some(0);
                },
                "at least 1",
            ),
            (
                &|args| {
                    args.inbound_registration = Some(true);
                    args.sms_service_number = Some("+4915199990000".into());
                    args.sms_gateway = Some("smpp".into());
                    args.smpp_address = Some("127.0.0.1:2775".into());
                    args.smpp_system_id = Some("tidings".into());
                    args.smpp_password = Some("secret".into());
                    args.smpp_bind = Some("transmitter".into());
                },
                "transceiver",
            ),
        ];
        for (settings, expected) in refused {
            let error = resolve(|args| settings(args)).expect_err(expected);
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn the_store_setting_names_an_engine_and_never_shows_a_password() {
        let default = resolve(|_| {}).expect("the defaults");
        assert_eq!(default.store, StoreEngine::Sqlite);
        assert_eq!(default.scrub_interval_ms, SQLITE_SCRUB_INTERVAL_MS);
        let postgres = resolve(|args| {
            args.store = Some("postgres://tidings:hunter2@db.example:5433/tidings".into());
        })
        .expect("a PostgreSQL URL");
        assert_eq!(postgres.scrub_interval_ms, POSTGRES_SCRUB_INTERVAL_MS);
        assert!(!format!("{postgres:?}").contains("hunter2"));
        let given = resolve(|args| {
            args.store = Some("postgresql://db.example/tidings".into());
            args.scrub_interval_ms = Some(5000);
        })
        .expect("a PostgreSQL URL and an interval");
        assert_eq!(given.scrub_interval_ms, 5000);

        let redacted = [
            ("postgres://u:secret@h:5432/d", "postgres://u:***@h:5432/d"),
            (
                "postgres://u@h/d?password=secret&x=1",
                "postgres://u@h/d?password=***&x=1",
            ),
            ("postgres://u:p:q@h/d", "postgres://u:***@h/d"),
            ("postgres://h/d", "postgres://h/d"),
        ];
        for (url, expected) in redacted {
            assert_eq!(redact_url(url), expected);
        }
        for other in ["mysql://u:secret@h/d", "host=h user=u password=secret"] {
            let error = resolve(|args| args.store = Some(other.into())).expect_err(other);
            assert!(error.contains("postgres://"), "{error}");
            assert!(!error.contains("secret"), "{error}");
        }
    }
}
