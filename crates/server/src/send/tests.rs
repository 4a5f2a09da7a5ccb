//! Sends run by the one dispatch against a real store: every decision and its answer, the
//! budget, a full queue, and the order of a session's pipelined sends.

use std::sync::Arc;

use bytes::Bytes;
use tidings_proto::frame::{self, Kind, SendMode, SendOutcome};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::{NewMessage, QueueCursor, Store as _};
use tokio::task::JoinSet;

use crate::clock::now_ms;
use crate::request::Request;
use crate::testing::{
    ids, random_device, random_id, send_result, send_to, take_all, Device, World,
};

/// A `SendResult`'s device difference: missing devices of the receiver, of the sender, extra.
type Difference = [Vec<Vec<u8>>; 3];

#[tokio::test]
async fn a_send_is_decided_stored_and_answered() {
    let world = World::new("send", |_| {});
    let mut alice = world.user("+14155550101", 1).await.remove(0);
    let bob = world.user("+14155550102", 2).await;
    let carol = world.user("+14155550103", 1).await;
    // Carol is offline.
    let carol = Device {
        online: None,
        ..carol.into_iter().next().expect("carol")
    };
    let to_bob = ids(&[&bob[0], &bob[1]]);
    let unknown = random_device();
    let repeated = random_id();
    let none: Difference = Default::default();
    let bytes = |devices: &[DeviceId]| -> Vec<Vec<u8>> {
        devices.iter().map(|d| d.as_bytes().to_vec()).collect()
    };
    // (what, the send, its outcome, words of its detail, the device difference)
    let cases: Vec<(&str, Kind, SendOutcome, &str, Difference)> = vec![
        (
            "stored for a user with a device online",
            send_to(&bob[0].account, repeated, &to_bob, SendMode::Queue),
            SendOutcome::Accepted,
            "",
            none.clone(),
        ),
        (
            "the same id again: a duplicate, answered as the first",
            send_to(&bob[0].account, repeated, &to_bob, SendMode::Queue),
            SendOutcome::Accepted,
            "",
            none.clone(),
        ),
        (
            "queued for a user with no device online",
            send_to(
                &carol.account,
                random_id(),
                &ids(&[&carol]),
                SendMode::Queue,
            ),
            SendOutcome::Queued,
            "",
            none.clone(),
        ),
        (
            "now or never, and nobody is online",
            send_to(
                &carol.account,
                random_id(),
                &ids(&[&carol]),
                SendMode::NowOrNever,
            ),
            SendOutcome::RefusedNotReachable,
            "",
            none.clone(),
        ),
        (
            "devices changed: a device of the receiver has no copy, one copy is not wanted",
            send_to(
                &bob[0].account,
                random_id(),
                &[to_bob[0], unknown],
                SendMode::Queue,
            ),
            SendOutcome::DevicesChanged,
            "1 of the receiver and 0 of yours have none, 1 are not wanted",
            [bytes(&[to_bob[1]]), Vec::new(), bytes(&[unknown])],
        ),
        (
            "not a user",
            send_to(&[0x99; 32], random_id(), &[unknown], SendMode::Queue),
            SendOutcome::NotAUser,
            "",
            none.clone(),
        ),
        (
            "not a pseudonym",
            send_to(&[0x99; 31], random_id(), &[unknown], SendMode::Queue),
            SendOutcome::Invalid,
            "to_account must be the receiver's 32-byte pseudonym",
            none.clone(),
        ),
        (
            "a device twice among the copies",
            send_to(
                &bob[0].account,
                random_id(),
                &[to_bob[0], to_bob[0]],
                SendMode::Queue,
            ),
            SendOutcome::Invalid,
            "a device appears twice",
            none.clone(),
        ),
        (
            "an id that is not 16 bytes",
            Kind::Send(frame::Send {
                id: vec![1, 2, 3],
                ..frame::Send::default()
            }),
            SendOutcome::Invalid,
            "id must be 16 bytes",
            none.clone(),
        ),
        (
            "a plaintext payload",
            Kind::Send(frame::Send {
                id: random_id().as_bytes().to_vec(),
                to_account: bob[0].account.clone(),
                payload: Bytes::from_static(b"hello"),
                ..frame::Send::default()
            }),
            SendOutcome::Invalid,
            "plaintext payloads are not accepted",
            none.clone(),
        ),
    ];
    for (what, send, outcome, detail, difference) in cases {
        let (got, got_detail, got_difference) = send_result(world.ask(&mut alice, send).await);
        assert_eq!(got, outcome, "{what}");
        assert!(got_detail.contains(detail), "{what}: {got_detail}");
        assert_eq!(got_difference, difference, "{what}");
    }
    // Pushed once to Bob's online device (not again for the duplicate); the offline one keeps
    // its copy in its queue.
    let pushed = take_all(&bob[0].outbox);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    let Kind::Deliver(delivered) = &pushed[0] else {
        panic!("not a delivery: {pushed:?}");
    };
    assert_eq!(delivered.id, repeated.as_bytes().to_vec());
    assert_eq!(
        delivered.sender_device,
        alice.identity.device.as_bytes().to_vec()
    );
    let waiting = world
        .state
        .store
        .pending(to_bob[1], QueueCursor::START, 10, now_ms())
        .await;
    assert_eq!(waiting.expect("pending").len(), 1);
    assert!(
        take_all(&carol.outbox).is_empty(),
        "an offline device gets no push"
    );
}

