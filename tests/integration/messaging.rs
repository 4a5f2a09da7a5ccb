//! Lookup, send, deliver, receipts, queues, restarts and duplicates (flows 3–5, promise P9).

use std::time::Duration;

use tidings_proto::frame::{Kind, SendOutcome};
use tidings_proto::id::MessageId;
use tokio::time::Instant;

use crate::support::{
    block_on, embedded_only, eventually, marker_comes_first, number, patience, signal, text,
    Server, User, PATIENCE, QUIET,
};

#[test]
fn lookup_in_all_three_states_and_accepted_with_receipt() {
    let server = Server::start(&[]);
    let (alice_number, bob_number, stranger) = (number(), number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);

    let states = alice.lookup(&[&bob_number, &stranger, "not a number"]);
    assert_eq!(states[0], (bob_number.clone(), "offline".into()));
    assert_eq!(states[1].1, "not_a_user");
    assert_eq!(states[2].1, "not_a_user");

    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let mut listener = bob.spawn(&["--json", "listen", "--count", "1", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));

    // Long enough that the receipt of a delivery to an online device cannot come too late on
    // a loaded machine; the send still ends as soon as the receipt is there.
    let (answer, code) = alice.send(&bob_number, "hello bob", &["--wait", &PATIENCE.to_string()]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["outcome"], "accepted");
    assert_eq!(answer["receipt"], "delivered");

    let out = listener.wait_with_output().expect("listener");
    let line = String::from_utf8_lossy(&out.stdout);
    let message: serde_json::Value =
        serde_json::from_str(line.lines().next().expect("a message")).expect("json");
    assert_eq!(message["text"], "hello bob");
    assert_eq!(message["from"], alice_number.as_str());
    assert_eq!(message["sender_verified"], true);
    listener = bob.spawn(&["listen", "--timeout", "1"]);
    let _ = listener.wait();
}

#[test]
fn queued_then_delivered_and_refused_stores_nothing() {
    let server = Server::start(&[]);
    let (alice_number, bob_number, stranger) = (number(), number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // He sends receipts to everyone (by default only to the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);

    let (answer, code) = alice.send(&bob_number, "kept for later", &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    let (answer, code) = alice.send(&bob_number, "only if online", &["--mode", "now-or-never"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("refused_not_reachable"), 3)
    );
    let (answer, code) = alice.send(&stranger, "nobody there", &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("not_a_user"), 3));

    let received = bob.receive(1, PATIENCE);
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["text"], "kept for later");
    // The refused messages were never stored, so nothing more arrives.
    assert!(bob.receive(1, QUIET).is_empty());
    // Alice gets her delivery receipt the next time she listens.
    let events = alice.listen_until(|events| events.iter().any(|e| e["type"] == "receipt"));
    assert!(
        events.iter().any(|e| e["kind"] == "delivered"),
        "{events:?}"
    );
}

#[test]
fn queued_message_survives_kill_9_and_restart() {
    let mut server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    for i in 0..5 {
        let (answer, _) = alice.send(&bob_number, &format!("durable {i}"), &[]);
        assert_eq!(answer["outcome"], "queued");
    }
    server.restart();
    let received = bob.receive(5, PATIENCE);
    let mut texts: Vec<String> = received
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default().to_string())
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        (0..5).map(|i| format!("durable {i}")).collect::<Vec<_>>()
    );
}

#[test]
fn queued_answers_come_only_after_their_sync() {
    if embedded_only("it reads the embedded engine's sync trace; on PostgreSQL a write is answered after its COMMIT") {
        return;
    }
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    let client = alice.client();
    block_on(async {
        let ids: Vec<[u8; 16]> = (0..50u8).map(|i| [i; 16]).collect();
        let batch: Vec<(MessageId, String)> = ids
            .iter()
            .map(|id| (MessageId(*id), "sync check".to_string()))
            .collect();
        let sends = client
            .prepare_sends(&bob_number, &batch)
            .await
            .expect("encrypt");
        let mut session = client.session(false).await.expect("session");
        // In one write, so that the server holds all of them at once and can batch their sync.
        session
            .send_many(sends.into_iter().map(Kind::Send))
            .await
            .expect("send");
        let deadline = Instant::now() + patience();
        let mut answered = 0;
        while answered < ids.len() {
            let Some(kind) = session.recv(deadline).await.expect("recv") else {
                panic!("answers missing")
            };
            if let Kind::SendResult(result) = kind {
                assert_eq!(result.outcome, SendOutcome::Queued as i32);
                // The sync that covers this message must already be recorded when its answer
                // arrives: the trace line is written after the fsync and before any answer.
                let trace = std::fs::read_to_string(server.sync_trace()).expect("trace");
                let id = tidings_proto::id::to_text(&result.id);
                assert!(
                    trace.contains(&id),
                    "answer for {id} arrived before its sync was recorded"
                );
                answered += 1;
            }
        }
        // Whether these syncs were shared depends on timing here (a session hands its sends to
        // storage in order); the store's own test shows concurrent writes share one sync.
    });
}

