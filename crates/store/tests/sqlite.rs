//! The embedded engine through the `Store` trait: queue semantics, receipts, and that deleted
//! bytes leave the data files after a scrub.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{Acked, Enqueued, NewMessage, PendingReceipt, Pseudonym, Store, SyncReport};

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
    sender: DeviceId,
    id: u8,
    receiver: tidings_store::AccountId,
    payload: &[u8],
) -> NewMessage {
    NewMessage {
        sender_device: sender,
        id: MessageId([id; 16]),
        receiver,
        sent_at: 1,
        expires_at: 1_000,
        payload: Bytes::copy_from_slice(payload),
    }
}

#[tokio::test]
async fn queue_ack_receipt_and_residue() {
    let dir = temp_dir("queue");
    let reports: Arc<Mutex<Vec<SyncReport>>> = Arc::default();
    let seen = Arc::clone(&reports);
    let store = SqliteStore::open(
        &dir,
        SqliteOptions {
            max_batch: 64,
            sync_observer: Some(Arc::new(move |report: &SyncReport| {
                seen.lock().expect("lock").push(report.clone())
            })),
        },
    )
    .expect("open");
    let alice_device = DeviceId([1; 16]);
    let bob_phone = DeviceId([2; 16]);
    let bob_laptop = DeviceId([3; 16]);
    let alice = Pseudonym([0xA1; 32]);
    let bob = Pseudonym([0xB0; 32]);
    store
        .register_device(alice, alice_device, [9; 32], 0)
        .await
        .expect("alice");
    let bob_account = store
        .register_device(bob, bob_phone, [8; 32], 0)
        .await
        .expect("bob")
        .account;
    // A second registration of bob's number replaces the phone with the laptop.
    let replaced = store
        .register_device(bob, bob_laptop, [7; 32], 0)
        .await
        .expect("bob again");
    assert_eq!(replaced.removed, vec![bob_phone]);
    assert!(store.device(bob_phone).await.expect("read").is_none());

    let secret = b"PAYLOAD-MARKER-0123456789-abcdef";
    let first = store
        .enqueue(message(alice_device, 1, bob_account, secret), 10)
        .await
        .expect("enqueue");
    assert_eq!(first, Enqueued::Stored);
    assert!(reports
        .lock()
        .expect("lock")
        .iter()
        .any(|r| r.messages.contains(&(alice_device, MessageId([1; 16])))));
    let again = store
        .enqueue(message(alice_device, 1, bob_account, secret), 10)
        .await
        .expect("enqueue");
    assert_eq!(again, Enqueued::Duplicate);
    assert_eq!(
        store
            .enqueue(message(alice_device, 2, bob_account, b"x"), 1)
            .await
            .expect("full"),
        Enqueued::QueueFull
    );

    let pending = store.pending(bob_laptop, 0, 10, 2).await.expect("pending");
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
        Acked::Unknown,
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
        .enqueue(message(alice_device, 3, bob_account, b"late"), 10)
        .await
        .expect("enqueue");
    let expired = store.expire(5_000, 100).await.expect("expire");
    assert_eq!(expired.len(), 1);
    assert_eq!(
        store.receipts(alice_device).await.expect("receipts")[0].kind,
        ReceiptKind::Expired
    );

    // Disable bob: nothing with his pseudonym remains after a scrub.
    store.delete_account(bob_account).await.expect("delete");
    assert!(store.account(bob).await.expect("read").is_none());
    store.scrub().await.expect("scrub");
    assert!(!files_contain(&dir, secret), "payload left in data files");
    assert!(!files_contain(&dir, &bob.0), "pseudonym left in data files");
    assert!(
        files_contain(&dir, &alice.0),
        "the scan must be able to see what is still stored"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
