//! The HTTP routes served without a socket: each request goes through the router as hyper would
//! hand it over (with the connection's `Peer`), against a real store in a temporary directory.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use ed25519_dalek::{Signer as _, SigningKey};
use serde_json::{json, Value};
use tidings_proto::id::{to_text, DeviceId};
use tidings_store::Store as _;
use tower::ServiceExt as _;

use super::router;
use crate::connection::Peer;
use crate::testing::World;

/// A status, the `Retry-After` header if any, and the body as JSON (`Null` if it is not JSON).
type Answer = (StatusCode, Option<String>, Value);

async fn call(world: &World, method: Method, path: &str, body: Option<Value>) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if body.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/json");
    }
    let body = body.map_or_else(Body::empty, |json| Body::from(json.to_string()));
    let mut request = request.body(body).expect("a request");
    let peer = Peer(SocketAddr::from(([192, 0, 2, 1], 40000)));
    request.extensions_mut().insert(peer);
    let response = router(Arc::clone(&world.state))
        .oneshot(request)
        .await
        .expect("an answer");
    let status = response.status();
    let retry_after = response
        .headers()
        .get(header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_string);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("a body");
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, retry_after, json)
}

/// The code in the newest SMS the outbox gateway wrote.
fn code_sent(world: &World) -> String {
    let mut sent: Vec<_> = std::fs::read_dir(world.sms_dir())
        .expect("the outbox")
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    sent.sort();
    let text = std::fs::read_to_string(sent.last().expect("an SMS")).expect("an SMS file");
    let sms: Value = serde_json::from_str(&text).expect("JSON");
    let text = sms["text"].as_str().expect("a text");
    text.split(|c: char| !c.is_ascii_digit())
        .find(|word| word.len() == 6)
        .expect("a six-digit code")
        .to_string()
}

fn verify_body(number: &str, code: &str, key: &SigningKey) -> Value {
    let device_key = key.verifying_key().to_bytes();
    let transcript = tidings_proto::transcript::register(number, code, &device_key);
    json!({
        "number": number,
        "code": code,
        "device_key": to_text(&device_key),
        "signature": to_text(&key.sign(&transcript).to_bytes()),
    })
}

#[tokio::test]
async fn a_code_request_is_answered_by_what_was_wrong_with_it() {
    let world = World::new("http-code", |_| {});
    let code = |body: Option<Value>| call(&world, Method::POST, "/v1/registration/code", body);
    // (what, the body, the status, the error word)
    let cases = [
        (
            "no body",
            None,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
        ),
        (
            "JSON of the wrong shape",
            Some(json!({ "phone": "+14155550301" })),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
        ),
        (
            "not a number",
            Some(json!({ "number": "hello" })),
            StatusCode::BAD_REQUEST,
            "invalid_number",
        ),
    ];
    for (what, body, status, word) in cases {
        let (got, _, json) = code(body).await;
        assert_eq!(
            (got, json["error"].as_str()),
            (status, Some(word)),
            "{what}"
        );
    }
    let number = json!({ "number": "+14155550301" });
    let (status, _, json) = code(Some(number.clone())).await;
    assert_eq!(
        (status, &json),
        (StatusCode::ACCEPTED, &json!({ "expires_in": 600 }))
    );
    let (status, retry_after, json) = code(Some(number)).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "one code per number at a time"
    );
    assert_eq!(json["error"], "rate_limited");
    assert!(
        retry_after.is_some_and(|seconds| seconds != "0"),
        "it says when to come back"
    );
}

#[tokio::test]
async fn the_code_from_the_sms_registers_a_device_and_a_wrong_one_does_not() {
    let world = World::new("http-verify", |_| {});
    let number = "+14155550311";
    let key = SigningKey::generate(&mut rand::rngs::OsRng);
    let verify = |body: Value| call(&world, Method::POST, "/v1/registration/verify", Some(body));
    let (status, _, json) = verify(verify_body(number, "123456", &key)).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::GONE, Some("no_code"))
    );

    let code = json!({ "number": number });
    let sent = call(&world, Method::POST, "/v1/registration/code", Some(code)).await;
    assert_eq!(sent.0, StatusCode::ACCEPTED);
    let right = code_sent(&world);
    let wrong = if right == "000000" {
        "111111"
    } else {
        "000000"
    };
    let (status, _, json) = verify(verify_body(number, wrong, &key)).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("wrong_code"))
    );
    assert!(json["attempts_left"].as_u64().is_some(), "{json}");
    let mut forged = verify_body(number, &right, &key);
    forged["signature"] = json!(to_text(&[7; 64]));
    let (status, _, json) = verify(forged).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{json}");

    let (status, _, json) = verify(verify_body(number, &right, &key)).await;
    assert_eq!(status, StatusCode::OK, "{json}");
    assert_eq!(json["replaced_devices"], 0);
    let device = tidings_proto::id::from_text(json["device_id"].as_str().expect("an id"))
        .and_then(|bytes| DeviceId::from_slice(&bytes))
        .expect("a device id");
    let stored = world.state.store.device(device).await.expect("a read");
    assert_eq!(
        stored.map(|device| device.public_key),
        Some(key.verifying_key().to_bytes()),
        "registered with its key"
    );
}

