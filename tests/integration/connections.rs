//! Connections and sessions that a client cannot hold (issue 28, item 8): request bodies that
//! never finish, connections that never log in, one device's many sessions, a session that
//! stops reading, and a `Login` frame as large as any frame.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tidings_proto::frame::{self, ErrorCode, Kind};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use crate::robustness::{answer_to, stall_with_deliveries, upgrade};
use crate::support::{block_on, eventually, number, Server, User};

/// A second loopback address: a client there is in another address block than the tests' own
/// clients on 127.0.0.1.
const OTHER_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// Connects to the server from `from`.
async fn connect_from(from: Ipv4Addr, port: u16) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(IpAddr::V4(from), 0))
        .expect("bind the source address");
    socket
        .connect(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("connect")
}

/// Writes a keep-alive `GET /v1/health` on `stream` and reads the answer's head and body; an
/// empty answer when the server closed the connection instead.
async fn health_on(stream: &mut TcpStream) -> String {
    let request = b"GET /v1/health HTTP/1.1\r\nHost: t\r\n\r\n";
    if stream.write_all(request).await.is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let deadline = Instant::now() + Duration::from_secs(30);
    // The health answer is small: its head and JSON body arrive together; stop at the body's end.
    while !answer.ends_with(b"}") {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// `GET /v1/health` on a new connection from `from`.
async fn health_from(from: Ipv4Addr, port: u16) -> String {
    let mut stream = connect_from(from, port).await;
    health_on(&mut stream).await
}

/// Sends the headers of a request whose body never finishes (a `Content-Length` of 100 and one
/// byte sent).
async fn unfinished_body(port: u16) -> TcpStream {
    let mut slow = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    slow.write_all(
        b"POST /v1/registration/code HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .expect("write");
    slow
}

/// What the server answers on `slow` before it closes it; far longer than any body timeout of
/// these tests passes first, since a connection still open then is held for good.
async fn answer_before_close(mut slow: TcpStream) -> String {
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(90), slow.read_to_end(&mut answer))
        .await
        .is_ok();
    assert!(
        closed,
        "a request whose body never finished kept its connection"
    );
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request whose body never finishes is answered 408 and closed once the body timeout passes,
/// instead of holding its connection for ever; the server answers others meanwhile.
#[test]
fn a_request_body_that_never_finishes_is_answered_408_and_closed() {
    let server = Server::start(&[]);
    block_on(async {
        let slow = unfinished_body(server.port).await;
        let health = health_from(Ipv4Addr::LOCALHOST, server.port).await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");
        let answer = answer_before_close(slow).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer:.300}");
    });
}

/// The body timeout is the operator's setting (`body_timeout_seconds`): a body unfinished after
/// it is answered 408, saying how long it had.
#[test]
fn the_body_timeout_is_a_setting() {
    let server = Server::start(&["--body-timeout-seconds", "2"]);
    block_on(async {
        let answer = answer_before_close(unfinished_body(server.port).await).await;
        assert!(
            answer.starts_with("HTTP/1.1 408") && answer.contains("within 2 seconds"),
            "{answer:.400}"
        );
    });
}

/// The connections not yet logged in that one address may hold: the default of
/// `pre_login_connections_per_address`.
const PRE_LOGIN_PER_ADDRESS: usize = 64;

/// An address holding as many connections that have not logged in as it may (plain HTTP ones
/// and upgraded ones that never send `Login`) has its next connection closed at once, unanswered;
/// other addresses, and the logged-in, are served meanwhile; once it lets some go it is served
/// again.
#[test]
fn connections_not_logged_in_are_capped_per_address_and_others_are_still_served() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    block_on(async {
        let port = server.port;
        // Every connection not logged in is closed after 10 s of silence, so the held ones must
        // all be open when the next one comes: an attempt that took longer is made again.
        let mut refused_at_once = false;
        for _attempt in 0..3 {
            let started = Instant::now();
            let mut held = Vec::new();
            for n in 0..PRE_LOGIN_PER_ADDRESS {
                if n % 2 == 0 {
                    let mut stream = connect_from(OTHER_ADDRESS, port).await;
                    let answer = health_on(&mut stream).await;
                    assert!(answer.starts_with("HTTP/1.1 200"), "{n}: {answer}");
                    held.push(stream);
                } else {
                    held.push(upgrade(connect_from(OTHER_ADDRESS, port).await).await);
                }
            }
            let over = health_from(OTHER_ADDRESS, port).await;
            let in_time = started.elapsed() < Duration::from_secs(8);
            if over.is_empty() {
                refused_at_once = true;
                // Others are served while the address holds its connections.
                let health = health_from(Ipv4Addr::LOCALHOST, port).await;
                assert!(health.starts_with("HTTP/1.1 200"), "{health}");
                break;
            }
            assert!(
                !in_time,
                "a connection over the cap was served: {over:.200}"
            );
        }
        assert!(refused_at_once, "a connection over the cap was served");
        // The held connections are gone (dropped above); the address is served again.
        let mut served = false;
        for _ in 0..100 {
            if health_from(OTHER_ADDRESS, port)
                .await
                .starts_with("HTTP/1.1 200")
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            served,
            "the address was not served again once its connections closed"
        );
    });
    let (answer, _) = alice.send(&bob_number, "still served", &[]);
    assert_eq!(answer["outcome"], "queued");
}

/// The connections not yet logged in that one wide address block (an IPv4 /24, an IPv6 /48)
/// may hold: the default of `pre_login_connections_per_block`.
const PRE_LOGIN_PER_BLOCK: usize = 1024;

/// A client holding many addresses of one block (a /48 holds 65,536 IPv6 /64s, each with its own
/// per-address cap) is capped for the whole block: from 17 addresses of one /24, the connection
/// past the block's cap is closed at once, unanswered, though its own address holds none; a
/// client of another /24 is served meanwhile.
#[test]
fn connections_not_logged_in_are_capped_per_wide_address_block() {
    let server = Server::start(&[]);
    block_on(async {
        let port = server.port;
        let addresses: Vec<Ipv4Addr> = (0..PRE_LOGIN_PER_BLOCK.div_ceil(PRE_LOGIN_PER_ADDRESS))
            .map(|n| Ipv4Addr::new(127, 0, 0, 2 + u8::try_from(n).expect("a few addresses")))
            .collect();
        let fresh = Ipv4Addr::new(127, 0, 0, 200);
        let other_block = Ipv4Addr::new(127, 0, 1, 2);
        // Every connection not logged in is closed after 10 s of silence, so the held ones must
        // all be open when the next one comes: an attempt that took longer is made again.
        let mut refused_at_once = false;
        for _attempt in 0..3 {
            let started = Instant::now();
            let mut held = Vec::new();
            for n in 0..PRE_LOGIN_PER_BLOCK {
                held.push(connect_from(addresses[n / PRE_LOGIN_PER_ADDRESS], port).await);
            }
            let over = health_from(fresh, port).await;
            let in_time = started.elapsed() < Duration::from_secs(8);
            if over.is_empty() && in_time {
                refused_at_once = true;
                let health = health_from(other_block, port).await;
                assert!(
                    health.starts_with("HTTP/1.1 200"),
                    "another block is served: {health}"
                );
                break;
            }
            assert!(
                !in_time,
                "a connection over the block's cap was served: {over:.200}"
            );
        }
        assert!(
            refused_at_once,
            "a connection over the block's cap was served"
        );
        // The held connections are gone (dropped above); the block is served again.
        let mut served = false;
        for _ in 0..100 {
            if health_from(fresh, port).await.starts_with("HTTP/1.1 200") {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            served,
            "the block was not served again once its connections closed"
        );
    });
}

/// The sessions one device may hold at once: the default of `sessions_per_device`.
const SESSIONS_PER_DEVICE: usize = 4;

/// A device holds at most four sessions: a fifth login is refused with a clear error (so one
/// device cannot take every connection slot), other devices are unaffected, and once one of the
/// four ends the device logs in again.
#[test]
fn a_device_holds_at_most_four_sessions_and_a_fifth_is_refused_clearly() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, bob_client) = (alice.client(), bob.client());
    block_on(async {
        let mut sessions = Vec::new();
        for n in 0..SESSIONS_PER_DEVICE {
            let session = alice_client.session(n == 0).await;
            sessions.push(session.unwrap_or_else(|e| panic!("session {n}: {e}")));
        }
        let refused = match alice_client.session(true).await {
            Ok(_) => panic!("a fifth session of one device was opened"),
            Err(e) => e.to_string(),
        };
        assert!(refused.contains("sessions"), "{refused}");
        bob_client
            .session(true)
            .await
            .expect("another device logs in");
        drop(sessions.pop());
        let mut again = None;
        for _ in 0..100 {
            if let Ok(session) = alice_client.session(false).await {
                again = Some(session);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            again.is_some(),
            "the device could not log in again once a session ended"
        );
    });
}

/// A listening session that stops reading is closed once what is queued for it passes the
/// session queue's byte bound (not only after its writes have waited three heartbeat intervals,
/// here 15 minutes), and its device loses nothing: every copy is delivered at its next login.
#[test]
fn a_stalled_session_is_closed_at_its_queue_byte_bound_and_gets_everything_at_the_next_login() {
    let server = Server::start(&[
        "--send-burst",
        "5000",
        "--send-per-second",
        "5000",
        "--stranger-pool-copies",
        "10000",
        "--heartbeat-seconds",
        "300",
        // One sender's 24 MB for one device: past its default share (8 MiB), lifted here so
        // that only the session's queue bound is under test.
        "--queue-bytes-per-sender",
        "100000000",
        "--queued-bytes-per-account",
        "100000000",
    ]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, bob_client) = (alice.client(), bob.client());
    // 400 deliveries of 60 KiB: 24 MB, more than the socket buffers and the queue's bound.
    const SENDS: u64 = 400;
    let stalled = block_on(stall_with_deliveries(
        &alice_client,
        &alice_number,
        &[],
        &bob_client,
        SENDS,
        60 * 1024,
    ));
    let offline = eventually(Duration::from_secs(60), || {
        bob.lookup(&[&alice_number])[0].1 == "offline"
    });
    drop(stalled);
    assert!(
        offline,
        "a session that stopped reading kept its queue and its device online"
    );
    // Every copy is still stored: the next login delivers each one.
    let delivered = block_on(async {
        let mut session = alice_client.session(true).await.expect("alice again");
        let mut ids = std::collections::BTreeSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while (ids.len() as u64) < SENDS {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::Deliver(deliver)) => {
                    ids.insert(deliver.id);
                }
                Some(_) => {}
                None => break,
            }
        }
        ids.len() as u64
    });
    assert_eq!(
        delivered, SENDS,
        "copies were lost when the session was closed"
    );
}

