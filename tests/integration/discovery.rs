//! Issue 29, "Budgets on evaluations" (promise P8): no request answers "user / not a user /
//! online" for free. Every answer that tells an account whether another number is a user, which
//! devices it has, whether it is reachable or whether a message reached it draws from the asking
//! number's discovery budget (the lookup budget): sends answered `NOT_A_USER`,
//! `REFUSED_NOT_REACHABLE` or `DEVICES_CHANGED` to a sender that named none of the receiver's
//! devices, withdraws, and key claims. Over the budget the answer is `RATE_LIMITED` with the wait,
//! and tells nothing. A send whose copies go to the receiver's devices is free, so people who talk
//! a lot never run dry.
//!
//! The attacker here is a raw session of a registered device: it sends what a client would never
//! send (no copies, random message ids).

use tidings_client::outgoing::new_message_id;
use tidings_client::session::Session;
use tidings_proto::frame::{self, ErrorCode, Kind, SendMode, SendOutcome, WithdrawState};
use tokio::time::Instant;

use crate::support::{block_on, number, patience, server_pseudonym, text, Server, User};

/// The discovery budget of these tests: small, and regained so slowly that no test sees a refill.
const BURST: usize = 3;
const SERVER_FLAGS: [&str; 4] = ["--lookup-burst", "3", "--lookup-per-hour", "1"];

/// A logged-in session of `user`'s device that only asks (it does not listen).
async fn session_of(user: &User) -> Session {
    user.client().session(false).await.expect("session")
}

/// A send a client never makes: no copy at all, so it names none of the receiver's devices. The
/// receiver's pseudonym is computed from the server's key file, so that no evaluation is charged.
fn probe(server: &Server, to: &str, mode: SendMode) -> frame::Send {
    frame::Send {
        id: new_message_id().as_bytes().to_vec(),
        to_account: server_pseudonym(server, to),
        mode: mode as i32,
        ..frame::Send::default()
    }
}

/// Sends `send` and waits for its `SendResult`.
async fn answer_to(session: &mut Session, send: frame::Send) -> frame::SendResult {
    let id = send.id.clone();
    session.send(Kind::Send(send)).await.expect("send");
    let deadline = Instant::now() + patience();
    loop {
        match session.recv(deadline).await.expect("recv") {
            Some(Kind::SendResult(result)) if result.id == id => return result,
            Some(_) => {}
            None => panic!("no answer to a send"),
        }
    }
}

/// Sends `Withdraw{id}` and waits for its `WithdrawResult`.
async fn withdraw(session: &mut Session, id: Vec<u8>) -> frame::WithdrawResult {
    session
        .send(Kind::Withdraw(frame::Withdraw { id: id.clone() }))
        .await
        .expect("withdraw");
    let deadline = Instant::now() + patience();
    loop {
        match session.recv(deadline).await.expect("recv") {
            Some(Kind::WithdrawResult(result)) if result.id == id => return result,
            Some(_) => {}
            None => panic!("no answer to a withdraw"),
        }
    }
}

/// Claims the keys of every device of `number` and returns the answer (a result or an error).
async fn claim(session: &mut Session, server: &Server, number: &str) -> Kind {
    let request_id = session.request_id();
    let request = Kind::KeysClaim(frame::KeysClaim {
        request_id,
        account: server_pseudonym(server, number),
        ..frame::KeysClaim::default()
    });
    session.call(request, request_id).await.expect("claim")
}

/// Checks that a send was refused for the discovery budget: `RATE_LIMITED` with the wait (nearly
/// an hour: one unit is regained an hour) and nothing about the receiver.
fn assert_refused_for_the_budget(result: &frame::SendResult, what: &str) {
    assert_eq!(
        result.outcome,
        SendOutcome::RateLimited as i32,
        "{what}: {result:?}"
    );
    assert!(
        result.retry_after_ms > 50 * 60 * 1000,
        "{what}: the wait is the discovery budget's: {result:?}"
    );
    assert!(
        result.missing_devices.is_empty() && result.extra_devices.is_empty(),
        "{what}: a refusal names no device: {result:?}"
    );
    assert!(result.detail.contains("budget"), "{what}: {result:?}");
}

