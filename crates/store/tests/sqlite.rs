//! The embedded engine through the `Store` trait: queue semantics, receipts, and that deleted
//! bytes leave the data files after a scrub. Tests of the contract alone run against the
//! in-memory engine too (`..._in_memory`), and against the PostgreSQL engine (`..._on_postgres`,
//! each in a schema of its own; PostgreSQL must be reachable, see `common`).

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tidings_core::fallback::Withdrawal;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::memory::MemoryStore;
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{
    AccountId, AckKind, Acked, Actor, DeviceDifference, Enqueued, HeldAck, IdentityKeys, Linked,
    NewMessage, PendingReceipt, Pseudonym, Published, QueueCursor, QueueLimits, SignedKey, Store,
    StoreError, SyncReport, Voucher, DECISION_MARGIN,
};

mod common;
use common::TempPostgres;

/// A device of an account, as the actor of an operation that changes it.
fn by(account: AccountId, device: DeviceId) -> Actor {
    Actor { account, device }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tidings-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn files_contain(dir: &Path, needle: &[u8]) -> bool {
    std::fs::read_dir(dir).expect("data dir").any(|entry| {
        let bytes = std::fs::read(entry.expect("entry").path()).unwrap_or_default();
        bytes.windows(needle.len()).any(|w| w == needle)
    })
}

fn message(
    (sender, sender_account): (DeviceId, AccountId),
    id: u8,
    receiver: AccountId,
    copies: &[(DeviceId, &[u8])],
) -> NewMessage {
    NewMessage {
        decided: Vec::new(),
        sender_device: sender,
        sender_account,
        id: MessageId([id; 16]),
        receiver,
        sent_at: 1,
        expires_at: 1_000,
        copies: copies
            .iter()
            .map(|(device, payload)| (*device, Bytes::copy_from_slice(payload)))
            .collect(),
        contact_token_hash: None,
    }
}

fn identity(n: u8) -> IdentityKeys {
    IdentityKeys {
        identity_key: [n; 32],
        signing_key: [n + 1; 32],
    }
}

fn key(n: u8) -> SignedKey {
    SignedKey {
        public_key: [n; 32],
        signature: [n; 64],
    }
}

/// Opens a store that records every sync's report, then calls `after` inside the observer (a
/// test can hold the writer there).
fn open_recording(
    dir: &Path,
    max_batch: usize,
    after: impl Fn() + Send + Sync + 'static,
) -> (SqliteStore, Arc<Mutex<Vec<SyncReport>>>) {
    let reports: Arc<Mutex<Vec<SyncReport>>> = Arc::default();
    let seen = Arc::clone(&reports);
    let store = SqliteStore::open(
        dir,
        SqliteOptions {
            max_batch,
            sync_observer: Some(Arc::new(move |report: &SyncReport| {
                seen.lock().expect("lock").push(report.clone());
                after();
            })),
        },
    )
    .expect("open");
    (store, reports)
}

type Gate = Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>;

/// A store whose writer can be held after a commit, so that the writes handed over meanwhile are
/// taken as one batch when it is released.
struct Held {
    store: SqliteStore,
    reports: Arc<Mutex<Vec<SyncReport>>>,
    gate: Arc<Mutex<Gate>>,
}

impl Held {
    fn open(dir: &Path) -> Self {
        let gate: Arc<Mutex<Gate>> = Arc::default();
        let held = Arc::clone(&gate);
        let (store, reports) = open_recording(dir, 64, move || {
            if let Some((entered, release)) = held.lock().expect("lock").take() {
                let _ = entered.send(());
                let _ = release.recv();
            }
        });
        Self {
            store,
            reports,
            gate,
        }
    }

    /// Holds the writer after the commit of a write of its own, until the returned sender is
    /// sent to.
    async fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (entered, entered_wait) = std::sync::mpsc::channel();
        let (release, release_wait) = std::sync::mpsc::channel();
        *self.gate.lock().expect("lock") = Some((entered, release_wait));
        let store = self.store.clone();
        tokio::spawn(async move {
            store
                .update_code_record(Pseudonym([7; 32]), |record| {
                    *record = Some(Default::default());
                })
                .await
        });
        tokio::task::spawn_blocking(move || {
            entered_wait.recv_timeout(std::time::Duration::from_secs(30))
        })
        .await
        .expect("join")
        .expect("writer held");
        release
    }
}

/// Registers alice and bob with one device each, with published keys: ((device, account) of
/// alice, (device, account) of bob).
async fn alice_and_bob(store: &impl Store) -> ((DeviceId, AccountId), (DeviceId, AccountId)) {
    let (alice_device, bob_device) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = store
        .register_device(Pseudonym([0xA1; 32]), 1, alice_device, [9; 32], 0)
        .await
        .expect("alice")
        .account;
    let bob_account = store
        .register_device(Pseudonym([0xB0; 32]), 1, bob_device, [8; 32], 0)
        .await
        .expect("bob")
        .account;
    for (device, n) in [(alice_device, 10), (bob_device, 20)] {
        store
            .publish_keys(device, identity(n), vec![key(n)], None, 100)
            .await
            .expect("publish");
    }
    ((alice_device, alice_account), (bob_device, bob_account))
}

