//! The privacy audit (P3, P5): a scripted scenario through the real CLI — registrations, lookups
//! of users and of non-users, messages both ways (queued for an offline device and relayed to an
//! online one), a linked device, presence changes and an opt-out — and then a scan of everything
//! the server could keep or see: its data and key directories, its logs at debug level, and every
//! byte each client sent it, captured by a relay in front of the server (one per device). The scan
//! looks for every test number, of registrants and of non-users, in each of `leak_forms` (in clear
//! and as SHA-1 and SHA-256 digests in several encodings), and for every message text. One thing is
//! allowed: a registrant's own number in its own registration requests (code, verify, link), which
//! is how it proves the number. The report lists every finding, grouped by where it was found.

use std::collections::BTreeMap;

use prost::Message as _;
use tidings_proto::frame::Frame;

use crate::leaks::{leak_forms, text_forms, Needle, Needles};
use crate::support::{
    eventually, files_below, files_containing, number, patience, text, CapturingRelay, Server,
    User, PATIENCE,
};

/// One device of the scenario: its profile, and the relay through which it reaches the server.
struct Device {
    /// The name reports give the device.
    name: &'static str,
    /// The name of its account, whose number it may send in its registration requests.
    account: &'static str,
    user: User,
    relay: CapturingRelay,
}

impl Device {
    /// Registers `number` through a relay of its own, the code read from the outbox.
    fn register(server: &Server, name: &'static str, number: &str) -> Self {
        let relay = CapturingRelay::start(server);
        let user = User::register_via(number, server, &relay.url, &[]);
        Self {
            name,
            account: name,
            user,
            relay,
        }
    }

    /// Links a new device to this one's number, the new device behind a relay of its own.
    fn link(&self, server: &Server, name: &'static str) -> Self {
        let relay = CapturingRelay::start(server);
        let user = self.user.link_device_via(&relay.url);
        Self {
            name,
            account: self.account,
            user,
            relay,
        }
    }

    fn number(&self) -> &str {
        &self.user.number
    }
}

/// How reports name a number.
fn number_of(account: &str, number: &str) -> String {
    format!("the number of {account} ({number})")
}

/// The presence steps after the messages: each user changes who may see it online (a new mode
/// makes a new presence key, as a rotation does), then listens once so that its session tells the
/// server (`PresenceSet`), and a contact looks it up with the proof its token makes.
fn change_presence(alice: &Device, bob: &Device, dave: &Device) {
    alice.user.ok(&["settings", "--presence", "nobody"]);
    bob.user.ok(&["settings", "--presence", "contacts"]);
    dave.user.ok(&["settings", "--presence-rotate"]);
    for device in [alice, bob, dave] {
        device.user.ok(&["listen", "--timeout", "1"]);
    }
    alice.user.lookup(&[bob.number(), dave.number()]);
}

