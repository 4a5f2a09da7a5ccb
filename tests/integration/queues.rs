//! Issue 28, items 4 and 5: no one sender can fill a victim's queue, and a spoofed sender costs
//! the victim nothing. The attacker speaks the protocol directly (a raw session), as the CLI
//! never would; everyone else uses the CLI.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::time::Duration;

use bytes::Bytes;
use tidings_proto::frame::{self, Kind, SendOutcome};
use tidings_proto::id::DeviceId;
use tokio::time::Instant;

use crate::support::{block_on, embedded_only, number, Server, User};

/// Sends `count` messages of `size` bytes from `sender` to `to`, each with one copy (opaque bytes:
/// the server never reads them) per device of `devices`, pipelined on one session; the outcome of
/// each, in the order sent (see [`answers`] for the whole answers). Message ids are made from the receiver's number, so floods to
/// different receivers never repeat one.
async fn flood(
    sender: &tidings_client::client::Client,
    to: &str,
    devices: &[DeviceId],
    count: usize,
    size: usize,
) -> Vec<i32> {
    answers(sender, to, devices, count, size)
        .await
        .iter()
        .map(|answer| answer.outcome)
        .collect()
}

/// [`flood`], with the server's whole answer to each send.
pub async fn answers(
    sender: &tidings_client::client::Client,
    to: &str,
    devices: &[DeviceId],
    count: usize,
    size: usize,
) -> Vec<frame::SendResult> {
    let mut session = sender.session(false).await.expect("session");
    let to_account = crate::support::account_of(sender, &mut session, to).await;
    let payload = Bytes::from(vec![0x5a; size]);
    let id_of = |n: usize| {
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&to.as_bytes()[to.len() - 8..]);
        id[..8].copy_from_slice(&(n as u64).to_be_bytes());
        id.to_vec()
    };
    let mut outcomes = HashMap::new();
    for first in (0..count).step_by(100) {
        let batch = first..(first + 100).min(count);
        let sends = batch.clone().map(|n| {
            Kind::Send(frame::Send {
                id: id_of(n),
                to_account: to_account.clone(),
                mode: frame::SendMode::Queue as i32,
                copies: devices
                    .iter()
                    .map(|device| frame::Copy {
                        device_id: device.as_bytes().to_vec(),
                        payload: payload.clone(),
                    })
                    .collect(),
                ..frame::Send::default()
            })
        });
        session.send_many(sends).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut answered = 0;
        while answered < batch.len() {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => {
                    outcomes.insert(result.id.clone(), result);
                    answered += 1;
                }
                Some(_) => {}
                None => panic!("a send was not answered"),
            }
        }
    }
    (0..count)
        .map(|n| outcomes.remove(&id_of(n)).expect("an answer per send"))
        .collect()
}

/// How many outcomes in a row, from the first, are `outcome`.
fn leading(outcomes: &[i32], outcome: SendOutcome) -> usize {
    outcomes
        .iter()
        .take_while(|o| **o == outcome as i32)
        .count()
}

