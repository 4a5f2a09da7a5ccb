//! The harness side: prepares each target, starts it, runs each phase through worker processes,
//! measures the server from `/proc`, stops it, and collects the results.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::common::{self, say};
use crate::results::{
    IdleResult, LookupResult, OfflineResult, Percentiles, RelayResult, StepResult, TargetRun,
};
use crate::servers::{self, Prepared, Programs, Server};
use crate::sys;
use crate::wire::{Ctl, Endpoint, Event, Job, Phase, StepSpec, Target, WorkerSpec};

/// The sizes of a run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Sizes {
    pub runs: usize,
    pub idle_clients: u32,
    pub idle_workers: u32,
    pub idle_concurrency: usize,
    pub idle_settle_secs: f64,
    pub relay_pairs: Vec<u32>,
    /// Offered loads to climb through, messages per second over all pairs.
    pub relay_rates: Vec<f64>,
    pub relay_max_steps: usize,
    pub step_secs: f64,
    pub grace_secs: f64,
    pub window: u32,
    pub offline_users: u32,
    pub offline_per_user: u32,
    pub lookup_clients: u32,
    pub phonebook: u32,
    pub lookup_secs: f64,
}

impl Sizes {
    pub fn full() -> Self {
        Sizes {
            runs: 3,
            idle_clients: 19_000,
            idle_workers: 4,
            idle_concurrency: 256,
            idle_settle_secs: 3.0,
            relay_pairs: vec![1, 100, 1000],
            // 1-2-5 steps, with 30,000 and 40,000 between 20,000 and 50,000, where the
            // servers that store what they relay saturate.
            relay_rates: vec![
                100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 2e4, 3e4, 4e4, 5e4, 1e5, 2e5, 5e5,
            ],
            relay_max_steps: 14,
            step_secs: 5.0,
            grace_secs: 5.0,
            window: 1000,
            offline_users: 1000,
            offline_per_user: 100,
            lookup_clients: 4,
            phonebook: 1000,
            lookup_secs: 10.0,
        }
    }

    pub fn smoke() -> Self {
        Sizes {
            runs: 1,
            idle_clients: 200,
            idle_workers: 2,
            idle_concurrency: 64,
            idle_settle_secs: 0.5,
            relay_pairs: vec![1, 10],
            relay_rates: vec![100.0, 1000.0],
            relay_max_steps: 2,
            step_secs: 1.0,
            grace_secs: 2.0,
            window: 1000,
            offline_users: 10,
            offline_per_user: 100,
            lookup_clients: 1,
            phonebook: 100,
            lookup_secs: 1.0,
        }
    }

    /// Users every target needs registered (indices `0..users`).
    pub fn users(&self) -> u32 {
        let max_pairs = self.relay_pairs.iter().copied().max().unwrap_or(0);
        self.idle_clients
            .max(2 * max_pairs)
            .max(2 * self.offline_users)
            .max(self.phonebook / 2)
            .max(self.lookup_clients)
    }

    /// The phonebook of the lookup phase: half registered users, half not.
    pub fn phonebook_numbers(&self) -> Vec<String> {
        let users = self.phonebook / 2;
        (0..users)
            .map(common::number)
            .chain((0..self.phonebook - users).map(common::non_user_number))
            .collect()
    }

    /// The rates to climb through for `pairs` pairs.
    pub fn ladder(&self, pairs: u32) -> Vec<f64> {
        let floor = f64::from(pairs).max(100.0);
        self.relay_rates
            .iter()
            .copied()
            .filter(|r| *r >= floor)
            .take(self.relay_max_steps)
            .collect()
    }
}

/// Waits (up to `max_wait`) until the rest of the machine uses less than `below` cores, measured
/// over two-second windows while nothing of the harness runs. Returns the last measurement.
pub async fn wait_quiet(below: f64, max_wait: Duration) -> f64 {
    let started = Instant::now();
    let mut said = false;
    loop {
        let before = sys::machine_busy_secs();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let load = (sys::machine_busy_secs() - before) / 2.0;
        if load < below {
            return load;
        }
        if started.elapsed() >= max_wait {
            say(&format!(
                "the machine is still busy ({load:.2} cores used by other work); going on"
            ));
            return load;
        }
        if !said {
            say(&format!(
                "waiting for the machine to quieten: {load:.2} cores used by other work (threshold {below})"
            ));
            said = true;
        }
    }
}

/// What `run` was asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Before each phase, wait for other work on the machine to drop below this many cores.
    pub quiet_below: Option<f64>,
    pub phases: Vec<Phase>,
    pub sizes: Sizes,
    pub work: PathBuf,
    pub programs: Programs,
    pub exe: PathBuf,
}

static NEXT_SOURCE: AtomicU32 = AtomicU32::new(0);

/// A fresh loopback source address for each worker, so that no two workers (and no two runs)
/// share a source address's ephemeral ports.
fn next_source() -> Ipv4Addr {
    let n = NEXT_SOURCE.fetch_add(1, Ordering::Relaxed);
    Ipv4Addr::new(
        127,
        1 + (n / 62_500) as u8,
        ((n / 250) % 250) as u8,
        (n % 250 + 1) as u8,
    )
}

