//! Issue 28, item 2: linking a device is bound to a secret the approving device shows its user
//! and never sends to the server, and a device trusts a later device of its own number only when
//! one of its trusted devices vouched for it. Through the real server, the real CLI, and a raw
//! session holding a device's login key where the test plays the attacker.

use std::io::{BufRead as _, BufReader, Read as _};
use std::process::Child;

use ed25519_dalek::Signer as _;
use serde_json::json;
use tidings_proto::frame::{self, Kind};
use tidings_proto::id::DeviceId;

use crate::support::{block_on, number, text, Server, User, PATIENCE};

/// Reads what a spawned command still prints until it exits; returns (success, stdout, stderr).
fn finish(child: &mut Child, stdout_lines: Vec<String>) -> (bool, String, String) {
    let status = child.wait().expect("wait");
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("stderr");
    }
    (status.success(), stdout_lines.join("\n"), stderr)
}

/// A new link code for `user`'s number, asked for on a raw session with `user`'s login key:
/// what anyone holding that key (or the server itself) can do.
fn link_code_with_login_key(user: &User) -> String {
    block_on(async {
        let client = user.client();
        let mut session = client.session(false).await.expect("session");
        let request_id = session.request_id();
        let request = Kind::LinkCodeRequest(frame::LinkCodeRequest { request_id });
        match session.call(request, request_id).await.expect("call") {
            Kind::LinkCode(code) => code.code,
            other => panic!("no link code: {other:?}"),
        }
    })
}

/// The devices the server lists for `user`'s own number, on a raw session.
fn listed_devices(user: &User) -> Vec<frame::DeviceKeys> {
    block_on(async {
        let client = user.client();
        let mut session = client.session(false).await.expect("session");
        client
            .directory(&mut session, &user.number)
            .await
            .expect("directory")
    })
}

/// A device the attacker makes: its own login key and Olm identity keys, linked with `code`
/// through the HTTP API, with a proof made up without the secret. Returns its device id.
fn link_intruder(server: &Server, number: &str, code: &str) -> DeviceId {
    let login_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let public = login_key.verifying_key().to_bytes();
    let (identity_key, signing_key) = tidings_client::e2e::Crypto::new().identity_keys();
    let signature = login_key.sign(&tidings_proto::transcript::link(
        number,
        code,
        &public,
        &identity_key,
        &signing_key,
    ));
    let body = json!({
        "number": number,
        "code": code,
        "device_key": tidings_proto::id::to_text(&public),
        "identity_key": tidings_proto::id::to_text(&identity_key),
        "signing_key": tidings_proto::id::to_text(&signing_key),
        "signature": tidings_proto::id::to_text(&signature.to_bytes()),
        "proof": tidings_proto::id::to_text(&[9u8; 32]),
    });
    let endpoint =
        tidings_client::net::Endpoint::parse(&server.url, Default::default()).expect("endpoint");
    let (status, answer) =
        block_on(endpoint.post_json("/v1/registration/link", &body)).expect("request");
    assert_eq!(status.as_u16(), 200, "{answer}");
    answer["device_id"]
        .as_str()
        .and_then(DeviceId::from_text)
        .expect("a device id")
}

/// While `tidings link` waits on Alice's phone, someone holding the phone's login key asks for a
/// link code of its own (which replaces the one shown) and links a device of its own with it.
/// The waiting approver used to vouch for the first device that joined, so every contact would
/// accept the intruder's keys silently. It must refuse (non-zero exit, saying why), and the
/// intruder's device must carry no vouch.
#[test]
fn a_device_linked_by_someone_holding_the_login_key_is_refused_and_never_vouched_for() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let mut approver = alice.spawn(&["--json", "link", "--wait", "60"]);
    let mut lines = BufReader::new(approver.stdout.take().expect("stdout")).lines();
    let shown = lines.next().expect("a line").expect("read");
    assert!(shown.contains("code"), "{shown}");

    let code = link_code_with_login_key(&alice);
    let intruder = link_intruder(&server, &alice.number, &code);

    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let (success, stdout, stderr) = finish(&mut approver, rest);
    assert!(
        !success,
        "the approver accepted a device that did not prove the secret: {stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("did not prove"),
        "the refusal says why: {stdout}{stderr}"
    );
    let listed = listed_devices(&alice);
    let vouched = listed
        .iter()
        .any(|d| d.device_id == intruder.as_bytes() && !d.voucher.is_empty());
    assert!(!vouched, "the intruder's device was vouched for");
}

/// `tidings link` running on a device: what it printed so far, and the rest of its output.
struct ShownLink {
    approver: Child,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    shown: Vec<String>,
}

