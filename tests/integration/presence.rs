//! Issue 29: online status as its owner chooses (promise P7), and no silent probing. Whoever
//! knows a number but holds no presence token of its owner must learn nothing about whether the
//! owner is online: not from a lookup, not from a send's answer, not from a receipt, not from a
//! withdraw. The attacker speaks the protocol directly (a raw session); the users use the CLI.

use tidings_proto::frame::{self, Kind, SendMode, SendOutcome, WithdrawState};
use tidings_proto::id::MessageId;
use tokio::time::Instant;

use crate::support::{block_on, eventually, number, patience, Listener, Server, User, PATIENCE};

/// Three users: `bob` has written to `carol` (so she is his contact and holds his presence
/// token) and is listening; `carol` sees him online. Returns bob's listener.
fn bob_online_for_carol(bob: &User, carol: &User) -> Listener {
    let (answer, code) = bob.send(&carol.number, "hello carol", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(carol.receive(1, PATIENCE).len(), 1);
    let listener = Listener::start(bob);
    assert!(
        eventually(patience(), || carol.lookup(&[&bob.number])[0].1 == "online"),
        "bob's contact never saw him online"
    );
    listener
}

/// Sends one prepared frame on `session` and returns the server's answer to it.
async fn send_on(
    session: &mut tidings_client::session::Session,
    send: frame::Send,
) -> frame::SendResult {
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

/// Withdraws `id` on `session`; the answer, and the ids of the receipts that came before it.
async fn withdraw_on(
    session: &mut tidings_client::session::Session,
    id: MessageId,
) -> (i32, Vec<Vec<u8>>) {
    session
        .send(Kind::Withdraw(frame::Withdraw {
            id: id.as_bytes().to_vec(),
        }))
        .await
        .expect("withdraw");
    let deadline = Instant::now() + patience();
    let mut receipts = Vec::new();
    loop {
        match session.recv(deadline).await.expect("recv") {
            Some(Kind::Receipt(r)) => receipts.push(r.id),
            Some(Kind::WithdrawResult(r)) if r.id == id.as_bytes() => return (r.state, receipts),
            Some(_) => {}
            None => panic!("no answer to a withdraw"),
        }
    }
}

/// Whether a receipt for `id` reached `session` before the answer to a request sent now (a
/// withdraw of a message never sent: its answer is queued behind whatever was queued before).
async fn receipt_before_answer(
    session: &mut tidings_client::session::Session,
    id: MessageId,
) -> bool {
    let (state, receipts) = withdraw_on(session, MessageId([0xee; 16])).await;
    assert_eq!(state, WithdrawState::Unknown as i32);
    receipts.contains(&id.as_bytes().to_vec())
}

#[test]
fn a_stranger_does_not_see_a_user_online_who_shows_himself_to_contacts_only() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let _listening = bob_online_for_carol(&bob, &carol);
    // Alice knows bob's number and nothing else: a user, not reachable now.
    assert_eq!(alice.lookup(&[&bob.number])[0].1, "offline");
}

#[test]
fn now_or_never_and_queue_from_a_stranger_are_answered_as_for_an_offline_user() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let dave = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let _listening = bob_online_for_carol(&bob, &carol);
    let client = alice.client();
    let answers = block_on(async {
        let mut session = client.session(false).await.expect("session");
        let mut answers = Vec::new();
        for (n, (to, mode)) in [
            (&bob, SendMode::NowOrNever),
            (&dave, SendMode::NowOrNever),
            (&bob, SendMode::Queue),
            (&dave, SendMode::Queue),
        ]
        .into_iter()
        .enumerate()
        {
            let id = MessageId([0x29, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, n as u8]);
            let mut send = client
                .prepare_send(&to.number, "probe", id)
                .await
                .expect("encrypt");
            send.mode = mode as i32;
            let answer = send_on(&mut session, send).await;
            answers.push(answer.outcome);
        }
        answers
    });
    assert_eq!(
        answers,
        [
            SendOutcome::RefusedNotReachable as i32,
            SendOutcome::RefusedNotReachable as i32,
            SendOutcome::Queued as i32,
            SendOutcome::Queued as i32,
        ],
        "bob online answers as dave offline"
    );
}

