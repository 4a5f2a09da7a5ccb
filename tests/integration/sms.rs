//! SMS fallback through a real Kannel (bearerbox, smsbox, fakesmsc on loopback): a message gets
//! through over IP or as SMS, exactly once, and the sender learns which way it went.

use std::time::Duration;

use tidings_proto::frame::{self, AckStatus, Kind};
use tokio::time::Instant;

use crate::support::{
    block_on, eventually, files_containing, marker_comes_first, number, patience, text, ucs2,
    CuttableRelay, Kannel, Server, User, PATIENCE,
};

/// A registered user whose profile sends fallback SMS through `kannel`.
fn with_kannel(number: &str, server: &Server, kannel: &Kannel, extra: &[&str]) -> User {
    let user = User::register(number, server, &[]);
    let mut args: Vec<String> = kannel.settings_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    user.ok(&args);
    user
}

fn routed_send(user: &User, to: &str, body: &str, extra: &[&str]) -> (serde_json::Value, i32) {
    user.send(to, body, extra)
}

#[test]
fn a_registration_code_arrives_through_kannel() {
    let kannel = Kannel::start();
    let args = kannel.server_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args);
    let n = number();
    let user = User::new(&n);
    user.ok(&["register", &n, "--server", &server.url]);
    assert!(
        eventually(patience(), || !kannel.messages_to(&n).is_empty()),
        "{}",
        kannel.log()
    );
    let (from, data, parts) = kannel.messages_to(&n).remove(0);
    assert_eq!((from.as_str(), parts), ("Tidings", 1));
    let sms = String::from_utf8(data).expect("GSM text");
    let code: String = sms.chars().filter(char::is_ascii_digit).take(6).collect();
    assert!(sms.starts_with("Your Tidings code is "), "{sms}");
    user.ok(&["verify", &code]);
}

#[test]
fn offline_receiver_gets_an_sms_and_nothing_is_stored() {
    let kannel = Kannel::start();
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_kannel(&alice_number, &server, &kannel, &[]);
    let bob = User::register(&bob_number, &server, &[]);

    let short = "Running late, start without me";
    let long =
        "A long one: ".to_string() + &"the quick brown fox jumps over the lazy dog. ".repeat(6);
    let cyrillic = "Привет! Встречаемся у входа в восемь.";
    for body in [short, long.as_str(), cyrillic] {
        let (answer, code) = routed_send(&alice, &bob_number, body, &[]);
        assert_eq!(
            (answer["outcome"].as_str(), code),
            (Some("sent_as_sms"), 0),
            "{answer}"
        );
    }
    assert!(
        eventually(patience(), || kannel.messages_to(&bob_number).len() == 3),
        "{}",
        kannel.log()
    );
    let messages = kannel.messages_to(&bob_number);
    assert!(
        messages.iter().all(|(from, _, _)| from == &alice_number),
        "the sender id is the user's own number"
    );
    assert_eq!(messages[0].1, short.as_bytes());
    assert_eq!(messages[1].1, long.as_bytes());
    assert!(
        messages[1].2 >= 2,
        "the long text went as a concatenated SMS"
    );
    assert_eq!(messages[2].1, ucs2(cyrillic));
    // Refused over IP, so nothing was ever stored; Bob's device will not show it twice.
    std::thread::sleep(Duration::from_millis(400));
    assert!(files_containing(&server.data_dir(), short.as_bytes()).is_empty());
    marker_comes_first(&alice, &bob, "over ip now");
}

#[test]
fn online_receiver_gets_it_over_ip_and_no_sms() {
    let kannel = Kannel::start();
    let server = Server::start(&[]);
    let (alice_number, bob_number, stranger) = (number(), number(), number());
    // The receipt of a delivery to an online device cannot come too late on a loaded machine;
    // the send still ends as soon as it is there, and goes as SMS if it never comes.
    let receipt_timeout = PATIENCE.to_string();
    let alice = with_kannel(
        &alice_number,
        &server,
        &kannel,
        &["--receipt-timeout", &receipt_timeout],
    );
    let bob = User::register(&bob_number, &server, &[]);
    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let mut listener = bob.spawn(&["--json", "listen", "--count", "1", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));
    let wait = (2 * PATIENCE).to_string();
    let (answer, code) = routed_send(&alice, &bob_number, "over ip please", &["--wait", &wait]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("delivered"), 0),
        "{answer}"
    );
    let out = crate::support::wait_output(&mut listener, patience());
    assert!(out.contains("over ip please"), "{out}");
    // Not a user: straight to SMS.
    let (answer, _) = routed_send(&alice, &stranger, "are you there?", &[]);
    assert_eq!(answer["outcome"], "sent_as_sms");
    assert!(
        eventually(patience(), || kannel.messages_to(&stranger).len() == 1),
        "{}",
        kannel.log()
    );
    assert!(
        kannel.messages_to(&bob_number).is_empty(),
        "an SMS was sent although IP delivered"
    );
}

