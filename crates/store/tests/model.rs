//! The `Store` contract as a model test: proptest generates sequences of operations over a small
//! universe (three numbers, six devices, four message ids), each sequence runs against the
//! in-memory reference engine and against every real engine, each on a fresh store, and every
//! answer is compared.
//!
//! Engines hand out account ids of their own, so answers name accounts by the number that
//! registered them, and operations name them the same way. An engine joins the test with one
//! line in `every_engine_answers_as_the_model_does`: a function that makes a fresh [`Engine`],
//! which can also be opened again on what it stored ([`Op::Restart`]).

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use proptest::prelude::*;
use tidings_core::verification::{CodeRecord, LiveCode};
use tidings_core::{Millis, DAY, HOUR};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::memory::MemoryStore;
use tidings_store::postgres::PostgresStore;
use tidings_store::sqlite::{SqliteOptions, SqliteStore};
use tidings_store::{
    AccountId, AckKind, Actor, Completion, HeldAck, IdentityKeys, NewMessage, Pseudonym,
    QueueCursor, QueueLimits, SignedKey, Store, StoreError, Voucher,
};

mod common;
use common::TempPostgres;

const NUMBERS: u8 = 3;
const DEVICES: u8 = 6;
const MESSAGE_IDS: u8 = 4;

/// Which copies a generated send carries, relative to the devices that must get one.
#[derive(Debug, Clone)]
enum Copies {
    /// Exactly the devices that must get one.
    Right,
    /// One of them left out (the `n`-th, modulo their number).
    WithoutOne(usize),
    /// One device too many.
    WithExtra(u8),
    /// The first one twice.
    OneTwice,
    /// These devices, whoever must get one.
    These(Vec<u8>),
}

/// What a code-record update does with the record it finds.
#[derive(Debug, Clone)]
enum CodeUpdate {
    Keep,
    Clear,
    Set {
        live: Option<(u8, Millis, u32)>,
        sent_at: Vec<Millis>,
    },
}

/// One generated operation; numbers, devices and ids are indexes into the universe.
#[derive(Debug, Clone)]
enum Op {
    Register {
        number: u8,
        device: u8,
        /// The OPRF key version its pseudonym is under ([`keyed`]).
        version: u32,
    },
    /// Moves the number's account from its pseudonym under `old` to the one under `new`.
    Rekey {
        number: u8,
        old: u32,
        new: u32,
    },
    AccountsByKeyVersion,
    ForgetPreviousPseudonyms,
    /// `by` is the acting device of the number's account ([`Actor`]): `None` for its first
    /// device (by id), as a live request would be; a device index for any other, mostly one
    /// that is not the account's.
    AddDevice {
        number: u8,
        by: Option<u8>,
        device: u8,
        identity: u8,
        max_devices: usize,
    },
    RemoveDevice {
        number: u8,
        by: Option<u8>,
        device: u8,
    },
    DeleteAccount {
        number: u8,
        by: Option<u8>,
    },
    PublishKeys {
        device: u8,
        identity: u8,
        keys: Vec<u8>,
        fallback: Option<u8>,
        max_stored: u32,
    },
    ClaimKeys {
        claimer: u8,
        by: Option<u8>,
        number: u8,
        only: Vec<u8>,
    },
    SetVoucher {
        number: u8,
        device: u8,
        by: u8,
    },
    Enqueue {
        sender: u8,
        id: u8,
        receiver: u8,
        copies: Copies,
        limits: QueueLimits,
        expires_at: Millis,
        submitted: bool,
        /// The contact token the send presents, by index (its hash is `[token; 32]`).
        token: Option<u8>,
        /// Copies, by index among the chosen ones, named as decided instead
        /// ([`NewMessage::decided`]): a held message's undecided copies stored later.
        decided: Vec<usize>,
    },
    /// Whether a message may be pushed before anything is stored ([`Store::screen`]), built as
    /// `Enqueue` builds one.
    Screen {
        sender: u8,
        id: u8,
        receiver: u8,
        copies: Copies,
        token: Option<u8>,
        decided: Vec<usize>,
    },
    /// A held copy's acknowledgement by `device` ([`Store::ack_held`]): shown, shown without a
    /// receipt, or (a caller's mistake) discarded.
    AckHeld {
        device: u8,
        sender: u8,
        id: u8,
        kind: u8,
        expires_at: Millis,
    },
    SetContactToken {
        device: u8,
        token: u8,
    },
    Pending {
        device: u8,
        page: usize,
        now: Millis,
    },
    /// Acknowledges the `pick`-th copy waiting for the device, if it names one and any waits;
    /// otherwise the copy from `sender` with `id` (mostly a replay or a stranger's).
    Ack {
        device: u8,
        pick: Option<usize>,
        sender: u8,
        id: u8,
        staged: bool,
        /// Shown, shown without a receipt, or discarded.
        kind: u8,
        /// Acknowledged a second time (its device never heard the first answer).
        again: bool,
    },
    /// Withdraws the message of the `pick`-th copy waiting for `via`, if it names one and any
    /// waits; otherwise the message from `sender` with `id`.
    Withdraw {
        via: u8,
        pick: Option<usize>,
        sender: u8,
        id: u8,
        /// The server holds copies of it until then ([`Store::withdraw_held`]).
        held_until: Option<Millis>,
    },
    Expire {
        now: Millis,
        limit: usize,
    },
    Receipts {
        device: u8,
    },
    AckReceipt {
        device: u8,
        id: u8,
    },
    Backlog {
        device: u8,
    },
    HoldsCopyFrom {
        device: u8,
        sender: u8,
    },
    ClearMissed {
        device: u8,
        seen: u32,
    },
    Reads {
        number: u8,
        device: u8,
    },
    UpdateCode {
        number: u8,
        update: CodeUpdate,
    },
    PruneCodes {
        now: Millis,
    },
    /// The engine is opened again on what it stored (the model forgets what a persistent engine
    /// holds in memory only: which copies are strangers').
    Restart,
}