#[test]
fn no_duplicate_after_client_restart_or_resend() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    let bob_client = bob.client();
    block_on(async {
        // The same message id sent twice (a retry after a lost answer) is held once.
        let send = client
            .prepare_send(&bob_number, "exactly once", MessageId([7; 16]))
            .await
            .expect("encrypt");
        let mut session = client.session(false).await.expect("session");
        for _ in 0..2 {
            session.send(Kind::Send(send.clone())).await.expect("send");
        }
        let deadline = Instant::now() + patience();
        let mut answers = 0;
        while answers < 2 {
            if let Some(Kind::SendResult(r)) = session.recv(deadline).await.expect("recv") {
                assert_eq!(r.outcome, SendOutcome::Queued as i32);
                answers += 1;
            }
        }
        // Bob's device takes the delivery but "crashes" before acknowledging it.
        let mut bob_session = bob_client.session(true).await.expect("bob session");
        let deadline = Instant::now() + patience();
        loop {
            match bob_session.recv(deadline).await.expect("recv") {
                Some(Kind::Deliver(_)) => break,
                Some(_) => continue,
                None => panic!("no delivery"),
            }
        }
        drop(bob_session);
    });
    // The client is restarted: the message is delivered again and shown once.
    let first = bob.receive(1, PATIENCE);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["text"], "exactly once");
    assert!(bob.receive(5, QUIET).is_empty(), "shown twice");
}

#[test]
fn a_dead_connection_stops_counting_as_online() {
    let server = Server::start(&["--heartbeat-seconds", "1"]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let mut listener = bob.spawn(&["listen"]);
    // Alice's own lookup session lives under the same one-second heartbeat: on a loaded machine
    // the server may close it too, which is a lookup to ask again, not an answer.
    let presence = || {
        let out = alice.run(&["--json", "lookup", &bob_number]);
        let first = text(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        let answer: serde_json::Value = serde_json::from_str(&first).unwrap_or_default();
        answer["presence"].as_str().unwrap_or_default().to_string()
    };
    assert!(eventually(patience(), || presence() == "online"));
    // Freeze the listener: its socket stays open but it no longer speaks.
    signal(listener.id(), "STOP");
    let started = std::time::Instant::now();
    assert!(eventually(patience(), || presence() == "offline"));
    let took = started.elapsed();
    signal(listener.id(), "CONT");
    let _ = listener.kill();
    let _ = listener.wait();
    // Three silent heartbeat intervals, not less.
    assert!(
        took >= Duration::from_millis(1500),
        "closed after {took:?}, before three silent intervals"
    );
}

#[test]
fn an_expired_message_yields_an_expired_receipt() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (answer, _) = alice.send(&bob_number, "short-lived", &["--ttl", "1"]);
    assert_eq!(answer["outcome"], "queued");
    std::thread::sleep(Duration::from_millis(2500));
    // First the receipt (a send of Alice's would take it at login), then a message queued
    // after the expired one: shown first, so the expired one was not delivered.
    let events = alice.listen_until(|events| events.iter().any(|e| e["kind"] == "expired"));
    assert!(events.iter().any(|e| e["kind"] == "expired"), "{events:?}");
    marker_comes_first(&alice, &bob, "after the expiry");
}

/// A receipt for an earlier message, pushed at login while a send waits for its answer, is no
/// event of the new message: the message is sent once, not once more for every such frame.
#[test]
fn a_send_goes_once_while_receipts_of_earlier_messages_arrive() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);

    // Three messages Bob takes while Alice is away leave three receipts waiting for her.
    for text in ["one", "two", "three"] {
        let (answer, code) = alice.send(&bob_number, text, &[]);
        assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    }
    let mut listener = bob.spawn(&["listen", "--count", "3", "--timeout", &PATIENCE.to_string()]);
    assert!(listener.wait().expect("listener").success());

    // Her next send logs in, is handed those receipts first, and still goes once.
    let (answer, code) = alice.send(&bob_number, "four", &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    let (status, body) = crate::operations::get(server.metrics_port, "/metrics");
    assert_eq!(status, 200);
    let sends = r#"tidings_sends_total{outcome="queued"} 4"#;
    assert!(
        body.lines().any(|line| line == sends),
        "each message sent once: expected {sends} in\n{body}"
    );
}

/// Issue 28, item 11: a running `listen` outlives a `kill -9` and restart of the server on the
/// same port: it says on stderr that it is reconnecting, goes on, shows a message sent after the
/// restart, shows every message exactly once, and ends as `--count` asks, successfully.
#[test]
fn listen_reconnects_after_the_server_restarts_and_shows_each_message_once() {
    let mut server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let mut listener = bob.spawn(&["--json", "listen", "--count", "2"]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));
    let (answer, code) = alice.send(&bob_number, "before the restart", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    std::thread::sleep(Duration::from_millis(500));

    server.restart();
    if !eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online") {
        let _ = listener.kill();
        let out = listener.wait_with_output().expect("listen output");
        panic!(
            "bob's listen did not come back after the restart ({}): {}{}",
            out.status,
            crate::support::text(&out.stdout),
            crate::support::text(&out.stderr)
        );
    }
    let (answer, code) = alice.send(&bob_number, "after the restart", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");

    let deadline = std::time::Instant::now() + patience();
    while std::time::Instant::now() < deadline && matches!(listener.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = listener.kill();
    let out = listener.wait_with_output().expect("listen output");
    let (stdout, stderr) = (
        crate::support::text(&out.stdout),
        crate::support::text(&out.stderr),
    );
    assert!(out.status.success(), "listen failed: {stdout}\n{stderr}");
    assert!(stderr.contains("reconnecting"), "{stderr}");
    let mut texts: Vec<String> = stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["type"] == "message")
        .map(|v| v["text"].as_str().unwrap_or_default().to_string())
        .collect();
    texts.sort();
    assert_eq!(
        texts,
        ["after the restart", "before the restart"],
        "{stderr}"
    );
    // Nothing left over for a later run either.
    assert!(bob.receive(1, QUIET).is_empty());
}
