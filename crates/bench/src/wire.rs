//! What the harness and its load-generator workers say to each other: one JSON object per line,
//! jobs and controls on the worker's stdin, events on its stdout.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A system under test.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// Tidings over plain TCP.
    Tidings,
    /// Tidings over TLS (an extra row).
    TidingsTls,
    /// Mosquitto (MQTT 3.1.1, QoS 1).
    Mosquitto,
    /// ejabberd (XMPP, XEP-0198 stream management, XEP-0184 receipts, offline storage).
    Ejabberd,
    /// nats-server (core pub/sub; the in-memory ceiling for the relay phase only).
    Nats,
}

impl Target {
    /// Every target, in table order.
    pub const ALL: [Target; 5] = [
        Target::Tidings,
        Target::TidingsTls,
        Target::Mosquitto,
        Target::Ejabberd,
        Target::Nats,
    ];

    /// The name used on the command line, in JSON and in tables.
    pub fn name(self) -> &'static str {
        match self {
            Target::Tidings => "tidings",
            Target::TidingsTls => "tidings-tls",
            Target::Mosquitto => "mosquitto",
            Target::Ejabberd => "ejabberd",
            Target::Nats => "nats",
        }
    }

    /// The name in prose.
    pub fn title(self) -> &'static str {
        match self {
            Target::Tidings => "Tidings",
            Target::TidingsTls => "Tidings (TLS)",
            Target::Mosquitto => "Mosquitto",
            Target::Ejabberd => "ejabberd",
            Target::Nats => "nats-server",
        }
    }

    /// Whether this target is one of the two Tidings rows.
    pub fn is_tidings(self) -> bool {
        matches!(self, Target::Tidings | Target::TidingsTls)
    }

    /// Whether the phase applies to this target.
    pub fn runs(self, phase: Phase) -> bool {
        match (self, phase) {
            (Target::Nats, Phase::Relay) => true,
            (Target::Nats, _) => false,
            (Target::Mosquitto, Phase::Lookup) => false,
            _ => true,
        }
    }
}

/// A phase of the benchmark.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// About 19,000 logged-in idle clients: memory per connection and connects per second.
    Idle,
    /// Sender→receiver pairs with acknowledged delivery at rising rates.
    Relay,
    /// Messages to disconnected users, a server restart, and the drain.
    Offline,
    /// Presence lookup of a 1,000-number phonebook.
    Lookup,
}

impl Phase {
    /// Every phase, in run order.
    pub const ALL: [Phase; 4] = [Phase::Idle, Phase::Relay, Phase::Offline, Phase::Lookup];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Relay => "relay",
            Phase::Offline => "offline",
            Phase::Lookup => "lookup",
        }
    }
}

/// Where a worker's clients connect, and as whom.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub target: Target,
    /// The server's address (loopback).
    pub addr: SocketAddr,
    /// The source address the worker binds its client sockets to.
    pub src_ip: Ipv4Addr,
    /// SHA-256 of the server certificate (hex), for Tidings over TLS.
    pub tls_pin: Option<String>,
    /// Tidings: the file mapping user index to device id (one base64url id per line).
    pub devices: Option<PathBuf>,
    /// Tidings nodes: node `k` listens `100 * k` ports above `addr`, and a worker's clients
    /// connect to them in turn.
    #[serde(default = "one_node")]
    pub nodes: u16,
    /// Users `2p` and `2p+1` (a relay pair's two ends) on one node, instead of user `i` on node
    /// `i mod nodes`.
    #[serde(default)]
    pub pairs_on_one_node: bool,
}

fn one_node() -> u16 {
    1
}