#[tokio::test]
async fn a_sender_past_its_budget_is_rate_limited() {
    let world = World::new("send-budget", |args| {
        args.send_burst = Some(2);
        args.send_per_second = Some(0);
    });
    let mut alice = world.user("+14155550111", 1).await.remove(0);
    let bob = world.user("+14155550112", 1).await.remove(0);
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let send = send_to(&bob.account, random_id(), &ids(&[&bob]), SendMode::Queue);
        let (outcome, detail, _) = send_result(world.ask(&mut alice, send).await);
        outcomes.push((outcome, detail));
    }
    // Alice is a stranger to Bob: her messages are kept 3 days, not the default 7, and told so.
    let stranger = "kept at most 3 days: the receiver has not written to you".to_string();
    assert_eq!(
        outcomes,
        [
            (SendOutcome::Accepted, stranger.clone()),
            (SendOutcome::Accepted, stranger),
            (SendOutcome::RateLimited, "too many messages".into()),
        ]
    );
}

#[tokio::test]
async fn a_send_to_a_full_queue_is_refused() {
    let world = World::new("queue-full", |_| {});
    let mut alice = world.user("+14155550121", 1).await.remove(0);
    let bob = world.user("+14155550122", 1).await.remove(0);
    // Fill Bob's queue to the limit, in batches the writer shares syncs among.
    let mut filling = JoinSet::new();
    let device_copies = world.state.config.queue_limits.device_copies;
    for _ in 0..device_copies {
        let state = Arc::clone(&world.state);
        let message = NewMessage {
            decided: Vec::new(),
            sender_device: alice.identity.device,
            sender_account: alice.identity.account,
            id: random_id(),
            receiver: bob.identity.account,
            sent_at: now_ms(),
            expires_at: now_ms() + 60_000,
            copies: vec![(bob.identity.device, Bytes::from_static(b"x"))],
            contact_token_hash: None,
        };
        filling.spawn(async move { state.store.enqueue(message, device_copies).await });
    }
    while let Some(enqueued) = filling.join_next().await {
        assert!(matches!(
            enqueued.expect("a task"),
            Ok(tidings_store::Enqueued::Stored)
        ));
    }
    let send = send_to(&bob.account, random_id(), &ids(&[&bob]), SendMode::Queue);
    let (outcome, _, _) = send_result(world.ask(&mut alice, send).await);
    assert_eq!(outcome, SendOutcome::RefusedQueueFull);
}

#[tokio::test]
async fn a_sessions_pipelined_sends_are_stored_and_pushed_in_the_order_read() {
    let world = World::new("order", |_| {});
    let mut alice = world.user("+14155550131", 1).await.remove(0);
    let bob = world.user("+14155550132", 2).await;
    let copies = ids(&[&bob[0], &bob[1]]);
    let sent: Vec<MessageId> = (0..64).map(|_| random_id()).collect();
    // As a session does: each send takes its place when read, then all run at once.
    let mut tasks = JoinSet::new();
    for id in &sent {
        let send = send_to(&bob[0].account, *id, &copies, SendMode::Queue);
        let request = Request::from_frame(send.into()).expect("a send");
        tasks.spawn(request.run(
            Arc::clone(&world.state),
            alice.identity,
            Arc::clone(&alice.outbox),
            &mut alice.sends,
        ));
    }
    while tasks.join_next().await.is_some() {}
    let accepted = take_all(&alice.outbox)
        .into_iter()
        .filter(|answer| send_result(answer.clone()).0 == SendOutcome::Accepted)
        .count();
    assert_eq!(accepted, sent.len());
    let pushed: Vec<Vec<u8>> = take_all(&bob[0].outbox)
        .into_iter()
        .map(|kind| match kind {
            Kind::Deliver(deliver) => deliver.id,
            other => panic!("not a delivery: {other:?}"),
        })
        .collect();
    let expected: Vec<Vec<u8>> = sent.iter().map(|id| id.as_bytes().to_vec()).collect();
    assert_eq!(pushed, expected, "pushed in the order read");
    let stored = world
        .state
        .store
        .pending(copies[1], QueueCursor::START, 100, now_ms())
        .await;
    let stored: Vec<Vec<u8>> = stored
        .expect("pending")
        .into_iter()
        .map(|pending| pending.id.as_bytes().to_vec())
        .collect();
    assert_eq!(stored, expected, "stored in the order read");
}
