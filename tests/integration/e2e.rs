//! Issue 3: end-to-end encryption and several devices per number, through the real server and
//! the real CLI: fan-out to every device, tampering and replay, one-time and fallback keys, stale
//! device lists, identity changes, linking and removing devices, and a receiver killed mid-flow.

use std::collections::BTreeSet;
use std::time::Duration;

use tidings_client::ClientError;
use tidings_proto::frame::{self, ErrorCode, Kind, SendOutcome};
use tidings_proto::id::{DeviceId, MessageId};
use tokio::time::Instant;

use crate::support::{block_on, eventually, number, patience, text, Server, User, PATIENCE, QUIET};

/// Sends one prepared frame on a fresh session and returns the server's answer.
async fn send_raw(client: &tidings_client::client::Client, send: frame::Send) -> frame::SendResult {
    let mut session = client.session(false).await.expect("session");
    let id = send.id.clone();
    session.send(Kind::Send(send)).await.expect("send");
    let deadline = Instant::now() + patience();
    loop {
        match session.recv(deadline).await.expect("recv") {
            Some(Kind::SendResult(result)) if result.id == id => return result,
            Some(_) => {}
            None => panic!("no answer to a send"),
        }
    }
}

#[test]
fn two_users_with_two_devices_each_see_every_message_once() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let alice_laptop = alice.link_device(&server);
    let bob = User::register(&number(), &server, &[]);
    let bob_laptop = bob.link_device(&server);

    let sends = [
        (&alice, &bob.number, "from alice's phone"),
        (&alice_laptop, &bob.number, "from alice's laptop"),
        (&bob, &alice.number, "from bob's phone"),
        (&bob_laptop, &alice.number, "from bob's laptop"),
    ];
    for (sender, to, body) in sends {
        let (answer, code) = sender.send(to, body, &[]);
        assert_eq!(code, 0, "{answer}");
        // Three copies: the receiver's two devices and the sender's other one.
        assert_eq!(answer["copies"], 3, "{answer}");
    }
    // Every device shows every message it did not send itself, once.
    for (device, sent) in [
        (&alice, "from alice's phone"),
        (&alice_laptop, "from alice's laptop"),
        (&bob, "from bob's phone"),
        (&bob_laptop, "from bob's laptop"),
    ] {
        let mut expected: Vec<String> = sends
            .iter()
            .map(|(_, _, body)| body.to_string())
            .filter(|body| body != sent)
            .collect();
        expected.sort();
        let shown = device.receive(3, PATIENCE);
        let mut texts: Vec<String> = shown
            .iter()
            .map(|m| m["text"].as_str().unwrap_or_default().to_string())
            .collect();
        texts.sort();
        assert_eq!(texts, expected);
        assert!(
            shown.iter().all(|m| m["warning"].is_null()),
            "a genuine message was flagged: {shown:?}"
        );
        assert!(
            device.receive(1, QUIET).is_empty(),
            "a message was shown twice"
        );
    }
}

#[test]
fn tampered_and_replayed_ciphertexts_are_rejected_and_never_shown() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let client = alice.client();
    let (tampered, replayed) = block_on(async {
        let genuine = client
            .prepare_send(&bob.number, "genuine", MessageId([1; 16]))
            .await
            .expect("encrypt");
        assert_eq!(
            send_raw(&client, genuine.clone()).await.outcome,
            SendOutcome::Queued as i32
        );
        let mut tampered = client
            .prepare_send(&bob.number, "tampered", MessageId([2; 16]))
            .await
            .expect("encrypt");
        let mut payload = tampered.copies[0].payload.to_vec();
        let middle = payload.len() / 2;
        payload[middle] ^= 0x20;
        tampered.copies[0].payload = payload.into();
        // The same ciphertext as the genuine message, under a new id.
        let mut replay = genuine;
        replay.id = vec![3; 16];
        let truncated = {
            let mut send = client
                .prepare_send(&bob.number, "truncated", MessageId([4; 16]))
                .await
                .expect("encrypt");
            let payload = send.copies[0].payload.slice(..20);
            send.copies[0].payload = payload;
            send
        };
        for send in [tampered, replay, truncated] {
            assert_eq!(
                send_raw(&client, send).await.outcome,
                SendOutcome::Queued as i32
            );
        }
        (MessageId([2; 16]).to_text(), MessageId([3; 16]).to_text())
    });
    // A genuine message queued after the bad ones: deliveries come in queue order, and a
    // message is shown only once the server confirmed its acknowledgement, so when it is shown
    // every bad copy before it was handled and acknowledged.
    let (answer, _) = alice.send(&bob.number, "after the bad ones", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    let seen = bob.listen_events(2, PATIENCE);
    let messages: Vec<&serde_json::Value> =
        seen.iter().filter(|e| e["type"] == "message").collect();
    assert_eq!(messages.len(), 2, "{seen:?}");
    assert_eq!(messages[0]["text"], "genuine");
    assert_eq!(messages[1]["text"], "after the bad ones");
    let rejected: BTreeSet<String> = seen
        .iter()
        .filter(|e| e["type"] == "rejected")
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(rejected.contains(&tampered), "{seen:?}");
    assert!(rejected.contains(&replayed), "{seen:?}");
    assert_eq!(rejected.len(), 3, "{seen:?}");
    // Rejected copies were acknowledged and deleted: nothing comes back, and messages still flow.
    assert!(bob.listen_events(1, QUIET).is_empty());
    let (answer, _) = alice.send(&bob.number, "after the noise", &[]);
    assert_eq!(answer["outcome"], "queued");
    assert_eq!(bob.receive_texts(1, PATIENCE), vec!["after the noise"]);
}

