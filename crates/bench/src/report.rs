//! Turns the runs into figures (each the median of the runs), the Markdown table with Tidings/peer
//! ratios, the comparison with the performance bar, and the latency plot (SVG).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use crate::coord::{fmt_us, Sizes};
use crate::results::{Percentiles, TargetRun};
use crate::sys::Machine;
use crate::wire::{Phase, Target};

/// Everything written to `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub command: String,
    pub started: String,
    pub wall_secs: f64,
    pub machine: Machine,
    pub versions: Vec<(String, String)>,
    pub sizes: Sizes,
    pub targets: Vec<Target>,
    pub phases: Vec<Phase>,
    pub failures: Vec<String>,
    pub summary: Vec<Summary>,
    pub runs: Vec<TargetRun>,
}

/// One target's figures, each the median over the runs that produced it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    pub target: Option<Target>,
    pub idle: Option<IdleSummary>,
    pub relay: Vec<RelaySummary>,
    pub offline: Option<OfflineSummary>,
    pub lookup: Option<LookupSummary>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IdleSummary {
    pub clients: u64,
    pub connected: f64,
    pub connects_per_sec: f64,
    pub bytes_per_connection: f64,
    pub server_cpu_secs: f64,
    pub generator_cpu_secs: f64,
    pub background_cpu_secs: f64,
    /// Server CPU per first login (connect, upgrade, signed login), microseconds.
    #[serde(default)]
    pub login_cpu_us: f64,
    /// The reconnect step: reconnects per second, and server CPU per reconnect (Tidings: a
    /// resumed connect), microseconds.
    #[serde(default)]
    pub reconnected: f64,
    #[serde(default)]
    pub reconnects_per_sec: f64,
    #[serde(default)]
    pub reconnect_cpu_us: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RelaySummary {
    pub pairs: u32,
    pub peak_per_sec: f64,
    pub peak_offered: f64,
    pub peak_e2e: Percentiles,
    pub sustained_offered: f64,
    pub sustained_e2e: Percentiles,
    pub light_offered: f64,
    pub light_e2e: Percentiles,
    pub light_deliver: Percentiles,
    pub cpu_per_million: f64,
    pub server_cores_at_peak: f64,
    pub background_cores_at_peak: f64,
    pub generator_worker_cores_at_peak: f64,
    pub generator_cpu_secs_at_peak: f64,
    pub generator_limited: bool,
    pub rate_limited: u64,
    pub limited_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OfflineSummary {
    pub messages: u64,
    pub acked_secs: f64,
    pub store_per_sec: f64,
    pub restart_secs: f64,
    pub drain_secs: f64,
    pub drain_per_sec: f64,
    pub confirmed_secs: Option<f64>,
    pub durability: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LookupSummary {
    pub numbers_per_sec: f64,
    pub latency: Percentiles,
    pub what: String,
}

/// The median of the values (the mean of the middle two for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn median_percentiles(all: &[Percentiles]) -> Percentiles {
    let m = |f: fn(&Percentiles) -> f64| median(all.iter().map(f).collect());
    Percentiles {
        count: median(all.iter().map(|p| p.count as f64).collect()) as u64,
        p50: m(|p| p.p50),
        p90: m(|p| p.p90),
        p99: m(|p| p.p99),
        p999: m(|p| p.p999),
        p9999: m(|p| p.p9999),
        max: m(|p| p.max),
    }
}

/// Medians per target.
pub fn summarize(runs: &[TargetRun], targets: &[Target], sizes: &Sizes) -> Vec<Summary> {
    let mut out = Vec::new();
    for &target in targets {
        let mine: Vec<&TargetRun> = runs.iter().filter(|r| r.target == target).collect();
        let mut summary = Summary {
            target: Some(target),
            ..Summary::default()
        };
        let idles: Vec<_> = mine.iter().filter_map(|r| r.idle.as_ref()).collect();
        if !idles.is_empty() {
            summary.idle = Some(IdleSummary {
                clients: idles[0].clients,
                connected: median(idles.iter().map(|i| i.connected as f64).collect()),
                connects_per_sec: median(idles.iter().map(|i| i.connects_per_sec).collect()),
                bytes_per_connection: median(
                    idles.iter().map(|i| i.bytes_per_connection).collect(),
                ),
                server_cpu_secs: median(idles.iter().map(|i| i.server_cpu_secs).collect()),
                generator_cpu_secs: median(idles.iter().map(|i| i.generator_cpu_secs).collect()),
                background_cpu_secs: median(idles.iter().map(|i| i.background_cpu_secs).collect()),
                login_cpu_us: median(
                    idles
                        .iter()
                        .map(|i| i.login_server_cpu_secs * 1e6 / (i.connected.max(1) as f64))
                        .collect(),
                ),
                reconnected: median(idles.iter().map(|i| i.reconnected as f64).collect()),
                reconnects_per_sec: median(idles.iter().map(|i| i.reconnects_per_sec).collect()),
                reconnect_cpu_us: median(
                    idles
                        .iter()
                        .map(|i| i.reconnect_server_cpu_secs * 1e6 / (i.reconnected.max(1) as f64))
                        .collect(),
                ),
            });
        }
        for &pairs in &sizes.relay_pairs {
            let relays: Vec<_> = mine
                .iter()
                .flat_map(|r| r.relay.iter())
                .filter(|r| r.pairs == pairs && !r.steps.is_empty())
                .collect();
            if relays.is_empty() {
                continue;
            }
            let peaks: Vec<_> = relays.iter().filter_map(|r| r.peak()).collect();
            let lights: Vec<_> = relays.iter().filter_map(|r| r.light()).collect();
            let sustained: Vec<_> = relays.iter().filter_map(|r| r.sustained()).collect();
            // Why the peak is where it is: as the run with the median peak says.
            let mut by_peak: Vec<_> = relays
                .iter()
                .filter_map(|r| Some((r.peak()?.delivered_per_sec, r)))
                .collect();
            by_peak.sort_by(|a, b| a.0.total_cmp(&b.0));
            let limited = by_peak
                .get(by_peak.len().saturating_sub(1) / 2)
                .map(|(_, r)| r.limited_by())
                .unwrap_or_default();
            let generator_cores =
                median(peaks.iter().map(|p| p.generator_max_worker_cores).collect());
            summary.relay.push(RelaySummary {
                pairs,
                peak_per_sec: median(peaks.iter().map(|p| p.delivered_per_sec).collect()),
                peak_offered: median(peaks.iter().map(|p| p.offered).collect()),
                peak_e2e: median_percentiles(&peaks.iter().map(|p| p.e2e).collect::<Vec<_>>()),
                sustained_offered: median(sustained.iter().map(|p| p.offered).collect()),
                sustained_e2e: median_percentiles(
                    &sustained.iter().map(|p| p.e2e).collect::<Vec<_>>(),
                ),
                light_offered: median(lights.iter().map(|p| p.offered).collect()),
                light_e2e: median_percentiles(&lights.iter().map(|p| p.e2e).collect::<Vec<_>>()),
                light_deliver: median_percentiles(
                    &lights.iter().map(|p| p.deliver).collect::<Vec<_>>(),
                ),
                cpu_per_million: median(
                    relays.iter().filter_map(|r| r.cpu_per_million()).collect(),
                ),
                server_cores_at_peak: median(peaks.iter().map(|p| p.server_cores).collect()),
                background_cores_at_peak: median(
                    peaks.iter().map(|p| p.background_cores).collect(),
                ),
                generator_worker_cores_at_peak: generator_cores,
                generator_cpu_secs_at_peak: median(
                    peaks.iter().map(|p| p.generator_cpu_secs).collect(),
                ),
                generator_limited: generator_cores >= 0.9,
                rate_limited: relays
                    .iter()
                    .flat_map(|r| r.steps.iter())
                    .map(|s| s.rate_limited)
                    .max()
                    .unwrap_or(0),
                limited_by: limited,
            });
        }
        let offlines: Vec<_> = mine.iter().filter_map(|r| r.offline.as_ref()).collect();
        if !offlines.is_empty() {
            let confirmed: Vec<f64> = offlines.iter().filter_map(|o| o.confirmed_secs).collect();
            summary.offline = Some(OfflineSummary {
                messages: offlines[0].messages,
                acked_secs: median(offlines.iter().map(|o| o.acked_secs).collect()),
                store_per_sec: median(offlines.iter().map(|o| o.store_per_sec).collect()),
                restart_secs: median(offlines.iter().map(|o| o.restart_secs).collect()),
                drain_secs: median(offlines.iter().map(|o| o.drain_secs).collect()),
                drain_per_sec: median(offlines.iter().map(|o| o.drain_per_sec).collect()),
                confirmed_secs: (!confirmed.is_empty()).then(|| median(confirmed)),
                durability: offlines[0].durability.clone(),
            });
        }
        let lookups: Vec<_> = mine.iter().filter_map(|r| r.lookup.as_ref()).collect();
        if !lookups.is_empty() {
            summary.lookup = Some(LookupSummary {
                numbers_per_sec: median(lookups.iter().map(|l| l.numbers_per_sec).collect()),
                latency: median_percentiles(&lookups.iter().map(|l| l.latency).collect::<Vec<_>>()),
                what: lookups[0].what.clone(),
            });
        }
        out.push(summary);
    }
    out
}

fn find(summary: &[Summary], target: Target) -> Option<&Summary> {
    summary.iter().find(|s| s.target == Some(target))
}

fn num(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let rounded = v.round() as i64;
    let digits = rounded.abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn bytes(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v.abs() < 10_000.0 {
        format!("{v:.0} B")
    } else {
        format!("{:.1} KB", v / 1000.0)
    }
}

fn ratio(tidings: Option<f64>, peer: Option<f64>) -> String {
    match (tidings, peer) {
        (Some(t), Some(p)) if t.is_finite() && p.is_finite() && p != 0.0 => format!("{:.2}", t / p),
        _ => "–".into(),
    }
}

const PEERS: [Target; 3] = [Target::Mosquitto, Target::Ejabberd, Target::Nats];

/// The figures the ratio table compares: (name, better, getter).
type Getter = Box<dyn Fn(&Summary) -> Option<f64>>;

fn ratio_rows(sizes: &Sizes) -> Vec<(String, &'static str, Getter)> {
    let mut rows: Vec<(String, &'static str, Getter)> = vec![
        (
            "idle: memory per connection".into(),
            "lower",
            Box::new(|s: &Summary| s.idle.as_ref().map(|i| i.bytes_per_connection)),
        ),
        (
            "idle: connects (with login) per second".into(),
            "higher",
            Box::new(|s: &Summary| s.idle.as_ref().map(|i| i.connects_per_sec)),
        ),
        (
            "idle: server CPU per first login, µs".into(),
            "lower",
            Box::new(|s: &Summary| s.idle.as_ref().map(|i| i.login_cpu_us)),
        ),
        (
            "reconnect: reconnects per second".into(),
            "higher",
            Box::new(|s: &Summary| s.idle.as_ref().map(|i| i.reconnects_per_sec)),
        ),
        (
            "reconnect: server CPU per reconnect, µs".into(),
            "lower",
            Box::new(|s: &Summary| s.idle.as_ref().map(|i| i.reconnect_cpu_us)),
        ),
    ];
    for &pairs in &sizes.relay_pairs {
        let get = move |s: &Summary| s.relay.iter().find(|r| r.pairs == pairs).cloned();
        rows.push((
            format!("relay {pairs} pair(s): peak delivered msg/s"),
            "higher",
            Box::new(move |s: &Summary| get(s).map(|r| r.peak_per_sec)),
        ));
        rows.push((
            format!("relay {pairs} pair(s): light-load p50 (send → receipt)"),
            "lower",
            Box::new(move |s: &Summary| get(s).map(|r| r.light_e2e.p50)),
        ));
        rows.push((
            format!("relay {pairs} pair(s): light-load p99 (send → receipt)"),
            "lower",
            Box::new(move |s: &Summary| get(s).map(|r| r.light_e2e.p99)),
        ));
        rows.push((
            format!("relay {pairs} pair(s): server CPU s per million msgs at peak"),
            "lower",
            Box::new(move |s: &Summary| get(s).map(|r| r.cpu_per_million)),
        ));
    }
    rows.push((
        "offline: drain msg/s (store, restart, reconnect, drain)".into(),
        "higher",
        Box::new(|s: &Summary| s.offline.as_ref().map(|o| o.drain_per_sec)),
    ));
    rows.push((
        "lookup: numbers per second (ejabberd: roster items)".into(),
        "higher",
        Box::new(|s: &Summary| s.lookup.as_ref().map(|l| l.numbers_per_sec)),
    ));
    rows
}

/// The Markdown report.
pub fn markdown(report: &Report) -> String {
    let mut md = String::new();
    let s = &report.summary;
    let sizes = &report.sizes;
    let _ = writeln!(
        md,
        "# Tidings benchmark: Tidings beside Mosquitto, ejabberd and nats-server\n"
    );
    let m = &report.machine;
    let _ = writeln!(
        md,
        "- Machine: {} × {} ({:.1} GiB RAM), {}, kernel {}, data on {}",
        m.cpus, m.cpu, m.memory_gib, m.os, m.kernel, m.disk
    );
    let _ = writeln!(
        md,
        "- Versions: {}",
        report
            .versions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "- Command: `{}`", report.command);
    let _ = writeln!(
        md,
        "- Started {}; took {:.0} s. Each figure is the median of {} run(s); every target ran every phase in the same run, one after another.",
        report.started, report.wall_secs, sizes.runs
    );
    let _ = writeln!(
        md,
        "- Sizes: idle {} clients; relay {:?} pairs, 64-byte messages, {} s per rate step; offline {} users × {} messages; lookup {} client(s) × {}-number phonebook for {} s.\n",
        sizes.idle_clients,
        sizes.relay_pairs,
        sizes.step_secs,
        sizes.offline_users,
        sizes.offline_per_user,
        sizes.lookup_clients,
        sizes.phonebook,
        sizes.lookup_secs
    );
    if !report.failures.is_empty() {
        let _ = writeln!(md, "**Failures:**\n");
        for failure in &report.failures {
            let _ = writeln!(md, "- {failure}");
        }
        md.push('\n');
    }

    // Ratios.
    let tidings = find(s, Target::Tidings);
    let _ = writeln!(md, "## Ratios: Tidings / peer\n");
    let _ = writeln!(
        md,
        "| figure | better | Tidings | Tidings / Mosquitto | Tidings / ejabberd | Tidings / nats-server |"
    );
    let _ = writeln!(md, "|---|---|---:|---:|---:|---:|");
    for (name, better, get) in ratio_rows(sizes) {
        let t = tidings.and_then(&get);
        let cells: Vec<String> = PEERS
            .iter()
            .map(|&p| ratio(t, find(s, p).and_then(&get)))
            .collect();
        let shown = match t {
            Some(v) if name.contains("memory") => bytes(v),
            Some(v) if name.contains("p50") || name.contains("p99") => fmt_us(v),
            Some(v) if name.contains("CPU") => format!("{v:.1}"),
            Some(v) => num(v),
            None => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {name} | {better} | {shown} | {} | {} | {} |",
            cells[0], cells[1], cells[2]
        );
    }
    md.push('\n');

    // Idle.
    if s.iter().any(|x| x.idle.is_some()) {
        let _ = writeln!(md, "## 1. Idle: logged-in clients\n");
        let _ = writeln!(
            md,
            "| target | logged in | connects/s | memory per connection (RSS delta / N) | server CPU s | generator CPU s | other load on the machine, CPU s |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
        for x in s {
            if let (Some(t), Some(i)) = (x.target, &x.idle) {
                let _ = writeln!(
                    md,
                    "| {} | {} / {} | {} | {} | {:.2} | {:.2} | {:.2} |",
                    t.title(),
                    num(i.connected),
                    num(i.clients as f64),
                    num(i.connects_per_sec),
                    bytes(i.bytes_per_connection),
                    i.server_cpu_secs,
                    i.generator_cpu_secs,
                    i.background_cpu_secs
                );
            }
        }
        md.push('\n');
        let _ = writeln!(
            md,
            "Then every client closes its connection and, once the closes are done, connects again the cheapest way its protocol offers: Tidings with the resumption token its login's answer carried (one round trip, an HMAC instead of an Ed25519 verification), Mosquitto to its persistent session (clean session off, no SUBSCRIBE), ejabberd by logging in again. Server CPU over the reconnects alone, per reconnect; the first login's (from the phase above) beside it.\n"
        );
        let _ = writeln!(
            md,
            "| target | reconnected | reconnects/s | server CPU per reconnect | server CPU per first login |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|");
        for x in s {
            if let (Some(t), Some(i)) = (x.target, &x.idle) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.1} µs | {:.1} µs |",
                    t.title(),
                    num(i.reconnected),
                    num(i.reconnects_per_sec),
                    i.reconnect_cpu_us,
                    i.login_cpu_us
                );
            }
        }
        md.push('\n');
    }

    // Relay.
    if s.iter().any(|x| !x.relay.is_empty()) {
        let _ = writeln!(
            md,
            "## 2. Online relay: acknowledged delivery, rising rates\n"
        );
        let _ = writeln!(
            md,
            "Latency is from the send (or, when the pair's window held a message back, from when it was due) to the delivery receipt at the sender (\"e2e\"), or to the delivery at the receiver (\"deliver\"). Light load is the first rate step; the highest sustained rate is the last step that was not saturated (≥ 95 % receipted, p99 ≤ 1 s); the peak is the step with the most receipts per second (often a saturated one).\n"
        );
        for &pairs in &sizes.relay_pairs {
            let _ = writeln!(md, "### {pairs} pair(s)\n");
            let _ = writeln!(
                md,
                "| target | peak delivered msg/s (offered) | light load: e2e p50 / p99 / p99.9 | light load: deliver p50 / p99 | highest sustained rate: e2e p50 / p99 | server CPU s per M msgs | server cores at peak | generator (busiest worker, cores) | other load (cores) | limited by | Tidings / target (peak) |"
            );
            let _ = writeln!(md, "|---|---:|---|---|---|---:|---:|---:|---:|---|---:|");
            let tidings_peak = tidings
                .and_then(|t| t.relay.iter().find(|r| r.pairs == pairs))
                .map(|r| r.peak_per_sec);
            for x in s {
                let (Some(t), Some(r)) = (x.target, x.relay.iter().find(|r| r.pairs == pairs))
                else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {} | {} ({}) | {} / {} / {} at {}/s | {} / {} | {} / {} at {}/s | {:.1} | {:.2} | {:.2}{} | {:.2} | {} | {} |",
                    t.title(),
                    num(r.peak_per_sec),
                    num(r.peak_offered),
                    fmt_us(r.light_e2e.p50),
                    fmt_us(r.light_e2e.p99),
                    fmt_us(r.light_e2e.p999),
                    num(r.light_offered),
                    fmt_us(r.light_deliver.p50),
                    fmt_us(r.light_deliver.p99),
                    fmt_us(r.sustained_e2e.p50),
                    fmt_us(r.sustained_e2e.p99),
                    num(r.sustained_offered),
                    r.cpu_per_million,
                    r.server_cores_at_peak,
                    r.generator_worker_cores_at_peak,
                    if r.generator_limited { " **generator-limited**" } else { "" },
                    r.background_cores_at_peak,
                    r.limited_by,
                    if t == Target::Tidings {
                        "–".into()
                    } else {
                        ratio(tidings_peak, Some(r.peak_per_sec))
                    }
                );
            }
            md.push('\n');
        }
    }

    // Offline.
    if s.iter().any(|x| x.offline.is_some()) {
        let _ = writeln!(md, "## 3. Offline: store, restart, drain\n");
        let _ = writeln!(
            md,
            "Drain time runs from the start of the reconnects (after the restart) until the protocol's own end of a delivery: for Tidings every `AckResult` (the server confirms the acknowledgement once the copy is deleted durably; a Tidings client shows a message only then), for the peers every acknowledgement sent (their protocols answer nothing to it). The time until every message had been received and acknowledged by the client is shown too.\n"
        );
        let _ = writeln!(
            md,
            "| target | messages | store msg/s | restart s | received + acked by clients, s | acks confirmed by the server, s | drain msg/s | durability |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
        for x in s {
            if let (Some(t), Some(o)) = (x.target, &x.offline) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {:.2} | {:.2} | {} | {} | {} |",
                    t.title(),
                    num(o.messages as f64),
                    num(o.store_per_sec),
                    o.restart_secs,
                    o.acked_secs,
                    o.confirmed_secs
                        .map(|c| format!("{c:.2}"))
                        .unwrap_or_else(|| "(no such answer)".into()),
                    num(o.drain_per_sec),
                    o.durability
                );
            }
        }
        md.push('\n');
    }

    // Lookup.
    if s.iter().any(|x| x.lookup.is_some()) {
        let _ = writeln!(md, "## 4. Lookup: a 1,000-number phonebook\n");
        let _ = writeln!(
            md,
            "| target | numbers/s | request p50 | request p99 | what is measured |"
        );
        let _ = writeln!(md, "|---|---:|---:|---:|---|");
        for x in s {
            if let (Some(t), Some(l)) = (x.target, &x.lookup) {
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} |",
                    t.title(),
                    num(l.numbers_per_sec),
                    fmt_us(l.latency.p50),
                    fmt_us(l.latency.p99),
                    l.what
                );
            }
        }
        md.push('\n');
    }

    // The bar.
    let _ = writeln!(md, "## Against the performance bar\n");
    let _ = writeln!(md, "| bar | measured | met |");
    let _ = writeln!(md, "|---|---|---|");
    for (bar, measured, met) in bar_rows(s, sizes) {
        let _ = writeln!(
            md,
            "| {bar} | {measured} | {} |",
            match met {
                Some(true) => "yes",
                Some(false) => "no",
                None => "not measured",
            }
        );
    }
    md.push('\n');
    let _ = writeln!(md, "![latency percentiles per target](latency.svg)");
    md
}

