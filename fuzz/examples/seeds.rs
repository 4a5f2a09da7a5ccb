//! Writes the seed corpus, `fuzz/corpus/<target>/`, from the real encoders: frames of every
//! kind, envelopes and contents, HTTP bodies, numbers, ids, SMS-SUBMIT PDUs, SMPP commands,
//! modem answers and batches of blinded elements. Run from the repository: `cargo run
//! --manifest-path fuzz/Cargo.toml --example seeds`. The files are committed; running it again
//! gives the same files, but for the Olm messages, which come from fresh keys each time.

use std::path::Path;
use std::str::FromStr as _;

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use tidings_gateway::fuzzing::rusmpp::pdus::{BindTransceiverResp, DeliverSm, SubmitSmResp};
use tidings_gateway::fuzzing::rusmpp::tokio_codec::CommandCodec;
use tidings_gateway::fuzzing::rusmpp::types::{COctetString, OctetString};
use tidings_gateway::fuzzing::rusmpp::values::EsmClass;
use tidings_gateway::fuzzing::rusmpp::{Command, CommandStatus, Pdu};
use tidings_proto::codec;
use tidings_proto::frame::*;
use tidings_sms::{encode_submit, SubmitOptions};
use tokio_util::codec::Encoder as _;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new("fuzz/corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn frames() {
    let id = vec![7u8; 16];
    let account = vec![17u8; 32];
    let envelope = Envelope {
        olm_type: 1,
        ciphertext: vec![3; 40],
    }
    .encode_to_vec();
    let kinds = vec![
        Kind::Login(Login {
            device_id: id.clone(),
            signature: vec![1; 64],
            listen: true,
        }),
        Kind::Ping(Ping { nonce: 1 }),
        Kind::Send(Send {
            id: id.clone(),
            to: String::new(),
            mode: SendMode::Queue as i32,
            ttl_seconds: 3600,
            payload: Bytes::new(),
            copies: vec![Copy {
                device_id: id.clone(),
                payload: Bytes::from(envelope.clone()),
            }],
            receiver_contact_token: vec![14; 32],
            presence_proofs: vec![PresenceProof {
                account: vec![15; 32],
                device_id: id.clone(),
                mac: vec![16; 32],
            }],
            to_account: account.clone(),
            resend: true,
        }),
        Kind::Ack(Ack {
            sender_device: id.clone(),
            id: id.clone(),
            discard: true,
            no_receipt: false,
        }),
        Kind::PresenceSet(PresenceSet {
            request_id: 9,
            mode: PresenceMode::Contacts as i32,
            key: vec![17; 32],
        }),
        Kind::ReceiptAck(ReceiptAck { id: id.clone() }),
        Kind::Lookup(Lookup {
            request_id: 2,
            numbers: Vec::new(),
            accounts: vec![account.clone(), vec![18; 32]],
            proofs: vec![PresenceProof {
                account: Vec::new(),
                device_id: id.clone(),
                mac: vec![18; 32],
            }],
        }),
        Kind::Devices(DevicesRequest {
            request_id: 3,
            number: String::new(),
            account: account.clone(),
            sender_device: id.clone(),
        }),
        Kind::Evaluate(Evaluate {
            request_id: 10,
            blinded: vec![vec![0xe2; 32], vec![19; 32]],
            sender_device: id.clone(),
            key_version: 1,
        }),
        Kind::Disable(Disable { request_id: 4 }),
        Kind::KeysUpload(KeysUpload {
            request_id: 5,
            identity_key: vec![8; 32],
            signing_key: vec![9; 32],
            one_time_keys: vec![SignedKey {
                public_key: vec![10; 32],
                signature: vec![11; 64],
            }],
            fallback_key: Some(SignedKey {
                public_key: vec![12; 32],
                signature: vec![13; 64],
            }),
            contact_token_hash: vec![15; 32],
        }),
        Kind::KeysClaim(KeysClaim {
            request_id: 6,
            number: String::new(),
            device_ids: vec![id.clone()],
            account: account.clone(),
        }),
        Kind::LinkCodeRequest(LinkCodeRequest { request_id: 7 }),
        Kind::RemoveDevice(RemoveDevice {
            request_id: 8,
            device_id: id.clone(),
        }),
        Kind::Vouch(Vouch {
            request_id: 9,
            device_id: id.clone(),
            signature: vec![14; 64],
        }),
        Kind::Withdraw(Withdraw { id: id.clone() }),
        Kind::LoginResult(LoginResult {
            server_time_ms: 1_700_000_000_000,
            heartbeat_seconds: 30,
            one_time_keys: 50,
            keys_published: true,
            resume_token: vec![1; 73],
            oprf_key_version: 2,
        }),
        Kind::Pong(Pong { nonce: 1 }),
        Kind::SendResult(SendResult {
            id: id.clone(),
            outcome: SendOutcome::DevicesChanged as i32,
            detail: "devices changed".into(),
            missing_devices: vec![id.clone()],
            missing_own_devices: Vec::new(),
            extra_devices: vec![vec![1; 16]],
            skipped_own_devices: vec![vec![2; 16]],
            retry_after_ms: 1_500,
            ttl_seconds: 259_200,
            settled: true,
        }),
        Kind::Deliver(Deliver {
            sender_device: id.clone(),
            id: id.clone(),
            sent_at_ms: 1_700_000_000_000,
            payload: Bytes::from(envelope),
        }),
        Kind::AckResult(AckResult {
            sender_device: id.clone(),
            id: id.clone(),
            status: AckStatus::Withdrawn as i32,
        }),
        Kind::Receipt(Receipt {
            id: id.clone(),
            kind: ReceiptKind::Expired as i32,
        }),
        Kind::LookupResult(LookupResult {
            request_id: 2,
            entries: vec![LookupEntry {
                number: String::new(),
                presence: Presence::Online as i32,
                account: account.clone(),
            }],
        }),
        Kind::EvaluateResult(EvaluateResult {
            request_id: 10,
            evaluated: vec![vec![20; 32], vec![21; 32]],
            proof: vec![22; 64],
            key_version: 1,
        }),
        Kind::DeviceList(DeviceList {
            request_id: 3,
            device_ids: vec![id.clone()],
            devices: vec![DeviceKeys {
                device_id: id.clone(),
                identity_key: vec![8; 32],
                signing_key: vec![9; 32],
                voucher: vec![2; 16],
                voucher_signature: vec![15; 64],
            }],
        }),
        Kind::DisableResult(DisableResult { request_id: 4 }),
        Kind::SignedOut(SignedOut {
            reason: "removed".into(),
        }),
        Kind::Error(Error {
            code: ErrorCode::RateLimited as i32,
            message: "too many".into(),
            fatal: false,
            request_id: 6,
            retry_after_ms: 60_000,
        }),
        Kind::KeysUploadResult(KeysUploadResult {
            request_id: 5,
            one_time_keys: 51,
        }),
        Kind::KeysClaimResult(KeysClaimResult {
            request_id: 6,
            devices: vec![ClaimedKey {
                device_id: id.clone(),
                identity_key: vec![8; 32],
                signing_key: vec![9; 32],
                key: Some(SignedKey {
                    public_key: vec![10; 32],
                    signature: vec![11; 64],
                }),
                fallback: false,
                voucher: Vec::new(),
                voucher_signature: Vec::new(),
            }],
        }),
        Kind::LinkCode(LinkCode {
            request_id: 7,
            code: "ABCD-EFGH".into(),
            expires_in: 300,
        }),
        Kind::LinkCompleted(LinkCompleted {
            device_id: id.clone(),
            identity_key: vec![8; 32],
            signing_key: vec![9; 32],
            proof: vec![10; 32],
        }),
        Kind::RemoveDeviceResult(RemoveDeviceResult { request_id: 8 }),
        Kind::VouchResult(VouchResult { request_id: 9 }),
        Kind::WithdrawResult(WithdrawResult {
            id,
            state: WithdrawState::RateLimited as i32,
            retry_after_ms: 1_000,
        }),
    ];
    // The first byte is where the fuzz target cuts the stream into two reads.
    let mut session = vec![5u8];
    for (index, kind) in kinds.into_iter().enumerate() {
        let bytes = codec::encode_to_bytes(&Frame::from(kind));
        session.extend_from_slice(&bytes);
        let mut seed = vec![3u8];
        seed.extend_from_slice(&bytes);
        write("frame", &format!("kind-{index:02}"), &seed);
    }
    write("frame", "session", &session);
    write("frame", "too-large", &[0, 0xff, 0xff, 0xff, 0xff]);
}

