//! Request handling without a socket: frames decoded into requests and run by the one dispatch
//! against a real store in a temporary directory, every answer read from the session's outbox.

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use tidings_proto::frame::{
    self, AckStatus, ErrorCode, Frame, Kind, Presence, ReceiptKind, SendMode, SendOutcome,
    WithdrawState,
};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tidings_store::sqlite::{SqliteOptions, SqliteStore, WRITER_QUEUE};
use tidings_store::{IdentityKeys, NewMessage, Store as _};
use tokio::task::JoinSet;

use super::{NotARequest, Request};
use crate::clock::now_ms;
use crate::config::ServerArgs;
use crate::hub::{Mailbox, Outbound, Outbox, Registration};
use crate::identity::Identity;
use crate::keys::ServerKeys;
use crate::metrics::Metrics;
use crate::send::SendOrder;
use crate::state::{Shared, State, QUEUE_LIMIT};

/// A server's state over a store in a directory of its own, removed at the end.
struct World {
    state: Shared<SqliteStore>,
    dir: PathBuf,
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One device of a user, logged in: its identity, its outbox, and (while online) its place in
/// the hub.
struct Device {
    identity: Identity,
    number: String,
    outbox: Outbox,
    /// The session's order of sends, as a session keeps it.
    sends: Option<Arc<SendOrder>>,
    online: Option<Registration>,
}

impl World {
    /// A world with the default settings, changed by `settings`.
    fn new(name: &str, settings: impl FnOnce(&mut ServerArgs)) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidings-server-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        let config_file = dir.join("server.toml");
        std::fs::write(&config_file, "").expect("config file");
        let mut args = ServerArgs {
            config: Some(config_file),
            data_dir: Some(dir.join("data")),
            key_file: Some(dir.join("server.key")),
            outbox_dir: Some(dir.join("sms")),
            ..ServerArgs::default()
        };
        settings(&mut args);
        let config = args.resolve().expect("settings");
        let keys = ServerKeys::load_or_create(&config.key_file).expect("keys");
        let options = SqliteOptions {
            max_batch: WRITER_QUEUE,
            sync_observer: None,
        };
        let store = SqliteStore::open(&config.data_dir, options).expect("store");
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(State::new(config, store, keys, metrics));
        Self { state, dir }
    }

    /// Registers `number` with `devices` devices, each with published identity keys (so each
    /// must get a copy of every message to the number). The first device is online.
    async fn user(&self, number: &str, devices: usize) -> Vec<Device> {
        let store = &self.state.store;
        let pseudonym = self.pseudonym(number);
        let mut made = Vec::new();
        for n in 0..devices {
            let id = random_device();
            let keys = IdentityKeys {
                identity_key: [n as u8; 32],
                signing_key: [n as u8; 32],
            };
            let account = if n == 0 {
                let registered = store.register_device(pseudonym, id, [1; 32], now_ms());
                registered.await.expect("register").account
            } else {
                let account: Identity = made
                    .first()
                    .map(|first: &Device| first.identity)
                    .expect("the first device");
                let linked = store.add_device(account.account, id, [1; 32], keys, 6, now_ms());
                linked.await.expect("link");
                account.account
            };
            let published = store.publish_keys(id, keys, Vec::new(), None, 100);
            published.await.expect("publish");
            let outbox = Mailbox::new();
            let online = (n == 0).then(|| self.state.hub.add(id, true, Arc::clone(&outbox)));
            made.push(Device {
                identity: Identity {
                    device: id,
                    account,
                },
                number: number.into(),
                outbox,
                sends: None,
                online,
            });
        }
        made
    }

    fn pseudonym(&self, number: &str) -> tidings_store::Pseudonym {
        let number = E164::parse(number).expect("a number");
        self.state.keys.pseudonym(&number).expect("a pseudonym")
    }

    /// Decodes `kind` and runs it as `device`'s session would, to the end.
    async fn run(&self, device: &mut Device, kind: Kind) {
        let request = Request::from_frame(kind.into()).expect("a request");
        let task = request.run(
            Arc::clone(&self.state),
            device.identity,
            Arc::clone(&device.outbox),
            &mut device.sends,
        );
        task.await;
    }

