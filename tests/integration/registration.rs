//! Opting in: codes, their limits, device keys, replaced devices (flows 1–2, promise P2).

use serde_json::json;

use crate::support::{
    eventually, files_containing, number, patience, text, Server, User, PATIENCE,
};

/// Posts JSON to the server with the client library's HTTP path, returning status and body.
pub(crate) fn post(
    server: &Server,
    path: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let endpoint =
        tidings_client::net::Endpoint::parse(&server.url, Default::default()).expect("endpoint");
    let (status, body) =
        crate::support::block_on(endpoint.post_json(path, &body)).expect("request");
    (status.as_u16(), body)
}

fn signed_verify(number: &str, code: &str, extra: Option<(&str, &str)>) -> serde_json::Value {
    use ed25519_dalek::Signer as _;
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&tidings_proto::transcript::register(number, code, &public));
    let mut body = json!({
        "number": number,
        "code": code,
        "device_key": tidings_proto::id::to_text(&public),
        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
    });
    if let Some((field, value)) = extra {
        body[field] = json!(value);
    }
    body
}

#[test]
fn codes_attempts_and_limits() {
    let server = Server::start(&[]);
    let n = number();
    let check = |path: &str, body: serde_json::Value, status: u16, error: Option<&str>| {
        let (got, answer) = post(&server, path, body);
        assert_eq!(got, status, "{path}: {answer}");
        if let Some(error) = error {
            assert_eq!(answer["error"], error, "{answer}");
        }
        answer
    };
    check(
        "/v1/registration/code",
        json!({"number": "12"}),
        400,
        Some("invalid_number"),
    );
    check(
        "/v1/registration/verify",
        signed_verify(&n, "123456", None),
        410,
        Some("no_code"),
    );
    check("/v1/registration/code", json!({"number": n}), 202, None);
    // One code per number per 2 minutes.
    let limited = check(
        "/v1/registration/code",
        json!({"number": n}),
        429,
        Some("rate_limited"),
    );
    assert!(
        limited["retry_after"]
            .as_u64()
            .is_some_and(|s| s > 0 && s <= 120),
        "{limited}"
    );
    let right = server.code_for(&n);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    for left in (1..5).rev() {
        let answer = check(
            "/v1/registration/verify",
            signed_verify(&n, wrong, None),
            401,
            Some("wrong_code"),
        );
        assert_eq!(answer["attempts_left"], left);
    }
    check(
        "/v1/registration/verify",
        signed_verify(&n, wrong, None),
        429,
        Some("too_many_attempts"),
    );
    // Used up: even the right code no longer works.
    check(
        "/v1/registration/verify",
        signed_verify(&n, &right, None),
        429,
        Some("too_many_attempts"),
    );
    // A signature that does not match the key is refused before the code is even looked at.
    let mut forged = signed_verify(&n, &right, None);
    forged["code"] = json!("999999");
    check(
        "/v1/registration/verify",
        forged,
        400,
        Some("invalid_request"),
    );
    check(
        "/v1/registration/verify",
        json!({"number": n}),
        422,
        Some("invalid_request"),
    );
    check(
        "/v1/registration/code",
        json!("not an object"),
        422,
        Some("invalid_request"),
    );
    // Five code requests per address per 5 minutes: three more distinct numbers pass, then 429.
    for _ in 0..3 {
        check(
            "/v1/registration/code",
            json!({"number": number()}),
            202,
            None,
        );
    }
    check(
        "/v1/registration/code",
        json!({"number": number()}),
        429,
        Some("rate_limited"),
    );
}

#[test]
fn stray_hardware_fields_are_dropped_not_stored() {
    let server = Server::start(&[]);
    let n = number();
    let imei = "356938035643809";
    let (status, _) = post(
        &server,
        "/v1/registration/code",
        json!({"number": n, "imei": imei, "imsi": "262019876543210"}),
    );
    assert_eq!(status, 202);
    let code = server.code_for(&n);
    let (status, answer) = post(
        &server,
        "/v1/registration/verify",
        signed_verify(&n, &code, Some(("imei", imei))),
    );
    assert_eq!(status, 200, "{answer}");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(files_containing(&server.data_dir(), imei.as_bytes()).is_empty());
    assert!(files_containing(&server.data_dir(), b"262019876543210").is_empty());
    assert!(!server.log().contains(imei));
}