struct WorkerProc {
    pid: u32,
    child: Child,
    stdin: Option<ChildStdin>,
    done: bool,
}

/// The worker processes of one phase.
pub struct Fleet {
    procs: Vec<WorkerProc>,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    /// Events that arrived while waiting for something else, kept for the next wait.
    pending: std::collections::VecDeque<(usize, Event)>,
    label: String,
}

impl Fleet {
    async fn spawn(exe: &Path, specs: Vec<WorkerSpec>, label: &str) -> anyhow::Result<Fleet> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut procs = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let mut child = tokio::process::Command::new(exe)
                .arg("worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker")?;
            let pid = child.id().ok_or_else(|| anyhow!("worker has no pid"))?;
            let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("worker stdin"))?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker stdout"))?;
            let line = serde_json::to_string(&spec)? + "\n";
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await?;
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(event) => {
                            let _ = tx.send((i, event));
                        }
                        Err(_) => say(&format!("worker {i}: {line}")),
                    }
                }
                let _ = tx.send((
                    i,
                    Event::Error {
                        message: "the worker exited".into(),
                    },
                ));
            });
            procs.push(WorkerProc {
                pid,
                child,
                stdin: Some(stdin),
                done: false,
            });
        }
        Ok(Fleet {
            procs,
            rx,
            pending: std::collections::VecDeque::new(),
            label: label.to_string(),
        })
    }

    fn len(&self) -> usize {
        self.procs.len()
    }

    async fn send_all(&mut self, ctl: &Ctl) -> anyhow::Result<()> {
        let line = serde_json::to_string(ctl)? + "\n";
        for proc in &mut self.procs {
            if let Some(stdin) = &mut proc.stdin {
                stdin.write_all(line.as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// CPU seconds of each worker so far.
    fn cpu_each(&self) -> Vec<f64> {
        self.procs.iter().map(|p| sys::cpu_secs(p.pid)).collect()
    }

    /// Waits for one event matching `want` from every worker, printing progress.
    async fn wait_all(
        &mut self,
        what: &str,
        timeout: Duration,
        want: impl Fn(&Event) -> bool,
    ) -> anyhow::Result<Vec<Event>> {
        let n = self.procs.len();
        let mut got: Vec<Option<Event>> = vec![None; n];
        let mut progress = vec![(0u64, 0u64); n];
        let deadline = Instant::now() + timeout;
        let mut last_say = Instant::now();
        let mut earlier = std::mem::take(&mut self.pending);
        while got.iter().any(Option::is_none) {
            let (i, event) = match earlier.pop_front() {
                Some(event) => event,
                None => {
                    let Ok(next) = tokio::time::timeout_at(deadline, self.rx.recv()).await else {
                        bail!(
                            "{}: {what} did not come within {timeout:?} from {} of {n} workers",
                            self.label,
                            got.iter().filter(|g| g.is_none()).count()
                        );
                    };
                    next.ok_or_else(|| anyhow!("{}: workers gone", self.label))?
                }
            };
            match event {
                Event::Progress { done, total } => {
                    progress[i] = (done, total);
                    if last_say.elapsed() >= Duration::from_secs(2) {
                        let done: u64 = progress.iter().map(|p| p.0).sum();
                        let total: u64 = progress.iter().map(|p| p.1).sum();
                        say(&format!("{}: {what}: {done}/{total}", self.label));
                        last_say = Instant::now();
                    }
                }
                Event::Error { message } => {
                    if self.procs[i].done && message == "the worker exited" {
                        continue;
                    }
                    bail!("{}: worker {i}: {message}", self.label);
                }
                Event::Done => {
                    self.procs[i].done = true;
                    if got[i].is_none() {
                        bail!("{}: worker {i} finished without {what}", self.label);
                    }
                }
                event if want(&event) && got[i].is_none() => got[i] = Some(event),
                event => self.pending.push_back((i, event)),
            }
        }
        self.pending.extend(earlier);
        Ok(got.into_iter().flatten().collect())
    }

    /// Tells the workers to stop and waits for them to exit.
    async fn finish(mut self) {
        let _ = self.send_all(&Ctl::Stop).await;
        for proc in &mut self.procs {
            proc.stdin = None;
            if tokio::time::timeout(Duration::from_secs(30), proc.child.wait())
                .await
                .is_err()
            {
                let _ = sys::stop(proc.pid, Duration::from_secs(5)).await;
                let _ = proc.child.wait().await;
            }
        }
    }
}

fn spec(worker: u32, target: Target, prepared: &Prepared, job: Job) -> WorkerSpec {
    WorkerSpec {
        worker,
        endpoint: Endpoint {
            target,
            addr: servers::addr(target),
            src_ip: next_source(),
            tls_pin: match target {
                Target::TidingsTls => prepared.tls.as_ref().map(|t| t.2.clone()),
                _ => None,
            },
            devices: prepared.devices.clone(),
            nodes: if target.is_tidings() {
                servers::TIDINGS_NODES.load(std::sync::atomic::Ordering::Relaxed)
            } else {
                1
            },
            pairs_on_one_node: servers::PAIRS_ON_ONE_NODE
                .load(std::sync::atomic::Ordering::Relaxed),
        },
        job,
    }
}

/// Splits `0..n` into `parts` contiguous ranges (first, count).
fn ranges(n: u32, parts: u32) -> Vec<(u32, u32)> {
    let parts = parts.max(1).min(n.max(1));
    let per = n.div_ceil(parts);
    (0..parts)
        .map(|p| (p * per, per.min(n.saturating_sub(p * per))))
        .filter(|(_, c)| *c > 0)
        .collect()
}

/// Prepares a target once per invocation: accounts, rosters, certificates, password files.
pub async fn prepare(
    options: &Options,
    target: Target,
    done: &HashMap<Target, Prepared>,
) -> anyhow::Result<Prepared> {
    let sizes = &options.sizes;
    let dir = options.work.join("prepare").join(target.name());
    std::fs::create_dir_all(&dir)?;
    let users = sizes.users();
    match target {
        Target::Tidings | Target::TidingsTls => {
            // Both Tidings rows share one set of registered devices.
            let other = if target == Target::Tidings {
                Target::TidingsTls
            } else {
                Target::Tidings
            };
            let mut prepared = match done.get(&other) {
                Some(prepared) => prepared.clone(),
                None => register_tidings(options, &dir, users).await?,
            };
            if target == Target::TidingsTls && prepared.tls.is_none() {
                prepared.tls = Some(servers::make_certificate(&dir)?);
            }
            Ok(prepared)
        }
        Target::Mosquitto => {
            say(&format!("mosquitto: hashing {users} passwords"));
            Ok(Prepared {
                password_file: Some(servers::mosquitto_passwords(
                    &options.programs,
                    &dir,
                    users,
                )?),
                ..Prepared::default()
            })
        }
        Target::Ejabberd => register_ejabberd(options, &dir, users).await,
        Target::Nats => Ok(Prepared::default()),
    }
}

async fn register_tidings(options: &Options, dir: &Path, users: u32) -> anyhow::Result<Prepared> {
    let key_file = dir.join("server.key");
    let mut prepared = Prepared {
        key_file: Some(key_file),
        ..Prepared::default()
    };
    let server_dir = dir.join("server");
    let mut server = Server::start(
        Target::Tidings,
        &options.programs,
        &prepared,
        &server_dir,
        true,
    )
    .await?;
    say(&format!(
        "tidings: registering {users} users (code by SMS outbox, verify)"
    ));
    let started = Instant::now();
    let parts = ranges(users, if users >= 2000 { 4 } else { 1 });
    let mut specs = Vec::new();
    for (w, (first, count)) in parts.iter().enumerate() {
        specs.push(spec(
            w as u32,
            Target::Tidings,
            &prepared,
            Job::Register {
                first: *first,
                count: *count,
                concurrency: 32,
                outbox: Some(server_dir.join("outbox")),
                out: Some(dir.join(format!("devices-{w}.txt"))),
                roster_owners: Vec::new(),
                roster: Vec::new(),
            },
        ));
    }
    let result = async {
        let mut fleet = Fleet::spawn(&options.exe, specs, "tidings registration").await?;
        let events = fleet
            .wait_all("registration steps", Duration::from_secs(1800), |e| {
                matches!(e, Event::Registered { .. })
            })
            .await;
        fleet.finish().await;
        events
    }
    .await;
    let stopped = server.stop().await;
    result?;
    stopped?;
    // The codes' SMS files are not needed any more (and every run would copy nothing of them).
    let _ = std::fs::remove_dir_all(server_dir.join("outbox"));
    let mut all = String::new();
    for w in 0..parts.len() {
        all.push_str(&std::fs::read_to_string(
            dir.join(format!("devices-{w}.txt")),
        )?);
    }
    let devices = dir.join("devices.txt");
    std::fs::write(&devices, all)?;
    say(&format!(
        "tidings: {users} users registered in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    prepared.devices = Some(devices);
    prepared.template = Some(server_dir.join("data"));
    Ok(prepared)
}

async fn register_ejabberd(options: &Options, dir: &Path, users: u32) -> anyhow::Result<Prepared> {
    let sizes = &options.sizes;
    let server_dir = dir.join("server");
    let mut server = Server::start(
        Target::Ejabberd,
        &options.programs,
        &Prepared::default(),
        &server_dir,
        true,
    )
    .await?;
    say(&format!(
        "ejabberd: registering {users} users (in-band registration), rosters for {} lookup clients",
        sizes.lookup_clients
    ));
    let started = Instant::now();
    let parts = ranges(users, if users >= 2000 { 2 } else { 1 });
    let roster: Vec<String> = sizes
        .phonebook_numbers()
        .iter()
        .map(|n| n.trim_start_matches('+').to_string())
        .collect();
    let mut specs = Vec::new();
    for (w, (first, count)) in parts.iter().enumerate() {
        specs.push(spec(
            w as u32,
            Target::Ejabberd,
            &Prepared::default(),
            Job::Register {
                first: *first,
                count: *count,
                concurrency: 16,
                outbox: None,
                out: None,
                roster_owners: Vec::new(),
                roster: Vec::new(),
            },
        ));
    }
    let result = async {
        let mut fleet = Fleet::spawn(&options.exe, specs, "ejabberd registration").await?;
        fleet
            .wait_all("registration steps", Duration::from_secs(1800), |e| {
                matches!(e, Event::Registered { .. })
            })
            .await?;
        fleet.finish().await;
        // Rosters after every account exists.
        let roster_spec = spec(
            0,
            Target::Ejabberd,
            &Prepared::default(),
            Job::Register {
                first: 0,
                count: 0,
                concurrency: 1,
                outbox: None,
                out: None,
                roster_owners: (0..sizes.lookup_clients).collect(),
                roster,
            },
        );
        let mut fleet = Fleet::spawn(&options.exe, vec![roster_spec], "ejabberd rosters").await?;
        let events = fleet
            .wait_all("rosters", Duration::from_secs(600), |e| {
                matches!(e, Event::Registered { .. })
            })
            .await;
        fleet.finish().await;
        events
    }
    .await;
    let stopped = server.stop().await;
    result?;
    stopped?;
    say(&format!(
        "ejabberd: {users} users registered in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Prepared {
        template: Some(server_dir.join("db")),
        ..Prepared::default()
    })
}

/// Runs every chosen phase of one target once.
pub async fn run_target(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    run: usize,
) -> TargetRun {
    let mut result = TargetRun {
        run,
        target,
        idle: None,
        relay: Vec::new(),
        offline: None,
        lookup: None,
        errors: Vec::new(),
    };
    let dir = options
        .work
        .join(format!("run-{}", run + 1))
        .join(target.name());
    for &phase in &options.phases {
        if !target.runs(phase) {
            continue;
        }
        let phase_dir = dir.join(phase.name());
        if let Some(below) = options.quiet_below {
            wait_quiet(below, Duration::from_secs(60)).await;
        }
        say(&format!(
            "run {}/{} · {} · {}",
            run + 1,
            options.sizes.runs,
            target.name(),
            phase.name()
        ));
        let outcome: anyhow::Result<()> = match phase {
            Phase::Idle => idle(options, prepared, target, &phase_dir)
                .await
                .map(|r| result.idle = Some(r)),
            Phase::Relay => {
                let mut outcome = Ok(());
                for &pairs in &options.sizes.relay_pairs {
                    let relay_dir = phase_dir.join(format!("pairs-{pairs}"));
                    match relay(options, prepared, target, &relay_dir, pairs).await {
                        Ok(r) => result.relay.push(r),
                        Err(e) => {
                            result.relay.push(RelayResult {
                                pairs,
                                first_error: Some(format!("{e:#}")),
                                ..RelayResult::default()
                            });
                            outcome = Err(e);
                        }
                    }
                }
                outcome
            }
            Phase::Offline => offline(options, prepared, target, &phase_dir)
                .await
                .map(|r| result.offline = Some(r)),
            Phase::Lookup => lookup(options, prepared, target, &phase_dir)
                .await
                .map(|r| result.lookup = Some(r)),
        };
        if let Err(e) = outcome {
            let message = format!("{} {}: {e:#}", target.name(), phase.name());
            say(&format!("FAILED: {message}"));
            result.errors.push(message);
        }
    }
    result
}

/// Runs `body` with a freshly started server, stopping it afterwards whatever happened.
async fn with_server<T>(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    dir: &Path,
    body: impl AsyncFnOnce(&mut Server) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut server = Server::start(target, &options.programs, prepared, dir, true).await?;
    let result = body(&mut server).await;
    let stopped = server.stop().await;
    let value = result?;
    stopped.context("stopping the server")?;
    Ok(value)
}

async fn idle(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    dir: &Path,
) -> anyhow::Result<IdleResult> {
    let sizes = &options.sizes;
    with_server(options, prepared, target, dir, async |server| {
        // Before and after are read after the same quiet time, so that memory a server gives
        // back some time after a burst (its start-up's, or the logins') counts alike in both.
        tokio::time::sleep(Duration::from_secs_f64(sizes.idle_settle_secs)).await;
        let before = server.usage();
        let specs = ranges(sizes.idle_clients, sizes.idle_workers)
            .into_iter()
            .enumerate()
            .map(|(w, (first, count))| {
                spec(
                    w as u32,
                    target,
                    prepared,
                    Job::Idle {
                        first,
                        count,
                        concurrency: sizes.idle_concurrency,
                    },
                )
            })
            .collect();
        let label = format!("{} idle", target.name());
        let mut fleet = Fleet::spawn(&options.exe, specs, &label).await?;
        let measured = async {
            fleet
                .wait_all("ready", Duration::from_secs(120), |e| {
                    matches!(e, Event::Ready)
                })
                .await?;
            let gen0: f64 = fleet.cpu_each().iter().sum();
            let cpu0 = server.usage().cpu_secs;
            let machine0 = sys::machine_busy_secs();
            let started = Instant::now();
            fleet.send_all(&Ctl::Go).await?;
            let events = fleet
                .wait_all("users logged in", Duration::from_secs(900), |e| {
                    matches!(e, Event::Connected { .. })
                })
                .await?;
            let connect_secs = started.elapsed().as_secs_f64();
            let machine1 = sys::machine_busy_secs();
            let gen_connect: f64 = fleet.cpu_each().iter().sum::<f64>() - gen0;
            let server_connect = server.usage().cpu_secs - cpu0;
            tokio::time::sleep(Duration::from_secs_f64(sizes.idle_settle_secs)).await;
            let after = server.usage();
            let gen1: f64 = fleet.cpu_each().iter().sum();
            let (mut ok, mut failed, mut first_error) = (0, 0, None);
            for event in events {
                if let Event::Connected {
                    ok: o,
                    failed: f,
                    first_error: e,
                    ..
                } = event
                {
                    ok += o;
                    failed += f;
                    first_error = first_error.or(e);
                }
            }
            // The reconnect step: every client closes its connection; once the closes are
            // done, every one connects again the cheapest way its protocol offers (Tidings: its
            // resumption token), and the server's CPU over the reconnects is theirs alone.
            fleet.send_all(&Ctl::Close).await?;
            fleet
                .wait_all("connections closed", Duration::from_secs(300), |e| {
                    matches!(e, Event::Closed)
                })
                .await?;
            tokio::time::sleep(Duration::from_secs_f64(sizes.idle_settle_secs)).await;
            let reconnect_cpu0 = server.usage().cpu_secs;
            let reconnect_started = Instant::now();
            fleet.send_all(&Ctl::Reconnect).await?;
            let reconnects = fleet
                .wait_all("users reconnected", Duration::from_secs(900), |e| {
                    matches!(e, Event::Connected { .. })
                })
                .await?;
            let reconnect_secs = reconnect_started.elapsed().as_secs_f64();
            let reconnect_server_cpu_secs = server.usage().cpu_secs - reconnect_cpu0;
            let (mut reconnected, mut reconnect_failed, mut reconnect_first_error) = (0, 0, None);
            for event in reconnects {
                if let Event::Connected {
                    ok: o,
                    failed: f,
                    first_error: e,
                    ..
                } = event
                {
                    reconnected += o;
                    reconnect_failed += f;
                    reconnect_first_error = reconnect_first_error.or(e);
                }
            }
            let result = IdleResult {
                login_server_cpu_secs: server_connect,
                reconnected,
                reconnect_failed,
                reconnect_secs,
                reconnects_per_sec: reconnected as f64 / reconnect_secs.max(1e-9),
                reconnect_server_cpu_secs,
                reconnect_first_error,
                clients: u64::from(sizes.idle_clients),
                connected: ok,
                failed,
                connect_secs,
                connects_per_sec: ok as f64 / connect_secs.max(1e-9),
                rss_before: before.rss_bytes,
                rss_after: after.rss_bytes,
                bytes_per_connection: (after.rss_bytes as f64 - before.rss_bytes as f64)
                    / (ok.max(1) as f64),
                server_cpu_secs: after.cpu_secs - cpu0,
                generator_cpu_secs: gen1 - gen0,
                background_cpu_secs: (machine1 - machine0 - gen_connect - server_connect)
                    .max(0.0),
                workers: fleet.len(),
                first_error,
            };
            say(&format!(
                "{}: {ok}/{} logged in ({failed} failed) in {connect_secs:.2} s = {:.0}/s; RSS {:.1} → {:.1} MiB = {:.0} B per connection",
                label,
                sizes.idle_clients,
                result.connects_per_sec,
                before.rss_bytes as f64 / 1048576.0,
                after.rss_bytes as f64 / 1048576.0,
                result.bytes_per_connection
            ));
            say(&format!(
                "{}: server CPU {:.1} µs per first login; {}/{} reconnected ({} failed) in {:.2} s = {:.0}/s, server CPU {:.1} µs each{}",
                label,
                result.login_server_cpu_secs * 1e6 / (ok.max(1) as f64),
                result.reconnected,
                ok,
                result.reconnect_failed,
                result.reconnect_secs,
                result.reconnects_per_sec,
                result.reconnect_server_cpu_secs * 1e6 / (result.reconnected.max(1) as f64),
                result
                    .reconnect_first_error
                    .as_deref()
                    .map(|e| format!(" (first error: {e})"))
                    .unwrap_or_default()
            ));
            if ok == 0 {
                bail!(
                    "no client logged in: {}",
                    result.first_error.clone().unwrap_or_default()
                );
            }
            anyhow::Ok(result)
        }
        .await;
        let _ = fleet.send_all(&Ctl::Release).await;
        fleet.finish().await;
        measured
    })
    .await
}

async fn relay(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    dir: &Path,
    pairs: u32,
) -> anyhow::Result<RelayResult> {
    let sizes = &options.sizes;
    with_server(options, prepared, target, dir, async |server| {
        let workers = if pairs >= 10 { 2 } else { 1 };
        let mut groups: Vec<Vec<u32>> = vec![Vec::new(); workers];
        for pair in 0..pairs {
            groups[pair as usize % workers].push(pair);
        }
        let specs = groups
            .into_iter()
            .enumerate()
            .map(|(w, group)| {
                spec(
                    w as u32,
                    target,
                    prepared,
                    Job::Relay {
                        pairs: group,
                        window: sizes.window,
                    },
                )
            })
            .collect();
        let label = format!("{} relay {pairs} pair(s)", target.name());
        let mut fleet = Fleet::spawn(&options.exe, specs, &label).await?;
        let measured = async {
            let started = Instant::now();
            let connected = fleet
                .wait_all("pairs connected", Duration::from_secs(600), |e| {
                    matches!(e, Event::Connected { .. })
                })
                .await?;
            for event in &connected {
                if let Event::Connected {
                    failed,
                    first_error,
                    ..
                } = event
                {
                    if *failed > 0 {
                        bail!(
                            "{failed} pair(s) did not connect: {}",
                            first_error.clone().unwrap_or_default()
                        );
                    }
                }
            }
            fleet
                .wait_all("ready", Duration::from_secs(60), |e| matches!(e, Event::Ready))
                .await?;
            let mut result = RelayResult {
                pairs,
                connect_secs: started.elapsed().as_secs_f64(),
                workers: fleet.len(),
                ..RelayResult::default()
            };
            let ladder = sizes.ladder(pairs);
            // A warm-up step at the lightest rate (not reported).
            let warm = StepSpec {
                id: 1,
                rate_per_pair: ladder.first().copied().unwrap_or(100.0) / f64::from(pairs),
                secs: (sizes.step_secs / 2.0).min(2.0),
                grace_secs: sizes.grace_secs,
            };
            run_step(&mut fleet, server, warm).await?;
            for (k, &rate) in ladder.iter().enumerate() {
                let step = StepSpec {
                    id: u16::try_from(k + 2).unwrap_or(u16::MAX),
                    rate_per_pair: rate / f64::from(pairs),
                    secs: sizes.step_secs,
                    grace_secs: sizes.grace_secs,
                };
                let mut outcome = run_step(&mut fleet, server, step).await?;
                finish_step(&mut outcome, pairs, rate);
                say(&format!(
                    "{label} @ {rate:.0}/s: {:.0} delivered/s, e2e p50 {} p99 {} p99.9 {}, server {:.2} cores, generator {:.2} (busiest worker){}{}",
                    outcome.delivered_per_sec,
                    fmt_us(outcome.e2e.p50),
                    fmt_us(outcome.e2e.p99),
                    fmt_us(outcome.e2e.p999),
                    outcome.server_cores,
                    outcome.generator_max_worker_cores,
                    if outcome.rate_limited > 0 {
                        format!(", {} RATE_LIMITED", outcome.rate_limited)
                    } else {
                        String::new()
                    },
                    if outcome.saturated { " — saturated" } else { "" }
                ));
                if let Some(error) = &outcome.first_error {
                    say(&format!("{label}: {error}"));
                    result.first_error.get_or_insert(error.clone());
                }
                let saturated = outcome.saturated;
                result.steps.push(outcome);
                if saturated {
                    break;
                }
            }
            if result.steps.iter().all(|s| s.receipts == 0) {
                bail!(
                    "nothing was delivered: {}",
                    result.first_error.clone().unwrap_or_default()
                );
            }
            anyhow::Ok(result)
        }
        .await;
        fleet.finish().await;
        measured
    })
    .await
}

async fn run_step(
    fleet: &mut Fleet,
    server: &Server,
    step: StepSpec,
) -> anyhow::Result<StepResult> {
    let cpu0 = server.usage().cpu_secs;
    let gen0 = fleet.cpu_each();
    let machine0 = sys::machine_busy_secs();
    let started = Instant::now();
    fleet.send_all(&Ctl::Step(step)).await?;
    let timeout = Duration::from_secs_f64(step.secs + step.grace_secs + 60.0);
    let reports = fleet
        .wait_all(
            "step results",
            timeout,
            |e| matches!(e, Event::StepDone(r) if r.step == step.id),
        )
        .await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu1 = server.usage().cpu_secs;
    let gen1 = fleet.cpu_each();
    let machine1 = sys::machine_busy_secs();
    let mut out = StepResult {
        secs: step.secs,
        ..StepResult::default()
    };
    let mut e2e = common::histogram();
    let mut deliver = common::histogram();
    let mut last_receipt: f64 = 0.0;
    let mut pairs_total = 0u64;
    for event in reports {
        let Event::StepDone(r) = event else { continue };
        out.scheduled += r.scheduled;
        out.sent += r.sent;
        out.refused += r.refused;
        out.rate_limited += r.rate_limited;
        out.delivered += r.delivered;
        out.receipts += r.receipts;
        out.window_waits += r.window_waits;
        out.late += r.late;
        let _ = e2e.add(common::hist_from_text(&r.e2e));
        let _ = deliver.add(common::hist_from_text(&r.deliver));
        last_receipt = last_receipt.max(r.last_receipt_secs);
        if out.first_error.is_none() {
            out.first_error = r.first_error;
        }
        pairs_total += 1;
    }
    let _ = pairs_total;
    out.e2e = Percentiles::of(&e2e);
    out.deliver = Percentiles::of(&deliver);
    let span = last_receipt.max(step.secs).min(step.secs + step.grace_secs);
    out.delivered_per_sec = out.receipts as f64 / span;
    out.server_cpu_secs = cpu1 - cpu0;
    out.server_cores = out.server_cpu_secs / wall;
    let deltas: Vec<f64> = gen1.iter().zip(&gen0).map(|(a, b)| a - b).collect();
    out.generator_cpu_secs = deltas.iter().sum();
    out.machine_cores = (machine1 - machine0) / wall;
    out.background_cores =
        ((machine1 - machine0) - out.server_cpu_secs - out.generator_cpu_secs).max(0.0) / wall;
    // The busiest worker over the sending part of the step.
    out.generator_max_worker_cores = deltas
        .iter()
        .map(|d| d / span.max(step.secs))
        .fold(0.0, f64::max);
    Ok(out)
}

/// Marks the step saturated once the ladder knows its offered rate.
fn finish_step(step: &mut StepResult, pairs: u32, rate: f64) {
    step.offered = rate;
    step.planned = (rate / f64::from(pairs) * step.secs).round().max(1.0) as u64 * u64::from(pairs);
    step.saturated = (step.receipts as f64) < 0.95 * step.planned as f64 || step.e2e.p99 > 1e6;
}

async fn offline(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    dir: &Path,
) -> anyhow::Result<OfflineResult> {
    let sizes = &options.sizes;
    let users = sizes.offline_users;
    let per_user = sizes.offline_per_user;
    let messages = u64::from(users) * u64::from(per_user);
    let label = format!("{} offline", target.name());
    let mut server = Server::start(target, &options.programs, prepared, dir, true).await?;
    let outcome = async {
        let workers = if users >= 10 { 2 } else { 1 };
        let groups = |job: &dyn Fn(Vec<u32>) -> Job| -> Vec<WorkerSpec> {
            let mut groups: Vec<Vec<u32>> = vec![Vec::new(); workers];
            for pair in 0..users {
                groups[pair as usize % workers].push(pair);
            }
            groups
                .into_iter()
                .enumerate()
                .map(|(w, g)| spec(w as u32, target, prepared, job(g)))
                .collect()
        };
        // Store.
        let mut fleet = Fleet::spawn(
            &options.exe,
            groups(&|pairs| Job::Store { pairs, per_pair: per_user }),
            &label,
        )
        .await?;
        let stored = async {
            fleet
                .wait_all("ready", Duration::from_secs(600), |e| matches!(e, Event::Ready))
                .await?;
            let started = Instant::now();
            fleet.send_all(&Ctl::Go).await?;
            let events = fleet
                .wait_all("senders done", Duration::from_secs(900), |e| {
                    matches!(e, Event::Stored { .. })
                })
                .await?;
            anyhow::Ok((events, started.elapsed().as_secs_f64()))
        }
        .await;
        fleet.finish().await;
        let (events, store_secs) = stored?;
        let mut result = OfflineResult {
            users,
            messages,
            store_secs,
            durability: durability(target),
            ..OfflineResult::default()
        };
        for event in events {
            if let Event::Stored {
                ok, first_error, ..
            } = event
            {
                result.stored += ok;
                result.first_error = result.first_error.take().or(first_error);
            }
        }
        result.store_per_sec = result.stored as f64 / store_secs;
        say(&format!(
            "{label}: {} of {messages} messages stored in {store_secs:.2} s ({:.0}/s)",
            result.stored, result.store_per_sec
        ));
        if result.stored < messages {
            bail!(
                "only {} of {messages} stored: {}",
                result.stored,
                result.first_error.clone().unwrap_or_default()
            );
        }
        // Restart.
        let restarted = Instant::now();
        server.stop().await.context("stopping for the restart")?;
        server = Server::start(target, &options.programs, prepared, dir, false).await?;
        result.restart_secs = restarted.elapsed().as_secs_f64();
        // Drain.
        let timeout_secs = 600.0;
        let mut fleet = Fleet::spawn(
            &options.exe,
            groups(&|pairs| Job::Drain {
                pairs,
                per_pair: per_user,
                timeout_secs,
            }),
            &label,
        )
        .await?;
        let drained = async {
            fleet
                .wait_all("ready", Duration::from_secs(120), |e| matches!(e, Event::Ready))
                .await?;
            let cpu0 = server.usage().cpu_secs;
            fleet.send_all(&Ctl::Go).await?;
            let events = fleet
                .wait_all(
                    "receivers drained",
                    Duration::from_secs_f64(timeout_secs + 60.0),
                    |e| matches!(e, Event::Drained { .. }),
                )
                .await?;
            let cpu1 = server.usage().cpu_secs;
            anyhow::Ok((events, cpu1 - cpu0))
        }
        .await;
        fleet.finish().await;
        let (events, cpu) = drained?;
        result.server_cpu_secs_drain = cpu;
        let mut confirmed: Option<f64> = Some(0.0);
        for event in events {
            if let Event::Drained {
                received,
                duplicates,
                secs,
                secs_confirmed,
                first_error,
                ..
            } = event
            {
                result.received += received;
                result.duplicates += duplicates;
                result.acked_secs = result.acked_secs.max(secs);
                confirmed = match (confirmed, secs_confirmed) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    _ => None,
                };
                result.first_error = result.first_error.take().or(first_error);
            }
        }
        result.confirmed_secs = if target.is_tidings() { confirmed } else { None };
        result.drain_secs = result.confirmed_secs.unwrap_or(result.acked_secs);
        result.drain_per_sec = result.received as f64 / result.drain_secs.max(1e-9);
        say(&format!(
            "{label}: restart {:.2} s; {} of {messages} received and acknowledged in {:.2} s{}; drain {:.0} msg/s",
            result.restart_secs,
            result.received,
            result.acked_secs,
            result
                .confirmed_secs
                .map(|c| format!(", every acknowledgement confirmed by the server at {c:.2} s"))
                .unwrap_or_default(),
            result.drain_per_sec,
        ));
        if result.received < messages {
            bail!(
                "only {} of {messages} drained: {}",
                result.received,
                result.first_error.clone().unwrap_or_default()
            );
        }
        anyhow::Ok(result)
    }
    .await;
    let stopped = server.stop().await;
    let result = outcome?;
    stopped.context("stopping the server")?;
    Ok(result)
}

/// Each target's durability setting, stated next to its store-then-drain figure.
pub fn durability(target: Target) -> String {
    match target {
        Target::Tidings | Target::TidingsTls => "fsync: SQLite WAL, synchronous=FULL, group commit (one fsync per batch); QUEUED is answered only after the batch's fsync".into(),
        Target::Mosquitto => "no fsync per message: queued messages live in memory and are written to mosquitto.db at autosave_interval (1800 s) and at shutdown".into(),
        Target::Ejabberd => "no fsync per message: mod_offline in Mnesia (disc_only_copies, dets files), written without fsync".into(),
        Target::Nats => "not applicable (core NATS keeps nothing)".into(),
    }
}

async fn lookup(
    options: &Options,
    prepared: &Prepared,
    target: Target,
    dir: &Path,
) -> anyhow::Result<LookupResult> {
    let sizes = &options.sizes;
    with_server(options, prepared, target, dir, async |server| {
        // One worker process per client: a client's blinding, proof check and unblinding are
        // its own CPU work, which clients sharing one worker thread would queue behind each
        // other's (the wall time would then be the harness's, not the server's).
        let phonebook = sizes.phonebook_numbers();
        let specs = (0..sizes.lookup_clients)
            .map(|client| {
                let job = Job::Lookup {
                    clients: vec![client],
                    phonebook: phonebook.clone(),
                    secs: sizes.lookup_secs,
                };
                spec(client, target, prepared, job)
            })
            .collect();
        let label = format!("{} lookup", target.name());
        let mut fleet = Fleet::spawn(&options.exe, specs, &label).await?;
        let measured = async {
            fleet
                .wait_all("ready", Duration::from_secs(60), |e| matches!(e, Event::Ready))
                .await?;
            let cpu0 = server.usage().cpu_secs;
            fleet.send_all(&Ctl::Go).await?;
            let events = fleet
                .wait_all(
                    "lookup clients done",
                    Duration::from_secs_f64(sizes.lookup_secs + 120.0),
                    |e| matches!(e, Event::LookupDone { .. }),
                )
                .await?;
            let cpu1 = server.usage().cpu_secs;
            let mut result = LookupResult {
                clients: sizes.lookup_clients,
                phonebook: sizes.phonebook,
                server_cpu_secs: cpu1 - cpu0,
                what: match target {
                    Target::Ejabberd => "roster fetch (jabber:iq:roster get) of a stored 1,000-contact roster: who is in it, not who is reachable; the server keeps the phonebook".into(),
                    _ => "the whole phonebook as a client that knows none of it: every number blinded, one Evaluate (one batch proof), proof checked and unblinded, then one Lookup by pseudonym: ONLINE / OFFLINE / NOT_A_USER per number; nothing stored".into(),
                },
                ..LookupResult::default()
            };
            let mut latency_all = common::histogram();
            for event in events {
                if let Event::LookupDone {
                    requests,
                    numbers,
                    secs,
                    latency,
                    first_error,
                    ..
                } = event
                {
                    result.requests += requests;
                    result.numbers += numbers;
                    result.secs = result.secs.max(secs);
                    let _ = latency_all.add(common::hist_from_text(&latency));
                    result.first_error = result.first_error.or(first_error);
                }
            }
            result.latency = Percentiles::of(&latency_all);
            result.numbers_per_sec = result.numbers as f64 / result.secs.max(1e-9);
            say(&format!(
                "{label}: {} numbers in {} phonebooks in {:.2} s = {:.0} numbers/s (wall per phonebook p50 {}, p99 {}; server CPU {:.1} µs per number)",
                result.numbers,
                result.requests,
                result.secs,
                result.numbers_per_sec,
                fmt_us(result.latency.p50),
                fmt_us(result.latency.p99),
                result.server_cpu_secs * 1e6 / (result.numbers.max(1) as f64)
            ));
            if result.numbers == 0 {
                bail!(
                    "no lookup answered: {}",
                    result.first_error.clone().unwrap_or_default()
                );
            }
            anyhow::Ok(result)
        }
        .await;
        fleet.finish().await;
        measured
    })
    .await
}

/// Microseconds as a short human figure.
pub fn fmt_us(us: f64) -> String {
    if us <= 0.0 {
        "–".into()
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}
