//! The PostgreSQL engine where it differs from the embedded one: several connections run at once,
//! so what SQLite's single writer made atomic is raced here (a one-time key claimed by many at
//! once, an acknowledgement against a withdraw, a send against a device change); migrations
//! applied once however often a store connects; and who is a stranger kept out of the database.
//! Every test has a schema of its own (see `common`); PostgreSQL must be reachable.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use tidings_core::fallback::Withdrawal;
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::postgres::{PostgresStore, SCHEMA_VERSION};
use tidings_store::{
    AccountId, AckKind, Acked, Actor, Enqueued, HeldAck, IdentityKeys, NewMessage, Pseudonym,
    QueueCursor, QueueLimits, SignedKey, Store, DECISION_MARGIN,
};

mod common;
use common::{postgres_url, TempPostgres};

fn identity(n: u8) -> IdentityKeys {
    IdentityKeys {
        identity_key: [n; 32],
        signing_key: [n.wrapping_add(1); 32],
    }
}

fn key(n: u8) -> SignedKey {
    SignedKey {
        public_key: [n; 32],
        signature: [n; 64],
    }
}

fn message(
    (sender, sender_account): (DeviceId, AccountId),
    id: u8,
    receiver: AccountId,
    copies: &[DeviceId],
) -> NewMessage {
    NewMessage {
        decided: Vec::new(),
        sender_device: sender,
        sender_account,
        id: MessageId([id; 16]),
        receiver,
        sent_at: 1,
        expires_at: 1_000_000,
        copies: copies
            .iter()
            .map(|device| (*device, Bytes::from(vec![id; 8])))
            .collect(),
        contact_token_hash: None,
    }
}

/// Registers a device for `pseudonym` with its keys published; its account.
async fn registered(store: &impl Store, pseudonym: u8, device: DeviceId) -> AccountId {
    let account = store
        .register_device(Pseudonym([pseudonym; 32]), 1, device, [pseudonym; 32], 0)
        .await
        .expect("register")
        .account;
    store
        .publish_keys(device, identity(pseudonym), Vec::new(), Some(key(0)), 100)
        .await
        .expect("publish");
    account
}

/// A raw connection to the test's schema, to look at what is stored (named as the store's own
/// sessions are, so that dropping the schema ends it too).
async fn raw(schema: &str) -> tokio_postgres::Client {
    let base = postgres_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}application_name={schema}");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
        .batch_execute(&format!("SET search_path = \"{schema}\""))
        .await
        .expect("search path");
    client
}

/// Forty claims at once of a device's twenty one-time keys: each key goes to one claim, the
/// other claims get the fallback key, and no key is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_time_key_is_handed_out_once_under_concurrent_claims() {
    let temp = TempPostgres::open().await;
    let store = Arc::new(temp.store().clone());
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(&*store, 0xA1, alice).await;
    let bob_account = registered(&*store, 0xB0, bob).await;
    let keys: Vec<SignedKey> = (1..=20).map(key).collect();
    store
        .publish_keys(bob, identity(0xB0), keys, Some(key(200)), 100)
        .await
        .expect("publish");
    let claims = (0..40).map(|_| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let claimer = Actor {
                account: alice_account,
                device: alice,
            };
            store
                .claim_keys(claimer, bob_account, vec![bob])
                .await
                .expect("claim")
        })
    });
    let mut handed_out = Vec::new();
    for claim in claims.collect::<Vec<_>>() {
        let claimed = claim.await.expect("task");
        assert_eq!(claimed.keys.len(), 1, "one key per claim");
        handed_out.push(claimed.keys[0]);
    }
    let one_time: Vec<_> = handed_out.iter().filter(|k| !k.fallback).collect();
    let distinct: HashSet<[u8; 32]> = one_time.iter().map(|k| k.key.public_key).collect();
    assert_eq!(distinct.len(), one_time.len(), "a key handed out twice");
    assert_eq!(one_time.len(), 20, "every one-time key handed out");
    assert!(handed_out
        .iter()
        .filter(|k| k.fallback)
        .all(|k| k.key == key(200)));
    assert_eq!(
        store.key_status(bob).await.expect("status").one_time_keys,
        0
    );
}

/// An acknowledgement and a withdraw of the same message, at once, many times: each pair ends in
/// exactly one state, and both sides are told the same one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledgement_racing_a_withdraw_ends_in_one_state() {
    let temp = TempPostgres::open().await;
    let store = Arc::new(temp.store().clone());
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(&*store, 0xA1, alice).await;
    let bob_account = registered(&*store, 0xB0, bob).await;
    let (mut delivered, mut withdrawn) = (0, 0);
    for id in 1..=60u8 {
        let sent = message((alice, alice_account), id, bob_account, &[bob]);
        assert_eq!(
            store
                .enqueue(sent, QueueLimits::DEFAULT)
                .await
                .expect("send"),
            Enqueued::Stored
        );
        let message = MessageId([id; 16]);
        let ack = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.ack(bob, alice, message).await.expect("ack") }
        });
        let withdraw = tokio::spawn({
            let store = Arc::clone(&store);
            async move { store.withdraw(alice, message).await.expect("withdraw") }
        });
        let (acked, withdrawal) = (ack.await.expect("task"), withdraw.await.expect("task"));
        match (acked, withdrawal) {
            (Acked::Confirmed { first: true }, Withdrawal::Delivered) => delivered += 1,
            (Acked::Withdrawn, Withdrawal::Withdrawn) => withdrawn += 1,
            other => panic!("message {id} ended in two states: {other:?}"),
        }
        let receipts = store.receipts(alice).await.expect("receipts");
        let receipted = receipts.iter().any(|r| r.id == message);
        assert_eq!(
            receipted,
            matches!(acked, Acked::Confirmed { .. }),
            "a receipt without a delivery, or a delivery without one ({id})"
        );
    }
    assert_eq!(delivered + withdrawn, 60);
}

