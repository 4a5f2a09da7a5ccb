//! Rotating the server's OPRF (discovery) key: `tidings server rotate-oprf-key`, a restart, the
//! window in which the server holds both keys, and `retire-oprf-key`. No account is lost: every
//! user stays reachable throughout, and clients follow the rotation by themselves.

use std::process::Command;

use tidings_proto::frame::{self, ErrorCode, Kind};

use crate::support::{block_on, number, text, Server, User, BIN};

/// Runs `tidings server <action> --key-file <the server's>`; its stdout.
fn key_command(server: &Server, action: &str) -> String {
    let out = Command::new(BIN)
        .args(["server", action, "--key-file"])
        .arg(server.key_file())
        .env_remove("TIDINGS_CONFIG")
        .output()
        .expect("run tidings server");
    assert!(
        out.status.success(),
        "{action} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// `GET /v1/oprf-key` as JSON.
fn oprf_key(server: &Server) -> serde_json::Value {
    let (status, body) = crate::operations::get(server.port, "/v1/oprf-key");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// The value of `tidings_accounts_on_previous_oprf_key` on /metrics.
fn on_previous_key(server: &Server) -> String {
    let (_, metrics) = crate::operations::get(server.metrics_port, "/metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("tidings_accounts_on_previous_oprf_key "))
        .unwrap_or_else(|| panic!("no gauge in {metrics}"))
        .trim()
        .to_string()
}

/// The key versions `user`'s profile pins: the current one and the previous one, if any.
fn pinned_versions(user: &User) -> (u64, Option<u64>) {
    let path = user.profile.path().join("profile.json");
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("profile")).expect("json");
    (
        data["oprf_key"]["key_version"].as_u64().expect("pinned"),
        data["previous_oprf_key"]["key_version"].as_u64(),
    )
}

/// Sends `body` from `from` to `to` and checks that `to` receives it.
fn delivered(from: &User, to: &User, body: &str) {
    let (answer, code) = from.send(&to.number, body, &["--route", "ip-only"]);
    assert_eq!(code, 0, "{} -> {}: {answer}", from.number, to.number);
    assert_eq!(to.receive_texts(1, 20), vec![body.to_string()]);
}

/// A, B and C register under key 1 and A learns B and C. The operator rotates the key and
/// restarts the server on the same data: B logs in and moves to key 2; A's messages reach B (on
/// key 2) and C (still on key 1) alike, and A's profile now pins key 2 with key 1 as its
/// previous one. C logs in and moves; D, registered under key 2 before anyone moved, finds A, B
/// and C then and after they moved. The gauge
/// counts the accounts left on key 1 down to 0; the operator retires key 1 and restarts:
/// everyone is still reachable, and nothing logged names a number.
#[test]
fn a_rotated_key_loses_no_account() {
    let mut server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    assert_eq!(
        alice.lookup(&[&bob.number, &carol.number]),
        vec![
            (bob.number.clone(), "offline".to_string()),
            (carol.number.clone(), "offline".to_string()),
        ]
    );
    assert_eq!(oprf_key(&server)["key_version"], 1);

    assert!(server.sigterm(), "the server stops");
    let said = key_command(&server, "rotate-oprf-key");
    assert!(
        said.contains("version 2") && said.contains("next starts"),
        "{said}"
    );
    server.restart();
    let keys = oprf_key(&server);
    assert_eq!(keys["key_version"], 2, "{keys}");
    assert_eq!(keys["previous_key_version"], 1, "{keys}");
    assert_eq!(on_previous_key(&server), "3");
    // D registers under key 2 in the window: it finds A, B and C, none of them moved yet.
    let dave = User::register(&number(), &server, &[]);
    assert_eq!(pinned_versions(&dave), (2, Some(1)));
    assert_eq!(
        on_previous_key(&server),
        "3",
        "D is on key 2 from the start"
    );
    assert_eq!(
        dave.lookup(&[&alice.number, &bob.number, &carol.number]),
        vec![
            (alice.number.clone(), "offline".to_string()),
            (bob.number.clone(), "offline".to_string()),
            (carol.number.clone(), "offline".to_string()),
        ]
    );

    // B logs in: its client follows the rotation and moves B's account.
    bob.ok(&["devices"]);
    assert_eq!(pinned_versions(&bob), (2, Some(1)));
    assert_eq!(on_previous_key(&server), "2");

    delivered(&alice, &bob, "to bob, on the new key");
    assert_eq!(pinned_versions(&alice), (2, Some(1)));
    // Carol has not logged in since the rotation: found under the previous key.
    assert_eq!(on_previous_key(&server), "1");
    delivered(&alice, &carol, "to carol, still on the old key");
    // Receiving logged Carol in: she moved too.
    assert_eq!(on_previous_key(&server), "0");
    assert_eq!(pinned_versions(&carol), (2, Some(1)));

    assert_eq!(
        dave.lookup(&[&alice.number, &bob.number, &carol.number]),
        vec![
            (alice.number.clone(), "offline".to_string()),
            (bob.number.clone(), "offline".to_string()),
            (carol.number.clone(), "offline".to_string()),
        ]
    );

    assert!(server.sigterm(), "the server stops");
    let said = key_command(&server, "retire-oprf-key");
    assert!(said.contains("Retired discovery key version 1"), "{said}");
    server.restart();
    let keys = oprf_key(&server);
    assert_eq!(keys["key_version"], 2, "{keys}");
    assert!(keys.get("previous_key_version").is_none(), "{keys}");
    assert_eq!(on_previous_key(&server), "0");
    delivered(&alice, &carol, "to carol, after the retirement");
    delivered(&bob, &alice, "to alice, after the retirement");
    delivered(&dave, &bob, "to bob, from the newcomer");
    delivered(&carol, &dave, "to dave, from an old hand");
    let log = server.log();
    for user in [&alice, &bob, &carol, &dave] {
        assert!(!log.contains(&user.number), "the log names a number");
        assert!(!log.contains(&user.number[1..]), "the log names a number");
    }
}

/// A second rotation before the previous key is retired is refused with what to do; a profile
/// whose pinned key neither is the server's nor is named by it as its previous key gets "the
/// server's discovery key changed", never a generic error, and `tidings repin` recovers.
#[test]
fn a_key_the_client_cannot_follow_is_a_changed_key() {
    let mut server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    assert!(server.sigterm(), "the server stops");
    key_command(&server, "rotate-oprf-key");
    let out = Command::new(BIN)
        .args(["server", "rotate-oprf-key", "--key-file"])
        .arg(server.key_file())
        .env_remove("TIDINGS_CONFIG")
        .output()
        .expect("run tidings server");
    assert!(!out.status.success(), "a second rotation went through");
    assert!(
        text(&out.stderr).contains("retire the previous key first"),
        "{}",
        text(&out.stderr)
    );
    // Rotated twice, retired in between: the server no longer knows the key Alice pinned.
    key_command(&server, "retire-oprf-key");
    key_command(&server, "rotate-oprf-key");
    server.restart();
    alice.says_the_key_changed(&bob.number);
    // Bob repins too; his account, on a key the server no longer holds, registers again.
    bob.ok(&["repin"]);
    let bob = User::register(&bob.number, &server, &[]);
    alice.ok(&["repin"]);
    assert_eq!(pinned_versions(&alice), (3, None));
    assert_eq!(
        alice.lookup(&[&bob.number]),
        vec![(bob.number.clone(), "offline".to_string())]
    );
}

/// One `Rekey` with `number`; the answer.
async fn call(
    session: &mut tidings_client::session::Session,
    number: String,
    request_id: u64,
) -> Kind {
    let request = Kind::Rekey(frame::Rekey { request_id, number });
    session.call(request, request_id).await.expect("answer")
}

/// `Rekey` takes only the device's own number: another user's, or a malformed one, is refused
/// with a clear error, and after a few refusals the device is rate-limited (no oracle of whose
/// number is whose). Its own number is accepted, and again (nothing to move).
#[test]
fn rekey_with_another_number_is_refused() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let session = &mut session;
        match call(session, alice.number.clone(), 1).await {
            Kind::RekeyResult(result) => {
                assert_eq!(result.key_version, 1);
                assert_eq!(result.account.len(), 32);
            }
            other => panic!("own number refused: {other:?}"),
        }
        match call(session, "not a number".into(), 2).await {
            Kind::Error(e) => {
                assert_eq!(e.code, ErrorCode::InvalidRequest as i32, "{e:?}");
                assert!(e.message.contains("E.164"), "{}", e.message);
            }
            other => panic!("a malformed number: {other:?}"),
        }
        for request_id in 3..6 {
            match call(session, bob.number.clone(), request_id).await {
                Kind::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidRequest as i32, "{e:?}");
                    assert!(e.message.contains("not this account's"), "{}", e.message);
                }
                other => panic!("another user's number: {other:?}"),
            }
        }
        match call(session, bob.number.clone(), 6).await {
            Kind::Error(e) => assert_eq!(e.code, ErrorCode::RateLimited as i32, "{e:?}"),
            other => panic!("not rate-limited: {other:?}"),
        }
    });
    assert!(!server.log().contains(&bob.number[1..]));
}