    /// Runs `kind` for `device` and takes the one answer it queued.
    async fn ask(&self, device: &mut Device, kind: Kind) -> Kind {
        self.run(device, kind).await;
        let mut answers = take_all(&device.outbox);
        assert_eq!(answers.len(), 1, "one answer: {answers:?}");
        answers.remove(0)
    }
}

fn random_device() -> DeviceId {
    DeviceId(rand::random())
}

fn random_id() -> MessageId {
    MessageId(rand::random())
}

/// Everything queued in an outbox, as frame kinds (a sign-out as a `SignedOut`).
fn take_all(outbox: &Outbox) -> Vec<Kind> {
    std::iter::from_fn(|| outbox.try_recv())
        .map(|message| match message {
            Outbound::Frame(frame) | Outbound::Deliver(frame) => frame.kind.expect("a kind"),
            Outbound::SignOut(reason) => Kind::SignedOut(frame::SignedOut {
                reason: reason.into(),
            }),
        })
        .collect()
}

/// A send of `id` to `to` with one copy per device in `copies`.
fn send_to(to: &Device, id: MessageId, copies: &[DeviceId], mode: SendMode) -> Kind {
    Kind::Send(frame::Send {
        id: id.as_bytes().to_vec(),
        to: to.number.clone(),
        mode: mode as i32,
        copies: copies
            .iter()
            .map(|device| frame::Copy {
                device_id: device.as_bytes().to_vec(),
                payload: Bytes::from_static(b"ciphertext"),
            })
            .collect(),
        ..frame::Send::default()
    })
}

fn ids(devices: &[&Device]) -> Vec<DeviceId> {
    devices.iter().map(|d| d.identity.device).collect()
}

fn ack_of(sender: &Device, id: MessageId) -> Kind {
    Kind::Ack(frame::Ack {
        sender_device: sender.identity.device.as_bytes().to_vec(),
        id: id.as_bytes().to_vec(),
    })
}

/// A `SendResult`'s outcome, detail and device difference.
fn send_result(answer: Kind) -> (SendOutcome, String, [Vec<Vec<u8>>; 3]) {
    let Kind::SendResult(result) = answer else {
        panic!("not a send result: {answer:?}");
    };
    let outcome = SendOutcome::try_from(result.outcome).expect("an outcome");
    let difference = [
        result.missing_devices,
        result.missing_own_devices,
        result.extra_devices,
    ];
    (outcome, result.detail, difference)
}

fn error_of(answer: &Kind) -> (ErrorCode, &str, u64) {
    let Kind::Error(error) = answer else {
        panic!("not an error: {answer:?}");
    };
    assert!(!error.fatal, "a request's error never ends the session");
    let code = ErrorCode::try_from(error.code).expect("an error code");
    (code, error.message.as_str(), error.request_id)
}