/// A send caught between its check of the receiver's devices and the insert of its message (a raw
/// session holds the messages table, so the send waits at its insert), and a link of a new device
/// to the receiver's account asked meanwhile: the link waits for the send to commit, so the send's
/// copies match the devices as they were when it was stored. Were the check and the insert not one
/// state, the link would commit first and the send be stored without a copy for the new device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_set_check_and_the_insert_see_one_state() {
    let temp = TempPostgres::open().await;
    let store = Arc::new(temp.store().clone());
    let (alice, bob, bob_laptop) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
    let alice_account = registered(&*store, 0xA1, alice).await;
    let bob_account = registered(&*store, 0xB0, bob).await;
    let mut holder = raw(&temp.schema).await;
    let hold = holder.transaction().await.expect("begin");
    hold.batch_execute("LOCK TABLE messages IN EXCLUSIVE MODE")
        .await
        .expect("hold the messages");
    let watcher = raw(&temp.schema).await;
    let waiting = || async {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&temp.schema],
            )
            .await
            .expect("activity");
        row.get::<_, i64>(0)
    };
    let send = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let sent = message((alice, alice_account), 1, bob_account, &[bob]);
            store
                .enqueue(sent, QueueLimits::DEFAULT)
                .await
                .expect("send")
        }
    });
    while waiting().await < 1 {
        assert!(!send.is_finished(), "the send went past the held table");
        tokio::task::yield_now().await;
    }
    let link = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let approver = Actor {
                account: bob_account,
                device: bob,
            };
            store
                .add_device(approver, bob_laptop, [3; 32], identity(3), 5, 0)
                .await
                .expect("link")
        }
    });
    while waiting().await < 2 {
        assert!(
            !link.is_finished(),
            "the link committed while a send to the account was between its check and its insert"
        );
        tokio::task::yield_now().await;
    }
    hold.rollback().await.expect("release the messages");
    assert_eq!(send.await.expect("task"), Enqueued::Stored);
    assert_eq!(link.await.expect("task"), tidings_store::Linked::Added);
    // From now on the laptop must get a copy.
    let stale = message((alice, alice_account), 2, bob_account, &[bob]);
    assert!(matches!(
        store
            .enqueue(stale, QueueLimits::DEFAULT)
            .await
            .expect("send"),
        Enqueued::DevicesChanged(_)
    ));
}

/// Connecting again applies no migration twice; the schema records the version it is at.
#[tokio::test]
async fn migrations_apply_once() {
    let mut temp = TempPostgres::open().await;
    temp.reopen().await;
    temp.reopen().await;
    let client = raw(&temp.schema).await;
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .expect("versions");
    let versions: Vec<i32> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(versions, (1..=SCHEMA_VERSION).collect::<Vec<_>>());
}

/// Who is a stranger to whom is never written: no column says it, and a stranger's copy is
/// stored as a contact's is.
#[tokio::test]
async fn who_is_a_stranger_is_not_in_the_database() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    store
        .set_contact_token(bob, [5; 32])
        .await
        .expect("bob's token");
    let mut from_contact = message((alice, alice_account), 1, bob_account, &[bob]);
    from_contact.contact_token_hash = Some([5; 32]);
    let from_stranger = message((alice, alice_account), 2, bob_account, &[bob]);
    for sent in [from_contact, from_stranger] {
        let stored = store.enqueue(sent, QueueLimits::DEFAULT).await;
        assert!(matches!(
            stored.expect("enqueue"),
            Enqueued::Stored | Enqueued::StoredShortened { .. }
        ));
    }
    let client = raw(&temp.schema).await;
    let columns = client
        .query(
            "SELECT table_name, column_name FROM information_schema.columns
             WHERE table_schema = $1",
            &[&temp.schema],
        )
        .await
        .expect("columns");
    for row in &columns {
        let (table, column): (String, String) = (row.get(0), row.get(1));
        assert!(
            !column.contains("stranger") && !table.contains("stranger"),
            "{table}.{column} names strangers"
        );
    }
    let copies = client
        .query(
            "SELECT to_receiver, discarded FROM copies ORDER BY seq",
            &[],
        )
        .await
        .expect("copies");
    assert_eq!(copies.len(), 2);
    let flags: Vec<(bool, bool)> = copies.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        flags[0], flags[1],
        "a stranger's copy differs from a contact's"
    );
}

