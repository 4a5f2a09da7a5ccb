//! Issue 29: numbers are blinded on the device. No request of a session carries a contact's
//! number: the server refuses any that sets one, and addresses accounts by the pseudonym the
//! client derived through `Evaluate`.

use std::time::Duration;

use tidings_proto::frame::{self, ErrorCode, Kind};
use tokio::time::Instant;

use crate::support::{block_on, number, text, Server, User};

const BLINDED: &str = "numbers are blinded on the device since tidings/2";

/// A device that writes a contact's number in clear into a lookup, a send, a device list request
/// or a key claim is refused, each time with the same clear reason, and the session goes on.
#[test]
fn a_request_that_carries_a_number_is_refused() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let _bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let refusals = [
            Kind::Lookup(frame::Lookup {
                request_id: 1,
                numbers: vec![bob_number.clone()],
                ..Default::default()
            }),
            Kind::Devices(frame::DevicesRequest {
                request_id: 2,
                number: bob_number.clone(),
                ..Default::default()
            }),
            Kind::KeysClaim(frame::KeysClaim {
                request_id: 3,
                number: bob_number.clone(),
                ..Default::default()
            }),
        ];
        for (request_id, request) in (1..).zip(refusals) {
            match session.call(request, request_id).await.expect("answer") {
                Kind::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidRequest as i32, "{e:?}");
                    assert!(e.message.contains(BLINDED), "{}", e.message);
                }
                other => panic!("request {request_id} with a number was served: {other:?}"),
            }
        }
        session
            .send(Kind::Send(frame::Send {
                id: vec![9; 16],
                to: bob_number.clone(),
                mode: frame::SendMode::Queue as i32,
                ..Default::default()
            }))
            .await
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        let result = loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => break result,
                Some(_) => {}
                None => panic!("no answer to the send"),
            }
        };
        assert_eq!(
            result.outcome,
            frame::SendOutcome::Invalid as i32,
            "{result:?}"
        );
        assert!(result.detail.contains(BLINDED), "{}", result.detail);
    });
}

/// The whole client path by pseudonym, through the command line: a lookup, a send (which claims
/// keys and lists the sender's own devices), the reply (which checks the delivery's claimed
/// sender), and a safety number (both device lists).
#[test]
fn lookup_send_devices_and_claims_work_by_pseudonym() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let stranger = number();
    assert_eq!(
        alice.lookup(&[&bob_number, &stranger]),
        vec![
            (bob_number.clone(), "offline".to_string()),
            (stranger.clone(), "not_a_user".to_string())
        ]
    );
    let (answer, _) = alice.send(&bob_number, "blinded hello", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    let shown = bob.receive(1, 30);
    assert_eq!(shown[0]["text"], "blinded hello");
    assert_eq!(shown[0]["sender_verified"], true, "{}", shown[0]);
    let out = alice.ok(&["--json", "fingerprint", &bob_number]);
    assert!(out.contains("safety_number"), "{out}");
    // Nothing the server keeps or logs names either contact's number as the client wrote it.
    assert!(!server.log().contains(&stranger));
}

/// Bad blinded elements and oversized batches get a clear error, and the server keeps serving
/// the sender and everyone else.
#[test]
fn a_malformed_evaluation_gets_a_clear_error_and_others_are_served() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let cases: [(Vec<Vec<u8>>, &str); 4] = [
            (
                vec![vec![0; 32]],
                "not a ristretto255 point (or is the identity)",
            ),
            (vec![vec![0xff; 32]], "not a ristretto255 point"),
            (vec![vec![7; 33]], "blinded element 0 is not 32 bytes"),
            (
                vec![vec![7; 32]; tidings_proto::MAX_LOOKUP_NUMBERS + 1],
                "1 to 1000 blinded elements",
            ),
        ];
        for (request_id, (blinded, said)) in (1..).zip(cases) {
            let request = Kind::Evaluate(frame::Evaluate {
                request_id,
                blinded,
                ..Default::default()
            });
            match session.call(request, request_id).await.expect("answer") {
                Kind::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidRequest as i32, "{e:?}");
                    assert!(!e.fatal, "{e:?}");
                    assert!(e.message.contains(said), "{}", e.message);
                }
                other => panic!("evaluated: {other:?}"),
            }
        }
        // The same session still resolves and looks up a number.
        let pseudonym = client
            .account()
            .pseudonym(&mut session, &bob_number)
            .await
            .expect("pseudonym");
        let presences =
            tidings_client::contacts::lookup_accounts(&mut session, &[pseudonym], Vec::new())
                .await
                .expect("lookup");
        assert_eq!(presences, vec![frame::Presence::Offline]);
    });
    assert_eq!(
        bob.lookup(&[&alice_number]),
        vec![(alice_number.clone(), "offline".to_string())]
    );
}

