//! Drives the SQLite engine's writer through the harness's offline phase without the network:
//! `USERS` senders each store `PER_USER` messages for a receiver of their own (one device each),
//! then every receiver device acknowledges its copies, many at once, as a drain does. Prints the
//! store and the acknowledgement rates. For profiles of the writer (callgrind, perf); the figures
//! that count come from the harness.
//!
//! `cargo run --release -p tidings-store --example drain_driver -- [USERS] [PER_USER] [DIR]`

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{AckKind, IdentityKeys, NewMessage, Pseudonym, SignedKey, Store};

fn device(n: u32, side: u8) -> DeviceId {
    let mut bytes = [side; 16];
    bytes[..4].copy_from_slice(&n.to_be_bytes());
    DeviceId(bytes)
}

fn message_id(user: u32, n: u32) -> MessageId {
    // Random-looking ids, as clients make them.
    let mut bytes = [0u8; 16];
    let mut x = u64::from(user) << 32 | u64::from(n);
    for chunk in bytes.chunks_mut(8) {
        x = x
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(0x2545_F491_4F6C_DD1D);
        chunk.copy_from_slice(&(x ^ (x >> 29)).to_le_bytes());
    }
    MessageId(bytes)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let users: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1000);
    let per_user: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let dir = std::path::PathBuf::from(
        args.get(3)
            .cloned()
            .unwrap_or_else(|| format!("/var/tmp/drain-driver-{}", std::process::id())),
    );
    let _ = std::fs::remove_dir_all(&dir);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = Arc::new(
            SqliteStore::open(
                &dir,
                SqliteOptions {
                    max_batch: tidings_store::sqlite::WRITER_QUEUE,
                    sync_observer: None,
                },
            )
            .expect("open"),
        );
        let mut accounts = Vec::new();
        for user in 0..users {
            let mut pair = Vec::new();
            for side in [1u8, 2] {
                let mut pseudonym = [side; 32];
                pseudonym[..4].copy_from_slice(&user.to_be_bytes());
                let id = device(user, side);
                let account = store
                    .register_device(Pseudonym(pseudonym), 1, id, [side; 32], 0)
                    .await
                    .expect("register")
                    .account;
                store
                    .publish_keys(
                        id,
                        IdentityKeys {
                            identity_key: [side; 32],
                            signing_key: [side + 1; 32],
                        },
                        vec![SignedKey {
                            public_key: [side; 32],
                            signature: [side; 64],
                        }],
                        None,
                        100,
                    )
                    .await
                    .expect("publish");
                pair.push(account);
            }
            accounts.push((pair[0], pair[1]));
        }
        let started = Instant::now();
        let mut tasks = Vec::new();
        for (user, (sender, receiver)) in accounts.iter().copied().enumerate() {
            let store = Arc::clone(&store);
            let user = u32::try_from(user).expect("user");
            tasks.push(tokio::spawn(async move {
                for n in 0..per_user {
                    let message = NewMessage {
                        decided: Vec::new(),
                        sender_device: device(user, 1),
                        sender_account: sender,
                        id: message_id(user, n),
                        receiver,
                        sent_at: 1,
                        expires_at: u64::MAX / 4,
                        copies: vec![(device(user, 2), Bytes::from(vec![0x5A; 64]))],
                        contact_token_hash: None,
                    };
                    store.enqueue(message, 10_000).await.expect("enqueue");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let stored = f64::from(users * per_user);
        let secs = started.elapsed().as_secs_f64();
        println!("stored {stored} in {secs:.2} s: {:.0}/s", stored / secs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for user in 0..users {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(async move {
                // A session acknowledges a window of copies at once.
                let mut staged = Vec::new();
                for n in 0..per_user {
                    staged.push(
                        store
                            .ack_staged_as(
                                device(user, 2),
                                device(user, 1),
                                message_id(user, n),
                                AckKind::Shown,
                            )
                            .await
                            .expect("ack"),
                    );
                }
                for mut s in staged {
                    let _ = s.executed().await;
                    s.durable().await.expect("durable");
                }
            }));
        }
        for task in tasks {
            task.await.expect("task");
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "acknowledged {stored} in {secs:.2} s: {:.0}/s",
            stored / secs
        );
    });
}
