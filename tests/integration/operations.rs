//! What an operator relies on: TLS, configuration precedence, metrics, the OpenAPI document,
//! graceful shutdown.

use std::collections::BTreeSet;

use sha2::Digest as _;
use tidings_proto::frame::{Kind, SendOutcome};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::support::{
    block_on, number, on_postgres, patience, text, Server, TempDir, User, PATIENCE,
};

/// A raw HTTP/1.1 request over loopback; returns the status code and body.
async fn http(port: u16, request: &str) -> (u16, String) {
    let (status, _, body) = exchange(port, request).await;
    (status, body)
}

/// A raw HTTP/1.1 request over loopback; returns the status code, the head (status line and
/// headers) and the body.
async fn exchange(port: u16, request: &str) -> (u16, String, String) {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::time::timeout(patience(), stream.read_to_end(&mut response)).await;
    let response = text(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .map(|(head, body)| (head.to_string(), body.to_string()))
        .unwrap_or_default();
    (status, head, body)
}

pub(crate) fn get(port: u16, path: &str) -> (u16, String) {
    block_on(http(
        port,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    ))
}

#[test]
fn tls_with_a_pinned_certificate() {
    let dir = TempDir::new("tls");
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("cert");
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).expect("write key");
    let pin: String = sha2::Sha256::digest(cert.cert.der())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let server = Server::start(&[
        "--tls-cert",
        cert_path.to_str().expect("utf8"),
        "--tls-key",
        key_path.to_str().expect("utf8"),
    ]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &["--pin", &pin]);
    let bob = User::register(
        &bob_number,
        &server,
        &["--ca", cert_path.to_str().expect("utf8")],
    );
    let (answer, _) = alice.send(&bob_number, "over tls", &[]);
    assert_eq!(answer["outcome"], "queued");
    assert_eq!(bob.receive(1, PATIENCE)[0]["text"], "over tls");

    // A wrong pin, no trust anchor, or plain HTTP against the TLS port all fail clearly.
    let wrong = "00".repeat(32);
    let out = User::new(&number()).run(&[
        "register",
        &number(),
        "--server",
        &server.url,
        "--pin",
        &wrong,
    ]);
    assert!(
        text(&out.stderr).contains("does not match the pinned"),
        "{}",
        text(&out.stderr)
    );
    let out = User::new(&number()).run(&["register", &number(), "--server", &server.url]);
    assert!(text(&out.stderr).contains("--ca"), "{}", text(&out.stderr));
    let plain = server.url.replace("https://", "http://");
    let out = User::new(&number()).run(&["register", &number(), "--server", &plain]);
    assert_eq!(out.status.code(), Some(1));
    // Plain HTTP to another machine needs --insecure (refused before any connection).
    let out =
        User::new(&number()).run(&["register", &number(), "--server", "http://192.0.2.1:7433"]);
    assert!(
        text(&out.stderr).contains("--insecure"),
        "{}",
        text(&out.stderr)
    );
}

/// The heartbeat interval the server announces at login.
fn announced_heartbeat(user: &User) -> u64 {
    let client = user.client();
    block_on(async {
        client
            .session(false)
            .await
            .expect("session")
            .heartbeat()
            .as_secs()
    })
}