fn number() -> impl Strategy<Value = u8> {
    0..NUMBERS
}

fn device() -> impl Strategy<Value = u8> {
    0..DEVICES
}

fn message_id() -> impl Strategy<Value = u8> {
    0..MESSAGE_IDS
}

fn copies() -> impl Strategy<Value = Copies> {
    prop_oneof![
        6 => Just(Copies::Right),
        1 => (0..4usize).prop_map(Copies::WithoutOne),
        1 => device().prop_map(Copies::WithExtra),
        1 => Just(Copies::OneTwice),
        1 => prop::collection::vec(device(), 0..3).prop_map(Copies::These),
    ]
}

/// Limits small enough that generated sequences reach each of them. Every copy's payload is 3
/// bytes (see `Op::Enqueue`), so a sender's share of one queue is 1 to 4 copies by bytes as well
/// as by count, and its quota 2 to 8 copies across all queues; strangers share 1 to 3 copies of
/// each queue.
fn queue_limits() -> impl Strategy<Value = QueueLimits> {
    (1..4u32, 1..5u32, 3..13u64, 6..25u64, 1..4u32).prop_map(
        |(device_copies, sender_copies, sender_bytes, account_bytes, stranger_copies)| {
            QueueLimits {
                device_copies,
                sender_copies,
                sender_bytes,
                account_bytes,
                stranger_copies,
            }
        },
    )
}

fn code_update() -> impl Strategy<Value = CodeUpdate> {
    let time = prop_oneof![Just(0), Just(HOUR), Just(9 * HOUR), Just(30 * HOUR)];
    prop_oneof![
        Just(CodeUpdate::Keep),
        Just(CodeUpdate::Clear),
        (
            prop::option::of((any::<u8>(), time.clone(), 0..3u32)),
            prop::collection::vec(time, 0..3)
        )
            .prop_map(|(live, sent_at)| CodeUpdate::Set { live, sent_at }),
    ]
}

/// Which of a send's copies are named as decided instead: mostly none.
fn decided() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(0..4usize, 1..3)]
}

/// The acting device of an operation: mostly the account's first device, sometimes any device.
fn actor() -> impl Strategy<Value = Option<u8>> {
    prop::option::weighted(0.2, device())
}

