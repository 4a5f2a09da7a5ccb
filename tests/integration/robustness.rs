//! Bad input: malformed and oversized frames, unknown frames, replayed acknowledgements, spoofed
//! senders, bodies that are not JSON, connections that never speak. Each gets a clear error or a
//! clean close, and the server keeps serving everyone else.

use std::time::Duration;

use tidings_proto::frame::{self, AckStatus, ErrorCode, Frame, Kind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{block_on, eventually, number, patience, Server, User, PATIENCE};

/// Opens a raw upgraded connection, without logging in.
pub async fn raw_session(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    upgrade(stream).await
}

/// Asks to upgrade `stream` to a session and reads the `101` answer.
pub async fn upgrade(mut stream: TcpStream) -> TcpStream {
    stream
        .write_all(b"GET /v1/connect HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: tidings/3\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.expect("101 response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Writes `bytes`, then reads what the server answers until it closes (or 5 s pass).
pub async fn answer_to(port: u16, bytes: &[u8]) -> (Vec<Frame>, bool) {
    let mut stream = raw_session(port).await;
    stream.write_all(bytes).await.expect("write");
    let mut received = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .is_ok();
    let mut buf = bytes::BytesMut::from(&received[..]);
    let mut frames = Vec::new();
    while let Ok(Some(frame)) = tidings_proto::codec::decode(&mut buf) {
        frames.push(frame);
    }
    (frames, closed)
}

fn is_fatal_protocol_error(frames: &[Frame]) -> bool {
    frames.iter().any(|f| {
        matches!(&f.kind, Some(Kind::Error(e)) if e.fatal && (e.code == ErrorCode::Protocol as i32 || e.code == ErrorCode::AuthFailed as i32))
    })
}

#[test]
fn malformed_oversized_and_unknown_frames_close_cleanly() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let mut unknown_only = vec![0, 0, 0, 3];
    unknown_only.extend_from_slice(&[0x98, 0x06, 0x01]);
    let ping_first =
        tidings_proto::codec::encode_to_bytes(&Kind::Ping(frame::Ping { nonce: 1 }).into());
    let bad_login = tidings_proto::codec::encode_to_bytes(
        &Kind::Login(frame::Login {
            device_id: vec![1; 16],
            signature: vec![2; 64],
            listen: true,
        })
        .into(),
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", b"\x00\x00\x00\x05hello".to_vec()),
        ("oversized length", vec![0x7f, 0xff, 0xff, 0xff]),
        ("zero length", vec![0, 0, 0, 0]),
        ("unknown frame type", unknown_only),
        ("not a login first", ping_first.to_vec()),
        ("login with a bad signature", bad_login.to_vec()),
    ];
    block_on(async {
        for (name, bytes) in cases {
            let (frames, closed) = answer_to(server.port, &bytes).await;
            assert!(closed, "{name}: the connection stayed open");
            assert!(
                is_fatal_protocol_error(&frames),
                "{name}: no fatal error frame in {frames:?}"
            );
        }
    });
    // Everyone else is still served.
    let (answer, _) = alice.send(&bob_number, "still here", &[]);
    assert_eq!(answer["outcome"], "queued");
    assert_eq!(bob.receive(1, PATIENCE).len(), 1);
}

/// Sends, as `sender`, a message whose encrypted content claims to come from `claimed`.
async fn send_claiming(
    sender: &tidings_client::client::Client,
    to: &str,
    claimed: &str,
    text: &str,
    id: u8,
) {
    let send = sender
        .danger_prepare_send_claiming(claimed, to, text, tidings_proto::id::MessageId([id; 16]))
        .await
        .expect("encrypt");
    let mut session = sender.session(false).await.expect("session");
    session.send(Kind::Send(send)).await.expect("send");
    let deadline = Instant::now() + patience();
    while !matches!(
        session.recv(deadline).await.expect("recv"),
        Some(Kind::SendResult(_))
    ) {}
}

#[test]
fn replayed_acks_and_a_spoofed_sender() {
    let server = Server::start(&[]);
    let (alice_number, bob_number, carol_number) = (number(), number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    User::register(&carol_number, &server, &[]);
    let alice_client = alice.client();
    let bob_client = bob.client();
    block_on(async {
        // Alice claims to be Carol inside the payload; the server stamps Alice's device.
        send_claiming(
            &alice_client,
            &bob_number,
            &carol_number,
            "it is me, carol",
            9,
        )
        .await;

        // Bob acknowledges a message that does not exist.
        let mut bob_session = bob_client.session(false).await.expect("bob");
        let bogus = frame::Ack {
            sender_device: vec![0; 16],
            id: vec![0; 16],
            ..Default::default()
        };
        bob_session.send(Kind::Ack(bogus)).await.expect("ack");
        let mut statuses = Vec::new();
        let deadline = Instant::now() + patience();
        while statuses.is_empty() {
            if let Some(Kind::AckResult(r)) = bob_session.recv(deadline).await.expect("recv") {
                statuses.push(r.status);
            }
        }
        assert_eq!(statuses, vec![AckStatus::Unknown as i32]);
    });
    // The spoofed message is shown flagged, not as a normal message from Carol.
    let shown = bob.receive(1, PATIENCE);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["from"], carol_number.as_str());
    assert_eq!(shown[0]["sender_verified"], false);
    let out = {
        let (answer, _) = alice.send(&bob_number, "spoof two", &[]);
        assert_eq!(answer["outcome"], "queued");
        bob.ok(&["listen", "--count", "1", "--timeout", &PATIENCE.to_string()])
    };
    assert!(out.contains("spoof two"), "{out}");
    assert!(
        !out.contains("WARNING"),
        "a genuine message was flagged: {out}"
    );
    // Replaying the acknowledgement of a delivered message changes nothing: it is answered from
    // the message's `DELIVERED` record (the device may have missed the first answer).
    block_on(async {
        let mut bob_session = bob_client.session(false).await.expect("bob");
        let real = frame::Ack {
            sender_device: alice_client.device().as_bytes().to_vec(),
            id: vec![9; 16],
            ..Default::default()
        };
        bob_session.send(Kind::Ack(real)).await.expect("ack");
        let deadline = Instant::now() + patience();
        loop {
            if let Some(Kind::AckResult(r)) = bob_session.recv(deadline).await.expect("recv") {
                assert_eq!(r.status, AckStatus::Confirmed as i32);
                break;
            }
        }
    });
}

#[test]
fn spoofed_sender_is_printed_as_a_warning() {
    let server = Server::start(&[]);
    let (alice_number, bob_number, carol_number) = (number(), number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    User::register(&carol_number, &server, &[]);
    let client = alice.client();
    block_on(send_claiming(
        &client,
        &bob_number,
        &carol_number,
        "pay this invoice",
        3,
    ));
    let out = bob.ok(&["listen", "--count", "1", "--timeout", &PATIENCE.to_string()]);
    assert!(out.starts_with("WARNING"), "{out}");
}

#[test]
fn bodies_that_are_not_json_or_too_large() {
    let server = Server::start(&[]);
    block_on(async {
        let check = |body: String, status: &'static str| {
            let port = server.port;
            async move {
                let mut stream = TcpStream::connect(("127.0.0.1", port))
                    .await
                    .expect("connect");
                let request = format!(
                    "POST /v1/registration/code HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                stream.write_all(request.as_bytes()).await.expect("write");
                let mut response = Vec::new();
                // `Connection: close`: the answer ends when the server closes.
                let _ = tokio::time::timeout(patience(), stream.read_to_end(&mut response)).await;
                let response = String::from_utf8_lossy(&response).into_owned();
                assert!(
                    response.starts_with(&format!("HTTP/1.1 {status}")),
                    "{body:.40}: {response:.200}"
                );
            }
        };
        check("{not json".into(), "400").await;
        check(format!(r#"{{"number": "{}"}}"#, "9".repeat(100_000)), "413").await;
        check(r#"{"number": 5}"#.into(), "422").await;
    });
}

#[test]
fn connections_that_never_speak_are_closed_and_do_not_block_others() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    block_on(async {
        // Silent before the HTTP request, and silent after the upgrade (no login).
        let mut silent = TcpStream::connect(("127.0.0.1", server.port))
            .await
            .expect("connect");
        let mut upgraded = raw_session(server.port).await;
        let started = Instant::now();
        let (answer, _) =
            tokio::task::spawn_blocking(move || alice.send(&bob_number, "not blocked", &[]))
                .await
                .expect("send");
        assert_eq!(answer["outcome"], "queued");
        let mut sink = Vec::new();
        // The server closes them after 10 s of silence; the bound only has to tell that from
        // never, with room for a loaded machine.
        let closed = tokio::time::timeout(patience(), silent.read_to_end(&mut sink))
            .await
            .is_ok();
        assert!(closed, "a connection that never sent a request stayed open");
        let closed = tokio::time::timeout(patience(), upgraded.read_to_end(&mut sink))
            .await
            .is_ok();
        assert!(closed, "a session that never logged in stayed open");
        assert!(started.elapsed() < patience());
    });
}

/// Issue 28, item 1: a device that stops reading its socket until its session's queue is full,
/// then is removed by another device of its account, must not act on the account afterwards (the
/// `SignedOut` that did not fit in the queue used to be dropped, and the session kept serving).
/// The deliveries are small, so that the queue fills its 1,024 frames and stays open under its
/// byte bound: the revocation, not the byte bound, must stop the removed device.
#[test]
fn a_removed_device_whose_queue_is_full_serves_no_further_request() {
    // More sends than the default burst and than one sender's default share of a queue, and a
    // heartbeat long enough that the stalled session is neither closed for silence nor for a
    // write that waits while its queue fills.
    let server = Server::start(&stalling_server("300"));
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let other = alice.link_device(&server);
    // Shows herself online to everyone (the default is only the people she wrote to).
    alice.ok(&["settings", "--presence", "everyone"]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, other_client, bob_client) = (alice.client(), other.client(), bob.client());
    let stalled_device = alice_client.device();
    assert_small_deliveries_fill_the_queue_under_its_byte_bound();
    let (disable_served, bob) = block_on(async {
        let mut stalled = stall_with_deliveries(
            &alice_client,
            &alice_number,
            &[other_client.device()],
            &bob_client,
            SMALL_DELIVERIES,
            SMALL_PAYLOAD,
        )
        .await;
        // The stalled session is still open (its queue is full but under its byte bound); the
        // other device then removes it, and its queue has no room for `SignedOut`.
        let looked_up = alice_number.clone();
        let (removed, presence, bob) = tokio::task::spawn_blocking(move || {
            let presence = bob.lookup(&[&looked_up])[0].1.clone();
            let removed = other.ok(&["devices", "--remove", &stalled_device.to_text()]);
            (removed, presence, bob)
        })
        .await
        .expect("remove");
        assert_eq!(presence, "online", "the stalled session was closed");
        assert!(removed.contains("Removed"), "{removed}");
        // The removed device asks to delete the account, then reads everything it is sent: no
        // answer to that request may come, not even the store's refusal.
        stalled
            .send(Kind::Disable(frame::Disable { request_id: 77 }))
            .await
            .expect("disable");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            match stalled.recv(deadline).await {
                Ok(Some(Kind::DisableResult(_))) => return (true, bob),
                // Refused by the store's own check of the acting device: served all the same.
                Ok(Some(Kind::Error(error))) if error.request_id == 77 => return (true, bob),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return (false, bob),
            }
        }
    });
    assert!(
        !disable_served,
        "a removed device's session served a request after the removal"
    );
    // The account is still there for everyone else.
    let found = bob.lookup(&[&alice_number]);
    assert_ne!(found[0].1, "not_a_user", "{found:?}");
}

/// Issue 28, item 1: a session whose client stops reading its socket is closed once a write has
/// waited for as long as a client may stay silent (three heartbeat intervals), instead of holding
/// its connection, and its device online, for ever. The deliveries are small, so that the queue
/// stays under its byte bound (which would close the session on its own) while the write waits.
#[test]
fn a_session_that_stops_reading_is_closed_when_a_write_waits_too_long() {
    let server = Server::start(&stalling_server("2"));
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, bob_client) = (alice.client(), bob.client());
    assert_small_deliveries_fill_the_queue_under_its_byte_bound();
    let stalled = block_on(stall_with_deliveries(
        &alice_client,
        &alice_number,
        &[],
        &bob_client,
        SMALL_DELIVERIES,
        SMALL_PAYLOAD,
    ));
    let offline = eventually(Duration::from_secs(60), || {
        bob.lookup(&[&alice_number])[0].1 == "offline"
    });
    drop(stalled);
    assert!(
        offline,
        "a session that stopped reading kept its device online"
    );
}

/// The payload of a small delivery: a full session queue of such deliveries stays under the
/// queue's byte bound (checked by [`stall_with_deliveries`]), so a stalled session keeps its
/// full queue open instead of being closed at the bound.
pub const SMALL_PAYLOAD: usize = 900;
/// Small deliveries enough to fill the socket's buffers on both ends (at most 4 MiB on the
/// server's side and 128 KiB on the client's that does not read, with this machine's defaults)
/// and then the session's queue of 1,024 frames behind them, under the 10,000 copies a device
/// may hold.
pub const SMALL_DELIVERIES: u64 = 8_000;

/// Opens a listening session of `receiver` (whose number is `receiver_number`) that never reads,
/// and sends it `sends` deliveries of `payload_len` bytes from `sender` (with a copy for each of
/// `also_to`, the receiver's other devices), each answered `QUEUED` or `ACCEPTED`. The stalled
/// session is returned, to be kept open while the test looks.
pub async fn stall_with_deliveries(
    receiver: &tidings_client::client::Client,
    receiver_number: &str,
    also_to: &[tidings_proto::id::DeviceId],
    sender: &tidings_client::client::Client,
    sends: u64,
    payload_len: usize,
) -> tidings_client::session::Session {
    const BATCH: u64 = 100;
    let stalled = receiver.session(true).await.expect("receiver");
    let mut sender_session = sender.session(false).await.expect("sender");
    let receiver_account =
        crate::support::account_of(sender, &mut sender_session, receiver_number).await;
    let payload = bytes::Bytes::from(vec![7u8; payload_len]);
    let devices: Vec<_> = std::iter::once(receiver.device())
        .chain(also_to.iter().copied())
        .collect();
    let send = |n: u64| {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        Kind::Send(frame::Send {
            id: id.to_vec(),
            to_account: receiver_account.clone(),
            mode: frame::SendMode::Queue as i32,
            copies: devices
                .iter()
                .map(|device| frame::Copy {
                    device_id: device.as_bytes().to_vec(),
                    payload: payload.clone(),
                })
                .collect(),
            ..frame::Send::default()
        })
    };
    for first in (0..sends).step_by(BATCH as usize) {
        let last = (first + BATCH).min(sends);
        sender_session
            .send_many((first..last).map(send))
            .await
            .expect("send");
        await_sends_stored(&mut sender_session, last - first).await;
    }
    stalled
}

/// Checks that a full session queue of deliveries of [`SMALL_PAYLOAD`] bytes stays under the
/// queue's byte bound, so that a test using them reaches the queue's frame bound, not its byte
/// bound.
fn assert_small_deliveries_fill_the_queue_under_its_byte_bound() {
    let delivery = Frame::from(Kind::Deliver(frame::Deliver {
        sender_device: vec![0xff; 16],
        id: vec![0xff; 16],
        sent_at_ms: u64::MAX,
        payload: bytes::Bytes::from(vec![7u8; SMALL_PAYLOAD]),
    }));
    let wire_len = 4 + prost::Message::encoded_len(&delivery);
    assert!(
        wire_len * tidings_server::SESSION_QUEUE <= tidings_server::SESSION_QUEUE_BYTES,
        "{wire_len} bytes a delivery"
    );
}

/// Waits for `count` answers to sends on `session`, each `QUEUED` or `ACCEPTED`.
async fn await_sends_stored(session: &mut tidings_client::session::Session, count: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut answered = 0;
    while answered < count {
        match session.recv(deadline).await.expect("recv") {
            Some(Kind::SendResult(result)) => {
                assert!(
                    result.outcome == frame::SendOutcome::Queued as i32
                        || result.outcome == frame::SendOutcome::Accepted as i32,
                    "{}",
                    result.detail
                );
                answered += 1;
            }
            Some(_) => {}
            None => panic!("a send was not answered"),
        }
    }
}

/// The settings of a server that one sender floods with 8,000 deliveries: the send rate, the
/// sender's share of a queue and the stranger pool lifted, with `heartbeat` seconds between
/// heartbeats.
fn stalling_server(heartbeat: &str) -> Vec<&str> {
    vec![
        "--send-burst",
        "20000",
        "--send-per-second",
        "20000",
        "--queue-copies-per-sender",
        "10000",
        "--queue-bytes-per-sender",
        "1000000000",
        "--queued-bytes-per-account",
        "1000000000",
        "--stranger-pool-copies",
        "10000",
        "--heartbeat-seconds",
        heartbeat,
    ]
}