#[test]
fn a_frame_is_a_request_or_says_why_not() {
    let check = |kind: Option<Kind>, expected: Result<&str, NotARequest>| {
        let decoded = Request::from_frame(Frame { kind: kind.clone() });
        match (decoded, expected) {
            (Ok(request), Ok(name)) => assert!(
                format!("{request:?}").starts_with(name),
                "{kind:?} is {request:?}"
            ),
            (Err(not), Err(expected)) => assert_eq!(not, expected, "{kind:?}"),
            (decoded, expected) => panic!("{kind:?}: {decoded:?}, expected {expected:?}"),
        }
    };
    check(Some(Kind::Ping(frame::Ping { nonce: 1 })), Ok("Ping"));
    check(Some(Kind::Send(frame::Send::default())), Ok("Send"));
    check(Some(Kind::Ack(frame::Ack::default())), Ok("Ack"));
    check(
        Some(Kind::ReceiptAck(frame::ReceiptAck::default())),
        Ok("ReceiptAck"),
    );
    check(
        Some(Kind::Withdraw(frame::Withdraw::default())),
        Ok("Withdraw"),
    );
    check(Some(Kind::Lookup(frame::Lookup::default())), Ok("Lookup"));
    check(
        Some(Kind::Devices(frame::DevicesRequest::default())),
        Ok("Devices"),
    );
    check(
        Some(Kind::KeysUpload(frame::KeysUpload::default())),
        Ok("KeysUpload"),
    );
    check(
        Some(Kind::KeysClaim(frame::KeysClaim::default())),
        Ok("KeysClaim"),
    );
    check(
        Some(Kind::LinkCodeRequest(frame::LinkCodeRequest::default())),
        Ok("LinkCode"),
    );
    check(
        Some(Kind::RemoveDevice(frame::RemoveDevice::default())),
        Ok("RemoveDevice"),
    );
    check(Some(Kind::Vouch(frame::Vouch::default())), Ok("Vouch"));
    check(
        Some(Kind::Disable(frame::Disable::default())),
        Ok("Disable"),
    );
    check(
        Some(Kind::Login(frame::Login::default())),
        Err(NotARequest::SecondLogin),
    );
    check(
        Some(Kind::Pong(frame::Pong { nonce: 1 })),
        Err(NotARequest::FromServer),
    );
    check(
        Some(Kind::Deliver(frame::Deliver::default())),
        Err(NotARequest::FromServer),
    );
    check(None, Err(NotARequest::Empty));
    assert_eq!(
        NotARequest::Empty.complaint(),
        None,
        "an empty frame is ignored"
    );
    assert_eq!(
        NotARequest::SecondLogin.complaint(),
        Some("already logged in")
    );
    assert_eq!(
        NotARequest::FromServer.complaint(),
        Some("this frame is sent by servers, not clients")
    );
}

#[test]
fn a_ping_is_answered_inline_and_nothing_else_is() {
    let ping = Request::from_frame(Kind::Ping(frame::Ping { nonce: 42 }).into());
    let answer = ping.expect("a ping").inline_answer();
    assert_eq!(
        answer.and_then(|frame| frame.kind),
        Some(Kind::Pong(frame::Pong { nonce: 42 }))
    );
    let ack = Request::from_frame(Kind::Ack(frame::Ack::default()).into());
    assert!(ack.expect("an ack").inline_answer().is_none());
}