fn op() -> impl Strategy<Value = Op> {
    // Message times: sent at 1, expiring within a hundred milliseconds of the clock's start.
    let clock = 0..120u64;
    prop_oneof![
        4 => (number(), device(), prop_oneof![4 => Just(1u32), 1 => 2..4u32])
            .prop_map(|(number, device, version)| Op::Register { number, device, version }),
        2 => (number(), 1..4u32, 1..4u32).prop_map(|(number, old, new)| Op::Rekey { number, old, new }),
        1 => Just(Op::AccountsByKeyVersion),
        1 => Just(Op::ForgetPreviousPseudonyms),
        3 => (number(), actor(), device(), 0..3u8, 1..4usize).prop_map(
            |(number, by, device, identity, max_devices)| Op::AddDevice {
                number,
                by,
                device,
                identity,
                max_devices,
            }
        ),
        1 => (number(), actor(), device())
            .prop_map(|(number, by, device)| Op::RemoveDevice { number, by, device }),
        1 => (number(), actor()).prop_map(|(number, by)| Op::DeleteAccount { number, by }),
        4 => (
            device(),
            0..6u8,
            prop::collection::vec(0..5u8, 0..3),
            prop::option::of(0..3u8),
            0..4u32
        )
            .prop_map(|(device, identity, keys, fallback, max_stored)| Op::PublishKeys {
                device,
                identity,
                keys,
                fallback,
                max_stored,
            }),
        2 => (
            number(),
            actor(),
            number(),
            prop::collection::vec(device(), 0..2)
        )
            .prop_map(|(claimer, by, number, only)| Op::ClaimKeys {
                claimer,
                by,
                number,
                only
            }),
        1 => (number(), device(), device())
            .prop_map(|(number, device, by)| Op::SetVoucher { number, device, by }),
        8 => (
            device(),
            message_id(),
            number(),
            copies(),
            queue_limits(),
            // Sometimes longer than a stranger's message is kept.
            prop_oneof![4 => 10..110u64, 1 => Just(4 * DAY)],
            any::<bool>(),
            prop::option::of(0..3u8),
            decided()
        )
            .prop_map(
                |(sender, id, receiver, copies, limits, expires_at, submitted, token, decided)| {
                    Op::Enqueue {
                        sender,
                        id,
                        receiver,
                        copies,
                        limits,
                        expires_at,
                        submitted,
                        token,
                        decided,
                    }
                }
            ),
        3 => (
            device(),
            message_id(),
            number(),
            copies(),
            prop::option::of(0..3u8),
            decided()
        )
            .prop_map(|(sender, id, receiver, copies, token, decided)| Op::Screen {
                sender,
                id,
                receiver,
                copies,
                token,
                decided,
            }),
        4 => (
            device(),
            device(),
            message_id(),
            prop_oneof![4 => 0..2u8, 1 => Just(2u8)],
            prop_oneof![4 => 10..110u64, 1 => Just(4 * DAY)]
        )
            .prop_map(|(device, sender, id, kind, expires_at)| Op::AckHeld {
                device,
                sender,
                id,
                kind,
                expires_at,
            }),
        2 => (device(), 0..3u8)
            .prop_map(|(device, token)| Op::SetContactToken { device, token }),
        3 => (device(), 1..4usize, clock.clone())
            .prop_map(|(device, page, now)| Op::Pending { device, page, now }),
        8 => (
            device(),
            prop::option::weighted(0.8, 0..3usize),
            device(),
            message_id(),
            any::<bool>(),
            0..3u8,
            prop::bool::weighted(0.3)
        )
            .prop_map(|(device, pick, sender, id, staged, kind, again)| Op::Ack {
                device,
                pick,
                sender,
                id,
                staged,
                kind,
                again,
            }),
        3 => (
            device(),
            prop::option::weighted(0.7, 0..3usize),
            device(),
            message_id(),
            prop::option::weighted(0.4, prop_oneof![10..110u64, Just(4 * DAY)])
        )
            .prop_map(|(via, pick, sender, id, held_until)| Op::Withdraw {
                via,
                pick,
                sender,
                id,
                held_until,
            }),
        // Sometimes a day later, when the receipts of the first messages stop waiting.
        2 => (
            prop_oneof![3 => clock.clone(), 1 => DAY..DAY + 240, 1 => Just(3 * DAY + HOUR)],
            1..4usize
        )
            .prop_map(|(now, limit)| Op::Expire { now, limit }),
        2 => device().prop_map(|device| Op::Receipts { device }),
        2 => (device(), message_id()).prop_map(|(device, id)| Op::AckReceipt { device, id }),
        1 => device().prop_map(|device| Op::Backlog { device }),
        1 => (device(), device()).prop_map(|(device, sender)| Op::HoldsCopyFrom { device, sender }),
        1 => (device(), 0..3u32).prop_map(|(device, seen)| Op::ClearMissed { device, seen }),
        2 => (number(), device()).prop_map(|(number, device)| Op::Reads { number, device }),
        1 => (number(), code_update()).prop_map(|(number, update)| Op::UpdateCode { number, update }),
        1 => prop_oneof![Just(0), Just(2 * HOUR), Just(40 * HOUR)]
            .prop_map(|now| Op::PruneCodes { now }),
        3 => Just(Op::Restart),
    ]
}

