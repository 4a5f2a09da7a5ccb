//! Issue 28, item 1: an operation that changes an account checks, in its own transaction, that the
//! device it is done for and that device's account still exist. A request that was already
//! running when its device was removed (or its account disabled) then cannot act once the removal
//! has committed, whatever the server checked before it started. Run against every engine.

use tidings_proto::id::DeviceId;
use tidings_store::memory::MemoryStore;
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{
    Actor, IdentityKeys, Linked, Pseudonym, Published, SignedKey, Store, StoreError, Voucher,
};

mod common;

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

fn revoked<T: std::fmt::Debug>(answer: Result<T, StoreError>, what: &str) {
    assert!(
        matches!(answer, Err(StoreError::Revoked)),
        "{what} by a device that is gone was answered {answer:?}"
    );
}

async fn a_removed_device_changes_nothing_in(store: &impl Store) {
    let [phone, laptop, tablet, stranger, bob_phone] = [1, 2, 3, 4, 5].map(|n| DeviceId([n; 16]));
    let alice = store
        .register_device(Pseudonym([1; 32]), 1, phone, [1; 32], 1)
        .await
        .expect("register")
        .account;
    let by_phone = Actor {
        account: alice,
        device: phone,
    };
    for (device, n) in [(laptop, 2), (tablet, 3)] {
        let linked = store
            .add_device(by_phone, device, [n; 32], identity(n), 6, 1)
            .await
            .expect("link");
        assert_eq!(linked, Linked::Added);
    }
    let bob = store
        .register_device(Pseudonym([2; 32]), 1, bob_phone, [5; 32], 1)
        .await
        .expect("register")
        .account;
    let published = store
        .publish_keys(bob_phone, identity(5), vec![key(50)], Some(key(51)), 10)
        .await
        .expect("publish");
    assert_eq!(published, Published::Stored { one_time_keys: 1 });

    assert!(store.remove_device(by_phone, laptop).await.expect("remove"));
    let by_laptop = Actor {
        account: alice,
        device: laptop,
    };
    revoked(store.remove_device(by_laptop, tablet).await, "a removal");
    revoked(
        store
            .add_device(by_laptop, stranger, [4; 32], identity(4), 6, 1)
            .await,
        "a link",
    );
    revoked(
        store.claim_keys(by_laptop, bob, Vec::new()).await,
        "a claim",
    );
    revoked(
        store
            .set_voucher(
                alice,
                tablet,
                Voucher {
                    by: laptop,
                    signature: [7; 64],
                },
            )
            .await,
        "a vouch",
    );
    revoked(
        store
            .publish_keys(laptop, identity(2), vec![key(20)], None, 10)
            .await,
        "a key upload",
    );
    revoked(store.delete_account(by_laptop).await, "an opt-out");
    // A device that still exists acts only for its own account.
    let phone_for_bob = Actor {
        account: bob,
        device: phone,
    };
    revoked(store.delete_account(phone_for_bob).await, "an opt-out");
    revoked(
        store.remove_device(phone_for_bob, bob_phone).await,
        "a removal",
    );

    // Nothing changed: the same devices, and bob's one-time key is still there.
    let mut left = store.devices_of(alice).await.expect("devices");
    left.sort();
    assert_eq!(left, vec![phone, tablet]);
    assert_eq!(
        store.devices_of(bob).await.expect("devices"),
        vec![bob_phone]
    );
    let claimed = store
        .claim_keys(by_phone, bob, Vec::new())
        .await
        .expect("claim");
    assert!(
        claimed.keys.iter().all(|k| !k.fallback),
        "a one-time key was handed out to the removed device"
    );

    // Once the account is gone, its last device acts no more either.
    let deleted = store.delete_account(by_phone).await.expect("opt out");
    assert_eq!(deleted.len(), 2);
    revoked(store.delete_account(by_phone).await, "a second opt-out");
    revoked(
        store
            .add_device(by_phone, stranger, [4; 32], identity(4), 6, 1)
            .await,
        "a link",
    );
}

#[tokio::test]
async fn a_removed_device_changes_nothing_in_memory() {
    a_removed_device_changes_nothing_in(&MemoryStore::new()).await;
}

#[tokio::test]
async fn a_removed_device_changes_nothing_in_sqlite() {
    let dir = std::env::temp_dir().join(format!("tidings-store-revocation-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = SqliteStore::open(&dir, SqliteOptions::default()).expect("open");
    a_removed_device_changes_nothing_in(&store).await;
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_removed_device_changes_nothing_on_postgres() {
    let store = common::TempPostgres::open().await;
    a_removed_device_changes_nothing_in(store.store()).await;
}