/// The message's TTL in [`message`].
const EXPIRES_AT: u64 = 1_000_000;

/// A held copy of [`message`] `id` from `sender`, pushed to `device`.
fn held(device: DeviceId, sender: DeviceId, id: MessageId) -> HeldAck {
    HeldAck {
        device,
        sender_device: sender,
        id,
        sent_at: 1,
        expires_at: EXPIRES_AT,
    }
}

/// Acknowledges a held copy; the durable answer.
async fn ack_held(store: &impl Store, copy: HeldAck, kind: AckKind) -> Acked {
    store
        .ack_held(copy, kind)
        .await
        .expect("ack held")
        .durable()
        .await
        .expect("durable")
}

/// Bob's device acknowledges a held copy of Alice's message on one node while Alice withdraws it
/// on the other, at once: what each was answered.
async fn race(
    node_a: &Arc<PostgresStore>,
    node_b: &Arc<PostgresStore>,
    copy: HeldAck,
) -> (Acked, Withdrawal) {
    let ack = tokio::spawn({
        let store = Arc::clone(node_a);
        async move { ack_held(&*store, copy, AckKind::Shown).await }
    });
    let withdraw = tokio::spawn({
        let store = Arc::clone(node_b);
        async move {
            store
                .withdraw_held(copy.sender_device, copy.id, Some(EXPIRES_AT))
                .await
                .expect("withdraw")
        }
    });
    (ack.await.expect("task"), withdraw.await.expect("task"))
}

/// Links a device, with its keys, to the account of `approver`.
async fn linked(store: &impl Store, approver: Actor, device: DeviceId, n: u8) {
    let added = store
        .add_device(approver, device, [n; 32], identity(n), 5, 0)
        .await
        .expect("link");
    assert_eq!(added, tidings_store::Linked::Added);
}

/// The decision records stored, as (sending device's first byte, delivered).
async fn records(schema: &str) -> Vec<(u8, bool)> {
    let client = raw(schema).await;
    let rows = client
        .query(
            "SELECT sender_device, delivered FROM withdrawn ORDER BY sender_device, msg_id",
            &[],
        )
        .await
        .expect("records");
    rows.iter()
        .map(|row| (row.get::<_, Vec<u8>>(0)[0], row.get(1)))
        .collect()
}

/// A held copy's acknowledgement and a withdraw of its message, at once, on two stores over one
/// database (two nodes), many times, with nothing stored: each pair ends in exactly one state,
/// both sides are told it, and a receipt goes only with a delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_acknowledgement_racing_a_withdraw_ends_in_one_state() {
    let temp = TempPostgres::open().await;
    let node_a = Arc::new(temp.store().clone());
    let node_b = Arc::new(TempPostgres::connect(&temp.schema).await);
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    registered(&*node_a, 0xA1, alice).await;
    registered(&*node_a, 0xB0, bob).await;
    let (mut delivered, mut withdrawn) = (0, 0);
    for round in 1..=80u8 {
        let id = MessageId([round; 16]);
        let (acked, withdrawal) = race(&node_a, &node_b, held(bob, alice, id)).await;
        match (acked, withdrawal) {
            (Acked::Confirmed { first: true }, Withdrawal::Delivered) => delivered += 1,
            (Acked::Withdrawn, Withdrawal::Withdrawn) => withdrawn += 1,
            other => panic!("message {round} ended in two states: {other:?}"),
        }
        let receipts = node_a.receipts(alice).await.expect("receipts");
        assert_eq!(
            receipts.iter().any(|r| r.id == id),
            matches!(acked, Acked::Confirmed { .. }),
            "a receipt without a delivery, or a delivery without one ({round})"
        );
        // Each side asked again is told the same.
        assert_eq!(
            ack_held(&*node_b, held(bob, alice, id), AckKind::Shown).await,
            match acked {
                Acked::Withdrawn => Acked::Withdrawn,
                _ => Acked::Confirmed { first: false },
            }
        );
        assert_eq!(
            node_a.withdraw(alice, id).await.expect("withdraw"),
            withdrawal
        );
    }
    assert_eq!(delivered + withdrawn, 80);
}