#[tokio::test]
async fn a_send_is_decided_stored_and_answered() {
    let world = World::new("send", |_| {});
    let mut alice = world.user("+14155550101", 1).await.remove(0);
    let bob = world.user("+14155550102", 2).await;
    let carol = world.user("+14155550103", 1).await;
    // Carol is offline.
    let carol = Device {
        online: None,
        ..carol.into_iter().next().expect("carol")
    };
    let stranger = Device {
        identity: alice.identity,
        number: "+14155550199".into(),
        outbox: Mailbox::new(),
        sends: None,
        online: None,
    };
    let nobody = Device {
        identity: alice.identity,
        number: "not a number".into(),
        outbox: Mailbox::new(),
        sends: None,
        online: None,
    };
    let to_bob = ids(&[&bob[0], &bob[1]]);
    let unknown = random_device();
    let repeated = random_id();
    let none: [Vec<Vec<u8>>; 3] = Default::default();
    let bytes = |devices: &[DeviceId]| -> Vec<Vec<u8>> {
        devices.iter().map(|d| d.as_bytes().to_vec()).collect()
    };
    // (what, the send, its outcome, words of its detail, the device difference)
    let cases: Vec<(&str, Kind, SendOutcome, &str, [Vec<Vec<u8>>; 3])> = vec![
        (
            "stored for a user with a device online",
            send_to(&bob[0], repeated, &to_bob, SendMode::Queue),
            SendOutcome::Accepted,
            "",
            none.clone(),
        ),
        (
            "the same id again: a duplicate, answered as the first",
            send_to(&bob[0], repeated, &to_bob, SendMode::Queue),
            SendOutcome::Accepted,
            "",
            none.clone(),
        ),
        (
            "queued for a user with no device online",
            send_to(&carol, random_id(), &ids(&[&carol]), SendMode::Queue),
            SendOutcome::Queued,
            "",
            none.clone(),
        ),
        (
            "now or never, and nobody is online",
            send_to(&carol, random_id(), &ids(&[&carol]), SendMode::NowOrNever),
            SendOutcome::RefusedNotReachable,
            "",
            none.clone(),
        ),
        (
            "devices changed: a device of the receiver has no copy, one copy is not wanted",
            send_to(&bob[0], random_id(), &[to_bob[0], unknown], SendMode::Queue),
            SendOutcome::DevicesChanged,
            "1 of the receiver and 0 of yours have none, 1 are not wanted",
            [bytes(&[to_bob[1]]), Vec::new(), bytes(&[unknown])],
        ),
        (
            "not a user",
            send_to(&stranger, random_id(), &[unknown], SendMode::Queue),
            SendOutcome::NotAUser,
            "",
            none.clone(),
        ),
        (
            "not a number",
            send_to(&nobody, random_id(), &[unknown], SendMode::Queue),
            SendOutcome::Invalid,
            "not a valid phone number",
            none.clone(),
        ),
        (
            "a device twice among the copies",
            send_to(
                &bob[0],
                random_id(),
                &[to_bob[0], to_bob[0]],
                SendMode::Queue,
            ),
            SendOutcome::Invalid,
            "a device appears twice",
            none.clone(),
        ),
        (
            "an id that is not 16 bytes",
            Kind::Send(frame::Send {
                id: vec![1, 2, 3],
                ..frame::Send::default()
            }),
            SendOutcome::Invalid,
            "id must be 16 bytes",
            none.clone(),
        ),
        (
            "a plaintext payload",
            Kind::Send(frame::Send {
                id: random_id().as_bytes().to_vec(),
                to: bob[0].number.clone(),
                payload: Bytes::from_static(b"hello"),
                ..frame::Send::default()
            }),
            SendOutcome::Invalid,
            "plaintext payloads are not accepted",
            none.clone(),
        ),
    ];
    for (what, send, outcome, detail, difference) in cases {
        let (got, got_detail, got_difference) = send_result(world.ask(&mut alice, send).await);
        assert_eq!(got, outcome, "{what}");
        assert!(got_detail.contains(detail), "{what}: {got_detail}");
        assert_eq!(got_difference, difference, "{what}");
    }
    // Pushed once to Bob's online device (not again for the duplicate); the offline one keeps
    // its copy in its queue.
    let pushed = take_all(&bob[0].outbox);
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    let Kind::Deliver(delivered) = &pushed[0] else {
        panic!("not a delivery: {pushed:?}");
    };
    assert_eq!(delivered.id, repeated.as_bytes().to_vec());
    assert_eq!(
        delivered.sender_device,
        alice.identity.device.as_bytes().to_vec()
    );
    let waiting = world.state.store.pending(to_bob[1], 0, 10, now_ms()).await;
    assert_eq!(waiting.expect("pending").len(), 1);
    assert!(
        take_all(&carol.outbox).is_empty(),
        "an offline device gets no push"
    );
}

#[tokio::test]
async fn a_sender_past_its_budget_is_rate_limited() {
    let world = World::new("send-budget", |args| {
        args.send_burst = Some(2);
        args.send_per_second = Some(0);
    });
    let mut alice = world.user("+14155550111", 1).await.remove(0);
    let bob = world.user("+14155550112", 1).await.remove(0);
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let send = send_to(&bob, random_id(), &ids(&[&bob]), SendMode::Queue);
        let (outcome, detail, _) = send_result(world.ask(&mut alice, send).await);
        outcomes.push((outcome, detail));
    }
    assert_eq!(
        outcomes,
        [
            (SendOutcome::Accepted, String::new()),
            (SendOutcome::Accepted, String::new()),
            (
                SendOutcome::RateLimited,
                "too many messages: slow down".into()
            ),
        ]
    );
}

