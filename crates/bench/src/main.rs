//! `tidings-bench` is the instrument that measures Tidings beside Mosquitto, ejabberd and
//! nats-server on the same workload in the same run: it starts each server on loopback with a
//! configuration of its own (`crates/bench/peers/`), drives it through worker processes (this
//! binary, re-executed as `tidings-bench worker`) that speak each server's real client protocol,
//! measures the server's CPU and memory from `/proc`, stops it by its process id, and writes
//! `results.json`, `results.md` (with Tidings/peer ratios) and `latency.svg`. It must never take a
//! path into Tidings that a real client could not take (no benchmark-only protocol, no shortcut
//! around login, storage or rate limits), never use or stop the system's own services or their
//! default ports, never listen or connect beyond loopback, never run a loop without a bound in
//! count and time, and never be run as a timed test: speed is measured here, by one command, and
//! quoted as ratios from the same run.
//!
//! # Layout
//! - `coord`: the harness side: prepares, starts and stops each target, runs each phase through
//!   worker processes and measures the server;
//! - `worker`: a load-generator worker (`tidings-bench worker`), one thread, driven over stdin;
//! - `drivers`: one client driver per target, each speaking the target's real protocol;
//! - `common`: what every driver shares (identities, message tags, sockets, TLS, counters);
//! - `wire`: what the harness and its workers say to each other, one JSON object per line;
//! - `servers`: the systems under test, started on loopback from the templates in `peers/`;
//! - `sys`: the operating system as the harness sees it (`/proc`, stopping a process, backlogs);
//! - `results`: what a run measured, as written to `results.json`;
//! - `report`: the figures, the Markdown tables with the bar, and the latency plot;
//! - this file: the command line (`run`, `render`, `worker`).
//!
//! Beside the sources: `peers/` (each target's configuration template), `run.sh` (the full run),
//! `install-peers.sh` (the peers, from Debian's packages) and `storage-engines/` (the comparison
//! of embedded engines behind the choice of SQLite; a workspace of its own, excluded from this
//! one). docs/BENCHMARKS.md has the method and the figures.

mod common;
mod coord;
mod drivers;
mod report;
mod results;
mod servers;
mod sys;
mod wire;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::common::say;
use crate::coord::{Options, Sizes};
use crate::wire::{Phase, Target};

