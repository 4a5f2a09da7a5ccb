//! What end-to-end encryption costs the client, per message: Olm encrypt and decrypt on an
//! established session, opening a session (the first message to a device), fanning one message
//! out to 6 devices, and saving the sealed state that every send and receive writes.
//!
//! Run with `cargo bench -p tidings-client --bench crypto`. Prints one line per figure.

use std::time::{Duration, Instant};

use tidings_client::e2e::Crypto;
use tidings_client::session::KeySupply;
use tidings_client::vault::{Passphrase, Vault};
use tidings_proto::frame::{self, Envelope};
use tidings_proto::id::DeviceId;

/// A 160-byte message: a typical short text with its protobuf envelope.
const TEXT: &[u8] = &[b'x'; 160];

fn claim_from(crypto: &mut Crypto, device: DeviceId) -> frame::ClaimedKey {
    let upload = crypto
        .keys_to_publish(device, KeySupply::default(), 1)
        .expect("keys");
    frame::ClaimedKey {
        device_id: device.as_bytes().to_vec(),
        identity_key: upload.identity_key,
        signing_key: upload.signing_key,
        key: upload.one_time_keys.into_iter().next(),
        fallback: false,
        ..Default::default()
    }
}

fn per_op(label: &str, n: u32, elapsed: Duration) {
    let micros = elapsed.as_secs_f64() * 1e6 / f64::from(n);
    println!("{label:<58} {micros:>9.1} µs  ({n} runs)");
}

/// A sender with sessions to `devices` receivers, each of which has answered once (so the
/// sessions are past their pre-key stage, as in an ongoing conversation).
fn conversation(devices: usize) -> (Crypto, Vec<(DeviceId, Crypto)>) {
    let sender_device = DeviceId([0xAA; 16]);
    let mut sender = Crypto::new();
    let mut receivers = Vec::new();
    for i in 0..devices {
        let device = DeviceId([u8::try_from(i).unwrap_or(0); 16]);
        let mut receiver = Crypto::new();
        let claimed = claim_from(&mut receiver, device);
        sender.open_session("+1", &claimed).expect("session");
        let first = sender.encrypt(device, TEXT).expect("encrypt");
        receiver.decrypt(sender_device, &first).expect("decrypt");
        let reply = receiver.encrypt(sender_device, TEXT).expect("reply");
        sender.decrypt(device, &reply).expect("decrypt reply");
        receivers.push((device, receiver));
    }
    (sender, receivers)
}

fn main() {
    let sender_device = DeviceId([0xAA; 16]);
    let n = 5_000;

    // Encrypt and decrypt on an established session (the receiver has answered once, so these
    // are normal messages, not pre-key messages), one message at a time.
    let (mut sender, mut receivers) = conversation(1);
    let (device, receiver) = &mut receivers[0];
    let mut encrypt = Duration::ZERO;
    let mut decrypt = Duration::ZERO;
    for _ in 0..n {
        let start = Instant::now();
        let envelope = sender.encrypt(*device, TEXT).expect("encrypt");
        encrypt += start.elapsed();
        let start = Instant::now();
        receiver.decrypt(sender_device, &envelope).expect("decrypt");
        decrypt += start.elapsed();
    }
    per_op("encrypt, one message, one device", n, encrypt);
    per_op("decrypt, one message", n, decrypt);

    // A burst in one direction (one ratchet step, then only chain steps).
    let mut envelopes: Vec<Envelope> = Vec::new();
    let start = Instant::now();
    for _ in 0..n {
        envelopes.push(sender.encrypt(*device, TEXT).expect("encrypt"));
    }
    per_op("encrypt, burst in one direction", n, start.elapsed());
    let start = Instant::now();
    for envelope in &envelopes {
        receiver.decrypt(sender_device, envelope).expect("decrypt");
    }
    per_op("decrypt, burst in one direction", n, start.elapsed());

    // The first message to a device: verify the claimed key, open a session, encrypt; and on
    // the other side, open the inbound session from the pre-key message.
    let sessions = 300;
    let mut open = Duration::ZERO;
    let mut inbound = Duration::ZERO;
    for i in 0..sessions {
        let device = DeviceId([u8::try_from(i % 200).unwrap_or(0); 16]);
        let mut receiver = Crypto::new();
        let claimed = claim_from(&mut receiver, device);
        let mut fresh = Crypto::new();
        let start = Instant::now();
        fresh.open_session("+1", &claimed).expect("session");
        let first = fresh.encrypt(device, TEXT).expect("encrypt");
        open += start.elapsed();
        let start = Instant::now();
        receiver.decrypt(sender_device, &first).expect("decrypt");
        inbound += start.elapsed();
    }
    per_op(
        "first message: check key, open session, encrypt",
        sessions,
        open,
    );
    per_op(
        "first message: open inbound session, decrypt",
        sessions,
        inbound,
    );

    // Fan-out: one message to 6 devices (the most a number has), on established sessions.
    let (mut sender, receivers) = conversation(6);
    let rounds = 2_000;
    let start = Instant::now();
    for _ in 0..rounds {
        for (device, _) in &receivers {
            sender.encrypt(*device, TEXT).expect("encrypt");
        }
    }
    per_op(
        "fan-out: one message to 6 devices (Olm only)",
        rounds,
        start.elapsed(),
    );

    // What every send also does: serialise the whole state and seal it (the local write itself,
    // one SQLite transaction with an fsync, depends on the disk and is not counted here).
    let (vault, _) = Vault::create(&Passphrase::new("bench")).expect("vault");
    let saves = 500;
    let start = Instant::now();
    let mut size = 0;
    for _ in 0..saves {
        let bytes = sender.to_bytes().expect("bytes");
        size = bytes.len();
        let sealed = vault.seal("crypto-state", &bytes);
        std::hint::black_box(sealed);
    }
    per_op(
        &format!("save state with 6 sessions ({} KiB), sealed", size / 1024),
        saves,
        start.elapsed(),
    );
    let start = Instant::now();
    for _ in 0..saves {
        let bytes = sender.to_bytes().expect("bytes");
        let sealed = vault.seal("crypto-state", &bytes);
        let opened = vault.open("crypto-state", &sealed).expect("open");
        std::hint::black_box(Crypto::from_bytes(&opened).expect("restore"));
    }
    per_op(
        "save and load state with 6 sessions",
        saves,
        start.elapsed(),
    );

    // The passphrase KDF, paid once per command.
    let runs = 5;
    let start = Instant::now();
    for _ in 0..runs {
        std::hint::black_box(Vault::create(&Passphrase::new("bench")).expect("vault"));
    }
    per_op(
        "passphrase KDF (Argon2id, 19 MiB, 2 passes)",
        runs,
        start.elapsed(),
    );
}