#[test]
fn sends_to_numbers_that_are_not_users_are_charged_until_the_budget_is_spent() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    block_on(async {
        let mut session = session_of(&mallory).await;
        for probed in 0..BURST {
            let result = answer_to(
                &mut session,
                probe(&server, &number(), SendMode::NowOrNever),
            )
            .await;
            assert_eq!(
                result.outcome,
                SendOutcome::NotAUser as i32,
                "probe {probed}: {result:?}"
            );
        }
        // Spent: a non-user and a user get the same refusal, which tells neither apart.
        for (what, to) in [("a non-user", number()), ("a user", bob.number.clone())] {
            for mode in [SendMode::NowOrNever, SendMode::Queue] {
                let result = answer_to(&mut session, probe(&server, &to, mode)).await;
                assert_refused_for_the_budget(&result, &format!("{what}, {mode:?}"));
            }
        }
    });
}

#[test]
fn sends_that_name_none_of_a_users_devices_are_charged() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    block_on(async {
        let mut session = session_of(&mallory).await;
        // Bob is offline: now-or-never tells that, a queued send lists his devices.
        let mut answers = Vec::new();
        for mode in [SendMode::NowOrNever, SendMode::Queue, SendMode::Queue] {
            answers.push(answer_to(&mut session, probe(&server, &bob.number, mode)).await);
        }
        assert_eq!(
            answers[0].outcome,
            SendOutcome::RefusedNotReachable as i32,
            "{answers:?}"
        );
        for answer in &answers[1..] {
            assert_eq!(
                answer.outcome,
                SendOutcome::DevicesChanged as i32,
                "{answers:?}"
            );
            assert_eq!(answer.missing_devices.len(), 1, "{answers:?}");
        }
        for mode in [SendMode::NowOrNever, SendMode::Queue] {
            let result = answer_to(&mut session, probe(&server, &bob.number, mode)).await;
            assert_refused_for_the_budget(&result, &format!("{mode:?}"));
        }
    });
}

#[test]
fn withdraws_are_charged_and_one_over_the_budget_withdraws_nothing() {
    let server = Server::start(&SERVER_FLAGS);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    // A first message to Bob evaluates his number and claims his keys: two units of the budget.
    let (answer, code) = alice.send(&bob.number, "kept", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    let id = tidings_proto::id::MessageId::from_text(answer["id"].as_str().expect("an id"))
        .expect("a message id");
    block_on(async {
        let mut session = session_of(&alice).await;
        for asked in 2..BURST {
            let result = withdraw(&mut session, new_message_id().as_bytes().to_vec()).await;
            assert_eq!(
                result.state,
                WithdrawState::Unknown as i32,
                "withdraw {asked}: {result:?}"
            );
        }
        let refused = withdraw(&mut session, id.as_bytes().to_vec()).await;
        assert_eq!(
            refused.state,
            WithdrawState::RateLimited as i32,
            "{refused:?}"
        );
        assert!(refused.retry_after_ms > 50 * 60 * 1000, "{refused:?}");
    });
    // Refused, so not withdrawn: Bob still gets it.
    assert_eq!(bob.receive_texts(1, 30), vec!["kept".to_string()]);
}

#[test]
fn key_claims_of_other_numbers_are_charged() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    block_on(async {
        let mut session = session_of(&mallory).await;
        let probed = [number(), bob.number.clone(), number()];
        for to in &probed {
            let answer = claim(&mut session, &server, to).await;
            assert!(matches!(answer, Kind::KeysClaimResult(_)), "{answer:?}");
        }
        for to in [number(), bob.number.clone()] {
            match claim(&mut session, &server, &to).await {
                Kind::Error(error) => {
                    assert_eq!(error.code, ErrorCode::RateLimited as i32, "{error:?}");
                    assert!(error.retry_after_ms > 50 * 60 * 1000, "{error:?}");
                }
                other => panic!("a claim over the budget was answered: {other:?}"),
            }
        }
        // The asker's own number stays free: a spent budget does not lock it out of its keys.
        let own = claim(&mut session, &server, &mallory.number).await;
        assert!(matches!(own, Kind::KeysClaimResult(_)), "{own:?}");
    });
}

