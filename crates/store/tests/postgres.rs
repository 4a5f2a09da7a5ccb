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
use tidings_store::postgres::SCHEMA_VERSION;
use tidings_store::{
    AccountId, Acked, Actor, Enqueued, IdentityKeys, NewMessage, Pseudonym, QueueLimits, SignedKey,
    Store,
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