/// The same race when another receiver device's copy of the message is stored: the withdraw takes
/// the stored path, and still ends in the state the held acknowledgement is told (the stored copy
/// kept for a delivery, gone for a withdrawal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_acknowledgement_racing_a_withdraw_of_stored_copies_ends_in_one_state() {
    let temp = TempPostgres::open().await;
    let node_a = Arc::new(temp.store().clone());
    let node_b = Arc::new(TempPostgres::connect(&temp.schema).await);
    let (alice, bob, bob_laptop) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
    let alice_account = registered(&*node_a, 0xA1, alice).await;
    let bob_account = registered(&*node_a, 0xB0, bob).await;
    let bob_actor = Actor {
        account: bob_account,
        device: bob,
    };
    linked(&*node_a, bob_actor, bob_laptop, 3).await;
    for round in 1..=60u8 {
        let id = MessageId([round; 16]);
        let mut waiting = message((alice, alice_account), round, bob_account, &[bob_laptop]);
        waiting.decided = vec![bob];
        assert_eq!(
            node_a
                .enqueue(waiting, QueueLimits::DEFAULT)
                .await
                .expect("send"),
            Enqueued::Stored
        );
        let (acked, withdrawal) = race(&node_a, &node_b, held(bob, alice, id)).await;
        let kept = node_a
            .holds_copy_from(bob_laptop, alice)
            .await
            .expect("holds");
        match (acked, withdrawal) {
            (Acked::Confirmed { first: true }, Withdrawal::Delivered) => {
                assert!(kept, "a delivered message's stored copy went ({round})");
                assert_eq!(
                    node_a.ack(bob_laptop, alice, id).await.expect("ack"),
                    Acked::Confirmed { first: false },
                    "a second first delivery ({round})"
                );
            }
            (Acked::Withdrawn, Withdrawal::Withdrawn) => {
                assert!(!kept, "a withdrawn message's copy stayed ({round})");
                assert_eq!(
                    node_a.ack(bob_laptop, alice, id).await.expect("ack"),
                    Acked::Withdrawn
                );
            }
            other => panic!("message {round} ended in two states: {other:?}"),
        }
    }
}

/// A device that acknowledged its copy and never heard the answer asks again: it is confirmed
/// (not a first delivery) as long as the message's record, or its other copies, are kept; a
/// message never stored or decided is unknown; a held copy cannot be discarded.
#[tokio::test]
async fn an_acknowledgement_of_a_copy_no_longer_stored_is_answered_from_what_is_left() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, bob, bob_laptop) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    let bob_actor = Actor {
        account: bob_account,
        device: bob,
    };
    linked(store, bob_actor, bob_laptop, 3).await;
    let sent = message((alice, alice_account), 1, bob_account, &[bob, bob_laptop]);
    store
        .enqueue(sent, QueueLimits::DEFAULT)
        .await
        .expect("send");
    let id = MessageId([1; 16]);
    assert_eq!(
        store.ack(bob, alice, id).await.expect("ack"),
        Acked::Confirmed { first: true }
    );
    assert_eq!(
        store.ack(bob, alice, id).await.expect("ack again"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        store.ack(bob_laptop, alice, id).await.expect("laptop"),
        Acked::Confirmed { first: false }
    );
    // Nothing stored any more: the record answers.
    assert_eq!(
        store
            .ack(bob_laptop, alice, id)
            .await
            .expect("laptop again"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(store.receipts(alice).await.expect("receipts").len(), 1);
    assert_eq!(records(&temp.schema).await, vec![(1, true)]);

    // Shown without a receipt: delivered all the same.
    let quiet = message((alice, alice_account), 2, bob_account, &[bob, bob_laptop]);
    store
        .enqueue(quiet, QueueLimits::DEFAULT)
        .await
        .expect("send");
    let quiet = MessageId([2; 16]);
    for device in [bob, bob_laptop, bob] {
        assert_eq!(
            store
                .ack_as(device, alice, quiet, AckKind::ShownWithoutReceipt)
                .await
                .expect("ack"),
            Acked::Confirmed { first: false }
        );
    }
    assert_eq!(
        store.withdraw(alice, quiet).await.expect("withdraw"),
        Withdrawal::Delivered
    );
    assert_eq!(store.receipts(alice).await.expect("receipts").len(), 1);

    // Never stored, never decided.
    assert_eq!(
        store
            .ack(bob, alice, MessageId([3; 16]))
            .await
            .expect("ack"),
        Acked::Unknown
    );
    let discarded = store
        .ack_held(held(bob, alice, MessageId([4; 16])), AckKind::Discarded)
        .await;
    assert!(discarded.is_err(), "a held copy discarded");
    assert_eq!(
        store
            .withdraw(alice, MessageId([4; 16]))
            .await
            .expect("withdraw"),
        Withdrawal::Unknown,
        "a refused held acknowledgement wrote a record"
    );
}

/// A message decided withdrawn is a duplicate when it is sent again, whether its copies were
/// held or stored; one decided delivered still stores the copies that must wait, which are then
/// no first delivery, and its TTL's end gives no `Expired` receipt.
#[tokio::test]
async fn a_resend_of_a_withdrawn_message_is_a_duplicate() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, bob, bob_laptop) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    let bob_actor = Actor {
        account: bob_account,
        device: bob,
    };
    linked(store, bob_actor, bob_laptop, 3).await;
    let copies = [bob, bob_laptop];

    // Held, then withdrawn with nothing stored.
    let id = MessageId([1; 16]);
    assert_eq!(
        store
            .withdraw_held(alice, id, Some(EXPIRES_AT))
            .await
            .expect("withdraw"),
        Withdrawal::Withdrawn
    );
    let resent = message((alice, alice_account), 1, bob_account, &copies);
    assert_eq!(
        store
            .enqueue(resent, QueueLimits::DEFAULT)
            .await
            .expect("resend"),
        Enqueued::Duplicate
    );
    assert_eq!(
        ack_held(store, held(bob, alice, id), AckKind::Shown).await,
        Acked::Withdrawn
    );

    // Stored, then withdrawn: the message is gone, its record is not.
    let sent = message((alice, alice_account), 2, bob_account, &copies);
    store
        .enqueue(sent.clone(), QueueLimits::DEFAULT)
        .await
        .expect("send");
    assert_eq!(
        store
            .withdraw(alice, MessageId([2; 16]))
            .await
            .expect("withdraw"),
        Withdrawal::Withdrawn
    );
    assert_eq!(
        store
            .enqueue(sent, QueueLimits::DEFAULT)
            .await
            .expect("resend"),
        Enqueued::Duplicate
    );

    // Withdrawn without held copies and nothing stored: unknown, and no record written.
    assert_eq!(
        store
            .withdraw(alice, MessageId([3; 16]))
            .await
            .expect("withdraw"),
        Withdrawal::Unknown
    );
    let unknown = message((alice, alice_account), 3, bob_account, &copies);
    assert_eq!(
        store
            .enqueue(unknown, QueueLimits::DEFAULT)
            .await
            .expect("send"),
        Enqueued::Stored
    );

    // Decided delivered by a held copy: the laptop's copy is stored, and nothing for the phone.
    let id = MessageId([4; 16]);
    assert_eq!(
        ack_held(store, held(bob, alice, id), AckKind::Shown).await,
        Acked::Confirmed { first: true }
    );
    let mut waiting = message((alice, alice_account), 4, bob_account, &copies);
    waiting.decided = vec![bob];
    assert_eq!(
        store
            .enqueue(waiting, QueueLimits::DEFAULT)
            .await
            .expect("the waiting copy"),
        Enqueued::Stored
    );
    let phone = store
        .pending(bob, tidings_store::QueueCursor::START, 10, 0)
        .await
        .expect("pending");
    assert!(
        phone.iter().all(|p| p.id != id),
        "a copy stored for a decided device"
    );
    let laptop = store
        .pending(bob_laptop, tidings_store::QueueCursor::START, 10, 0)
        .await
        .expect("pending");
    assert!(laptop.iter().any(|p| p.id == id));
    assert_eq!(
        store.withdraw(alice, id).await.expect("withdraw"),
        Withdrawal::Delivered
    );
    // Its TTL ends with the laptop's copy unread: it was delivered, so no `Expired` receipt.
    let expired = store.expire(EXPIRES_AT, 100).await.expect("expire");
    assert!(expired.iter().all(|e| e.id != id), "{expired:?}");
    let receipts = store.receipts(alice).await.expect("receipts");
    let of_it: Vec<_> = receipts.iter().filter(|r| r.id == id).collect();
    assert_eq!(of_it.len(), 1);
    assert_eq!(of_it[0].kind, tidings_proto::frame::ReceiptKind::Delivered);
}