/// (bar, measured, met?) for each line of the bar.
pub fn bar_rows(s: &[Summary], sizes: &Sizes) -> Vec<(String, String, Option<bool>)> {
    let mut rows = Vec::new();
    let t = find(s, Target::Tidings);
    let peer = |p: Target| find(s, p);
    let idle = t.and_then(|t| t.idle.as_ref());
    rows.push((
        "idle ≤ 1 KB per connection".to_string(),
        idle.map(|i| bytes(i.bytes_per_connection))
            .unwrap_or_else(|| "–".into()),
        idle.map(|i| i.bytes_per_connection <= 1000.0),
    ));
    rows.push((
        "resumed connects ≤ 33 µs of server CPU each".to_string(),
        idle.map(|i| {
            let mosquitto = peer(Target::Mosquitto).and_then(|p| p.idle.as_ref());
            format!(
                "{:.1} µs each, {}/s{}",
                i.reconnect_cpu_us,
                num(i.reconnects_per_sec),
                mosquitto
                    .map(|m| format!(
                        " (Mosquitto's reconnect: {:.1} µs, {}/s)",
                        m.reconnect_cpu_us,
                        num(m.reconnects_per_sec)
                    ))
                    .unwrap_or_default()
            )
        })
        .unwrap_or_else(|| "–".into()),
        idle.map(|i| i.reconnected > 0.0 && i.reconnect_cpu_us <= 33.0),
    ));
    rows.push((
        "≥ 30,000 connects/s".to_string(),
        idle.map(|i| format!("{}/s", num(i.connects_per_sec)))
            .unwrap_or_else(|| "–".into()),
        idle.map(|i| i.connects_per_sec >= 30_000.0),
    ));
    for &pairs in &sizes.relay_pairs {
        let tr = t.and_then(|t| t.relay.iter().find(|r| r.pairs == pairs));
        let pr = |p: Target| peer(p).and_then(|p| p.relay.iter().find(|r| r.pairs == pairs));
        let cmp = |p: Target, factor: f64, name: &str| {
            let (Some(a), Some(b)) = (tr, pr(p)) else {
                return (
                    format!("relay {pairs} pair(s) ≥ {name}"),
                    "–".to_string(),
                    None,
                );
            };
            let r = a.peak_per_sec / b.peak_per_sec;
            (
                format!("relay {pairs} pair(s) ≥ {name}"),
                format!(
                    "{} vs {} msg/s = {r:.2}x",
                    num(a.peak_per_sec),
                    num(b.peak_per_sec)
                ),
                Some(r >= factor),
            )
        };
        rows.push(cmp(Target::Mosquitto, 2.0, "2x Mosquitto"));
        rows.push(cmp(Target::Nats, 1.0, "nats-server"));
        rows.push(cmp(Target::Ejabberd, 10.0, "10x ejabberd"));
        if let (Some(a), Some(b)) = (tr, pr(Target::Mosquitto)) {
            rows.push((
                format!("relay {pairs} pair(s): light-load p50 and p99 ≤ Mosquitto's"),
                format!(
                    "p50 {} vs {}, p99 {} vs {}",
                    fmt_us(a.light_e2e.p50),
                    fmt_us(b.light_e2e.p50),
                    fmt_us(a.light_e2e.p99),
                    fmt_us(b.light_e2e.p99)
                ),
                Some(a.light_e2e.p50 <= b.light_e2e.p50 && a.light_e2e.p99 <= b.light_e2e.p99),
            ));
        }
    }
    let offline = t.and_then(|t| t.offline.as_ref());
    rows.push((
        "durable drain ≥ 100,000 messages/s".to_string(),
        offline
            .map(|o| format!("{}/s", num(o.drain_per_sec)))
            .unwrap_or_else(|| "–".into()),
        offline.map(|o| o.drain_per_sec >= 100_000.0),
    ));
    rows
}

