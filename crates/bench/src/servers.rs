//! The systems under test: each started by the harness on loopback with a configuration of its
//! own (templates in `crates/bench/peers/`), checked to listen on loopback only with a backlog of
//! at least 4096, and stopped by its process id.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::time::Instant;

use crate::sys;
use crate::wire::Target;

const TIDINGS_TEMPLATE: &str = include_str!("../peers/tidings-server.toml");
const MOSQUITTO_TEMPLATE: &str = include_str!("../peers/mosquitto.conf");
const EJABBERD_TEMPLATE: &str = include_str!("../peers/ejabberd.yml");
const NATS_TEMPLATE: &str = include_str!("../peers/nats.conf");

/// The listen backlog every listener must have.
pub const BACKLOG: u64 = 4096;
/// How long a server has to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server has to stop after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Tidings nodes in this invocation ([`Programs::tidings_nodes`]), for the workers' endpoints.
pub static TIDINGS_NODES: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
/// Whether both ends of a relay pair connect to one Tidings node (`--pairs-on-one-node`).
pub static PAIRS_ON_ONE_NODE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// The first of this invocation's ports (see [`choose_ports`]).
static PORT_BASE: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(17_430);

/// Picks a block of free loopback ports below the ephemeral range (so that no client connection
/// can take one first), different for concurrent invocations: none is a target's default port.
pub fn choose_ports() -> anyhow::Result<()> {
    let start = (std::process::id() % 1000) as u16;
    for k in 0..1000u16 {
        let base = 20_000 + ((start + k) % 1000) * 10;
        let free = Target::ALL
            .iter()
            .all(|t| !sys::port_in_use(SocketAddr::from(([127, 0, 0, 1], base + offset(*t)))));
        if free {
            PORT_BASE.store(base, std::sync::atomic::Ordering::Relaxed);
            return Ok(());
        }
    }
    bail!("no free block of loopback ports between 20000 and 30000")
}

fn offset(target: Target) -> u16 {
    match target {
        Target::Tidings => 1,
        Target::TidingsTls => 2,
        Target::Mosquitto => 3,
        Target::Ejabberd => 4,
        Target::Nats => 5,
    }
}

/// The loopback port a target listens on in this invocation.
pub fn port(target: Target) -> u16 {
    PORT_BASE.load(std::sync::atomic::Ordering::Relaxed) + offset(target)
}

pub fn addr(target: Target) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port(target)))
}

/// Programs the harness runs.
#[derive(Debug, Clone)]
pub struct Programs {
    pub tidings: PathBuf,
    /// A command the Tidings server is started under (a profiler), split on spaces.
    pub tidings_wrapper: Vec<String>,
    /// Tidings nodes (more than one: `cluster.sh` starts them over PostgreSQL and NATS).
    pub tidings_nodes: u16,
    pub mosquitto: PathBuf,
    pub mosquitto_passwd: PathBuf,
    pub nats: PathBuf,
    pub erl: PathBuf,
    pub ejabberd_libs: PathBuf,
}

fn find(name: &str) -> Option<PathBuf> {
    for dir in [
        "/usr/sbin",
        "/usr/bin",
        "/usr/local/sbin",
        "/usr/local/bin",
        "/sbin",
        "/bin",
    ] {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return Some(path);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

impl Programs {
    /// Finds what the chosen targets need; an error names what is missing.
    pub fn find(tidings: PathBuf, targets: &[Target]) -> anyhow::Result<Self> {
        let need = |name: &str, wanted: bool| -> anyhow::Result<PathBuf> {
            match find(name) {
                Some(path) => Ok(path),
                None if !wanted => Ok(PathBuf::from(name)),
                None => bail!("`{name}` is not installed: run crates/bench/install-peers.sh"),
            }
        };
        let has = |t: Target| targets.contains(&t);
        if targets.iter().any(|t| t.is_tidings()) && !tidings.is_file() {
            bail!(
                "the tidings binary {} does not exist: build it with `cargo build --release -p tidings`, or pass --tidings-bin",
                tidings.display()
            );
        }
        let ejabberd_libs = PathBuf::from("/usr/lib/x86_64-linux-gnu");
        if has(Target::Ejabberd)
            && !std::fs::read_dir(&ejabberd_libs)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("ejabberd-"))
                })
                .unwrap_or(false)
        {
            bail!("ejabberd is not installed: run crates/bench/install-peers.sh");
        }
        Ok(Programs {
            tidings,
            tidings_wrapper: Vec::new(),
            tidings_nodes: 1,
            mosquitto: need("mosquitto", has(Target::Mosquitto))?,
            mosquitto_passwd: need("mosquitto_passwd", has(Target::Mosquitto))?,
            nats: need("nats-server", has(Target::Nats))?,
            erl: need("erl", has(Target::Ejabberd))?,
            ejabberd_libs,
        })
    }
}