/// Screening says whether a message may go to live sessions before it is stored: only a
/// contact's (or the account's own) message with exactly the copies that must be made, neither
/// stored nor decided withdrawn.
#[tokio::test]
async fn screening_passes_only_a_contacts_complete_undecided_message() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, alice_laptop) = (DeviceId([1; 16]), DeviceId([4; 16]));
    let (bob, bob_laptop) = (DeviceId([2; 16]), DeviceId([3; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    let alice_actor = Actor {
        account: alice_account,
        device: alice,
    };
    let bob_actor = Actor {
        account: bob_account,
        device: bob,
    };
    linked(store, bob_actor, bob_laptop, 3).await;
    linked(store, alice_actor, alice_laptop, 4).await;
    store
        .set_contact_token(bob_laptop, [5; 32])
        .await
        .expect("token");
    let all = [bob, bob_laptop, alice_laptop];
    let from_contact = |id: u8, copies: &[DeviceId]| {
        let mut sent = message((alice, alice_account), id, bob_account, copies);
        sent.contact_token_hash = Some([5; 32]);
        sent
    };
    let screen = |sent: NewMessage| async move { store.screen(&sent).await.expect("screen") };

    assert!(screen(from_contact(1, &all)).await, "a contact's message");
    assert!(
        !screen(message((alice, alice_account), 1, bob_account, &all)).await,
        "a stranger's"
    );
    let mut wrong_token = from_contact(1, &all);
    wrong_token.contact_token_hash = Some([6; 32]);
    assert!(!screen(wrong_token).await, "a token no device registered");
    assert!(
        !screen(from_contact(1, &[bob, bob_laptop])).await,
        "the sender's own other device left out"
    );
    assert!(
        !screen(from_contact(1, &[bob, bob_laptop, alice_laptop, alice])).await,
        "a copy for the sending device"
    );
    assert!(
        !screen(from_contact(1, &[bob, bob, bob_laptop, alice_laptop])).await,
        "two copies for one device"
    );
    let mut with_decided = from_contact(1, &[bob_laptop, alice_laptop]);
    with_decided.decided = vec![bob];
    assert!(
        screen(with_decided).await,
        "a decided device counts as addressed"
    );
    let own = message((alice, alice_account), 1, alice_account, &[alice_laptop]);
    assert!(screen(own).await, "within one account, no token needed");

    // Whether the id was sent before is not screened: a held copy's acknowledgement is decided
    // against the message's record.
    store
        .withdraw_held(alice, MessageId([3; 16]), Some(EXPIRES_AT))
        .await
        .expect("withdraw");
    assert!(screen(from_contact(3, &all)).await, "decided withdrawn");
    assert_eq!(
        ack_held(store, held(bob, alice, MessageId([3; 16])), AckKind::Shown).await,
        Acked::Withdrawn,
        "its held copy is never shown"
    );
    // A receiver without devices.
    store.delete_account(bob_actor).await.expect("delete bob");
    assert!(!screen(from_contact(5, &all)).await, "no receiver device");
}

/// Screening reads and takes no lock: it answers while a session holds every table it reads
/// against writes and row locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn screening_takes_no_lock_and_writes_nothing() {
    let temp = TempPostgres::open().await;
    let store = Arc::new(temp.store().clone());
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(&*store, 0xA1, alice).await;
    let bob_account = registered(&*store, 0xB0, bob).await;
    let mut holder = raw(&temp.schema).await;
    let hold = holder.transaction().await.expect("begin");
    hold.batch_execute(
        "LOCK TABLE accounts, devices, messages, copies, withdrawn, receipts IN EXCLUSIVE MODE",
    )
    .await
    .expect("hold the tables");
    let watcher = raw(&temp.schema).await;
    let screen = tokio::spawn({
        let store = Arc::clone(&store);
        async move {
            let sent = message((alice, alice_account), 1, bob_account, &[bob]);
            store.screen(&sent).await.expect("screen")
        }
    });
    while !screen.is_finished() {
        let row = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&temp.schema],
            )
            .await
            .expect("activity");
        assert_eq!(row.get::<_, i64>(0), 0, "the screening waits for a lock");
        tokio::task::yield_now().await;
    }
    // Alice has no token of Bob's: a stranger.
    assert!(!screen.await.expect("task"));
    hold.rollback().await.expect("release");
    let within = message((alice, alice_account), 2, alice_account, &[]);
    assert!(
        !store.screen(&within).await.expect("screen"),
        "no receiver device but the sender"
    );
}