/// What a worker is asked to do. Users are named by index (see `ident`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "snake_case")]
pub enum Job {
    /// Create accounts `first..first+count` (Tidings: code and verify through the outbox;
    /// ejabberd: in-band registration), then give each of `roster_owners` a roster holding the
    /// `roster` users (ejabberd's nearest equivalent of a phonebook).
    Register {
        first: u32,
        count: u32,
        concurrency: usize,
        outbox: Option<PathBuf>,
        out: Option<PathBuf>,
        roster_owners: Vec<u32>,
        roster: Vec<String>,
    },
    /// Log in users `first..first+count` and hold them until `Release`.
    Idle {
        first: u32,
        count: u32,
        concurrency: usize,
    },
    /// Connect the pairs (sender `2p`, receiver `2p+1`) and run the steps the harness sends.
    Relay { pairs: Vec<u32>, window: u32 },
    /// Prepare receivers as offline users, then have each pair's sender send `per_pair`
    /// messages to its disconnected receiver and wait until the server took them.
    Store { pairs: Vec<u32>, per_pair: u32 },
    /// Log the receivers back in and take every stored message.
    Drain {
        pairs: Vec<u32>,
        per_pair: u32,
        timeout_secs: f64,
    },
    /// Each client looks up the phonebook over and over for `secs`.
    Lookup {
        clients: Vec<u32>,
        phonebook: Vec<String>,
        secs: f64,
    },
}

/// Everything a worker needs, sent as its first line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: u32,
    pub endpoint: Endpoint,
    pub job: Job,
}

/// One rate step of the relay phase.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StepSpec {
    pub id: u16,
    pub rate_per_pair: f64,
    pub secs: f64,
    pub grace_secs: f64,
}

/// A control line from the harness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ctl", rename_all = "snake_case")]
pub enum Ctl {
    Go,
    Step(StepSpec),
    /// Idle phase: close every held connection (answered `Closed`).
    Close,
    /// Idle phase: connect every closed one again (answered `Connected`).
    Reconnect,
    Release,
    Stop,
}

/// Counts and histograms from one relay step of one worker.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    pub step: u16,
    /// Messages scheduled by the sending side.
    pub scheduled: u64,
    /// Messages written.
    pub sent: u64,
    /// Messages the server refused (Tidings: any outcome other than ACCEPTED or QUEUED).
    pub refused: u64,
    /// Of those, refused for the sender's rate limit.
    pub rate_limited: u64,
    /// Messages that reached their receiver.
    pub delivered: u64,
    /// Messages whose delivery receipt reached the sender.
    pub receipts: u64,
    /// Send → receipt at the sender, microseconds (hdrhistogram V2, base64).
    pub e2e: String,
    /// Send → delivery at the receiver, microseconds (hdrhistogram V2, base64).
    pub deliver: String,
    /// Seconds from the step's start to its last receipt.
    pub last_receipt_secs: f64,
    /// Seconds the sending took (the schedule, or longer when the window held it back).
    pub send_secs: f64,
    /// How many times a sender waited for its window.
    pub window_waits: u64,
    /// Messages the generator handed over more than 2 ms late on its own account.
    pub late: u64,
    pub first_error: Option<String>,
}

/// An event line from a worker.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Ready,
    Progress {
        done: u64,
        total: u64,
    },
    Registered {
        ok: u64,
        failed: u64,
        first_error: Option<String>,
    },
    Connected {
        ok: u64,
        failed: u64,
        secs: f64,
        first_error: Option<String>,
    },
    /// Every held connection was closed (idle phase).
    Closed,
    StepDone(StepReport),
    Stored {
        ok: u64,
        failed: u64,
        secs: f64,
        first_error: Option<String>,
    },
    Drained {
        received: u64,
        expected: u64,
        duplicates: u64,
        /// Seconds from Go until every message was received and acknowledged.
        secs: f64,
        /// Tidings: seconds until the server confirmed every acknowledgement.
        secs_confirmed: Option<f64>,
        first_error: Option<String>,
    },
    LookupDone {
        requests: u64,
        numbers: u64,
        secs: f64,
        /// Lookup round trips, microseconds (hdrhistogram V2, base64).
        latency: String,
        errors: u64,
        first_error: Option<String>,
    },
    Error {
        message: String,
    },
    Done,
}