/// What a target's setup left behind for its runs.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    /// The server state every run starts from (a data directory, or an ejabberd database).
    pub template: Option<PathBuf>,
    /// Tidings: the server key (outside the data directory, as the server wants it).
    pub key_file: Option<PathBuf>,
    /// Tidings: device ids by user index.
    pub devices: Option<PathBuf>,
    /// Tidings over TLS: certificate, key and the certificate's SHA-256.
    pub tls: Option<(PathBuf, PathBuf, String)>,
    /// Mosquitto: the password file.
    pub password_file: Option<PathBuf>,
}

/// Process ids of the servers running now, so that an interrupted harness stops them too.
static RUNNING: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn register(pid: u32, running: bool) {
    if let Ok(mut pids) = RUNNING.lock() {
        pids.retain(|p| *p != pid);
        if running {
            pids.push(pid);
        }
    }
}

/// Stops every server the harness started and has not stopped yet (on SIGINT or SIGTERM).
pub async fn stop_all() {
    let pids: Vec<u32> = RUNNING.lock().map(|p| p.clone()).unwrap_or_default();
    for pid in pids {
        crate::common::say(&format!("stopping server pid {pid}"));
        let _ = sys::stop(pid, Duration::from_secs(20)).await;
        register(pid, false);
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    pub target: Target,
    pub pid: u32,
    pub addr: SocketAddr,
    child: tokio::process::Child,
    /// Several Tidings nodes: PostgreSQL's processes' CPU counts as the server's too.
    with_postgres: bool,
}

fn fill(template: &str, pairs: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (key, value) in pairs {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    out
}

/// Copies a directory tree (server state templates are small).
pub fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("read {}", from.display()))? {
        let entry = entry?;
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&path, &dest)?;
        } else {
            std::fs::copy(&path, &dest)
                .with_context(|| format!("copy {} to {}", path.display(), dest.display()))?;
        }
    }
    Ok(())
}

fn current_user() -> String {
    std::process::Command::new("id")
        .arg("-un")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "root".into())
}

/// Writes the Mosquitto password file for users `0..users` (hashed by `mosquitto_passwd -U`).
pub fn mosquitto_passwords(programs: &Programs, dir: &Path, users: u32) -> anyhow::Result<PathBuf> {
    let path = dir.join("passwords");
    let text: String = (0..users)
        .map(|i| {
            format!(
                "{}:{}\n",
                crate::common::digits(i),
                crate::common::password(i)
            )
        })
        .collect();
    std::fs::write(&path, text)?;
    let status = std::process::Command::new(&programs.mosquitto_passwd)
        .arg("-U")
        .arg(&path)
        .status()
        .context("mosquitto_passwd")?;
    if !status.success() {
        bail!("mosquitto_passwd -U failed");
    }
    Ok(path)
}

/// A self-signed certificate for Tidings over TLS, and its SHA-256 (the client pins it).
pub fn make_certificate(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, String)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=tidings-bench",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("openssl (install it, or drop tidings-tls from --targets)")?;
    if !status.success() {
        bail!("openssl could not make a certificate");
    }
    let pem = std::fs::read_to_string(&cert)?;
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .join("");
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("certificate PEM")?;
    use sha2::Digest as _;
    let pin: String = sha2::Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((cert, key, pin))
}

