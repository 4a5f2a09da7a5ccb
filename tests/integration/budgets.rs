//! Issue 28, item 6: budgets belong to the account, not to the device. A device is free to make
//! (link one, use it, remove it), and an opt-out is free too, so neither may bring fresh lookup
//! budgets; and an account links only a few devices a day.

use std::time::Duration;

use tidings_proto::frame::{self, Kind};
use tokio::time::Instant;

use crate::support::{account_of, block_on, number, text, Server, User};

/// The lookup budget of these tests: small, and regained so slowly that no test sees a refill.
const BURST: usize = 4;
const SERVER_FLAGS: [&str; 4] = ["--lookup-burst", "4", "--lookup-per-hour", "1"];
/// A lookup of a number not asked before costs two from the budget: the evaluation of the
/// blinded number and the lookup itself.
const LOOKUPS: usize = BURST / 2;

/// Looks up one number at a time on `user`'s device until the server refuses for the budget;
/// how many lookups it granted (at most `BURST + 1`, which is already one too many).
fn lookups_granted(user: &User) -> usize {
    for granted in 0..=BURST {
        let out = user.run(&["--json", "lookup", &number()]);
        if !out.status.success() {
            // With `--json` the error is a JSON line on stdout.
            let complaint = text(&out.stdout) + &text(&out.stderr);
            assert!(
                complaint.contains("budget"),
                "refused for another reason: {complaint}"
            );
            return granted;
        }
    }
    BURST + 1
}

/// The device id in a user's profile, read without the server (listing devices draws from the
/// lookup budget).
fn own_device_id(user: &User) -> String {
    tidings_client::profile::Profile::at(user.profile.path())
        .load()
        .expect("profile")
        .and_then(|data| data.device_id)
        .expect("a registered device")
}

#[test]
fn a_linked_device_draws_from_its_accounts_lookup_budget() {
    let server = Server::start(&SERVER_FLAGS);
    let alice = User::register(&number(), &server, &[]);
    let mut granted = 0;
    for round in 0..3 {
        let laptop = alice.link_device(&server);
        let laptop_id = own_device_id(&laptop);
        granted += lookups_granted(&laptop);
        assert!(
            granted <= LOOKUPS,
            "round {round}: link, use and remove brought a fresh budget ({granted} lookups granted with a budget of {LOOKUPS})"
        );
        alice.ok(&["devices", "--remove", &laptop_id]);
    }
    // The first device shares the same, spent budget.
    assert_eq!(lookups_granted(&alice), 0);
}

#[test]
fn an_opt_out_and_a_new_registration_bring_no_fresh_lookup_budget() {
    let server = Server::start(&SERVER_FLAGS);
    let alice_number = number();
    let mut alice = User::register(&alice_number, &server, &[]);
    let mut granted = 0;
    for round in 0..3 {
        granted += lookups_granted(&alice);
        assert!(
            granted <= LOOKUPS,
            "round {round}: an opt-out and a new registration brought a fresh budget ({granted} lookups granted with a budget of {LOOKUPS})"
        );
        alice.ok(&["disable"]);
        alice = User::register(&alice_number, &server, &[]);
    }
}

#[test]
fn an_account_links_at_most_five_devices_a_day() {
    let server = Server::start(&[]);
    let alice = User::register(&number(), &server, &[]);
    for _ in 0..5 {
        let laptop = alice.link_device(&server);
        alice.ok(&["devices", "--remove", &laptop.device_id()]);
    }
    // The sixth is refused when its code is asked for, with the reason and when to try again:
    // the first of the five links leaves the day's window in a little under 24 hours.
    let out = alice.run(&["link", "--wait", "5"]);
    let complaint = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        complaint.contains("linked to a number a day")
            && (complaint.contains("try again in 23 h") || complaint.contains("try again in 1 d")),
        "{complaint}"
    );
    // On the wire: `RATE_LIMITED` with the wait in `retry_after_ms`.
    let client = alice.client();
    let refusal = block_on(async {
        let mut session = client.session(false).await.expect("session");
        let request_id = session.request_id();
        let request = Kind::LinkCodeRequest(frame::LinkCodeRequest { request_id });
        session.call(request, request_id).await.expect("call")
    });
    let Kind::Error(refusal) = refusal else {
        panic!("a sixth link code was given: {refusal:?}");
    };
    assert_eq!(
        refusal.code,
        frame::ErrorCode::RateLimited as i32,
        "{refusal:?}"
    );
    let day = Duration::from_secs(24 * 3600);
    let wait = Duration::from_millis(refusal.retry_after_ms);
    assert!(
        wait > day - Duration::from_secs(3600) && wait <= day,
        "the wait is what is left of the day: {wait:?}"
    );
}

/// Issue 28, item 11: a lookup refused for the budget says when to try again (the server knows
/// the wait and sends it), not "later". One lookup is regained an hour: the wait is nearly an hour.
#[test]
fn a_lookup_refused_for_the_budget_says_when_to_try_again() {
    // A lookup of a number not asked before costs two: its evaluation and the lookup.
    let server = Server::start(&["--lookup-burst", "2", "--lookup-per-hour", "1"]);
    let alice = User::register(&number(), &server, &[]);
    alice.ok(&["lookup", &number()]);
    let out = alice.run(&["lookup", &number()]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let complaint = text(&out.stderr);
    assert!(
        complaint.contains("budget")
            && (complaint.contains("try again in 59 min")
                || complaint.contains("try again in 1 h")),
        "{complaint}"
    );
}

/// Issue 28, item 11: a send refused for the sender's message rate says in `SendResult` when it
/// would be accepted. Two sends reach the server together; the burst allows one, and one is
/// regained a second.
#[test]
fn a_send_refused_for_its_rate_says_when_to_try_again() {
    let server = Server::start(&["--send-burst", "1", "--send-per-second", "1"]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let bob = User::register(&bob_number, &server, &[]);
    let (alice_client, bob_client) = (alice.client(), bob.client());
    let results = block_on(async {
        let mut session = bob_client.session(false).await.expect("bob");
        let alice_account = account_of(&bob_client, &mut session, &alice_number).await;
        let send = |n: u8| {
            Kind::Send(frame::Send {
                id: vec![n; 16],
                to_account: alice_account.clone(),
                mode: frame::SendMode::Queue as i32,
                copies: vec![frame::Copy {
                    device_id: alice_client.device().as_bytes().to_vec(),
                    payload: bytes::Bytes::from_static(b"sealed"),
                }],
                ..frame::Send::default()
            })
        };
        session.send_many([send(1), send(2)]).await.expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut results = Vec::new();
        while results.len() < 2 {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => results.push(result),
                Some(_) => {}
                None => break,
            }
        }
        results
    });
    let limited: Vec<_> = results
        .iter()
        .filter(|result| result.outcome == frame::SendOutcome::RateLimited as i32)
        .collect();
    assert_eq!(limited.len(), 1, "{results:?}");
    assert!(
        (1..=1_000).contains(&limited[0].retry_after_ms),
        "{results:?}"
    );
}