/// A stranger who sends to an offline device until it is refused fills only its own share of
/// that device's queue (500 copies), and someone else's messages still get through.
#[test]
fn one_sender_fills_only_its_share_of_a_receivers_queue() {
    // A send budget large enough that only the queue refuses, and a stranger pool as large as
    // the queue, so that only the sender's share is at work.
    let server = Server::start(&[
        "--send-burst",
        "5000",
        "--send-per-second",
        "5000",
        "--stranger-pool-copies",
        "10000",
    ]);
    let (mallory_number, victim_number, carol_number) = (number(), number(), number());
    let mallory = User::register(&mallory_number, &server, &[]);
    let victim = User::register(&victim_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);
    let victim_device = victim.client().device();
    let outcomes = block_on(flood(
        &mallory.client(),
        &victim_number,
        &[victim_device],
        600,
        512,
    ));
    assert_eq!(
        leading(&outcomes, SendOutcome::Queued),
        500,
        "{:?}",
        &outcomes[495..505]
    );
    assert!(
        outcomes[500..]
            .iter()
            .all(|o| *o == SendOutcome::RefusedQueueFull as i32),
        "{:?}",
        &outcomes[500..]
    );
    // Another sender still reaches the victim, and the victim gets that message.
    let (answer, _) = carol.send(&victim_number, "still reachable", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
}

/// An account keeps at most its quota of bytes waiting across every receiver: past it, a send
/// to anyone is refused with its own outcome.
#[test]
fn an_accounts_waiting_bytes_are_bounded_across_receivers() {
    let server = Server::start(&["--queued-bytes-per-account", "200000"]);
    let (mallory_number, victim_number, other_number) = (number(), number(), number());
    let mallory = User::register(&mallory_number, &server, &[]);
    let victim = User::register(&victim_number, &server, &[]);
    let other = User::register(&other_number, &server, &[]);
    let mallory_client = mallory.client();
    let to_victim = block_on(flood(
        &mallory_client,
        &victim_number,
        &[victim.client().device()],
        4,
        60_000,
    ));
    let (queued, refused) = (
        SendOutcome::Queued as i32,
        SendOutcome::RefusedOverQuota as i32,
    );
    assert_eq!(to_victim, vec![queued, queued, queued, refused]);
    let to_other = block_on(flood(
        &mallory_client,
        &other_number,
        &[other.client().device()],
        1,
        60_000,
    ));
    assert_eq!(to_other, vec![refused]);
}

/// Item 5: messages from one device that claim another number each make the receiver check the
/// stamped sender against the directory. Those checks cost the receiver's lookup budget nothing:
/// every spoof is still caught, and the receiver can still look numbers up afterwards.
#[test]
fn checking_spoofed_senders_costs_the_receiver_no_lookup_budget() {
    // A lookup budget of three, regained slowly: three charged checks would use it up (the
    // spoofer's own preparation takes two: its own devices and the receiver's keys).
    let server = Server::start(&["--lookup-burst", "3", "--lookup-per-hour", "1"]);
    let (mallory_number, victim_number, carol_number) = (number(), number(), number());
    let mallory = User::register(&mallory_number, &server, &[]);
    let victim = User::register(&victim_number, &server, &[]);
    User::register(&carol_number, &server, &[]);
    let mallory_client = mallory.client();
    const SPOOFS: u8 = 6;
    block_on(async {
        let messages: Vec<_> = (0..SPOOFS)
            .map(|n| {
                (
                    tidings_proto::id::MessageId([0xe0 + n; 16]),
                    format!("pay invoice {n}"),
                )
            })
            .collect();
        let sends = mallory_client
            .danger_prepare_sends_claiming(&carol_number, &victim_number, &messages)
            .await
            .expect("encrypt");
        let mut session = mallory_client.session(false).await.expect("session");
        session
            .send_many(sends.into_iter().map(Kind::Send))
            .await
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut answered = 0;
        while answered < SPOOFS {
            if let Some(Kind::SendResult(_)) = session.recv(deadline).await.expect("recv") {
                answered += 1;
            }
        }
    });
    let shown = victim.receive(usize::from(SPOOFS), 30);
    assert_eq!(shown.len(), usize::from(SPOOFS));
    for message in &shown {
        assert_eq!(message["sender_verified"], false, "{message}");
        let warning = message["warning"].as_str().unwrap_or_default();
        assert!(
            warning.contains("not theirs"),
            "every spoof is caught, none left unchecked: {message}"
        );
    }
    // The receiver's lookup budget is untouched.
    let out = victim.run(&["--json", "lookup", &carol_number]);
    assert!(
        out.status.success(),
        "lookup after the spoofs: {}",
        crate::support::text(&out.stderr)
    );
}

/// A sender's own device whose queue has no room (it stayed offline while its user sent) does
/// not stop the user from sending: it is skipped, and the answer says so.
#[test]
fn a_full_own_offline_device_is_skipped_and_reported() {
    // A small share per sender, so that a few sends fill the offline laptop's share.
    let server = Server::start(&["--queue-copies-per-sender", "20"]);
    let (victim_number, carol_number, dave_number) = (number(), number(), number());
    let phone = User::register(&victim_number, &server, &[]);
    let laptop = phone.link_device(&server);
    let carol = User::register(&carol_number, &server, &[]);
    let dave = User::register(&dave_number, &server, &[]);
    let phone_client = phone.client();
    let laptop_device = laptop.client().device();
    let (carol_device, dave_device) = (carol.client().device(), dave.client().device());
    // Twenty messages, each with a copy for the laptop: its share for this account is full.
    let to_carol = block_on(flood(
        &phone_client,
        &carol_number,
        &[carol_device, laptop_device],
        10,
        100,
    ));
    let to_dave = block_on(flood(
        &phone_client,
        &dave_number,
        &[dave_device, laptop_device],
        10,
        100,
    ));
    assert_eq!(leading(&to_carol, SendOutcome::Queued), 10, "{to_carol:?}");
    assert_eq!(leading(&to_dave, SendOutcome::Queued), 10, "{to_dave:?}");
    // One more to Carol (the first ten are the same messages again, answered as before): it is
    // stored for Carol, not for the laptop.
    let again = block_on(answers(
        &phone_client,
        &carol_number,
        &[carol_device, laptop_device],
        11,
        100,
    ));
    let last = &again[10];
    assert_eq!(
        last.outcome,
        SendOutcome::Queued as i32,
        "a full own device refused the send: {last:?}"
    );
    // Loudly: the answer names the laptop.
    assert_eq!(
        last.skipped_own_devices,
        vec![laptop_device.as_bytes().to_vec()]
    );
    assert!(last.detail.contains("miss"), "{}", last.detail);
    // The CLI says so too: a field with `--json`, a warning on stderr otherwise.
    let (answer, code) = phone.send(&carol_number, "one more", &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    assert_eq!(answer["skipped_own_devices"], 1, "{answer}");
    let out = phone.run(&["send", &carol_number, "and another"]);
    assert!(
        out.status.success(),
        "{}",
        crate::support::text(&out.stderr)
    );
    let warning = crate::support::text(&out.stderr);
    assert!(
        warning.contains("1 of your own devices will miss this message"),
        "no warning about the skipped laptop: {warning:?}"
    );
    // The laptop, once it listens, learns that it missed those three messages.
    let mut listening = laptop.spawn(&["--json", "listen", "--timeout", "60"]);
    let stdout = listening.stdout.take().expect("stdout");
    let mut missed = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if event["type"] == "missed" {
            missed = event["messages"].as_u64();
            break;
        }
    }
    let _ = listening.kill();
    let _ = listening.wait();
    assert_eq!(missed, Some(3), "the laptop was not told what it missed");
}

/// A held copy from a device makes one free check of that device an hour, not a free oracle: a
/// receiver holding one message from a device cannot sweep numbers asking "is this device
/// theirs?" without paying its lookup budget for every check after the first.
#[test]
fn a_held_copy_buys_one_free_sender_check_an_hour() {
    // A lookup budget of three, regained slowly: the free check, then three charged, then none.
    let server = Server::start(&["--lookup-burst", "3", "--lookup-per-hour", "1"]);
    let (mallory_number, victim_number) = (number(), number());
    let mallory = User::register(&mallory_number, &server, &[]);
    let victim = User::register(&victim_number, &server, &[]);
    let mallory_device = mallory.client().device();
    let queued = block_on(flood(
        &mallory.client(),
        &victim_number,
        &[victim.client().device()],
        1,
        100,
    ));
    assert_eq!(queued, vec![SendOutcome::Queued as i32]);
    // The owner first, then nine other numbers: a sweep for the owner of the sender device.
    let asked: Vec<String> = std::iter::once(mallory_number.clone())
        .chain((0..9).map(|_| number()))
        .collect();
    // Named as the operator could, so that no evaluation spends the victim's budget here.
    let pseudonyms: Vec<Vec<u8>> = asked
        .iter()
        .map(|n| crate::support::server_pseudonym(&server, n))
        .collect();
    let answers: Vec<Kind> = block_on(async {
        let mut session = victim.client().session(false).await.expect("session");
        let mut answers = Vec::new();
        for request_id in (1u64..).take(asked.len()) {
            session
                .send(Kind::Devices(frame::DevicesRequest {
                    request_id,
                    account: pseudonyms[usize::try_from(request_id - 1).expect("small")].clone(),
                    sender_device: mallory_device.as_bytes().to_vec(),
                    ..frame::DevicesRequest::default()
                }))
                .await
                .expect("send");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match session.recv(deadline).await.expect("recv") {
                    Some(Kind::DeviceList(list)) if list.request_id == request_id => {
                        answers.push(Kind::DeviceList(list));
                        break;
                    }
                    Some(Kind::Error(e)) if e.request_id == request_id => {
                        answers.push(Kind::Error(e));
                        break;
                    }
                    Some(_) => {}
                    None => panic!("request {request_id} was not answered"),
                }
            }
        }
        answers
    });
    // The first check is answered: the device is the owner's.
    match &answers[0] {
        Kind::DeviceList(list) => assert_eq!(
            list.device_ids,
            vec![mallory_device.as_bytes().to_vec()],
            "{list:?}"
        ),
        other => panic!("the free check was refused: {other:?}"),
    }
    // Past the free check and the three the budget pays for, every check is refused.
    for (n, answer) in answers.iter().enumerate().skip(4) {
        match answer {
            Kind::Error(e) => assert_eq!(
                e.code,
                frame::ErrorCode::RateLimited as i32,
                "check {}: {e:?}",
                n + 1
            ),
            other => panic!("check {} about the same sender was free: {other:?}", n + 1),
        }
    }
}

