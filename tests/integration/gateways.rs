//! SMS through SMPP and through a GSM modem: a real `tidings` against a test SMSC that Tidings
//! did not write (smppy and smpppdu, in `tests/smsc/smpp_server.py`) and against a simulated
//! modem on a pseudo-terminal (`tests/smsc/modem_sim.py`) whose recorded PDUs are read back with
//! python-gsmmodem-new's decoder. Both need `TIDINGS_SMS_PYTHON` (or `python3`) with those
//! packages; `scripts/test.sh` installs them. Without them these tests fail, never skip.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{eventually, free_port, number, patience, Server, TempDir, User};

const SYSTEM_ID: &str = "tidings";
const PASSWORD: &str = "secret1";

fn python() -> String {
    std::env::var("TIDINGS_SMS_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/smsc")
        .join(name)
}

/// Reads the first stdout line of a helper, failing with its stderr if it did not start.
fn first_line(child: &mut Child, what: &str) -> String {
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim().is_empty() {
        let _ = child.kill();
        let mut err = String::new();
        if let Some(mut stderr) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        }
        panic!(
            "{what} did not start (needs Python with smppy==0.3.2 and python-gsmmodem-new==0.13.0; \
             run scripts/test.sh or set TIDINGS_SMS_PYTHON): {err}"
        );
    }
    line.trim().to_string()
}

fn read_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The test SMSC.
pub(crate) struct Smsc {
    child: Child,
    dir: TempDir,
    pub(crate) address: String,
}

