//! A session over an in-memory stream: the login, the answers given at once, the complaints about
//! frames that are not requests, a request run as a task, the end after a protocol error, and the
//! sign-out of a login whose device was removed before it registered.

use std::time::Duration;

use bytes::BytesMut;
use ed25519_dalek::Signer as _;
use tidings_proto::codec;
use tidings_proto::frame::{self, ErrorCode, Kind, Presence};
use tidings_store::Store as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::{open, register, Opened};
use crate::testing::{random_device, Device, World};

/// The client's end of a session's stream.
struct Client {
    io: DuplexStream,
    buf: BytesMut,
}

impl Client {
    async fn send(&mut self, kind: Kind) {
        let bytes = codec::encode_to_bytes(&kind.into());
        self.io.write_all(&bytes).await.expect("a write");
    }

    /// The next frame, or `None` once the server closed the stream.
    async fn recv(&mut self) -> Option<Kind> {
        loop {
            if let Some(frame) = codec::decode(&mut self.buf).expect("a frame") {
                return frame.kind;
            }
            let read =
                tokio::time::timeout(Duration::from_secs(10), self.io.read_buf(&mut self.buf));
            if read.await.expect("an answer in time").expect("a read") == 0 {
                return None;
            }
        }
    }
}

/// Opens a session on an in-memory stream, runs it as a task, and sends `first` (made for the
/// session's challenge) from the client.
async fn connect(world: &World, first: impl FnOnce(&[u8; 32]) -> Kind) -> Client {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let challenge: [u8; 32] = rand::random();
    let state = std::sync::Arc::clone(&world.state);
    tokio::spawn(async move {
        if let Some(live) = open(
            state,
            server,
            BytesMut::new(),
            super::Opening::Challenge(challenge),
            None,
        )
        .await
        {
            live.run().await;
        }
    });
    let mut client = Client {
        io: client,
        buf: BytesMut::new(),
    };
    client.send(first(&challenge)).await;
    client
}

/// The first frame a client sends, made for the session's challenge.
type FirstFrame<'a> = Box<dyn FnOnce(&[u8; 32]) -> Kind + 'a>;

/// A `Login` of `device`, signed for the challenge it is given.
fn login(device: &Device, listen: bool) -> impl FnOnce(&[u8; 32]) -> Kind + '_ {
    move |challenge| {
        let id = device.identity.device.as_bytes();
        let transcript = tidings_proto::transcript::login(challenge, id);
        Kind::Login(frame::Login {
            device_id: id.to_vec(),
            signature: device.login.sign(&transcript).to_bytes().to_vec(),
            listen,
        })
    }
}

fn protocol_error(message: &str, fatal: bool) -> Kind {
    Kind::Error(frame::Error {
        code: ErrorCode::Protocol as i32,
        message: message.into(),
        fatal,
        request_id: 0,
        retry_after_ms: 0,
    })
}

#[tokio::test]
async fn a_session_answers_what_it_reads_and_refuses_what_is_not_a_request() {
    let world = World::new("session", |_| {});
    let alice = world.user("+14155550401", 1).await.remove(0);
    let mut client = connect(&world, login(&alice, true)).await;
    let Some(Kind::LoginResult(result)) = client.recv().await else {
        panic!("not a login result");
    };
    assert_eq!(result.heartbeat_seconds, 10);
    // (what the client sends, what it is answered)
    let cases = [
        (
            Kind::Ping(frame::Ping { nonce: 9 }),
            Kind::Pong(frame::Pong { nonce: 9 }),
        ),
        (
            login(&alice, true)(&[0; 32]),
            protocol_error("already logged in", false),
        ),
        (
            Kind::Pong(frame::Pong { nonce: 1 }),
            protocol_error("this frame is sent by servers, not clients", false),
        ),
        (
            Kind::Lookup(frame::Lookup {
                request_id: 3,
                accounts: vec![alice.account.clone()],
                ..frame::Lookup::default()
            }),
            Kind::LookupResult(frame::LookupResult {
                request_id: 3,
                entries: vec![frame::LookupEntry {
                    account: alice.account.clone(),
                    presence: Presence::Online as i32,
                    ..frame::LookupEntry::default()
                }],
            }),
        ),
    ];
    for (sent, answer) in cases {
        client.send(sent).await;
        assert_eq!(client.recv().await, Some(answer));
    }
    // A frame that does not decode ends the session: said once, then the stream closes.
    client.io.write_all(&[0, 0, 0, 0]).await.expect("a write");
    assert_eq!(
        client.recv().await,
        Some(protocol_error("empty frame", true))
    );
    assert_eq!(client.recv().await, None);
}