/// Sets (or, with `None`, removes) the discovery key pinned in `user`'s profile.
fn set_pinned_key(user: &User, key: Option<&str>) {
    let path = user.profile.path().join("profile.json");
    let mut data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("profile")).expect("json");
    match key {
        Some(key) => data["oprf_key"]["public_key"] = key.into(),
        None => {
            data.as_object_mut().expect("object").remove("oprf_key");
        }
    }
    std::fs::write(&path, data.to_string()).expect("write profile");
}

/// A server that evaluates under a key other than the pinned one is caught by the proof check:
/// the client says the key changed (not a generic error) and sends nothing; `tidings repin`
/// pins the server's key again. A profile with no pinned key pins the server's on first use and
/// says so.
#[test]
fn a_proof_under_another_key_is_refused_as_a_changed_key() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob_number = number();
    User::register(&bob_number, &server, &[]);
    // The ristretto255 base point: a valid key, but not the server's.
    set_pinned_key(&alice, Some("4vKuCmq8TnGohKlhxQBRX1jjC2qlgt2NtqZZReCNLXY"));
    alice.says_the_key_changed(&bob_number);
    let out = alice.ok(&["repin"]);
    assert!(out.contains("Pinned"), "{out}");
    assert_eq!(
        alice.lookup(&[&bob_number]),
        vec![(bob_number.clone(), "offline".to_string())]
    );
    // A profile made before tidings/2: no key pinned.
    set_pinned_key(&alice, None);
    let out = alice.run(&["lookup", &number()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no pinned discovery key"),
        "{}",
        text(&out.stderr)
    );
    let again = alice.run(&["lookup", &number()]);
    assert!(!text(&again.stderr).contains("no pinned discovery key"));
}

/// A number looked up before costs no evaluation again: the client keeps its pseudonym sealed.
/// With a budget of three, the first lookup of a number costs two (its evaluation and the
/// lookup), the second one, and a third finds the budget spent and says when to try again.
#[test]
fn a_known_contact_costs_no_evaluation() {
    let server = Server::start(&["--lookup-burst", "3", "--lookup-per-hour", "1"]);
    let alice = User::register(&number(), &server, &[]);
    let bob_number = number();
    User::register(&bob_number, &server, &[]);
    alice.ok(&["lookup", &bob_number]);
    alice.ok(&["lookup", &bob_number]);
    let out = alice.run(&["lookup", &bob_number]);
    assert!(!out.status.success());
    let said = text(&out.stderr);
    assert!(
        said.contains("lookup budget used up") && said.contains("try again in"),
        "{said}"
    );
    // Nothing of a pseudonym or a number lies in clear in the profile's store.
    let store = std::fs::read(alice.profile.path().join("inbox.sqlite")).expect("store");
    assert!(!store
        .windows(bob_number.len())
        .any(|w| w == bob_number.as_bytes()));
}

/// A client that still speaks tidings/1 (and would send numbers in clear) or tidings/2 (and would
/// show a message the server answered `UNKNOWN`) is told to update.
#[test]
fn a_tidings_1_or_2_client_is_told_to_update() {
    let server = Server::start(&[]);
    for (old, why) in [
        ("tidings/1", "numbers in clear"),
        ("tidings/2", "also sent as SMS"),
    ] {
        let answer = block_on(async {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
                .await
                .expect("connect");
            let request = format!(
                "GET /v1/connect HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: {old}\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut answer = vec![0u8; 4096];
            let n = stream.read(&mut answer).await.expect("read");
            String::from_utf8_lossy(&answer[..n]).to_string()
        });
        assert!(answer.starts_with("HTTP/1.1 426"), "{answer}");
        assert!(
            answer.contains("speaks tidings/3")
                && answer.contains("update the client")
                && answer.contains(why),
            "{answer}"
        );
    }
}