/// A decision record lives until its message's TTL ends plus the margin, and goes at the first
/// sweep after that even when nothing else is due; a device's removal takes the records of what
/// it sent.
#[tokio::test]
async fn decision_records_expire_and_go_with_their_account() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, alice_laptop, bob) = (DeviceId([1; 16]), DeviceId([4; 16]), DeviceId([2; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    registered(store, 0xB0, bob).await;
    let (withdrawn, delivered) = (MessageId([1; 16]), MessageId([2; 16]));
    store
        .withdraw_held(alice, withdrawn, Some(EXPIRES_AT))
        .await
        .expect("withdraw");
    ack_held(
        store,
        held(bob, alice, delivered),
        AckKind::ShownWithoutReceipt,
    )
    .await;
    let ends = EXPIRES_AT + DECISION_MARGIN;
    store.expire(ends - 1, 100).await.expect("expire");
    assert_eq!(records(&temp.schema).await, vec![(1, false), (1, true)]);
    assert_eq!(
        store.withdraw(alice, withdrawn).await.expect("withdraw"),
        Withdrawal::Withdrawn
    );
    assert_eq!(
        store.withdraw(alice, delivered).await.expect("withdraw"),
        Withdrawal::Delivered
    );
    store.expire(ends, 100).await.expect("expire");
    assert_eq!(records(&temp.schema).await, Vec::new());
    for id in [withdrawn, delivered] {
        assert_eq!(
            store.withdraw(alice, id).await.expect("withdraw"),
            Withdrawal::Unknown
        );
    }

    // A removed device's records stay until they expire (they name no receiver); an account's
    // deletion takes its devices' records with it.
    let alice_actor = Actor {
        account: alice_account,
        device: alice,
    };
    linked(store, alice_actor, alice_laptop, 4).await;
    for sender in [alice, alice_laptop] {
        store
            .withdraw_held(sender, withdrawn, Some(EXPIRES_AT))
            .await
            .expect("withdraw");
    }
    assert!(store
        .remove_device(alice_actor, alice_laptop)
        .await
        .expect("remove"));
    assert_eq!(records(&temp.schema).await, vec![(1, false), (4, false)]);
    store
        .delete_account(alice_actor)
        .await
        .expect("delete the account");
    // The laptop's record, no longer tied to any account, waits for its expiry.
    assert_eq!(records(&temp.schema).await, vec![(4, false)]);
}

/// A held message's copy that must wait, stored while its sender withdraws it on another node,
/// many times: the withdraw either finds it stored and takes it, or decides first and the store
/// is refused as a duplicate; never a withdrawn message with a copy left to show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_stored_while_it_is_withdrawn_is_never_left_to_show() {
    let temp = TempPostgres::open().await;
    let node_a = Arc::new(temp.store().clone());
    let node_b = Arc::new(TempPostgres::connect(&temp.schema).await);
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(&*node_a, 0xA1, alice).await;
    let bob_account = registered(&*node_a, 0xB0, bob).await;
    let (mut stored_first, mut withdrawn_first) = (0, 0);
    for round in 1..=80u8 {
        let id = MessageId([round; 16]);
        let store = tokio::spawn({
            let store = Arc::clone(&node_a);
            let waiting = message((alice, alice_account), round, bob_account, &[bob]);
            async move {
                store
                    .enqueue(waiting, QueueLimits::DEFAULT)
                    .await
                    .expect("store")
            }
        });
        let withdraw = tokio::spawn({
            let store = Arc::clone(&node_b);
            async move {
                store
                    .withdraw_held(alice, id, Some(EXPIRES_AT))
                    .await
                    .expect("withdraw")
            }
        });
        let (stored, withdrawal) = (store.await.expect("task"), withdraw.await.expect("task"));
        assert_eq!(withdrawal, Withdrawal::Withdrawn, "round {round}");
        match stored {
            Enqueued::Stored => stored_first += 1,
            Enqueued::Duplicate => withdrawn_first += 1,
            other => panic!("round {round}: {other:?}"),
        }
        assert!(
            !node_a.holds_copy_from(bob, alice).await.expect("holds"),
            "a withdrawn message's copy is left to show (round {round})"
        );
        assert_eq!(
            node_a.ack(bob, alice, id).await.expect("ack"),
            Acked::Withdrawn
        );
    }
    assert_eq!(stored_first + withdrawn_first, 80);
}

/// The engine's locking reads what has committed before each statement (read committed), even on
/// a database whose sessions default to a stricter isolation: a held copy's acknowledgement
/// racing a withdraw there still ends in one state, with no serialization failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_decides_in_one_state_on_a_database_defaulting_to_serializable() {
    let temp = TempPostgres::open().await;
    let base = postgres_url();
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!(
        "{base}{separator}application_name={}&options=-c%20default_transaction_isolation%3Dserializable",
        temp.schema
    );
    let connect = || {
        let options = tidings_store::postgres::PostgresOptions {
            max_connections: 4,
            schema: Some(temp.schema.clone()),
            key_chain: TempPostgres::key_chain(&temp.schema),
        };
        tidings_store::postgres::PostgresStore::connect(&url, options)
    };
    let node_a = Arc::new(connect().await.expect("connect"));
    let node_b = Arc::new(connect().await.expect("connect"));
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    registered(&*node_a, 0xA1, alice).await;
    registered(&*node_a, 0xB0, bob).await;
    for round in 1..=40u8 {
        let id = MessageId([round; 16]);
        let ack = tokio::spawn({
            let store = Arc::clone(&node_a);
            async move { ack_held(&*store, held(bob, alice, id), AckKind::Shown).await }
        });
        let withdraw = tokio::spawn({
            let store = Arc::clone(&node_b);
            async move {
                store
                    .withdraw_held(alice, id, Some(EXPIRES_AT))
                    .await
                    .expect("withdraw")
            }
        });
        match (ack.await.expect("task"), withdraw.await.expect("task")) {
            (Acked::Confirmed { first: true }, Withdrawal::Delivered)
            | (Acked::Withdrawn, Withdrawal::Withdrawn) => {}
            other => panic!("message {round} ended in two states: {other:?}"),
        }
    }
}

