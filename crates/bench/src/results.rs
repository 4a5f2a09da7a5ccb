//! What a run measured, as written to `results.json`.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::wire::Target;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(hist: &Histogram<u64>) -> Self {
        if hist.is_empty() {
            return Percentiles::default();
        }
        let q = |q: f64| hist.value_at_quantile(q) as f64;
        Percentiles {
            count: hist.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: hist.max() as f64,
        }
    }

    /// (label, value) for the plot.
    pub fn points(&self) -> [(&'static str, f64); 6] {
        [
            ("p50", self.p50),
            ("p90", self.p90),
            ("p99", self.p99),
            ("p99.9", self.p999),
            ("p99.99", self.p9999),
            ("max", self.max),
        ]
    }
}

/// Phase 1.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleResult {
    pub clients: u64,
    pub connected: u64,
    pub failed: u64,
    /// Wall time from Go to the last client logged in.
    pub connect_secs: f64,
    pub connects_per_sec: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub bytes_per_connection: f64,
    pub server_cpu_secs: f64,
    pub generator_cpu_secs: f64,
    /// CPU seconds of everything else on the machine while the clients logged in.
    pub background_cpu_secs: f64,
    pub workers: usize,
    pub first_error: Option<String>,
    /// Server CPU seconds from Go to the last client logged in: the first logins alone.
    #[serde(default)]
    pub login_server_cpu_secs: f64,
    /// The reconnect step: every client closed, then connected again (Tidings with its
    /// resumption token).
    #[serde(default)]
    pub reconnected: u64,
    #[serde(default)]
    pub reconnect_failed: u64,
    /// Wall time from the reconnect's Go to the last client reconnected.
    #[serde(default)]
    pub reconnect_secs: f64,
    #[serde(default)]
    pub reconnects_per_sec: f64,
    /// Server CPU seconds over the reconnects.
    #[serde(default)]
    pub reconnect_server_cpu_secs: f64,
    #[serde(default)]
    pub reconnect_first_error: Option<String>,
}

/// One rate step of phase 2.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepResult {
    /// Offered load, messages per second over all pairs.
    pub offered: f64,
    pub secs: f64,
    pub planned: u64,
    pub scheduled: u64,
    pub sent: u64,
    pub refused: u64,
    pub rate_limited: u64,
    pub delivered: u64,
    pub receipts: u64,
    /// Messages whose receipt reached the sender, per second.
    pub delivered_per_sec: f64,
    /// Send → receipt at the sender.
    pub e2e: Percentiles,
    /// Send → delivery at the receiver.
    pub deliver: Percentiles,
    pub server_cpu_secs: f64,
    pub server_cores: f64,
    /// CPU of the whole machine during the step, in cores; minus server and generator, it is the
    /// background load (other work on a shared machine).
    pub machine_cores: f64,
    pub background_cores: f64,
    pub generator_cpu_secs: f64,
    /// The busiest worker's CPU, in cores (each worker is one thread).
    pub generator_max_worker_cores: f64,
    pub window_waits: u64,
    pub late: u64,
    pub saturated: bool,
    pub first_error: Option<String>,
}

/// Phase 2 at one pair count.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelayResult {
    pub pairs: u32,
    pub steps: Vec<StepResult>,
    pub connect_secs: f64,
    pub workers: usize,
    pub first_error: Option<String>,
}

impl RelayResult {
    /// The step with the most delivered messages per second.
    pub fn peak(&self) -> Option<&StepResult> {
        self.steps
            .iter()
            .max_by(|a, b| a.delivered_per_sec.total_cmp(&b.delivered_per_sec))
    }

    /// The lightest step (the first).
    pub fn light(&self) -> Option<&StepResult> {
        self.steps.first()
    }

    /// The highest step the target sustained (the last one not saturated).
    pub fn sustained(&self) -> Option<&StepResult> {
        self.steps.iter().rev().find(|s| !s.saturated)
    }

    /// Server CPU seconds per million delivered messages at the peak step.
    pub fn cpu_per_million(&self) -> Option<f64> {
        let peak = self.peak()?;
        (peak.receipts > 0).then(|| peak.server_cpu_secs / peak.receipts as f64 * 1e6)
    }

    /// Why the peak is where it is.
    pub fn limited_by(&self) -> String {
        let Some(peak) = self.peak() else {
            return "nothing delivered".into();
        };
        let last = self.steps.last();
        let mut reasons = Vec::new();
        if peak.generator_max_worker_cores >= 0.9 {
            reasons.push("generator-limited".to_string());
        }
        if let Some(last) = last {
            if last.rate_limited > 0 {
                reasons.push(format!(
                    "server send-rate limit ({} refused RATE_LIMITED)",
                    last.rate_limited
                ));
            }
            if last.server_cores >= 0.9 {
                reasons.push(format!("server CPU {:.2} cores", last.server_cores));
            }
            if !last.saturated {
                reasons.push("not saturated at the highest rate tried".into());
            }
        }
        if peak.background_cores >= 0.25 {
            reasons.push(format!(
                "background load {:.2} cores from other work on the machine",
                peak.background_cores
            ));
        }
        if reasons.is_empty() {
            "latency/backlog (machine shared by server and generator)".into()
        } else {
            reasons.join("; ")
        }
    }
}

/// Phase 3.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OfflineResult {
    pub users: u32,
    pub messages: u64,
    pub stored: u64,
    pub store_secs: f64,
    pub store_per_sec: f64,
    pub restart_secs: f64,
    pub received: u64,
    pub duplicates: u64,
    /// From the reconnects' start until every message was received and the client had sent its
    /// acknowledgement.
    pub acked_secs: f64,
    /// Tidings: until the server confirmed every acknowledgement (AckResult CONFIRMED: the copy
    /// is deleted durably, and a Tidings client shows a message only then).
    pub confirmed_secs: Option<f64>,
    /// The drain as the target's protocol defines done: Tidings until every AckResult, the
    /// peers until every acknowledgement was sent (their protocols answer nothing to it).
    pub drain_secs: f64,
    pub drain_per_sec: f64,
    pub server_cpu_secs_drain: f64,
    pub durability: String,
    pub first_error: Option<String>,
}

/// Phase 4.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LookupResult {
    pub clients: u32,
    pub phonebook: u32,
    pub requests: u64,
    pub numbers: u64,
    pub secs: f64,
    pub numbers_per_sec: f64,
    pub latency: Percentiles,
    pub server_cpu_secs: f64,
    pub what: String,
    pub first_error: Option<String>,
}

/// Everything one run measured for one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetRun {
    pub run: usize,
    pub target: Target,
    pub idle: Option<IdleResult>,
    pub relay: Vec<RelayResult>,
    pub offline: Option<OfflineResult>,
    pub lookup: Option<LookupResult>,
    pub errors: Vec<String>,
}