fn payloads() {
    let content = Content {
        from: "+4915112345678".into(),
        text: "Hello, Bob! Grüße 👋".into(),
        sent_at_ms: 1_700_000_000_000,
        id: vec![7; 16],
        to: "+4915187654321".into(),
        sender_contact_token: vec![16; 32],
        sender_presence_token: vec![19; 32],
    };
    write("payload", "content", &content.encode_to_vec());
    // Real Olm messages: a pre-key message opening a session, then a normal one.
    let alice = vodozemac::olm::Account::new();
    let mut bob = vodozemac::olm::Account::new();
    bob.generate_one_time_keys(1);
    let (_, one_time) = bob
        .one_time_keys()
        .into_iter()
        .next()
        .expect("one key was made");
    let mut session = alice.create_outbound_session(
        vodozemac::olm::SessionConfig::version_1(),
        bob.curve25519_key(),
        one_time,
    );
    for (name, text) in [("pre-key", "first"), ("normal", "second")] {
        let (olm_type, ciphertext) = session.encrypt(text).to_parts();
        let olm_type = u32::try_from(olm_type).expect("0 or 1");
        write(
            "payload",
            name,
            &Envelope {
                olm_type,
                ciphertext,
            }
            .encode_to_vec(),
        );
    }
}

fn http_bodies() {
    let bodies: [(u8, &str, &str); 9] = [
        (0, "code", r#"{"number":"+4915112345678"}"#),
        (
            0,
            "code-stray",
            r#"{"number":"+4915112345678","imei":"356938035643809"}"#,
        ),
        (
            1,
            "verify",
            r#"{"number":"+4915112345678","code":"123456","device_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8","signature":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw"}"#,
        ),
        (
            2,
            "link",
            r#"{"number":"+4915112345678","code":"ABCD-EFGH","device_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8","identity_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8","signing_key":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8","signature":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0-Pw"}"#,
        ),
        (
            3,
            "error",
            r#"{"error":"rate_limited","message":"Too many codes: try again later","retry_after":120,"attempts_left":3}"#,
        ),
        (4, "code-sent", r#"{"expires_in":600}"#),
        (
            5,
            "verified",
            r#"{"device_id":"AAECAwQFBgcICQoLDA0ODw","replaced_devices":1}"#,
        ),
        (6, "linked", r#"{"device_id":"AAECAwQFBgcICQoLDA0ODw"}"#),
        (7, "health", r#"{"status":"ok","version":"0.1.0"}"#),
    ];
    for (kind, name, body) in bodies {
        let mut seed = vec![kind];
        seed.extend_from_slice(body.as_bytes());
        write("http_body", name, &seed);
    }
}

fn numbers_and_ids() {
    for (name, text) in [
        ("de", "+49 151 12345678"),
        ("us", "+1 (201) 555-0123"),
        ("uk", "  +442079460958 "),
        ("invalid", "+1 555 0100"),
        ("words", "hello"),
    ] {
        write("number", name, text.as_bytes());
    }
    for (name, text) in [
        ("device-id", "AAECAwQFBgcICQoLDA0ODw"),
        ("challenge", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"),
        ("padded", "AAECAw=="),
    ] {
        write("id_text", name, text.as_bytes());
    }
}

fn sms_pdus() {
    let options = SubmitOptions::default();
    for (name, text) in [
        ("gsm7", "Your Tidings code is 123456"),
        ("gsm7-extension", "Price: 5€ [sale] {today} ~ ^ | \\"),
        ("ucs2", "Grüße aus Köln — 你好 👋"),
        ("long", &"Tidings fallback message. ".repeat(12)),
    ] {
        let pdus = encode_submit("+4915112345678", text, &options).expect("encodes");
        for (index, pdu) in pdus.iter().enumerate() {
            write("sms_pdu", &format!("{name}-{index}"), &pdu.bytes);
            if index == 0 {
                write("sms_pdu", &format!("{name}-hex"), pdu.hex.as_bytes());
            }
        }
        write("sms_pdu", &format!("{name}-text"), text.as_bytes());
    }
}

fn smpp() {
    let mut codec = CommandCodec::new();
    let mut stream = BytesMut::new();
    let receipt = DeliverSm::builder()
        .esm_class(EsmClass::from(0x04))
        .short_message(
            OctetString::from_vec(
                b"id:4f2a sub:001 dlvrd:001 submit date:2401011200 done date:2401011201 stat:DELIVRD err:000 text:"
                    .to_vec(),
            )
            .expect("fits"),
        )
        .build();
    let commands = [
        Command::new(
            CommandStatus::EsmeRok,
            1,
            Pdu::BindTransceiverResp(
                BindTransceiverResp::builder()
                    .system_id(COctetString::from_str("smsc").expect("fits"))
                    .build(),
            ),
        ),
        Command::new(
            CommandStatus::EsmeRok,
            2,
            Pdu::SubmitSmResp(
                SubmitSmResp::builder()
                    .message_id(COctetString::from_str("4f2a").expect("fits"))
                    .build(),
            ),
        ),
        Command::new(CommandStatus::EsmeRok, 3, Pdu::DeliverSm(receipt)),
        Command::new(CommandStatus::EsmeRok, 4, Pdu::EnquireLink),
        Command::new(CommandStatus::EsmeRthrottled, 5, Pdu::GenericNack),
        Command::new(CommandStatus::EsmeRok, 6, Pdu::Unbind),
    ];
    for (index, command) in commands.iter().enumerate() {
        let mut one = BytesMut::new();
        codec.encode(command, &mut one).expect("encodes");
        write("smpp", &format!("command-{index}"), &one);
        stream.extend_from_slice(&one);
    }
    write("smpp", "session", &stream);
}

fn modem() {
    for (name, first, text) in [
        ("ok", 0u8, "\r\nOK\r\n"),
        ("cmgs", 8, "\r\n+CMGS: 12\r\n\r\nOK\r\n"),
        ("cms-error", 20, "\r\n+CMS ERROR: 330\r\n"),
        ("cme-error", 4, "\r\n+CME ERROR: 10\r\n"),
        ("error", 2, "ERROR\r\n"),
        ("prompt", 1, "\r\n> "),
        ("echo", 6, "AT+CMGF=0\r\r\nOK\r\n"),
    ] {
        let mut seed = vec![first];
        seed.extend_from_slice(text.as_bytes());
        write("modem", name, &seed);
    }
}

/// Batches of blinded elements in the `oprf` target's form: each a length byte, then its bytes.
fn oprf() {
    use rand::SeedableRng as _;
    use voprf::{Ristretto255, VoprfClient};
    let batch = |elements: &[&[u8]]| -> Vec<u8> {
        elements
            .iter()
            .flat_map(|e| {
                let length = u8::try_from(e.len()).expect("short");
                std::iter::once(length).chain(e.iter().copied())
            })
            .collect()
    };
    // Blinded as a client blinds, with a fixed seed so that the files stay the same.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let valid: Vec<Vec<u8>> = ["+14155550101", "+4915112345678", "+33612345678"]
        .iter()
        .map(|number| {
            VoprfClient::<Ristretto255>::blind(number.as_bytes(), &mut rng)
                .expect("blinds")
                .message
                .serialize()
                .to_vec()
        })
        .collect();
    let identity = [0u8; 32];
    // 2^255 - 19 + 2: the field element 2, encoded past the modulus.
    let mut non_canonical = [0xffu8; 32];
    non_canonical[0] = 0xef;
    non_canonical[31] = 0x7f;
    let mut high_bit = valid[0].clone();
    high_bit[31] |= 0x80;
    let mut negative = valid[1].clone();
    negative[0] |= 1;
    let refs: Vec<&[u8]> = valid.iter().map(Vec::as_slice).collect();
    write("oprf", "one", &batch(&refs[..1]));
    write("oprf", "three", &batch(&refs));
    write("oprf", "identity", &batch(&[refs[0], &identity]));
    write(
        "oprf",
        "non-canonical",
        &batch(&[refs[0], refs[1], &non_canonical]),
    );
    write("oprf", "high-bit", &batch(&[&high_bit]));
    write("oprf", "negative", &batch(&[refs[2], &negative]));
    write("oprf", "short", &batch(&[refs[0], &valid[1][..31]]));
    write(
        "oprf",
        "long",
        &batch(&[&[valid[2].as_slice(), &[0]].concat()]),
    );
    write("oprf", "empty-element", &batch(&[refs[1], &[]]));
    write("oprf", "cut", &[32, 1, 2, 3]);
}

fn main() {
    frames();
    payloads();
    http_bodies();
    numbers_and_ids();
    sms_pdus();
    smpp();
    modem();
    oprf();
}
