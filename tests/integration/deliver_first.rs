//! Deliver first (issue 30): a message whose every copy goes to a device online now is pushed
//! with no disk write, answered `ACCEPTED` but not settled, and settled once each copy is decided
//! (its device acknowledged it and the `DELIVERED` record is durable) or stored (its window
//! ended); an acknowledgement the server never recorded is answered `UNKNOWN`.

use tidings_proto::frame::{AckStatus, Kind, SendOutcome};
use tidings_proto::id::{to_text, MessageId};
use tokio::time::Instant;

use crate::support::{
    block_on, embedded_only, eventually, number, patience, Server, User, PATIENCE,
};

/// What the sync trace says about a message: whether a sync ever made it durable.
fn stored(server: &Server, id: &MessageId) -> bool {
    std::fs::read_to_string(server.sync_trace())
        .unwrap_or_default()
        .contains(&to_text(id.as_bytes()))
}

/// Bob writes to Alice first, so that Alice holds his contact token: her sends to him are then a
/// contact's, which deliver first takes (a stranger's message is always stored).
fn acquainted(alice: &User, bob: &User) {
    let (answer, code) = bob.send(&alice.number, "hello alice", &[]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["hello alice"]);
}

/// Alice sends `text` as message `id` to Bob, whose device takes it in a session that never
/// acknowledges: Bob's session, Alice's session, and the delivery.
async fn sent_to_a_silent_device(
    sender: &tidings_client::client::Client,
    receiver: &tidings_client::client::Client,
    receiver_number: &str,
    id: MessageId,
    text: &str,
) -> (
    tidings_client::session::Session,
    tidings_client::session::Session,
    tidings_proto::frame::Deliver,
) {
    let mut silent = receiver
        .session(true)
        .await
        .expect("the receiver's session");
    let sends = sender
        .prepare_sends(receiver_number, &[(id, text.to_string())])
        .await
        .expect("encrypt");
    let mut session = sender.session(false).await.expect("session");
    session
        .send_many(sends.into_iter().map(Kind::Send))
        .await
        .expect("send");
    let deadline = Instant::now() + patience();
    loop {
        match silent.recv(deadline).await.expect("recv") {
            Some(Kind::Deliver(d)) if d.id == id.as_bytes() => return (silent, session, d),
            Some(_) => {}
            None => panic!("no delivery"),
        }
    }
}

/// A metric's value in `/metrics`, 0 if absent.
fn metric(server: &Server, line_start: &str) -> u64 {
    let (_, body) = crate::operations::get(server.metrics_port, "/metrics");
    body.lines()
        .find_map(|line| line.strip_prefix(line_start))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_message_to_devices_online_is_pushed_with_no_disk_write_and_settled_once_decided() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    acquainted(&alice, &bob);
    bob.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let listener = bob.spawn(&["--json", "listen", "--count", "1", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));

    let client = alice.client();
    let id = MessageId([7; 16]);
    block_on(async {
        let sends = client
            .prepare_sends(&bob_number, &[(id, "pushed, never written".to_string())])
            .await
            .expect("encrypt");
        let mut session = client.session(false).await.expect("session");
        session
            .send_many(sends.into_iter().map(Kind::Send))
            .await
            .expect("send");
        let deadline = Instant::now() + patience();
        let (mut answered, mut settled, mut receipt) = (false, false, false);
        while !(answered && settled && receipt) {
            let Some(kind) = session.recv(deadline).await.expect("recv") else {
                panic!("answered {answered}, settled {settled}, receipt {receipt}")
            };
            match kind {
                Kind::SendResult(result) => {
                    assert_eq!(result.outcome, SendOutcome::Accepted as i32);
                    assert!(!result.settled, "held: a Settled follows");
                    assert!(!settled, "the answer comes before the Settled");
                    answered = true;
                }
                Kind::Settled(s) if s.ids.iter().any(|s| s == id.as_bytes()) => settled = true,
                Kind::Receipt(r) if r.id == id.as_bytes() => receipt = true,
                _ => {}
            }
        }
    });
    let out = listener.wait_with_output().expect("listener");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("pushed, never written"),
        "shown once its record was durable"
    );
    assert!(!stored(&server, &id), "a held message is never written");
    assert_eq!(
        metric(&server, r#"tidings_held_copies_total{outcome="decided"} "#),
        1
    );
}

#[test]
fn a_held_copy_not_acknowledged_within_the_window_is_stored_and_delivered_later() {
    if embedded_only("it reads the embedded engine's sync trace to see when a copy was stored") {
        return;
    }
    let server = Server::start(&["--ack-window-ms", "300"]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    acquainted(&alice, &bob);
    bob.ok(&["settings", "--presence", "everyone"]);
    let id = MessageId([8; 16]);
    let (sender, receiver) = (alice.client(), bob.client());
    block_on(async {
        // Bob's device takes the copy and never acknowledges it.
        let (_silent, mut session, _) =
            sent_to_a_silent_device(&sender, &receiver, &bob_number, id, "waits on disk").await;
        let deadline = Instant::now() + patience();
        let mut answered = false;
        loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => {
                    assert_eq!(result.outcome, SendOutcome::Accepted as i32);
                    assert!(!result.settled);
                    assert!(!stored(&server, &id), "not written while in its window");
                    answered = true;
                }
                // Settled once stored: the trace line comes before any answer of its sync.
                Some(Kind::Settled(s)) if s.ids.iter().any(|s| s == id.as_bytes()) => {
                    assert!(answered);
                    assert!(stored(&server, &id), "settled because it was stored");
                    break;
                }
                Some(_) => {}
                None => panic!("never settled"),
            }
        }
    });
    assert_eq!(
        metric(&server, r#"tidings_held_copies_total{outcome="stored"} "#),
        1
    );
    // The stored copy reaches Bob's device at its next session, and is shown.
    assert_eq!(bob.receive_texts(1, PATIENCE), vec!["waits on disk"]);
}

#[test]
fn an_acknowledgement_the_server_never_recorded_is_answered_unknown_after_a_crash() {
    let mut server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    acquainted(&alice, &bob);
    bob.ok(&["settings", "--presence", "everyone"]);
    let id = MessageId([9; 16]);
    let (sender, receiver) = (alice.client(), bob.client());
    let deliver = block_on(async {
        let (_, _, deliver) =
            sent_to_a_silent_device(&sender, &receiver, &bob_number, id, "lost with the server")
                .await;
        deliver
    });
    // The server dies holding the copy: nothing of it was written.
    server.kill9();
    server.restart();
    block_on(async {
        let mut session = receiver.session(true).await.expect("bob's session again");
        session
            .send(Kind::Ack(tidings_proto::frame::Ack {
                sender_device: deliver.sender_device.clone(),
                id: deliver.id.clone(),
                discard: false,
                no_receipt: false,
            }))
            .await
            .expect("ack");
        let deadline = Instant::now() + patience();
        loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::AckResult(result)) => {
                    assert_eq!(
                        result.status,
                        AckStatus::Unknown as i32,
                        "no record: the device must not show it"
                    );
                    break;
                }
                Some(_) => {}
                None => panic!("no answer"),
            }
        }
    });
}