impl ShownLink {
    /// Starts `tidings link` on `user`'s device and reads up to the line that tells the new
    /// device what to type; returns it running, and the link string.
    fn start(user: &User) -> (Self, String) {
        let mut approver = user.spawn(&["link", "--wait", "60"]);
        let mut lines = BufReader::new(approver.stdout.take().expect("stdout")).lines();
        let mut shown = Vec::new();
        let link = loop {
            let line = lines.next().expect("the link string").expect("read");
            shown.push(line.clone());
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&"tidings") && words.get(1) == Some(&"link") {
                break words.get(3).expect("the link string").to_string();
            }
        };
        let running = Self {
            approver,
            lines,
            shown,
        };
        (running, link)
    }

    /// Waits for it to exit: (success, all it printed on stdout, stderr).
    fn finish(mut self) -> (bool, String, String) {
        self.shown.extend(self.lines.map_while(Result::ok));
        finish(&mut self.approver, self.shown)
    }
}

/// The happy path: `tidings link` shows one string (with a QR code) carrying the server's code
/// and the secret; the new device joins with it and proves the secret; the approver vouches.
/// Both sides show both devices' fingerprints, and they agree.
#[test]
fn a_link_with_the_shown_secret_is_vouched_for_and_both_sides_show_both_fingerprints() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let (approver, link) = ShownLink::start(&alice);
    let laptop = User::new(&alice.number);
    let joined: serde_json::Value = serde_json::from_str(
        laptop
            .ok(&[
                "--json",
                "link",
                &alice.number,
                &link,
                "--server",
                &server.url,
            ])
            .trim(),
    )
    .expect("json");
    let (success, stdout, stderr) = approver.finish();
    assert!(success, "{stdout}\n{stderr}");
    assert!(
        stdout.contains('█') || stdout.contains('▀') || stdout.contains('▄'),
        "a QR code is shown: {stdout}"
    );

    let laptop_print = joined["fingerprint"].as_str().expect("own fingerprint");
    let others = joined["devices"].as_array().expect("the number's devices");
    let phone_id = alice.device_id();
    let phone_print = others
        .iter()
        .find(|d| d["device_id"] == phone_id.as_str())
        .and_then(|d| d["fingerprint"].as_str())
        .expect("the phone's fingerprint on the laptop");
    assert!(
        stdout.contains(laptop_print) && stdout.contains(phone_print),
        "the approver shows both fingerprints ({phone_print}, {laptop_print}): {stdout}"
    );

    let laptop_id = laptop.device_id();
    let listed = listed_devices(&alice);
    let entry = listed
        .iter()
        .find(|d| {
            DeviceId::from_slice(&d.device_id).map(|d| d.to_text()) == Some(laptop_id.clone())
        })
        .expect("the laptop is listed");
    assert_eq!(
        DeviceId::from_slice(&entry.voucher).map(|d| d.to_text()),
        Some(phone_id),
        "the phone vouched for the laptop"
    );
    // And the laptop is a working device of the number.
    let bob = User::register(&number(), &server, &[]);
    let (answer, code) = bob.send(&alice.number, "to both", &[]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(
        laptop.receive_texts(1, PATIENCE),
        vec!["to both".to_string()]
    );
}

/// A device trusts its own key from verification on, and a later device of its own number only
/// when a trusted device vouched for it: one that someone holding the login key linked (without
/// the secret, so never vouched for) is warned about when it writes, and stops this device's
/// sends (which would copy every message to it) until the user looks. It used to be trusted on
/// first use, silently.
#[test]
fn a_later_device_of_ones_own_number_without_a_vouch_is_not_trusted() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    an_unvouched_device_of_the_own_number_is_warned_about_and_stops_sends(&server, &alice, &bob);
}

/// Someone holding `alice`'s login key links a device of its own (without the secret, so never
/// vouched for) and writes to her: she is warned, and her send to `bob` (which would copy every
/// message to that device) is refused, naming her own number.
fn an_unvouched_device_of_the_own_number_is_warned_about_and_stops_sends(
    server: &Server,
    alice: &User,
    bob: &User,
) {
    let code = link_code_with_login_key(alice);
    let intruder = User::new(&alice.number);
    // Letters only after the code: an earlier client reads the code's digits out of it.
    let made_up = format!("{code}-{}", ["AAAA"; 8].join("-"));
    intruder.ok(&["link", &alice.number, &made_up, "--server", &server.url]);

    let (answer, code) = intruder.send(&alice.number, "it is me, really", &[]);
    assert_eq!(code, 0, "{answer}");
    let received = alice.receive(1, PATIENCE);
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(
        received[0]["warning"].is_string(),
        "a message from an unvouched device of one's own number is warned about: {}",
        received[0]
    );

    let out = alice.run(&["--json", "send", &bob.number, "secret plans"]);
    assert!(
        !out.status.success(),
        "a send copied to an unvouched device of one's own number: {}",
        text(&out.stdout)
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains(&alice.number),
        "the refusal names the own number: {said}"
    );
}

