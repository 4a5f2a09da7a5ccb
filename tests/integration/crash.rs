//! Issue 30, the crash test: real processes (the server, a sender's `listen` and its one-shot
//! `send`s, a receiver's `listen`) stopped dead, at every named failpoint of the durability
//! points (`tidings_core::failpoint::NAMES`, armed through `TIDINGS_FAILPOINT`) and with
//! `kill -9` at random moments drawn from a seed, at least 50 times in one run, each restarted at
//! once. Then everything is drained and each client's own store (`tidings history --json`) and
//! Kannel's SMSC log are checked: every message the sender's client accepted (committed to its
//! profile) went over IP or as SMS, never both, never neither; one that went over IP is shown on
//! every device of the receiver and of the sender's number, one that went as SMS on none of the
//! receiver's; nothing is shown that the sender did not accept, and no device displays a message
//! twice. Beside them, messages sent over IP only (committed too, and sent again under their id
//! until the server settles them): each one the server answered as taken, or that its client
//! settled, is shown on every device of the receiver and of the sender's number; one its client
//! ended as not sent is shown on none of the receiver's.
//!
//! The receiver writes to the sender first, so the sender's messages are a contact's; in every
//! other round the receiver's second device and the sender's own listen too, so that messages
//! whose every device is online are pushed from memory and held (deliver first, with a 30 ms
//! acknowledgement window so that held copies are both decided and stored), and in the others
//! some copies wait on disk.
//!
//! A failure prints the seed; `TIDINGS_CRASH_SEED=<seed>` runs the same draws again (the
//! machine's timing still varies).
//!
//! The sender's `listen` carries its routes (receipts, withdraws, SMS) while the rounds run, but
//! is stopped (`kill -9`, counted) before each round's one-shot sends and started again after
//! them: today's client takes no claim on an outgoing message across processes, so a `listen`
//! that reloads the routes (at its start, or after a reconnect when the server died) while a
//! `send` process is between committing a message and writing its copies would drive the same
//! message from two processes, which can withdraw it while the other's copies are on the way.
//! The one-shot sends use `--wait 0`: they commit, send and leave the rest to `listen`, as the
//! durable design has them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::OpenOptions;
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tidings_core::failpoint::{NAMES, VARIABLE};
use tidings_proto::frame::{Kind, SendOutcome};
use tidings_proto::id::MessageId;

use crate::support::{
    block_on, eventually, marker_comes_first, number, patience, text, Kannel, Server, TempDir,
    User, BIN, PASSPHRASE, PATIENCE, QUIET,
};

/// Kills the run must reach (failpoints and `kill -9` together).
const KILLS: usize = 50;
/// The rounds stop after this long even if the goal is not met (the test then fails on it), so
/// that CI's time stays bounded.
const ROUNDS_BUDGET: Duration = Duration::from_secs(120);
/// Bob's message to Alice before the rounds (so that hers to him are a contact's).
const ACQUAINTED: &str = "hello alice, from bob";
/// SIGABRT: how a process stopped at its failpoint ends.
const ABORTED: i32 = 6;

/// splitmix64: the random moments and victims, reproducible from the printed seed.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to.saturating_sub(from) + 1))
    }
}

/// The failpoints one kind of process reaches in this scenario, armed in turn: each is armed
/// until it has fired, then the next.
struct Rotation {
    names: Vec<&'static str>,
    next: usize,
    fired: BTreeSet<&'static str>,
}

impl Rotation {
    fn new(prefixes: &[&str]) -> Self {
        Self {
            names: NAMES
                .iter()
                .copied()
                .filter(|name| prefixes.iter().any(|p| name.starts_with(p)))
                .collect(),
            next: 0,
            fired: BTreeSet::new(),
        }
    }

    fn current(&self) -> &'static str {
        self.names[self.next % self.names.len()]
    }

    /// The value of `TIDINGS_FAILPOINT` for the next process: the current name at a drawn hit.
    fn arm(&self, draws: &mut Draws, most_hits: u64) -> String {
        format!("{}@{}", self.current(), 1 + draws.below(most_hits))
    }

    fn fired(&mut self) {
        self.fired.insert(self.current());
        self.next += 1;
    }

    fn missing(&self) -> Vec<&'static str> {
        self.names
            .iter()
            .copied()
            .filter(|name| !self.fired.contains(name))
            .collect()
    }
}