impl Server {
    /// Starts `target` in `dir`. With `fresh`, `dir` is emptied and the template state copied in;
    /// without, the state already in `dir` is kept (a restart).
    pub async fn start(
        target: Target,
        programs: &Programs,
        prepared: &Prepared,
        dir: &Path,
        fresh: bool,
    ) -> anyhow::Result<Server> {
        let addr = addr(target);
        if sys::port_in_use(addr) {
            bail!(
                "{addr} is already in use: another instance is running (or a stale one; stop it)"
            );
        }
        if fresh {
            if dir.exists() {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("remove {}", dir.display()))?;
            }
            std::fs::create_dir_all(dir)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.log"))?;
        let mut command;
        match target {
            Target::Tidings | Target::TidingsTls => {
                let data = dir.join("data");
                if fresh {
                    match &prepared.template {
                        Some(template) => copy_dir(template, &data)?,
                        None => std::fs::create_dir_all(&data)?,
                    }
                }
                let key_file = prepared
                    .key_file
                    .clone()
                    .ok_or_else(|| anyhow!("no key file prepared"))?;
                let tls = match (&prepared.tls, target) {
                    (Some((cert, key, _)), Target::TidingsTls) => format!(
                        "tls_cert = \"{}\"\ntls_key = \"{}\"",
                        cert.display(),
                        key.display()
                    ),
                    _ => String::new(),
                };
                let config = fill(
                    TIDINGS_TEMPLATE,
                    &[
                        ("LISTEN", addr.to_string()),
                        ("DATA_DIR", data.display().to_string()),
                        ("KEY_FILE", key_file.display().to_string()),
                        ("OUTBOX_DIR", dir.join("outbox").display().to_string()),
                        ("TLS", tls),
                    ],
                );
                let config_path = dir.join("tidings-server.toml");
                std::fs::write(&config_path, config)?;
                command = match programs.tidings_wrapper.split_first() {
                    None => tokio::process::Command::new(&programs.tidings),
                    Some((wrapper, args)) => {
                        let mut command = tokio::process::Command::new(wrapper);
                        command.args(args).arg(&programs.tidings);
                        command
                    }
                };
                command
                    .arg("server")
                    .arg("--config")
                    .arg(&config_path)
                    .env("TIDINGS_LOG", "warn")
                    .env("TIDINGS_BENCH_NODES", programs.tidings_nodes.to_string())
                    .stdout(Stdio::piped());
            }
            Target::Mosquitto => {
                let password_file = prepared
                    .password_file
                    .clone()
                    .ok_or_else(|| anyhow!("no password file prepared"))?;
                let config = fill(
                    MOSQUITTO_TEMPLATE,
                    &[
                        ("PORT", addr.port().to_string()),
                        ("PASSWORD_FILE", password_file.display().to_string()),
                        ("DIR", dir.display().to_string()),
                        ("USER", current_user()),
                    ],
                );
                let config_path = dir.join("mosquitto.conf");
                std::fs::write(&config_path, config)?;
                command = tokio::process::Command::new(&programs.mosquitto);
                command
                    .arg("-c")
                    .arg(&config_path)
                    .stdout(Stdio::from(log.try_clone()?));
            }
            Target::Ejabberd => {
                let db = dir.join("db");
                if fresh {
                    match &prepared.template {
                        Some(template) => copy_dir(template, &db)?,
                        None => std::fs::create_dir_all(&db)?,
                    }
                }
                let config = fill(EJABBERD_TEMPLATE, &[("PORT", addr.port().to_string())]);
                let config_path = dir.join("ejabberd.yml");
                std::fs::write(&config_path, config)?;
                command = tokio::process::Command::new(&programs.erl);
                // Started directly (not through ejabberdctl, whose ejabberdctl.cfg would point
                // it at /etc/ejabberd/ejabberd.yml) and without Erlang distribution, so the only
                // listener is the one in our configuration.
                command
                    .args(["-noinput", "+K", "true", "+P", "1000000", "-mnesia", "dir"])
                    .arg(format!("\"{}\"", db.display()))
                    .args(["-s", "ejabberd"])
                    .env("EJABBERD_CONFIG_PATH", &config_path)
                    .env("EJABBERD_LOG_PATH", dir.join("ejabberd.log"))
                    .env("ERL_LIBS", &programs.ejabberd_libs)
                    .env("ERL_CRASH_DUMP", "/dev/null")
                    .env("ERL_MAX_PORTS", "65536")
                    .env("HOME", dir)
                    .current_dir(dir)
                    .stdout(Stdio::from(log.try_clone()?));
            }
            Target::Nats => {
                let config = fill(
                    NATS_TEMPLATE,
                    &[
                        ("PORT", addr.port().to_string()),
                        ("DIR", dir.display().to_string()),
                    ],
                );
                let config_path = dir.join("nats.conf");
                std::fs::write(&config_path, config)?;
                command = tokio::process::Command::new(&programs.nats);
                command
                    .arg("-c")
                    .arg(&config_path)
                    .stdout(Stdio::from(log.try_clone()?));
            }
        }
        command.stdin(Stdio::null()).stderr(Stdio::from(log));
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", target.name()))?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        register(pid, true);
        let started = Instant::now();
        if target.is_tidings() {
            let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(START_TIMEOUT, lines.next_line())
                .await
                .map_err(|_| anyhow!("the tidings server did not start within {START_TIMEOUT:?}"))?
                .context("reading the server's stdout")?
                .ok_or_else(|| {
                    anyhow!(
                        "the tidings server exited at start; see {}",
                        dir.join("server.log").display()
                    )
                })?;
            if !line.contains("tidings server listening on") {
                bail!("unexpected first line from the tidings server: {line}");
            }
            // Keep draining stdout so the server can never block on it.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        }
        let mut server = Server {
            target,
            pid,
            addr,
            child,
            with_postgres: target.is_tidings() && programs.tidings_nodes > 1,
        };
        if let Err(e) = sys::wait_port(addr, START_TIMEOUT, pid).await {
            let _ = server.stop().await;
            return Err(e.context(format!(
                "{} did not start; see {}",
                target.name(),
                dir.join("server.log").display()
            )));
        }
        if target == Target::Mosquitto {
            sys::raise_backlog(pid, addr.port(), BACKLOG as i32)
                .context("raising Mosquitto's listen backlog")?;
        }
        if let Err(e) = server.check_listeners() {
            let _ = server.stop().await;
            return Err(e);
        }
        tracing_line(&format!(
            "{} started (pid {pid}) in {:.1} s",
            target.name(),
            started.elapsed().as_secs_f64()
        ));
        Ok(server)
    }

    /// Every listener of the server is on loopback, and the benchmark port has its backlog.
    fn check_listeners(&self) -> anyhow::Result<()> {
        let listeners = sys::listeners_of(self.pid);
        if let Some(open) = listeners.iter().find(|a| !sys::is_loopback(a)) {
            bail!(
                "{} listens on {open}, which is not loopback: refusing to run",
                self.target.name()
            );
        }
        if !listeners.contains(&self.addr) {
            bail!("{} does not listen on {}", self.target.name(), self.addr);
        }
        match sys::listen_backlog(self.addr.port()) {
            Some(backlog) if backlog >= BACKLOG => Ok(()),
            Some(backlog) => bail!(
                "{} listens with a backlog of {backlog}, below {BACKLOG}",
                self.target.name()
            ),
            None => Ok(()), // `ss` missing: nothing to check with
        }
    }

    /// CPU seconds and RSS of the server's process tree now.
    pub fn usage(&self) -> sys::Usage {
        let mut usage = sys::usage(self.pid);
        if self.with_postgres {
            // Its CPU only: each backend's RSS counts the shared buffers it touched again.
            usage.cpu_secs += sys::usage_named("postgres").cpu_secs;
        }
        usage
    }

    /// Stops the server by its process id (SIGTERM, then SIGKILL after the grace period).
    pub async fn stop(&mut self) -> anyhow::Result<Duration> {
        let result = sys::stop(self.pid, STOP_GRACE).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        register(self.pid, false);
        result
    }
}

/// A progress line on stderr.
pub fn tracing_line(text: &str) {
    crate::common::say(text);
}