#[test]
fn p3_the_audit_finds_no_number_or_text_anywhere_but_a_registrants_own_registration() {
    let server = Server::start(&[]);
    let alice = Device::register(&server, "alice", &number());
    let bob = Device::register(&server, "bob", &number());
    let carol = Device::register(&server, "carol", &number());
    let dave = Device::register(&server, "dave", &number());
    let strangers = [number(), number()];
    let texts = [
        "queued for an offline bob 4c1d",
        "relayed to an online bob 9e27",
        "bob answers alice b38f",
        "to both of alice's devices 61aa",
        "from alice's second device d0c4",
    ];

    // Lookups of users and of non-users.
    let states = alice
        .user
        .lookup(&[bob.number(), carol.number(), &strangers[0]]);
    assert_eq!(states[0].1, "offline", "{states:?}");
    assert_eq!(states[2].1, "not_a_user", "{states:?}");
    dave.user.lookup(&[alice.number(), &strangers[1]]);

    // To a device that is offline: queued, then shown when it listens.
    let (answer, code) = alice.user.send(bob.number(), texts[0], &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    assert_eq!(bob.user.receive_texts(1, PATIENCE), [texts[0]]);

    // A presence change: bob shows himself online to everyone, so that carol, who never wrote to
    // him, sees him online (and gets a receipt).
    bob.user.ok(&["settings", "--presence", "everyone"]);
    // To a device that is online: relayed, with a delivery receipt.
    let until = (2 * PATIENCE).to_string();
    let listener = bob
        .user
        .spawn(&["--json", "listen", "--count", "1", "--timeout", &until]);
    assert!(eventually(patience(), || carol
        .user
        .lookup(&[bob.number()])[0]
        .1
        == "online"));
    let wait = PATIENCE.to_string();
    let (answer, code) = carol.user.send(bob.number(), texts[1], &["--wait", &wait]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["receipt"], "delivered", "{answer}");
    let shown = listener.wait_with_output().expect("listener");
    assert!(text(&shown.stdout).contains(texts[1]), "{shown:?}");

    // The other way.
    let (answer, code) = bob.user.send(alice.number(), texts[2], &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    assert_eq!(alice.user.receive_texts(1, PATIENCE), [texts[2]]);

    // A linked device: bob's next message goes to both of alice's devices (his client learns of
    // the new one and claims its keys), and what the new device writes goes to alice's first too.
    let alice_second = alice.link(&server, "alice's second device");
    let (answer, code) = bob.user.send(alice.number(), texts[3], &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    assert_eq!(alice.user.receive_texts(1, PATIENCE), [texts[3]]);
    assert_eq!(alice_second.user.receive_texts(1, PATIENCE), [texts[3]]);
    // Listing one's devices.
    let alice_device = tidings_proto::id::from_text(&alice.user.device_id()).expect("device id");
    let (answer, code) = alice_second.user.send(dave.number(), texts[4], &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("queued"), 0));
    assert_eq!(dave.user.receive_texts(1, PATIENCE), [texts[4]]);

    change_presence(&alice, &bob, &dave);

    // An opt-out: carol's number is then a non-user's, and looked up as one.
    carol.user.ok(&["disable"]);
    assert_eq!(
        dave.user.lookup(&[carol.number()])[0].1,
        "not_a_user",
        "after the opt-out"
    );

    let devices = [&alice, &bob, &carol, &dave, &alice_second];
    assert!(
        eventually(patience(), || devices.iter().all(|d| d.relay.all_closed())),
        "a client connection is still open after its command ended"
    );
    let mut needles = Needles::default();
    for device in devices.iter().filter(|d| d.name == d.account) {
        needles.add(
            &number_of(device.account, device.number()),
            leak_forms(device.number()),
        );
    }
    for (n, stranger) in strangers.iter().enumerate() {
        needles.add(
            &number_of(&format!("non-user {}", n + 1), stranger),
            leak_forms(stranger),
        );
    }
    for message in texts {
        needles.add(
            &format!("the message text {message:?}"),
            text_forms(message),
        );
    }

    // The scan of the data directory is not blind: it finds what the server does store (on
    // PostgreSQL, in PostgreSQL's files).
    let stored = server.stored_dirs();
    assert!(
        stored
            .iter()
            .any(|dir| !files_containing(dir, &alice_device).is_empty()),
        "the scan of the data directory is blind"
    );
    let mut audit = Audit::default();
    let mut places = vec![
        ("server data directory", server.data_dir()),
        ("server key directory", server.key_file().with_file_name("")),
    ];
    for postgres in stored.iter().skip(1) {
        places.push((
            "PostgreSQL's files (the database, WAL, catalogs)",
            postgres.clone(),
        ));
    }
    for (place, dir) in places {
        for file in files_below(&dir) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            audit.scanned(place, "files", bytes.len());
            let name = file.strip_prefix(&dir).unwrap_or(&file).display();
            audit.found(place, &name.to_string(), needles.found_in(&bytes));
        }
    }
    let log = server.log();
    assert!(
        log.contains("DEBUG"),
        "the server does not log at debug level:\n{log}"
    );
    let place = "server logs (debug level)";
    for (name, file) in [
        ("stderr", server.log_file()),
        ("stdout", server.stdout_file()),
    ] {
        let content = std::fs::read_to_string(&file).unwrap_or_default();
        audit.scanned(place, "files", content.len());
        for (n, line) in content.lines().enumerate() {
            let carrier = format!("{name} line {}: {}", n + 1, clip(line));
            audit.found(place, &carrier, needles.found_in(line.as_bytes()));
        }
    }
    let mut own_number_seen = Vec::new();
    for device in devices {
        let own = number_of(device.account, device.number());
        for (index, connection) in device.relay.connections().iter().enumerate() {
            let bytes = &connection.bytes;
            let first_line = text(bytes.split(|b| *b == b'\r').next().unwrap_or_default());
            let name = format!("{} connection {}", device.name, index + 1);
            if first_line.starts_with("POST /v1/registration/") {
                let place = "registration requests";
                audit.scanned(place, "connections", bytes.len());
                let found = needles.found_in(bytes);
                if found.iter().any(|n| n.what == own) {
                    own_number_seen.push(device.name);
                }
                let found = found.into_iter().filter(|n| n.what != own).collect();
                audit.found(place, &format!("{name} ({first_line})"), found);
            } else if first_line.starts_with("GET /v1/connect ") {
                let place = "sessions";
                audit.scanned(place, "connections", bytes.len());
                for (carrier, bytes) in frames(bytes) {
                    // Its own number is allowed only in a registration request, not here.
                    audit.found(
                        place,
                        &format!("{name}: {carrier}"),
                        needles.found_in(bytes),
                    );
                }
            } else {
                let place = "other requests";
                audit.scanned(place, "connections", bytes.len());
                audit.found(
                    place,
                    &format!("{name} ({first_line})"),
                    needles.found_in(bytes),
                );
            }
        }
    }
    // The capture is not blind: every device sent its own number to register or link.
    own_number_seen.dedup();
    assert_eq!(
        own_number_seen,
        devices.iter().map(|d| d.name).collect::<Vec<_>>(),
        "a registration request without its own number: the capture or the search is blind"
    );
    let report = audit.report(needles.len());
    eprintln!("{report}");
    assert!(audit.clean(), "{report}");
}

/// A session's capture cut into what it carried: the upgrade request, then each frame by its
/// kind (and, if the rest does not decode as frames, that rest).
fn frames(bytes: &[u8]) -> Vec<(String, &[u8])> {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(bytes.len(), |at| at + 4);
    let (head, mut rest) = bytes.split_at(head_end);
    let mut carriers = vec![("the upgrade request".to_string(), head)];
    while !rest.is_empty() {
        let whole = match tidings_proto::codec::needed(rest) {
            Ok(Some(whole)) if whole <= rest.len() => whole,
            _ => {
                carriers.push(("bytes that are not a whole frame".to_string(), rest));
                break;
            }
        };
        let kind = match Frame::decode(&rest[4..whole]) {
            Ok(Frame { kind: Some(kind) }) => {
                // `Lookup(Lookup { .. })`, `Devices(DevicesRequest { .. })`: the variant, and
                // the message it holds where that is named otherwise.
                let debug = format!("{kind:?}");
                let mut names = debug.split(['(', ' ', '{', ')']).filter(|s| !s.is_empty());
                let variant = names.next().unwrap_or_default();
                match names.next() {
                    Some(message) if message != variant => format!("{variant} ({message}) frame"),
                    _ => format!("{variant} frame"),
                }
            }
            Ok(Frame { kind: None }) => "a frame of an unknown kind".to_string(),
            Err(_) => "a frame that does not decode".to_string(),
        };
        carriers.push((kind, &rest[..whole]));
        rest = &rest[whole..];
    }
    carriers
}

/// At most 160 characters of a log line, for a report.
fn clip(line: &str) -> String {
    let clipped: String = line.chars().take(160).collect();
    if clipped.len() < line.len() {
        format!("{clipped}…")
    } else {
        clipped
    }
}

/// What the audit scanned and found, by place (the data directory, the logs, the registration
/// requests, the sessions), in the order the places were first named.
#[derive(Debug, Default)]
struct Audit {
    places: Vec<&'static str>,
    /// For each place: what it counts (files, connections), how many and how many bytes.
    scanned: BTreeMap<&'static str, (&'static str, usize, usize)>,
    /// For each place: (what carried it, what was found) with the forms it was found in.
    found: BTreeMap<&'static str, BTreeMap<(String, String), Vec<String>>>,
}