#[tokio::test]
async fn queue_ack_receipt_and_residue() {
    let dir = temp_dir("queue");
    let (store, reports) = open_recording(&dir, 64, || {});
    let alice_device = DeviceId([1; 16]);
    let bob_phone = DeviceId([2; 16]);
    let bob_laptop = DeviceId([3; 16]);
    let alice = Pseudonym([0xA1; 32]);
    let bob = Pseudonym([0xB0; 32]);
    let alice_account = store
        .register_device(alice, 1, alice_device, [9; 32], 0)
        .await
        .expect("alice")
        .account;
    let alice_ = (alice_device, alice_account);
    let bob_account = store
        .register_device(bob, 1, bob_phone, [8; 32], 0)
        .await
        .expect("bob")
        .account;
    // A second registration of bob's number replaces the phone with the laptop.
    let replaced = store
        .register_device(bob, 1, bob_laptop, [7; 32], 0)
        .await
        .expect("bob again");
    assert_eq!(replaced.removed, vec![bob_phone]);
    assert!(store.device(bob_phone).await.expect("read").is_none());
    for (device, n) in [(alice_device, 10), (bob_laptop, 20)] {
        let published = store
            .publish_keys(device, identity(n), vec![key(n)], Some(key(n + 5)), 100)
            .await
            .expect("publish");
        assert_eq!(published, Published::Stored { one_time_keys: 1 });
    }

    let secret = b"PAYLOAD-MARKER-0123456789-abcdef";
    let first = store
        .enqueue(message(alice_, 1, bob_account, &[(bob_laptop, secret)]), 10)
        .await
        .expect("enqueue");
    assert_eq!(first, Enqueued::Stored);
    assert!(reports
        .lock()
        .expect("lock")
        .iter()
        .any(|r| r.messages.contains(&(alice_device, MessageId([1; 16])))));
    let again = store
        .enqueue(message(alice_, 1, bob_account, &[(bob_laptop, secret)]), 10)
        .await
        .expect("enqueue");
    assert_eq!(again, Enqueued::Duplicate);
    assert_eq!(
        store
            .enqueue(message(alice_, 2, bob_account, &[(bob_laptop, b"x")]), 1)
            .await
            .expect("full"),
        Enqueued::QueueFull
    );
    // Copies that do not match the devices are refused with the difference named.
    assert_eq!(
        store
            .enqueue(message(alice_, 2, bob_account, &[(bob_phone, b"x")]), 10)
            .await
            .expect("mismatch"),
        Enqueued::DevicesChanged(DeviceDifference {
            missing: vec![bob_laptop],
            missing_own: vec![],
            extra: vec![bob_phone],
        })
    );

    let pending = store
        .pending(bob_laptop, QueueCursor::START, 10, 2)
        .await
        .expect("pending");
    assert_eq!(pending.len(), 1);
    assert_eq!(&pending[0].payload[..], secret);

    let check = |got: Acked, expected: Acked| assert_eq!(got, expected);
    check(
        store
            .ack(bob_laptop, alice_device, MessageId([1; 16]))
            .await
            .expect("ack"),
        Acked::Confirmed { first: true },
    );
    check(
        store
            .ack(bob_laptop, alice_device, MessageId([1; 16]))
            .await
            .expect("replay"),
        Acked::Confirmed { first: false },
    );
    assert_eq!(
        store.receipts(alice_device).await.expect("receipts"),
        vec![PendingReceipt {
            id: MessageId([1; 16]),
            kind: ReceiptKind::Delivered
        }]
    );
    store
        .ack_receipt(alice_device, MessageId([1; 16]))
        .await
        .expect("receipt ack");
    assert!(store
        .receipts(alice_device)
        .await
        .expect("receipts")
        .is_empty());

    // Expiry: an unacknowledged message past its TTL yields an Expired receipt.
    store
        .enqueue(
            message(alice_, 3, bob_account, &[(bob_laptop, b"late")]),
            10,
        )
        .await
        .expect("enqueue");
    let expired = store.expire(5_000, 100).await.expect("expire");
    assert_eq!(expired.len(), 1);
    assert_eq!(
        store.receipts(alice_device).await.expect("receipts")[0].kind,
        ReceiptKind::Expired
    );

    // Keys: one-time keys are handed out once, then the fallback key, again and again.
    let claim =
        |only: Vec<DeviceId>| store.claim_keys(by(bob_account, bob_laptop), bob_account, only);
    let first = claim(vec![]).await.expect("claim");
    assert_eq!(
        (first.keys[0].key, first.keys[0].fallback),
        (key(20), false)
    );
    for _ in 0..2 {
        let next = claim(vec![bob_laptop]).await.expect("claim");
        assert_eq!((next.keys[0].key, next.keys[0].fallback), (key(25), true));
    }
    assert_eq!(
        claim(vec![alice_device]).await.expect("claim").unknown,
        vec![alice_device]
    );
    assert_eq!(
        store
            .publish_keys(bob_laptop, identity(99), vec![], None, 100)
            .await
            .expect("publish"),
        Published::IdentityMismatch
    );

    // A linked device joins without signing the other out, up to the limit; removing it takes
    // its keys and queue.
    let linked = DeviceId([4; 16]);
    let add = |device| {
        store.add_device(
            by(bob_account, bob_laptop),
            device,
            [6; 32],
            identity(40),
            2,
            0,
        )
    };
    assert_eq!(add(linked).await.expect("link"), Linked::Added);
    let voucher = Voucher {
        by: bob_laptop,
        signature: [3; 64],
    };
    let vouch = |device| store.set_voucher(bob_account, device, voucher);
    assert!(vouch(linked).await.expect("vouch"));
    assert!(!vouch(linked).await.expect("only the first voucher"));
    assert!(!vouch(alice_device).await.expect("not bob's device"));
    let listed = store.device_keys(bob_account).await.expect("list");
    assert!(listed
        .iter()
        .any(|d| d.id == linked && d.voucher == Some(voucher)));
    assert_eq!(
        add(DeviceId([5; 16])).await.expect("link"),
        Linked::TooManyDevices
    );
    assert!(store
        .remove_device(by(bob_account, bob_laptop), linked)
        .await
        .expect("remove"));
    assert!(!store
        .remove_device(by(bob_account, bob_laptop), linked)
        .await
        .expect("again"));
    assert!(store.device(linked).await.expect("read").is_none());
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("second connection");
    assert_references_hold(&database, "after a device's removal");

    // Disable bob: nothing with his pseudonym remains after a scrub.
    store
        .delete_account(by(bob_account, bob_laptop))
        .await
        .expect("delete");
    assert!(store.account(bob).await.expect("read").is_none());
    assert_references_hold(&database, "after an opt-out");
    drop(database);
    store.scrub().await.expect("scrub");
    assert!(!files_contain(&dir, secret), "payload left in data files");
    assert!(!files_contain(&dir, &bob.0), "pseudonym left in data files");
    assert!(
        files_contain(&dir, &alice.0),
        "the scan must be able to see what is still stored"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn concurrent_writes_share_syncs() {
    let dir = temp_dir("group-commit");
    let (store, reports) = open_recording(&dir, 1024, || {});
    // Fifty writes in flight at once: each is answered only after a sync, and they share syncs.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..50u8 {
        let store = store.clone();
        writes.spawn(async move {
            store
                .update_code_record(Pseudonym([i; 32]), |record| {
                    *record = Some(Default::default());
                })
                .await
        });
    }
    while let Some(result) = writes.join_next().await {
        result.expect("join").expect("write");
    }
    let reports = reports.lock().expect("lock");
    let operations: usize = reports.iter().map(|r| r.operations).sum();
    assert_eq!(operations, 50);
    assert!(
        reports.len() < 50,
        "{} syncs for 50 concurrent writes",
        reports.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_acknowledgement_is_known_before_its_sync() {
    let dir = temp_dir("staged");
    // While armed, the writer waits inside the observer: after its commit, before answering.
    let gate: Arc<Mutex<Option<std::sync::mpsc::Receiver<()>>>> = Arc::default();
    let held = Arc::clone(&gate);
    let syncs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&syncs);
    let store = SqliteStore::open(
        &dir,
        SqliteOptions {
            max_batch: 64,
            sync_observer: Some(Arc::new(move |_: &SyncReport| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Some(release) = held.lock().expect("lock").take() {
                    let _ = release.recv();
                }
            })),
        },
    )
    .expect("open");
    let ((alice_device, alice_account), (bob_device, bob_account)) = alice_and_bob(&store).await;
    let sent = message(
        (alice_device, alice_account),
        1,
        bob_account,
        &[(bob_device, b"x")],
    );
    assert_eq!(
        store.enqueue(sent, 10).await.expect("enqueue"),
        Enqueued::Stored
    );

    let (release, wait) = std::sync::mpsc::channel();
    *gate.lock().expect("lock") = Some(wait);
    let mut staged = store
        .ack_staged(bob_device, alice_device, MessageId([1; 16]))
        .await
        .expect("submit");
    assert_eq!(
        staged.executed().await,
        Some(Acked::Confirmed { first: true })
    );
    assert_eq!(staged.executed().await, None, "answered once");
    let durable = tokio::spawn(staged.durable());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        !durable.is_finished(),
        "answered as durable before its sync was through"
    );
    release.send(()).expect("release");
    assert_eq!(
        durable.await.expect("join").expect("ack"),
        Acked::Confirmed { first: true }
    );
    // A replay is known as such at once too: confirmed again from the message's `DELIVERED`
    // record, and without a receipt.
    let mut replay = store
        .ack_staged(bob_device, alice_device, MessageId([1; 16]))
        .await
        .expect("submit");
    assert_eq!(
        replay.executed().await,
        Some(Acked::Confirmed { first: false })
    );
    assert_eq!(
        replay.durable().await.expect("replay"),
        Acked::Confirmed { first: false }
    );

    // Taking the receipt is a lazy write: done at once, without a sync of its own.
    let receipt = vec![PendingReceipt {
        id: MessageId([1; 16]),
        kind: ReceiptKind::Delivered,
    }];
    assert_eq!(
        store.receipts(alice_device).await.expect("receipts"),
        receipt
    );
    let before = syncs.load(std::sync::atomic::Ordering::SeqCst);
    store
        .ack_receipt(alice_device, MessageId([1; 16]))
        .await
        .expect("receipt ack");
    assert_eq!(syncs.load(std::sync::atomic::Ordering::SeqCst), before);
    assert!(store
        .receipts(alice_device)
        .await
        .expect("receipts")
        .is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn acknowledgements_of_a_message_with_several_copies() {
    let dir = temp_dir("copies");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    acknowledgements_of_a_message_with_several_copies_in(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn acknowledgements_of_a_message_with_several_copies_in_memory() {
    acknowledgements_of_a_message_with_several_copies_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn acknowledgements_of_a_message_with_several_copies_on_postgres() {
    let store = TempPostgres::open().await;
    acknowledgements_of_a_message_with_several_copies_in(store.store()).await;
}

async fn acknowledgements_of_a_message_with_several_copies_in(store: &impl Store) {
    let (alice_phone, alice_tablet) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let (bob_phone, bob_laptop) = (DeviceId([3; 16]), DeviceId([4; 16]));
    let register = |pseudonym, device| store.register_device(pseudonym, 1, device, [9; 32], 0);
    let alice_account = register(Pseudonym([0xA1; 32]), alice_phone)
        .await
        .expect("alice")
        .account;
    let bob_account = register(Pseudonym([0xB0; 32]), bob_phone)
        .await
        .expect("bob")
        .account;
    for (approver, device, n) in [
        (by(alice_account, alice_phone), alice_tablet, 30),
        (by(bob_account, bob_phone), bob_laptop, 40),
    ] {
        let linked = store.add_device(approver, device, [6; 32], identity(n), 6, 0);
        assert_eq!(linked.await.expect("link"), Linked::Added);
    }
    for (device, n) in [
        (alice_phone, 10),
        (alice_tablet, 30),
        (bob_phone, 20),
        (bob_laptop, 40),
    ] {
        store
            .publish_keys(device, identity(n), vec![key(n)], Some(key(n + 5)), 100)
            .await
            .expect("publish");
    }
    let copies: &[(DeviceId, &[u8])] =
        &[(bob_phone, b"1"), (bob_laptop, b"2"), (alice_tablet, b"3")];
    let send = |id| {
        store.enqueue(
            message((alice_phone, alice_account), id, bob_account, copies),
            10,
        )
    };
    let ack = |device, id| store.ack(device, alice_phone, MessageId([id; 16]));
    assert_eq!(send(1).await.expect("enqueue"), Enqueued::Stored);

    // The sender's own other device taking its copy is not a delivery.
    assert_eq!(
        ack(alice_tablet, 1).await.expect("ack"),
        Acked::Confirmed { first: false }
    );
    assert!(store
        .receipts(alice_phone)
        .await
        .expect("receipts")
        .is_empty());
    // The first receiver device is; the message, still held for the other, answers a withdraw
    // with DELIVERED.
    assert_eq!(
        ack(bob_phone, 1).await.expect("ack"),
        Acked::Confirmed { first: true }
    );
    let delivered = vec![PendingReceipt {
        id: MessageId([1; 16]),
        kind: ReceiptKind::Delivered,
    }];
    assert_eq!(
        store.receipts(alice_phone).await.expect("receipts"),
        delivered
    );
    let withdrawal = store.withdraw(alice_phone, MessageId([1; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Delivered);
    // The last copy takes the message with it; a replay is confirmed again (the `DELIVERED` record).
    assert_eq!(
        ack(bob_laptop, 1).await.expect("ack"),
        Acked::Confirmed { first: false }
    );
    assert!(store
        .pending(bob_laptop, QueueCursor::START, 10, 2)
        .await
        .expect("pending")
        .is_empty());
    assert_eq!(
        ack(bob_laptop, 1).await.expect("replay"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        store.receipts(alice_phone).await.expect("receipts"),
        delivered
    );

    // A withdrawn message: the receiver's devices are told not to show it; the sender's own
    // device keeps its copy (the message went as SMS) and takes it as before.
    assert_eq!(send(2).await.expect("enqueue"), Enqueued::Stored);
    let withdrawal = store.withdraw(alice_phone, MessageId([2; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Withdrawn);
    assert_eq!(ack(bob_phone, 2).await.expect("ack"), Acked::Withdrawn);
    assert_eq!(
        ack(alice_tablet, 2).await.expect("ack"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        store.receipts(alice_phone).await.expect("receipts"),
        delivered
    );
}

/// A write that fails undoes as much as its kind allows, and no more: a send (which can fail on
/// its input after it has written) takes back only its own changes, while an acknowledgement
/// (which runs without a savepoint of its own) takes back its whole batch, answered as a failed
/// commit, so that nothing of it stays half done. The failures come from the engine itself: a
/// trigger installed through a second connection aborts the statement.
#[tokio::test]
async fn a_failing_write_takes_back_its_own_changes_or_its_whole_batch() {
    let dir = temp_dir("undo");
    let held = Held::open(&dir);
    let (store, reports) = (&held.store, &held.reports);
    let ((alice_device, alice_account), (bob_device, bob_account)) = alice_and_bob(store).await;
    let to_bob = |id: u8| {
        message(
            (alice_device, alice_account),
            id,
            bob_account,
            &[(bob_device, b"x")],
        )
    };
    for id in [1, 2] {
        assert_eq!(
            store.enqueue(to_bob(id), 10).await.expect("enqueue"),
            Enqueued::Stored
        );
    }
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("second connection");

    // A send that fails in the batch of an acknowledgement: the acknowledgement stands. (Its one
    // copy, to the receiver, is a row of `single_copies`.)
    database
        .execute_batch(
            "CREATE TRIGGER fail_insert BEFORE INSERT ON single_copies BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .expect("trigger");
    let release = held.hold().await;
    let send = store.enqueue_submit(to_bob(3), 10).await.expect("submit");
    let ack = store
        .ack_staged(bob_device, alice_device, MessageId([1; 16]))
        .await
        .expect("submit");
    let synced_before = reports.lock().expect("lock").len();
    release.send(()).expect("release");
    assert!(send.durable().await.is_err(), "the send failed");
    assert_eq!(
        ack.durable().await.expect("the acknowledgement stands"),
        Acked::Confirmed { first: true }
    );
    {
        let reports = reports.lock().expect("lock");
        assert_eq!(reports.len(), synced_before + 1);
        assert_eq!(reports[synced_before].operations, 2, "one batch");
    }
    database
        .execute_batch("DROP TRIGGER fail_insert")
        .expect("drop");

    // An acknowledgement that fails in the batch of a send, at its last statement (the sender's
    // receipt, after the copy and the message are deleted): the send is taken back with it,
    // and so are the acknowledgement's own deletions.
    database
        .execute_batch(
            "CREATE TRIGGER fail_receipt BEFORE INSERT ON receipts BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .expect("trigger");
    let release = held.hold().await;
    let send = store.enqueue_submit(to_bob(3), 10).await.expect("submit");
    let mut ack = store
        .ack_staged(bob_device, alice_device, MessageId([2; 16]))
        .await
        .expect("submit");
    // Behind the failure in the same batch: not run at all, so no early answer either (run, a
    // replay of an unknown message would have been answered `Unknown` at once).
    let mut behind = store
        .ack_staged(bob_device, alice_device, MessageId([9; 16]))
        .await
        .expect("submit");
    release.send(()).expect("release");
    assert!(send.durable().await.is_err(), "taken back with its batch");
    assert_eq!(ack.executed().await, None, "no early answer for a failure");
    assert!(ack.durable().await.is_err(), "the acknowledgement failed");
    assert_eq!(behind.executed().await, None, "not run after the failure");
    assert!(behind.durable().await.is_err(), "failed with its batch");
    database
        .execute_batch("DROP TRIGGER fail_receipt")
        .expect("drop");

    // Nothing of the failed batch stayed: message 2 is still queued and message 3 was never
    // stored, so both go through when tried again.
    let queued: Vec<MessageId> = store
        .pending(bob_device, QueueCursor::START, 10, 0)
        .await
        .expect("pending")
        .into_iter()
        .map(|pending| pending.id)
        .collect();
    assert_eq!(queued, vec![MessageId([2; 16])]);
    assert_eq!(
        store.enqueue(to_bob(3), 10).await.expect("again"),
        Enqueued::Stored
    );
    assert_eq!(
        store
            .ack(bob_device, alice_device, MessageId([2; 16]))
            .await
            .expect("again"),
        Acked::Confirmed { first: true }
    );
    assert_queue_lengths(store, &database, "after failed batches").await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Checks that every device of alice's and bob's accounts reports as its queue length the number
/// of copies it holds, and that no copy is held for a device outside them.
async fn assert_queue_lengths(store: &SqliteStore, database: &rusqlite::Connection, when: &str) {
    let mut listed = 0;
    for pseudonym in [Pseudonym([0xA1; 32]), Pseudonym([0xB0; 32])] {
        let Some(account) = store.account(pseudonym).await.expect("account") else {
            continue;
        };
        for (device, length) in account.devices {
            let held: u32 = database
                .query_row(
                    "SELECT (SELECT count(*) FROM copies WHERE device_id = ?1)
                          + (SELECT count(*) FROM single_copies WHERE device_id = ?1)",
                    [device.as_bytes()],
                    |row| row.get(0),
                )
                .expect("count");
            assert_eq!(length, held, "queue length of {device:?} {when}");
            listed += held;
        }
    }
    let all: u32 = database
        .query_row(
            "SELECT (SELECT count(*) FROM copies) + (SELECT count(*) FROM single_copies)",
            [],
            |row| row.get(0),
        )
        .expect("count");
    assert_eq!(all, listed, "copies of devices no account lists {when}");
    assert_references_hold(database, when);
}

/// SQLite does not enforce the schema's references; the writer does (every deletion deletes what
/// refers to what it deletes). So no row may refer to one that is gone, and no message may be
/// left without a copy.
fn assert_references_hold(database: &rusqlite::Connection, when: &str) {
    let mut check = database
        .prepare("PRAGMA foreign_key_check")
        .expect("foreign key check");
    let dangling: Vec<(String, String)> = check
        .query_map([], |row| Ok((row.get(0)?, row.get(2)?)))
        .expect("check")
        .collect::<rusqlite::Result<_>>()
        .expect("rows");
    assert!(
        dangling.is_empty(),
        "rows referring to deleted ones {when}: {dangling:?}"
    );
    let bare: u32 = database
        .query_row(
            "SELECT count(*) FROM messages WHERE NOT EXISTS (SELECT 1 FROM copies WHERE copies.seq = messages.seq)",
            [],
            |row| row.get(0),
        )
        .expect("count");
    assert_eq!(bare, 0, "messages without a copy {when}");
}

/// The queue length that the queue limit and lookups read stays the number of copies each device
/// holds through every write that stores or deletes copies (the writer adds up a batch's changes
/// and writes each device's once), and a send sees the copies stored earlier in its own batch.
#[tokio::test]
async fn queue_lengths_follow_every_write() {
    let dir = temp_dir("queue-lengths");
    let held = Held::open(&dir);
    let store = &held.store;
    let ((alice_phone, alice_account), (bob_phone, bob_account)) = alice_and_bob(store).await;
    let (alice_tablet, bob_laptop) = (DeviceId([5; 16]), DeviceId([6; 16]));
    for (approver, device, n) in [
        (by(alice_account, alice_phone), alice_tablet, 30),
        (by(bob_account, bob_phone), bob_laptop, 40),
    ] {
        let linked = store.add_device(approver, device, [6; 32], identity(n), 6, 0);
        assert_eq!(linked.await.expect("link"), Linked::Added);
    }
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("second connection");
    let alice = (alice_phone, alice_account);
    let to_bob = |id| {
        let copies: &[(DeviceId, &[u8])] =
            &[(bob_phone, b"1"), (bob_laptop, b"2"), (alice_tablet, b"3")];
        message(alice, id, bob_account, copies)
    };
    let to_alice = |from: (DeviceId, AccountId), id, copies: &[(DeviceId, &[u8])]| {
        message(from, id, alice_account, copies)
    };

    // One batch: three sends to bob under a limit of two, and one from bob. The third is refused
    // on the copies the first two stored in the same batch.
    let release = held.hold().await;
    let mut sends = Vec::new();
    for id in [1, 2, 3] {
        sends.push(store.enqueue_submit(to_bob(id), 2).await.expect("submit"));
    }
    let from_bob = to_alice(
        (bob_phone, bob_account),
        1,
        &[
            (alice_phone, b"4"),
            (alice_tablet, b"5"),
            (bob_laptop, b"6"),
        ],
    );
    sends.push(store.enqueue_submit(from_bob, 10).await.expect("submit"));
    release.send(()).expect("release");
    let mut outcomes = Vec::new();
    for send in sends {
        outcomes.push(send.durable().await.expect("send"));
    }
    use Enqueued::{QueueFull, Stored};
    assert_eq!(outcomes, vec![Stored, Stored, QueueFull, Stored]);
    let last = held
        .reports
        .lock()
        .expect("lock")
        .last()
        .map(|r| r.operations);
    assert_eq!(last, Some(4), "the four sends took one batch");
    assert_queue_lengths(store, &database, "after a batch of sends").await;

    // A send that fails at its second copy takes back the count of its first.
    database
        .execute_batch(
            "CREATE TRIGGER fail_laptop BEFORE INSERT ON copies WHEN NEW.device_id = x'06060606060606060606060606060606'
             BEGIN SELECT RAISE(ABORT, 'injected'); END;",
        )
        .expect("trigger");
    assert!(
        store.enqueue(to_bob(9), 10).await.is_err(),
        "the send failed"
    );
    database
        .execute_batch("DROP TRIGGER fail_laptop")
        .expect("drop");
    assert_queue_lengths(store, &database, "after a failed send").await;

    // One batch: a copy taken and one stored for the same device, and another taken.
    let release = held.hold().await;
    let ack = |device, sender, id| store.ack_staged(device, sender, MessageId([id; 16]));
    let first = ack(bob_phone, alice_phone, 1).await.expect("submit");
    let send = store.enqueue_submit(to_bob(4), 10).await.expect("submit");
    let second = ack(alice_tablet, alice_phone, 1).await.expect("submit");
    release.send(()).expect("release");
    assert_eq!(send.durable().await.expect("send"), Stored);
    for ack in [first, second] {
        assert!(matches!(ack.durable().await, Ok(Acked::Confirmed { .. })));
    }
    assert_queue_lengths(store, &database, "after acknowledgements").await;

    // A withdraw takes the receiver's copies and leaves the sender's other device its own.
    let withdrawal = store.withdraw(alice_phone, MessageId([2; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Withdrawn);
    assert_queue_lengths(store, &database, "after a withdraw").await;

    // Registering alice anew replaces her devices: their copies go, and so do the messages
    // queued for her with the copies bob's laptop held of them.
    let alice_new = DeviceId([7; 16]);
    store
        .register_device(Pseudonym([0xA1; 32]), 1, alice_new, [9; 32], 0)
        .await
        .expect("register again");
    assert_queue_lengths(store, &database, "after a new registration").await;

    // Expiry deletes the messages left with every copy of them.
    store.expire(2_000, 100).await.expect("expire");
    assert_queue_lengths(store, &database, "after expiry").await;

    // A removed device's copies go with it.
    let alice = (alice_new, alice_account);
    store
        .publish_keys(alice_new, identity(50), vec![key(50)], None, 100)
        .await
        .expect("publish");
    assert_eq!(
        store
            .enqueue(
                message(
                    alice,
                    5,
                    bob_account,
                    &[(bob_phone, b"7"), (bob_laptop, b"8")]
                ),
                10
            )
            .await
            .expect("send"),
        Stored
    );
    assert!(store
        .remove_device(by(bob_account, bob_phone), bob_laptop)
        .await
        .expect("remove"));
    assert_queue_lengths(store, &database, "after a device's removal").await;

    // Registering bob anew with the same device id: the device's row, made again, starts with
    // an empty queue.
    let queued = store.account(Pseudonym([0xB0; 32])).await.expect("account");
    assert_eq!(queued.expect("bob").devices, vec![(bob_phone, 1)]);
    store
        .register_device(Pseudonym([0xB0; 32]), 1, bob_phone, [8; 32], 0)
        .await
        .expect("register again");
    assert_queue_lengths(
        store,
        &database,
        "after a registration that keeps the device",
    )
    .await;

    // Opting out takes the messages bob sent and their copies on alice's device.
    let from_bob = to_alice((bob_phone, bob_account), 2, &[(alice_new, b"9")]);
    assert_eq!(store.enqueue(from_bob, 10).await.expect("send"), Stored);
    store
        .delete_account(by(bob_account, bob_phone))
        .await
        .expect("opt out");
    assert_queue_lengths(store, &database, "after an opt-out").await;
    let alice_queue = store.account(Pseudonym([0xA1; 32])).await.expect("account");
    assert_eq!(alice_queue.expect("alice").devices, vec![(alice_new, 0)]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A send routes on `route`, which the engine answers from memory: after every kind of device
/// change it must name exactly the devices the database holds, although each check before the
/// change had put the old route in memory.
#[tokio::test]
async fn routes_follow_every_device_change() {
    let dir = temp_dir("routes");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    routes_follow_every_device_change_in(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn routes_follow_every_device_change_in_memory() {
    routes_follow_every_device_change_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn routes_follow_every_device_change_on_postgres() {
    let store = TempPostgres::open().await;
    routes_follow_every_device_change_in(store.store()).await;
}

async fn routes_follow_every_device_change_in(store: &impl Store) {
    let pseudonym = Pseudonym([0xC3; 32]);
    let check = |when: &'static str, expected: Vec<DeviceId>| {
        async move {
            // Twice: the first read may come from the database, the second from memory.
            for _ in 0..2 {
                let mut devices = store
                    .route(pseudonym)
                    .await
                    .expect("route")
                    .map(|route| route.devices)
                    .unwrap_or_default();
                devices.sort_by_key(|d| d.0);
                assert_eq!(devices, expected, "{when}");
            }
        }
    };
    check("before registration", vec![]).await;
    let (phone, laptop, tablet) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([3; 16]));
    let account = store
        .register_device(pseudonym, 1, phone, [9; 32], 0)
        .await
        .expect("register")
        .account;
    check("registered", vec![phone]).await;
    let linked = store
        .add_device(by(account, phone), laptop, [6; 32], identity(40), 6, 0)
        .await
        .expect("link");
    assert_eq!(linked, Linked::Added);
    check("linked", vec![phone, laptop]).await;
    assert!(store
        .remove_device(by(account, laptop), phone)
        .await
        .expect("remove"));
    check("removed", vec![laptop]).await;
    let replaced = store
        .register_device(pseudonym, 1, tablet, [5; 32], 0)
        .await
        .expect("register again");
    assert_eq!(replaced.removed, vec![laptop]);
    check("registered again", vec![tablet]).await;
    store
        .delete_account(by(replaced.account, tablet))
        .await
        .expect("opt out");
    check("opted out", vec![]).await;
    assert_eq!(
        store.route(pseudonym).await.expect("route"),
        None,
        "an opted-out number routes like a non-user"
    );
    store
        .register_device(pseudonym, 1, phone, [9; 32], 0)
        .await
        .expect("register after opting out");
    check("registered after opting out", vec![phone]).await;
}

/// A receipt waits for its sending device one more TTL of its message after the message's own
/// TTL ends (at least a day, so that a message kept for seconds still tells its sender), then
/// goes with the expiry sweep: a sender that never comes back leaves nothing behind for ever.
#[tokio::test]
async fn receipts_expire_one_ttl_after_their_message() {
    let dir = temp_dir("receipt-expiry");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    receipts_expire_one_ttl_after_their_message_in(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn receipts_expire_one_ttl_after_their_message_in_memory() {
    receipts_expire_one_ttl_after_their_message_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn receipts_expire_one_ttl_after_their_message_on_postgres() {
    let store = TempPostgres::open().await;
    receipts_expire_one_ttl_after_their_message_in(store.store()).await;
}

async fn receipts_expire_one_ttl_after_their_message_in(store: &impl Store) {
    use tidings_core::DAY;
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([2; 16]));
    let alice_account = store
        .register_device(Pseudonym([0xA1; 32]), 1, alice, [9; 32], 0)
        .await
        .expect("alice")
        .account;
    let bob_account = store
        .register_device(Pseudonym([0xB0; 32]), 1, bob, [8; 32], 0)
        .await
        .expect("bob")
        .account;
    for (device, n) in [(alice, 10), (bob, 20)] {
        store
            .publish_keys(device, identity(n), vec![key(n)], None, 100)
            .await
            .expect("publish");
    }
    let send = |id: u8, expires_at| {
        let mut new = message((alice, alice_account), id, bob_account, &[(bob, b"x")]);
        new.sent_at = 0;
        new.expires_at = expires_at;
        store.enqueue(new, 10)
    };
    // Kept two days and delivered: its receipt waits until two days after the message's end.
    assert_eq!(send(1, 2 * DAY).await.expect("enqueue"), Enqueued::Stored);
    assert_eq!(
        store
            .ack(bob, alice, MessageId([1; 16]))
            .await
            .expect("ack"),
        Acked::Confirmed { first: true }
    );
    // Kept a second and never delivered: its `Expired` receipt waits a day.
    assert_eq!(send(2, 1_000).await.expect("enqueue"), Enqueued::Stored);
    assert_eq!(store.expire(1_000, 10).await.expect("expire").len(), 1);
    let waiting = |expected: &'static [u8]| async move {
        let mut ids: Vec<u8> = store
            .receipts(alice)
            .await
            .expect("receipts")
            .iter()
            .map(|r| r.id.0[0])
            .collect();
        ids.sort_unstable();
        assert_eq!(ids, expected);
        assert_eq!(
            store.backlog(alice).await.expect("backlog").receipts,
            !expected.is_empty()
        );
    };
    waiting(&[1, 2]).await;
    let expire = |now| async move { store.expire(now, 10).await.expect("expire") };
    assert!(expire(1_000 + DAY - 1).await.is_empty());
    waiting(&[1, 2]).await;
    assert!(expire(1_000 + DAY).await.is_empty());
    waiting(&[1]).await;
    assert!(expire(4 * DAY - 1).await.is_empty());
    waiting(&[1]).await;
    assert!(expire(4 * DAY).await.is_empty());
    waiting(&[]).await;
}

/// A receipt stored before receipts had a deadline gets one when the engine first opens the
/// database: the longest a new receipt can wait (60 days), counted from that open.
#[tokio::test]
async fn a_receipt_from_before_deadlines_gets_one_at_the_upgrade() {
    use tidings_core::DAY;
    let dir = temp_dir("receipt-upgrade");
    std::fs::create_dir_all(&dir).expect("dir");
    let device = DeviceId([7; 16]);
    {
        let old = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
            .expect("old database");
        old.execute_batch(
            "CREATE TABLE receipts (device_id BLOB NOT NULL, msg_id BLOB NOT NULL,
                 kind INTEGER NOT NULL, PRIMARY KEY (device_id, msg_id)) WITHOUT ROWID;",
        )
        .expect("old schema");
        old.execute(
            "INSERT INTO receipts (device_id, msg_id, kind) VALUES (?1, ?2, 0)",
            rusqlite::params![device.as_bytes(), [9u8; 16]],
        )
        .expect("old receipt");
    }
    let opened = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    let count = || async { store.receipts(device).await.expect("receipts").len() };
    assert_eq!(count().await, 1);
    store.expire(opened + 59 * DAY, 10).await.expect("expire");
    assert_eq!(count().await, 1, "gone before its 60 days");
    store.expire(opened + 61 * DAY, 10).await.expect("expire");
    assert_eq!(count().await, 0, "still there after 60 days");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 28, item 1: an account id is never handed out twice, so that nothing left of a deleted
/// account (a session, a cached identity) can act on the account registered after it. The newest
/// account is the one an engine that counts from its largest id would give again.
#[tokio::test]
async fn account_ids_are_never_reused() {
    let dir = temp_dir("account-ids");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    let mut seen = account_ids_are_never_reused_in(&store, 0, Vec::new()).await;
    drop(store);
    // Reopened: the engine remembers what it handed out.
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    seen = account_ids_are_never_reused_in(&store, 10, seen).await;
    // The newest account stays, so that the database below holds the largest id handed out.
    let kept = store
        .register_device(Pseudonym([30; 32]), 1, DeviceId([30; 16]), [30; 32], 0)
        .await
        .expect("register");
    seen.push(kept.account);
    drop(store);
    // A database made before the engine kept its own count: what it holds is never handed out
    // again (ids it deleted before are beyond knowing).
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    database
        .execute_batch("DROP TABLE IF EXISTS account_ids")
        .expect("an older database");
    drop(database);
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    account_ids_are_never_reused_in(&store, 20, seen).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn account_ids_are_never_reused_on_postgres() {
    let mut store = TempPostgres::open().await;
    let seen = account_ids_are_never_reused_in(store.store(), 0, Vec::new()).await;
    // Connected again: the sequence remembers what it handed out.
    store.reopen().await;
    account_ids_are_never_reused_in(store.store(), 10, seen).await;
}

#[tokio::test]
async fn account_ids_are_never_reused_in_memory() {
    account_ids_are_never_reused_in(&MemoryStore::new(), 0, Vec::new()).await;
}

/// Registers two accounts and deletes the newest, twice, checking each new id against `seen`
/// (every id handed out before); numbers are told apart by `first`. The ids seen, now.
async fn account_ids_are_never_reused_in(
    store: &impl Store,
    first: u8,
    mut seen: Vec<AccountId>,
) -> Vec<AccountId> {
    for n in first..first + 4 {
        let registered = store
            .register_device(Pseudonym([n; 32]), 1, DeviceId([n; 16]), [n; 32], 0)
            .await
            .expect("register");
        assert!(
            !seen.contains(&registered.account),
            "account id {:?} handed out again (seen: {seen:?})",
            registered.account
        );
        seen.push(registered.account);
        if n % 2 == 1 {
            store
                .delete_account(by(registered.account, DeviceId([n; 16])))
                .await
                .expect("delete the newest account");
        }
    }
    seen
}

/// What a sending account has waiting is counted in the writer's memory: it follows every
/// acknowledgement, withdrawal and expiry, and is counted again from the tables when the store
/// opens, so a sender's share of a queue is the same before and after a restart.
#[tokio::test]
async fn a_senders_share_of_a_queue_survives_a_restart() {
    let dir = temp_dir("sender-share");
    let limits = QueueLimits {
        device_copies: 100,
        sender_copies: 2,
        sender_bytes: 1_000,
        account_bytes: 10,
        stranger_copies: u32::MAX,
    };
    let (alice, (bob_device, bob_account)) = {
        let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
        let (alice, bob) = alice_and_bob(&store).await;
        let send = |id: u8, payload: &'static [u8]| {
            store.enqueue(message(alice, id, bob.1, &[(bob.0, payload)]), limits)
        };
        assert_eq!(send(1, b"aaaa").await.expect("1"), Enqueued::Stored);
        assert_eq!(send(2, b"bbbb").await.expect("2"), Enqueued::Stored);
        // The third copy passes the share of Bob's queue, by count.
        assert_eq!(send(3, b"c").await.expect("3"), Enqueued::QueueFull);
        // A withdrawn copy leaves room; bytes count the quota (8 of 10 taken).
        assert_eq!(
            store
                .withdraw(alice.0, MessageId([2; 16]))
                .await
                .expect("w"),
            Withdrawal::Withdrawn
        );
        assert_eq!(send(4, b"ddddddd").await.expect("4"), Enqueued::OverQuota);
        assert_eq!(send(5, b"eeee").await.expect("5"), Enqueued::Stored);
        (alice, bob)
    };
    // Reopened: copies 1 and 5 wait (8 bytes, two copies).
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    let send = |id: u8, payload: &'static [u8]| {
        store.enqueue(
            message(alice, id, bob_account, &[(bob_device, payload)]),
            limits,
        )
    };
    assert_eq!(send(6, b"f").await.expect("6"), Enqueued::QueueFull);
    assert!(matches!(
        store
            .ack(bob_device, alice.0, MessageId([1; 16]))
            .await
            .expect("ack"),
        Acked::Confirmed { .. }
    ));
    assert_eq!(send(7, b"gggggg").await.expect("7"), Enqueued::Stored);
    // Expired messages leave room too.
    store.expire(2_000, 100).await.expect("expire");
    assert_eq!(send(8, b"hhhhhhhhhh").await.expect("8"), Enqueued::Stored);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The columns of every table and the SQL of every index, as the database file holds them.
fn schema_of(database: &rusqlite::Connection) -> String {
    let mut statement = database
        .prepare("SELECT type, name, IFNULL(sql, '') FROM sqlite_master")
        .expect("schema");
    let rows = statement
        .query_map([], |row| {
            Ok(format!(
                "{} {}: {}",
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?
            ))
        })
        .expect("schema rows")
        .collect::<rusqlite::Result<Vec<_>>>()
        .expect("schema rows");
    rows.join("\n")
}

/// Every column of `copies` but its ids and its payload, for the copies in `device`'s queue; then
/// every column of `single_copies` but its ids (the message's id too) and its payload, for its
/// single copies.
fn copy_columns(database: &rusqlite::Connection, device: DeviceId) -> Vec<Vec<String>> {
    let mut rows = copy_columns_of(database, device, "copies", &["device_id", "seq", "payload"]);
    rows.extend(copy_columns_of(
        database,
        device,
        "single_copies",
        &["device_id", "seq", "payload", "msg_id"],
    ));
    rows
}

fn copy_columns_of(
    database: &rusqlite::Connection,
    device: DeviceId,
    table: &str,
    ids: &[&str],
) -> Vec<Vec<String>> {
    let columns: Vec<String> = database
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .expect("columns")
        .query_map([], |row| row.get(0))
        .expect("columns")
        .collect::<rusqlite::Result<_>>()
        .expect("columns");
    let kept: Vec<&String> = columns
        .iter()
        .filter(|c| !ids.contains(&c.as_str()))
        .collect();
    let select = if kept.is_empty() {
        format!("SELECT 'none' FROM {table} WHERE device_id = ?1")
    } else {
        let list: Vec<String> = kept.iter().map(|c| format!("quote({c})")).collect();
        format!(
            "SELECT {} FROM {table} WHERE device_id = ?1 ORDER BY seq",
            list.join(", ")
        )
    };
    let width = kept.len().max(1);
    let mut statement = database.prepare(&select).expect("select copies");
    let rows = statement
        .query_map([device.as_bytes()], |row| {
            (0..width).map(|i| row.get::<_, String>(i)).collect()
        })
        .expect("copies")
        .collect::<rusqlite::Result<Vec<Vec<String>>>>()
        .expect("copies");
    rows
}

/// Moves every single copy (a row of `single_copies`) into `messages` and `copies`, where every
/// message was before that table existed.
fn as_an_earlier_version_stored(database: &rusqlite::Connection) {
    database
        .execute_batch(
            "INSERT INTO messages (seq, sender_device, msg_id, receiver_account, sent_at,
                                   expires_at, payload, sender_account)
                 SELECT s.seq, s.sender_device, s.msg_id, d.account_id, s.sent_at, s.expires_at,
                        x'', s.sender_account
                 FROM single_copies s JOIN devices d ON d.id = s.device_id;
             INSERT INTO copies (device_id, seq, payload, to_receiver, discarded)
                 SELECT device_id, seq, payload, 1, discarded FROM single_copies;
             DELETE FROM single_copies;",
        )
        .expect("the earlier layout");
}

/// Messages stored before `single_copies` existed (each in `messages` with its copies) are served
/// as before, in one queue order with the single copies stored after them: read, acknowledged,
/// withdrawn, with the queue lengths and references right after each.
#[tokio::test]
async fn messages_stored_before_single_copies_stay_in_their_order() {
    let dir = temp_dir("before-single-copies");
    let (alice, (bob_device, bob_account)) = {
        let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
        let (alice, bob) = alice_and_bob(&store).await;
        for id in [1, 2] {
            let sent = message(alice, id, bob.1, &[(bob.0, b"before")]);
            assert_eq!(
                store.enqueue(sent, 10).await.expect("enqueue"),
                Enqueued::Stored
            );
        }
        (alice, bob)
    };
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    as_an_earlier_version_stored(&database);
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    assert_queue_lengths(&store, &database, "after the reopen").await;
    let sent = message(alice, 3, bob_account, &[(bob_device, b"after")]);
    assert_eq!(
        store.enqueue(sent, 10).await.expect("enqueue"),
        Enqueued::Stored
    );
    let single: u32 = database
        .query_row("SELECT count(*) FROM single_copies", [], |row| row.get(0))
        .expect("count");
    assert_eq!(single, 1, "the new message is a single copy");
    let ids = |pending: &[tidings_store::Pending]| -> Vec<u8> {
        pending.iter().map(|p| p.id.0[0]).collect()
    };
    let waiting = store
        .pending(bob_device, QueueCursor::START, 10, 0)
        .await
        .expect("pending");
    assert_eq!(ids(&waiting), [1, 2, 3], "one queue order");
    let after_first = store
        .pending(bob_device, waiting[0].cursor, 1, 0)
        .await
        .expect("pending after the first");
    assert_eq!(ids(&after_first), [2], "a page of one after the first");
    assert_eq!(
        store
            .enqueue(
                message(alice, 1, bob_account, &[(bob_device, b"again")]),
                10
            )
            .await
            .expect("again"),
        Enqueued::Duplicate,
        "an old message's id is still taken"
    );
    assert_eq!(
        store
            .enqueue(
                message(alice, 3, bob_account, &[(bob_device, b"again")]),
                10
            )
            .await
            .expect("again"),
        Enqueued::Duplicate,
        "a single copy's id is taken"
    );
    assert_eq!(
        store
            .ack(bob_device, alice.0, MessageId([1; 16]))
            .await
            .expect("ack 1"),
        Acked::Confirmed { first: true }
    );
    assert_queue_lengths(&store, &database, "after the old message's ack").await;
    assert_eq!(
        store
            .withdraw(alice.0, MessageId([2; 16]))
            .await
            .expect("withdraw 2"),
        Withdrawal::Withdrawn
    );
    assert_queue_lengths(&store, &database, "after the old message's withdraw").await;
    assert_eq!(
        store
            .ack(bob_device, alice.0, MessageId([3; 16]))
            .await
            .expect("ack 3"),
        Acked::Confirmed { first: true }
    );
    assert_eq!(
        store
            .ack(bob_device, alice.0, MessageId([3; 16]))
            .await
            .expect("ack 3 again"),
        Acked::Confirmed { first: false },
        "a single copy is acknowledged once (a replay is confirmed again, without a receipt)"
    );
    assert_queue_lengths(&store, &database, "after the single copy's ack").await;
    let mut receipts: Vec<u8> = store
        .receipts(alice.0)
        .await
        .expect("receipts")
        .iter()
        .map(|r| r.id.0[0])
        .collect();
    receipts.sort_unstable();
    assert_eq!(
        receipts,
        [1, 3],
        "a Delivered receipt for each acknowledged"
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 28, contact tokens: who is a stranger of whom is never written. A stranger's copy and
/// a contact's copy in one queue differ in nothing but their ids and payloads, and no column or
/// index of the database names strangers.
#[tokio::test]
async fn who_is_a_stranger_is_not_in_the_database() {
    let dir = temp_dir("stranger-not-stored");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    let (alice, (bob_device, bob_account)) = alice_and_bob(&store).await;
    store
        .set_contact_token(bob_device, [5; 32])
        .await
        .expect("bob's token");
    let limits = QueueLimits::DEFAULT;
    let mut from_contact = message(alice, 1, bob_account, &[(bob_device, b"from a contact")]);
    from_contact.contact_token_hash = Some([5; 32]);
    let from_stranger = message(alice, 2, bob_account, &[(bob_device, b"from a strange")]);
    for sent in [from_contact, from_stranger] {
        assert_eq!(
            store.enqueue(sent, limits).await.expect("enqueue"),
            Enqueued::Stored
        );
    }
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    let schema = schema_of(&database);
    assert!(
        !schema.to_lowercase().contains("stranger"),
        "the schema names strangers:\n{schema}"
    );
    let rows = copy_columns(&database, bob_device);
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0], rows[1],
        "a stranger's copy differs from a contact's"
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A database made while copies were marked as strangers' loses the mark (its column and its
/// index) when it is opened, keeping its copies; strangers' copies still waiting then count as
/// contacts' (the stranger pools start empty at every open).
#[tokio::test]
async fn a_database_that_marked_strangers_loses_the_mark_on_open() {
    let dir = temp_dir("stranger-mark-dropped");
    let limits = QueueLimits {
        stranger_copies: 1,
        ..QueueLimits::DEFAULT
    };
    let (alice, (bob_device, bob_account)) = {
        let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
        let (alice, bob) = alice_and_bob(&store).await;
        let stranger = |id: u8| message(alice, id, bob.1, &[(bob.0, b"from a stranger")]);
        assert_eq!(
            store.enqueue(stranger(1), limits).await.expect("1"),
            Enqueued::Stored
        );
        // The pool of one is full.
        assert_eq!(
            store.enqueue(stranger(2), limits).await.expect("2"),
            Enqueued::StrangerPoolFull
        );
        (alice, bob)
    };
    {
        // As an earlier version left it: the copy marked as a stranger's, on an index.
        let old = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
            .expect("old database");
        as_an_earlier_version_stored(&old);
        let columns = old
            .prepare("SELECT name FROM pragma_table_info('copies') WHERE name = 'stranger'")
            .expect("columns")
            .exists([])
            .expect("columns");
        if !columns {
            old.execute_batch("ALTER TABLE copies ADD COLUMN stranger INTEGER NOT NULL DEFAULT 0")
                .expect("old column");
        }
        old.execute_batch(
            "UPDATE copies SET stranger = 1;
             CREATE INDEX IF NOT EXISTS copies_of_strangers ON copies(device_id) WHERE stranger = 1;",
        )
        .expect("old mark");
    }
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    let schema = schema_of(&database);
    assert!(
        !schema.to_lowercase().contains("stranger"),
        "the schema still names strangers:\n{schema}"
    );
    // The copy stayed, and counts as a contact's: the pool starts empty.
    let waiting = store
        .pending(bob_device, QueueCursor::START, 10, 0)
        .await
        .expect("pending");
    assert_eq!(waiting.len(), 1);
    let stranger = |id: u8| message(alice, id, bob_account, &[(bob_device, b"from a stranger")]);
    assert_eq!(
        store.enqueue(stranger(3), limits).await.expect("3"),
        Enqueued::Stored
    );
    let full = || async {
        store.enqueue(stranger(4), limits).await.expect("4") == Enqueued::StrangerPoolFull
    };
    assert!(full().await, "the pool of one holds the new copy");
    let reopened = &store;
    let ack = |id: u8| async move {
        assert!(matches!(
            reopened
                .ack(bob_device, alice.0, MessageId([id; 16]))
                .await
                .expect("ack"),
            Acked::Confirmed { .. }
        ));
    };
    // The older copy's acknowledgement takes nothing from the pool; the new one's leaves room.
    ack(1).await;
    assert!(
        full().await,
        "the older copy's acknowledgement emptied the pool"
    );
    ack(3).await;
    assert_eq!(
        store.enqueue(stranger(5), limits).await.expect("5"),
        Enqueued::Stored
    );
    assert_eq!(
        store.enqueue(stranger(6), limits).await.expect("6"),
        Enqueued::StrangerPoolFull
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_strangers_copies_leave_its_pool_on_every_deletion() {
    let dir = temp_dir("stranger-pool-deletions");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    strangers_copies_leave_their_pool_on_every_deletion_in(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_strangers_copies_leave_its_pool_on_every_deletion_in_memory() {
    strangers_copies_leave_their_pool_on_every_deletion_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn strangers_copies_leave_their_pool_on_every_deletion_on_postgres() {
    let store = TempPostgres::open().await;
    strangers_copies_leave_their_pool_on_every_deletion_in(store.store()).await;
}

/// A stranger's message is kept at most `STRANGER_TTL` and says so; its copy takes a place in the
/// receiver device's stranger pool until it is acknowledged, withdrawn, expired or deleted with
/// its sender's account, and a contact's copy takes none.
async fn strangers_copies_leave_their_pool_on_every_deletion_in(store: &impl Store) {
    use tidings_core::delivery::STRANGER_TTL;
    use tidings_core::DAY;
    let (alice, (bob_device, bob_account)) = alice_and_bob(store).await;
    store
        .set_contact_token(bob_device, [5; 32])
        .await
        .expect("bob's token");
    let limits = QueueLimits {
        stranger_copies: 1,
        ..QueueLimits::DEFAULT
    };
    let from = |sender: (DeviceId, AccountId), id: u8, expires_at| NewMessage {
        decided: Vec::new(),
        expires_at,
        ..message(sender, id, bob_account, &[(bob_device, b"hello")])
    };
    let enqueue =
        |message: NewMessage| async move { store.enqueue(message, limits).await.expect("enqueue") };
    // Kept 3 days, not the 30 asked, and told so.
    assert_eq!(
        enqueue(from(alice, 1, 1 + 30 * DAY)).await,
        Enqueued::StoredShortened {
            skipped: Vec::new(),
            expires_at: 1 + STRANGER_TTL
        }
    );
    let pool_full =
        |id: u8| async move { enqueue(from(alice, id, 1_000)).await == Enqueued::StrangerPoolFull };
    assert!(pool_full(2).await);
    // A contact's message takes no place in the pool, and keeps its TTL.
    let mut contacts = from(alice, 3, 1 + 30 * DAY);
    contacts.contact_token_hash = Some([5; 32]);
    assert_eq!(enqueue(contacts).await, Enqueued::Stored);
    assert!(pool_full(4).await);
    // Acknowledged.
    assert!(matches!(
        store
            .ack(bob_device, alice.0, MessageId([1; 16]))
            .await
            .expect("ack"),
        Acked::Confirmed { .. }
    ));
    assert_eq!(enqueue(from(alice, 5, 1_000)).await, Enqueued::Stored);
    assert!(pool_full(6).await);
    // Withdrawn.
    assert_eq!(
        store
            .withdraw(alice.0, MessageId([5; 16]))
            .await
            .expect("withdraw"),
        Withdrawal::Withdrawn
    );
    assert_eq!(enqueue(from(alice, 7, 1_000)).await, Enqueued::Stored);
    assert!(pool_full(8).await);
    // Expired.
    store.expire(2_000, 100).await.expect("expire");
    assert_eq!(enqueue(from(alice, 9, 1 + DAY)).await, Enqueued::Stored);
    assert!(pool_full(10).await);
    // Deleted with its sender's account (opting out takes what it sent along).
    store
        .delete_account(by(alice.1, alice.0))
        .await
        .expect("delete alice");
    let carol = DeviceId([3; 16]);
    let carol_account = store
        .register_device(Pseudonym([0xC0; 32]), 1, carol, [7; 32], 0)
        .await
        .expect("carol")
        .account;
    store
        .publish_keys(carol, identity(30), vec![key(30)], None, 100)
        .await
        .expect("publish");
    assert_eq!(
        enqueue(from((carol, carol_account), 11, 1 + DAY)).await,
        Enqueued::Stored
    );
    assert_eq!(
        enqueue(from((carol, carol_account), 12, 1 + DAY)).await,
        Enqueued::StrangerPoolFull
    );
}

/// Promise P7 in the store: a copy its device set aside is answered, withdrawn and expired as
/// one still waiting; a message shown without a receipt is delivered, with no receipt stored.
#[tokio::test]
async fn a_discarded_copy_answers_as_a_waiting_one_and_one_shown_without_a_receipt_as_delivered() {
    let dir = temp_dir("discard");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    discarded_and_unreceipted_copies_in(&store).await;
    let _ = std::fs::remove_dir_all(&dir);
    discarded_and_unreceipted_copies_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn discarded_and_unreceipted_copies_on_postgres() {
    let store = TempPostgres::open().await;
    discarded_and_unreceipted_copies_in(store.store()).await;
}

async fn discarded_and_unreceipted_copies_in(store: &impl Store) {
    let (alice, bob) = (DeviceId([1; 16]), DeviceId([3; 16]));
    let register = |pseudonym, device| store.register_device(pseudonym, 1, device, [9; 32], 0);
    let alice_account = register(Pseudonym([0xA1; 32]), alice)
        .await
        .expect("alice")
        .account;
    let bob_account = register(Pseudonym([0xB0; 32]), bob)
        .await
        .expect("bob")
        .account;
    for (device, n) in [(alice, 10), (bob, 20)] {
        store
            .publish_keys(device, identity(n), vec![key(n)], Some(key(n + 5)), 100)
            .await
            .expect("publish");
    }
    let copies: &[(DeviceId, &[u8])] = &[(bob, b"1")];
    for id in 1..=3 {
        let message = message((alice, alice_account), id, bob_account, copies);
        let stored = store.enqueue(message, 10).await.expect("enqueue");
        assert_eq!(stored, Enqueued::Stored);
    }
    let id = |n| MessageId([n; 16]);
    // Set aside: never handed out again, and a withdraw finds it waiting.
    let discarded = store.ack_as(bob, alice, id(1), AckKind::Discarded).await;
    assert_eq!(
        discarded.expect("discard"),
        Acked::Confirmed { first: false }
    );
    let pending = store.pending(bob, QueueCursor::START, 10, 2).await;
    let ids: Vec<MessageId> = pending.expect("pending").iter().map(|p| p.id).collect();
    assert_eq!(ids, [id(2), id(3)]);
    assert_eq!(
        store.ack(bob, alice, id(1)).await.expect("again"),
        Acked::Unknown
    );
    let withdrawn = store.withdraw(alice, id(1)).await;
    assert_eq!(withdrawn.expect("withdraw"), Withdrawal::Withdrawn);
    // Shown without a receipt: delivered, and no receipt waits for the sender.
    let shown = store
        .ack_as(bob, alice, id(2), AckKind::ShownWithoutReceipt)
        .await;
    assert_eq!(shown.expect("ack"), Acked::Confirmed { first: false });
    let withdrawn = store.withdraw(alice, id(2)).await;
    assert_eq!(withdrawn.expect("withdraw"), Withdrawal::Delivered);
    assert!(store.receipts(alice).await.expect("receipts").is_empty());
    // Set aside, then its TTL ends: an EXPIRED receipt, as for a device that never came.
    let discarded = store.ack_as(bob, alice, id(3), AckKind::Discarded).await;
    discarded.expect("discard");
    let expired = store.expire(1_000, 10).await.expect("expire");
    let expired: Vec<MessageId> = expired.iter().map(|e| e.id).collect();
    assert_eq!(expired, [id(3)]);
}

/// A database made before OPRF keys had versions: its accounts are on key 1 with no previous
/// pseudonym, found as before, and can move to a new key, after which both pseudonyms name them.
#[tokio::test]
async fn a_database_from_before_key_versions_is_brought_up_to_them() {
    let dir = temp_dir("key-versions");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    let (old, new) = (Pseudonym([0x51; 32]), Pseudonym([0x52; 32]));
    let account = store
        .register_device(old, 1, DeviceId([0x51; 16]), [0x51; 32], 0)
        .await
        .expect("register")
        .account;
    drop(store);
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    database
        .execute_batch(
            "DROP INDEX accounts_by_previous_pseudonym;
             ALTER TABLE accounts DROP COLUMN previous_pseudonym;
             ALTER TABLE accounts DROP COLUMN key_version;",
        )
        .expect("an older database");
    drop(database);
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("reopen");
    let found = store.account(old).await.expect("read").expect("found");
    assert_eq!(found.account, account);
    assert_eq!(
        store.accounts_by_key_version().await.expect("count"),
        vec![(1, 1)]
    );
    assert_eq!(
        store
            .rekey_account(account, old, new, 2)
            .await
            .expect("rekey"),
        tidings_store::Rekeyed::Moved
    );
    for pseudonym in [old, new] {
        let route = store.route(pseudonym).await.expect("route").expect("found");
        assert_eq!(route.account, account);
    }
    assert_eq!(
        store.accounts_by_key_version().await.expect("count"),
        vec![(2, 1)]
    );
    assert_eq!(store.forget_previous_pseudonyms().await.expect("forget"), 1);
    assert!(store.route(old).await.expect("route").is_none());
    assert!(store.account(new).await.expect("read").is_some());
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Alice (one device) and Bob (a phone and a laptop, with a contact token Alice presents), every
/// device with keys published, for the deliver-first tests.
struct Pair {
    alice: (DeviceId, AccountId),
    bob: AccountId,
    bob_phone: DeviceId,
    bob_laptop: DeviceId,
}

const BOB_TOKEN: [u8; 32] = [0x5B; 32];

impl Pair {
    async fn register(store: &impl Store) -> Self {
        let (alice_phone, bob_phone, bob_laptop) =
            (DeviceId([1; 16]), DeviceId([3; 16]), DeviceId([4; 16]));
        let register = |pseudonym, device| store.register_device(pseudonym, 1, device, [9; 32], 0);
        let alice = register(Pseudonym([0xA1; 32]), alice_phone)
            .await
            .expect("alice")
            .account;
        let bob = register(Pseudonym([0xB0; 32]), bob_phone)
            .await
            .expect("bob")
            .account;
        let linked = store.add_device(by(bob, bob_phone), bob_laptop, [6; 32], identity(40), 6, 0);
        assert_eq!(linked.await.expect("link"), Linked::Added);
        for (device, n) in [(alice_phone, 10), (bob_phone, 20), (bob_laptop, 40)] {
            store
                .publish_keys(device, identity(n), vec![key(n)], Some(key(n + 5)), 100)
                .await
                .expect("publish");
        }
        store
            .set_contact_token(bob_phone, BOB_TOKEN)
            .await
            .expect("token");
        Self {
            alice: (alice_phone, alice),
            bob,
            bob_phone,
            bob_laptop,
        }
    }

    /// Alice's message `id` to Bob with copies for `copies` and `decided` named as decided, as
    /// a contact's.
    fn message(&self, id: u8, copies: &[DeviceId], decided: &[DeviceId]) -> NewMessage {
        let copies: Vec<(DeviceId, &[u8])> = copies.iter().map(|d| (*d, &b"held"[..])).collect();
        NewMessage {
            decided: decided.to_vec(),
            contact_token_hash: Some(BOB_TOKEN),
            ..message(self.alice, id, self.bob, &copies)
        }
    }

    /// The held copy of Alice's message `id` on `device` (its TTL ends at 1 000, as `message`'s).
    fn held(&self, device: DeviceId, id: u8) -> HeldAck {
        HeldAck {
            device,
            sender_device: self.alice.0,
            id: MessageId([id; 16]),
            sent_at: 1,
            expires_at: 1_000,
        }
    }

    async fn receipts(&self, store: &impl Store) -> Vec<PendingReceipt> {
        store.receipts(self.alice.0).await.expect("receipts")
    }
}

fn delivered(id: u8) -> PendingReceipt {
    PendingReceipt {
        id: MessageId([id; 16]),
        kind: ReceiptKind::Delivered,
    }
}

/// A held copy's acknowledgement, answered once executed and once durable (the same).
async fn ack_held(store: &impl Store, copy: HeldAck, kind: AckKind) -> Acked {
    let mut completion = store.ack_held(copy, kind).await.expect("ack held");
    let early = completion.executed().await.expect("executed");
    let durable = completion.durable().await.expect("durable");
    assert_eq!(early, durable, "the executed answer is the durable one");
    durable
}

#[tokio::test]
async fn a_held_acknowledgement_and_a_withdraw_decide_once() {
    let dir = temp_dir("held-decide");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    a_held_acknowledgement_and_a_withdraw_decide_once_in(&store).await;
}

#[tokio::test]
async fn a_held_acknowledgement_and_a_withdraw_decide_once_in_memory() {
    a_held_acknowledgement_and_a_withdraw_decide_once_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn a_held_acknowledgement_and_a_withdraw_decide_once_on_postgres() {
    let store = TempPostgres::open().await;
    a_held_acknowledgement_and_a_withdraw_decide_once_in(store.store()).await;
}

async fn a_held_acknowledgement_and_a_withdraw_decide_once_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let alice = pair.alice.0;
    let withdraw_held = |id| store.withdraw_held(alice, MessageId([id; 16]), Some(1_000));

    // The acknowledgement first: delivered, with one receipt, whatever comes after.
    let shown = ack_held(store, pair.held(pair.bob_phone, 1), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });
    assert_eq!(
        withdraw_held(1).await.expect("withdraw"),
        Withdrawal::Delivered
    );
    let laptop = ack_held(store, pair.held(pair.bob_laptop, 1), AckKind::Shown).await;
    assert_eq!(laptop, Acked::Confirmed { first: false });
    let again = ack_held(store, pair.held(pair.bob_phone, 1), AckKind::Shown).await;
    assert_eq!(
        again,
        Acked::Confirmed { first: false },
        "an acknowledgement again"
    );
    assert_eq!(pair.receipts(store).await, vec![delivered(1)]);

    // The withdraw first: no device may show it, and a resend brings nothing back.
    assert_eq!(
        withdraw_held(2).await.expect("withdraw"),
        Withdrawal::Withdrawn
    );
    for device in [pair.bob_phone, pair.bob_laptop] {
        let acked = ack_held(store, pair.held(device, 2), AckKind::Shown).await;
        assert_eq!(acked, Acked::Withdrawn);
    }
    // A resend screens (ids are not looked at) but is never shown: its held copies' acks are
    // refused as above; stored, it is a duplicate.
    let resend = pair.message(2, &[pair.bob_phone, pair.bob_laptop], &[]);
    assert!(store.screen(&resend).await.expect("screen"));
    let enqueued = store.enqueue(resend, 10).await.expect("enqueue");
    assert_eq!(enqueued, Enqueued::Duplicate);
    assert_eq!(
        withdraw_held(2).await.expect("again"),
        Withdrawal::Withdrawn
    );
    assert_eq!(
        pair.receipts(store).await,
        vec![delivered(1)],
        "no receipt for 2"
    );

    // Shown without a receipt is delivered all the same.
    let quiet = ack_held(
        store,
        pair.held(pair.bob_laptop, 3),
        AckKind::ShownWithoutReceipt,
    )
    .await;
    assert_eq!(quiet, Acked::Confirmed { first: false });
    let withdrawal = store.withdraw(alice, MessageId([3; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Delivered);
    assert_eq!(pair.receipts(store).await, vec![delivered(1)]);

    // A plain withdraw of a message the server does not hold decides nothing.
    let withdrawal = store.withdraw(alice, MessageId([4; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Unknown);
    let shown = ack_held(store, pair.held(pair.bob_phone, 4), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });

    // A held copy is never acknowledged as discarded (it is stored first): a caller's mistake.
    let discarded = store
        .ack_held(pair.held(pair.bob_phone, 5), AckKind::Discarded)
        .await;
    let failed = match discarded {
        Err(e) => Err(e),
        Ok(completion) => completion.durable().await,
    };
    assert!(matches!(failed, Err(StoreError::Engine(_))), "{failed:?}");
    let shown = ack_held(store, pair.held(pair.bob_phone, 5), AckKind::Shown).await;
    assert_eq!(
        shown,
        Acked::Confirmed { first: true },
        "nothing was decided"
    );
}

/// A held acknowledgement and a withdraw of the same message handed to the writer while it is
/// held (so mostly taken in one batch), in either order, and both at once: exactly one of them
/// decides, and the other reads its decision.
#[tokio::test]
async fn a_held_acknowledgement_racing_a_withdraw_in_one_batch() {
    let dir = temp_dir("held-race");
    let held = Held::open(&dir);
    let store = &held.store;
    let pair = Pair::register(store).await;
    let alice = pair.alice.0;

    // The acknowledgement handed over first, the withdraw behind it.
    let release = held.hold().await;
    let mut ack = store
        .ack_held(pair.held(pair.bob_phone, 1), AckKind::Shown)
        .await
        .expect("ack held");
    let withdraw = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .withdraw_held(alice, MessageId([1; 16]), Some(1_000))
                .await
        })
    };
    release.send(()).expect("release");
    assert_eq!(ack.executed().await, Some(Acked::Confirmed { first: true }));
    assert_eq!(
        ack.durable().await.expect("ack"),
        Acked::Confirmed { first: true }
    );
    let withdrawal = withdraw.await.expect("join").expect("withdraw");
    assert_eq!(withdrawal, Withdrawal::Delivered);

    // The withdraw first (the acknowledgement is handed over once its answer came): the
    // acknowledgement reads the withdrawn decision.
    let release = held.hold().await;
    let withdraw = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .withdraw_held(alice, MessageId([2; 16]), Some(1_000))
                .await
        })
    };
    release.send(()).expect("release");
    let withdrawal = withdraw.await.expect("join").expect("withdraw");
    assert_eq!(withdrawal, Withdrawal::Withdrawn);
    let acked = ack_held(store, pair.held(pair.bob_phone, 2), AckKind::Shown).await;
    assert_eq!(acked, Acked::Withdrawn);

    // Both at once, in whatever order they reach the writer: one decision, read by the other.
    for id in 3..13 {
        let (acked, withdrawal) = tokio::join!(
            ack_held(store, pair.held(pair.bob_laptop, id), AckKind::Shown),
            store.withdraw_held(alice, MessageId([id; 16]), Some(1_000))
        );
        match (acked, withdrawal.expect("withdraw")) {
            (Acked::Confirmed { first: true }, Withdrawal::Delivered)
            | (Acked::Withdrawn, Withdrawal::Withdrawn) => {}
            other => panic!("message {id} was decided twice: {other:?}"),
        }
    }
    let receipts = store.receipts(alice).await.expect("receipts");
    assert!(receipts.contains(&delivered(1)));
    assert!(!receipts.contains(&delivered(2)));
    drop(held);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stored_copies_answer_from_the_decision_records() {
    let dir = temp_dir("records-stored");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    stored_copies_answer_from_the_decision_records_in(&store).await;
}

#[tokio::test]
async fn stored_copies_answer_from_the_decision_records_in_memory() {
    stored_copies_answer_from_the_decision_records_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn stored_copies_answer_from_the_decision_records_on_postgres() {
    let store = TempPostgres::open().await;
    stored_copies_answer_from_the_decision_records_in(store.store()).await;
}

async fn stored_copies_answer_from_the_decision_records_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let alice = pair.alice.0;
    let both = [pair.bob_phone, pair.bob_laptop];
    let ack = |device, id| store.ack(device, alice, MessageId([id; 16]));

    // A stored copy acknowledged again (its device never heard the answer) is confirmed again,
    // without a second receipt, while the message is stored and after it is gone.
    let stored = store.enqueue(pair.message(1, &both, &[]), 10).await;
    assert_eq!(stored.expect("enqueue"), Enqueued::Stored);
    assert_eq!(
        ack(pair.bob_phone, 1).await.expect("ack"),
        Acked::Confirmed { first: true }
    );
    assert_eq!(
        ack(pair.bob_phone, 1).await.expect("again"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        ack(pair.bob_laptop, 1).await.expect("ack"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        ack(pair.bob_laptop, 1).await.expect("again, gone"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(
        ack(pair.bob_laptop, 9).await.expect("never sent"),
        Acked::Unknown
    );
    assert_eq!(pair.receipts(store).await, vec![delivered(1)]);
    // A resend of a delivered message is not a duplicate (its record is not a withdrawal).
    let resend = store.enqueue(pair.message(1, &both, &[]), 10).await;
    assert_eq!(resend.expect("resend"), Enqueued::Stored);

    // A resend of a withdrawn message is.
    let stored = store.enqueue(pair.message(2, &both, &[]), 10).await;
    assert_eq!(stored.expect("enqueue"), Enqueued::Stored);
    let withdrawal = store.withdraw(alice, MessageId([2; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Withdrawn);
    let resend = store.enqueue(pair.message(2, &both, &[]), 10).await;
    assert_eq!(resend.expect("resend"), Enqueued::Duplicate);
    assert_eq!(ack(pair.bob_phone, 2).await.expect("ack"), Acked::Withdrawn);

    // A held message's undecided copy stored after the phone showed its held one: one copy
    // stored (a single one), the phone's decided, and no second receipt when the laptop shows.
    let shown = ack_held(store, pair.held(pair.bob_phone, 3), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });
    let rest = pair.message(3, &[pair.bob_laptop], &[pair.bob_phone]);
    assert_eq!(
        store.enqueue(rest, 10).await.expect("enqueue"),
        Enqueued::Stored
    );
    let phone = store.pending(pair.bob_phone, QueueCursor::START, 10, 0);
    assert!(phone
        .await
        .expect("pending")
        .iter()
        .all(|p| p.id != MessageId([3; 16])));
    let laptop = store.pending(pair.bob_laptop, QueueCursor::START, 10, 0);
    let laptop = laptop.await.expect("pending");
    assert_eq!(
        laptop.iter().filter(|p| p.id == MessageId([3; 16])).count(),
        1
    );
    let withdrawal = store.withdraw(alice, MessageId([3; 16]));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Delivered);
    assert_eq!(
        ack(pair.bob_laptop, 3).await.expect("ack"),
        Acked::Confirmed { first: false }
    );
    assert_eq!(pair.receipts(store).await, vec![delivered(1), delivered(3)]);

    // Another one whose stored copy is never fetched: its TTL's end brings no `Expired`
    // receipt, for the message was delivered.
    let shown = ack_held(
        store,
        pair.held(pair.bob_laptop, 4),
        AckKind::ShownWithoutReceipt,
    )
    .await;
    assert_eq!(shown, Acked::Confirmed { first: false });
    let rest = pair.message(4, &[pair.bob_phone], &[pair.bob_laptop]);
    assert_eq!(
        store.enqueue(rest, 10).await.expect("enqueue"),
        Enqueued::Stored
    );
    // Every copy decided: nothing to store.
    let shown = ack_held(store, pair.held(pair.bob_phone, 5), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });
    let none = pair.message(5, &[], &[pair.bob_phone, pair.bob_laptop]);
    assert_eq!(
        store.enqueue(none, 10).await.expect("enqueue"),
        Enqueued::Stored
    );
    let expired = store.expire(1_000, 10).await.expect("expire");
    assert!(
        expired.iter().all(|e| e.id != MessageId([4; 16])),
        "{expired:?}"
    );
    let receipts = pair.receipts(store).await;
    assert!(
        receipts.iter().all(|r| r.kind != ReceiptKind::Expired),
        "{receipts:?}"
    );
}

#[tokio::test]
async fn decision_records_expire_a_margin_after_their_message() {
    let dir = temp_dir("records-expire");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    decision_records_expire_a_margin_after_their_message_in(&store).await;
}

#[tokio::test]
async fn decision_records_expire_a_margin_after_their_message_in_memory() {
    decision_records_expire_a_margin_after_their_message_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn decision_records_expire_a_margin_after_their_message_on_postgres() {
    let store = TempPostgres::open().await;
    decision_records_expire_a_margin_after_their_message_in(store.store()).await;
}

async fn decision_records_expire_a_margin_after_their_message_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let alice = pair.alice.0;
    let ends = 1_000 + DECISION_MARGIN;
    // 1 delivered (held), 2 withdrawn (held), 3 delivered (stored).
    let shown = ack_held(store, pair.held(pair.bob_phone, 1), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });
    let withdrawal = store.withdraw_held(alice, MessageId([2; 16]), Some(1_000));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Withdrawn);
    let stored = store.enqueue(pair.message(3, &[pair.bob_phone, pair.bob_laptop], &[]), 10);
    assert_eq!(stored.await.expect("enqueue"), Enqueued::Stored);
    for device in [pair.bob_phone, pair.bob_laptop] {
        store
            .ack(device, alice, MessageId([3; 16]))
            .await
            .expect("ack");
    }
    // Receipts taken, so that only the records answer.
    for id in [1, 3] {
        store
            .ack_receipt(alice, MessageId([id; 16]))
            .await
            .expect("receipt");
    }

    // Past the messages' TTL, within the margin: the records still answer.
    store.expire(ends - 1, 10).await.expect("expire");
    let withdraw = |id| store.withdraw(alice, MessageId([id; 16]));
    assert_eq!(withdraw(1).await.expect("1"), Withdrawal::Delivered);
    assert_eq!(withdraw(2).await.expect("2"), Withdrawal::Withdrawn);
    assert_eq!(withdraw(3).await.expect("3"), Withdrawal::Delivered);
    let again = store.ack(pair.bob_phone, alice, MessageId([3; 16]));
    assert_eq!(again.await.expect("ack"), Acked::Confirmed { first: false });

    // At its end, each goes (a sweep that finds only records runs for them).
    assert_eq!(store.expire(ends, 10).await.expect("expire"), vec![]);
    for id in 1..=3 {
        assert_eq!(withdraw(id).await.expect("withdraw"), Withdrawal::Unknown);
    }
    let again = store.ack(pair.bob_phone, alice, MessageId([3; 16]));
    assert_eq!(again.await.expect("ack"), Acked::Unknown);
    let resend = store.enqueue(pair.message(2, &[pair.bob_phone, pair.bob_laptop], &[]), 10);
    assert_eq!(resend.await.expect("resend"), Enqueued::Stored);
}

/// Screening follows every change of what it reads, at once (the SQLite engine answers it from
/// memory): a device linked, keys published, a contact token rotated, a device removed.
async fn screening_follows_every_device_key_and_token_change_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let both = [pair.bob_phone, pair.bob_laptop];
    let screen = |message: NewMessage| async move { store.screen(&message).await.expect("screen") };
    assert!(screen(pair.message(1, &both, &[])).await);
    // A number whose device has published no keys yet has no device to get a copy; once it
    // publishes them it has.
    let carol_phone = DeviceId([6; 16]);
    let carol = store
        .register_device(Pseudonym([0xC0; 32]), 1, carol_phone, [8; 32], 0)
        .await
        .expect("carol")
        .account;
    let to_carol = NewMessage {
        receiver: carol,
        contact_token_hash: None,
        ..pair.message(1, &[], &[])
    };
    assert!(!screen(to_carol.clone()).await, "no keyed device yet");
    store
        .publish_keys(carol_phone, identity(60), vec![key(60)], Some(key(65)), 100)
        .await
        .expect("publish");
    let to_carol = NewMessage {
        copies: vec![(carol_phone, bytes::Bytes::from_static(b"held"))],
        ..to_carol
    };
    store
        .set_contact_token(carol_phone, [0xCC; 32])
        .await
        .expect("token");
    let to_carol = NewMessage {
        contact_token_hash: Some([0xCC; 32]),
        ..to_carol
    };
    assert!(screen(to_carol).await, "keys published");
    // A third device of Bob's, linked with its keys, must get a copy.
    let tablet = DeviceId([5; 16]);
    let linked = store.add_device(
        by(pair.bob, pair.bob_phone),
        tablet,
        [7; 32],
        identity(50),
        6,
        0,
    );
    assert_eq!(linked.await.expect("link"), Linked::Added);
    assert!(
        !screen(pair.message(1, &both, &[])).await,
        "a device linked"
    );
    let all = [pair.bob_phone, pair.bob_laptop, tablet];
    assert!(screen(pair.message(1, &all, &[])).await);
    // The token rotated: the old one is a stranger's.
    store
        .set_contact_token(pair.bob_phone, [0x5C; 32])
        .await
        .expect("rotate");
    assert!(!screen(pair.message(1, &all, &[])).await, "a token rotated");
    let rotated = NewMessage {
        contact_token_hash: Some([0x5C; 32]),
        ..pair.message(1, &all, &[])
    };
    assert!(screen(rotated.clone()).await);
    // Removed: its copy is one too many.
    assert!(store
        .remove_device(by(pair.bob, pair.bob_phone), tablet)
        .await
        .expect("remove"));
    assert!(!screen(rotated).await, "a device removed");
}

#[tokio::test]
async fn screening_follows_every_device_key_and_token_change() {
    let dir = temp_dir("screen-changes");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    screening_follows_every_device_key_and_token_change_in(&store).await;
}

#[tokio::test]
async fn screening_follows_every_device_key_and_token_change_in_memory() {
    screening_follows_every_device_key_and_token_change_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn screening_follows_every_device_key_and_token_change_on_postgres() {
    let store = TempPostgres::open().await;
    screening_follows_every_device_key_and_token_change_in(store.store()).await;
}

#[tokio::test]
async fn a_screen_reads_what_a_send_would_be_stored_with() {
    let dir = temp_dir("screen");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    a_screen_reads_what_a_send_would_be_stored_with_in(&store).await;
}

#[tokio::test]
async fn a_screen_reads_what_a_send_would_be_stored_with_in_memory() {
    a_screen_reads_what_a_send_would_be_stored_with_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn a_screen_reads_what_a_send_would_be_stored_with_on_postgres() {
    let store = TempPostgres::open().await;
    a_screen_reads_what_a_send_would_be_stored_with_in(store.store()).await;
}

async fn a_screen_reads_what_a_send_would_be_stored_with_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let both = [pair.bob_phone, pair.bob_laptop];
    let screen = |message: NewMessage| async move { store.screen(&message).await.expect("screen") };
    assert!(
        screen(pair.message(1, &both, &[])).await,
        "a contact's, every copy"
    );
    assert!(
        screen(pair.message(1, &[pair.bob_laptop], &[pair.bob_phone])).await,
        "a copy decided"
    );
    assert!(
        !screen(pair.message(1, &[pair.bob_laptop], &[])).await,
        "a copy missing"
    );
    let stranger = NewMessage {
        contact_token_hash: Some([0x77; 32]),
        ..pair.message(1, &both, &[])
    };
    assert!(!screen(stranger).await, "a stranger's");
    let nobody = NewMessage {
        receiver: AccountId(i64::MAX),
        ..pair.message(1, &[], &[])
    };
    assert!(!screen(nobody).await, "no receiver device");
    // Queues are not looked at: a full one is the stored path's business.
    let limits = QueueLimits::from(1);
    let stored = store.enqueue(pair.message(2, &both, &[]), limits).await;
    assert_eq!(stored.expect("enqueue"), Enqueued::Stored);
    assert!(screen(pair.message(3, &both, &[])).await, "queues full");
    // Nor the id: a held copy's acknowledgement is decided against the message's record.
    assert!(screen(pair.message(2, &both, &[])).await, "stored already");
}

#[tokio::test]
async fn an_accounts_decision_records_go_with_it() {
    let dir = temp_dir("records-account");
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    an_accounts_decision_records_go_with_it_in(&store).await;
    let database = rusqlite::Connection::open(dir.join(tidings_store::sqlite::DATABASE_FILE))
        .expect("database");
    let left: i64 = database
        .query_row("SELECT count(*) FROM withdrawn", [], |row| row.get(0))
        .expect("count");
    assert_eq!(left, 0, "records of a deleted account's devices");
}

#[tokio::test]
async fn an_accounts_decision_records_go_with_it_in_memory() {
    an_accounts_decision_records_go_with_it_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn an_accounts_decision_records_go_with_it_on_postgres() {
    let store = TempPostgres::open().await;
    an_accounts_decision_records_go_with_it_in(store.store()).await;
}

async fn an_accounts_decision_records_go_with_it_in(store: &impl Store) {
    let pair = Pair::register(store).await;
    let (alice, alice_account) = pair.alice;
    let shown = ack_held(store, pair.held(pair.bob_phone, 1), AckKind::Shown).await;
    assert_eq!(shown, Acked::Confirmed { first: true });
    let withdrawal = store.withdraw_held(alice, MessageId([2; 16]), Some(1_000));
    assert_eq!(withdrawal.await.expect("withdraw"), Withdrawal::Withdrawn);
    store
        .delete_account(by(alice_account, alice))
        .await
        .expect("delete");
    for id in [1, 2] {
        let withdrawal = store.withdraw(alice, MessageId([id; 16]));
        assert_eq!(
            withdrawal.await.expect("withdraw"),
            Withdrawal::Unknown,
            "no record of {id} left"
        );
    }
}