#[tokio::test]
async fn a_send_to_a_full_queue_is_refused() {
    let world = World::new("queue-full", |_| {});
    let mut alice = world.user("+14155550121", 1).await.remove(0);
    let bob = world.user("+14155550122", 1).await.remove(0);
    // Fill Bob's queue to the limit, in batches the writer shares syncs among.
    let mut filling = JoinSet::new();
    for _ in 0..QUEUE_LIMIT {
        let state = Arc::clone(&world.state);
        let message = NewMessage {
            sender_device: alice.identity.device,
            sender_account: alice.identity.account,
            id: random_id(),
            receiver: bob.identity.account,
            sent_at: now_ms(),
            expires_at: now_ms() + 60_000,
            copies: vec![(bob.identity.device, Bytes::from_static(b"x"))],
        };
        filling.spawn(async move { state.store.enqueue(message, QUEUE_LIMIT).await });
    }
    while let Some(enqueued) = filling.join_next().await {
        assert!(matches!(
            enqueued.expect("a task"),
            Ok(tidings_store::Enqueued::Stored)
        ));
    }
    let send = send_to(&bob, random_id(), &ids(&[&bob]), SendMode::Queue);
    let (outcome, _, _) = send_result(world.ask(&mut alice, send).await);
    assert_eq!(outcome, SendOutcome::RefusedQueueFull);
}

#[tokio::test]
async fn a_sessions_pipelined_sends_are_stored_and_pushed_in_the_order_read() {
    let world = World::new("order", |_| {});
    let mut alice = world.user("+14155550131", 1).await.remove(0);
    let bob = world.user("+14155550132", 2).await;
    let copies = ids(&[&bob[0], &bob[1]]);
    let sent: Vec<MessageId> = (0..64).map(|_| random_id()).collect();
    // As a session does: each send takes its place when read, then all run at once.
    let mut tasks = JoinSet::new();
    for id in &sent {
        let send = send_to(&bob[0], *id, &copies, SendMode::Queue);
        let request = Request::from_frame(send.into()).expect("a send");
        tasks.spawn(request.run(
            Arc::clone(&world.state),
            alice.identity,
            Arc::clone(&alice.outbox),
            &mut alice.sends,
        ));
    }
    while tasks.join_next().await.is_some() {}
    let accepted = take_all(&alice.outbox)
        .into_iter()
        .filter(|answer| send_result(answer.clone()).0 == SendOutcome::Accepted)
        .count();
    assert_eq!(accepted, sent.len());
    let pushed: Vec<Vec<u8>> = take_all(&bob[0].outbox)
        .into_iter()
        .map(|kind| match kind {
            Kind::Deliver(deliver) => deliver.id,
            other => panic!("not a delivery: {other:?}"),
        })
        .collect();
    let expected: Vec<Vec<u8>> = sent.iter().map(|id| id.as_bytes().to_vec()).collect();
    assert_eq!(pushed, expected, "pushed in the order read");
    let stored = world.state.store.pending(copies[1], 0, 100, now_ms()).await;
    let stored: Vec<Vec<u8>> = stored
        .expect("pending")
        .into_iter()
        .map(|pending| pending.id.as_bytes().to_vec())
        .collect();
    assert_eq!(stored, expected, "stored in the order read");
}