#[test]
fn receipt_timeout_withdraws_then_sms_and_the_receiver_never_shows_it() {
    let kannel = Kannel::start();
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_kannel(&alice_number, &server, &kannel, &["--receipt-timeout", "1"]);
    let bob = User::register(&bob_number, &server, &[]);
    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let bob_client = bob.client();
    let secret = "withdrawn before anyone saw it";
    block_on(async {
        // Bob's device is online but slow: it takes the delivery and acknowledges only later.
        let mut session = bob_client.session(true).await.expect("bob");
        let sender = {
            let alice_number = bob_number.clone();
            let profile = alice.profile.path().to_path_buf();
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(crate::support::BIN)
                    .arg("--profile")
                    .arg(profile)
                    .args(["--json", "send", &alice_number, secret])
                    .env("TIDINGS_PASSPHRASE", crate::support::PASSPHRASE)
                    .output()
                    .expect("send")
            })
        };
        let deadline = Instant::now() + patience();
        let deliver = loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::Deliver(deliver)) => break deliver,
                Some(_) => continue,
                None => panic!("no delivery"),
            }
        };
        let out = sender.await.expect("join");
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert_eq!(answer["outcome"], "sent_as_sms", "{answer}");
        // Now the late acknowledgement: the server says the message was withdrawn.
        session
            .send(Kind::Ack(frame::Ack {
                sender_device: deliver.sender_device,
                id: deliver.id,
                ..Default::default()
            }))
            .await
            .expect("ack");
        loop {
            if let Some(Kind::AckResult(result)) = session.recv(deadline).await.expect("recv") {
                assert_eq!(result.status, AckStatus::Withdrawn as i32);
                break;
            }
        }
    });
    assert!(eventually(patience(), || kannel
        .messages_to(&bob_number)
        .len()
        == 1));
    // Bob's real client, connecting later, never shows the withdrawn message.
    marker_comes_first(&alice, &bob, "after the withdrawal");
    assert!(eventually(patience(), || files_containing(
        &server.data_dir(),
        secret.as_bytes()
    )
    .is_empty()));
}