/// `Login` is read before the client is known, so it is bounded far below other frames: a
/// length prefix above the bound is refused as soon as it is read (not after waiting for its
/// body), and a `Login` above it is refused as too large before its signature is looked at.
#[test]
fn a_login_frame_larger_than_its_small_bound_is_refused_at_once() {
    let server = Server::start(&[]);
    let oversized_login = tidings_proto::codec::encode_to_bytes(
        &Kind::Login(frame::Login {
            device_id: vec![1; 16],
            signature: vec![2; 2_000],
            listen: true,
        })
        .into(),
    );
    // The prefix of a 60,000-byte frame (under the general bound), and nothing after it.
    let announced = 60_000u32.to_be_bytes().to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a large length prefix alone", announced),
        (
            "a login with a 2,000-byte signature",
            oversized_login.to_vec(),
        ),
    ];
    block_on(async {
        for (name, bytes) in cases {
            let (frames, closed) = answer_to(server.port, &bytes).await;
            assert!(closed, "{name}: the connection stayed open");
            let refused = frames.iter().any(|f| {
                matches!(&f.kind, Some(Kind::Error(e)) if e.fatal
                    && e.code == ErrorCode::Protocol as i32
                    && e.message.contains("limit"))
            });
            assert!(refused, "{name}: not refused as too large: {frames:?}");
        }
    });
}