#[test]
fn configuration_precedence_flag_env_file_default() {
    let dir = TempDir::new("config");
    let config = dir.path().join("server.toml");
    std::fs::write(&config, "heartbeat_seconds = 7\n").expect("config");
    let n = number();
    let check = |flag: Option<&str>, env: Option<&str>, file: bool, expected: u64| {
        let mut extra = vec![];
        if file {
            extra.extend(["--config", config.to_str().expect("utf8")]);
        }
        if let Some(flag) = flag {
            extra.extend(["--heartbeat-seconds", flag]);
        }
        if let Some(env) = env {
            std::env::set_var("TIDINGS_HEARTBEAT_SECONDS", env);
        } else {
            std::env::remove_var("TIDINGS_HEARTBEAT_SECONDS");
        }
        let server = Server::start(&extra);
        std::env::remove_var("TIDINGS_HEARTBEAT_SECONDS");
        let user = User::register(&n, &server, &[]);
        assert_eq!(
            announced_heartbeat(&user),
            expected,
            "flag {flag:?} env {env:?} file {file}"
        );
    };
    check(Some("9"), Some("8"), true, 9);
    check(None, Some("8"), true, 8);
    check(None, None, true, 7);
    check(None, None, false, 10);
    // A config file with an unknown setting is refused with its name.
    std::fs::write(&config, "heartbeat_secs = 7\n").expect("config");
    let out = std::process::Command::new(crate::support::BIN)
        .args(["server", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("heartbeat_secs"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn metrics_count_events_without_identifiers() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    alice.send(&bob_number, "counted", &[]);
    let (status, body) = get(server.metrics_port, "/metrics");
    assert_eq!(status, 200);
    for metric in [
        r#"tidings_sends_total{outcome="queued"} 1"#,
        r#"tidings_registrations_total{outcome="verified"} 2"#,
        "tidings_store_syncs_total",
        "tidings_sessions_active",
    ] {
        assert!(body.contains(metric), "missing {metric} in\n{body}");
    }
    assert!(
        !body.contains(&alice_number[1..]) && !body.contains(&bob_number[1..]),
        "a number in metrics"
    );
}

/// Each node names itself in its metrics (`tidings_node_info`), so that an operator scraping
/// several tells them apart; a name that would not be a clean label value is refused at start.
#[test]
fn metrics_name_the_node() {
    let server = Server::start(&["--node-name", "tidings-b.2"]);
    let (status, body) = get(server.metrics_port, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains(r#"tidings_node_info{node="tidings-b.2"} 1"#),
        "{body}"
    );
    let dir = TempDir::new("node-name");
    let out = crate::support::isolated_server(&dir, "127.0.0.1:0")
        .args(["--node-name", "a\"b"])
        .output()
        .expect("run tidings");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("node_name `a\"b` must be 1-64 letters"),
        "{}",
        text(&out.stderr)
    );
}

/// `/metrics` is the operator's: it is served on an address of its own (loopback by default),
/// never on the public port, where anyone could watch the server's traffic.
#[test]
fn metrics_are_served_on_their_own_address_only() {
    let server = Server::start(&[]);
    let (status, body) = get(server.port, "/metrics");
    assert_eq!(status, 404, "/metrics answers on the public port:\n{body}");
    let (status, body) = get(server.metrics_port, "/metrics");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tidings_sessions_active"), "{body}");
    // The metrics address serves nothing else.
    assert_eq!(get(server.metrics_port, "/v1/health").0, 404);
    // Turned off, nothing listens there; a setting that is neither an address nor `off` is
    // refused at start with its name.
    let off = Server::start(&["--metrics-listen", "off"]);
    assert!(std::net::TcpStream::connect(("127.0.0.1", off.metrics_port)).is_err());
    let out = std::process::Command::new(crate::support::BIN)
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "9464",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("metrics_listen"),
        "{}",
        text(&out.stderr)
    );
}

/// The data files hold pseudonyms, device keys and queued ciphertexts, and the key file the keys
/// that make pseudonyms: only the server's own user may read any of them (0600; the data directory
/// 0700), whatever the umask.
#[test]
fn data_files_and_the_key_file_are_readable_by_the_server_s_user_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    let (answer, _) = alice.send(&bob_number, "kept on disk", &[]);
    assert_eq!(answer["outcome"], "queued");
    let mode = |path: &std::path::Path| {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(&server.data_dir()), 0o700);
    let mut files = vec![server.key_file()];
    for entry in std::fs::read_dir(server.data_dir()).expect("data dir") {
        files.push(entry.expect("entry").path());
    }
    // The database with its write-ahead log and shared-memory index, at least (on PostgreSQL
    // the data directory holds what the server keeps beside the database, if anything).
    assert!(on_postgres() || files.len() >= 4, "{files:?}");
    for file in &files {
        assert_eq!(
            mode(file),
            0o600,
            "{} has mode {:o}",
            file.display(),
            mode(file)
        );
    }
}

/// The store's writer has a thread of its own, busy under load: the server runs its connections
/// on one thread fewer than the cores (at least one), or on what `TOKIO_WORKER_THREADS` says.
#[test]
fn the_server_leaves_a_core_to_its_storage_writer() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let server = Server::start(&[]);
    let (status, body) = get(server.metrics_port, "/metrics");
    assert_eq!(status, 200);
    let expected = format!(
        "tidings_runtime_worker_threads {}",
        cores.saturating_sub(1).max(1)
    );
    assert!(body.contains(&expected), "missing {expected} in\n{body}");
}

