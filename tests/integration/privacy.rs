//! The privacy promises, each checked where it could break: P1 (nothing before opt-in), P3 (no
//! number at the server), P4 (lookups write nothing), P5 (content only ever as ciphertext, gone
//! once delivered), P6 (opt-out deletes everything).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::leaks::{assert_absent, leak_forms};
use crate::support::{
    embedded_only, eventually, files_containing, marker_comes_first, number, patience, text,
    Server, User, PATIENCE,
};

#[test]
fn p1_an_unregistered_profile_opens_no_connection() {
    let which = std::process::Command::new("strace").arg("-V").output();
    assert!(
        which.is_ok_and(|o| o.status.success()),
        "strace is needed for this test: apt-get install strace (the test command installs it)"
    );
    let user = User::new(&number());
    let stranger = number();
    for args in [
        vec!["send", stranger.as_str(), "hello"],
        vec!["lookup", stranger.as_str()],
        vec!["listen", "--timeout", "1"],
        vec!["disable"],
        vec!["verify", "123456"],
        vec!["status"],
    ] {
        let trace = user.profile.path().join("strace.out");
        let out = std::process::Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-e",
                "trace=socket,connect,sendto,sendmsg",
                "-o",
            ])
            .arg(&trace)
            .arg(crate::support::BIN)
            .arg("--profile")
            .arg(user.profile.path())
            .args(&args)
            .output()
            .expect("strace");
        let calls = std::fs::read_to_string(&trace).unwrap_or_default();
        let network: Vec<&str> = calls
            .lines()
            .filter(|l| l.contains("AF_INET") || l.contains("connect(") || l.contains("sendto("))
            .collect();
        assert!(
            network.is_empty(),
            "{args:?} touched the network before opt-in: {network:?}"
        );
        if args[0] != "status" {
            assert_eq!(
                out.status.code(),
                Some(4),
                "{args:?}: {}",
                text(&out.stderr)
            );
            assert!(
                text(&out.stderr).contains("not registered"),
                "{}",
                text(&out.stderr)
            );
        }
    }
}

/// The files below any of `dirs` that hold `needle`.
fn found_in(dirs: &[PathBuf], needle: &[u8]) -> Vec<PathBuf> {
    dirs.iter()
        .flat_map(|dir| files_containing(dir, needle))
        .collect()
}

#[test]
fn p3_p5_no_number_or_delivered_content_in_data_files_or_logs() {
    let server = Server::start(&[]);
    // On PostgreSQL, its data directory and WAL as well as the server's own directory.
    let dirs = server.stored_dirs();
    let found = |needle: &[u8]| found_in(&dirs, needle);
    let (alice_number, bob_number, stranger) = (number(), number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    alice.lookup(&[&bob_number, &stranger]);
    let secret = "the eagle lands at midnight 7f3a";
    // The same known plaintext, many times: end-to-end encryption must never let it (or the
    // sender's number inside it) reach the server's files, even while queued.
    for _ in 0..12 {
        let (answer, _) = alice.send(&bob_number, secret, &[]);
        assert_eq!(answer["outcome"], "queued");
    }
    // The scan is not blind: it finds what the server does store, such as the device id.
    let alice_device = tidings_proto::id::from_text(&alice.device_id()).expect("device id");
    assert!(!found(&alice_device).is_empty(), "the scan is blind");
    for dir in &dirs {
        assert_absent(dir, secret.as_bytes(), "queued plaintext");
    }
    assert_eq!(bob.receive(12, PATIENCE).len(), 12);
    for dir in &dirs {
        assert_absent(dir, secret.as_bytes(), "delivered plaintext");
    }
    // Within the scrub interval (200 ms here) the delivered copies are gone from every file.
    assert!(
        eventually(patience(), || found(secret.as_bytes()).is_empty()),
        "delivered content still in {:?}",
        found(secret.as_bytes())
    );
    for n in [&alice_number, &bob_number, &stranger] {
        for (_, form) in leak_forms(n) {
            for dir in &dirs {
                assert_absent(dir, &form, "a number");
            }
            assert!(
                !server
                    .log()
                    .as_bytes()
                    .windows(form.len())
                    .any(|w| w == form.as_slice()),
                "a number in the log"
            );
        }
    }
    assert!(!server.log().contains(secret), "message text in the log");
}

/// P5 for what a device is sent while it is away, on both engines: the copy's bytes as its
/// sender made them (Olm ciphertext to everyone but its device) leave the server's files once it
/// is delivered. SQLite zeroes the deleted row and truncates its WAL at the scrub; PostgreSQL
/// keeps deleted rows' bytes in its tables and WAL, so there the copy is stored only sealed under
/// the deployment's key chain, whose hourly keys are forgotten (docs/ARCHITECTURE.md, Deleted
/// bytes on PostgreSQL): the bytes as sent never reach its files at all.
#[test]
fn p5_a_delivered_copy_leaves_no_bytes_as_sent_in_the_files() {
    use tidings_proto::frame::{self, Kind};
    let server = Server::start(&[]);
    let dirs = server.stored_dirs();
    let found = |needle: &[u8]| found_in(&dirs, needle);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let bob_device = tidings_proto::id::from_text(&bob.device_id()).expect("device id");
    // What the copy's bytes are to the server: opaque. A marker no file holds by chance.
    let marker = format!("copy-as-sent {}", crate::support::number());
    let payload: Vec<u8> = marker.bytes().cycle().take(600).collect();
    let id = vec![0x5e; 16];
    crate::support::block_on(async {
        let client = alice.client();
        let mut session = client.session(false).await.expect("session");
        let to_account = crate::support::account_of(&client, &mut session, &bob_number).await;
        session
            .send(Kind::Send(frame::Send {
                id: id.clone(),
                to_account,
                mode: frame::SendMode::Queue as i32,
                copies: vec![frame::Copy {
                    device_id: bob_device.clone(),
                    payload: payload.clone().into(),
                }],
                ..frame::Send::default()
            }))
            .await
            .expect("send");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(PATIENCE);
        loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => {
                    assert_eq!(result.outcome, frame::SendOutcome::Queued as i32);
                    break;
                }
                Some(_) => {}
                None => panic!("the send was not answered"),
            }
        }
    });
    // The scan is not blind: it finds what the server does store, such as the device id.
    assert!(!found(&bob_device).is_empty(), "the scan is blind");
    if crate::support::on_postgres() {
        assert!(
            found(marker.as_bytes()).is_empty(),
            "a waiting copy's bytes as sent are in {:?}",
            found(marker.as_bytes())
        );
    }
    crate::support::block_on(async {
        let client = bob.client();
        let mut session = client.session(true).await.expect("session");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(PATIENCE);
        loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::Deliver(deliver)) if deliver.id == id => {
                    assert_eq!(&deliver.payload[..], &payload[..], "the copy as sent");
                    session
                        .send(Kind::Ack(frame::Ack {
                            sender_device: deliver.sender_device,
                            id: deliver.id,
                            ..frame::Ack::default()
                        }))
                        .await
                        .expect("ack");
                    break;
                }
                Some(_) => {}
                None => panic!("the copy was not delivered"),
            }
        }
        // The acknowledgement is taken before the session ends.
        let _ = session
            .recv(tokio::time::Instant::now() + Duration::from_millis(500))
            .await;
    });
    // Within the scrub interval (200 ms here) no file holds the copy as sent.
    assert!(
        eventually(patience(), || found(marker.as_bytes()).is_empty()),
        "a delivered copy's bytes as sent are still in {:?}",
        found(marker.as_bytes())
    );
}