fn pseudonym(number: u8) -> Pseudonym {
    keyed(number, 1)
}

/// The number's pseudonym under the OPRF key of `version` (1 to 3).
fn keyed(number: u8, version: u32) -> Pseudonym {
    let version = u8::try_from(version).unwrap_or(0);
    Pseudonym([0xA0 + number + 0x10 * version.saturating_sub(1); 32])
}

fn device_id(device: u8) -> DeviceId {
    DeviceId([device + 1; 16])
}

fn id(id: u8) -> MessageId {
    MessageId([id + 1; 16])
}

fn identity(n: u8) -> IdentityKeys {
    IdentityKeys {
        identity_key: [n; 32],
        signing_key: [n + 100; 32],
    }
}

fn signed_key(n: u8) -> SignedKey {
    SignedKey {
        public_key: [n; 32],
        signature: [n + 50; 64],
    }
}

/// Runs `ops` against one store; each operation's answer as text, with accounts named by number.
struct Run<'a, S> {
    store: &'a S,
    /// The account each number registered, in this engine's ids.
    accounts: HashMap<u8, AccountId>,
    /// Every account id the engine handed out: none is handed out twice (a session left from a
    /// deleted account must not reach the next one), which a registration's answer says.
    handed_out: Vec<AccountId>,
}

