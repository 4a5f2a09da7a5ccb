//! The operating system, as the harness sees it: CPU time and memory of a process tree from
//! `/proc`, stopping a process by its id, the listen backlog of a peer's socket, and the machine.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use rustix::fd::AsFd as _;
use tokio::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` times.
pub fn ticks_per_second() -> f64 {
    rustix::param::clock_ticks_per_second() as f64
}

/// The parent of every process, from `/proc/*/stat`.
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(fields) = stat_fields(pid) {
            if let Some(ppid) = fields.get(1).and_then(|s| s.parse().ok()) {
                out.insert(pid, ppid);
            }
        }
    }
    out
}

/// The fields of `/proc/<pid>/stat` after the command name: state, ppid, … (field 3 onwards).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = text.rsplit_once(')')?.1;
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// `pid` and all its descendants.
pub fn tree(pid: u32) -> Vec<u32> {
    let parents = parents();
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        for (&child, &parent) in &parents {
            if parent == p && !out.contains(&child) {
                out.push(child);
            }
        }
        i += 1;
    }
    out
}

/// User plus system CPU seconds of one process.
pub fn cpu_secs(pid: u32) -> f64 {
    stat_fields(pid)
        .map(|f| {
            let utime: f64 = f.get(11).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            let stime: f64 = f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
            (utime + stime) / ticks_per_second()
        })
        .unwrap_or(0.0)
}

/// Resident set size of one process, bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// CPU seconds and RSS of a process and its descendants.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_secs: f64,
    pub rss_bytes: u64,
}

pub fn usage(pid: u32) -> Usage {
    let mut usage = Usage::default();
    for p in tree(pid) {
        usage.cpu_secs += cpu_secs(p);
        usage.rss_bytes += rss_bytes(p);
    }
    usage
}

/// CPU seconds and RSS of every process whose command name is `name` (PostgreSQL's server and
/// its backends, for a benchmark of several Tidings nodes over it).
pub fn usage_named(name: &str) -> Usage {
    let mut usage = Usage::default();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return usage;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == name {
            usage.cpu_secs += cpu_secs(pid);
            usage.rss_bytes += rss_bytes(pid);
        }
    }
    usage
}

/// Whether the process still exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

/// Sends SIGTERM to `pid`, waits up to `grace` for it to end, then SIGKILL.
pub async fn stop(pid: u32, grace: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let target =
        rustix::process::Pid::from_raw(i32::try_from(pid)?).ok_or_else(|| anyhow!("pid 0"))?;
    if rustix::process::kill_process(target, rustix::process::Signal::TERM).is_err() {
        return Ok(started.elapsed());
    }
    while alive(pid) {
        if started.elapsed() > grace {
            let _ = rustix::process::kill_process(target, rustix::process::Signal::KILL);
            tokio::time::sleep(Duration::from_millis(200)).await;
            bail!("process {pid} ignored SIGTERM for {grace:?}; killed");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(started.elapsed())
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_port(addr: SocketAddr, timeout: Duration, pid: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            drop(stream);
            return Ok(());
        }
        if !alive(pid) {
            bail!("the server exited before listening on {addr}");
        }
        if Instant::now() > deadline {
            bail!("nothing listens on {addr} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a TCP listener holds `addr` already (in any process).
pub fn port_in_use(addr: SocketAddr) -> bool {
    std::net::TcpListener::bind(addr).is_err()
}

/// The inodes of listening TCP sockets on `port` (from /proc/net/tcp and tcp6).
fn listening_inodes(port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            let local_port = f[1]
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Ok(inode) = f[9].parse() {
                    out.push(inode);
                }
            }
        }
    }
    out
}

/// The backlog the kernel holds for the listener on `port` (`ss -ltn` "Send-Q").
pub fn listen_backlog(port: u16) -> Option<u64> {
    let text = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    text.lines()
        .filter_map(|l| l.split_whitespace().nth(2).and_then(|s| s.parse().ok()))
        .min()
}

/// Raises the listen backlog of `pid`'s listening socket(s) on `port` to `backlog`.
///
/// For servers that cannot be configured to ask for it (Mosquitto 2.0.11 calls `listen(fd, 100)`):
/// the harness takes a duplicate of the listening socket with `pidfd_getfd(2)` and calls
/// `listen(2)` on it again, which on Linux only changes the backlog of the socket both
/// descriptors name. The server is not otherwise touched.
pub fn raise_backlog(pid: u32, port: u16, backlog: i32) -> anyhow::Result<()> {
    let inodes = listening_inodes(port);
    if inodes.is_empty() {
        bail!("no listening socket on port {port}");
    }
    let target =
        rustix::process::Pid::from_raw(i32::try_from(pid)?).ok_or_else(|| anyhow!("pid 0"))?;
    let pidfd = rustix::process::pidfd_open(target, rustix::process::PidfdFlags::empty())
        .context("pidfd_open")?;
    let mut raised = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).context("list fds")? {
        let entry = entry?;
        let Ok(link) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let link = link.to_string_lossy().into_owned();
        let Some(inode) = link
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if !inodes.contains(&inode) {
            continue;
        }
        let fd: i32 = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("fd name"))?;
        let dup = rustix::process::pidfd_getfd(
            pidfd.as_fd(),
            fd,
            rustix::process::PidfdGetfdFlags::empty(),
        )
        .context("pidfd_getfd (needs ptrace permission over the server)")?;
        rustix::net::listen(&dup, backlog).context("listen")?;
        raised += 1;
    }
    if raised == 0 {
        bail!("process {pid} holds no listening socket on port {port}");
    }
    Ok(())
}

/// One-line facts about the machine for the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub disk: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let os = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_gib,
        kernel,
        os,
        disk: String::new(),
    }
}

/// The filesystem and device behind `path` (from `df`), for the durability notes.
pub fn disk_of(path: &Path) -> String {
    std::process::Command::new("df")
        .args(["-hT", &path.to_string_lossy()])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default()
}

/// A package's version from dpkg, for the report.
pub fn package_version(package: &str) -> String {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "not installed".into())
}

fn parse_proc_addr(hex: &str) -> Option<std::net::SocketAddr> {
    let (addr, port) = hex.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip: std::net::IpAddr = match addr.len() {
        8 => std::net::Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?.to_le_bytes()).into(),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(addr.get(8 * i..8 * i + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            std::net::Ipv6Addr::from(bytes).into()
        }
        _ => return None,
    };
    Some(std::net::SocketAddr::new(ip, port))
}

/// The addresses the process tree of `pid` listens on (TCP).
pub fn listeners_of(pid: u32) -> Vec<std::net::SocketAddr> {
    let mut inodes = std::collections::HashSet::new();
    for p in tree(pid) {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{p}/fd")) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(link) = std::fs::read_link(entry.path()) {
                if let Some(inode) = link
                    .to_string_lossy()
                    .strip_prefix("socket:[")
                    .and_then(|s| s.strip_suffix(']'))
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    inodes.insert(inode);
                }
            }
        }
    }
    let mut out = Vec::new();
    for file in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[3] != "0A" {
                continue;
            }
            if f[9].parse::<u64>().is_ok_and(|i| inodes.contains(&i)) {
                if let Some(addr) = parse_proc_addr(f[1]) {
                    out.push(addr);
                }
            }
        }
    }
    out
}

/// Whether an address is on this machine only.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// CPU seconds the whole machine has been busy (all CPUs; user, system, interrupts, steal).
pub fn machine_busy_secs() -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| f.get(i))
        .sum();
    busy / ticks_per_second()
}