impl Audit {
    fn place(&mut self, place: &'static str) {
        if !self.places.contains(&place) {
            self.places.push(place);
        }
    }

    fn scanned(&mut self, place: &'static str, unit: &'static str, bytes: usize) {
        self.place(place);
        let (_, count, total) = self.scanned.entry(place).or_insert((unit, 0, 0));
        *count += 1;
        *total += bytes;
    }

    fn found(&mut self, place: &'static str, carrier: &str, needles: Vec<&Needle>) {
        self.place(place);
        for needle in needles {
            let forms = self
                .found
                .entry(place)
                .or_default()
                .entry((carrier.to_string(), needle.what.clone()))
                .or_default();
            if !forms.contains(&needle.form) {
                forms.push(needle.form.clone());
            }
        }
    }

    fn clean(&self) -> bool {
        self.found.values().all(BTreeMap::is_empty)
    }

    /// Every place with what was scanned there and every finding, or "clean".
    fn report(&self, needles: usize) -> String {
        let total: usize = self.found.values().map(BTreeMap::len).sum();
        let mut report = format!(
            "privacy audit: {total} findings, searching for {needles} forms of the test numbers \
             and message texts (allowed: a registrant's own number in its own registration \
             requests)\n"
        );
        for place in &self.places {
            let scanned = self
                .scanned
                .get(place)
                .map_or("nothing".to_string(), |(unit, count, bytes)| {
                    format!("{count} {unit}, {bytes} bytes")
                });
            let found = self.found.get(place).cloned().unwrap_or_default();
            if found.is_empty() {
                report += &format!("{place}: clean ({scanned})\n");
                continue;
            }
            report += &format!("{place}: {} findings ({scanned})\n", found.len());
            for ((carrier, what), forms) in found {
                report += &format!("  {carrier}: {what}, as {}\n", forms.join("; "));
            }
        }
        report
    }
}