impl<S: Store> Run<'_, S> {
    /// The account of a number, or an id no engine hands out when it has none.
    fn account(&self, number: u8) -> AccountId {
        self.accounts
            .get(&number)
            .copied()
            .unwrap_or(AccountId(i64::MAX - i64::from(number)))
    }

    /// The actor `by` of a number's account: its first device by id, or device `by` (see
    /// [`Op::AddDevice`]). A number without an account or device acts with a device no engine
    /// has.
    async fn actor(&self, number: u8, by: Option<u8>) -> Actor {
        let account = self.account(number);
        let device = match by {
            Some(by) => device_id(by),
            None => {
                let devices = self.store.devices_of(account).await.unwrap_or_default();
                devices.into_iter().min().unwrap_or(DeviceId([0xEE; 16]))
            }
        };
        Actor { account, device }
    }

    /// An answer as text, with every account id replaced by the number that registered it.
    fn text(&self, answer: impl Debug) -> String {
        let mut text = format!("{answer:?}");
        for (number, account) in &self.accounts {
            text = text.replace(
                &format!("AccountId({})", account.0),
                &format!("Account(number {number})"),
            );
        }
        text
    }

    /// An error by its kind (engines word their own failures differently).
    fn result<T: Debug>(&self, result: Result<T, StoreError>) -> String {
        match result {
            Ok(value) => self.text(value),
            Err(StoreError::Engine(_)) => "engine failure".into(),
            Err(e) => format!("{e}"),
        }
    }

    /// The copies a generated send carries, from what this engine says must get one.
    async fn copies(
        &self,
        sender: DeviceId,
        receiver: AccountId,
        choice: &Copies,
    ) -> Vec<DeviceId> {
        let sender_account = match self.store.device(sender).await {
            Ok(Some(device)) => Some(device.account),
            _ => None,
        };
        let mut accounts = vec![receiver];
        accounts.extend(sender_account.filter(|account| *account != receiver));
        let mut right = Vec::new();
        for account in accounts {
            for listed in self.store.device_keys(account).await.unwrap_or_default() {
                if listed.identity.is_some() && listed.id != sender {
                    right.push(listed.id);
                }
            }
        }
        match choice {
            Copies::Right => right,
            Copies::WithoutOne(n) => {
                if !right.is_empty() {
                    right.remove(n % right.len());
                }
                right
            }
            Copies::WithExtra(device) => {
                right.push(device_id(*device));
                right
            }
            Copies::OneTwice => {
                if let Some(first) = right.first().copied() {
                    right.push(first);
                }
                right
            }
            Copies::These(devices) => devices.iter().copied().map(device_id).collect(),
        }
    }

    /// A generated send from `sender` with `id` to `receiver`'s number, its copies chosen as
    /// `copies` (those `decided` picks named as decided instead).
    async fn message(
        &self,
        (sender, message, receiver): (u8, u8, u8),
        copies: &Copies,
        decided: &[usize],
        token: Option<u8>,
        expires_at: Millis,
    ) -> NewMessage {
        let sender_device = device_id(sender);
        let receiver = self.account(receiver);
        let sender_account = match self.store.device(sender_device).await {
            Ok(Some(device)) => device.account,
            _ => AccountId(-1),
        };
        let mut copies = self.copies(sender_device, receiver, copies).await;
        let mut named = Vec::new();
        for pick in decided {
            if !copies.is_empty() {
                named.push(copies.remove(pick % copies.len()));
            }
        }
        NewMessage {
            decided: named,
            sender_device,
            sender_account,
            id: id(message),
            receiver,
            sent_at: 1,
            expires_at,
            copies: copies
                .into_iter()
                .map(|d| (d, Bytes::from(vec![sender, message, d.0[0]])))
                .collect(),
            contact_token_hash: token.map(|token| [token; 32]),
        }
    }

    /// The sender and id of the `pick`-th copy waiting for `device`, if it names one and any
    /// waits.
    async fn waiting(&self, device: u8, pick: Option<usize>) -> Option<(DeviceId, MessageId)> {
        let pick = pick?;
        let waiting = self
            .store
            .pending(device_id(device), QueueCursor::START, 100, 0)
            .await
            .ok()?;
        let copy = waiting.get(pick % waiting.len().max(1))?;
        Some((copy.sender_device, copy.id))
    }

    /// A staged write's answers: once executed, then once durable.
    async fn staged<T: Clone + Debug>(&self, mut completion: Completion<T>) -> String {
        let early = completion.executed().await;
        let durable = completion.durable().await;
        format!("{} then {}", self.text(early), self.result(durable))
    }

    async fn apply(&mut self, op: &Op) -> String {
        let store = self.store;
        match op.clone() {
            Op::Rekey { number, old, new } => {
                let account = self.account(number);
                let rekeyed = store
                    .rekey_account(account, keyed(number, old), keyed(number, new), new)
                    .await;
                self.result(rekeyed)
            }
            Op::AccountsByKeyVersion => self.result(store.accounts_by_key_version().await),
            Op::ForgetPreviousPseudonyms => self.result(store.forget_previous_pseudonyms().await),
            Op::Register {
                number,
                device,
                version,
            } => {
                let registered = store
                    .register_device(
                        keyed(number, version),
                        version,
                        device_id(device),
                        [device; 32],
                        5,
                    )
                    .await;
                let mut reused = "";
                if let Ok(registered) = &registered {
                    let account = registered.account;
                    if self.accounts.get(&number) != Some(&account) {
                        if self.handed_out.contains(&account) {
                            reused = " (an account id handed out before)";
                        }
                        self.handed_out.push(account);
                    }
                    self.accounts.insert(number, account);
                }
                self.result(registered) + reused
            }
            Op::AddDevice {
                number,
                by,
                device,
                identity: n,
                max_devices,
            } => {
                let approver = self.actor(number, by).await;
                let added = store
                    .add_device(
                        approver,
                        device_id(device),
                        [device; 32],
                        identity(n),
                        max_devices,
                        5,
                    )
                    .await;
                self.result(added)
            }
            Op::RemoveDevice { number, by, device } => {
                let actor = self.actor(number, by).await;
                let removed = store.remove_device(actor, device_id(device)).await;
                self.result(removed)
            }
            Op::DeleteAccount { number, by } => {
                let actor = self.actor(number, by).await;
                let deleted = store.delete_account(actor).await;
                let answer = self.result(deleted);
                if !answer.starts_with("engine failure") && answer != "no such account" {
                    self.accounts.remove(&number);
                }
                answer
            }
            Op::PublishKeys {
                device,
                identity: n,
                keys,
                fallback,
                max_stored,
            } => {
                let keys = keys.into_iter().map(signed_key).collect();
                let fallback = fallback.map(|n| signed_key(n + 10));
                let published = store
                    .publish_keys(device_id(device), identity(n), keys, fallback, max_stored)
                    .await;
                self.result(published)
            }
            Op::ClaimKeys {
                claimer,
                by,
                number,
                only,
            } => {
                let only = only.into_iter().map(device_id).collect();
                let claimer = self.actor(claimer, by).await;
                let claimed = store.claim_keys(claimer, self.account(number), only).await;
                self.result(claimed)
            }
            Op::SetVoucher { number, device, by } => {
                let voucher = Voucher {
                    by: device_id(by),
                    signature: [by; 64],
                };
                let set = store
                    .set_voucher(self.account(number), device_id(device), voucher)
                    .await;
                self.result(set)
            }
            Op::Enqueue {
                sender,
                id: message,
                receiver,
                copies,
                limits,
                expires_at,
                submitted,
                token,
                decided,
            } => {
                let message = self
                    .message(
                        (sender, message, receiver),
                        &copies,
                        &decided,
                        token,
                        expires_at,
                    )
                    .await;
                let enqueued = if submitted {
                    match store.enqueue_submit(message, limits).await {
                        Ok(completion) => completion.durable().await,
                        Err(e) => Err(e),
                    }
                } else {
                    store.enqueue(message, limits).await
                };
                self.result(enqueued)
            }
            Op::Pending { device, page, now } => {
                // The whole queue, page by page; positions are the engine's, so only their
                // order is compared.
                let mut after = QueueCursor::START;
                let mut copies = Vec::new();
                loop {
                    let read = store.pending(device_id(device), after, page, now).await;
                    let read = match read {
                        Ok(read) => read,
                        Err(e) => return self.result::<()>(Err(e)),
                    };
                    for pending in &read {
                        assert!(pending.cursor > after, "positions go up");
                        after = pending.cursor;
                        copies.push((
                            pending.sender_device,
                            pending.id,
                            pending.sent_at,
                            pending.payload.to_vec(),
                        ));
                    }
                    if read.len() < page {
                        break;
                    }
                }
                self.text(copies)
            }
            Op::Ack {
                device,
                pick,
                sender,
                id: message,
                staged,
                kind,
                again,
            } => {
                let (sender, id) = self
                    .waiting(device, pick)
                    .await
                    .unwrap_or((device_id(sender), id(message)));
                let device = device_id(device);
                let kind = match kind {
                    0 => AckKind::Shown,
                    1 => AckKind::ShownWithoutReceipt,
                    _ => AckKind::Discarded,
                };
                let mut answers = Vec::new();
                for _ in 0..if again { 2 } else { 1 } {
                    answers.push(if staged {
                        match store.ack_staged_as(device, sender, id, kind).await {
                            Ok(completion) => self.staged(completion).await,
                            Err(e) => self.result::<()>(Err(e)),
                        }
                    } else {
                        let acked = store.ack_as(device, sender, id, kind).await;
                        self.result(acked)
                    });
                }
                answers.join(", again ")
            }
            Op::Screen {
                sender,
                id: message,
                receiver,
                copies,
                token,
                decided,
            } => {
                let message = self
                    .message((sender, message, receiver), &copies, &decided, token, 50)
                    .await;
                self.result(store.screen(&message).await)
            }
            Op::AckHeld {
                device,
                sender,
                id: message,
                kind,
                expires_at,
            } => {
                let copy = HeldAck {
                    device: device_id(device),
                    sender_device: device_id(sender),
                    id: id(message),
                    sent_at: 1,
                    expires_at,
                };
                let kind = match kind {
                    0 => AckKind::Shown,
                    1 => AckKind::ShownWithoutReceipt,
                    _ => AckKind::Discarded,
                };
                match store.ack_held(copy, kind).await {
                    Ok(completion) => self.staged(completion).await,
                    Err(e) => self.result::<()>(Err(e)),
                }
            }
            Op::Withdraw {
                via,
                pick,
                sender,
                id: message,
                held_until,
            } => {
                let (sender, id) = self
                    .waiting(via, pick)
                    .await
                    .unwrap_or((device_id(sender), id(message)));
                let withdrawn = match held_until {
                    Some(until) => store.withdraw_held(sender, id, Some(until)).await,
                    None => store.withdraw(sender, id).await,
                };
                self.result(withdrawn)
            }
            Op::SetContactToken { device, token } => {
                let set = store
                    .set_contact_token(device_id(device), [token; 32])
                    .await;
                self.result(set)
            }
            Op::Expire { now, limit } => {
                let expired = store.expire(now, limit).await;
                self.result(expired)
            }
            Op::Receipts { device } => {
                let receipts = store.receipts(device_id(device)).await;
                self.result(receipts)
            }
            Op::AckReceipt {
                device,
                id: message,
            } => {
                let acked = store.ack_receipt(device_id(device), id(message)).await;
                self.result(acked)
            }
            Op::Backlog { device } => {
                let backlog = store.backlog(device_id(device)).await;
                self.result(backlog)
            }
            Op::ClearMissed { device, seen } => {
                let cleared = store.clear_missed(device_id(device), seen).await;
                self.result(cleared)
            }
            Op::HoldsCopyFrom { device, sender } => {
                let holds = store
                    .holds_copy_from(device_id(device), device_id(sender))
                    .await;
                self.result(holds)
            }
            Op::Reads { number, device } => {
                let (account, device) = (self.account(number), device_id(device));
                let all = (0..NUMBERS)
                    .flat_map(|n| (1..4).map(move |v| keyed(n, v)))
                    .collect();
                [
                    self.result(store.account(pseudonym(number)).await),
                    self.result(store.account(keyed(number, 2)).await),
                    self.result(store.route(pseudonym(number)).await),
                    self.result(store.route(keyed(number, 2)).await),
                    self.result(store.accounts(all).await),
                    self.result(store.devices_of(account).await),
                    self.result(store.device_keys(account).await),
                    self.result(store.device(device).await),
                    self.result(store.login_device(device).await),
                    self.result(store.resume_device(device).await),
                    self.result(store.key_status(device).await),
                ]
                .join("; ")
            }
            Op::UpdateCode { number, update } => {
                let updated = store
                    .update_code_record(pseudonym(number), move |record| {
                        let before = record.clone();
                        match update {
                            CodeUpdate::Keep => {}
                            CodeUpdate::Clear => *record = None,
                            CodeUpdate::Set { live, sent_at } => {
                                *record = Some(CodeRecord {
                                    live: live.map(|(hash, expires_at, attempts)| LiveCode {
                                        hash: [hash; 32],
                                        expires_at,
                                        attempts,
                                    }),
                                    sent_at,
                                })
                            }
                        }
                        before
                    })
                    .await;
                self.result(updated)
            }
            Op::PruneCodes { now } => {
                let pruned = store.prune_codes(now).await;
                self.result(pruned)
            }
            // Run by `answers`, which holds the engine.
            Op::Restart => "restarted".to_string(),
        }
    }
}