#[tokio::test]
async fn an_ack_is_confirmed_unknown_or_withdrawn_and_tells_the_sender() {
    let world = World::new("ack", |_| {});
    let mut alice = world.user("+14155550141", 1).await.remove(0);
    let mut bob = world.user("+14155550142", 1).await.remove(0);
    let (delivered, withdrawn) = (random_id(), random_id());
    for id in [delivered, withdrawn] {
        let send = send_to(&bob, id, &ids(&[&bob]), SendMode::Queue);
        let (outcome, _, _) = send_result(world.ask(&mut alice, send).await);
        assert_eq!(outcome, SendOutcome::Accepted);
    }
    take_all(&bob.outbox);
    let withdraw = |id: MessageId| {
        Kind::Withdraw(frame::Withdraw {
            id: id.as_bytes().to_vec(),
        })
    };
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(withdrawn)).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(result.state, WithdrawState::Withdrawn as i32);

    // (what, the ack, the status answered)
    let cases = [
        ("the first ack", delivered, AckStatus::Confirmed),
        ("the same ack again", delivered, AckStatus::Unknown),
        (
            "an ack of a withdrawn message",
            withdrawn,
            AckStatus::Withdrawn,
        ),
        (
            "an ack of a message never sent",
            random_id(),
            AckStatus::Unknown,
        ),
    ];
    for (what, id, status) in cases {
        let Kind::AckResult(result) = world.ask(&mut bob, ack_of(&alice, id)).await else {
            panic!("{what}: not an ack result");
        };
        assert_eq!(result.status, status as i32, "{what}");
        assert_eq!(result.id, id.as_bytes().to_vec(), "{what}");
    }
    // The sender's online session got one `Delivered` receipt (a second copy may follow the
    // sync, for sessions that registered since; there were none).
    let receipts = take_all(&alice.outbox);
    assert_eq!(
        receipts,
        [Kind::Receipt(frame::Receipt {
            id: delivered.as_bytes().to_vec(),
            kind: ReceiptKind::Delivered as i32,
        })]
    );
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(delivered)).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(
        result.state,
        WithdrawState::Delivered as i32,
        "acknowledged first"
    );
    let Kind::WithdrawResult(result) = world.ask(&mut alice, withdraw(random_id())).await else {
        panic!("not a withdraw result");
    };
    assert_eq!(result.state, WithdrawState::Unknown as i32);
    let short = Kind::Ack(frame::Ack {
        sender_device: vec![1],
        id: vec![2],
    });
    let answer = world.ask(&mut bob, short).await;
    assert_eq!(
        error_of(&answer),
        (
            ErrorCode::InvalidRequest,
            "ack needs a 16-byte sender_device and id",
            0
        )
    );
}

#[tokio::test]
async fn a_receipt_waits_for_an_offline_sender_until_taken() {
    let world = World::new("receipts", |_| {});
    let mut alice = world.user("+14155550151", 1).await.remove(0);
    let mut bob = world.user("+14155550152", 1).await.remove(0);
    let id = random_id();
    let send = send_to(&bob, id, &ids(&[&bob]), SendMode::Queue);
    world.ask(&mut alice, send).await;
    take_all(&bob.outbox);
    alice.online = None;
    world.ask(&mut bob, ack_of(&alice, id)).await;
    assert!(
        take_all(&alice.outbox).is_empty(),
        "offline: nothing pushed"
    );

    let pending = |alice: &Device| {
        let outbox = Mailbox::new();
        let sending = crate::delivery::send_pending_receipts(
            Arc::clone(&world.state),
            alice.identity.device,
            Arc::clone(&outbox),
        );
        async move {
            sending.await;
            take_all(&outbox)
        }
    };
    let expected = Kind::Receipt(frame::Receipt {
        id: id.as_bytes().to_vec(),
        kind: ReceiptKind::Delivered as i32,
    });
    assert_eq!(pending(&alice).await, [expected.clone()]);
    assert_eq!(pending(&alice).await, [expected], "kept until taken");
    let taken = Kind::ReceiptAck(frame::ReceiptAck {
        id: id.as_bytes().to_vec(),
    });
    world.run(&mut alice, taken).await;
    assert!(
        take_all(&alice.outbox).is_empty(),
        "a receipt ack is not answered"
    );
    assert!(pending(&alice).await.is_empty(), "taken: gone");
}

