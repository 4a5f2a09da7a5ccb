//! Acknowledgements, withdraws and receipts against a real store, answers read from outboxes.

use std::sync::Arc;

use tidings_proto::frame::{
    self, AckStatus, ErrorCode, Kind, ReceiptKind, SendMode, SendOutcome, WithdrawState,
};
use tidings_proto::id::MessageId;

use crate::hub::Mailbox;
use crate::testing::{
    ack_of, error_of, ids, random_id, send_result, send_to, take_all, Device, World,
};

#[tokio::test]
async fn an_ack_is_confirmed_unknown_or_withdrawn_and_tells_the_sender_once() {
    let world = World::new("ack", |_| {});
    let mut alice = world.user("+14155550141", 1).await.remove(0);
    let mut bob = world.user("+14155550142", 1).await.remove(0);
    let (delivered, withdrawn) = (random_id(), random_id());
    for id in [delivered, withdrawn] {
        let send = send_to(&bob.account, id, &ids(&[&bob]), SendMode::Queue);
        let (outcome, _, _) = send_result(world.ask(&mut alice, send).await);
        assert_eq!(outcome, SendOutcome::Accepted);
    }
    take_all(&bob.outbox);
    let withdraw = |id: MessageId| {
        Kind::Withdraw(frame::Withdraw {
            id: id.as_bytes().to_vec(),
        })
    };
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(withdrawn)).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(result.state, WithdrawState::Withdrawn as i32);

    // (what, the ack, the status answered)
    let cases = [
        ("the first ack", delivered, AckStatus::Confirmed),
        // Its answer could have been lost: the message's `DELIVERED` record answers again.
        ("the same ack again", delivered, AckStatus::Confirmed),
        (
            "an ack of a withdrawn message",
            withdrawn,
            AckStatus::Withdrawn,
        ),
        (
            "an ack of a message never sent",
            random_id(),
            AckStatus::Unknown,
        ),
    ];
    for (what, id, status) in cases {
        let Kind::AckResult(result) = world.ask(&mut bob, ack_of(&alice, id)).await else {
            panic!("{what}: not an ack result");
        };
        assert_eq!(result.status, status as i32, "{what}");
        assert_eq!(result.id, id.as_bytes().to_vec(), "{what}");
    }
    // The sender's online session got one `Delivered` receipt (a second copy may follow the
    // sync, for sessions that registered since; there were none).
    let receipts = take_all(&alice.outbox);
    assert_eq!(
        receipts,
        [Kind::Receipt(frame::Receipt {
            id: delivered.as_bytes().to_vec(),
            kind: ReceiptKind::Delivered as i32,
        })]
    );
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(delivered)).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(
        result.state,
        WithdrawState::Delivered as i32,
        "acknowledged first"
    );
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(random_id())).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(result.state, WithdrawState::Unknown as i32);
    let short = Kind::Ack(frame::Ack {
        sender_device: vec![1],
        id: vec![2],
        ..Default::default()
    });
    let answer = world.ask(&mut bob, short).await;
    assert_eq!(
        error_of(&answer),
        (
            ErrorCode::InvalidRequest,
            "ack needs a 16-byte sender_device and id",
            0
        )
    );
}

#[tokio::test]
async fn a_receipt_waits_for_an_offline_sender_until_taken() {
    let world = World::new("receipts", |_| {});
    let mut alice = world.user("+14155550151", 1).await.remove(0);
    let mut bob = world.user("+14155550152", 1).await.remove(0);
    let id = random_id();
    let send = send_to(&bob.account, id, &ids(&[&bob]), SendMode::Queue);
    world.ask(&mut alice, send).await;
    take_all(&bob.outbox);
    alice.online = None;
    world.ask(&mut bob, ack_of(&alice, id)).await;
    assert!(
        take_all(&alice.outbox).is_empty(),
        "offline: nothing pushed"
    );

    let pending = |alice: &Device| {
        let outbox = Mailbox::new();
        let sending = crate::delivery::send_pending_receipts(
            Arc::clone(&world.state),
            alice.identity.device,
            Arc::clone(&outbox),
        );
        async move {
            sending.await;
            take_all(&outbox)
        }
    };
    let expected = Kind::Receipt(frame::Receipt {
        id: id.as_bytes().to_vec(),
        kind: ReceiptKind::Delivered as i32,
    });
    assert_eq!(pending(&alice).await, std::slice::from_ref(&expected));
    assert_eq!(pending(&alice).await, [expected], "kept until taken");
    let taken = Kind::ReceiptAck(frame::ReceiptAck {
        id: id.as_bytes().to_vec(),
    });
    world.run(&mut alice, taken).await;
    assert!(
        take_all(&alice.outbox).is_empty(),
        "a receipt ack is not answered"
    );
    assert!(pending(&alice).await.is_empty(), "taken: gone");
}