/// Where every sequence starts: each number registered, two of them with a second device, and
/// keys published for all five devices (device 5 stays unregistered).
fn populated() -> Vec<Op> {
    let mut ops = Vec::new();
    for number in 0..NUMBERS {
        ops.push(Op::Register {
            number,
            device: number,
            version: 1,
        });
    }
    for (number, device) in [(0, 3), (1, 4)] {
        ops.push(Op::AddDevice {
            number,
            by: None,
            device,
            identity: device,
            max_devices: 3,
        });
    }
    for device in 0..5 {
        ops.push(Op::PublishKeys {
            device,
            identity: device,
            keys: vec![device, device + 1],
            fallback: Some(device),
            max_stored: 10,
        });
    }
    ops
}

/// An engine under test: its store, and a restart on what it stored ([`Op::Restart`]).
trait Engine {
    type Store: Store;
    fn store(&self) -> &Self::Store;
    async fn restart(&mut self);
}

impl Engine for MemoryStore {
    type Store = MemoryStore;

    fn store(&self) -> &MemoryStore {
        self
    }

    async fn restart(&mut self) {
        MemoryStore::restart(self).expect("restart the model");
    }
}

/// Every answer `engine` gives to `ops`, in order.
async fn answers<E: Engine>(engine: &mut E, ops: &[Op]) -> Vec<String> {
    let (mut accounts, mut handed_out) = (HashMap::new(), Vec::new());
    let mut answers = Vec::with_capacity(ops.len());
    for op in ops {
        if let Op::Restart = op {
            engine.restart().await;
            answers.push("restarted".to_string());
            continue;
        }
        let mut run = Run {
            store: engine.store(),
            accounts,
            handed_out,
        };
        answers.push(run.apply(op).await);
        (accounts, handed_out) = (run.accounts, run.handed_out);
    }
    answers
}