#[tokio::test]
async fn a_login_is_refused_unless_it_comes_first_signed_by_a_known_device() {
    let world = World::new("session-login", |_| {});
    let alice = world.user("+14155550411", 1).await.remove(0);
    let bob = world.user("+14155550412", 1).await.remove(0);
    let refused = || {
        Kind::Error(frame::Error {
            code: ErrorCode::AuthFailed as i32,
            message: "unknown device or bad signature: register again".into(),
            fatal: true,
            request_id: 0,
            retry_after_ms: 0,
        })
    };
    let unknown = Device {
        identity: crate::identity::Identity {
            device: random_device(),
            ..alice.identity
        },
        ..world.user("+14155550413", 1).await.remove(0)
    };
    // (what, the first frame, the answer before the stream closes)
    let cases: [(&str, FirstFrame<'_>, Kind); 4] = [
        (
            "a ping before the login",
            Box::new(|_| Kind::Ping(frame::Ping { nonce: 1 })),
            protocol_error("the first frame must be Login", true),
        ),
        (
            "signed by another device's key",
            Box::new(|challenge| {
                let Kind::Login(mut frame) = login(&bob, true)(challenge) else {
                    unreachable!("a login");
                };
                frame.device_id = alice.identity.device.as_bytes().to_vec();
                Kind::Login(frame)
            }),
            refused(),
        ),
        (
            "signed for another challenge",
            Box::new(|_| login(&alice, true)(&[7; 32])),
            refused(),
        ),
        (
            "a device never registered",
            Box::new(login(&unknown, true)),
            refused(),
        ),
    ];
    for (what, first, answer) in cases {
        let mut client = connect(&world, first).await;
        assert_eq!(client.recv().await, Some(answer), "{what}");
        assert_eq!(client.recv().await, None, "{what}: closed");
    }
    let mut client = connect(&world, login(&alice, false)).await;
    assert!(
        matches!(client.recv().await, Some(Kind::LoginResult(_))),
        "the device's own login is taken"
    );
}

/// Issue 28, item 1: a login that read its device before the device's removal committed, and
/// registers in the hub after the removal's sign-out ran (so that the sign-out missed it), is
/// signed out once registered. The race is played in order: the removal and its sign-out, then
/// the registration of the login that had already read the device.
#[tokio::test]
async fn a_login_that_registers_after_its_device_was_removed_is_signed_out() {
    let world = World::new("session-removed", |_| {});
    let devices = world.user("+14155550421", 2).await;
    let (first, second) = (&devices[0], &devices[1]);
    let removed = world
        .state
        .store
        .remove_device(first.identity.actor(), second.identity.device)
        .await;
    assert_eq!(removed.ok(), Some(true));
    world
        .state
        .hub
        .sign_out(&[second.identity.device], "this device was removed");
    let (client, server) = tokio::io::duplex(64 * 1024);
    let state = std::sync::Arc::clone(&world.state);
    let opened = Opened::register(&state, second.identity, true).expect("under the bound");
    let live = register(state, server, BytesMut::new(), opened, None, None).await;
    tokio::spawn(live.run());
    let mut client = Client {
        io: client,
        buf: BytesMut::new(),
    };
    assert!(
        matches!(client.recv().await, Some(Kind::SignedOut(_))),
        "the session of a removed device is signed out"
    );
    assert_eq!(client.recv().await, None, "and closed");
}