#[test]
fn garbage_from_a_stranger_gets_no_receipt_and_its_withdraw_answers_as_for_an_offline_user() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let dave = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let listening = bob_online_for_carol(&bob, &carol);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let garbage = |mut send: frame::Send| {
            for copy in &mut send.copies {
                copy.payload = vec![0x5a; copy.payload.len()].into();
            }
            send
        };
        let to_bob = MessageId([0x29; 16]);
        let to_dave = MessageId([0x2a; 16]);
        for (to, id) in [(&bob, to_bob), (&dave, to_dave)] {
            let send = client
                .prepare_send(&to.number, "never shown", id)
                .await
                .expect("encrypt");
            let answer = send_on(&mut session, garbage(send)).await;
            assert_eq!(answer.outcome, SendOutcome::Queued as i32, "{answer:?}");
        }
        // Bob's device has taken the garbage and refused it.
        let text = to_bob.to_text();
        listening.wait_for(|event| event["type"] == "rejected" && event["id"] == text.as_str());
        let (bob_online, receipts) = withdraw_on(&mut session, to_bob).await;
        assert!(receipts.is_empty(), "a receipt went to a stranger");
        let (dave_offline, _) = withdraw_on(&mut session, to_dave).await;
        assert_eq!(bob_online, WithdrawState::Withdrawn as i32);
        assert_eq!(bob_online, dave_offline);
    });
}

#[test]
fn a_shown_message_from_a_stranger_gets_no_receipt_and_a_contacts_does() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let listening = bob_online_for_carol(&bob, &carol);
    for (sender, text, receipt_expected) in [
        (&alice, "from a stranger", false),
        (&carol, "from a contact", true),
    ] {
        let client = sender.client();
        block_on(async {
            let mut session = client.session(false).await.expect("session");
            let id = MessageId([if receipt_expected { 1 } else { 2 }; 16]);
            let send = client
                .prepare_send(&bob.number, text, id)
                .await
                .expect("encrypt");
            let answer = send_on(&mut session, send).await;
            assert!(
                [SendOutcome::Queued as i32, SendOutcome::Accepted as i32]
                    .contains(&answer.outcome),
                "{answer:?}"
            );
            listening.wait_for(|event| event["type"] == "message" && event["text"] == text);
            // The receipt, if any, was queued for this session before the message was shown.
            assert_eq!(
                receipt_before_answer(&mut session, id).await,
                receipt_expected,
                "{text}"
            );
        });
    }
}

/// A lookup of `number` on `client`'s own session with `proofs` instead of the ones its client
/// would make: the presence the server answers.
async fn lookup_with(
    client: &tidings_client::client::Client,
    number: &str,
    proofs: Vec<frame::PresenceProof>,
) -> i32 {
    let mut session = client.session(false).await.expect("session");
    let account = crate::support::account_of(client, &mut session, number).await;
    let request_id = session.request_id();
    let request = Kind::Lookup(frame::Lookup {
        request_id,
        accounts: vec![account],
        proofs,
        ..frame::Lookup::default()
    });
    match session.call(request, request_id).await.expect("lookup") {
        Kind::LookupResult(result) => result.entries[0].presence,
        other => panic!("a lookup answered {other:?}"),
    }
}

/// The proofs `holder`'s device makes for `number`'s devices from the tokens it holds, for the
/// hour `hours_ago` hours before now.
fn proofs_of(holder: &User, number: &str, hours_ago: u64) -> Vec<frame::PresenceProof> {
    let mut inbox = holder.client().inbox().expect("inbox");
    let tokens = inbox
        .look(|crypto| crypto.presence_tokens_of(number))
        .expect("tokens");
    assert!(!tokens.is_empty(), "no presence token held");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let epoch = tidings_core::presence::epoch(now) - hours_ago;
    tokens
        .into_iter()
        .map(|(device, token)| frame::PresenceProof {
            account: Vec::new(),
            device_id: device.as_bytes().to_vec(),
            mac: tidings_core::presence::proof(&token, epoch).to_vec(),
        })
        .collect()
}

#[test]
fn a_token_passed_on_a_stale_proof_and_a_rotated_key_prove_nothing() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let eve = User::register(&number(), &server, &[]);
    let dave = User::register(&number(), &server, &[]);
    let listening = bob_online_for_carol(&bob, &carol);
    let online = frame::Presence::Online as i32;
    let offline = frame::Presence::Offline as i32;
    let (carol_client, eve_client) = (carol.client(), eve.client());
    block_on(async {
        // Carol's proofs hold for her, for this hour and the last, not for the one before;
        // passed on to Eve, they prove nothing: they are bound to Carol's device.
        for (asker, hours_ago, expected) in [
            (&carol_client, 0, online),
            (&carol_client, 1, online),
            (&carol_client, 2, offline),
            (&eve_client, 0, offline),
        ] {
            let proofs = proofs_of(&carol, &bob.number, hours_ago);
            let presence = lookup_with(asker, &bob.number, proofs).await;
            assert_eq!(presence, expected, "{hours_ago} hours ago");
        }
    });
    // Bob makes a new presence key: Carol's token is revoked; Dave, written to since, sees him.
    drop(listening);
    let settings = bob.ok(&["--json", "settings", "--presence-rotate"]);
    assert!(
        settings.contains("\"presence_key_rotated\":true"),
        "{settings}"
    );
    let (answer, code) = bob.send(&dave.number, "hello dave", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(dave.receive(1, PATIENCE).len(), 1);
    let _listening = Listener::start(&bob);
    assert!(eventually(patience(), || dave.lookup(&[&bob.number])[0].1 == "online"));
    assert_eq!(carol.lookup(&[&bob.number])[0].1, "offline");
}

