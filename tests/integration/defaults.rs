//! Defaults an operator or a sender can trip on (issue 28, items 9 and 10): the `outbox` gateway's
//! files, configuration values that would disable a limit, a listener without TLS on a public
//! address, and a message's time to live.

use std::os::unix::fs::PermissionsExt as _;

use crate::support::{number, Server, User};

/// The permission bits of a file or directory.
fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `outbox` gateway holds numbers and codes: only the server's user may read them, and the
/// server says at start that it is for testing.
#[test]
fn the_outbox_is_private_and_the_server_says_it_is_for_testing() {
    let server = Server::start(&[]);
    let n = number();
    User::register(&n, &server, &[]);
    let outbox = server.outbox();
    assert_eq!(
        mode(&outbox),
        0o700,
        "outbox directory {}",
        outbox.display()
    );
    let files: Vec<_> = std::fs::read_dir(&outbox)
        .expect("outbox")
        .map(|entry| entry.expect("entry").path())
        .collect();
    assert!(!files.is_empty(), "no SMS in the outbox");
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
    let log = server.log();
    assert!(
        log.contains("outbox SMS gateway is for testing only"),
        "no warning about the outbox gateway in the log:\n{log}"
    );
}