#[test]
fn p4_lookups_write_nothing() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    User::register(&bob_number, &server, &[]);
    std::thread::sleep(Duration::from_millis(600));
    let snapshot = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
            .expect("data dir")
            .flatten()
            .map(|e| {
                (
                    e.file_name().to_string_lossy().into_owned(),
                    std::fs::read(e.path()).unwrap_or_default(),
                )
            })
            .filter(|(name, _)| !name.ends_with("-shm"))
            .collect();
        files.sort();
        files
    };
    let trace_before = std::fs::read_to_string(server.sync_trace()).unwrap_or_default();
    let before = snapshot(&server.data_dir());
    let many: Vec<String> = (0..50).map(|_| number()).collect();
    let mut numbers: Vec<&str> = many.iter().map(String::as_str).collect();
    numbers.push(&bob_number);
    for _ in 0..3 {
        alice.lookup(&numbers);
    }
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        before,
        snapshot(&server.data_dir()),
        "a lookup changed the data files"
    );
    assert_eq!(
        trace_before,
        std::fs::read_to_string(server.sync_trace()).unwrap_or_default(),
        "a lookup wrote"
    );
}

#[test]
fn p6_disable_deletes_everything_and_the_number_looks_unused() {
    if embedded_only("it looks for a deleted account's pseudonym in the data files, which PostgreSQL keeps in its tables and WAL without a bound (docs/ARCHITECTURE.md, Deleted bytes on PostgreSQL)") {
        return;
    }
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let marker = "queued for alice before she left 91c2";
    let (answer, _) = bob.send(&alice_number, marker, &[]);
    assert_eq!(answer["outcome"], "queued");
    let outbound = "sent by alice, never delivered 5d1e";
    let (answer, _) = alice.send(&bob_number, outbound, &[]);
    assert_eq!(answer["outcome"], "queued");

    let keys =
        tidings_server::keys::ServerKeys::load_or_create(&server.key_file()).expect("server keys");
    let pseudonym = keys
        .pseudonym(&tidings_proto::number::E164::parse(&alice_number).expect("number"))
        .expect("pseudonym");
    assert!(
        !files_containing(&server.data_dir(), &pseudonym.0).is_empty(),
        "the scan cannot see the pseudonym"
    );

    alice.ok(&["disable"]);
    assert_eq!(bob.lookup(&[&alice_number])[0].1, "not_a_user");
    let (answer, code) = bob.send(&alice_number, "anyone there?", &[]);
    assert_eq!((answer["outcome"].as_str(), code), (Some("not_a_user"), 3));
    // Locally the profile forgot its registration: nothing is sent anywhere any more.
    assert_eq!(alice.run(&["lookup", &bob_number]).status.code(), Some(4));
    // Her undelivered outbound message is gone too: a message queued for Bob after it comes
    // first.
    let carol = User::register(&number(), &server, &[]);
    marker_comes_first(&carol, &bob, "after alice left");
    assert!(
        eventually(patience(), || {
            files_containing(&server.data_dir(), &pseudonym.0).is_empty()
                && files_containing(&server.data_dir(), marker.as_bytes()).is_empty()
                && files_containing(&server.data_dir(), outbound.as_bytes()).is_empty()
        }),
        "something of the disabled account is still in the data files"
    );
}