#[test]
fn a_user_who_talks_a_lot_is_never_limited_by_the_discovery_budget() {
    let server = Server::start(&SERVER_FLAGS);
    let alice = User::register(&number(), &server, &[]);
    let bob = User::register(&number(), &server, &[]);
    // Ten times the budget, to a contact: after the first message, every send's copies go to
    // Bob's devices, and nothing it is told is news.
    for sent in 0..10 * BURST {
        let (answer, code) = alice.send(&bob.number, &format!("m{sent}"), &["--route", "ip-only"]);
        assert_eq!(code, 0, "message {sent}: {answer}");
        assert_eq!(answer["outcome"], "queued", "message {sent}: {answer}");
    }
    assert_eq!(bob.receive_texts(10 * BURST, 60).len(), 10 * BURST);
}

#[test]
fn a_second_device_of_the_number_shares_the_budget() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory = User::register(&number(), &server, &[]);
    let laptop = mallory.link_device(&server);
    block_on(async {
        let mut phone = session_of(&mallory).await;
        let mut second = session_of(&laptop).await;
        for (device, session) in [("phone", &mut phone), ("laptop", &mut second)] {
            let result = answer_to(session, probe(&server, &number(), SendMode::Queue)).await;
            assert_eq!(
                result.outcome,
                SendOutcome::NotAUser as i32,
                "{device}: {result:?}"
            );
        }
        let result = answer_to(&mut second, probe(&server, &number(), SendMode::Queue)).await;
        assert_eq!(result.outcome, SendOutcome::NotAUser as i32, "{result:?}");
        for (device, session) in [("phone", &mut phone), ("laptop", &mut second)] {
            let result = answer_to(session, probe(&server, &number(), SendMode::Queue)).await;
            assert_refused_for_the_budget(&result, device);
        }
    });
}

#[test]
fn an_opt_out_and_a_new_registration_do_not_refill_the_budget() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory_number = number();
    let mallory = User::register(&mallory_number, &server, &[]);
    block_on(async {
        let mut session = session_of(&mallory).await;
        for _ in 0..BURST {
            let result = answer_to(&mut session, probe(&server, &number(), SendMode::Queue)).await;
            assert_eq!(result.outcome, SendOutcome::NotAUser as i32, "{result:?}");
        }
    });
    mallory.ok(&["disable"]);
    let again = User::register(&mallory_number, &server, &[]);
    block_on(async {
        let mut session = session_of(&again).await;
        let result = answer_to(&mut session, probe(&server, &number(), SendMode::Queue)).await;
        assert_refused_for_the_budget(&result, "after a new registration");
    });
}

/// The CLI says when to try again for every answer refused for the discovery budget.
#[test]
fn the_cli_says_when_to_try_again_once_the_budget_is_spent() {
    let server = Server::start(&SERVER_FLAGS);
    let mallory = User::register(&number(), &server, &[]);
    block_on(async {
        let mut session = session_of(&mallory).await;
        for _ in 0..BURST {
            answer_to(&mut session, probe(&server, &number(), SendMode::Queue)).await;
        }
    });
    let out = mallory.run(&["send", &number(), "hello", "--route", "ip-only"]);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    let said = text(&out.stdout) + &text(&out.stderr);
    assert!(
        said.contains("budget")
            && (said.contains("try again in 59 min") || said.contains("try again in 1 h")),
        "{said}"
    );
}
