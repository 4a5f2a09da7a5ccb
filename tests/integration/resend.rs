//! End-to-end durability in the sending client (issue 30): a message is committed to the profile
//! before its first copy goes out and kept until the server settles it; `tidings listen` sends
//! what a stopped `send` left under the same id, re-encrypted, and the receiver shows it once.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use tidings_core::failpoint::VARIABLE as FAILPOINT_VAR;

use crate::support::{number, patience, Server, User, BIN, PASSPHRASE, PATIENCE, QUIET};

/// Runs `tidings send` armed to stop dead at `failpoint` (`tidings_core::failpoint`: the
/// process aborts there, as if killed with `kill -9`) and waits until it has.
fn send_stopped_at(user: &User, failpoint: &str, to: &str, text: &str) {
    let status = Command::new(BIN)
        .arg("--profile")
        .arg(user.profile.path())
        .args(["--json", "send", to, text, "--wait", &PATIENCE.to_string()])
        .env_remove("TIDINGS_SERVER")
        .env("TIDINGS_PASSPHRASE", PASSPHRASE)
        .env(FAILPOINT_VAR, failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run tidings send");
    use std::os::unix::process::ExitStatusExt as _;
    assert!(
        status.signal().is_some(),
        "send never reached the failpoint {failpoint}: it ended with {status}"
    );
}

/// The lines a reader yields, on a channel (a thread reads them).
fn lines_of(reader: impl std::io::Read + Send + 'static) -> Receiver<String> {
    let (sender, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// Whether `events` hold one of `kind` for message `id`.
fn has(events: &[serde_json::Value], kind: &str, id: &str) -> bool {
    events.iter().any(|e| e["type"] == kind && e["id"] == id)
}

/// The id of the one message the routed events name.
fn routed(events: &[serde_json::Value]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e["type"] == "routed")
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_send_killed_after_its_commit_is_sent_by_listen_and_shown_once() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);

    // Stored in the profile, not a copy sent: killed there.
    send_stopped_at(
        &alice,
        "client-outgoing-committed",
        &bob_number,
        "kept through a kill",
    );

    // Her `listen` sends it (Bob is offline: queued, settled).
    let events = alice.listen_until(|events| !routed(events).is_empty());
    let done = routed(&events);
    assert_eq!(done.len(), 1, "{events:?}");
    assert_eq!(done[0].1, "queued", "{events:?}");

    let shown = bob.receive(1, PATIENCE);
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert_eq!(shown[0]["text"], "kept through a kill");
    assert_eq!(shown[0]["id"].as_str(), Some(done[0].0.as_str()));
    assert!(bob.receive(1, QUIET).is_empty(), "shown twice");
    // Settled: a second `listen` has nothing to send.
    assert!(routed(&alice.listen_events(1, QUIET)).is_empty());
}

#[test]
fn a_resend_of_a_message_already_shown_is_not_shown_again() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // Online to everyone, and a receipt for every message he takes: his acknowledgement of the
    // resent copy is then seen by Alice.
    bob.ok(&["settings", "--presence", "everyone"]);
    let mut listener = bob.spawn(&["--json", "listen", "--timeout", &(3 * PATIENCE).to_string()]);
    let bob_lines = lines_of(listener.stdout.take().expect("stdout"));
    assert!(crate::support::eventually(patience(), || {
        alice.lookup(&[&bob_number])[0].1 == "online"
    }));

    // The send is written; Alice's process is killed before it reads the answer, once Bob
    // showed the message.
    send_stopped_at(&alice, "client-send-after", &bob_number, "said once");
    let first: serde_json::Value = std::iter::from_fn(|| bob_lines.recv_timeout(patience()).ok())
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .find(|e| e["type"] == "message")
        .expect("Bob shows it");
    assert_eq!(first["text"], "said once");
    let id = first["id"].as_str().expect("id").to_string();

    // Her `listen` sends it again under the same id (re-encrypted); Bob's device takes the copy
    // and acknowledges it (the server confirms that second acknowledgement from the message's
    // `DELIVERED` record: no second receipt), and shows nothing.
    let events = alice.listen_until(|events| has(events, "routed", &id));
    assert_eq!(routed(&events), vec![(id.clone(), "delivered".to_string())]);
    let confirmed = r#"tidings_acks_total{outcome="confirmed"} 2"#;
    assert!(
        crate::support::eventually(patience(), || {
            let (_, metrics) = crate::operations::get(server.metrics_port, "/metrics");
            metrics.lines().any(|line| line == confirmed)
        }),
        "the resent copy was not taken"
    );
    std::thread::sleep(Duration::from_secs(QUIET));
    listener.kill().expect("SIGKILL");
    let _ = listener.wait();
    let again: Vec<serde_json::Value> = bob_lines
        .try_iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(&line).ok())
        .filter(|e| e["type"] == "message")
        .collect();
    assert!(again.is_empty(), "shown again: {again:?}");
}

#[test]
fn a_one_shot_send_not_settled_in_time_says_so_and_listen_sends_it() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);

    // No time to wait for the answer: kept, and said so, in JSON and in text.
    let (answer, code) = alice.send(&bob_number, "first", &["--wait", "0"]);
    assert_eq!(code, 5, "{answer}");
    assert_eq!(answer["settled"], false, "{answer}");
    assert_eq!(
        answer["note"],
        "not yet settled: it will be sent again by `tidings listen`"
    );
    let out = alice.run(&["send", &bob_number, "second", "--wait", "0"]);
    assert_eq!(out.status.code(), Some(5));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("not yet settled: it will be sent again by `tidings listen`"),
        "{said}"
    );

    let events = alice.listen_until(|events| routed(events).len() >= 2);
    assert_eq!(routed(&events).len(), 2, "{events:?}");
    let mut texts: Vec<String> = bob
        .receive(2, PATIENCE)
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    texts.sort();
    assert_eq!(texts, vec!["first", "second"]);
    assert!(bob.receive(1, QUIET).is_empty(), "shown twice");
}