#[derive(Debug, Parser)]
#[command(
    name = "tidings-bench",
    version,
    about = "Measures Tidings beside Mosquitto, ejabberd and nats-server on the same workload, in the same run",
    long_about = "Measures Tidings beside Mosquitto, ejabberd and nats-server on the same workload, in the same run.\n\n\
        Full run (about 45 minutes here): tidings-bench run --out docs/bench\n\
        CI smoke run (under 3 minutes):   tidings-bench run --smoke --out target/bench-smoke\n\n\
        Install the peers first with crates/bench/install-peers.sh; build the server with\n\
        `cargo build --release -p tidings` (the harness looks for it next to itself)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the benchmark and write results.json, results.md and latency.svg
    Run(RunArgs),
    /// Re-write results.md and latency.svg from a results.json
    Render {
        /// The results.json of an earlier run
        json: PathBuf,
        /// Directory for results.md and latency.svg [default: next to the JSON]
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// (internal) A load-generator worker, started by `run`
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Small sizes and a few seconds per target, for CI: exits non-zero if any target fails to
    /// start or any phase delivers nothing
    #[arg(long)]
    smoke: bool,
    /// Where results.json, results.md and latency.svg go
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Targets to run [default: all]
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1..)]
    targets: Vec<Target>,
    /// Phases to run [default: all]
    #[arg(long, value_enum, value_delimiter = ',', num_args = 1..)]
    phases: Vec<Phase>,
    /// Runs per figure (each figure is the median) [default: 3, smoke 1]
    #[arg(long)]
    runs: Option<usize>,
    /// The release `tidings` binary [default: next to this binary]
    #[arg(long, env = "TIDINGS_BIN")]
    tidings_bin: Option<PathBuf>,
    /// Scratch directory: each invocation works in its own subdirectory, removed at the end
    #[arg(long, default_value = "/var/tmp/tidings-bench")]
    work_dir: PathBuf,
    /// Keep this invocation's scratch subdirectory (server state and logs) at the end
    #[arg(long)]
    keep_work: bool,
    /// Idle clients [default: 19000, smoke 200]
    #[arg(long)]
    idle_clients: Option<u32>,
    /// Relay pair counts [default: 1,100,1000; smoke 1,10]
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pairs: Vec<u32>,
    /// Clients of the lookup phase, each resolving the phonebook over and over [default: 4,
    /// smoke 1]
    #[arg(long)]
    lookup_clients: Option<u32>,
    /// Seconds per relay rate step [default: 5, smoke 1]
    #[arg(long)]
    step_secs: Option<f64>,
    /// Before each phase, wait (up to a minute) until other work on the machine uses fewer
    /// than this many cores [default: 0.5; smoke: no wait]
    #[arg(long)]
    quiet_below: Option<f64>,
    /// Start the Tidings server under this command, e.g. a profiler:
    /// "valgrind --tool=callgrind --callgrind-out-file=/tmp/callgrind.%p"
    #[arg(long)]
    tidings_wrapper: Option<String>,
    /// Run Tidings as this many nodes over PostgreSQL and NATS (crates/bench/cluster.sh, which
    /// starts them): clients connect to the nodes in turn [default: 1, one node on SQLite]
    #[arg(long)]
    tidings_nodes: Option<u16>,
    /// With several nodes: put both ends of each relay pair on one node (users 2p and 2p+1 on
    /// node p mod N), so that the relay measures same-node messages; by default the ends of a
    /// pair are on different nodes and every message crosses the bus
    #[arg(long)]
    pairs_on_one_node: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Worker => match worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        Command::Render { json, out } => match render(&json, out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let outcome = runtime.block_on(async {
                // An interrupted run stops the servers it started (workers stop when their
                // stdin closes with the harness).
                let mut terminate =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                tokio::select! {
                    outcome = run(args) => outcome,
                    _ = tokio::signal::ctrl_c() => interrupted().await,
                    _ = terminate.recv() => interrupted().await,
                }
            });
            match outcome {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => {
                    say("some targets or phases failed (see above and results.md)");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn interrupted() -> anyhow::Result<bool> {
    say("interrupted: stopping the servers");
    servers::stop_all().await;
    anyhow::bail!("interrupted")
}

fn render(json: &std::path::Path, out: Option<PathBuf>) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(json).with_context(|| format!("read {}", json.display()))?;
    let report: report::Report = serde_json::from_str(&text).context("results.json")?;
    let out = out.unwrap_or_else(|| {
        json.parent()
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("results.md"), report::markdown(&report))?;
    report::plot(&report, &out.join("latency.svg"))?;
    Ok(())
}

fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

async fn run(args: RunArgs) -> anyhow::Result<bool> {
    let started_at = utc_now();
    let started = tokio::time::Instant::now();
    let mut sizes = if args.smoke {
        Sizes::smoke()
    } else {
        Sizes::full()
    };
    if let Some(runs) = args.runs {
        sizes.runs = runs.max(1);
    }
    if let Some(n) = args.idle_clients {
        sizes.idle_clients = n.max(1);
    }
    if !args.pairs.is_empty() {
        sizes.relay_pairs = args.pairs.clone();
    }
    if let Some(clients) = args.lookup_clients {
        sizes.lookup_clients = clients.max(1);
    }
    if let Some(secs) = args.step_secs {
        sizes.step_secs = secs.max(0.2);
    }
    let targets: Vec<Target> = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        Target::ALL
            .iter()
            .copied()
            .filter(|t| args.targets.contains(t))
            .collect()
    };
    let phases: Vec<Phase> = if args.phases.is_empty() {
        Phase::ALL.to_vec()
    } else {
        Phase::ALL
            .iter()
            .copied()
            .filter(|p| args.phases.contains(p))
            .collect()
    };
    // Every number the harness uses must be one the server accepts.
    for index in [0, sizes.users().saturating_sub(1)] {
        tidings_proto::number::E164::parse(&common::number(index))
            .map_err(|e| anyhow::anyhow!("benchmark number {}: {e}", common::number(index)))?;
    }
    tidings_proto::number::E164::parse(&common::non_user_number(sizes.phonebook))
        .map_err(|e| anyhow::anyhow!("benchmark non-user number: {e}"))?;

    let exe = std::env::current_exe().context("where am I")?;
    let tidings_bin = args.tidings_bin.clone().unwrap_or_else(|| {
        exe.parent()
            .map(|d| d.join("tidings"))
            .unwrap_or_else(|| PathBuf::from("tidings"))
    });
    let mut programs = servers::Programs::find(tidings_bin.clone(), &targets)?;
    if let Some(wrapper) = &args.tidings_wrapper {
        programs.tidings_wrapper = wrapper.split_whitespace().map(str::to_string).collect();
    }
    programs.tidings_nodes = args.tidings_nodes.unwrap_or(1).max(1);
    servers::TIDINGS_NODES.store(programs.tidings_nodes, std::sync::atomic::Ordering::Relaxed);
    servers::PAIRS_ON_ONE_NODE.store(args.pairs_on_one_node, std::sync::atomic::Ordering::Relaxed);
    if programs.tidings_nodes > 1 && programs.tidings_wrapper.is_empty() {
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.sh");
        programs.tidings_wrapper = vec![script.display().to_string()];
    }
    // The scratch directory: a subdirectory of our own (named by our pid), so that concurrent
    // invocations never touch each other's state; those of invocations that are gone are removed.
    std::fs::create_dir_all(&args.work_dir)?;
    for entry in std::fs::read_dir(&args.work_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(pid) = name.parse::<u32>() {
            if pid != std::process::id() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let work_dir = args.work_dir.join(std::process::id().to_string());
    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir)?;
    }
    std::fs::create_dir_all(&work_dir)?;
    say(&format!(
        "tidings-bench: scratch directory {}",
        work_dir.display()
    ));
    servers::choose_ports()?;
    std::fs::create_dir_all(&args.out)?;
    let options = Options {
        quiet_below: args
            .quiet_below
            .or(if args.smoke { None } else { Some(0.5) })
            .filter(|q| *q > 0.0),
        phases: phases.clone(),
        sizes: sizes.clone(),
        work: work_dir.clone(),
        programs,
        exe,
    };
    let mut machine = sys::machine();
    machine.disk = sys::disk_of(&work_dir);
    let tidings_version = command_output(&tidings_bin.to_string_lossy(), &["--version"]);
    let git = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let mut versions = vec![(
        "tidings".to_string(),
        format!(
            "{}{}",
            tidings_version.trim_start_matches("tidings "),
            if git.is_empty() {
                String::new()
            } else {
                format!(" ({git})")
            }
        ),
    )];
    for (name, package) in [
        ("mosquitto", "mosquitto"),
        ("ejabberd", "ejabberd"),
        ("nats-server", "nats-server"),
        ("erlang", "erlang-base"),
    ] {
        versions.push((name.to_string(), sys::package_version(package)));
    }
    say(&format!(
        "tidings-bench: targets {}; phases {}; {} run(s){}",
        targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", "),
        phases
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", "),
        sizes.runs,
        if args.smoke { " (smoke)" } else { "" }
    ));

    let mut failures = Vec::new();
    let mut prepared = std::collections::HashMap::new();
    for &target in &targets {
        match coord::prepare(&options, target, &prepared).await {
            Ok(p) => {
                prepared.insert(target, p);
            }
            Err(e) => {
                let message = format!("{}: setup failed: {e:#}", target.name());
                say(&format!("FAILED: {message}"));
                failures.push(message);
            }
        }
    }
    let mut runs = Vec::new();
    for run in 0..sizes.runs {
        for &target in &targets {
            let Some(p) = prepared.get(&target) else {
                continue;
            };
            let result = coord::run_target(&options, p, target, run).await;
            failures.extend(result.errors.iter().cloned());
            runs.push(result);
        }
    }
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let summary = report::summarize(&runs, &targets, &sizes);
    let report = report::Report {
        command,
        started: started_at,
        wall_secs: started.elapsed().as_secs_f64(),
        machine,
        versions,
        sizes,
        targets,
        phases,
        failures: failures.clone(),
        summary,
        runs,
    };
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let markdown = report::markdown(&report);
    std::fs::write(args.out.join("results.md"), &markdown)?;
    if let Err(e) = report::plot(&report, &args.out.join("latency.svg")) {
        failures.push(format!("plot: {e:#}"));
    }
    println!("{markdown}");
    if !args.keep_work {
        let _ = std::fs::remove_dir_all(&work_dir);
    }
    say(&format!(
        "wrote {}, {} and {}",
        args.out.join("results.json").display(),
        args.out.join("results.md").display(),
        args.out.join("latency.svg").display()
    ));
    Ok(failures.is_empty())
}