#[test]
fn everyone_shows_to_strangers_and_nobody_not_even_to_contacts() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let carol = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let (answer, code) = bob.send(&carol.number, "hello carol", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    assert_eq!(carol.receive(1, PATIENCE).len(), 1);
    // The setting is kept in the profile and sent by every listening session.
    let shown = bob.ok(&["--json", "settings", "--presence", "everyone"]);
    assert!(shown.contains("\"presence\":\"everyone\""), "{shown}");
    assert!(bob
        .ok(&["--json", "settings"])
        .contains("\"presence\":\"everyone\""));
    {
        let _listening = Listener::start(&bob);
        assert!(eventually(patience(), || alice.lookup(&[&bob.number])[0].1 == "online"));
    }
    bob.ok(&["settings", "--presence", "nobody"]);
    let listening = Listener::start(&bob);
    // Once bob's new session shows a message, it has told the server its setting.
    let (answer, code) = carol.send(&bob.number, "are you there", &["--route", "ip-only"]);
    assert_eq!(code, 0, "{answer}");
    listening.wait_for(|event| event["type"] == "message" && event["text"] == "are you there");
    assert_eq!(carol.lookup(&[&bob.number])[0].1, "offline");
    assert_eq!(alice.lookup(&[&bob.number])[0].1, "offline");
    // Without --json, a user not shown online is named for what it is.
    let out = alice.ok(&["lookup", &bob.number]);
    assert!(out.contains("a user, not reachable now"), "{out}");
}

#[test]
fn malformed_presence_settings_and_proofs_get_a_clear_error() {
    let server = Server::start(&[]);
    let bob = User::register(&number(), &server, &[]);
    let alice = User::register(&number(), &server, &[]);
    let bob_account = crate::support::server_pseudonym(&server, &bob.number);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let proof = |device: usize, mac: usize| frame::PresenceProof {
            account: Vec::new(),
            device_id: vec![1; device],
            mac: vec![2; mac],
        };
        let requests = [
            Kind::PresenceSet(frame::PresenceSet {
                request_id: 1,
                mode: frame::PresenceMode::Contacts as i32,
                key: vec![0; 31],
            }),
            Kind::PresenceSet(frame::PresenceSet {
                request_id: 2,
                mode: 9,
                key: vec![0; 32],
            }),
            Kind::Lookup(frame::Lookup {
                request_id: 3,
                accounts: vec![bob_account.clone()],
                proofs: vec![proof(16, 31)],
                ..frame::Lookup::default()
            }),
            Kind::Lookup(frame::Lookup {
                request_id: 4,
                accounts: vec![bob_account.clone()],
                proofs: vec![proof(15, 32)],
                ..frame::Lookup::default()
            }),
            Kind::Lookup(frame::Lookup {
                request_id: 5,
                accounts: vec![bob_account.clone()],
                proofs: vec![proof(16, 32); tidings_proto::MAX_LOOKUP_PROOFS + 1],
                ..frame::Lookup::default()
            }),
        ];
        for (request_id, request) in (1..).zip(requests) {
            match session.call(request, request_id).await.expect("answer") {
                Kind::Error(e) => {
                    assert_eq!(
                        e.code,
                        frame::ErrorCode::InvalidRequest as i32,
                        "{}",
                        e.message
                    );
                    assert!(!e.fatal);
                }
                other => panic!("{other:?}"),
            }
        }
        let mut send = client
            .prepare_send(&bob.number, "hello", MessageId([7; 16]))
            .await
            .expect("encrypt");
        send.presence_proofs = vec![proof(16, 32); tidings_proto::MAX_SEND_PROOFS + 1];
        let answer = send_on(&mut session, send).await;
        assert_eq!(answer.outcome, SendOutcome::Invalid as i32, "{answer:?}");
        // The session goes on: a valid setting is taken.
        let request = Kind::PresenceSet(frame::PresenceSet {
            request_id: 6,
            mode: frame::PresenceMode::Everyone as i32,
            key: vec![0; 32],
        });
        assert!(matches!(
            session.call(request, 6).await.expect("answer"),
            Kind::PresenceSetResult(_)
        ));
    });
}