#[tokio::test]
async fn a_lookup_tells_online_offline_and_not_a_user_within_its_budget() {
    let world = World::new("lookup", |args| {
        args.lookup_burst = Some(6);
        args.lookup_per_hour = Some(0);
    });
    let mut alice = world.user("+14155550161", 1).await.remove(0);
    let _bob = world.user("+14155550162", 1).await;
    let carol = world.user("+14155550163", 1).await;
    drop(carol.into_iter().next().and_then(|carol| carol.online));
    let lookup = |request_id: u64, numbers: &[&str]| {
        Kind::Lookup(frame::Lookup {
            request_id,
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
        })
    };
    let numbers = ["+14155550162", "+14155550163", "+14155550164", "hello"];
    let Kind::LookupResult(result) = world.ask(&mut alice, lookup(7, &numbers)).await else {
        panic!("not a lookup result");
    };
    assert_eq!(result.request_id, 7);
    let presences: Vec<(String, i32)> = result
        .entries
        .into_iter()
        .map(|entry| (entry.number, entry.presence))
        .collect();
    let expected: Vec<(String, i32)> = numbers
        .iter()
        .zip([
            Presence::Online,
            Presence::Offline,
            Presence::NotAUser,
            Presence::NotAUser,
        ])
        .map(|(number, presence)| (number.to_string(), presence as i32))
        .collect();
    assert_eq!(presences, expected, "in the order asked");

    let too_many: Vec<String> = (0..=tidings_proto::MAX_LOOKUP_NUMBERS)
        .map(|n| format!("+1415555{n:04}"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let answer = world.ask(&mut alice, lookup(8, &too_many)).await;
    let (code, _, request_id) = error_of(&answer);
    assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 8));

    // Four of six spent: three more are past the budget, and a device list costs one too.
    let answer = world.ask(&mut alice, lookup(9, &numbers[..3])).await;
    assert_eq!(
        error_of(&answer),
        (
            ErrorCode::RateLimited,
            "lookup budget used up: try again later",
            9
        )
    );
    let devices = |request_id: u64, number: &str| {
        Kind::Devices(frame::DevicesRequest {
            request_id,
            number: number.into(),
        })
    };
    for request_id in [10, 11] {
        let Kind::DeviceList(_) = world
            .ask(&mut alice, devices(request_id, "+14155550164"))
            .await
        else {
            panic!("not a device list");
        };
    }
    let answer = world.ask(&mut alice, devices(12, "+14155550162")).await;
    assert_eq!(error_of(&answer).0, ErrorCode::RateLimited);
}

#[tokio::test]
async fn a_device_list_names_every_device_and_its_keys() {
    let world = World::new("devices", |_| {});
    let mut alice = world.user("+14155550171", 1).await.remove(0);
    let bob = world.user("+14155550172", 2).await;
    let devices = |number: &str| {
        Kind::Devices(frame::DevicesRequest {
            request_id: 3,
            number: number.into(),
        })
    };
    let Kind::DeviceList(list) = world.ask(&mut alice, devices("+14155550172")).await else {
        panic!("not a device list");
    };
    assert_eq!(list.request_id, 3);
    let mut listed = list.device_ids.clone();
    listed.sort();
    let mut expected: Vec<Vec<u8>> = ids(&[&bob[0], &bob[1]])
        .iter()
        .map(|d| d.as_bytes().to_vec())
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(list.devices.len(), 2, "both published their keys");
    // Not a user, or not a number: the same empty list.
    for number in ["+14155550179", "hello"] {
        let Kind::DeviceList(list) = world.ask(&mut alice, devices(number)).await else {
            panic!("not a device list");
        };
        assert!(
            list.device_ids.is_empty() && list.devices.is_empty(),
            "{number}"
        );
    }
}

#[tokio::test]
async fn disabling_deletes_the_account_and_signs_its_sessions_out() {
    let world = World::new("disable", |_| {});
    let mut alice = world.user("+14155550181", 2).await;
    let mut bob = world.user("+14155550182", 1).await.remove(0);
    let disable = Kind::Disable(frame::Disable { request_id: 5 });
    let answers = {
        world.run(&mut alice[0], disable).await;
        take_all(&alice[0].outbox)
    };
    assert_eq!(
        answers,
        [
            Kind::DisableResult(frame::DisableResult { request_id: 5 }),
            Kind::SignedOut(frame::SignedOut {
                reason: "the account was disabled".into()
            }),
        ]
    );
    let account = world.state.store.account(world.pseudonym("+14155550181"));
    assert_eq!(
        account.await.expect("a read"),
        None,
        "nothing of it is left"
    );
    let lookup = Kind::Lookup(frame::Lookup {
        request_id: 1,
        numbers: vec!["+14155550181".into()],
    });
    let Kind::LookupResult(result) = world.ask(&mut bob, lookup).await else {
        panic!("not a lookup result");
    };
    assert_eq!(result.entries[0].presence, Presence::NotAUser as i32);
    drop(alice.pop());
}
