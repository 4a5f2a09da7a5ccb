//! What every integration test needs: a real `tidings server` process on a real port, real
//! `tidings` client commands against it, and scans of files for things that must not be there.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tidings");

/// `tidings server` listening on `listen`, with every path in `dir` and neither the caller's
/// config file nor its home: for checks of how the server starts, or refuses to.
pub fn isolated_server(dir: &TempDir, listen: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(["server", "--listen", listen])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--key-file")
        .arg(dir.path().join("server.key"))
        .arg("--outbox-dir")
        .arg(dir.path().join("outbox"))
        .env_remove("TIDINGS_CONFIG")
        .env("HOME", dir.path());
    command
}

/// Seconds a test waits at most for something that should happen. Generous, because the machine
/// may be loaded; a passing test does not wait it out, as every such wait ends when the awaited
/// thing happens (`listen --count`, `eventually`, `listen_until`).
pub const PATIENCE: u64 = 60;

/// Seconds a test watches for something that must not happen. Such a check comes after the
/// event it is ordered after was observed, so a slow machine cannot make it pass vacuously.
pub const QUIET: u64 = 2;

/// `PATIENCE` as a duration.
pub fn patience() -> Duration {
    Duration::from_secs(PATIENCE)
}

/// The passphrase every test profile is encrypted under (given as scripts give it).
pub const PASSPHRASE: &str = "correct horse battery staple";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("tidings-it-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // `TIDINGS_KEEP_TEMP=1` keeps every test directory (logs, profiles, stores) to look at
        // after a failure; each one's path is printed then.
        if std::env::var_os("TIDINGS_KEEP_TEMP").is_some() {
            eprintln!("kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on loopback, below the ephemeral range (32768 and up here), so that no
/// outgoing connection on this machine can take it between this check and the server's bind.
pub fn free_port() -> u16 {
    static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
    let base = 20_000 + (std::process::id() % 500) * 24;
    loop {
        let offset = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(base + offset % 12_000).unwrap_or(20_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The PostgreSQL server tests connect to, by a database they may create databases from.
pub fn postgres_url() -> String {
    std::env::var("TIDINGS_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// `url` naming the database `name` instead of its own.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |at| at + 3);
    let server = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    format!("{server}/{name}{query}")
}

/// The NATS server the multi-node tests use: `TIDINGS_TEST_NATS`, by default `nats-server` on
/// its default port (README.md, Tests).
pub fn nats_url() -> String {
    std::env::var("TIDINGS_TEST_NATS").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// A `nats-server` of a test's own on a free loopback port, for tests that stop and start it
/// (the machine's shared one serves every other test).
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    pub port: u16,
    flags: Vec<String>,
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts one with these further `nats-server` flags (such as `--user` and `--pass`).
    pub fn start_with(flags: &[&str]) -> Self {
        let mut nats = Self {
            child: None,
            port: free_port(),
            flags: flags.iter().map(|flag| flag.to_string()).collect(),
        };
        nats.resume();
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Stops it at once (`kill -9`).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on its port, and waits until it takes connections.
    pub fn resume(&mut self) {
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is needed for this test: see README.md (Tests)");
        self.child = Some(child);
        let port = self.port;
        assert!(
            eventually(patience(), || std::net::TcpStream::connect((
                "127.0.0.1",
                port
            ))
            .is_ok()),
            "nats-server did not start"
        );
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database of its own for one test, dropped (its sessions ended) with the value.
#[derive(Debug)]
pub struct TempDatabase {
    name: String,
    pub url: String,
}

impl TempDatabase {
    pub fn create() -> Self {
        static CREATED: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tidings_it_{}_{}",
            std::process::id(),
            CREATED.fetch_add(1, Ordering::Relaxed)
        );
        let statement =
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE); CREATE DATABASE {name}");
        block_on(async {
            let client = admin().await;
            for part in statement.split("; ") {
                client
                    .batch_execute(part)
                    .await
                    .expect("create a test database");
            }
        });
        let url = with_database(&postgres_url(), &name);
        Self { name, url }
    }

    /// Rows in `table` of the server's database.
    pub fn count(&self, table: &str) -> i64 {
        let url = self.url.clone();
        let query = format!("SELECT count(*) FROM {table}");
        block_on(async move {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect to the test database");
            tokio::spawn(connection);
            client
                .query_one(&query, &[])
                .await
                .expect("count rows")
                .get(0)
        })
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        block_on(async {
            let _ = admin().await.batch_execute(&statement).await;
        });
    }
}

/// A connection to the database named by `TIDINGS_TEST_POSTGRES`.
async fn admin() -> tokio_postgres::Client {
    match tokio_postgres::connect(&postgres_url(), tokio_postgres::NoTls).await {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            client
        }
        Err(e) => panic!(
            "PostgreSQL is needed for this test and is not reachable at {} ({e}); see README.md \
             (Tests) for how to install it, or set TIDINGS_TEST_POSTGRES",
            postgres_url()
        ),
    }
}

/// Whether this run's servers keep their data in PostgreSQL (`TIDINGS_TEST_ENGINE=postgres`)
/// rather than in the embedded engine: the same suite, run once per engine (scripts/test.sh).
pub fn on_postgres() -> bool {
    std::env::var("TIDINGS_TEST_ENGINE").is_ok_and(|engine| engine == "postgres")
}

/// The directories of PostgreSQL's data directory that hold what a server on `database` stored:
/// the database's own files (tables and indexes), the WAL every database writes through, and the
/// cluster-wide catalogs; the privacy scans read them on a PostgreSQL run. They must be readable by
/// the test (root, or the postgres user, on Debian).
pub fn postgres_dirs(database: &TempDatabase) -> Vec<PathBuf> {
    let (dir, oid): (String, u32) = block_on(async {
        let client = admin().await;
        let dir = client
            .query_one("SHOW data_directory", &[])
            .await
            .expect("PostgreSQL's data directory (the test's role must be a superuser)")
            .get(0);
        let oid = client
            .query_one(
                "SELECT oid FROM pg_database WHERE datname = $1",
                &[&database.name],
            )
            .await
            .expect("the test database's oid")
            .get(0);
        (dir, oid)
    });
    let dir = PathBuf::from(dir);
    assert!(
        std::fs::read_dir(dir.join("pg_wal")).is_ok(),
        "the privacy scans read PostgreSQL's files and cannot read {}: run the tests as root or \
         as the postgres user",
        dir.display()
    );
    vec![
        dir.join("base").join(oid.to_string()),
        dir.join("pg_wal"),
        dir.join("global"),
    ]
}

/// True, after saying so, when the run is on PostgreSQL and the calling test looks into the
/// embedded engine's own files (`why` says which): such a test then returns at once. Every test
/// runs on the embedded engine; the PostgreSQL pass lists the ones it leaves out this way.
pub fn embedded_only(why: &str) -> bool {
    if on_postgres() {
        eprintln!("embedded engine only: {why}");
    }
    on_postgres()
}

/// A running `tidings server`.
#[derive(Debug)]
pub struct Server {
    pub child: Option<Child>,
    pub dir: TempDir,
    pub port: u16,
    /// The port of the operator's metrics address, apart from the public port.
    pub metrics_port: u16,
    pub url: String,
    pub extra: Vec<String>,
    pub scheme: &'static str,
    /// The failpoint (`tidings_core::failpoint`) the next start arms, if any.
    pub failpoint: Option<String>,
    /// The server's own database when the run is on PostgreSQL ([`on_postgres`]) and the test
    /// named no store itself; dropped with the server.
    pub database: Option<TempDatabase>,
}

impl Server {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    /// Every directory whose files hold what this server keeps: its data directory, and on a
    /// PostgreSQL run PostgreSQL's data directory and WAL as well.
    pub fn stored_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.data_dir()];
        if let Some(database) = &self.database {
            dirs.extend(postgres_dirs(database));
        }
        dirs
    }
    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("keys/server.key")
    }
    pub fn outbox(&self) -> PathBuf {
        self.dir.path().join("outbox")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }
    /// What the server printed on stdout after its listening line.
    pub fn stdout_file(&self) -> PathBuf {
        self.dir.path().join("server.out")
    }
    pub fn sync_trace(&self) -> PathBuf {
        self.dir.path().join("sync.trace")
    }

    /// Starts a server with a short heartbeat and scrub interval, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let mut server = Self {
            child: None,
            dir: TempDir::new("server"),
            port: free_port(),
            metrics_port: free_port(),
            url: String::new(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            scheme: if extra.contains(&"--tls-cert") {
                "https"
            } else {
                "http"
            },
            failpoint: None,
            database: (on_postgres() && !extra.contains(&"--store")).then(TempDatabase::create),
        };
        server.url = format!("{}://127.0.0.1:{}", server.scheme, server.port);
        server.spawn();
        server
    }

    /// Starts a node of a deployment over the database `store` and the NATS subjects under
    /// `bus_prefix`, with the key file of `keys_from` (every node holds the same keys), plus
    /// `extra` flags.
    pub fn start_node(
        store: &TempDatabase,
        bus_prefix: &str,
        keys_from: Option<&Server>,
        extra: &[&str],
    ) -> Self {
        Self::start_node_on(&nats_url(), store, bus_prefix, keys_from, extra)
    }

    /// [`Server::start_node`] with the NATS server at `nats`.
    pub fn start_node_on(
        nats: &str,
        store: &TempDatabase,
        bus_prefix: &str,
        keys_from: Option<&Server>,
        extra: &[&str],
    ) -> Self {
        let mut flags = vec![
            "--store",
            store.url.as_str(),
            "--bus",
            nats,
            "--bus-prefix",
            bus_prefix,
        ];
        flags.extend_from_slice(extra);
        let mut server = Self {
            child: None,
            dir: TempDir::new("node"),
            port: free_port(),
            metrics_port: free_port(),
            url: String::new(),
            extra: flags.iter().map(|s| s.to_string()).collect(),
            scheme: "http",
            failpoint: None,
            database: None,
        };
        server.url = format!("http://127.0.0.1:{}", server.port);
        if let Some(first) = keys_from {
            std::fs::create_dir_all(server.key_file().parent().expect("keys dir"))
                .expect("keys dir");
            std::fs::copy(first.key_file(), server.key_file()).expect("copy the key file");
            // And the key chain that seals waiting copies in PostgreSQL, beside it.
            let chain = first.key_file().with_extension("chain");
            if chain.exists() {
                std::fs::copy(&chain, server.key_file().with_extension("chain"))
                    .expect("copy the key chain file");
            }
        }
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        if let Err(line) = self.try_spawn() {
            panic!("server did not start: {line:?}\n{}", self.log());
        }
    }

    /// Starts the server process; `Err` with what it printed if it stopped before listening
    /// (an armed failpoint may stop it that early).
    pub fn try_spawn(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .expect("log file");
        let mut command = Command::new(BIN);
        command
            .args(["server", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--key-file")
            .arg(self.key_file())
            .arg("--outbox-dir")
            .arg(self.outbox())
            .arg("--sync-trace")
            .arg(self.sync_trace())
            .args(["--scrub-interval-ms", "200", "--log", "debug"])
            // On the PostgreSQL pass every server is a node with a bus of its own subjects too:
            // the suite runs over PostgreSQL and NATS.
            .args(self.database.iter().flat_map(|db| {
                [
                    "--store".to_string(),
                    db.url.clone(),
                    "--bus".to_string(),
                    nats_url(),
                    "--bus-prefix".to_string(),
                    db.name.clone(),
                ]
            }))
            .args(&self.extra)
            .env_remove("TIDINGS_CONFIG")
            // Each test server has a metrics address of its own, so that they can run at once.
            .env(
                "TIDINGS_METRICS_LISTEN",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .env("HOME", self.dir.path())
            .env_remove(tidings_core::failpoint::VARIABLE)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(name) = &self.failpoint {
            command.env(tidings_core::failpoint::VARIABLE, name);
        }
        let mut child = command.spawn().expect("start tidings server");
        let stdout = child.stdout.take().expect("stdout");
        let mut stdout = BufReader::new(stdout);
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read listening line");
        if !line.contains("listening on") {
            let _ = child.kill();
            let _ = child.wait();
            return Err(line);
        }
        // The rest of stdout goes to a file, kept as the log is (and the server never writes to
        // a closed pipe).
        let mut rest = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stdout_file())
            .expect("stdout file");
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut rest));
        self.child = Some(child);
        Ok(())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9`, no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM; returns whether it exited successfully within `PATIENCE`.
    pub fn sigterm(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        signal(child.id(), "TERM");
        let deadline = Instant::now() + patience();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same port with the same directories.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// The newest code the outbox holds for `number`.
    pub fn code_for(&self, number: &str) -> String {
        let mut newest: Option<(String, String)> = None;
        for entry in std::fs::read_dir(self.outbox()).expect("outbox") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if name.starts_with('.') {
                continue;
            }
            let sms: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("sms")).expect("json");
            if sms["to"] == number && newest.as_ref().is_none_or(|(n, _)| *n < name) {
                let text = sms["text"].as_str().expect("text");
                let code: String = text.chars().filter(char::is_ascii_digit).take(6).collect();
                newest = Some((name, code));
            }
        }
        newest.expect("no SMS for that number in the outbox").1
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal with kill(1).
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// A user: a profile directory and a number.
#[derive(Debug)]
pub struct User {
    pub profile: TempDir,
    pub number: String,
}

impl User {
    pub fn new(number: &str) -> Self {
        Self {
            profile: TempDir::new("profile"),
            number: number.into(),
        }
    }

    /// Runs `tidings --profile <dir> <args>`.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--profile")
            .arg(self.profile.path())
            .args(args)
            .env_remove("TIDINGS_SERVER")
            .env("TIDINGS_PASSPHRASE", PASSPHRASE)
            .output()
            .expect("run tidings")
    }

    /// Runs a command that must succeed, returning its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tidings {args:?} failed: {}\n{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// Starts a long-running command such as `listen`.
    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new(BIN)
            .arg("--profile")
            .arg(self.profile.path())
            .args(args)
            .env("TIDINGS_PASSPHRASE", PASSPHRASE)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidings")
    }

    /// Registers and verifies on `server`, reading the code from its outbox.
    pub fn register(number: &str, server: &Server, trust: &[&str]) -> Self {
        Self::register_via(number, server, &server.url, trust)
    }

    /// `register`, with the profile reaching `server` at `url` (a relay in front of it).
    pub fn register_via(number: &str, server: &Server, url: &str, trust: &[&str]) -> Self {
        let user = Self::new(number);
        let mut args = vec!["register", number, "--server", url];
        args.extend_from_slice(trust);
        user.ok(&args);
        let code = server.code_for(number);
        user.ok(&["verify", &code]);
        user
    }

    /// `tidings lookup --json` as a list of (number, presence).
    pub fn lookup(&self, numbers: &[&str]) -> Vec<(String, String)> {
        let mut args = vec!["--json", "lookup"];
        args.extend_from_slice(numbers);
        self.ok(&args)
            .lines()
            .map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).expect("json line");
                (
                    v["number"].as_str().unwrap_or_default().to_string(),
                    v["presence"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// `tidings send --json`, returning the parsed answer and the exit code.
    pub fn send(&self, to: &str, text_: &str, extra: &[&str]) -> (serde_json::Value, i32) {
        let mut args = vec!["--json", "send", to, text_];
        args.extend_from_slice(extra);
        let out = self.run(&args);
        let value =
            serde_json::from_str(text(&out.stdout).trim()).unwrap_or(serde_json::Value::Null);
        (value, out.status.code().unwrap_or(-1))
    }

    /// `tidings listen --json` until `count` messages or `timeout` seconds; every event line
    /// (messages, rejections, receipts) of the run.
    pub fn listen_events(&self, count: usize, timeout: u64) -> Vec<serde_json::Value> {
        let out = self.run(&[
            "--json",
            "listen",
            "--count",
            &count.to_string(),
            "--timeout",
            &timeout.to_string(),
        ]);
        assert!(out.status.success(), "listen failed: {}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .collect()
    }

    /// `tidings listen --json` until `count` messages or `timeout` seconds; the messages. To
    /// wait for messages that should come, give `PATIENCE` and the number expected: the run
    /// ends as soon as they are shown. To check that nothing comes, give a short timeout, after
    /// the event the check is ordered after was observed.
    pub fn receive(&self, count: usize, timeout: u64) -> Vec<serde_json::Value> {
        self.listen_events(count, timeout)
            .into_iter()
            .filter(|v| v["type"] == "message")
            .collect()
    }

    /// `tidings listen --json` until the events seen so far satisfy `done` (then it is stopped)
    /// or `PATIENCE` passes; every event line seen. For what `--count` cannot wait for:
    /// receipts, routing outcomes and rejections.
    pub fn listen_until(
        &self,
        mut done: impl FnMut(&[serde_json::Value]) -> bool,
    ) -> Vec<serde_json::Value> {
        let mut listener =
            self.spawn(&["--json", "listen", "--timeout", &(2 * PATIENCE).to_string()]);
        let stdout = listener.stdout.take().expect("stdout");
        let (lines, seen) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(PATIENCE);
        let mut events = Vec::new();
        while !done(&events) {
            let left = deadline.saturating_duration_since(Instant::now());
            match seen.recv_timeout(left) {
                Ok(line) => events.extend(serde_json::from_str::<serde_json::Value>(&line).ok()),
                Err(_) => break,
            }
        }
        let _ = listener.kill();
        let _ = listener.wait();
        let _ = reader.join();
        events.extend(
            seen.try_iter()
                .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok()),
        );
        events
    }

    /// The texts `receive` returns, sorted.
    pub fn receive_texts(&self, count: usize, timeout: u64) -> Vec<String> {
        let mut texts: Vec<String> = self
            .receive(count, timeout)
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        texts.sort();
        texts
    }

    /// The client library on this user's profile, unlocked with the test passphrase.
    pub fn client(&self) -> tidings_client::client::Client {
        tidings_client::client::Client::open(tidings_client::profile::Profile::at(
            self.profile.path(),
        ))
        .expect("open client")
        .with_passphrase(tidings_client::vault::Passphrase::new(PASSPHRASE))
    }

    /// Adds a device to this user's number: `tidings link` here shows a code, `tidings link
    /// <number> <code>` on a new profile joins with it. Returns the new device's user.
    pub fn link_device(&self, server: &Server) -> Self {
        self.link_device_via(&server.url)
    }

    /// `link_device`, with the new device's profile reaching the server at `url`.
    pub fn link_device_via(&self, url: &str) -> Self {
        let mut approver = self.spawn(&["--json", "link", "--wait", &PATIENCE.to_string()]);
        let stdout = approver.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("a line").expect("read");
        let shown: serde_json::Value = serde_json::from_str(&first).expect("json");
        let code = shown["code"].as_str().expect("a link code").to_string();
        let device = Self::new(&self.number);
        device.ok(&["link", &self.number, &code, "--server", url]);
        let done = lines.next().expect("a second line").expect("read");
        assert!(done.contains("linked"), "{done}");
        let _ = approver.wait();
        device
    }

    /// A lookup of `other` and a send to it both stop with "the server's discovery key changed"
    /// and the advice to repin: the key this profile pinned is not the one the server uses.
    pub fn says_the_key_changed(&self, other: &str) {
        for args in [
            vec!["lookup", other],
            vec!["send", other, "hello", "--route", "ip-only"],
        ] {
            let out = self.run(&args);
            assert!(!out.status.success(), "{args:?} went through");
            let said = text(&out.stderr);
            assert!(
                said.contains("the server's discovery key changed")
                    && said.contains("tidings repin"),
                "{args:?}: {said}"
            );
        }
    }

    /// This user's device id, from `tidings devices`.
    pub fn device_id(&self) -> String {
        self.ok(&["--json", "devices"])
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["this_device"] == true)
            .and_then(|v| v["device_id"].as_str().map(str::to_string))
            .expect("this device in the list")
    }
}

/// Sends `marker` from `sender` to `receiver` over IP and checks that it is the first thing
/// `receiver`'s next listen shows or rejects. Messages are delivered in the order they were
/// queued, so a check that something queued earlier is never shown (withdrawn, expired,
/// refused, a replaced device's queue) cannot pass merely because a slow listen saw nothing.
pub fn marker_comes_first(sender: &User, receiver: &User, marker: &str) {
    let (answer, code) = sender.send(&receiver.number, marker, &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    let shown: Vec<serde_json::Value> = receiver
        .listen_events(1, PATIENCE)
        .into_iter()
        .filter(|e| e["type"] == "message" || e["type"] == "rejected")
        .collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["text"], marker, "{shown:?}");
    assert!(
        receiver.receive(1, QUIET).is_empty(),
        "more came after the marker"
    );
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Every file below `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    files_below(dir)
        .into_iter()
        .filter(|path| {
            std::fs::read(path).is_ok_and(|bytes| memchr::memmem::find(&bytes, needle).is_some())
        })
        .collect()
}

/// Every file below `dir`, recursively, sorted.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            files.extend(files_below(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

/// The pseudonym of `number` computed from the server's key file, as its operator could: for
/// tests that name accounts without spending any device's lookup budget.
pub fn server_pseudonym(server: &Server, number: &str) -> Vec<u8> {
    let keys = tidings_server::keys::ServerKeys::load_or_create(&server.key_file()).expect("keys");
    let number = tidings_proto::number::E164::parse(number).expect("a number");
    keys.pseudonym(&number).expect("a pseudonym").0.to_vec()
}

/// The pseudonym that names `number`'s account, as `client` derives it (blinded, then learned:
/// a number asked for again costs nothing).
pub async fn account_of(
    client: &tidings_client::client::Client,
    session: &mut tidings_client::session::Session,
    number: &str,
) -> Vec<u8> {
    client
        .account()
        .pseudonym(session, number)
        .await
        .expect("the number's pseudonym")
        .to_vec()
}

/// Polls `condition` every 50 ms for up to `limit`.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// Runs a future on a fresh runtime (tests mix blocking CLI calls and async library calls).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

/// Distinct valid German mobile numbers, one per call in a test binary.
pub fn number() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!(
        "+49151{:08}",
        10_000_000 + std::process::id() % 1000 * 10_000 + n
    )
}

/// Waits for a spawned command to exit (killing it after `limit`) and returns stdout + stderr.
pub fn wait_output(child: &mut Child, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut stdout, &mut out);
    }
    if let Some(mut stderr) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut stderr, &mut out);
    }
    out
}

/// A real Kannel on loopback: bearerbox, smsbox, and the test SMSC `fakesmsc` that records
/// every SMS it is handed.
#[derive(Debug)]
pub struct Kannel {
    pub dir: TempDir,
    pub sendsms_url: String,
    smsc_port: u16,
    bearerbox: Option<Child>,
    smsbox: Option<Child>,
    fakesmsc: Option<Child>,
    config: PathBuf,
}

/// One SMS part as fakesmsc printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmsPart {
    pub from: String,
    pub to: String,
    /// `text`, `ucs-2` or `data`.
    pub kind: String,
    pub udh: Vec<u8>,
    pub data: Vec<u8>,
}

fn url_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    out
}

pub const KANNEL_USER: &str = "tidings";
pub const KANNEL_PASSWORD: &str = "kannel-test-pw";

/// Kannel's default service: a reply, which no test asks for.
const NO_SERVICE: &str = "text = \"No service\"";

impl Kannel {
    pub fn start() -> Self {
        Self::start_with_service(NO_SERVICE)
    }

    /// A Kannel whose SMS from phones (fakesmsc's MO) are passed to `get_url` (Kannel's escapes
    /// such as `%p` for the sender), with no reply SMS.
    pub fn start_with_inbound(get_url: &str) -> Self {
        Self::start_with_service(&format!("get-url = \"{get_url}\"\nmax-messages = 0"))
    }

    fn start_with_service(service: &str) -> Self {
        let dir = TempDir::new("kannel");
        let (admin, smsbox_port, smsc, sendsms) =
            (free_port(), free_port(), free_port(), free_port());
        let config = dir.path().join("kannel.conf");
        let text = format!(
            "group = core\nadmin-port = {admin}\nadmin-password = admin-pw\nadmin-interface = 127.0.0.1\n\
             admin-allow-ip = 127.0.0.1\nsmsbox-port = {smsbox_port}\nsmsbox-interface = 127.0.0.1\n\
             box-allow-ip = 127.0.0.1\nlog-file = {dir}/bearerbox.log\nlog-level = 1\n\n\
             group = smsc\nsmsc = fake\nsmsc-id = fake\nport = {smsc}\nconnect-allow-ip = 127.0.0.1\n\n\
             group = smsbox\nbearerbox-host = 127.0.0.1\nbearerbox-port = {smsbox_port}\n\
             sendsms-port = {sendsms}\nsendsms-interface = 127.0.0.1\nlog-file = {dir}/smsbox.log\nlog-level = 1\n\n\
             group = sendsms-user\nusername = {KANNEL_USER}\npassword = {KANNEL_PASSWORD}\nmax-messages = 10\nconcatenation = true\n\n\
             group = sms-service\nkeyword = default\n{service}\ncatch-all = true\n",
            dir = dir.path().display()
        );
        std::fs::write(&config, text).expect("kannel config");
        let mut kannel = Self {
            sendsms_url: format!("http://127.0.0.1:{sendsms}"),
            smsc_port: smsc,
            dir,
            bearerbox: None,
            smsbox: None,
            fakesmsc: None,
            config,
        };
        kannel.bearerbox = Some(kannel.spawn("bearerbox", &[]));
        assert!(
            eventually(patience(), || std::net::TcpStream::connect((
                "127.0.0.1",
                smsbox_port
            ))
            .is_ok()),
            "bearerbox did not start: {}",
            kannel.log()
        );
        kannel.start_smsbox();
        let log =
            std::fs::File::create(kannel.dir.path().join("fakesmsc.out")).expect("fakesmsc log");
        let fakesmsc = Command::new("/usr/lib/kannel/test/fakesmsc")
            .args(["-H", "127.0.0.1", "-r", &smsc.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("fakesmsc (Debian package kannel-extras)");
        kannel.fakesmsc = Some(fakesmsc);
        kannel
    }

    fn spawn(&self, program: &str, _extra: &[&str]) -> Child {
        let log =
            std::fs::File::create(self.dir.path().join(format!("{program}.out"))).expect("log");
        Command::new(program)
            .arg(&self.config)
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("{program} (Debian package kannel): {e}"))
    }

    /// Starts (again) the HTTP side of Kannel.
    pub fn start_smsbox(&mut self) {
        self.smsbox = Some(self.spawn("smsbox", &[]));
        let port: u16 = self
            .sendsms_url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port");
        assert!(eventually(patience(), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        }));
    }

    /// Stops the HTTP side: sendsms requests are refused.
    pub fn stop_smsbox(&mut self) {
        if let Some(mut child) = self.smsbox.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The flags that point a profile's SMS fallback at this Kannel.
    pub fn settings_args(&self) -> Vec<String> {
        vec![
            "settings".into(),
            "--sms-kannel".into(),
            self.sendsms_url.clone(),
            "--sms-username".into(),
            KANNEL_USER.into(),
            "--sms-password".into(),
            KANNEL_PASSWORD.into(),
        ]
    }

    /// The flags that make a server send its codes through this Kannel.
    pub fn server_args(&self) -> Vec<String> {
        vec![
            "--sms-gateway".into(),
            "kannel".into(),
            "--kannel-url".into(),
            self.sendsms_url.clone(),
            "--kannel-username".into(),
            KANNEL_USER.into(),
            "--kannel-password".into(),
            KANNEL_PASSWORD.into(),
        ]
    }

    /// An SMS from a phone. Kannel's fake SMSC serves one client at a time, so the running
    /// fakesmsc is stopped and a new one sends the SMS and stays connected in its place; what
    /// Kannel hands any of them is read by [`Kannel::parts`].
    pub fn inject(&mut self, from: &str, to: &str, text: &str) {
        if let Some(mut running) = self.fakesmsc.take() {
            let _ = running.kill();
            let _ = running.wait();
        }
        static INJECTED: AtomicU32 = AtomicU32::new(0);
        let n = INJECTED.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.path().join(format!("fakesmsc-mo-{n}.out"));
        let log = std::fs::File::create(&path).expect("fakesmsc log");
        let port = self.smsc_port.to_string();
        let child = Command::new("/usr/lib/kannel/test/fakesmsc")
            .args(["-H", "127.0.0.1", "-r", &port, "-m", "1"])
            .arg(format!("{from} {to} text {text}"))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("fakesmsc (Debian package kannel-extras)");
        let sent = eventually(patience(), || {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .contains("sent message 1")
        });
        self.fakesmsc = Some(child);
        assert!(sent, "fakesmsc did not send the SMS: {}", self.log());
    }

    /// Every SMS part fakesmsc has received so far (on any of its connections).
    pub fn parts(&self) -> Vec<SmsPart> {
        let mut log = String::new();
        for entry in std::fs::read_dir(self.dir.path()).expect("kannel dir") {
            let path = entry.expect("entry").path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if name.starts_with("fakesmsc") {
                log.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
            }
        }
        log.lines()
            .filter_map(|line| {
                let body = line
                    .split_once("Got message ")?
                    .1
                    .split_once(": <")?
                    .1
                    .strip_suffix('>')?;
                let mut fields = body.splitn(4, ' ');
                let (from, to, kind, rest) = (
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                    fields.next()?,
                );
                let (kind, udh, data) = if kind == "udh" {
                    let (udh, rest) = rest.split_once(' ')?;
                    let (kind, data) = rest.split_once(' ')?;
                    (kind.to_string(), url_decode(udh), url_decode(data))
                } else if kind == "text" {
                    (kind.to_string(), Vec::new(), rest.as_bytes().to_vec())
                } else {
                    (kind.to_string(), Vec::new(), url_decode(rest))
                };
                Some(SmsPart {
                    from: from.into(),
                    to: to.into(),
                    kind,
                    udh,
                    data,
                })
            })
            .collect()
    }

    /// The whole messages (concatenated parts joined in order) sent to `to`, as raw user data.
    pub fn messages_to(&self, to: &str) -> Vec<(String, Vec<u8>, usize)> {
        let mut whole: Vec<(String, Vec<u8>, usize)> = Vec::new();
        let mut pending: std::collections::BTreeMap<u8, Vec<(u8, Vec<u8>, String)>> =
            Default::default();
        for part in self.parts().into_iter().filter(|p| p.to == to) {
            if part.udh.len() >= 6 && part.udh[1] == 0 {
                let (reference, total, sequence) = (part.udh[3], part.udh[4], part.udh[5]);
                let parts = pending.entry(reference).or_default();
                parts.push((sequence, part.data, part.from));
                if parts.len() == usize::from(total) {
                    parts.sort_by_key(|(sequence, _, _)| *sequence);
                    let from = parts[0].2.clone();
                    let data = parts.iter().flat_map(|(_, d, _)| d.clone()).collect();
                    whole.push((from, data, usize::from(total)));
                    pending.remove(&reference);
                }
            } else {
                whole.push((part.from, part.data, 1));
            }
        }
        whole
    }

    pub fn log(&self) -> String {
        ["bearerbox.out", "smsbox.out", "fakesmsc.out"]
            .iter()
            .map(|f| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Kannel {
    fn drop(&mut self) {
        for child in [
            self.fakesmsc.take(),
            self.smsbox.take(),
            self.bearerbox.take(),
        ]
        .into_iter()
        .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// UTF-16BE bytes of a text, as UCS-2 SMS carry it.
pub fn ucs2(text: &str) -> Vec<u8> {
    text.encode_utf16()
        .flat_map(|unit| unit.to_be_bytes())
        .collect()
}

/// A TCP relay in front of a server whose client-to-server direction can be cut: while cut, the
/// client's bytes are read and dropped, while the server's still reach the client. A client then
/// believes it sent something (an acknowledgement) that the server never got, the state a
/// client killed just after sending it is in.
#[derive(Debug)]
pub struct CuttableRelay {
    pub url: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CuttableRelay {
    pub fn start(server: &Server) -> Self {
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let accept_cut = cut.clone();
        let url = start_relay(server, move |client, upstream| {
            let cut = accept_cut.clone();
            relay(client, upstream, move |_| !cut.load(Ordering::SeqCst));
        });
        Self { url, cut }
    }

    /// Drops the client's bytes from now on (`true`) or passes them again (`false`).
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

/// What one client connection sent through a `CapturingRelay`.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// Every byte the client sent, in order.
    pub bytes: Vec<u8>,
    /// Whether the client's side has ended (nothing more can come).
    pub closed: bool,
}

/// A TCP relay in front of a server that keeps every byte each client connection sends to the
/// server, one capture per connection, in the order the connections were accepted.
#[derive(Debug, Clone)]
pub struct CapturingRelay {
    pub url: String,
    connections: std::sync::Arc<std::sync::Mutex<Vec<Captured>>>,
}

impl CapturingRelay {
    pub fn start(server: &Server) -> Self {
        let connections: std::sync::Arc<std::sync::Mutex<Vec<Captured>>> = Default::default();
        let accepted = connections.clone();
        let url = start_relay(server, move |client, upstream| {
            let connections = accepted.clone();
            let index = {
                let mut all = connections.lock().expect("captures");
                all.push(Captured::default());
                all.len() - 1
            };
            let record = connections.clone();
            relay(client, upstream, move |bytes| {
                record.lock().expect("captures")[index]
                    .bytes
                    .extend_from_slice(bytes);
                true
            });
            connections.lock().expect("captures")[index].closed = true;
        });
        Self { url, connections }
    }

    /// Every connection so far.
    pub fn connections(&self) -> Vec<Captured> {
        self.connections.lock().expect("captures").clone()
    }

    /// Whether every connection so far has ended on the client's side.
    pub fn all_closed(&self) -> bool {
        self.connections().iter().all(|c| c.closed)
    }
}

/// Listens on a free loopback port and, for each client, connects to `server` and runs
/// `client_to_server` on a thread of its own (the server's bytes go back unchanged). Returns the
/// URL to give clients. The relay lives as long as the test binary: each connection's threads
/// end when either side closes.
fn start_relay(
    server: &Server,
    client_to_server: impl Fn(std::net::TcpStream, std::net::TcpStream) + Send + Sync + 'static,
) -> String {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("relay bind");
    let port = listener.local_addr().expect("relay address").port();
    let upstream_port = server.port;
    let client_to_server = std::sync::Arc::new(client_to_server);
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", upstream_port)) else {
                continue;
            };
            let (Ok(client_read), Ok(upstream_read)) = (client.try_clone(), upstream.try_clone())
            else {
                continue;
            };
            let forward = client_to_server.clone();
            std::thread::spawn(move || forward(client_read, upstream));
            std::thread::spawn(move || relay(upstream_read, client, |_| true));
        }
    });
    format!("http://127.0.0.1:{port}")
}

/// Copies `from` to `to` until either side closes, passing on each read only if `pass` says so.
fn relay(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    mut pass: impl FnMut(&[u8]) -> bool,
) {
    use std::io::{Read as _, Write as _};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !pass(&buf[..n]) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

/// A `tidings listen --json` running in the background, its event lines read as they come.
pub struct Listener {
    child: Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Listener {
    pub fn start(user: &User) -> Self {
        let mut child = user.spawn(&["--json", "listen", "--timeout", &(4 * PATIENCE).to_string()]);
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    if tx.send(value).is_err() {
                        break;
                    }
                }
            }
        });
        Self { child, lines }
    }

    /// Waits for the first event that `wanted` accepts.
    pub fn wait_for(
        &self,
        mut wanted: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + patience();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(event) if wanted(&event) => return event,
                Ok(_) => {}
                Err(_) => panic!("the listener never showed the awaited event"),
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
