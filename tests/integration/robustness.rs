//! Bad input: malformed and oversized frames, unknown frames, replayed acknowledgements, spoofed
//! senders, bodies that are not JSON, connections that never speak. Each gets a clear error or a
//! clean close, and the server keeps serving everyone else.

use std::time::Duration;

use tidings_proto::frame::{self, AckStatus, ErrorCode, Frame, Kind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{block_on, eventually, number, Server, User};

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
        .write_all(b"GET /v1/connect HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: tidings/1\r\n\r\n")
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
    assert_eq!(bob.receive(1, 10).len(), 1);
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
    let deadline = Instant::now() + Duration::from_secs(10);
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
        };
        bob_session.send(Kind::Ack(bogus)).await.expect("ack");
        let mut statuses = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while statuses.is_empty() {
            if let Some(Kind::AckResult(r)) = bob_session.recv(deadline).await.expect("recv") {
                statuses.push(r.status);
            }
        }
        assert_eq!(statuses, vec![AckStatus::Unknown as i32]);
    });
    // The spoofed message is shown flagged, not as a normal message from Carol.
    let shown = bob.receive(1, 10);
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0]["from"], carol_number.as_str());
    assert_eq!(shown[0]["sender_verified"], false);
    let out = {
        let (answer, _) = alice.send(&bob_number, "spoof two", &[]);
        assert_eq!(answer["outcome"], "queued");
        bob.ok(&["listen", "--count", "1", "--timeout", "10"])
    };
    assert!(
        !out.contains("WARNING"),
        "a genuine message was flagged: {out}"
    );
    // Replaying the acknowledgement of a delivered message changes nothing.
    block_on(async {
        let mut bob_session = bob_client.session(false).await.expect("bob");
        let real = frame::Ack {
            sender_device: alice_client.device().as_bytes().to_vec(),
            id: vec![9; 16],
        };
        bob_session.send(Kind::Ack(real)).await.expect("ack");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(Kind::AckResult(r)) = bob_session.recv(deadline).await.expect("recv") {
                assert_eq!(r.status, AckStatus::Unknown as i32);
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
    let out = bob.ok(&["listen", "--count", "1", "--timeout", "10"]);
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
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
                        .await;
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
        let closed = tokio::time::timeout(Duration::from_secs(20), silent.read_to_end(&mut sink))
            .await
            .is_ok();
        assert!(closed, "a connection that never sent a request stayed open");
        let closed = tokio::time::timeout(Duration::from_secs(20), upgraded.read_to_end(&mut sink))
            .await
            .is_ok();
        assert!(closed, "a session that never logged in stayed open");
        assert!(started.elapsed() < Duration::from_secs(20));
    });
}

