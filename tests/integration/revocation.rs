//! Issue 28, item 1: a device removed from its number acts no more, even through something it
//! set going before its removal. Here: a link code it asked for before it was removed.

use std::io::{BufRead as _, BufReader};

use crate::support::{number, text, Server, User};

#[test]
fn a_link_code_of_a_device_removed_since_links_nothing() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    let laptop = alice.link_device(&server);
    let laptop_id = laptop.device_id();
    // The laptop asks for a link code, then is removed from the number before it is used.
    let mut waiting = laptop.spawn(&["--json", "link", "--wait", "30"]);
    let stdout = waiting.stdout.take().expect("stdout");
    let first = BufReader::new(stdout)
        .lines()
        .next()
        .expect("a line")
        .expect("read");
    let shown: serde_json::Value = serde_json::from_str(&first).expect("json");
    let code = shown["code"].as_str().expect("a link code").to_string();
    alice.ok(&["devices", "--remove", &laptop_id]);
    let _ = waiting.kill();
    let _ = waiting.wait();

    let intruder = User::new(&alice.number);
    let out = intruder.run(&["link", &alice.number, &code, "--server", &server.url]);
    assert!(
        !out.status.success(),
        "a code of a removed device linked a device: {}",
        text(&out.stdout)
    );
    let listed = alice.ok(&["--json", "devices"]);
    assert_eq!(listed.lines().count(), 1, "{listed}");
}