/// Runs `ops` on the model and on a fresh engine from `open`, and fails at the first answer
/// that differs.
fn check_against_model<E: Engine, Opened: Future<Output = E>>(
    engine: &str,
    open: impl FnOnce() -> Opened,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (expected, got) = runtime.block_on(async {
        let mut model = MemoryStore::new();
        let mut store = open().await;
        (
            answers(&mut model, ops).await,
            answers(&mut store, ops).await,
        )
    });
    for (at, (op, (expected, got))) in ops.iter().zip(expected.iter().zip(&got)).enumerate() {
        prop_assert_eq!(
            expected,
            got,
            "{} answered operation {} ({:?}) unlike the model",
            engine,
            at,
            op
        );
    }
    Ok(())
}

/// A fresh SQLite store in a directory of its own, removed when dropped.
struct TempSqlite {
    store: Option<SqliteStore>,
    dir: std::path::PathBuf,
}

impl Engine for TempSqlite {
    type Store = SqliteStore;

    fn store(&self) -> &SqliteStore {
        self.store.as_ref().expect("open")
    }

    /// Closes the store and opens the database again.
    async fn restart(&mut self) {
        drop(self.store.take());
        self.store = Some(SqliteStore::open(&self.dir, Self::options()).expect("reopen"));
    }
}

