//! Prometheus metrics, and the router of the operator's metrics address. Labels are fixed words
//! (outcomes, kinds); none ever carries a number, a device id, a message id or a payload.
//!
//! `/metrics` is served only on its own address (`metrics_listen`, loopback by default), never on
//! the public port: the counters tell anyone who can read them how busy the server is.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse as _;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// A label with one fixed word.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// The name of a registration limit or SMS budget that refused a code request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Budget {
    pub budget: &'static str,
}

/// Every metric the server exports.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub connections: Counter,
    pub sessions_active: Gauge,
    /// The async runtime's worker threads (the store's writer runs on a thread of its own); set
    /// by the server when it starts on its runtime.
    pub runtime_workers: Gauge,
    pub sends: Family<Outcome, Counter>,
    pub deliveries: Counter,
    pub acks: Family<Outcome, Counter>,
    pub lookups: Counter,
    pub evaluations: Counter,
    pub registrations: Family<Outcome, Counter>,
    /// Code requests refused by an address limit or an SMS budget, by its name.
    pub code_budget_trips: Family<Budget, Counter>,
    pub syncs: Counter,
    pub sync_batch: Histogram,
    pub expired: Counter,
    pub withdrawals: Family<Outcome, Counter>,
    /// Accounts whose pseudonym is still under the previous OPRF key (0 without one): the
    /// previous key can be retired once it is 0.
    pub accounts_on_previous_oprf_key: Gauge,
    /// Connects that presented a resumption token, by outcome (`resumed`, or why it was
    /// refused: the connect then logs in by challenge).
    pub resumes: Family<Outcome, Counter>,
    /// Copies pushed without a disk write (deliver first), by how each ended: `decided` (its
    /// device acknowledged it, or its message was withdrawn), `stored` (it waited past the
    /// acknowledgement window, or its session could not take it), `unstored` (storing it was
    /// refused or failed: the sender sends it again).
    pub held_copies: Family<Outcome, Counter>,
    /// 1 while the bus to the other nodes is connected (0 without a bus).
    pub bus_connected: Gauge,
    /// Other nodes heard from on the bus.
    pub bus_nodes: Gauge,
}

impl Metrics {
    /// Creates and registers every metric; `tidings_node_info{node="..."} 1` names the node.
    pub fn new(node: &str) -> Self {
        let mut registry = Registry::with_prefix("tidings");
        registry.register(
            "node",
            "This node's name (the `node_name` setting), in the label `node`",
            Info::new(vec![("node".to_string(), node.to_string())]),
        );
        let metrics = Self {
            connections: Counter::default(),
            sessions_active: Gauge::default(),
            runtime_workers: Gauge::default(),
            sends: Family::default(),
            deliveries: Counter::default(),
            acks: Family::default(),
            lookups: Counter::default(),
            evaluations: Counter::default(),
            registrations: Family::default(),
            code_budget_trips: Family::default(),
            syncs: Counter::default(),
            sync_batch: Histogram::new((0..=12).map(|power| f64::from(1u32 << power))),
            expired: Counter::default(),
            withdrawals: Family::default(),
            accounts_on_previous_oprf_key: Gauge::default(),
            resumes: Family::default(),
            held_copies: Family::default(),
            bus_connected: Gauge::default(),
            bus_nodes: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connections",
            "TCP connections accepted",
            metrics.connections.clone(),
        );
        registry.register(
            "sessions_active",
            "Logged-in sessions now",
            metrics.sessions_active.clone(),
        );
        registry.register(
            "runtime_worker_threads",
            "Threads of the async runtime",
            metrics.runtime_workers.clone(),
        );
        registry.register(
            "bus_connected",
            "1 while the bus to the other nodes is connected",
            metrics.bus_connected.clone(),
        );
        registry.register(
            "bus_nodes",
            "Other nodes heard from on the bus",
            metrics.bus_nodes.clone(),
        );
        registry.register("sends", "Sends by outcome", metrics.sends.clone());
        registry.register(
            "deliveries",
            "Deliver frames pushed to sessions",
            metrics.deliveries.clone(),
        );
        registry.register("acks", "Acknowledgements by result", metrics.acks.clone());
        registry.register(
            "lookup_numbers",
            "Accounts looked up",
            metrics.lookups.clone(),
        );
        registry.register(
            "oprf_evaluations",
            "Blinded numbers evaluated",
            metrics.evaluations.clone(),
        );
        registry.register(
            "registrations",
            "Registration requests by outcome",
            metrics.registrations.clone(),
        );
        registry.register(
            "code_budget_trips",
            "Code requests refused by an address limit or an SMS budget, by budget",
            metrics.code_budget_trips.clone(),
        );
        registry.register(
            "store_syncs",
            "Storage syncs (group commits)",
            metrics.syncs.clone(),
        );
        registry.register(
            "store_sync_batch_operations",
            "Operations per storage sync",
            metrics.sync_batch.clone(),
        );
        registry.register(
            "held_copies",
            "Copies pushed without a disk write, by how each ended",
            metrics.held_copies.clone(),
        );
        registry.register(
            "resumes",
            "Connects with a resumption token, by outcome",
            metrics.resumes.clone(),
        );
        registry.register(
            "expired_messages",
            "Messages deleted at the end of their TTL",
            metrics.expired.clone(),
        );
        registry.register(
            "accounts_on_previous_oprf_key",
            "Accounts whose pseudonym is still under the previous OPRF key",
            metrics.accounts_on_previous_oprf_key.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics address's one route: `GET /metrics`.
pub fn router(metrics: Arc<Metrics>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(render))
        .with_state(metrics)
}

async fn render(State(metrics): State<Arc<Metrics>>) -> axum::response::Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()).into_response()
}