/// Item 4, contact tokens: strangers (senders holding no contact token of the receiver) share a
/// small pool of each receiver device's queue. Once a few strangers fill it, a contact (who holds
/// the receiver's token because the receiver wrote to them first) still gets through, and the
/// receiver can still send.
#[test]
fn strangers_fill_only_their_pool_and_a_contact_still_gets_through() {
    let server = Server::start(&["--stranger-pool-copies", "6"]);
    let (victim_number, carol_number) = (number(), number());
    let victim = User::register(&victim_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);
    let strangers: Vec<User> = (0..3)
        .map(|_| User::register(&number(), &server, &[]))
        .collect();
    // The victim writes to Carol first: its message carries the victim's contact token.
    let (answer, _) = victim.send(&carol_number, "write back any time", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(carol.receive_texts(1, 30), ["write back any time"]);
    // Three strangers, each far inside its own share of the queue, send three each.
    let victim_device = victim.client().device();
    let mut outcomes = Vec::new();
    for stranger in &strangers {
        outcomes.extend(block_on(answers(
            &stranger.client(),
            &victim_number,
            &[victim_device],
            3,
            100,
        )));
    }
    let codes: Vec<i32> = outcomes.iter().map(|a| a.outcome).collect();
    assert_eq!(leading(&codes, SendOutcome::Queued), 6, "{codes:?}");
    for refused in &outcomes[6..] {
        assert_eq!(
            refused.outcome,
            SendOutcome::RefusedStrangerPoolFull as i32,
            "{refused:?}"
        );
        assert!(
            refused.detail.contains("has not written to"),
            "{}",
            refused.detail
        );
    }
    // The CLI tells the stranger why, and when the room frees.
    let out = strangers[0].run(&["send", &victim_number, "let me in"]);
    let said = crate::support::text(&out.stdout);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("accepts few messages from people it has not written to")
            && said.contains("within 3 days"),
        "{said}"
    );
    // Carol, a contact, still reaches the victim; the victim can still send.
    let (answer, _) = carol.send(&victim_number, "a contact gets through", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    let (answer, _) = victim.send(&carol_number, "and I can still write", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    // The strangers' copies are opaque bytes, rejected as they arrive; Carol's message is shown.
    assert_eq!(victim.receive_texts(1, 30), ["a contact gets through"]);
}

/// A stranger's message is kept no longer than the stranger TTL (3 days), whatever TTL the send
/// asked for; a contact's message keeps the TTL it asked for. Checked in what the server stored.
#[test]
fn a_strangers_message_is_stored_with_the_short_ttl() {
    if embedded_only("it reads the stored expiry from the embedded engine's database file") {
        return;
    }
    let server = Server::start(&[]);
    let (victim_number, carol_number, stranger_number) = (number(), number(), number());
    let victim = User::register(&victim_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);
    let stranger = User::register(&stranger_number, &server, &[]);
    let (answer, _) = victim.send(&carol_number, "hello Carol", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(carol.receive_texts(1, 30), ["hello Carol"]);
    const THIRTY_DAYS: &str = "2592000";
    // The stranger is told its message is kept 3 days (259,200 s), not the 30 it asked; the
    // contact is told nothing of the kind.
    for (sender, text, told) in [
        (&carol, "from a contact", serde_json::Value::Null),
        (&stranger, "from a stranger", serde_json::json!(259_200)),
    ] {
        let (answer, _) = sender.send(&victim_number, text, &["--ttl", THIRTY_DAYS]);
        assert_eq!(answer["outcome"], "queued", "{answer}");
        assert_eq!(answer["ttl_seconds"], told, "{answer}");
    }
    let said = stranger.ok(&["send", &victim_number, "again", "--ttl", THIRTY_DAYS]);
    assert!(
        said.contains("kept at most 3 days: the receiver has not written to you"),
        "{said}"
    );
    let database = rusqlite::Connection::open_with_flags(
        server.data_dir().join(tidings_store::sqlite::DATABASE_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the server's database");
    let kept_for = |account_number: &User| -> i64 {
        let sender_device = account_number.client().device();
        database
            .query_row(
                "SELECT MAX(expires_at - sent_at) FROM (
                     SELECT expires_at, sent_at FROM messages WHERE sender_device = ?1
                     UNION ALL
                     SELECT expires_at, sent_at FROM single_copies WHERE sender_device = ?1)",
                [sender_device.as_bytes().to_vec()],
                |row| row.get(0),
            )
            .expect("the message is stored")
    };
    const DAY_MS: i64 = 86_400_000;
    assert_eq!(kept_for(&carol), 30 * DAY_MS, "a contact's message");
    assert!(
        kept_for(&stranger) <= 3 * DAY_MS,
        "a stranger's message is kept {} ms",
        kept_for(&stranger)
    );
}

/// `tidings settings --rotate-contact-token`: a new contact token is published, so that whoever
/// holds the old one (everyone the user wrote to) is a stranger again, told its message is kept
/// 3 days, until the user writes to them with the new token.
#[test]
fn a_rotated_contact_token_makes_old_contacts_strangers_until_written_to_again() {
    let server = Server::start(&[]);
    let (victim_number, carol_number) = (number(), number());
    let victim = User::register(&victim_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);
    const THIRTY_DAYS: &str = "2592000";
    let kept_for = |round: &str| {
        let (answer, _) = carol.send(&victim_number, round, &["--ttl", THIRTY_DAYS]);
        assert_eq!(answer["outcome"], "queued", "{answer}");
        assert_eq!(victim.receive_texts(1, 30), [round]);
        answer["ttl_seconds"].clone()
    };
    let (answer, _) = victim.send(&carol_number, "hello Carol", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(carol.receive_texts(1, 30), ["hello Carol"]);
    assert_eq!(kept_for("a contact"), serde_json::Value::Null);
    let said = victim.ok(&["settings", "--rotate-contact-token"]);
    assert!(said.contains("new contact token is published"), "{said}");
    assert_eq!(kept_for("a stranger again"), serde_json::json!(259_200));
    let (answer, _) = victim.send(&carol_number, "here is my new token", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(carol.receive_texts(1, 30), ["here is my new token"]);
    assert_eq!(kept_for("a contact again"), serde_json::Value::Null);
}