impl TempSqlite {
    fn options() -> SqliteOptions {
        SqliteOptions {
            max_batch: 64,
            sync_observer: None,
        }
    }

    fn open() -> Self {
        static OPENED: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tidings-model-{}-{}",
            std::process::id(),
            OPENED.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = SqliteStore::open(&dir, Self::options()).expect("open");
        Self {
            store: Some(store),
            dir,
        }
    }
}

impl Drop for TempSqlite {
    fn drop(&mut self) {
        drop(self.store.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Engine for TempPostgres {
    type Store = PostgresStore;

    fn store(&self) -> &PostgresStore {
        TempPostgres::store(self)
    }

    /// Closes the store and connects again: what it held in memory only is gone.
    async fn restart(&mut self) {
        self.reopen().await;
    }
}

proptest! {
    // Each case opens a database and syncs every write: about a hundred cases of up to 48 operations
    // keep this test near twenty seconds.
    #![proptest_config(ProptestConfig {
        cases: 100,
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_engine_answers_as_the_model_does(generated in prop::collection::vec(op(), 1..48)) {
        let ops: Vec<Op> = populated().into_iter().chain(generated).collect();
        check_against_model("SQLite", || async { TempSqlite::open() }, &ops)?;
        check_against_model("PostgreSQL", TempPostgres::open, &ops)?;
    }
}