const COLORS: [RGBColor; 5] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x17, 0xbe, 0xcf),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

fn color(target: Target) -> RGBColor {
    let i = Target::ALL.iter().position(|t| *t == target).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

/// The latency plot: one panel per pair count, send → receipt percentiles at light load and at
/// the peak, one line per target (log scale).
pub fn plot(report: &Report, path: &Path) -> anyhow::Result<()> {
    let s = &report.summary;
    let pair_counts: Vec<u32> = report
        .sizes
        .relay_pairs
        .iter()
        .copied()
        .filter(|p| s.iter().any(|x| x.relay.iter().any(|r| r.pairs == *p)))
        .collect();
    let panels = pair_counts.len().max(1);
    let root = SVGBackend::new(path, (1100, 380 * panels as u32 * 2)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let areas = root.split_evenly((panels * 2, 1));
    let labels = ["p50", "p90", "p99", "p99.9", "p99.99", "max"];
    for (k, &pairs) in pair_counts.iter().enumerate() {
        for (j, at_peak) in [false, true].into_iter().enumerate() {
            let area = &areas[2 * k + j];
            let series: Vec<(Target, Percentiles, f64)> = s
                .iter()
                .filter_map(|x| {
                    let r = x.relay.iter().find(|r| r.pairs == pairs)?;
                    let (p, rate) = if at_peak {
                        (r.sustained_e2e, r.sustained_offered)
                    } else {
                        (r.light_e2e, r.light_offered)
                    };
                    (p.count > 0).then_some((x.target?, p, rate))
                })
                .collect();
            let values: Vec<f64> = series
                .iter()
                .flat_map(|(_, p, _)| p.points().map(|(_, v)| v))
                .filter(|v| *v > 0.0)
                .collect();
            let lo = (values.iter().copied().fold(f64::MAX, f64::min) / 1.5).max(1.0);
            let hi = values.iter().copied().fold(0.0, f64::max).max(lo * 10.0) * 1.5;
            let caption = format!(
                "{pairs} pair(s), {}: send → receipt latency (log scale)",
                if at_peak {
                    "at each target's peak rate"
                } else {
                    "light load"
                }
            );
            let mut chart = ChartBuilder::on(area)
                .caption(caption, ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(60)
                .build_cartesian_2d(-0.2f64..5.2f64, lo.log10()..hi.log10())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .light_line_style(WHITE)
                .y_labels(12)
                .y_label_formatter(&|log| {
                    // The axis is log10(µs); label it in time units, two significant digits.
                    let v = 10f64.powf(*log);
                    let magnitude = 10f64.powf(v.log10().floor() - 1.0);
                    let v = (v / magnitude).round() * magnitude;
                    if v >= 1e6 {
                        format!("{:.0} s", v / 1e6)
                    } else if v >= 1e4 {
                        format!("{:.0} ms", v / 1e3)
                    } else if v >= 1e3 {
                        format!("{:.1} ms", v / 1e3)
                    } else {
                        format!("{v:.0} µs")
                    }
                })
                .x_labels(6)
                .x_label_formatter(&|x| {
                    let i = x.round() as i64;
                    if (x - i as f64).abs() < 0.01 && (0..6).contains(&i) {
                        labels[i as usize].to_string()
                    } else {
                        String::new()
                    }
                })
                .y_desc("latency")
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for (target, p, rate) in series {
                let c = color(target);
                let points: Vec<(f64, f64)> = p
                    .points()
                    .iter()
                    .enumerate()
                    .map(|(i, (_, v))| (i as f64, v.max(lo).log10()))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label(format!("{} @ {}/s", target.title(), num(rate)))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                    });
                chart
                    .draw_series(
                        points
                            .iter()
                            .map(|&(x, y)| Circle::new((x, y), 3, c.filled())),
                    )
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
