//! A load-generator worker: the same binary, started by the harness as `tidings-bench worker`.
//! It reads its job (one JSON line) and controls from stdin and writes events to stdout. It runs
//! on one thread (a current-thread runtime), so its CPU use says whether it kept up. It exits
//! when its job ends, when told to stop, or when the harness goes away (stdin closes).

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::io::Write as _;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::common::{self, Clock, Errors, StepStats, Tag, Window};
use crate::drivers::{mqtt, nats, tidings, xmpp};
use crate::wire::{Ctl, Endpoint, Event, Job, StepReport, StepSpec, Target, WorkerSpec};

/// The longest any single wait of a worker lasts before it gives up.
const MAX_WAIT: Duration = Duration::from_secs(900);

/// What a driver needs to reach the server.
#[derive(Clone)]
pub struct Ctx {
    pub endpoint: Endpoint,
    pub tls: Option<tokio_rustls::TlsConnector>,
    pub devices: Option<Rc<Vec<[u8; 16]>>>,
}

/// A spawned task that is aborted when its guard is dropped (closing its connection).
pub struct TaskGuard(Vec<JoinHandle<()>>);

impl TaskGuard {
    pub fn many(guards: Vec<TaskGuard>) -> TaskGuard {
        TaskGuard(
            guards
                .into_iter()
                .flat_map(|mut g| std::mem::take(&mut g.0))
                .collect(),
        )
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for handle in &self.0 {
            handle.abort();
        }
    }
}

/// Spawns a task on this worker's thread, owned by the returned guard.
pub fn spawn_guarded(future: impl Future<Output = ()> + 'static) -> TaskGuard {
    TaskGuard(vec![tokio::task::spawn_local(future)])
}

/// A connected relay pair: how the schedule hands it a message to send.
pub struct PairLink {
    pub send: Box<dyn Fn(Tag) -> bool>,
    pub _guards: TaskGuard,
}

/// What one receiver's drain saw.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainOutcome {
    pub received: u64,
    pub duplicates: u64,
    /// When the last message was received and acknowledged (worker clock).
    pub done_ns: u64,
    /// Tidings: when the server confirmed the last acknowledgement.
    pub confirmed_ns: Option<u64>,
}

fn emit(event: &Event) {
    let mut stdout = std::io::stdout().lock();
    if let Ok(line) = serde_json::to_string(event) {
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

/// Runs the worker until its job is done. Called by `main` for `tidings-bench worker`.
pub fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("runtime")?;
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, run());
    if let Err(e) = &result {
        emit(&Event::Error {
            message: format!("{e:#}"),
        });
    }
    // Connections close with the runtime.
    drop(local);
    drop(runtime);
    result
}

/// Lines from stdin, read by a task so that a closed stdin ends the worker.
struct Controls {
    rx: mpsc::UnboundedReceiver<Ctl>,
}

impl Controls {
    fn start() -> (mpsc::UnboundedReceiver<String>, Controls) {
        let (first_tx, first_rx) = mpsc::unbounded_channel::<String>();
        let (tx, rx) = mpsc::unbounded_channel::<Ctl>();
        tokio::task::spawn_local(async move {
            let mut lines = BufReader::new(tokio::io::stdin()).lines();
            let mut first = Some(first_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(first) = first.take() {
                    let _ = first.send(line);
                    continue;
                }
                match serde_json::from_str::<Ctl>(&line) {
                    Ok(ctl) => {
                        if tx.send(ctl).is_err() {
                            break;
                        }
                    }
                    Err(e) => emit(&Event::Error {
                        message: format!("bad control line: {e}"),
                    }),
                }
            }
            // stdin closed: the harness is gone. Stop.
            let _ = tx.send(Ctl::Stop);
        });
        (first_rx, Controls { rx })
    }

    async fn next(&mut self) -> Ctl {
        match tokio::time::timeout(MAX_WAIT, self.rx.recv()).await {
            Ok(Some(ctl)) => ctl,
            _ => Ctl::Stop,
        }
    }