/// A client process whose output (every event line) is appended to `out`.
fn spawn_client(user: &User, args: &[&str], failpoint: Option<&str>, out: &Path) -> Child {
    let append = |path: PathBuf| {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("output file")
    };
    let mut command = Command::new(BIN);
    command
        .arg("--profile")
        .arg(user.profile.path())
        .args(args)
        .env("TIDINGS_PASSPHRASE", PASSPHRASE)
        .env_remove("TIDINGS_SERVER")
        .env_remove(VARIABLE)
        .stdout(Stdio::from(append(out.to_path_buf())))
        .stderr(Stdio::from(append(out.with_extension("err"))));
    if let Some(name) = failpoint {
        command.env(VARIABLE, name);
    }
    command.spawn().expect("spawn tidings")
}

/// A long-running `listen` of one device, started again whenever it stops.
struct Listener {
    child: Option<Child>,
}

impl Listener {
    fn start(user: &User, failpoint: Option<&str>, out: PathBuf) -> Self {
        let args = ["--json", "listen", "--timeout", "3600"];
        Self {
            child: Some(spawn_client(user, &args, failpoint, &out)),
        }
    }

    /// `Some(true)` if it stopped at its failpoint, `Some(false)` if it stopped otherwise,
    /// `None` while it runs.
    fn stopped(&mut self) -> Option<bool> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait")?;
        self.child = None;
        Some(status.signal() == Some(ABORTED))
    }

    fn kill9(&mut self) -> bool {
        match self.child.take() {
            Some(mut child) => {
                let running = child.try_wait().ok().flatten().is_none();
                let _ = child.kill();
                let _ = child.wait();
                running
            }
            None => false,
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// How the server process stopped, if it did: `Some(true)` at its failpoint, `Some(false)`
/// otherwise (killed here, or exited).
fn server_stopped(server: &mut Server) -> Option<bool> {
    let Some(child) = server.child.as_mut() else {
        return Some(false);
    };
    let status = child.try_wait().expect("try_wait")?;
    server.child = None;
    Some(status.signal() == Some(ABORTED))
}

/// The processes the rounds stop and start, and the tally of their stops.
struct Fleet<'a> {
    server: &'a mut Server,
    alice: &'a User,
    bob: &'a User,
    alice_listen: Listener,
    bob_listen: Listener,
    /// Whether the sender's listen is to run now (not while one-shot sends run).
    sender_listens: bool,
    /// The receiver's other device and the sender's other device, each with its `listen` and
    /// where that writes: online (unarmed, started again when they stop) in every other round,
    /// so that messages whose every copy goes to a device online are pushed and held in memory
    /// (deliver first), and in the other rounds offline, so that some copies wait on disk.
    others: Vec<(&'a User, Listener, PathBuf)>,
    others_online: bool,
    server_points: Rotation,
    receiver_points: Rotation,
    sender_points: Rotation,
    draws: Draws,
    kills: usize,
    log: Vec<String>,
    round: u32,
    started: Instant,
    alice_out: PathBuf,
    bob_out: PathBuf,
}

impl Fleet<'_> {
    /// Counts a stop and says when and what it was.
    fn note(&mut self, what: String) {
        self.kills += 1;
        let at = self.started.elapsed().as_secs_f64();
        self.log
            .push(format!("{at:6.1} s, round {}: {what}", self.round));
    }

    /// At least `KILLS` stops, and a stop at every failpoint.
    fn goal_reached(&self) -> bool {
        self.kills >= KILLS
            && [
                &self.server_points,
                &self.receiver_points,
                &self.sender_points,
            ]
            .iter()
            .all(|rotation| rotation.missing().is_empty())
    }

    /// Starts again whatever stopped: the server and the receiver's listen armed with their
    /// next failpoint (the same one if killed before reaching it). A server start that does not
    /// get as far as listening counts as a stop at its failpoint.
    fn tend(&mut self) {
        if let Some(at_failpoint) = server_stopped(self.server) {
            if at_failpoint {
                let at = self.server_points.current();
                self.note(format!("server stopped at {at}"));
                self.server_points.fired();
            }
            loop {
                self.server.failpoint = Some(self.server_points.arm(&mut self.draws, 2));
                if self.server.try_spawn().is_ok() {
                    break;
                }
                let at = self.server_points.current();
                self.note(format!("server stopped at {at} while starting"));
                self.server_points.fired();
            }
        }
        if self.bob_listen.stopped() == Some(true) {
            let at = self.receiver_points.current();
            self.note(format!("receiver stopped at {at}"));
            self.receiver_points.fired();
        }
        if self.bob_listen.child.is_none() {
            let armed = self.receiver_points.arm(&mut self.draws, 2);
            self.bob_listen = Listener::start(self.bob, Some(&armed), self.bob_out.clone());
        }
        if self.alice_listen.stopped() == Some(true) {
            self.note("the sender's listen stopped at a failpoint".into());
        }
        if self.sender_listens && self.alice_listen.child.is_none() {
            self.alice_listen = Listener::start(self.alice, None, self.alice_out.clone());
        }
        if self.others_online {
            for (user, listen, out) in &mut self.others {
                if listen.child.is_none() || listen.stopped().is_some() {
                    *listen = Listener::start(user, None, out.clone());
                }
            }
        }
    }

    /// Takes the other devices online or offline (`kill -9`, counted) for a round.
    fn others_online(&mut self, online: bool) {
        self.others_online = online;
        if !online {
            let mut killed = 0;
            for (_, listen, _) in &mut self.others {
                killed += usize::from(listen.kill9());
            }
            for _ in 0..killed {
                self.note("kill -9 another device's listen".into());
            }
        }
        self.tend();
    }

    /// Tends the processes for `duration`.
    fn watch(&mut self, duration: Duration) {
        let until = Instant::now() + duration;
        loop {
            self.tend();
            if Instant::now() >= until {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `tidings history --json` of a device: its received and sent messages.
fn history(user: &User) -> Vec<serde_json::Value> {
    user.ok(&["--json", "history"])
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The ids a device has shown, from its own store.
fn shown(user: &User) -> BTreeSet<String> {
    history(user)
        .into_iter()
        .filter(|m| m["type"] == "received" && m["shown"] == true)
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect()
}

/// How many times each id was displayed by the `listen`s whose output is in `out`.
fn displayed(out: &Path) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["type"] == "message" {
            if let Some(id) = event["id"].as_str() {
                *counts.entry(id.to_string()).or_insert(0) += 1;
            }
        }
    }
    counts
}

/// Issue 30: the crash test.
#[test]
fn kills_at_every_durability_point_lose_nothing_and_double_nothing() {
    let seed = std::env::var("TIDINGS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("crash test seed: {seed} (TIDINGS_CRASH_SEED={seed} draws the same again)");
    let outputs = TempDir::new("crash");

    let kannel = Kannel::start();
    // A short acknowledgement window (a client's acknowledgement, decrypted and committed first,
    // takes longer than that often enough), so that held copies are both decided and stored
    // within the run.
    let mut server = Server::start(&["--ack-window-ms", "30"]);
    let (alice_number, bob_number, carol_number) = (number(), number(), number());
    // The sender: one device sending (SMS fallback through Kannel, a short receipt wait so that
    // unanswered messages are withdrawn and go as SMS within the run) and one of its own,
    // offline until the drain.
    let alice = User::register(&alice_number, &server, &[]);
    let mut settings = kannel.settings_args();
    settings.extend(["--route", "auto", "--receipt-timeout", "2"].map(String::from));
    alice.ok(&settings.iter().map(String::as_str).collect::<Vec<_>>());
    let alice_other = alice.link_device(&server);
    // A receiver with one device online (to everyone) and one offline until the drain, and one
    // who is never online to the sender: its messages go as SMS.
    let bob = User::register(&bob_number, &server, &[]);
    bob.ok(&["settings", "--presence", "everyone"]);
    let bob_other = bob.link_device(&server);
    // Online to everyone too: a message is pushed from memory only when every device of the
    // receiver it goes to shows itself online to the sender.
    bob_other.ok(&["settings", "--presence", "everyone"]);
    let carol = User::register(&carol_number, &server, &[]);
    // Bob writes to Alice first: her messages to him are then a contact's, which deliver first
    // pushes from memory when every device they go to is online.
    let (answer, code) = bob.send(&alice_number, ACQUAINTED, &[]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec![ACQUAINTED]);

    let outputs_of = |name: &str| outputs.path().join(format!("{name}.out"));
    let mut fleet = Fleet {
        server: &mut server,
        alice: &alice,
        bob: &bob,
        alice_listen: Listener { child: None },
        bob_listen: Listener { child: None },
        sender_listens: true,
        others: vec![
            (
                &bob_other,
                Listener { child: None },
                outputs_of("bob-other"),
            ),
            (
                &alice_other,
                Listener { child: None },
                outputs_of("alice-other"),
            ),
        ],
        others_online: false,
        server_points: Rotation::new(&["server-", "store-"]),
        receiver_points: Rotation::new(&["client-received-", "client-ack-"]),
        sender_points: Rotation::new(&["client-outgoing-", "client-send-"]),
        draws: Draws(seed),
        kills: 0,
        log: Vec::new(),
        round: 0,
        started: Instant::now(),
        alice_out: outputs_of("alice"),
        bob_out: outputs_of("bob"),
    };
    // The server runs armed from here on, and so does the receiver's listen.
    fleet.server.kill9();
    fleet.tend();
    let sends_out = outputs_of("sends");
    let ip_sends_out = outputs_of("ip-sends");
    while !fleet.goal_reached() && fleet.started.elapsed() < ROUNDS_BUDGET {
        fleet.round += 1;
        let round = fleet.round;
        fleet.others_online(round.is_multiple_of(2));
        // 1. The sender's listen stops dead, wherever it is (see the module's documentation).
        fleet.sender_listens = false;
        if fleet.alice_listen.kill9() {
            fleet.note("kill -9 the sender's listen".into());
        }
        // 2. The round's one-shot sends, at once: to the receiver that is online, queued for
        // all its devices and sent as SMS if not delivered within 3 s (a `NOW_OR_NEVER` copy,
        // as the `auto` route sends, is kept only a minute for a device offline), and to the one
        // that is never online to the sender (`auto`: as SMS). One of them, or neither, runs
        // armed; one not armed may be killed at a random moment.
        let routes = [
            ["--route", "queue-then-sms", "--fallback-after", "3s"],
            ["--route", "auto", "--ttl", "0"],
        ];
        let mut sends = Vec::new();
        let armed_send = fleet.draws.below(3);
        for (k, (to, route)) in [&bob_number, &carol_number]
            .into_iter()
            .zip(routes)
            .enumerate()
        {
            let body = format!("crash {seed} round {round} message {k}");
            let armed =
                (k as u64 == armed_send).then(|| fleet.sender_points.arm(&mut fleet.draws, 1));
            let mut args = vec!["--json", "send", to.as_str(), body.as_str(), "--wait", "0"];
            args.extend(route);
            sends.push((
                spawn_client(&alice, &args, armed.as_deref(), &sends_out),
                armed,
            ));
        }
        // And one over IP only, with two other processes on the same profile at once: answered
        // `accepted` or `queued` only once every copy is durable (settled), and until then kept
        // in the profile and sent again by the sender's listen.
        let body = format!("crash {seed} round {round} over ip only");
        let args = [
            "--json",
            "send",
            &bob_number,
            &body,
            "--route",
            "ip-only",
            "--wait",
            "2",
        ];
        sends.push((spawn_client(&alice, &args, None, &ip_sends_out), None));
        let kill_at =
            (fleet.draws.below(3) == 0).then(|| Instant::now() + fleet.draws.millis(0, 600));
        let deadline = Instant::now() + patience();
        while !sends.is_empty() {
            assert!(
                Instant::now() < deadline,
                "a send did not end (seed {seed})"
            );
            if kill_at.is_some_and(|at| Instant::now() >= at) {
                let unarmed = sends.iter().filter(|(_, armed)| armed.is_none()).count();
                let victim = fleet.draws.below(unarmed as u64) as usize;
                if let Some((send, _)) = sends
                    .iter_mut()
                    .filter(|(_, armed)| armed.is_none())
                    .nth(victim)
                {
                    let _ = send.kill();
                }
            }
            let mut running = Vec::new();
            for (mut send, armed) in sends {
                match send.try_wait().expect("try_wait") {
                    None => running.push((send, armed)),
                    Some(status) if status.signal() == Some(ABORTED) => {
                        let at = fleet.sender_points.current();
                        fleet.note(format!("send stopped at {at}"));
                        fleet.sender_points.fired();
                    }
                    Some(status) if status.signal() == Some(9) => {
                        fleet.note("kill -9 a send".into());
                    }
                    Some(_) => {}
                }
            }
            sends = running;
            fleet.watch(Duration::from_millis(20));
        }
        // 3. The sender's listen carries the round's messages on, after a moment in which the
        // receiver may have taken them (a listen that finds a message unanswered withdraws it).
        let wait = fleet.draws.millis(0, 1000);
        fleet.watch(wait);
        fleet.sender_listens = true;
        fleet.tend();
        // 4. A random victim at a random moment.
        let wait = fleet.draws.millis(50, 500);
        fleet.watch(wait);
        let killed = match fleet.draws.below(5) {
            0 if server_stopped(fleet.server).is_none() => {
                fleet.server.kill9();
                Some("the server")
            }
            1 if fleet.bob_listen.kill9() => Some("the receiver's listen"),
            2 if fleet.alice_listen.kill9() => Some("the sender's listen"),
            _ => None,
        };
        if let Some(what) = killed {
            fleet.note(format!("kill -9 {what}"));
        }
        let wait = fleet.draws.millis(100, 300);
        fleet.watch(wait);
    }
    let story = format!(
        "seed {seed}, {} rounds, {} kills in {:.0?}:\n{}",
        fleet.round,
        fleet.kills,
        fleet.started.elapsed(),
        fleet.log.join("\n")
    );
    eprintln!("{story}");
    // Checked after the invariants, so that a failing run says everything it found.
    let mut failures = Vec::new();
    if fleet.kills < KILLS {
        failures.push(format!("only {} kills, fewer than {KILLS}", fleet.kills));
    }
    for rotation in [
        &fleet.server_points,
        &fleet.receiver_points,
        &fleet.sender_points,
    ] {
        if !rotation.missing().is_empty() {
            failures.push(format!(
                "failpoints never reached: {:?}",
                rotation.missing()
            ));
        }
    }
    let (alice_out, bob_out) = (fleet.alice_out.clone(), fleet.bob_out.clone());
    drop(fleet);

    // The drain: nothing armed any more; every process runs until the sender's routes are all
    // finished and every device has taken what is meant for it.
    server.kill9();
    server.failpoint = None;
    server.try_spawn().expect("server starts");
    let _alice_listen = Listener::start(&alice, None, alice_out.clone());
    let _bob_listen = Listener::start(&bob, None, bob_out.clone());
    let sent = |user: &User| -> Vec<serde_json::Value> {
        history(user)
            .into_iter()
            .filter(|m| m["type"] == "sent")
            .collect()
    };
    let finished = eventually(2 * patience(), || {
        sent(&alice).iter().all(|m| m["done"] == true)
    });
    let accepted = sent(&alice);
    assert!(
        finished,
        "routes still unfinished after the drain: {:?}\n{story}",
        accepted
            .iter()
            .filter(|m| m["done"] != true)
            .map(|m| (m["text"].clone(), m["phase"].clone()))
            .collect::<Vec<_>>()
    );
    let outcome_of = |m: &serde_json::Value| m["outcome"].as_str().unwrap_or_default().to_string();
    let id_of = |m: &serde_json::Value| m["id"].as_str().unwrap_or_default().to_string();
    // Over IP: a routed message delivered, or an IP-only one settled (its client keeps it
    // until the server settles it, and it ends with the server's answer).
    let went_over_ip = |m: &serde_json::Value| {
        let ip_only = m["text"]
            .as_str()
            .is_some_and(|t| t.ends_with("over ip only"));
        match outcome_of(m).as_str() {
            "delivered" => true,
            "accepted" | "queued" => ip_only,
            _ => false,
        }
    };
    let over_ip: BTreeSet<String> = accepted
        .iter()
        .filter(|m| went_over_ip(m))
        .map(id_of)
        .collect();
    // The IP-only sends the server answered as taken: every device of the receiver and the
    // sender's other device must show them.
    let ip_only: BTreeSet<String> = std::fs::read_to_string(&ip_sends_out)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|answer| ["accepted", "queued"].contains(&outcome_of(answer).as_str()))
        .map(|answer| id_of(&answer))
        .collect();
    let over_ip: BTreeSet<String> = over_ip.union(&ip_only).cloned().collect();
    let to_bob_over_ip: BTreeSet<String> = accepted
        .iter()
        .filter(|m| went_over_ip(m) && m["to"] == bob_number.as_str())
        .map(id_of)
        .chain(ip_only.iter().cloned())
        .collect();
    let other_outs: Vec<PathBuf> = ["bob-other", "alice-other", "carol"]
        .iter()
        .map(|name| outputs.path().join(format!("{name}.out")))
        .collect();
    let drains = [&bob_other, &alice_other, &carol]
        .iter()
        .zip(&other_outs)
        .map(|(user, out)| Listener::start(user, None, out.clone()))
        .collect::<Vec<_>>();
    // Every device that should show a message delivered over IP has shown it...
    for (name, user, expected) in [
        ("the receiver's online device", &bob, &to_bob_over_ip),
        ("the receiver's offline device", &bob_other, &to_bob_over_ip),
        ("the sender's other device", &alice_other, &over_ip),
    ] {
        let all = eventually(patience(), || shown(user).is_superset(expected));
        assert!(
            all,
            "messages delivered over IP not shown on {name}: {:?}\n{story}",
            accepted
                .iter()
                .filter(|m| expected.contains(&id_of(m)) && !shown(user).contains(&id_of(m)))
                .map(|m| m["text"].clone())
                .collect::<Vec<_>>()
        );
    }
    // ...and a moment more, for anything that should not come.
    std::thread::sleep(Duration::from_secs(QUIET));
    drop(drains);

    let accepted_ids: BTreeSet<String> = accepted.iter().map(id_of).collect();
    let bodies: BTreeMap<String, &serde_json::Value> =
        accepted.iter().map(|m| (id_of(m), m)).collect();
    // Never both: a message that went as SMS (or was not sent) is shown by no receiver device;
    // nothing shown was not accepted; nothing displayed twice.
    for (name, user, out) in [
        ("the receiver's online device", &bob, bob_out.clone()),
        (
            "the receiver's offline device",
            &bob_other,
            other_outs[0].clone(),
        ),
        (
            "the sender's other device",
            &alice_other,
            other_outs[1].clone(),
        ),
        ("the SMS receiver's device", &carol, other_outs[2].clone()),
    ] {
        let texts: BTreeMap<String, String> = history(user)
            .into_iter()
            .map(|m| {
                (
                    id_of(&m),
                    m["text"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        for id in shown(user) {
            match bodies.get(&id) {
                // An IP-only send goes before it is answered: one whose process was stopped
                // after it left is delivered, though its sender never learned of it.
                None if texts.get(&id).is_some_and(|t| t.ends_with("over ip only")) => {}
                None if texts.get(&id).is_some_and(|t| t == ACQUAINTED) => {}
                None => failures.push(format!(
                    "{name} shows {id}, which the sender never accepted"
                )),
                Some(m) if !went_over_ip(m) && m["to"] == user.number.as_str() => {
                    failures.push(format!(
                        "{name} shows {} ({}), which ended {}",
                        m["text"],
                        id,
                        outcome_of(m)
                    ))
                }
                Some(_) => {}
            }
        }
        for (id, times) in displayed(&out) {
            if times > 1 {
                failures.push(format!("{name} displayed {id} {times} times"));
            }
        }
    }
    // Over IP or as SMS: the SMSC saw exactly the messages that ended as SMS.
    let mut duplicate_sms = Vec::new();
    for m in &accepted {
        let to = m["to"].as_str().unwrap_or_default();
        let body = m["text"].as_str().unwrap_or_default().as_bytes().to_vec();
        let sms = kannel
            .messages_to(to)
            .into_iter()
            .filter(|(_, data, _)| *data == body)
            .count();
        match (outcome_of(m).as_str(), sms) {
            ("sent_as_sms", 1) => {}
            (_, 0) if went_over_ip(m) => {}
            // An IP-only message its client ended as not sent (refused with nothing stored, or
            // copies it could not make after the server named devices it lacked): nothing went,
            // and above no receiver device shows it.
            (_, 0)
                if m["text"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("over ip only")) => {}
            // `Outgoing::resume`: a stop exactly while the SMS was with the transport sends it
            // again; never lost, and never beside an IP copy.
            ("sent_as_sms", n) if n > 1 => duplicate_sms.push(text(&body)),
            (outcome, n) => failures.push(format!(
                "{} ended {outcome} and went as SMS {n} times",
                m["text"]
            )),
        }
    }
    let sms_texts: BTreeSet<Vec<u8>> = [&bob_number, &carol_number]
        .iter()
        .flat_map(|to| kannel.messages_to(to))
        .map(|(_, data, _)| data)
        .collect();
    for data in sms_texts {
        if !accepted
            .iter()
            .any(|m| m["text"].as_str().map(str::as_bytes) == Some(&data))
        {
            failures.push(format!(
                "an SMS went for a message never accepted: {}",
                text(&data)
            ));
        }
    }
    eprintln!(
        "{} routed messages accepted and {} over IP only: {} over IP, {} as SMS ({} SMS sent twice after a stop during the SMS step)",
        accepted_ids.len(),
        ip_only.len(),
        over_ip.len(),
        accepted.iter().filter(|m| outcome_of(m) == "sent_as_sms").count(),
        duplicate_sms.len()
    );
    assert!(failures.is_empty(), "{}\n{story}", failures.join("\n"));
}

/// Issue 30: a message sent again under its id after it was settled (delivered, acknowledged,
/// shown), encrypted afresh as a resend after a restart makes it, is shown nowhere again: not on
/// the receiver's device, nor on the sender's other device. The server no longer holds the first
/// copy, so it is the receiving devices that drop a `(sender_device, id)` they have shown.
#[test]
fn a_resend_of_a_settled_message_is_shown_nowhere_again() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let alice_other = alice.link_device(&server);
    let bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    let id = MessageId([0x30; 16]);
    let send_once = |text: &str| {
        block_on(async {
            // Encrypted each time anew: a resend carries new ciphertexts under the same id.
            let send = client
                .prepare_send(&bob_number, text, id)
                .await
                .expect("encrypt");
            let mut session = client.session(false).await.expect("session");
            session.send(Kind::Send(send)).await.expect("send");
            let deadline = tokio::time::Instant::now() + patience();
            loop {
                match session.recv(deadline).await.expect("recv") {
                    Some(Kind::SendResult(result)) => break result.outcome,
                    Some(_) => continue,
                    None => panic!("no answer to the send"),
                }
            }
        })
    };
    assert_eq!(send_once("settled once"), SendOutcome::Queued as i32);
    assert_eq!(bob.receive_texts(1, PATIENCE), ["settled once"]);
    assert_eq!(alice_other.receive_texts(1, PATIENCE), ["settled once"]);
    // Settled: both devices showed it, and the server keeps nothing of it.
    let outcome = send_once("settled once");
    assert!(
        [SendOutcome::Queued as i32, SendOutcome::Accepted as i32].contains(&outcome),
        "{outcome}"
    );
    marker_comes_first(&alice, &bob, "after the resend");
    // The sender's other device got the marker after the resend too: it comes first.
    assert_eq!(alice_other.receive_texts(1, PATIENCE), ["after the resend"]);
    for user in [&bob, &alice_other] {
        let kept: Vec<serde_json::Value> = history(user)
            .into_iter()
            .filter(|m| m["id"] == id.to_text().as_str())
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
    }
}