#[test]
fn invalid_numbers_get_a_clear_error() {
    let server = Server::start(&[]);
    let user = User::new(&number());
    let out = user.run(&["register", "+1 555 0100", "--server", &server.url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("not a valid phone number"),
        "{}",
        text(&out.stderr)
    );
    let out = user.run(&["register", "hello", "--server", &server.url]);
    assert!(
        text(&out.stderr).contains("international form"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn registering_again_replaces_the_old_device_and_its_queue() {
    let server = Server::start(&["--code-interval-seconds", "1", "--codes-per-number", "10"]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let old_phone = User::register(&bob_number, &server, &[]);
    let (answer, _) = alice.send(&bob_number, "for the old phone", &[]);
    assert_eq!(answer["outcome"], "queued");

    // The phone is lost: the number is verified again on a new device.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let new_phone = User::register(&bob_number, &server, &[]);
    // The old device is signed out (refused at login: the run ends long before its timeout)
    // and its queue is gone with it.
    let out = old_phone.run(&["listen", "--timeout", &PATIENCE.to_string()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no longer registered"),
        "{}",
        text(&out.stderr)
    );
    // The new phone has new keys: Alice's client refuses until she accepts them.
    let (answer, code) = alice.send(&bob_number, "for the new phone", &[]);
    assert_ne!(code, 0, "{answer}");
    alice.ok(&["trust", &bob_number]);
    // Queued after the old phone's message: had its queue been handed to the new phone, that
    // copy would come first (shown, or rejected as undecryptable).
    crate::support::marker_comes_first(&alice, &new_phone, "for the new phone");

    // A live session of a replaced device is told so and closed.
    // Shows himself online to everyone (the default is only the people he wrote to).
    new_phone.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let mut listener = new_phone.spawn(&["listen", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let _third = User::register(&bob_number, &server, &[]);
    let out = crate::support::wait_output(&mut listener, patience());
    assert!(out.contains("signed out"), "{out}");
}

/// A refusal that comes with a retry time makes `tidings` say when to try again; the limit on
/// codes per number over hours says that it is this number that had too many codes.
#[test]
fn a_refused_registration_says_when_to_try_again() {
    // No interval between two codes for a number, so that the third code meets the limit of two
    // per 8 hours; one code request per address per 5 minutes for the second case.
    let server = Server::start(&["--code-interval-seconds", "0"]);
    let n = number();
    let user = User::new(&n);
    let register =
        |user: &User, number: &str| user.run(&["register", number, "--server", &server.url]);
    for _ in 0..2 {
        let out = register(&user, &n);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = register(&user, &n);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        // The first code's 8 hours, less the moment since it was sent: a wait rounded up to the
        // second reads "8 h" when that moment is under a second.
        stderr.contains("this number has had too many codes")
            && (stderr.contains("try again in 7 h 59 min") || stderr.contains("try again in 8 h")),
        "{stderr}"
    );

    let limited = Server::start(&["--codes-per-address", "1"]);
    let first = number();
    let out = User::new(&first).run(&["register", &first, "--server", &limited.url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second = number();
    let out = User::new(&second).run(&["register", &second, "--server", &limited.url]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("too many code requests from this address")
            && (stderr.contains("try again in 4 min") || stderr.contains("try again in 5 min")),
        "{stderr}"
    );
}

/// A profile may name several addresses of the service, separated by commas: the client tries
/// them in turn, so a node that is down costs a refused connection, not the user's messages;
/// when none answers, the error names each address.
#[test]
fn a_profile_with_several_addresses_uses_the_next_when_one_is_down() {
    let server = Server::start(&[]);
    // An address where nothing listens: a port held by a socket that never listens, so that
    // no other test's server can take it meanwhile.
    let held = tokio::net::TcpSocket::new_v4().expect("socket");
    held.bind("127.0.0.1:0".parse().expect("address"))
        .expect("bind");
    let dead = format!("http://{}", held.local_addr().expect("local address"));
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register_via(
        &alice_number,
        &server,
        &format!("{dead},{}", server.url),
        &[],
    );
    let bob = User::register_via(
        &bob_number,
        &server,
        &format!("{}, {dead}", server.url),
        &[],
    );
    let (answer, code) = alice.send(&bob_number, "through the second address", &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    let received = bob.receive(1, PATIENCE);
    assert_eq!(received.len(), 1, "{received:?}");
    assert_eq!(received[0]["text"], "through the second address");

    let nobody = number();
    let lost = User::new(&nobody);
    let out = lost.run(&["register", &nobody, "--server", &format!("{dead},{dead}")]);
    assert!(!out.status.success());
    let error = text(&out.stderr);
    assert!(
        error.contains("no address of the server answered")
            && error.matches("127.0.0.1").count() >= 2,
        "{error}"
    );
}