    async fn go(&mut self) -> anyhow::Result<()> {
        match self.next().await {
            Ctl::Go => Ok(()),
            Ctl::Stop => bail!("stopped before Go"),
            other => bail!("expected Go, got {other:?}"),
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let (mut first, mut controls) = Controls::start();
    let line = tokio::time::timeout(Duration::from_secs(30), first.recv())
        .await
        .map_err(|_| anyhow!("no job line on stdin"))?
        .ok_or_else(|| anyhow!("stdin closed before the job"))?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("job line")?;
    let tls = match &spec.endpoint.tls_pin {
        Some(pin) => Some(common::tls_connector(pin)?),
        None => None,
    };
    let devices = match &spec.endpoint.devices {
        Some(path) if !matches!(spec.job, Job::Register { .. }) => {
            Some(Rc::new(tidings::load_devices(path)?))
        }
        _ => None,
    };
    let ctx = Ctx {
        endpoint: spec.endpoint.clone(),
        tls,
        devices,
    };
    match spec.job.clone() {
        Job::Register {
            first,
            count,
            concurrency,
            outbox,
            out,
            roster_owners,
            roster,
        } => {
            register(
                &ctx,
                first,
                count,
                concurrency,
                outbox,
                out,
                &roster_owners,
                &roster,
            )
            .await?
        }
        Job::Idle {
            first,
            count,
            concurrency,
        } => idle(&ctx, &mut controls, first, count, concurrency).await?,
        Job::Relay { pairs, window } => relay(&ctx, &mut controls, &pairs, window).await?,
        Job::Store { pairs, per_pair } => store(&ctx, &mut controls, &pairs, per_pair).await?,
        Job::Drain {
            pairs,
            per_pair,
            timeout_secs,
        } => drain(&ctx, &mut controls, &pairs, per_pair, timeout_secs).await?,
        Job::Lookup {
            clients,
            phonebook,
            secs,
        } => lookup(&ctx, &mut controls, &clients, &phonebook, secs).await?,
    }
    emit(&Event::Done);
    Ok(())
}

/// Runs `work` for each item with at most `concurrency` at once, reporting progress each second.
async fn for_each_limited<F, Fut>(
    items: Vec<u32>,
    concurrency: usize,
    errors: Rc<Errors>,
    work: F,
) -> u64
where
    F: Fn(u32) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + 'static,
{
    let total = items.len() as u64;
    let done = Rc::new(Cell::new(0u64));
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut handles = Vec::with_capacity(items.len());
    for item in items {
        let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let future = work(item);
        let done = Rc::clone(&done);
        let errors = Rc::clone(&errors);
        handles.push(tokio::task::spawn_local(async move {
            if let Err(e) = future.await {
                errors.add(&e);
            }
            done.set(done.get() + 1);
            drop(permit);
        }));
    }
    let mut last = Instant::now();
    for handle in handles {
        let mut handle = handle;
        loop {
            match tokio::time::timeout(Duration::from_millis(500), &mut handle).await {
                Ok(_) => break,
                Err(_) => {
                    if last.elapsed() >= Duration::from_secs(1) {
                        emit(&Event::Progress {
                            done: done.get(),
                            total,
                        });
                        last = Instant::now();
                    }
                }
            }
        }
    }
    done.get() - errors.count.get()
}

#[allow(clippy::too_many_arguments)]
async fn register(
    ctx: &Ctx,
    first: u32,
    count: u32,
    concurrency: usize,
    outbox: Option<std::path::PathBuf>,
    out: Option<std::path::PathBuf>,
    roster_owners: &[u32],
    roster: &[String],
) -> anyhow::Result<()> {
    emit(&Event::Ready);
    match ctx.endpoint.target {
        Target::Tidings | Target::TidingsTls => {
            let outbox = outbox.ok_or_else(|| anyhow!("Tidings registration needs the outbox"))?;
            let out = out.ok_or_else(|| anyhow!("Tidings registration needs an output file"))?;
            let ids = tidings::register(ctx, first, count, concurrency, &outbox, &|done, total| {
                emit(&Event::Progress { done, total })
            })
            .await?;
            let text: String = ids
                .iter()
                .map(|id| format!("{}\n", tidings_proto::id::to_text(id)))
                .collect();
            std::fs::write(&out, text).with_context(|| format!("write {}", out.display()))?;
            emit(&Event::Registered {
                ok: ids.len() as u64,
                failed: 0,
                first_error: None,
            });
        }
        Target::Ejabberd => {
            let indices: Vec<u32> = (first..first + count).collect();
            let per = indices.len().div_ceil(concurrency.max(1)).max(1);
            let chunks: Vec<u32> = (0..indices.len().div_ceil(per) as u32).collect();
            let errors = Rc::new(Errors::default());
            let indices = Rc::new(indices);
            let ok_chunks = for_each_limited(chunks, concurrency, Rc::clone(&errors), |c| {
                let ctx = ctx.clone();
                let indices = Rc::clone(&indices);
                async move {
                    let start = c as usize * per;
                    let end = (start + per).min(indices.len());
                    xmpp::register(&ctx, &indices[start..end]).await
                }
            })
            .await;
            let _ = ok_chunks;
            if let Some(first_error) = errors.first() {
                bail!("registration: {first_error}");
            }
            for &owner in roster_owners {
                xmpp::fill_roster(ctx, owner, roster).await?;
            }
            emit(&Event::Registered {
                ok: u64::from(count),
                failed: 0,
                first_error: None,
            });
        }
        Target::Mosquitto | Target::Nats => bail!("nothing to register for this target"),
    }
    Ok(())
}

/// A user held connected, and what its next reconnect presents (Tidings: the resumption token
/// of its last login).
struct Held {
    index: u32,
    guard: Option<TaskGuard>,
    token: Vec<u8>,
}

async fn hold(ctx: &Ctx, index: u32) -> anyhow::Result<Held> {
    let (guard, token) = match ctx.endpoint.target {
        Target::Tidings | Target::TidingsTls => tidings::hold(ctx, index).await?,
        Target::Mosquitto => (mqtt::hold(ctx, index).await?, Vec::new()),
        Target::Ejabberd => (xmpp::hold(ctx, index).await?, Vec::new()),
        Target::Nats => bail!("the idle phase does not apply to NATS"),
    };
    Ok(Held {
        index,
        guard: Some(guard),
        token,
    })
}

/// Connects a user held before again, the cheapest way its protocol offers: Tidings with its
/// resumption token, MQTT to its persistent session without subscribing again, XMPP by logging
/// in again.
async fn reconnect(ctx: &Ctx, index: u32, token: &[u8]) -> anyhow::Result<Held> {
    let (guard, token) = match ctx.endpoint.target {
        Target::Tidings | Target::TidingsTls => tidings::resume(ctx, index, token).await?,
        Target::Mosquitto => (mqtt::reconnect(ctx, index).await?, Vec::new()),
        Target::Ejabberd => (xmpp::hold(ctx, index).await?, Vec::new()),
        Target::Nats => bail!("the idle phase does not apply to NATS"),
    };
    Ok(Held {
        index,
        guard: Some(guard),
        token,
    })
}

/// Connects each of `held` again (their connections closed before), at most `concurrency` at
/// once, and says how many made it.
async fn reconnect_all(ctx: &Ctx, held: &Rc<std::cell::RefCell<Vec<Held>>>, concurrency: usize) {
    let before: Vec<(u32, Vec<u8>)> = held
        .borrow_mut()
        .drain(..)
        .map(|h| (h.index, h.token))
        .collect();
    let tokens: Rc<HashMap<u32, Vec<u8>>> = Rc::new(before.into_iter().collect());
    let errors = Rc::new(Errors::default());
    let started = Instant::now();
    let mut indices: Vec<u32> = tokens.keys().copied().collect();
    indices.sort_unstable();
    let ok = for_each_limited(indices, concurrency, Rc::clone(&errors), |index| {
        let ctx = ctx.clone();
        let held = Rc::clone(held);
        let tokens = Rc::clone(&tokens);
        async move {
            let token = tokens.get(&index).map_or(&[][..], Vec::as_slice);
            let again = reconnect(&ctx, index, token).await?;
            held.borrow_mut().push(again);
            Ok(())
        }
    })
    .await;
    emit(&Event::Connected {
        ok,
        failed: errors.count.get(),
        secs: started.elapsed().as_secs_f64(),
        first_error: errors.first(),
    });
}

async fn idle(
    ctx: &Ctx,
    controls: &mut Controls,
    first: u32,
    count: u32,
    concurrency: usize,
) -> anyhow::Result<()> {
    emit(&Event::Ready);
    controls.go().await?;
    let started = Instant::now();
    let held: Rc<std::cell::RefCell<Vec<Held>>> = Rc::default();
    let errors = Rc::new(Errors::default());
    let ok = for_each_limited(
        (first..first + count).collect(),
        concurrency,
        Rc::clone(&errors),
        |index| {
            let ctx = ctx.clone();
            let held = Rc::clone(&held);
            async move {
                let one = hold(&ctx, index).await?;
                held.borrow_mut().push(one);
                Ok(())
            }
        },
    )
    .await;
    emit(&Event::Connected {
        ok,
        failed: errors.count.get(),
        secs: started.elapsed().as_secs_f64(),
        first_error: errors.first(),
    });
    loop {
        match controls.next().await {
            Ctl::Release | Ctl::Stop => break,
            Ctl::Close => {
                for one in held.borrow_mut().iter_mut() {
                    one.guard = None;
                }
                // Give the closes a moment to leave.
                tokio::time::sleep(Duration::from_millis(200)).await;
                emit(&Event::Closed);
            }
            Ctl::Reconnect => reconnect_all(ctx, &held, concurrency).await,
            _ => {}
        }
    }
    held.borrow_mut().clear();
    // Give the closes a moment to leave.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

async fn relay_pair(
    ctx: &Ctx,
    pair: u32,
    stats: Rc<StepStats>,
    window: Rc<Window>,
) -> anyhow::Result<PairLink> {
    match ctx.endpoint.target {
        Target::Tidings | Target::TidingsTls => tidings::relay_pair(ctx, pair, stats, window).await,
        Target::Mosquitto => mqtt::relay_pair(ctx, pair, stats, window).await,
        Target::Ejabberd => xmpp::relay_pair(ctx, pair, stats, window).await,
        Target::Nats => nats::relay_pair(ctx, pair, stats, window).await,
    }
}

/// A connected pair: its index, its window and its link.
type Link = (u32, Rc<Window>, Rc<PairLink>);

async fn relay(
    ctx: &Ctx,
    controls: &mut Controls,
    pairs: &[u32],
    window_size: u32,
) -> anyhow::Result<()> {
    let clock = Clock::new();
    let stats = StepStats::new(clock);
    let mut links: Vec<Link> = Vec::new();
    let errors = Rc::new(Errors::default());
    let connected: Rc<std::cell::RefCell<Vec<Link>>> = Rc::default();
    let started = Instant::now();
    for_each_limited(pairs.to_vec(), 64, Rc::clone(&errors), |pair| {
        let ctx = ctx.clone();
        let stats = Rc::clone(&stats);
        let connected = Rc::clone(&connected);
        async move {
            let window = Rc::new(Window::default());
            let link = relay_pair(&ctx, pair, stats, Rc::clone(&window)).await?;
            connected.borrow_mut().push((pair, window, Rc::new(link)));
            Ok(())
        }
    })
    .await;
    links.append(&mut connected.borrow_mut());
    emit(&Event::Connected {
        ok: links.len() as u64,
        failed: errors.count.get(),
        secs: started.elapsed().as_secs_f64(),
        first_error: errors.first(),
    });
    if links.is_empty() {
        bail!("no pair connected: {}", errors.first().unwrap_or_default());
    }
    emit(&Event::Ready);
    loop {
        match controls.next().await {
            Ctl::Step(step) => {
                let report = run_step(&links, &stats, clock, step, window_size).await;
                emit(&Event::StepDone(report));
            }
            Ctl::Stop | Ctl::Release => break,
            Ctl::Go | Ctl::Close | Ctl::Reconnect => {}
        }
    }
    drop(links);
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// One rate step: every pair sends on its own schedule (open loop: the scheduled time is the
/// message's send time, so a sender held back by its window or a slow socket is measured, not
/// hidden), then the step waits for the last receipts up to its grace period.
async fn run_step(
    links: &[Link],
    stats: &Rc<StepStats>,
    clock: Clock,
    step: StepSpec,
    window_size: u32,
) -> StepReport {
    stats.reset(step.id);
    let rate = step.rate_per_pair.max(1e-3);
    let count = (step.secs * rate).round().max(1.0) as u32;
    let interval_ns = 1e9 / rate;
    let start_ns = clock.ns() + 20_000_000;
    let end_ns = start_ns + (step.secs * 1e9) as u64;
    let hard_end = clock.at(end_ns + (step.grace_secs * 1e9) as u64);
    let mut tasks = Vec::new();
    for (i, (pair, window, link)) in links.iter().enumerate() {
        window.in_flight.set(0);
        let (pair, window, link) = (*pair, Rc::clone(window), Rc::clone(link));
        let stats = Rc::clone(stats);
        // Spread the pairs' phases evenly over one interval.
        let offset = (interval_ns * i as f64 / links.len() as f64) as u64;
        tasks.push(tokio::task::spawn_local(async move {
            for seq in 0..count {
                let due_ns = start_ns + offset + (f64::from(seq) * interval_ns) as u64;
                let now = clock.ns();
                if now < due_ns {
                    tokio::time::sleep_until(clock.at(due_ns)).await;
                }
                let waited = window.in_flight.get() >= window_size;
                if waited {
                    stats.window_waits.set(stats.window_waits.get() + 1);
                    while window.in_flight.get() >= window_size {
                        if tokio::time::timeout_at(hard_end, window.freed.notified())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                stats.scheduled.set(stats.scheduled.get() + 1);
                window.take();
                // The send time: when the message is handed to the connection, or, when the
                // pair's window held it back (the server is behind), when it was due. The
                // timer's own lateness (tokio's timer ticks in milliseconds) is not the server's.
                let now = clock.ns();
                let lag = now.saturating_sub(due_ns);
                if !waited && lag > 2_000_000 {
                    stats.late.set(stats.late.get() + 1);
                }
                if !(link.send)(Tag {
                    step: step.id,
                    pair,
                    seq,
                    t_ns: if waited { due_ns } else { now },
                }) {
                    stats.error("the connection is gone");
                    return;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let send_done = clock.ns();
    // Wait for the receipts of everything scheduled, up to the grace period.
    loop {
        let outstanding = stats.scheduled.get() - stats.receipts.get() - stats.refused.get();
        if outstanding == 0 || Instant::now() >= hard_end {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let report = StepReport {
        step: step.id,
        scheduled: stats.scheduled.get(),
        sent: stats.sent.get(),
        refused: stats.refused.get(),
        rate_limited: stats.rate_limited.get(),
        delivered: stats.delivered.get(),
        receipts: stats.receipts.get(),
        e2e: common::hist_to_text(&stats.e2e.borrow()),
        deliver: common::hist_to_text(&stats.deliver.borrow()),
        last_receipt_secs: stats.last_receipt_ns.get().saturating_sub(start_ns) as f64 / 1e9,
        send_secs: send_done.saturating_sub(start_ns) as f64 / 1e9,
        window_waits: stats.window_waits.get(),
        late: stats.late.get(),
        first_error: stats.first_error.borrow().clone(),
    };
    // Late receipts of this step no longer count.
    stats.step.set(u16::MAX);
    report
}

async fn store(
    ctx: &Ctx,
    controls: &mut Controls,
    pairs: &[u32],
    per_pair: u32,
) -> anyhow::Result<()> {
    if ctx.endpoint.target == Target::Mosquitto {
        // An MQTT user is offline-reachable only through a persistent session with its
        // subscription; make one for each receiver (as the user's earlier login would have).
        let errors = Rc::new(Errors::default());
        for_each_limited(
            pairs.iter().map(|p| 2 * p + 1).collect(),
            64,
            Rc::clone(&errors),
            |receiver| {
                let ctx = ctx.clone();
                async move { mqtt::make_offline(&ctx, receiver).await }
            },
        )
        .await;
        if let Some(e) = errors.first() {
            bail!("preparing offline MQTT sessions: {e}");
        }
    }
    emit(&Event::Ready);
    controls.go().await?;
    let started = Instant::now();
    let errors = Rc::new(Errors::default());
    let stored = Rc::new(Cell::new(0u64));
    for_each_limited(pairs.to_vec(), 128, Rc::clone(&errors), |pair| {
        let ctx = ctx.clone();
        let stored = Rc::clone(&stored);
        async move {
            let n = match ctx.endpoint.target {
                Target::Tidings | Target::TidingsTls => tidings::store(&ctx, pair, per_pair).await,
                Target::Mosquitto => mqtt::store(&ctx, pair, per_pair).await,
                Target::Ejabberd => xmpp::store(&ctx, pair, per_pair).await,
                Target::Nats => bail!("the offline phase does not apply to NATS"),
            }?;
            stored.set(stored.get() + n);
            Ok(())
        }
    })
    .await;
    emit(&Event::Stored {
        ok: stored.get(),
        failed: u64::from(per_pair) * pairs.len() as u64 - stored.get(),
        secs: started.elapsed().as_secs_f64(),
        first_error: errors.first(),
    });
    Ok(())
}

async fn drain(
    ctx: &Ctx,
    controls: &mut Controls,
    pairs: &[u32],
    per_pair: u32,
    timeout_secs: f64,
) -> anyhow::Result<()> {
    emit(&Event::Ready);
    controls.go().await?;
    let clock = Clock::new();
    let errors = Rc::new(Errors::default());
    let received = Rc::new(Cell::new(0u64));
    let outcomes: Rc<std::cell::RefCell<Vec<DrainOutcome>>> = Rc::default();
    let expected = u64::from(per_pair) * pairs.len() as u64;
    let all = for_each_limited(
        pairs.to_vec(),
        pairs.len().max(1),
        Rc::clone(&errors),
        |pair| {
            let ctx = ctx.clone();
            let received = Rc::clone(&received);
            let outcomes = Rc::clone(&outcomes);
            async move {
                let tick = || received.set(received.get() + 1);
                let outcome = match ctx.endpoint.target {
                    Target::Tidings | Target::TidingsTls => {
                        tidings::drain(&ctx, pair, per_pair, clock, &tick).await
                    }
                    Target::Mosquitto => mqtt::drain(&ctx, pair, per_pair, clock, &tick).await,
                    Target::Ejabberd => xmpp::drain(&ctx, pair, per_pair, clock, &tick).await,
                    Target::Nats => bail!("the offline phase does not apply to NATS"),
                }?;
                outcomes.borrow_mut().push(outcome);
                Ok(())
            }
        },
    );
    let timed = tokio::time::timeout(Duration::from_secs_f64(timeout_secs), all).await;
    let outcomes = outcomes.borrow();
    let done = outcomes.iter().map(|o| o.done_ns).max().unwrap_or(0);
    let confirmed = if ctx.endpoint.target.is_tidings() && outcomes.len() == pairs.len() {
        outcomes
            .iter()
            .map(|o| o.confirmed_ns)
            .collect::<Option<Vec<u64>>>()
            .and_then(|v| v.into_iter().max())
            .map(|ns| ns as f64 / 1e9)
    } else {
        None
    };
    let first_error = match timed {
        Ok(_) => errors.first(),
        Err(_) => Some(format!(
            "drain timed out after {timeout_secs} s with {} of {expected} received",
            received.get()
        )),
    };
    emit(&Event::Drained {
        received: received.get(),
        expected,
        duplicates: outcomes.iter().map(|o| o.duplicates).sum(),
        secs: done as f64 / 1e9,
        secs_confirmed: confirmed,
        first_error,
    });
    Ok(())
}

async fn lookup(
    ctx: &Ctx,
    controls: &mut Controls,
    clients: &[u32],
    phonebook: &[String],
    secs: f64,
) -> anyhow::Result<()> {
    emit(&Event::Ready);
    controls.go().await?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let errors = Rc::new(Errors::default());
    let totals = Rc::new(std::cell::RefCell::new((0u64, 0u64, common::histogram())));
    let phonebook = Rc::new(phonebook.to_vec());
    for_each_limited(
        clients.to_vec(),
        clients.len().max(1),
        Rc::clone(&errors),
        |client| {
            let ctx = ctx.clone();
            let totals = Rc::clone(&totals);
            let phonebook = Rc::clone(&phonebook);
            async move {
                let (requests, numbers, hist) = match ctx.endpoint.target {
                    Target::Tidings | Target::TidingsTls => {
                        tidings::lookup_loop(&ctx, client, &phonebook, until).await
                    }
                    Target::Ejabberd => xmpp::lookup_loop(&ctx, client, until).await,
                    _ => bail!("no lookup for this target"),
                }?;
                let mut totals = totals.borrow_mut();
                totals.0 += requests;
                totals.1 += numbers;
                let _ = totals.2.add(&hist);
                Ok(())
            }
        },
    )
    .await;
    let totals = totals.borrow();
    emit(&Event::LookupDone {
        requests: totals.0,
        numbers: totals.1,
        secs: started.elapsed().as_secs_f64(),
        latency: common::hist_to_text(&totals.2),
        errors: errors.count.get(),
        first_error: errors.first(),
    });
    Ok(())
}
