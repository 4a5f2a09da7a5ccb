//! Registration by the user's own SMS (mobile-originated): the number is proven by an SMS its
//! phone sends, received by Kannel (fakesmsc), the SMPP test SMSC or the simulated modem, and the
//! server sends nothing. An SMS proves only the number it came from.

use std::cell::RefCell;
use std::io::{BufRead as _, BufReader};

use serde_json::json;

use crate::gateways::{ModemSim, Smsc};
use crate::operations::get;
use crate::registration::post;
use crate::support::{eventually, free_port, number, patience, Kannel, Server, User};

/// The number users text, as the server is configured with it.
pub const SERVICE: &str = "+4915199990000";
/// A code no declaration was given (one in 2^40 that it is one's).
const WRONG_CODE: &str = "00000000";

/// The flags that turn registration by own SMS on.
pub fn inbound_args() -> Vec<String> {
    [
        "--inbound-registration",
        "true",
        "--sms-service-number",
        SERVICE,
        "--inbound-code-seconds",
        "45",
        // The tests ask again and again until something happened.
        "--verifies-per-address",
        "100000",
        "--verifies-per-address-block",
        "100000",
    ]
    .map(String::from)
    .to_vec()
}

/// A server with `args` and registration by own SMS on.
fn start_with_inbound(mut args: Vec<String>) -> Server {
    args.extend(inbound_args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// Declares `number`: the answer's code and text.
pub fn declare(server: &Server, number: &str) -> (String, String) {
    let (status, answer) = post(
        server,
        "/v1/registration/inbound",
        json!({ "number": number }),
    );
    assert_eq!(status, 201, "{answer}");
    assert_eq!(answer["service_number"], SERVICE, "{answer}");
    let field = |name: &str| answer[name].as_str().expect("a text field").to_string();
    (field("code"), field("text"))
}

/// A completion signed by a fixed test key, answered at once.
pub fn complete(server: &Server, number: &str, code: &str) -> (u16, serde_json::Value) {
    use ed25519_dalek::Signer as _;
    let key = ed25519_dalek::SigningKey::from_bytes(&[42; 32]);
    let public = key.verifying_key().to_bytes();
    let signature = key.sign(&tidings_proto::transcript::register(number, code, &public));
    post(
        server,
        "/v1/registration/inbound/complete",
        json!({
            "number": number,
            "code": code,
            "device_key": tidings_proto::id::to_text(&public),
            "signature": tidings_proto::id::to_text(&signature.to_bytes()),
        }),
    )
}

/// The server's count of registration events with this outcome.
fn registrations(metrics_port: u16, outcome: &str) -> u64 {
    let (_, metrics) = get(metrics_port, "/metrics");
    let prefix = format!("tidings_registrations_total{{outcome=\"{outcome}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Runs `inject` and waits until the server counted one more SMS with `outcome`.
fn sms_counted(server: &Server, metrics_port: u16, outcome: &str, inject: impl FnOnce()) {
    let before = registrations(metrics_port, outcome);
    inject();
    assert!(
        eventually(patience(), || registrations(metrics_port, outcome) > before),
        "no SMS counted as {outcome}: {}",
        server.log()
    );
}

/// The code in an SMS text, as the declaration's answer gives it.
fn code_of(text: &str) -> String {
    text.split_whitespace()
        .nth(1)
        .expect("a code after the keyword")
        .replace('-', "")
}

/// The whole flow through one inbound source: `inject(from, text)` makes a phone text the
/// service number, `sent` counts the SMS the gateway sent.
fn own_sms_scenario(
    server: &Server,
    metrics_port: u16,
    inject: &dyn Fn(&str, &str),
    sent: &dyn Fn() -> usize,
) {
    let (alice, stranger, bob, late) = (number(), number(), number(), number());
    // A declaration left to expire while the rest runs.
    let (late_code, late_text) = declare(server, &late);

    // Alice registers with the CLI, which shows what to text and waits.
    let user = User::new(&alice);
    let mut child = user.spawn(&["register", &alice, "--server", &server.url, "--by-own-sms"]);
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut heading = String::new();
    out.read_line(&mut heading).expect("the CLI's first line");
    assert!(
        heading.contains(SERVICE) && heading.contains(&alice),
        "{heading}"
    );
    let mut text = String::new();
    out.read_line(&mut text).expect("the text to send");
    let text = text.trim().to_string();
    assert!(
        text.starts_with("TIDINGS ") && text.contains("signs out its other devices"),
        "{text}"
    );
    let alice_code = code_of(&text);

    // The right text from another number proves nothing.
    sms_counted(server, metrics_port, "sms_no_declaration", || {
        inject(&stranger, &text)
    });
    assert!(
        child.try_wait().expect("status").is_none(),
        "registered by an SMS from another number"
    );
    // A wrong code from the number counts against its attempts.
    sms_counted(server, metrics_port, "sms_wrong_code", || {
        inject(&alice, &format!("TIDINGS {WRONG_CODE}"))
    });
    assert!(child.try_wait().expect("status").is_none());
    // The right SMS from the number registers this device.
    inject(&alice, &text);
    assert!(
        eventually(patience(), || child.try_wait().expect("status").is_some()),
        "the CLI did not finish: {}",
        server.log()
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("the CLI's output");
    let status = child.wait().expect("status");
    assert!(status.success(), "{rest}\n{}", server.log());
    assert!(rest.contains(&format!("Registered {alice}")), "{rest}");
    user.ok(&["devices"]);
    // The completion carries the server's discovery key, and the client pinned it as after verify.
    let profile: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(user.profile.path().join("profile.json")).expect("profile"),
    )
    .expect("profile json");
    assert!(
        profile["oprf_key"]["public_key"]
            .as_str()
            .is_some_and(|key| !key.is_empty()),
        "{profile}"
    );

    // One attempt budget for the SMS and the client: a wrong SMS, then a wrong completion.
    let (bob_code, bob_text) = declare(server, &bob);
    sms_counted(server, metrics_port, "sms_wrong_code", || {
        inject(&bob, &format!("TIDINGS {WRONG_CODE}"))
    });
    let (status, answer) = complete(server, &bob, WRONG_CODE);
    assert_eq!(
        (
            status,
            answer["error"].as_str(),
            answer["attempts_left"].as_u64()
        ),
        (401, Some("wrong_code"), Some(3)),
        "{answer}"
    );
    // The right code before its SMS: not yet.
    let (status, answer) = complete(server, &bob, &bob_code);
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("not_received"))
    );
    inject(&bob, &bob_text);
    assert!(
        eventually(patience(), || complete(server, &bob, &bob_code).0 == 200),
        "{}",
        server.log()
    );

    // An expired declaration is refused with a clear message, and so is its late SMS.
    let expired = || {
        let (status, answer) = complete(server, &late, &late_code);
        status == 410
            && answer["error"] == "expired"
            && answer["message"]
                .as_str()
                .is_some_and(|m| m.contains("expired"))
    };
    assert!(eventually(patience(), expired), "{}", server.log());
    sms_counted(server, metrics_port, "sms_spent", || {
        inject(&late, &late_text)
    });
    assert!(expired());

    assert_eq!(sent(), 0, "the server sent an SMS");
    let log = server.log();
    for number in [&alice, &stranger, &bob, &late] {
        assert!(
            !log.contains(number.trim_start_matches('+')),
            "{number} in the log"
        );
    }
    for code in [&alice_code, &bob_code, &late_code] {
        let dashed = format!("{}-{}", &code[..4], &code[4..]);
        assert!(
            !log.contains(code.as_str()) && !log.contains(&dashed),
            "a code in the log"
        );
    }
}

#[test]
fn own_sms_through_kannel() {
    let metrics_port = free_port();
    let kannel = RefCell::new(Kannel::start_with_inbound(&format!(
        "http://127.0.0.1:{metrics_port}/v1/sms/inbound?from=%p&to=%P&text=%a"
    )));
    let mut args = kannel.borrow().server_args();
    args.extend([
        "--metrics-listen".into(),
        format!("127.0.0.1:{metrics_port}"),
    ]);
    let server = start_with_inbound(args);
    own_sms_scenario(
        &server,
        metrics_port,
        &|from, text| kannel.borrow_mut().inject(from, SERVICE, text),
        &|| kannel.borrow().parts().len(),
    );
}

#[test]
fn own_sms_through_smpp() {
    let smsc = RefCell::new(Smsc::start(&[]));
    let address = smsc.borrow().address.clone();
    let args: Vec<String> = [
        "--sms-gateway",
        "smpp",
        "--smpp-address",
        &address,
        "--smpp-system-id",
        "tidings",
        "--smpp-password",
        "secret1",
    ]
    .map(String::from)
    .to_vec();
    let server = start_with_inbound(args);
    own_sms_scenario(
        &server,
        server.metrics_port,
        &|from, text| smsc.borrow_mut().inject(from, SERVICE, text),
        &|| smsc.borrow().submits().len(),
    );
}

#[test]
fn own_sms_through_a_modem() {
    let modem = RefCell::new(ModemSim::start(&[]));
    let port = modem.borrow().port.clone();
    let args: Vec<String> = ["--sms-gateway", "modem", "--modem-port", &port]
        .map(String::from)
        .to_vec();
    let server = start_with_inbound(args);
    own_sms_scenario(
        &server,
        server.metrics_port,
        &|from, text| modem.borrow_mut().inject(from, text),
        &|| modem.borrow().pdus().len(),
    );
}

/// `+` and spaces as a query string needs them.
pub fn query_value(text: &str) -> String {
    text.replace('+', "%2B").replace(' ', "+")
}

#[test]
fn kannel_inbound_is_refused_on_the_public_port() {
    let server = start_with_inbound(Vec::new());
    let n = number();
    let (code, text) = declare(&server, &n);
    let path = format!(
        "/v1/sms/inbound?from={}&to={}&text={}",
        query_value(&n),
        query_value(SERVICE),
        query_value(&text)
    );
    // Anyone on the internet could claim any sender here: the public port does not listen.
    let (status, _) = get(server.port, &path);
    assert_eq!(status, 404);
    let (status, answer) = complete(&server, &n, &code);
    assert_eq!(
        (status, answer["error"].as_str()),
        (409, Some("not_received"))
    );
    // The operator's loopback address, where Kannel calls, does.
    let (status, _) = get(server.metrics_port, &path);
    assert_eq!(status, 200);
    let (status, answer) = complete(&server, &n, &code);
    assert_eq!(status, 200, "{answer}");
    assert!(
        std::fs::read_dir(server.outbox()).map_or(true, |mut d| d.next().is_none()),
        "the server sent an SMS"
    );

    // A server that does not offer it says so.
    let plain = Server::start(&[]);
    let (status, answer) = post(&plain, "/v1/registration/inbound", json!({ "number": n }));
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("not_offered"))
    );
    let (status, _) = get(plain.metrics_port, &path);
    assert_eq!(status, 404);
}