impl Smsc {
    pub(crate) fn start(knobs: &[&str]) -> Self {
        let dir = TempDir::new("smsc");
        let port = free_port();
        let mut child = Command::new(python())
            .arg(script("smpp_server.py"))
            .args(["--port", &port.to_string(), "--record"])
            .arg(dir.path().join("submits.jsonl"))
            .args(["--system-id", SYSTEM_ID, "--password", PASSWORD])
            .args(knobs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("smsc.log")).expect("SMSC log"),
            ))
            .spawn()
            .expect("start the test SMSC (Python)");
        assert_eq!(first_line(&mut child, "the test SMSC"), "listening");
        Self {
            child,
            dir,
            address: format!("127.0.0.1:{port}"),
        }
    }

    /// What the SMSC wrote to stderr.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smsc.log")).unwrap_or_default()
    }

    /// An SMS from a phone to the account, delivered with deliver_sm once a transceiver binds.
    pub(crate) fn inject(&mut self, from: &str, to: &str, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("the SMSC's stdin");
        writeln!(stdin, "{from} {to} {text}").expect("write to the SMSC");
        stdin.flush().expect("flush to the SMSC");
    }

    /// Every submit_sm the SMSC accepted.
    pub(crate) fn submits(&self) -> Vec<serde_json::Value> {
        read_records(&self.dir.path().join("submits.jsonl"))
    }

    fn submits_to(&self, number: &str) -> Vec<serde_json::Value> {
        let digits = number.trim_start_matches('+');
        self.submits()
            .into_iter()
            .filter(|s| s["destination_addr"] == digits)
            .collect()
    }

    /// Whole messages to `number`: parts joined by their concatenation reference (UDH or SAR),
    /// each with its part count.
    fn messages_to(&self, number: &str) -> Vec<(String, usize)> {
        let mut whole = Vec::new();
        let mut pending: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
        for submit in self.submits_to(number) {
            let text = submit["text"].as_str().unwrap_or_default().to_string();
            let udh = submit["udh"].as_str().unwrap_or_default();
            let concat = if udh.len() >= 12 && &udh[2..4] == "00" {
                let byte = |i: usize| u64::from_str_radix(&udh[i..i + 2], 16).unwrap_or(0);
                Some((byte(6), byte(8), byte(10)))
            } else {
                submit["sar_msg_ref_num"].as_u64().map(|reference| {
                    (
                        reference,
                        submit["sar_total_segments"].as_u64().unwrap_or(0),
                        submit["sar_segment_seqnum"].as_u64().unwrap_or(0),
                    )
                })
            };
            match concat {
                None => whole.push((text, 1)),
                Some((reference, total, sequence)) => {
                    let parts = pending.entry(reference).or_default();
                    parts.push((sequence, text));
                    if parts.len() as u64 == total {
                        parts.sort();
                        whole.push((parts.iter().map(|(_, t)| t.as_str()).collect(), parts.len()));
                        pending.remove(&reference);
                    }
                }
            }
        }
        whole
    }

    fn settings_args(&self) -> Vec<String> {
        [
            "settings",
            "--sms-smpp",
            &self.address,
            "--sms-system-id",
            SYSTEM_ID,
            "--sms-password",
            PASSWORD,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

impl Drop for Smsc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_smpp(number: &str, server: &Server, smsc: &Smsc, extra: &[&str]) -> User {
    let user = User::register(number, server, &[]);
    let mut args = smsc.settings_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    user.ok(&args);
    user
}

fn detail(answer: &serde_json::Value) -> &str {
    answer["detail"].as_str().unwrap_or_default()
}

const LONG: &str = "A long one: the quick brown fox jumps over the lazy dog. The quick brown fox \
                    jumps over the lazy dog. The quick brown fox jumps over the lazy dog. The \
                    quick brown fox jumps over the lazy dog. [braces] {and} a euro sign: 5€.";
const CYRILLIC: &str = "Привет! Встречаемся у входа в восемь. Не опаздывай, пожалуйста: билеты \
                        у меня, а очередь уже длинная.";

#[test]
fn smpp_short_long_and_non_latin_messages_arrive_intact_with_receipts() {
    let smsc = Smsc::start(&["--receipts", "DELIVRD"]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_smpp(&alice_number, &server, &smsc, &["--sms-receipt-wait", "5"]);
    User::register(&bob_number, &server, &[]);
    let short = "Running late, start without me";
    for body in [short, LONG, CYRILLIC] {
        let (answer, code) = alice.send(&bob_number, body, &[]);
        assert_eq!(
            (answer["outcome"].as_str(), code),
            (Some("sent_as_sms"), 0),
            "{answer}\n{}",
            smsc.log()
        );
        assert!(
            detail(&answer).contains("delivered to the phone"),
            "the receipt is reported: {answer}"
        );
    }
    let messages = smsc.messages_to(&bob_number);
    let texts: Vec<&str> = messages.iter().map(|(t, _)| t.as_str()).collect();
    assert_eq!(texts, [short, LONG, CYRILLIC]);
    assert!(messages[1].1 >= 2 && messages[2].1 >= 2, "{messages:?}");
    let submits = smsc.submits_to(&bob_number);
    let alice_digits = alice_number.trim_start_matches('+');
    for submit in &submits {
        // The user's own number, international.
        assert_eq!(submit["source_addr"], alice_digits);
        assert_eq!(
            (
                submit["source_addr_ton"].as_u64(),
                submit["source_addr_npi"].as_u64()
            ),
            (Some(1), Some(1))
        );
        assert_eq!(submit["dest_addr_ton"], 1);
    }
    assert_eq!(submits[0]["data_coding"], 0);
    assert_eq!(submits.last().expect("cyrillic")["data_coding"], 8);
    assert!(
        submits[1]["esm_class"].as_u64().unwrap_or(0) & 0x40 != 0,
        "UDHI"
    );
}

#[test]
fn smpp_sar_concatenation_on_a_transmitter_bind() {
    let smsc = Smsc::start(&[]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_smpp(
        &alice_number,
        &server,
        &smsc,
        &["--sms-concatenation", "sar", "--sms-bind", "transmitter"],
    );
    let (answer, code) = alice.send(&bob_number, LONG, &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sent_as_sms"), 0),
        "{answer}"
    );
    let submits = smsc.submits_to(&bob_number);
    assert!(submits.len() >= 2);
    for submit in &submits {
        assert_eq!(submit["esm_class"], 0, "no UDH with SAR");
        assert_eq!(submit["sar_msg_ref_num"], submits[0]["sar_msg_ref_num"]);
    }
    assert_eq!(
        smsc.messages_to(&bob_number),
        [(LONG.to_string(), submits.len())]
    );
}

#[test]
fn smpp_connection_dropped_mid_message_reconnects_without_loss_or_double() {
    // The SMSC takes part 2 of the long message, then drops the connection before answering.
    let smsc = Smsc::start(&["--drop-on", "2"]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_smpp(&alice_number, &server, &smsc, &[]);
    let long = format!("{LONG} {LONG}");
    let (answer, code) = alice.send(&bob_number, &long, &["--route", "sms-only"]);
    // Part 2 was never confirmed, so the client cannot claim success, and must not resend it.
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sms_rejected"), 3),
        "{answer}"
    );
    assert!(detail(&answer).contains("not sent again"), "{answer}");
    // Part 3 went through a new connection with the same reference: the message is whole, once.
    let submits = smsc.submits_to(&bob_number);
    assert_eq!(submits.len(), 3, "{submits:?}");
    assert_eq!(smsc.messages_to(&bob_number), [(long.clone(), 3)]);
    // A later message goes through the same way, once.
    let (answer, code) = alice.send(&bob_number, "and one more", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sent_as_sms"), 0),
        "{answer}"
    );
    assert_eq!(smsc.submits_to(&bob_number).len(), 4);
}

#[test]
fn smpp_server_codes_survive_a_dropped_connection() {
    // The server keeps one bind for its codes; the SMSC drops it after the first code.
    let smsc = Smsc::start(&["--drop-after", "1"]);
    let server = Server::start(&[
        "--sms-gateway",
        "smpp",
        "--smpp-address",
        &smsc.address,
        "--smpp-system-id",
        SYSTEM_ID,
        "--smpp-password",
        PASSWORD,
        "--sms-from",
        "Tidings",
    ]);
    for _ in 0..2 {
        let n = number();
        let user = User::new(&n);
        user.ok(&["register", &n, "--server", &server.url]);
        assert!(
            eventually(patience(), || smsc.submits_to(&n).len() == 1),
            "{}",
            server.log()
        );
        let submit = &smsc.submits_to(&n)[0];
        // The configured sender id, alphanumeric (TON 5).
        assert_eq!(
            (
                submit["source_addr"].as_str(),
                submit["source_addr_ton"].as_u64()
            ),
            (Some("Tidings"), Some(5))
        );
        let text = submit["text"].as_str().unwrap_or_default();
        let code: String = text.chars().filter(char::is_ascii_digit).take(6).collect();
        user.ok(&["verify", &code]);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(smsc.submits().len(), 2, "each code once");
}

#[test]
fn smpp_throttling_is_retried_and_persistent_throttling_keeps_the_message() {
    let smsc = Smsc::start(&["--throttle", "2"]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = with_smpp(&alice_number, &server, &smsc, &[]);
    let (answer, code) = alice.send(&bob_number, "after two throttles", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sent_as_sms"), 0),
        "{answer}"
    );
    assert_eq!(
        smsc.messages_to(&bob_number),
        [("after two throttles".to_string(), 1)]
    );

    // An SMSC that keeps throttling: the message is kept for a later retry, nothing is sent.
    let stubborn = Smsc::start(&["--throttle", "1000"]);
    let carol = with_smpp(&number(), &server, &stubborn, &[]);
    let (answer, code) = carol.send(
        &bob_number,
        "throttled",
        &["--route", "sms-only", "--wait", "0"],
    );
    assert_eq!(code, 5, "{answer}");
    assert_eq!(answer["pending"], true, "{answer}");
    assert!(detail(&answer).contains("throttling"), "{answer}");
    assert!(stubborn.submits().is_empty());
}

#[test]
fn smpp_wrong_password_is_a_clear_refusal() {
    let smsc = Smsc::start(&[]);
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    alice.ok(&[
        "settings",
        "--sms-smpp",
        &smsc.address,
        "--sms-system-id",
        SYSTEM_ID,
        "--sms-password",
        "wrong",
    ]);
    let (answer, code) = alice.send(&number(), "never", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sms_rejected"), 3),
        "{answer}"
    );
    assert!(
        detail(&answer).contains("check system_id and password"),
        "{answer}"
    );
}

/// The simulated modem.
pub(crate) struct ModemSim {
    child: Child,
    dir: TempDir,
    pub(crate) port: String,
}

impl ModemSim {
    pub(crate) fn start(knobs: &[&str]) -> Self {
        let dir = TempDir::new("modem");
        let mut child = Command::new(python())
            .arg(script("modem_sim.py"))
            .arg("--record")
            .arg(dir.path().join("pdus.jsonl"))
            .args(knobs)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the simulated modem (Python)");
        let port = first_line(&mut child, "the simulated modem");
        Self { child, dir, port }
    }

    /// An SMS from a phone, stored in the modem until it is listed and deleted.
    pub(crate) fn inject(&mut self, from: &str, text: &str) {
        let stdin = self.child.stdin.as_mut().expect("the modem's stdin");
        writeln!(stdin, "{from} {text}").expect("write to the modem");
        stdin.flush().expect("flush to the modem");
    }

    pub(crate) fn pdus(&self) -> Vec<serde_json::Value> {
        read_records(&self.dir.path().join("pdus.jsonl"))
    }

    /// Whole messages as the independent decoder read them, parts joined by reference.
    fn messages(&self) -> Vec<(String, String, usize)> {
        let mut whole = Vec::new();
        let mut pending: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
        for pdu in self.pdus() {
            let to = pdu["number"].as_str().unwrap_or_default().to_string();
            let text = pdu["text"].as_str().unwrap_or_default().to_string();
            match pdu["reference"].as_u64() {
                None => whole.push((to, text, 1)),
                Some(reference) => {
                    let parts = pending.entry(reference).or_default();
                    parts.push((pdu["part"].as_u64().unwrap_or(0), text));
                    if Some(parts.len() as u64) == pdu["parts"].as_u64() {
                        parts.sort();
                        let joined = parts.iter().map(|(_, t)| t.as_str()).collect();
                        whole.push((to, joined, parts.len()));
                        pending.remove(&reference);
                    }
                }
            }
        }
        whole
    }

    fn settings_args(&self) -> Vec<&str> {
        vec![
            "settings",
            "--sms-modem",
            &self.port,
            "--sms-modem-timeout",
            "2",
        ]
    }
}

impl Drop for ModemSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn modem_pdus_decode_to_the_sent_texts() {
    let modem = ModemSim::start(&[]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    alice.ok(&modem.settings_args());
    let short = "Running late, start without me";
    for body in [short, LONG, CYRILLIC] {
        let (answer, code) = alice.send(&bob_number, body, &[]);
        assert_eq!(
            (answer["outcome"].as_str(), code),
            (Some("sent_as_sms"), 0),
            "{answer}"
        );
    }
    let messages = modem.messages();
    let expected: Vec<(String, String, usize)> = messages
        .iter()
        .zip([short, LONG, CYRILLIC])
        .map(|((_, _, parts), text)| (bob_number.clone(), text.to_string(), *parts))
        .collect();
    assert_eq!(messages, expected);
    assert!(messages[1].2 >= 2 && messages[2].2 >= 2, "{messages:?}");
    for pdu in modem.pdus() {
        // AT+CMGS=<n> counted the TPDU: the PDU without its one-octet SMSC part.
        let octets = pdu["hex"].as_str().unwrap_or_default().len() / 2;
        assert_eq!(pdu["length"].as_u64(), Some(octets as u64 - 1));
    }
}

#[test]
fn modem_errors_are_clear_route_results_and_nothing_is_lost_or_doubled() {
    // +CMS ERROR 42 (congestion): kept and retried; the retry goes through once. (`--wait 0`
    // returns after the first attempt, so the kept state is seen before any retry.)
    let modem = ModemSim::start(&["--cms-error", "1:42", "--cms-error", "3:1"]);
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    alice.ok(&modem.settings_args());
    let (answer, code) = alice.send(
        &bob_number,
        "congested",
        &["--route", "sms-only", "--wait", "0"],
    );
    assert_eq!(
        (code, answer["pending"].as_bool()),
        (5, Some(true)),
        "{answer}"
    );
    assert!(detail(&answer).contains("+CMS ERROR 42"), "{answer}");
    assert!(modem.pdus().is_empty());
    let events = alice.listen_until(|events| events.iter().any(|e| e["type"] == "routed"));
    assert!(
        events.iter().any(|e| e["outcome"] == "sent_as_sms"),
        "{events:?}"
    );
    assert_eq!(
        modem.messages(),
        [(bob_number.clone(), "congested".to_string(), 1)]
    );

    // +CMS ERROR 1 (unassigned number): refused for good.
    let (answer, code) = alice.send(&bob_number, "nobody there", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sms_rejected"), 3),
        "{answer}"
    );
    assert!(detail(&answer).contains("unassigned number"), "{answer}");

    // No modem at all: kept for later, with what to check.
    alice.ok(&["settings", "--sms-modem", "/dev/tidings-no-such-modem"]);
    let (answer, code) = alice.send(
        &bob_number,
        "no modem",
        &["--route", "sms-only", "--wait", "0"],
    );
    assert_eq!(code, 5, "{answer}");
    assert!(detail(&answer).contains("no modem at"), "{answer}");
}

#[test]
fn modem_that_stops_answering_is_not_sent_twice() {
    let modem = ModemSim::start(&["--silent-from", "1"]);
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    alice.ok(&modem.settings_args());
    let bob_number = number();
    let (answer, code) = alice.send(&bob_number, "maybe sent", &["--route", "sms-only"]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("sms_rejected"), 3),
        "{answer}"
    );
    assert!(
        detail(&answer).contains("may or may not have been sent"),
        "{answer}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(modem.pdus().len(), 1, "handed over once, never again");
}

#[test]
fn modem_sends_the_servers_codes() {
    let modem = ModemSim::start(&[]);
    let server = Server::start(&[
        "--sms-gateway",
        "modem",
        "--modem-port",
        &modem.port,
        "--modem-timeout-seconds",
        "5",
    ]);
    let n = number();
    let user = User::new(&n);
    user.ok(&["register", &n, "--server", &server.url]);
    assert!(
        eventually(patience(), || modem.messages().len() == 1),
        "{}",
        server.log()
    );
    let (to, text, _) = modem.messages().remove(0);
    assert_eq!(to, n);
    let code: String = text.chars().filter(char::is_ascii_digit).take(6).collect();
    user.ok(&["verify", &code]);
}
