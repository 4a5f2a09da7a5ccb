//! Issue 31: one server node on the PostgreSQL engine (`--store postgres://...`). The flows of
//! `messaging.rs` and `privacy.rs` run over it, across a restart; a database that cannot be
//! reached stops the start with an error that names it without its password.
//!
//! Each test gets a fresh database in the PostgreSQL server named by `TIDINGS_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/test`), dropped afterwards. Like the store's
//! PostgreSQL tests, these fail when PostgreSQL is absent (README.md, Tests).

use std::process::{Command, Stdio};

use crate::support::{
    eventually, free_port, number, patience, text, wait_output, Server, TempDatabase, TempDir,
    User, BIN, PATIENCE,
};

#[test]
fn two_users_talk_online_and_offline_across_a_restart_and_opt_out_on_postgres() {
    let database = TempDatabase::create();
    let mut server = Server::start(&["--store", &database.url]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    // The accounts are in PostgreSQL, and no SQLite database was made beside it.
    assert_eq!(database.count("accounts"), 2);
    assert!(
        !server
            .data_dir()
            .join(tidings_store::sqlite::DATABASE_FILE)
            .exists(),
        "a SQLite database in the data directory"
    );

    assert_eq!(
        alice.lookup(&[&bob_number]),
        [(bob_number.clone(), "offline".to_string())]
    );
    assert_eq!(
        bob.lookup(&[&alice_number]),
        [(alice_number.clone(), "offline".to_string())]
    );

    // Online: delivered at once, with its receipt.
    bob.ok(&["settings", "--presence", "everyone"]);
    let until = (2 * PATIENCE).to_string();
    let listener = bob.spawn(&["--json", "listen", "--count", "1", "--timeout", &until]);
    assert!(eventually(patience(), || alice.lookup(&[&bob_number])[0].1 == "online"));
    let (answer, code) = alice.send(&bob_number, "hello bob", &["--wait", &PATIENCE.to_string()]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(answer["outcome"], "accepted", "{answer}");
    assert_eq!(answer["receipt"], "delivered", "{answer}");
    let out = listener.wait_with_output().expect("listener");
    let first: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().next().expect("a message")).expect("json");
    assert_eq!(first["text"], "hello bob");
    assert_eq!(first["from"], alice_number.as_str());

    // Offline both ways: queued in PostgreSQL, then the server is killed and started again.
    let (answer, code) = alice.send(&bob_number, "kept for later", &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    let (answer, code) = bob.send(&alice_number, "and a reply", &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("queued"), 0),
        "{answer}"
    );
    assert_eq!(database.count("copies"), 2);
    server.restart();
    assert_eq!(bob.receive_texts(1, PATIENCE), ["kept for later"]);
    assert_eq!(alice.receive_texts(1, PATIENCE), ["and a reply"]);
    assert!(eventually(patience(), || database.count("copies") == 0));

    // Opting out deletes the account: a lookup then says not a user.
    alice.ok(&["disable"]);
    assert_eq!(bob.lookup(&[&alice_number])[0].1, "not_a_user");
    assert_eq!(database.count("accounts"), 1);
    let (answer, code) = bob.send(&alice_number, "anyone there?", &[]);
    assert_eq!(
        (answer["outcome"].as_str(), code),
        (Some("not_a_user"), 3),
        "{answer}"
    );

    // Even at `--log debug` (as test servers run), the driver logs no statement's parameters:
    // they hold pseudonyms, keys, code hashes and payloads.
    let log = server.log();
    assert!(
        !log.contains("with parameters"),
        "the server's log shows statement parameters:\n{}",
        log.lines()
            .filter(|line| line.contains("with parameters"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    for number in [&alice_number, &bob_number] {
        assert!(
            !log.contains(number.as_str()),
            "a number in the server's log"
        );
    }
    // A graceful stop ends with a scrub, a VACUUM here, and exits 0.
    assert!(server.sigterm(), "{}", server.log());
}

/// One way of giving the server a setting: adds it to the command, with a directory for files.
type GiveSetting<'a> = &'a dyn Fn(&mut Command, &TempDir);

#[test]
fn an_unreachable_postgres_store_stops_the_start_with_a_clear_error_and_no_password() {
    // Nothing listens on a free port: the connection is refused.
    let port = free_port();
    let url = format!("postgres://tidings:hunter2-secret@127.0.0.1:{port}/tidings");
    let shown = format!("postgres://tidings:***@127.0.0.1:{port}/tidings");
    // The setting given as a flag, as an environment variable and in the config file.
    let given: [GiveSetting; 3] = [
        &|command, _| {
            command.args(["--store", &url]);
        },
        &|command, _| {
            command.env("TIDINGS_STORE", &url);
        },
        &|command, dir| {
            let file = dir.path().join("server.toml");
            std::fs::write(&file, format!("store = \"{url}\"\n")).expect("config file");
            command.env("TIDINGS_CONFIG", &file);
        },
    ];
    for give in given {
        let dir = TempDir::new("unreachable-postgres");
        let mut command = Command::new(BIN);
        command
            .args(["server", "--listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--key-file")
            .arg(dir.path().join("keys/server.key"))
            .arg("--outbox-dir")
            .arg(dir.path().join("outbox"))
            .args(["--log", "debug"])
            .env_remove("TIDINGS_CONFIG")
            .env_remove("TIDINGS_STORE")
            .env("TIDINGS_METRICS_LISTEN", "off")
            .env("HOME", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        give(&mut command, &dir);
        let mut child = command.spawn().expect("start tidings server");
        let output = wait_output(&mut child, patience());
        let status = child.wait().expect("exit status");
        assert!(!status.success(), "{output}");
        // 101 is a panic's exit code.
        assert_eq!(status.code(), Some(1), "{output}");
        assert!(
            output.contains(&format!("cannot open the PostgreSQL store at {shown}")),
            "{output}"
        );
        assert!(!output.contains("hunter2"), "{output}");
        assert!(!output.contains("panicked"), "{output}");
        assert!(!output.contains("listening on"), "{output}");
    }
}