#[test]
fn openapi_document_matches_the_routes() {
    let server = Server::start(&[]);
    let (status, body) = get(server.port, "/v1/openapi.json");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("openapi json");
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    let expected: BTreeSet<(String, String)> = [
        ("POST", "/v1/registration/code"),
        ("POST", "/v1/registration/verify"),
        ("POST", "/v1/registration/inbound"),
        ("POST", "/v1/registration/inbound/complete"),
        ("POST", "/v1/registration/link"),
        ("GET", "/v1/connect"),
        ("GET", "/v1/oprf-key"),
        ("GET", "/v1/health"),
        ("GET", "/v1/ready"),
        ("GET", "/v1/openapi.json"),
    ]
    .iter()
    .map(|(m, p)| (m.to_string(), p.to_string()))
    .collect();
    assert_eq!(documented, expected);
    // Every documented route is served (no 404/405), and an undocumented one is not.
    for (method, path) in &documented {
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        );
        let (status, _) = block_on(http(server.port, &request));
        assert!(
            status != 404 && status != 405 && status != 0,
            "{method} {path} answered {status}"
        );
    }
    assert_eq!(get(server.port, "/v1/undocumented").0, 404);
}

/// What the server answers is what its OpenAPI document says it answers: each answer's status is
/// documented for its operation, with the content type it comes in, and a body the server refuses
/// as invalid is one the document's schema does not allow either.
#[test]
fn openapi_document_describes_each_answer_exactly() {
    let server = Server::start(&[]);
    let (status, body) = get(server.port, "/v1/openapi.json");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("openapi json");
    let check = |method: &str,
                 path: &str,
                 content_type: Option<&str>,
                 body: &str,
                 expected: u16| {
        let content_type = content_type
            .map(|value| format!("Content-Type: {value}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{content_type}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, head, _) = block_on(exchange(server.port, &request));
        let case = format!("{method} {path} {content_type:?} {body:?}");
        assert_eq!(status, expected, "{case}");
        let operation = &doc["paths"][path][method.to_lowercase()];
        let documented = &operation["responses"][status.to_string()];
        assert!(documented.is_object(), "{case}: {status} is not documented");
        let answered_type = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim().to_string())
            })
            .unwrap_or_default();
        let documented_types: Vec<&String> = documented["content"]
            .as_object()
            .map(|content| content.keys().collect())
            .unwrap_or_default();
        assert!(
            documented_types
                .iter()
                .any(|documented| answered_type.starts_with(documented.as_str())),
            "{case}: answered {answered_type}, documented {documented_types:?}"
        );
    };
    for path in [
        "/v1/registration/code",
        "/v1/registration/verify",
        "/v1/registration/link",
    ] {
        check("POST", path, None, "{}", 415);
        check("POST", path, Some("text/plain"), "{}", 415);
        check("POST", path, Some("application/json"), "{", 400);
        check("POST", path, Some("application/json"), "{}", 422);
    }
    check(
        "POST",
        "/v1/registration/code",
        Some("application/json"),
        r#"{"number": ""}"#,
        400,
    );
    check(
        "POST",
        "/v1/registration/code",
        Some("application/json"),
        r#"{"number": "+1"}"#,
        400,
    );
    check("GET", "/v1/health", None, "", 200);
    check("GET", "/v1/openapi.json", None, "", 200);
    check("GET", "/v1/connect", None, "", 426);
    // The number the server refused above is one the schema does not allow: at least E.164's
    // `+` and two digits.
    let number = &doc["components"]["schemas"]["CodeRequest"]["properties"]["number"];
    let pattern = number["pattern"].as_str().unwrap_or_default();
    assert!(
        number["minLength"].as_u64().is_some_and(|n| n >= 3) && pattern.starts_with("^\\+"),
        "{number}"
    );
}