#[test]
fn one_time_keys_are_handed_out_once_then_the_fallback_key_and_claims_are_limited() {
    let server = Server::start(&["--key-claim-burst", "56"]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let carol_client = carol.client();
    block_on(async {
        let mut session = carol_client.session(false).await.expect("session");
        // A claim for a device that does not exist is refused, and hands out nothing.
        let bogus = DeviceId([0xEE; 16]);
        match carol_client
            .claim(&mut session, &alice.number, &[bogus])
            .await
        {
            Err(ClientError::Refused(message)) => {
                assert!(message.contains("no such device"), "{message}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        let mut one_time = BTreeSet::new();
        let mut fallback = BTreeSet::new();
        for _ in 0..55 {
            let claimed = carol_client
                .claim(&mut session, &bob.number, &[])
                .await
                .expect("claim");
            assert_eq!(claimed.len(), 1);
            let key = claimed[0].key.clone().expect("a key").public_key;
            if claimed[0].fallback {
                fallback.insert(key);
            } else {
                assert!(one_time.insert(key), "a one-time key was handed out twice");
            }
        }
        // 50 one-time keys, each once; then the same fallback key again and again.
        assert_eq!(one_time.len(), 50);
        assert_eq!(fallback.len(), 1);
        // Draining another user's keys runs into the claim limit, which says when to try again.
        match carol_client.claim(&mut session, &bob.number, &[]).await {
            Err(ClientError::RetryLater {
                message,
                retry_after,
            }) => {
                assert!(message.contains("too many"), "{message}");
                assert!(retry_after > std::time::Duration::ZERO);
            }
            other => panic!("expected the claim limit, got {other:?}"),
        }
    });
    // With no one-time key left, a new session opens on the fallback key and decrypts.
    let (answer, _) = alice.send(&bob.number, "on the fallback key", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(bob.receive_texts(1, PATIENCE), vec!["on the fallback key"]);
    // Bob's device replenished its one-time keys when it came online.
    let alice_client = alice.client();
    block_on(async {
        let mut session = alice_client.session(false).await.expect("session");
        let claimed = alice_client
            .claim(&mut session, &bob.number, &[])
            .await
            .expect("claim");
        assert!(!claimed[0].fallback, "one-time keys were not replenished");
    });
}

/// The refusal a key upload gets.
async fn refusal(
    session: &mut tidings_client::session::Session,
    upload: frame::KeysUpload,
) -> String {
    let request_id = upload.request_id;
    match session
        .call(Kind::KeysUpload(upload), request_id)
        .await
        .expect("answer")
    {
        Kind::Error(e) => {
            assert_eq!(e.code, ErrorCode::InvalidRequest as i32);
            e.message
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn keys_with_a_bad_signature_are_refused_by_the_server() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let devices = client
            .directory(&mut session, &alice.number)
            .await
            .expect("directory");
        let upload = frame::KeysUpload {
            request_id: 7,
            identity_key: devices[0].identity_key.clone(),
            signing_key: devices[0].signing_key.clone(),
            one_time_keys: vec![frame::SignedKey {
                public_key: vec![9; 32],
                signature: vec![1; 64],
            }],
            fallback_key: None,
            contact_token_hash: Vec::new(),
        };
        let message = refusal(&mut session, upload.clone()).await;
        assert!(message.contains("signature"), "{message}");
        let mut too_many = upload;
        too_many.request_id = 8;
        too_many.one_time_keys = vec![too_many.one_time_keys[0].clone(); 101];
        let message = refusal(&mut session, too_many).await;
        assert!(message.contains("at most"), "{message}");
    });
}

#[test]
fn a_stale_device_list_is_refused_with_the_difference_and_the_retry_succeeds() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let (answer, _) = alice.send(&bob.number, "to the phone", &[]);
    assert_eq!(answer["copies"], 1, "{answer}");
    // Bob links a laptop: Alice's list is stale (a missing device). The send is refused, her
    // client claims the laptop's keys and sends again. The laptop's key is new to Alice but was
    // vouched for by Bob's phone, which she trusts: no safety-number stop.
    let bob_laptop = bob.link_device(&server);
    let (answer, code) = alice.send(&bob.number, "to both", &[]);
    assert_eq!((code, answer["copies"].clone()), (0, 2.into()), "{answer}");

    // A copy list without the laptop is refused, naming exactly the laptop.
    let laptop_id = tidings_proto::id::from_text(&bob_laptop.device_id()).expect("id");
    let client = alice.client();
    let result = block_on(async {
        let mut send = client
            .prepare_send(&bob.number, "incomplete", MessageId([5; 16]))
            .await
            .expect("encrypt");
        send.copies.retain(|copy| copy.device_id != laptop_id);
        send_raw(&client, send).await
    });
    assert_eq!(result.outcome, SendOutcome::DevicesChanged as i32);
    assert_eq!(result.missing_devices, vec![laptop_id.clone()]);
    assert!(result.extra_devices.is_empty() && result.missing_own_devices.is_empty());

    // Bob removes his laptop: Alice's list is stale (an extra device), the retry succeeds.
    bob.ok(&["devices", "--remove", &bob_laptop.device_id()]);
    let (answer, code) = alice.send(&bob.number, "after the removal", &[]);
    assert_eq!((code, answer["copies"].clone()), (0, 1.into()), "{answer}");
    // Alice links a laptop of her own: her phone learns of it from the refused send.
    let alice_laptop = alice.link_device(&server);
    let (answer, code) = alice.send(&bob.number, "with my laptop", &[]);
    assert_eq!((code, answer["copies"].clone()), (0, 2.into()), "{answer}");
    let mut got = bob.receive_texts(4, PATIENCE);
    got.sort();
    assert_eq!(
        got,
        vec![
            "after the removal",
            "to both",
            "to the phone",
            "with my laptop"
        ]
    );
    // Alice's new laptop was vouched for by her phone: what it sends reaches Bob unflagged.
    let (answer, code) = alice_laptop.send(&bob.number, "from my laptop", &[]);
    assert_eq!(code, 0, "{answer}");
    let shown = bob.receive(1, PATIENCE);
    assert!(shown[0]["warning"].is_null(), "{shown:?}");
    assert_eq!(
        alice_laptop.receive_texts(1, PATIENCE),
        vec!["with my laptop"]
    );
}

#[test]
fn an_identity_change_is_detected_before_sending_and_warned_on_receipt() {
    let server = Server::start(&["--code-interval-seconds", "1", "--codes-per-number", "10"]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let (answer, _) = alice.send(&bob.number, "first", &[]);
    assert_eq!(answer["outcome"], "queued");
    assert_eq!(bob.receive_texts(1, PATIENCE), vec!["first"]);
    let before = alice.ok(&["--json", "fingerprint", &bob.number]);

    // Bob gets a new phone: a new registration, new keys.
    std::thread::sleep(Duration::from_millis(1100));
    let new_phone = User::register(&bob.number, &server, &[]);
    let out = alice.run(&["send", &bob.number, "are you still you?"]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(
        error.contains("safety number") && error.contains("changed"),
        "{error}"
    );
    let after = alice.ok(&["--json", "fingerprint", &bob.number]);
    let field = |json: &str, key: &str| {
        serde_json::from_str::<serde_json::Value>(json.trim()).expect("json")[key].clone()
    };
    assert_ne!(
        field(&before, "safety_number"),
        field(&after, "safety_number")
    );
    assert_eq!(field(&after, "untrusted_keys"), 1);
    // Bob's new phone writes first: Alice sees the message with a warning.
    let (answer, _) = new_phone.send(&alice.number, "new phone, same bob", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    let shown = alice.receive(1, PATIENCE);
    assert!(
        shown[0]["warning"]
            .as_str()
            .is_some_and(|w| w.contains("changed")),
        "{shown:?}"
    );
    let plain = alice.run(&["listen", "--timeout", "1"]);
    assert!(plain.status.success());
    // Once Alice has compared and trusts the new key, sending works again.
    alice.ok(&["trust", &bob.number]);
    let (answer, code) = alice.send(&bob.number, "welcome back", &[]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(new_phone.receive_texts(1, PATIENCE), vec!["welcome back"]);
}

#[test]
fn a_linked_device_receives_and_a_removed_one_no_longer_does() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let laptop = alice.link_device(&server);
    let listed = alice.ok(&["--json", "devices"]);
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let bob = User::register(&number(), &server, &[]);
    let (answer, _) = bob.send(&alice.number, "to all of alice", &[]);
    assert_eq!(answer["copies"], 2);
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["to all of alice"]);
    assert_eq!(laptop.receive_texts(1, PATIENCE), vec!["to all of alice"]);

    // A message waits in the laptop's queue when it is removed: it goes with it.
    let (answer, _) = bob.send(&alice.number, "before the removal", &[]);
    assert_eq!(answer["copies"], 2);
    let laptop_id = laptop.device_id();
    alice.ok(&["devices", "--remove", &laptop_id]);
    assert_eq!(alice.ok(&["--json", "devices"]).lines().count(), 1);
    let (answer, _) = bob.send(&alice.number, "after the removal", &[]);
    assert_eq!(answer["copies"], 1, "{answer}");
    let mut got = alice.receive_texts(2, PATIENCE);
    got.sort();
    assert_eq!(got, vec!["after the removal", "before the removal"]);
    // Refused at login: the run ends at once, long before its timeout.
    let out = laptop.run(&["listen", "--timeout", &PATIENCE.to_string()]);
    assert!(!out.status.success(), "a removed device still listens");
    assert!(
        text(&out.stderr).contains("no longer registered"),
        "{}",
        text(&out.stderr)
    );
    // Nothing addressed to the removed device remains on the server.
    let raw = tidings_proto::id::from_text(&laptop_id).expect("id");
    assert!(eventually(patience(), || {
        crate::support::files_containing(&server.data_dir(), &raw).is_empty()
    }));
}

#[test]
fn a_receiver_killed_mid_session_decrypts_everything_after_restart() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let total = 40u8;
    let client = alice.client();
    block_on(async {
        let batch: Vec<(MessageId, String)> = (0..total)
            .map(|i| (MessageId([i; 16]), format!("m{i:02}")))
            .collect();
        let sends = client
            .prepare_sends(&bob.number, &batch)
            .await
            .expect("encrypt");
        let mut session = client.session(false).await.expect("session");
        for send in sends {
            session.send(Kind::Send(send)).await.expect("send");
        }
        let deadline = Instant::now() + patience();
        let mut answered = 0;
        while answered < total {
            if let Some(Kind::SendResult(_)) = session.recv(deadline).await.expect("recv") {
                answered += 1;
            }
        }
    });
    // The receiver works through its queue and is killed (SIGKILL: no chance to tidy up)
    // right after it showed its first message.
    let mut listener = bob.spawn(&["--json", "listen"]);
    let stdout = listener.stdout.take().expect("stdout");
    let (lines, seen) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)).map_while(Result::ok) {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let first = seen.recv_timeout(patience()).expect("a first message");
    let _ = listener.kill();
    let _ = listener.wait();
    let _ = reader.join();
    let mut shown: Vec<String> = std::iter::once(first)
        .chain(seen.try_iter())
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .filter(|v| v["type"] == "message")
        .map(|v| v["text"].as_str().unwrap_or_default().to_string())
        .collect();
    let before = shown.len();
    let out = bob.run(&[
        "--json",
        "listen",
        "--count",
        &(usize::from(total) - before).to_string(),
        "--timeout",
        &PATIENCE.to_string(),
    ]);
    let after: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect();
    let rejected: Vec<&serde_json::Value> =
        after.iter().filter(|e| e["type"] == "rejected").collect();
    assert!(
        rejected.is_empty(),
        "rejected after the restart: {rejected:?}"
    );
    shown.extend(
        after
            .iter()
            .filter(|e| e["type"] == "message")
            .map(|e| e["text"].as_str().unwrap_or_default().to_string()),
    );
    let mut unique = shown.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), shown.len(), "a message was shown twice");
    // Everything was decrypted and kept. Showing is at most once: a message marked shown just
    // as the kill came may miss its line, never appear twice.
    let inbox = tidings_client::inbox::Inbox::open(
        bob.profile.path(),
        &tidings_client::vault::Passphrase::new(crate::support::PASSPHRASE),
    )
    .expect("inbox");
    let mut kept: Vec<String> = inbox
        .history()
        .expect("history")
        .into_iter()
        .map(|m| m.text)
        .collect();
    kept.sort();
    let all: Vec<String> = (0..total).map(|i| format!("m{i:02}")).collect();
    assert_eq!(kept, all, "{before} shown before the kill");
    assert!(
        unique.len() + 1 >= all.len(),
        "more than the one message in flight at the kill went unshown: {unique:?}"
    );
    // And the sessions still work both ways.
    let (answer, _) = bob.send(&alice.number, "still in sync", &[]);
    assert_eq!(answer["outcome"], "queued");
    assert_eq!(alice.receive_texts(1, PATIENCE), vec!["still in sync"]);
}