/// A waiting copy's payload is stored sealed under the deployment's key chain, never as sent; a
/// store with a copy of the chain reads it; one without the chain, or with another deployment's,
/// is refused before it could seal a copy no other node reads.
#[tokio::test]
async fn waiting_copies_are_sealed_under_the_key_chain_every_node_shares() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    let payload = Bytes::from_static(b"an opaque copy as its sender made it, 5e1f");
    let mut sent = message((alice, alice_account), 7, bob_account, &[bob]);
    sent.copies = vec![(bob, payload.clone())];
    let stored = store.enqueue(sent, QueueLimits::DEFAULT).await;
    assert!(matches!(
        stored.expect("enqueue"),
        Enqueued::Stored | Enqueued::StoredShortened { .. }
    ));
    let client = raw(&temp.schema).await;
    let row = client
        .query_one("SELECT payload, sealed FROM copies", &[])
        .await
        .expect("the copy");
    let (stored_bytes, sealed): (Vec<u8>, bool) = (row.get(0), row.get(1));
    assert!(sealed);
    assert!(
        !stored_bytes
            .windows(16)
            .any(|w| payload.windows(16).any(|p| p == w)),
        "the payload is stored as sent"
    );
    let check: Vec<u8> = client
        .query_one("SELECT check_value FROM key_chain", &[])
        .await
        .expect("the chain's record")
        .get(0);
    let chain_file = TempPostgres::key_chain(&temp.schema);
    let chain_text = std::fs::read(&chain_file).expect("the chain file");
    assert!(
        !chain_text
            .windows(check.len())
            .any(|w| w == check.as_slice()),
        "the record is the key"
    );
    let pending = store
        .pending(bob, QueueCursor::START, 10, 1)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].payload, payload);

    let connect = |key_chain: std::path::PathBuf| {
        let options = tidings_store::postgres::PostgresOptions {
            max_connections: 2,
            schema: Some(temp.schema.clone()),
            key_chain,
        };
        let base = postgres_url();
        let separator = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{separator}application_name={}", temp.schema);
        async move { PostgresStore::connect(&url, options).await }
    };
    let dir = chain_file.with_extension("others");
    std::fs::create_dir_all(&dir).expect("dir");
    // No chain: refused, and no chain of its own is made.
    let missing = dir.join("missing.chain");
    let refused = connect(missing.clone()).await.expect_err("refused");
    assert!(refused.to_string().contains("key chain"), "{refused}");
    assert!(!missing.exists());
    // Another deployment's chain: refused.
    let foreign = dir.join("foreign.chain");
    tidings_store::postgres::KeyChain::create(&foreign, 1).expect("another chain");
    let refused = connect(foreign).await.expect_err("refused");
    assert!(refused.to_string().contains("not the one"), "{refused}");
    // A copy of the chain: reads what the first store sealed.
    let copy = dir.join("copy.chain");
    std::fs::copy(&chain_file, &copy).expect("copy");
    let other_node = connect(copy)
        .await
        .expect("a node with a copy of the chain");
    let pending = other_node
        .pending(bob, QueueCursor::START, 10, 1)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].payload, payload);
    drop(other_node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// What each account has in each device's queue (`queue_usage`, which the limits read instead of
/// counting the queue) stays what counting the copies gives, after every kind of insert and
/// deletion: stored, acknowledged, withdrawn, expired, a device removed, an account deleted.
#[tokio::test]
async fn the_queue_usage_the_limits_read_is_what_the_copies_count() {
    let temp = TempPostgres::open().await;
    let store = temp.store();
    let (alice, bob, bob_laptop, carol) = (
        DeviceId([1; 16]),
        DeviceId([2; 16]),
        DeviceId([3; 16]),
        DeviceId([4; 16]),
    );
    let alice_account = registered(store, 0xA1, alice).await;
    let bob_account = registered(store, 0xB0, bob).await;
    linked(
        store,
        Actor {
            account: bob_account,
            device: bob,
        },
        bob_laptop,
        0xB1,
    )
    .await;
    let carol_account = registered(store, 0xC0, carol).await;
    let client = raw(&temp.schema).await;
    let agree = |when: &'static str| {
        let client = &client;
        async move {
            let kept: Vec<(Vec<u8>, i64, i64, i64)> = client
                .query(
                    "SELECT device_id, sender_account, copies, bytes FROM queue_usage
                     ORDER BY device_id, sender_account",
                    &[],
                )
                .await
                .expect("usage")
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            let counted: Vec<(Vec<u8>, i64, i64, i64)> = client
                .query(
                    "SELECT c.device_id, m.sender_account, count(*)::bigint,
                            sum(length(c.payload) - 49)::bigint
                     FROM copies c JOIN messages m ON m.seq = c.seq
                     GROUP BY c.device_id, m.sender_account ORDER BY 1, 2",
                    &[],
                )
                .await
                .expect("count")
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
                .collect();
            assert_eq!(kept, counted, "{when}");
            kept.len()
        }
    };
    let to_bob = |sender: (DeviceId, AccountId), id: u8, expires_at| {
        let mut sent = message(sender, id, bob_account, &[bob, bob_laptop]);
        sent.expires_at = expires_at;
        sent.copies = vec![
            (bob, Bytes::from(vec![id; 10 + usize::from(id)])),
            (bob_laptop, Bytes::from(vec![id; 5])),
        ];
        sent
    };
    for (sender, id, expires_at) in [
        ((alice, alice_account), 1, 1_000_000),
        ((alice, alice_account), 2, 1_000_000),
        ((alice, alice_account), 3, 500),
        ((carol, carol_account), 4, 1_000_000),
        ((carol, carol_account), 5, 1_000_000),
    ] {
        let stored = store.enqueue(to_bob(sender, id, expires_at), QueueLimits::DEFAULT);
        assert!(matches!(
            stored.await.expect("enqueue"),
            Enqueued::Stored | Enqueued::StoredShortened { .. }
        ));
    }
    assert_eq!(agree("stored").await, 4);
    store
        .ack(bob, alice, MessageId([1; 16]))
        .await
        .expect("ack");
    agree("acknowledged on one device").await;
    store
        .withdraw(alice, MessageId([2; 16]))
        .await
        .expect("withdraw");
    agree("withdrawn").await;
    store.expire(1_000, 100).await.expect("expire");
    agree("expired").await;
    store
        .remove_device(
            Actor {
                account: bob_account,
                device: bob,
            },
            bob_laptop,
        )
        .await
        .expect("remove");
    // Left: Carol's two messages on Bob's phone.
    assert_eq!(agree("a device removed").await, 1);
    store
        .delete_account(Actor {
            account: carol_account,
            device: carol,
        })
        .await
        .expect("delete");
    assert_eq!(agree("an account deleted").await, 0);
}