#[test]
fn sigterm_mid_flow_loses_no_accepted_message() {
    let mut server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    let pid = server.pid();
    let queued = block_on(async {
        let batch: Vec<(tidings_proto::id::MessageId, String)> = (0..150u8)
            .map(|i| (tidings_proto::id::MessageId([i; 16]), format!("m{i}")))
            .collect();
        let sends: Vec<Kind> = client
            .prepare_sends(&bob_number, &batch)
            .await
            .expect("encrypt")
            .into_iter()
            .map(Kind::Send)
            .collect();
        let mut session = client.session(false).await.expect("session");
        let send = |i: u8| sends[usize::from(i)].clone();
        let mut queued = BTreeSet::new();
        let record = |kind: Kind, queued: &mut BTreeSet<String>| {
            if let Kind::SendResult(result) = kind {
                if result.outcome == SendOutcome::Queued as i32 {
                    queued.insert(format!("m{}", result.id[0]));
                }
            }
        };
        // Half the sends, and wait until the server is answering them...
        for i in 0..75u8 {
            session.send(send(i)).await.expect("send");
        }
        let deadline = Instant::now() + patience();
        while queued.is_empty() {
            let kind = session
                .recv(deadline)
                .await
                .expect("recv")
                .expect("a first answer");
            record(kind, &mut queued);
        }
        // ...then the rest, with SIGTERM arriving in the middle of them.
        for i in 75..150u8 {
            if session.send(send(i)).await.is_err() {
                break;
            }
            if i == 80 {
                crate::support::signal(pid, "TERM");
            }
        }
        let deadline = Instant::now() + patience();
        while let Ok(Some(kind)) = session.recv(deadline).await {
            record(kind, &mut queued);
        }
        queued
    });
    assert!(
        server.sigterm() || server.child.is_none(),
        "the server did not exit cleanly after SIGTERM"
    );
    // Every send answered `queued` before the shutdown must be delivered after it.
    assert!(!queued.is_empty());
    server.restart();
    // Until every message answered `queued` is shown (or the patience runs out).
    let shown = |events: &[serde_json::Value]| -> BTreeSet<String> {
        events
            .iter()
            .filter(|e| e["type"] == "message")
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    let received = shown(&bob.listen_until(|events| shown(events).is_superset(&queued)));
    let lost: Vec<&String> = queued.difference(&received).collect();
    assert!(lost.is_empty(), "answered `queued` but lost: {lost:?}");
}

#[test]
fn sigterm_closes_idle_sessions_without_waiting_out_the_grace_period() {
    // An idle session keeps no cancellation future of its own: shutdown reaches it through its
    // mailbox. If it did not, the server would wait its whole grace period and say so.
    let mut server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let mut listener = bob.spawn(&["listen"]);
    assert!(crate::support::eventually(patience(), || {
        alice.lookup(&[&bob_number])[0].1 == "online"
    }));
    // Frozen, the listener sends no heartbeat that would wake its session either.
    crate::support::signal(listener.id(), "STOP");
    assert!(server.sigterm(), "the server did not exit cleanly");
    crate::support::signal(listener.id(), "CONT");
    let log = server.log();
    assert!(log.contains("stopped"), "{log}");
    assert!(
        !log.contains("did not finish in time"),
        "an idle session held up the shutdown: {log}"
    );
    let _ = listener.kill();
    let _ = listener.wait();
}

/// The binary runs on the allocator its memory figures were measured with (docs/ARCHITECTURE.md):
/// jemalloc, whose background thread gives freed pages back. The setting is compiled in through
/// the workspace's `.cargo/config.toml`; a build that missed it would still run, silently holding
/// more memory per idle connection.
#[test]
fn the_binary_allocates_with_jemalloc_set_to_give_freed_memory_back() {
    let output = std::process::Command::new(crate::support::BIN)
        .arg("--help")
        .env("MALLOC_CONF", "confirm_conf:true")
        .output()
        .expect("run tidings --help");
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let compiled_in = "<jemalloc>: malloc_conf #1 (string specified via --with-malloc-conf): \
                       \"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\"";
    assert!(stderr.contains(compiled_in), "{stderr}");
}

#[test]
fn a_single_node_is_ready_and_says_so() {
    let server = Server::start(&[]);
    let (status, body) = get(server.port, "/v1/ready");
    assert_eq!(status, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(ready["status"], "ready", "{body}");
}