/// Issue 28, item 1: a device that stops reading its socket until its session's queue is full,
/// then is removed by another device of its account, must not act on the account afterwards (the
/// `SignedOut` that did not fit in the queue used to be dropped, and the session kept serving).
#[test]
fn a_removed_device_whose_queue_is_full_serves_no_further_request() {
    // More sends than the default burst and than one sender's default share of a queue, and a
    // heartbeat long enough that the stalled session is not closed for silence while its queue
    // fills.
    let server = Server::start(&[
        "--send-burst",
        "5000",
        "--send-per-second",
        "5000",
        "--queue-copies-per-sender",
        "5000",
        "--queue-bytes-per-sender",
        "1000000000",
        "--queued-bytes-per-account",
        "1000000000",
        "--stranger-pool-copies",
        "10000",
        "--heartbeat-seconds",
        "300",
    ]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let other = alice.link_device(&server);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, other_client, bob_client) = (alice.client(), other.client(), bob.client());
    let stalled_device = alice_client.device();
    let copies_for = [stalled_device, other_client.device()];
    // Enough 16 KiB deliveries to fill the socket's buffers and then the session's queue of
    // 1,024 frames behind them.
    const SENDS: usize = 1_500;
    const BATCH: usize = 100;
    let disable_served = block_on(async {
        let mut stalled = alice_client.session(true).await.expect("alice");
        let mut bob_session = bob_client.session(false).await.expect("bob");
        let payload = bytes::Bytes::from(vec![7u8; 16 * 1024]);
        for batch in 0..SENDS / BATCH {
            let sends = (0..BATCH).map(|n| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&((batch * BATCH + n) as u64).to_be_bytes());
                Kind::Send(frame::Send {
                    id: id.to_vec(),
                    to: alice_number.clone(),
                    mode: frame::SendMode::Queue as i32,
                    copies: copies_for
                        .iter()
                        .map(|device| frame::Copy {
                            device_id: device.as_bytes().to_vec(),
                            payload: payload.clone(),
                        })
                        .collect(),
                    ..frame::Send::default()
                })
            });
            bob_session.send_many(sends).await.expect("send");
            await_sends_stored(&mut bob_session, BATCH as u64).await;
        }
        // The other device removes the stalled one, whose queue has no room for `SignedOut`.
        let removed = tokio::task::spawn_blocking(move || {
            other.ok(&["devices", "--remove", &stalled_device.to_text()])
        })
        .await
        .expect("remove");
        assert!(removed.contains("Removed"), "{removed}");
        // The removed device asks to delete the account, then reads everything it is sent.
        stalled
            .send(Kind::Disable(frame::Disable { request_id: 77 }))
            .await
            .expect("disable");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match stalled.recv(deadline).await {
                Ok(Some(Kind::DisableResult(_))) => return true,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return false,
            }
        }
    });
    assert!(
        !disable_served,
        "a removed device deleted its former account"
    );
    // The account is still there for everyone else.
    let found = bob.lookup(&[&alice_number]);
    assert_ne!(found[0].1, "not_a_user", "{found:?}");
}

/// Issue 28, item 1: a session whose client stops reading its socket is closed once a write has
/// waited for as long as a client may stay silent (three heartbeat intervals), instead of holding
/// its connection, and its device online, for ever.
#[test]
fn a_session_that_stops_reading_is_closed_when_a_write_waits_too_long() {
    let server = Server::start(&[
        "--send-burst",
        "5000",
        "--send-per-second",
        "5000",
        "--queue-bytes-per-sender",
        "100000000",
        "--stranger-pool-copies",
        "10000",
        "--heartbeat-seconds",
        "2",
    ]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, bob_client) = (alice.client(), bob.client());
    // Enough 60 KiB deliveries to fill the socket's buffers, so that a write waits.
    let stalled = block_on(stall_with_deliveries(
        &alice_client,
        &alice_number,
        &bob_client,
        400,
    ));
    let offline = eventually(Duration::from_secs(30), || {
        bob.lookup(&[&alice_number])[0].1 == "offline"
    });
    drop(stalled);
    assert!(
        offline,
        "a session that stopped reading kept its device online"
    );
}

/// Opens a listening session of `receiver` (whose number is `receiver_number`) that never reads,
/// and sends it `sends` deliveries of 60 KiB from `sender`, each answered `QUEUED` or
/// `ACCEPTED`. The stalled session is returned, to be kept open while the test looks.
pub async fn stall_with_deliveries(
    receiver: &tidings_client::client::Client,
    receiver_number: &str,
    sender: &tidings_client::client::Client,
    sends: u64,
) -> tidings_client::session::Session {
    let stalled = receiver.session(true).await.expect("receiver");
    let mut sender_session = sender.session(false).await.expect("sender");
    let payload = bytes::Bytes::from(vec![7u8; 60 * 1024]);
    for n in 0..sends {
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&n.to_be_bytes());
        let send = Kind::Send(frame::Send {
            id: id.to_vec(),
            to: receiver_number.to_string(),
            mode: frame::SendMode::Queue as i32,
            copies: vec![frame::Copy {
                device_id: receiver.device().as_bytes().to_vec(),
                payload: payload.clone(),
            }],
            ..frame::Send::default()
        });
        sender_session.send(send).await.expect("send");
    }
    await_sends_stored(&mut sender_session, sends).await;
    stalled
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