/// A relay in front of `server` for one link request, doing what a server relaying the proof
/// could: it passes the new device's request on with a login key of its own in place of the
/// device's (signing the link transcript with it), keeping the device's identity keys and its
/// genuine proof. The thread yields the id of the device the server made from the relayed
/// request.
fn substituting_relay(server: &Server) -> (String, std::thread::JoinHandle<DeviceId>) {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("relay bind");
    let url = format!(
        "http://127.0.0.1:{}",
        listener.local_addr().expect("relay address").port()
    );
    let server_url = server.url.clone();
    let relay = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("the new device connects");
        let mut reader = BufReader::new(stream.try_clone().expect("clone"));
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().expect("a length");
                }
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body).expect("the body");
        let mut request: serde_json::Value = serde_json::from_slice(&body).expect("json");
        let field = |name: &str| {
            tidings_proto::id::from_text(request[name].as_str().expect(name)).expect(name)
        };
        let (identity_key, signing_key) = (field("identity_key"), field("signing_key"));
        let number = request["number"].as_str().expect("number").to_string();
        let code = request["code"].as_str().expect("code").to_string();
        let login_key = ed25519_dalek::SigningKey::from_bytes(&[11; 32]);
        let public = login_key.verifying_key().to_bytes();
        let signature = login_key.sign(&tidings_proto::transcript::link(
            &number,
            &code,
            &public,
            &identity_key,
            &signing_key,
        ));
        request["device_key"] = tidings_proto::id::to_text(&public).into();
        request["signature"] = tidings_proto::id::to_text(&signature.to_bytes()).into();
        let endpoint =
            tidings_client::net::Endpoint::parse(&server_url, Default::default()).expect("url");
        let (status, answer) =
            block_on(endpoint.post_json("/v1/registration/link", &request)).expect("request");
        let answer_text = answer.to_string();
        let mut stream = stream;
        let _ = write!(
            stream,
            "HTTP/1.1 {} Relayed\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer_text}",
            status.as_u16(),
            answer_text.len()
        );
        assert_eq!(status.as_u16(), 200, "{answer}");
        answer["device_id"]
            .as_str()
            .and_then(DeviceId::from_text)
            .expect("a device id")
    });
    (url, relay)
}

/// The new device proves the secret, but whoever relays its request (the server, or anything
/// between) puts a login key of its own in place of the device's and keeps the device's identity
/// keys and proof: the server then makes a device that the relay logs in as. The proof used to
/// cover only the identity keys, so the approver vouched for the relay's device. It must cover
/// the device (its id, which comes from its login key), so that the approver refuses and
/// removes it.
#[test]
fn a_genuine_proof_moved_to_another_device_is_refused_and_that_device_removed() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let (approver, link) = ShownLink::start(&alice);
    let (relay_url, relay) = substituting_relay(&server);
    let laptop = User::new(&alice.number);
    // The laptop's own link goes through the relay; what it makes of the answer is not the
    // point here.
    let _ = laptop.run(&["link", &alice.number, &link, "--server", &relay_url]);
    let moved = relay.join().expect("the relay passed the request on");

    let (success, stdout, stderr) = approver.finish();
    assert!(
        !success,
        "the approver vouched for a device the relay made with the laptop's proof: {stdout}"
    );
    assert!(
        format!("{stdout}{stderr}").contains("did not prove"),
        "the refusal says why: {stdout}{stderr}"
    );
    let listed = listed_devices(&alice);
    assert!(
        listed.iter().all(|d| d.device_id != moved.as_bytes()),
        "the relay's device was not removed"
    );
}

/// Makes `user`'s profile look as one registered before a device trusted its own key at
/// verification: the end-to-end state, sealed as the client stores it, with no trust entry for
/// its own number.
fn forget_own_number_trust(user: &User) {
    let passphrase = tidings_client::vault::Passphrase::new(crate::support::PASSPHRASE);
    let mut inbox = tidings_client::inbox::Inbox::open(user.profile.path(), &passphrase)
        .expect("open the profile's store");
    let own = user.number.clone();
    inbox
        .replace_crypto(|current| {
            let current = current.expect("the profile has its keys");
            let bytes = current.to_bytes().expect("state");
            let mut state: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            let trusted = state["trusted"].as_array_mut().expect("a trust list");
            trusted.retain(|entry| entry[0] != own.as_str());
            tidings_client::e2e::Crypto::from_bytes(&serde_json::to_vec(&state).expect("json"))
                .expect("the old state reads")
        })
        .expect("write the old state");
}

/// A profile made before a device trusted its own key at verification has no trust entry for its
/// own number, so a later device of that number used to be trusted on first use, silently. On
/// open the profile trusts its own key (and only that), so a device someone holding the login
/// key linked, never vouched for, is warned about and stops this device's sends like on a
/// profile made today.
#[test]
fn a_profile_made_before_own_key_trust_trusts_its_own_key_and_wants_a_vouch_for_others() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    forget_own_number_trust(&alice);
    an_unvouched_device_of_the_own_number_is_warned_about_and_stops_sends(&server, &alice, &bob);
    // Its own key is trusted: what it sent before is still its own.
    let passphrase = tidings_client::vault::Passphrase::new(crate::support::PASSPHRASE);
    let own_key = tidings_client::inbox::Inbox::open(alice.profile.path(), &passphrase)
        .expect("open")
        .look(|crypto| {
            let (identity, _) = crypto.identity_keys();
            crypto.is_trusted(&alice.number, &identity)
        })
        .expect("look");
    assert_eq!(own_key, Some(true), "its own key is trusted for its number");
}