/// The columns of `table` but `ignored`, quoted, for the rows `condition` (with one parameter,
/// `value`) selects, in the order of `seq`.
fn rows_but(
    database: &rusqlite::Connection,
    table: &str,
    ignored: &[&str],
    condition: &str,
    value: Vec<u8>,
) -> Vec<Vec<String>> {
    let columns: Vec<String> = database
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
        .expect("columns")
        .query_map([], |row| row.get(0))
        .expect("columns")
        .collect::<rusqlite::Result<_>>()
        .expect("columns");
    let mut kept: Vec<String> = columns
        .iter()
        .filter(|c| !ignored.contains(&c.as_str()))
        .map(|c| format!("quote({c})"))
        .collect();
    if kept.is_empty() {
        kept.push("'none'".into());
    }
    let sql = format!(
        "SELECT {} FROM {table} WHERE {condition} ORDER BY seq",
        kept.join(", ")
    );
    let mut statement = database.prepare(&sql).expect("select");
    let rows = statement
        .query_map([value], |row| {
            (0..kept.len()).map(|i| row.get::<_, String>(i)).collect()
        })
        .expect("rows")
        .collect::<rusqlite::Result<Vec<Vec<String>>>>()
        .expect("rows");
    rows
}

/// Issue 28, contact tokens: who is a stranger to whom is never on disk. A contact's message
/// and a stranger's wait in one queue; the database names no stranger (no column, no index),
/// and their rows differ only in ids, payloads and times.
#[test]
fn who_is_a_stranger_is_never_on_disk() {
    if embedded_only("it reads the embedded engine's schema and rows") {
        return;
    }
    let server = Server::start(&[]);
    let (victim_number, carol_number) = (number(), number());
    let victim = User::register(&victim_number, &server, &[]);
    let carol = User::register(&carol_number, &server, &[]);
    let stranger = User::register(&number(), &server, &[]);
    // The victim writes to Carol first: Carol now holds its contact token.
    let (answer, _) = victim.send(&carol_number, "write back any time", &[]);
    assert_eq!(answer["outcome"], "queued", "{answer}");
    assert_eq!(carol.receive_texts(1, PATIENCE), ["write back any time"]);
    for (sender, text) in [(&carol, "from a contact"), (&stranger, "from a stranger")] {
        let (answer, _) = sender.send(&victim_number, text, &["--ttl", "3600"]);
        assert_eq!(answer["outcome"], "queued", "{answer}");
    }
    let database = rusqlite::Connection::open_with_flags(
        server.data_dir().join(tidings_store::sqlite::DATABASE_FILE),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the server's database");
    let schema: Vec<String> = database
        .prepare("SELECT IFNULL(sql, name) FROM sqlite_master")
        .expect("schema")
        .query_map([], |row| row.get(0))
        .expect("schema")
        .collect::<rusqlite::Result<_>>()
        .expect("schema");
    for sql in &schema {
        assert!(
            !sql.to_lowercase().contains("stranger"),
            "the schema names strangers: {sql}"
        );
    }
    let victim_device = victim.client().device();
    let mut copies = rows_but(
        &database,
        "copies",
        &["device_id", "seq", "payload"],
        "device_id = ?1",
        victim_device.as_bytes().to_vec(),
    );
    // A message with one copy is one row of `single_copies`: its copy's columns and its message's.
    copies.extend(rows_but(
        &database,
        "single_copies",
        &[
            "device_id",
            "seq",
            "sender_device",
            "msg_id",
            "sent_at",
            "expires_at",
            "sender_account",
            "payload",
        ],
        "device_id = ?1",
        victim_device.as_bytes().to_vec(),
    ));
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert_eq!(
        copies[0], copies[1],
        "a stranger's copy differs from a contact's"
    );
    let messages = rows_but(
        &database,
        "messages",
        &[
            "seq",
            "sender_device",
            "msg_id",
            "sent_at",
            "expires_at",
            "sender_account",
            "payload",
        ],
        "receiver_account = (SELECT account_id FROM devices WHERE id = ?1)",
        victim_device.as_bytes().to_vec(),
    );
    // Rows of `messages` only for messages with several copies.
    assert!(
        messages.windows(2).all(|pair| pair[0] == pair[1]),
        "a stranger's message differs from a contact's: {messages:?}"
    );
}
