//! Issue 30, resumption: a reconnect presents the token the last login's answer gave, in the
//! `GET /v1/connect` request, and is logged in without a signature. A token is single use,
//! expires, is refused for a removed device and after a server restart; every refusal falls back
//! to the challenge login (the command still works), and the server's `resumes` metric says why.

use tidings_proto::codec;
use tidings_proto::frame::Kind;

use crate::support::{number, text, CapturingRelay, Server, User};

/// The server's count of connects with a resumption token that ended as `outcome`.
fn resumes(server: &Server, outcome: &str) -> u64 {
    let (status, body) = crate::operations::get(server.metrics_port, "/metrics");
    assert_eq!(status, 200, "{body}");
    let prefix = format!("tidings_resumes_total{{outcome=\"{outcome}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

/// The sealed token a profile keeps for its next connect.
fn token_file(user: &User) -> std::path::PathBuf {
    user.profile.path().join("resume.token")
}

/// One command that opens a session and must succeed.
fn connect(user: &User) {
    user.ok(&["--json", "devices"]);
}

#[test]
fn a_reconnect_resumes_without_a_signature_and_a_replayed_token_falls_back() {
    let server = Server::start(&[]);
    let relay = CapturingRelay::start(&server);
    let alice = User::register_via(&number(), &server, &relay.url, &[]);
    connect(&alice);
    assert!(token_file(&alice).exists(), "no token kept after a login");
    let on_disk = std::fs::read(token_file(&alice)).expect("token");
    let resumed = resumes(&server, "resumed");
    connect(&alice);
    assert_eq!(resumes(&server, "resumed"), resumed + 1);

    // What the client sent on that connect: the token in the upgrade request, and no Login.
    let sent = relay
        .connections()
        .into_iter()
        .rev()
        .find(|c| c.bytes.starts_with(b"GET /v1/connect"))
        .expect("a connect through the relay")
        .bytes;
    let head_end = sent
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a request head")
        + 4;
    let head = text(&sent[..head_end]).to_ascii_lowercase();
    assert!(head.contains("tidings-resume: "), "{head}");
    let mut frames = bytes::BytesMut::from(&sent[head_end..]);
    let mut kinds = Vec::new();
    while let Some(frame) = codec::decode(&mut frames).expect("frames") {
        kinds.push(frame.kind);
    }
    assert!(!kinds.is_empty(), "the resumed session made no request");
    assert!(
        !kinds.iter().any(|k| matches!(k, Some(Kind::Login(_)))),
        "a resumed connect still signed a Login: {kinds:?}"
    );
    // The token is sealed: its bytes never appear in the request's base64url form on disk.
    let token_text = head
        .lines()
        .find_map(|l| l.strip_prefix("tidings-resume: "))
        .expect("the header")
        .to_string();
    assert!(!text(&on_disk).to_ascii_lowercase().contains(&token_text));

    // A used token, put back, is refused as used; the command logs in by challenge and works,
    // and leaves a fresh token that resumes.
    let kept = std::fs::read(token_file(&alice)).expect("token");
    connect(&alice);
    std::fs::write(token_file(&alice), &kept).expect("put the used token back");
    let used = resumes(&server, "refused_used");
    connect(&alice);
    assert_eq!(resumes(&server, "refused_used"), used + 1);
    let resumed = resumes(&server, "resumed");
    connect(&alice);
    assert_eq!(resumes(&server, "resumed"), resumed + 1);

    // A damaged token file is no token: the challenge login.
    std::fs::write(token_file(&alice), b"not a sealed token").expect("damage");
    connect(&alice);
    assert!(token_file(&alice).exists());
}

#[test]
fn an_expired_token_is_refused_and_the_login_falls_back() {
    let server = Server::start(&["--resume-token-seconds", "1"]);
    let alice = User::register(&number(), &server, &[]);
    connect(&alice);
    // Past the token's expiry, whatever the machine's speed: the refusal cannot be lost by
    // slowness.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let expired = resumes(&server, "refused_expired");
    connect(&alice);
    assert_eq!(resumes(&server, "refused_expired"), expired + 1);
}

#[test]
fn a_removed_devices_token_is_refused() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let laptop = alice.link_device(&server);
    let laptop_id = laptop.device_id();
    assert!(token_file(&laptop).exists());
    alice.ok(&["devices", "--remove", &laptop_id]);
    let gone = resumes(&server, "refused_device_gone");
    let out = laptop.run(&["--json", "devices"]);
    assert!(
        !out.status.success(),
        "a removed device resumed: {}",
        text(&out.stdout)
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(said.contains("no longer registered"), "{said}");
    assert_eq!(resumes(&server, "refused_device_gone"), gone + 1);
}

#[test]
fn a_token_from_before_a_restart_is_refused_and_the_next_one_resumes() {
    let mut server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    connect(&alice);
    let key_file = std::fs::read(server.key_file()).expect("key file");
    server.restart();
    assert_eq!(
        std::fs::read(server.key_file()).expect("key file"),
        key_file,
        "the key file changed across a restart"
    );
    connect(&alice);
    assert_eq!(resumes(&server, "refused_other_epoch"), 1);
    assert_eq!(resumes(&server, "resumed"), 0);
    connect(&alice);
    assert_eq!(resumes(&server, "resumed"), 1);
}