/// Issue 28, item 13: a receiver that stored a message but never had its acknowledgement
/// confirmed (here the acknowledgement is lost on the way, then the receiver is killed) must not
/// show it at its next start if the sender meanwhile withdrew it and sent it as SMS.
#[test]
fn a_stored_but_unconfirmed_message_the_sender_withdrew_is_never_shown_after_a_restart() {
    let server = Server::start(&[]);
    let relay = CuttableRelay::start(&server);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let outbox = alice.profile.path().join("sms-outbox");
    alice.ok(&[
        "settings",
        "--sms-outbox",
        outbox.to_str().expect("utf8"),
        // Time enough for Bob's listening device to take and store the message before the
        // sender gives up on the receipt, even on a loaded machine.
        "--receipt-timeout",
        "20",
    ]);
    // Bob reaches the server through the relay.
    let bob = User::new(&bob_number);
    bob.ok(&["register", &bob_number, "--server", &relay.url]);
    bob.ok(&["verify", &server.code_for(&bob_number)]);
    // A first message, so that Bob's device knows Alice's and stores the next one at once.
    let (answer, _) = alice.send(&bob_number, "hello first", &["--route", "ip-only"]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(bob.receive_texts(1, PATIENCE), ["hello first"]);

    // Shows himself online to everyone (the default is only the people he wrote to).
    bob.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let mut listener = bob.spawn(&["--json", "listen", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));
    // From now on nothing Bob's device sends reaches the server: its acknowledgement is lost.
    relay.cut(true);
    let secret = "stored, never confirmed, then withdrawn";
    let wait = PATIENCE.to_string();
    let (answer, code) = alice.send(&bob_number, secret, &["--wait", &wait]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sent_as_sms"), 0),
        "{answer}"
    );
    // Bob's device did store it (and would have shown it only on CONFIRMED).
    let bob_client = bob.client();
    assert!(eventually(patience(), || bob_client
        .inbox()
        .expect("inbox")
        .history()
        .expect("history")
        .iter()
        .any(|m| m.text == secret)));
    let _ = listener.kill();
    let out = listener.wait_with_output().expect("listen output");
    assert!(!text(&out.stdout).contains(secret), "{}", text(&out.stdout));
    relay.cut(false);
    // Restarted, Bob's listen asks the server again and is told the message was withdrawn: it
    // asks before it takes anything new, so a message queued now is the first it shows.
    marker_comes_first(&alice, &bob, "after the withdrawal");
    assert_eq!(std::fs::read_dir(&outbox).expect("outbox").count(), 1);
}

#[test]
fn ip_only_queues_and_delayed_fallback_fires_later() {
    let kannel = Kannel::start();
    let server = Server::start(&[]);
    let (alice_number, bob_number, carol_number) = (number(), number(), number());
    let alice = with_kannel(&alice_number, &server, &kannel, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);

    let (answer, code) = routed_send(
        &alice,
        &bob_number,
        "ip only, please",
        &["--route", "ip-only"],
    );
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    assert_eq!(bob.receive(1, PATIENCE)[0]["text"], "ip only, please");

    // Queue over IP, fall back to SMS if still undelivered after 2 seconds. The send command
    // returns before that; the long-running `listen` carries the fallback out.
    let (answer, code) = routed_send(
        &alice,
        &carol_number,
        "fall back later",
        &[
            "--route",
            "queue-then-sms",
            "--fallback-after",
            "2s",
            "--wait",
            "1",
        ],
    );
    assert_eq!(
        (answer["pending"].as_bool(), code),
        (Some(true), 5),
        "{answer}"
    );
    assert!(kannel.messages_to(&carol_number).is_empty());
    let events = alice.listen_until(|events| events.iter().any(|e| e["type"] == "routed"));
    assert!(
        events.iter().any(|e| e["outcome"] == "sent_as_sms"),
        "{events:?}"
    );
    assert!(eventually(patience(), || kannel
        .messages_to(&carol_number)
        .len()
        == 1));
    // Carol, connecting later, never sees the withdrawn IP copy.
    marker_comes_first(&alice, &carol, "after the fallback");
}

#[test]
fn kannel_down_is_a_clear_failure_and_the_message_is_kept_for_retry() {
    let mut kannel = Kannel::start();
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_kannel(&alice_number, &server, &kannel, &[]);
    User::register(&bob_number, &server, &[]);
    kannel.stop_smsbox();
    let (answer, code) = routed_send(&alice, &bob_number, "kept for retry", &["--wait", "3"]);
    assert_eq!(code, 5, "{answer}");
    assert_eq!(answer["pending"], true);
    assert!(
        answer["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("unavailable"),
        "{answer}"
    );
    kannel.start_smsbox();
    let events = alice.listen_until(|events| events.iter().any(|e| e["type"] == "routed"));
    assert!(
        events.iter().any(|e| e["outcome"] == "sent_as_sms"),
        "{events:?}"
    );
    assert!(
        eventually(patience(), || kannel.messages_to(&bob_number).len() == 1),
        "{}",
        kannel.log()
    );
    assert_eq!(kannel.messages_to(&bob_number)[0].1, b"kept for retry");
}

#[test]
fn sms_only_through_the_outbox_and_the_part_limit() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let outbox = alice.profile.path().join("sms-outbox");
    alice.ok(&[
        "settings",
        "--sms-outbox",
        outbox.to_str().expect("utf8"),
        "--max-sms-parts",
        "2",
    ]);
    let (answer, code) = alice.send(&bob_number, "by SMS only", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sent_as_sms"), 0),
        "{answer}"
    );
    let files: Vec<_> = std::fs::read_dir(&outbox)
        .expect("outbox")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let sms: serde_json::Value =
        serde_json::from_slice(&std::fs::read(files[0].path()).expect("sms")).expect("json");
    assert_eq!(
        (
            sms["from"].as_str(),
            sms["to"].as_str(),
            sms["text"].as_str()
        ),
        (
            Some(alice_number.as_str()),
            Some(bob_number.as_str()),
            Some("by SMS only")
        )
    );
    // Three parts' worth of text against a limit of two: a clear error, nothing sent.
    let (answer, code) = alice.send(&bob_number, &"x".repeat(400), &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sms_rejected"), 3),
        "{answer}"
    );
    assert!(
        answer["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("needs 3 SMS parts; at most 2"),
        "{answer}"
    );
    assert_eq!(std::fs::read_dir(&outbox).expect("outbox").count(), 1);
}
