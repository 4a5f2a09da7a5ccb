//! Defaults an operator or a sender can trip on (issue 28, items 9 and 10): the `outbox` gateway's
//! files, configuration values that would disable a limit, a listener without TLS on a public
//! address, and a message's time to live.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::time::Duration;

use crate::support::{
    eventually, free_port, isolated_server, number, patience, wait_output, Server, TempDir, User,
    PATIENCE, QUIET,
};

/// The permission bits of a file or directory.
fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `outbox` gateway holds numbers and codes: only the server's user may read them, and the
/// server says at start that it is for testing.
#[test]
fn the_outbox_is_private_and_the_server_says_it_is_for_testing() {
    let server = Server::start(&[]);
    let n = number();
    User::register(&n, &server, &[]);
    let outbox = server.outbox();
    assert_eq!(
        mode(&outbox),
        0o700,
        "outbox directory {}",
        outbox.display()
    );
    let files: Vec<_> = std::fs::read_dir(&outbox)
        .expect("outbox")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(!files.is_empty(), "no SMS in the outbox");
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    let log = server.log();
    assert!(
        log.contains("outbox SMS gateway is for testing only"),
        "no warning about the outbox gateway in the log:\n{log}"
    );
}

/// A limit of 0 would refuse every request it guards (and once panicked with the limiter's lock
/// held): the server refuses to start, naming the setting.
#[test]
fn a_zero_address_limit_is_refused_at_start_with_its_name() {
    for (flag, setting) in [
        ("--codes-per-address", "codes_per_address"),
        ("--verifies-per-address", "verifies_per_address"),
        (
            "--pre-login-connections-per-block",
            "pre_login_connections_per_block",
        ),
        ("--body-timeout-seconds", "body_timeout_seconds"),
    ] {
        let dir = TempDir::new("zero-limit");
        let mut child = isolated_server(&dir, "127.0.0.1:0")
            .args([flag, "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tidings server");
        let exited = eventually(patience(), || matches!(child.try_wait(), Ok(Some(_))));
        let status = child.try_wait().ok().flatten();
        let output = wait_output(&mut child, Duration::ZERO);
        assert!(exited, "the server started with {flag} 0:\n{output}");
        assert!(
            status.is_some_and(|s| !s.success()),
            "{flag} 0: {status:?}\n{output}"
        );
        assert!(
            output.contains(setting) && output.contains("at least 1"),
            "{flag} 0: the error does not name {setting}:\n{output}"
        );
    }
}

/// A server reachable from other machines without TLS sends registrations, codes and logins in
/// the clear: it says so at start. On loopback it is silent (a proxy in front is the usual setup).
#[test]
fn plain_tcp_on_a_public_address_is_warned_about_at_start() {
    const WARNING: &str = "without TLS on a non-loopback address";
    let dir = TempDir::new("public-listen");
    let log_file = dir.path().join("server.log");
    let log = std::fs::File::create(&log_file).expect("log file");
    let port = free_port();
    let mut child = isolated_server(&dir, &format!("0.0.0.0:{port}"))
        .args(["--metrics-listen", "off"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start tidings server");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    let _ = child.kill();
    let _ = child.wait();
    let public = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(
        line.contains("listening on"),
        "did not start: {line:?}\n{public}"
    );
    assert!(
        public.contains(WARNING),
        "no warning for plain TCP on 0.0.0.0:\n{public}"
    );

    let loopback = Server::start(&[]);
    assert!(
        !loopback.log().contains(WARNING),
        "a warning on loopback:\n{}",
        loopback.log()
    );
}

/// A message is kept at most 30 days. A sender asking for longer (up to 2^32-1 seconds, 136
/// years) is refused rather than told `queued` and kept a shorter time than it asked for; nothing
/// of the refused sends is stored, and 30 days exactly is accepted.
#[test]
fn a_ttl_above_30_days_is_refused_and_nothing_is_stored() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    for ttl in [u32::MAX, 30 * 86_400 + 1] {
        let (answer, code) = alice.send(
            &bob_number,
            &format!("ttl {ttl}"),
            &["--ttl", &ttl.to_string()],
        );
        assert_eq!(answer["outcome"], "invalid", "--ttl {ttl}: {answer}");
        assert_ne!(code, 0, "--ttl {ttl}: {answer}");
    }
    let (answer, code) = alice.send(&bob_number, "for 30 days", &["--ttl", "2592000"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    // The accepted one comes; nothing of the refused sends comes after it.
    assert_eq!(bob.receive_texts(1, PATIENCE), ["for 30 days"]);
    assert!(bob.receive(1, QUIET).is_empty());
}
