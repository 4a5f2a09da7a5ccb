//! Issue 28, item 3: the login key (`device.key`) is sealed under the profile's passphrase like
//! everything else the profile keeps, and one kept in clear by an earlier version is sealed in
//! place, keeping the registration. Through the real server and the real CLI.

use sha2::Digest as _;

use crate::support::{embedded_only, files_containing, number, text, Server, TempDir, User};

#[test]
fn the_login_key_is_sealed_under_the_passphrase_and_one_in_clear_is_sealed_in_place() {
    if embedded_only("it finds the login key's public half in the embedded engine's files") {
        return;
    }
    let server = Server::start(&[]);
    let n = number();
    let user = User::new(&n);
    // An earlier version made the login key at `register` and kept its 32 bytes in clear.
    let secret: [u8; 32] = sha2::Sha256::digest(format!("login key of {n}")).into();
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
    std::fs::create_dir_all(user.profile.path()).expect("profile dir");
    std::fs::write(user.profile.path().join("device.key"), secret).expect("write key");

    user.ok(&["register", &n, "--server", &server.url]);
    let code = server.code_for(&n);
    user.ok(&["verify", &code]);
    user.ok(&["--json", "devices"]);

    // The key was kept (the server knows its public half), not replaced...
    let public = key.verifying_key().to_bytes();
    assert!(
        !files_containing(&server.data_dir(), &public).is_empty(),
        "the server does not know the login key the profile had"
    );
    // ...and no file of the profile holds it in clear any more.
    let found = files_containing(user.profile.path(), &secret);
    assert!(found.is_empty(), "the login key in clear in {found:?}");

    // A wrong passphrase opens nothing, not even a session, and says so.
    let wrong = TempDir::new("wrong-passphrase");
    let wrong_file = wrong.path().join("passphrase");
    std::fs::write(&wrong_file, "not the passphrase\n").expect("write");
    let wrong_file = wrong_file.to_string_lossy().into_owned();
    for args in [
        vec!["--json", "devices"],
        vec!["--json", "lookup", &n],
        vec!["--json", "fingerprint", &n],
    ] {
        let mut all = vec!["--passphrase-file", wrong_file.as_str()];
        all.extend_from_slice(&args);
        let out = user.run(&all);
        let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !out.status.success(),
            "{args:?} ran with a wrong passphrase: {said}"
        );
        assert!(said.contains("wrong passphrase"), "{args:?}: {said}");
    }
}