#[tokio::test]
async fn the_operations_routes_answer_and_connect_asks_for_the_upgrade() {
    let world = World::new("http-operations", |_| {});
    let (status, _, json) = call(&world, Method::GET, "/v1/health", None).await;
    assert_eq!(
        (status, json["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _, json) = call(&world, Method::GET, "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/v1/registration/code",
        "/v1/registration/verify",
        "/v1/connect",
    ] {
        assert!(json["paths"].get(path).is_some(), "{path} is documented");
    }
    // Metrics are the operator's, served on an address of their own.
    let (status, _, _) = call(&world, Method::GET, "/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(json["paths"].get("/metrics").is_none());
    let (status, _, json) = call(&world, Method::GET, "/v1/connect", None).await;
    assert_eq!(
        (status, json["error"].as_str()),
        (StatusCode::UPGRADE_REQUIRED, Some("upgrade_required"))
    );
}

/// A completion of a registration by own SMS for `number`, signed by a fixed key.
fn completion(number: &str, code: &str, wait_seconds: u64) -> Value {
    let key = SigningKey::from_bytes(&[9; 32]);
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&tidings_proto::transcript::register(number, code, &public));
    json!({
        "number": number,
        "code": code,
        "device_key": to_text(&public),
        "signature": to_text(&signature.to_bytes()),
        "wait_seconds": wait_seconds,
    })
}

#[tokio::test]
async fn own_sms_requests_are_checked_and_a_waiting_completion_wakes_on_its_sms() {
    let plain = World::new("http-own-sms-off", |_| {});
    let (status, _, body) = call(
        &plain,
        Method::POST,
        "/v1/registration/inbound",
        Some(json!({ "number": "+4915112345678" })),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_offered"))
    );

    let world = World::new("http-own-sms", |args| {
        args.inbound_registration = Some(true);
        args.sms_service_number = Some("+49 151 99990000".into());
    });
    let number = "+4915112345678";
    let (status, _, declared) = call(
        &world,
        Method::POST,
        "/v1/registration/inbound",
        Some(json!({ "number": number })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{declared}");
    assert_eq!(declared["service_number"], "+4915199990000");
    assert_eq!(declared["expires_in"], 600);
    let code = declared["code"].as_str().expect("a code").to_string();
    let text = declared["text"].as_str().expect("a text").to_string();

    let mut bad_signature = completion(number, &code, 0);
    bad_signature["code"] = json!("ZZZZZZZZ");
    let cases = [
        (completion(number, "7qk4-m2xd", 0), "8 characters"),
        (completion(number, &code, 26), "at most 25"),
        (bad_signature, "signature"),
    ];
    for (body, expected) in cases {
        let (status, _, answer) = call(
            &world,
            Method::POST,
            "/v1/registration/inbound/complete",
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert!(
            answer["message"]
                .as_str()
                .is_some_and(|m| m.contains(expected)),
            "{answer}"
        );
    }

    // A completion that waits gets its device once the SMS arrives.
    let waiting = {
        let world_state = Arc::clone(&world.state);
        let body = completion(number, &code, 25);
        tokio::spawn(async move {
            let mut request = Request::builder()
                .method(Method::POST)
                .uri("/v1/registration/inbound/complete")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body.to_string()))
                .expect("a request");
            request
                .extensions_mut()
                .insert(Peer(SocketAddr::from(([192, 0, 2, 1], 40000))));
            let response = router(world_state)
                .oneshot(request)
                .await
                .expect("an answer");
            response.status()
        })
    };
    // The SMS arrives while it waits (the same outcome if it had arrived first).
    tokio::task::yield_now().await;
    let sms = tidings_gateway::Received {
        from: number.into(),
        text,
    };
    assert_eq!(
        crate::receiver::accept(&world.state, &sms).await,
        "sms_accepted"
    );
    assert_eq!(waiting.await.expect("the completion"), StatusCode::OK);
    let registered = world
        .state
        .store
        .account(world.pseudonym(number))
        .await
        .expect("the store");
    assert!(registered.is_some());
}
