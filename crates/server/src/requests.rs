//! The session's requests: send, acknowledge, look up, list devices, disable. Each runs as a task
//! of its session and answers through the session's queue.
//!
//! Nothing here logs a number, a payload or a key; a lookup writes nothing at all.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tidings_core::fallback::Withdrawal;
use tidings_core::routing::{self, Decision, Receiver};
use tidings_core::{Millis, HOUR};
use tidings_proto::frame::{
    self, AckStatus, ErrorCode, Frame, Kind, Presence, ReceiptKind, SendMode, SendOutcome,
    WithdrawState,
};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tidings_proto::{MAX_COPIES, MAX_LOOKUP_NUMBERS, MAX_PAYLOAD_BYTES};
use tidings_store::{Acked, DeviceDifference, Enqueued, NewMessage, Store as _, StoreError};
use tokio::sync::Notify;

use crate::hub::{Outbound, Outbox};
use crate::metrics::Outcome;
use crate::session::Identity;
use crate::state::{now_ms, take_budget, Shared, QUEUE_LIMIT};

/// The frame that delivers one stored copy.
pub fn deliver_frame(
    sender_device: DeviceId,
    id: MessageId,
    sent_at: Millis,
    payload: Bytes,
) -> Frame {
    Kind::Deliver(frame::Deliver {
        sender_device: sender_device.as_bytes().to_vec(),
        id: id.as_bytes().to_vec(),
        sent_at_ms: sent_at,
        payload,
    })
    .into()
}

fn error(code: ErrorCode, message: &str, request_id: u64) -> Outbound {
    Outbound::Frame(
        Kind::Error(frame::Error {
            code: code as i32,
            message: message.into(),
            fatal: false,
            request_id,
        })
        .into(),
    )
}

async fn answer(tx: &Outbox, frame: Frame) {
    let _ = tx.send(Outbound::Frame(frame)).await;
}

/// Keeps a session's sends in the order their frames arrived where order matters: when each is
/// handed to storage (so the receiver's queue holds them in the sender's order) and when each is
/// pushed to the receiver's live sessions. End-to-end encryption needs it: a receiver's Olm
/// session keeps only a few dozen skipped message keys, so messages reordered further than that
/// could no longer be decrypted. The syncs themselves are still shared (group commit).
#[derive(Debug, Default)]
pub struct SendOrder {
    issued: AtomicU64,
    hand_over: Lane,
    push: Lane,
}

/// One ordered step: tickets pass it one after the other.
#[derive(Debug, Default)]
struct Lane {
    current: AtomicU64,
    passed: Notify,
}

impl Lane {
    async fn wait(&self, ticket: u64) -> Turn<'_> {
        loop {
            let passed = self.passed.notified();
            tokio::pin!(passed);
            passed.as_mut().enable();
            if self.current.load(Ordering::Acquire) == ticket {
                return Turn { lane: self };
            }
            passed.await;
        }
    }
}

impl SendOrder {
    /// The place of a send frame, taken when the frame is read.
    pub fn ticket(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::AcqRel)
    }
}

/// A send's turn in a lane; the next send's turn begins when this is dropped (on every path,
/// early answers included).
struct Turn<'a> {
    lane: &'a Lane,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.lane.current.fetch_add(1, Ordering::AcqRel);
        self.lane.passed.notify_waiters();
    }
}

/// Handles `Send`, in its turn among the session's sends (see [`SendOrder`]).
pub async fn send(
    state: Shared,
    identity: Identity,
    send: frame::Send,
    tx: Outbox,
    order: Arc<SendOrder>,
    ticket: u64,
) {
    let id_bytes = send.id.clone();
    let stored = decide_and_store(&state, identity, send, &order, ticket).await;
    let (outcome, detail, difference) = match stored {
        Stored::Answer(outcome, detail) => (outcome, detail, DeviceDifference::default()),
        Stored::DevicesChanged(difference) => (
            SendOutcome::DevicesChanged,
            format!(
                "the copies do not match the devices: {} of the receiver and {} of yours have none, {} are not wanted",
                difference.missing.len(),
                difference.missing_own.len(),
                difference.extra.len()
            ),
            difference,
        ),
    };
    let ids = |devices: &[DeviceId]| devices.iter().map(|d| d.as_bytes().to_vec()).collect();
    state
        .metrics
        .sends
        .get_or_create(&Outcome {
            outcome: outcome.as_str(),
        })
        .inc();
    answer(
        &tx,
        Kind::SendResult(frame::SendResult {
            id: id_bytes,
            outcome: outcome as i32,
            detail,
            missing_devices: ids(&difference.missing),
            missing_own_devices: ids(&difference.missing_own),
            extra_devices: ids(&difference.extra),
        })
        .into(),
    )
    .await;
}

/// What deciding and storing a send came to.
enum Stored {
    Answer(SendOutcome, String),
    DevicesChanged(DeviceDifference),
}

/// Checks the copies' shape: device ids, no device twice, the bounds.
fn parse_copies(send: &frame::Send) -> Result<Vec<(DeviceId, Bytes)>, String> {
    if !send.payload.is_empty() {
        return Err(
            "plaintext payloads are not accepted: send one encrypted copy per device (update the client)"
                .into(),
        );
    }
    if send.copies.len() > MAX_COPIES {
        return Err(format!("at most {MAX_COPIES} copies per message"));
    }
    let total: usize = send.copies.iter().map(|c| c.payload.len()).sum();
    if total > MAX_PAYLOAD_BYTES {
        return Err(format!(
            "the copies together exceed {MAX_PAYLOAD_BYTES} bytes"
        ));
    }
    let mut copies: Vec<(DeviceId, Bytes)> = Vec::with_capacity(send.copies.len());
    for copy in &send.copies {
        let Some(device) = DeviceId::from_slice(&copy.device_id) else {
            return Err("copy device ids must be 16 bytes".into());
        };
        if copies.iter().any(|(d, _)| *d == device) {
            return Err("a device appears twice among the copies".into());
        }
        copies.push((device, copy.payload.clone()));
    }
    Ok(copies)
}

async fn decide_and_store(
    state: &Shared,
    identity: Identity,
    send: frame::Send,
    order: &SendOrder,
    ticket: u64,
) -> Stored {
    // Sends are decided concurrently; only the hand-over to storage and the push wait for
    // their turn. A send answered before storage still passes its turns, so later sends do not
    // wait for it.
    let mut handed_over = false;
    let decided = decide_and_enqueue(state, identity, send, order, ticket, &mut handed_over).await;
    if !handed_over {
        drop(order.hand_over.wait(ticket).await);
    }
    let _push_turn = order.push.wait(ticket).await;
    match decided {
        Ok((stored, (sender, id, sent_at, copies))) => {
            for (device, payload) in copies {
                let frame = deliver_frame(sender, id, sent_at, payload);
                state.hub.deliver(&device, 0, &frame);
            }
            stored
        }
        Err(stored) => stored,
    }
}

/// A stored message's copies, to push to live sessions: sender device, id, time, copies.
type Push = (DeviceId, MessageId, Millis, Vec<(DeviceId, Bytes)>);

/// Decides a send and stores it. `Ok` holds what to push; `Err` the answer when nothing is
/// pushed (refused, a duplicate, or failed).
async fn decide_and_enqueue(
    state: &Shared,
    identity: Identity,
    send: frame::Send,
    order: &SendOrder,
    ticket: u64,
    handed_over: &mut bool,
) -> Result<(Stored, Push), Stored> {
    let answer = |outcome, detail: &str| Err(Stored::Answer(outcome, detail.to_string()));
    let Some(id) = MessageId::from_slice(&send.id) else {
        return answer(SendOutcome::Invalid, "id must be 16 bytes");
    };
    let copies = match parse_copies(&send) {
        Ok(copies) => copies,
        Err(detail) => return Err(Stored::Answer(SendOutcome::Invalid, detail)),
    };
    let Ok(mode) = SendMode::try_from(send.mode) else {
        return answer(SendOutcome::Invalid, "unknown send mode");
    };
    let now = now_ms();
    if take_budget(
        &state.send_budgets,
        identity.device,
        1,
        state.config.send_burst,
        f64::from(state.config.send_per_second),
        now,
    )
    .is_err()
    {
        return answer(SendOutcome::RateLimited, "too many messages: slow down");
    }
    let pseudonym = match state.keys.pseudonym_of(&send.to) {
        Ok(Some(pseudonym)) => pseudonym,
        Ok(None) => {
            return answer(
                SendOutcome::Invalid,
                "the receiver is not a valid phone number",
            )
        }
        Err(_) => {
            return answer(
                SendOutcome::Unavailable,
                "the receiver cannot be looked up now",
            )
        }
    };
    let route = match state.store.route(pseudonym).await {
        Ok(route) => route,
        Err(e) => {
            tracing::warn!(error = %e, "storage read failed during a send");
            return answer(SendOutcome::Unavailable, "storage unavailable: try again");
        }
    };
    let receiver = match &route {
        None => Receiver::NotAUser,
        Some(route) => Receiver::User {
            devices_online: state.hub.count_online(&route.devices),
        },
    };
    let (outcome, expires_at) =
        match routing::decide(&state.retention, mode, send.ttl_seconds, receiver, now) {
            Decision::Refuse(outcome) => return answer(outcome, ""),
            Decision::Store {
                outcome,
                expires_at,
            } => (outcome, expires_at),
        };
    let Some(route) = route else {
        return answer(SendOutcome::NotAUser, "");
    };
    let message = NewMessage {
        sender_device: identity.device,
        sender_account: identity.account,
        id,
        receiver: route.account,
        sent_at: now,
        expires_at,
        copies: copies.clone(),
    };
    let turn = order.hand_over.wait(ticket).await;
    let submitted = state.store.enqueue_submit(message, QUEUE_LIMIT).await;
    // Handed over in order: the session's next send may go ahead while this one syncs.
    *handed_over = true;
    drop(turn);
    let enqueued = match submitted {
        Ok(submitted) => submitted.durable().await,
        Err(e) => Err(e),
    };
    match enqueued {
        Ok(Enqueued::Stored) => {}
        // The same id again: the copies were stored (and pushed) the first time.
        Ok(Enqueued::Duplicate) => return answer(outcome, ""),
        Ok(Enqueued::QueueFull) => return answer(SendOutcome::RefusedQueueFull, ""),
        Ok(Enqueued::DevicesChanged(difference)) => return Err(Stored::DevicesChanged(difference)),
        Err(StoreError::NoSuchAccount) => {
            return answer(
                SendOutcome::Unavailable,
                "the receiver has no device with published keys yet: try again later",
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during a send");
            return answer(SendOutcome::Unavailable, "storage unavailable: try again");
        }
    }
    // Durable now: each copy goes to its device's live sessions (in the session's order). A
    // device not online, or a session without room, gets its copy from its stored queue.
    Ok((
        Stored::Answer(outcome, String::new()),
        (identity.device, id, now, copies),
    ))
}

/// Handles `Ack`.
pub async fn ack(state: Shared, identity: Identity, ack: frame::Ack, tx: Outbox) {
    let (Some(sender_device), Some(id)) = (
        DeviceId::from_slice(&ack.sender_device),
        MessageId::from_slice(&ack.id),
    ) else {
        let _ = tx
            .send(error(
                ErrorCode::InvalidRequest,
                "ack needs a 16-byte sender_device and id",
                0,
            ))
            .await;
        return;
    };
    // The sender's receipt goes as soon as the acknowledgement has executed; the receiver's
    // `CONFIRMED` (after which it shows the message) only once it is durable. The message itself
    // was durable before it was pushed, so a crash between the two loses nothing: the copy is
    // delivered again, acknowledged again, and the receipt sent again (the sender ignores a
    // second one), while a withdraw in between still finds the message undelivered.
    //
    // A sender session that registers after the early receipt but before the sync may read the
    // store too early to see the receipt, so the sessions registered since are offered it again
    // after the sync (a second copy would be ignored).
    let acked = match state
        .store
        .ack_staged(identity.device, sender_device, id)
        .await
    {
        Ok(mut staged) => {
            let receipt = || -> Frame {
                Kind::Receipt(frame::Receipt {
                    id: id.as_bytes().to_vec(),
                    kind: ReceiptKind::Delivered as i32,
                })
                .into()
            };
            let newer = match staged.executed().await {
                Some(Acked::Confirmed { first: true }) => {
                    Some(state.hub.notify_from(&sender_device, &receipt(), 0))
                }
                _ => None,
            };
            let durable = staged.durable().await;
            if let (Some(newer), Ok(_)) = (newer, &durable) {
                state.hub.notify_from(&sender_device, &receipt(), newer);
            }
            durable
        }
        Err(e) => Err(e),
    };
    let status = match acked {
        Ok(Acked::Confirmed { .. }) => AckStatus::Confirmed,
        Ok(Acked::Unknown) => AckStatus::Unknown,
        Ok(Acked::Withdrawn) => AckStatus::Withdrawn,
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during an ack");
            let _ = tx
                .send(error(
                    ErrorCode::Unavailable,
                    "storage unavailable: acknowledge again",
                    0,
                ))
                .await;
            return;
        }
    };
    state
        .metrics
        .acks
        .get_or_create(&Outcome {
            outcome: match status {
                AckStatus::Confirmed => "confirmed",
                AckStatus::Unknown => "unknown",
                AckStatus::Withdrawn => "withdrawn",
            },
        })
        .inc();
    answer(
        &tx,
        Kind::AckResult(frame::AckResult {
            sender_device: ack.sender_device,
            id: ack.id,
            status: status as i32,
        })
        .into(),
    )
    .await;
}

/// Handles `ReceiptAck`.
pub async fn receipt_ack(state: Shared, identity: Identity, receipt: frame::ReceiptAck) {
    if let Some(id) = MessageId::from_slice(&receipt.id) {
        if let Err(e) = state.store.ack_receipt(identity.device, id).await {
            tracing::warn!(error = %e, "storage write failed during a receipt ack");
        }
    }
}

/// Sends the receipts stored for a device that just logged in.
pub async fn send_pending_receipts(state: Shared, device: DeviceId, tx: Outbox) {
    match state.store.receipts(device).await {
        Ok(receipts) => {
            for receipt in receipts {
                let frame = Kind::Receipt(frame::Receipt {
                    id: receipt.id.as_bytes().to_vec(),
                    kind: receipt.kind as i32,
                })
                .into();
                if tx.send(Outbound::Frame(frame)).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read pending receipts"),
    }
}

fn take_lookup_budget(state: &Shared, device: DeviceId, n: usize) -> bool {
    let per_second = f64::from(state.config.lookup_per_hour) / (HOUR as f64 / 1000.0);
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    take_budget(
        &state.lookup_budgets,
        device,
        n,
        state.config.lookup_burst,
        per_second,
        now_ms(),
    )
    .is_ok()
}

/// Handles `Lookup`. Reads only; nothing about it is written or logged.
pub async fn lookup(state: Shared, identity: Identity, lookup: frame::Lookup, tx: Outbox) {
    if lookup.numbers.len() > MAX_LOOKUP_NUMBERS {
        let message = format!("at most {MAX_LOOKUP_NUMBERS} numbers per lookup");
        let _ = tx
            .send(error(
                ErrorCode::InvalidRequest,
                &message,
                lookup.request_id,
            ))
            .await;
        return;
    }
    if !take_lookup_budget(&state, identity.device, lookup.numbers.len()) {
        let _ = tx
            .send(error(
                ErrorCode::RateLimited,
                "lookup budget used up: try again later",
                lookup.request_id,
            ))
            .await;
        return;
    }
    state.metrics.lookups.inc_by(lookup.numbers.len() as u64);
    let Ok(presences) = presences(&state, &lookup.numbers).await else {
        let _ = tx
            .send(error(
                ErrorCode::Unavailable,
                "storage unavailable: try again",
                lookup.request_id,
            ))
            .await;
        return;
    };
    let entries = lookup
        .numbers
        .into_iter()
        .zip(presences)
        .map(|(number, presence)| frame::LookupEntry {
            number,
            presence: presence as i32,
        })
        .collect();
    answer(
        &tx,
        Kind::LookupResult(frame::LookupResult {
            request_id: lookup.request_id,
            entries,
        })
        .into(),
    )
    .await;
}

/// The presence of each number, in order. The pseudonyms are computed on the blocking pool (up
/// to 1,000 parses and OPRF evaluations when none is cached: tens of milliseconds that must not
/// hold up the sessions sharing a runtime thread) and the accounts read in one store call.
async fn presences(state: &Shared, numbers: &[String]) -> Result<Vec<Presence>, ()> {
    let computing = state.clone();
    let numbers = numbers.to_vec();
    let pseudonyms: Vec<Option<_>> = tokio::task::spawn_blocking(move || {
        numbers
            .iter()
            .map(|number| computing.keys.pseudonym_of(number))
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|_| ())?
    .map_err(|_| ())?;
    let wanted: Vec<_> = pseudonyms.iter().flatten().copied().collect();
    let mut accounts = state
        .store
        .accounts(wanted)
        .await
        .map_err(|_| ())?
        .into_iter();
    Ok(pseudonyms
        .iter()
        .map(
            |pseudonym| match pseudonym.and_then(|_| accounts.next().flatten()) {
                None => Presence::NotAUser,
                Some(account)
                    if state
                        .hub
                        .count_online(account.devices.iter().map(|(d, _)| d))
                        > 0 =>
                {
                    Presence::Online
                }
                Some(_) => Presence::Offline,
            },
        )
        .collect())
}

/// Handles `DevicesRequest`.
pub async fn devices(
    state: Shared,
    identity: Identity,
    request: frame::DevicesRequest,
    tx: Outbox,
) {
    if !take_lookup_budget(&state, identity.device, 1) {
        let _ = tx
            .send(error(
                ErrorCode::RateLimited,
                "lookup budget used up: try again later",
                request.request_id,
            ))
            .await;
        return;
    }
    let mut device_ids = Vec::new();
    let mut devices = Vec::new();
    if let Ok(number) = E164::parse(&request.number) {
        let Ok(pseudonym) = state.keys.pseudonym(&number) else {
            return;
        };
        match state.store.account(pseudonym).await {
            Ok(Some(account)) => match state.store.device_keys(account.account).await {
                Ok(listed) => {
                    for device in listed {
                        device_ids.push(device.id.as_bytes().to_vec());
                        if let Some(keys) = device.identity {
                            devices.push(frame::DeviceKeys {
                                device_id: device.id.as_bytes().to_vec(),
                                identity_key: keys.identity_key.to_vec(),
                                signing_key: keys.signing_key.to_vec(),
                                voucher: device
                                    .voucher
                                    .map(|v| v.by.as_bytes().to_vec())
                                    .unwrap_or_default(),
                                voucher_signature: device
                                    .voucher
                                    .map(|v| v.signature.to_vec())
                                    .unwrap_or_default(),
                            });
                        }
                    }
                }
                Err(_) => {
                    let _ = tx
                        .send(error(
                            ErrorCode::Unavailable,
                            "storage unavailable: try again",
                            request.request_id,
                        ))
                        .await;
                    return;
                }
            },
            Ok(None) => {}
            Err(_) => {
                let _ = tx
                    .send(error(
                        ErrorCode::Unavailable,
                        "storage unavailable: try again",
                        request.request_id,
                    ))
                    .await;
                return;
            }
        }
    }
    answer(
        &tx,
        Kind::DeviceList(frame::DeviceList {
            request_id: request.request_id,
            device_ids,
            devices,
        })
        .into(),
    )
    .await;
}

/// Handles `Disable`: everything of the account goes at once.
pub async fn disable(state: Shared, identity: Identity, request: frame::Disable, tx: Outbox) {
    match state.store.delete_account(identity.account).await {
        Ok(devices) => {
            answer(
                &tx,
                Kind::DisableResult(frame::DisableResult {
                    request_id: request.request_id,
                })
                .into(),
            )
            .await;
            state.hub.sign_out(&devices, "the account was disabled");
            tracing::info!("an account was disabled and deleted");
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not delete an account");
            let _ = tx
                .send(error(
                    ErrorCode::Unavailable,
                    "storage unavailable: disable again",
                    request.request_id,
                ))
                .await;
        }
    }
}

/// Handles `Withdraw`: ends in delivered, withdrawn or unknown, decided by the store in one
/// transaction so that it cannot interleave with an acknowledgement.
pub async fn withdraw(state: Shared, identity: Identity, request: frame::Withdraw, tx: Outbox) {
    let Some(id) = MessageId::from_slice(&request.id) else {
        let _ = tx
            .send(error(
                ErrorCode::InvalidRequest,
                "withdraw needs a 16-byte id",
                0,
            ))
            .await;
        return;
    };
    let withdrawal = match state.store.withdraw(identity.device, id).await {
        Ok(withdrawal) => withdrawal,
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during a withdraw");
            let _ = tx
                .send(error(
                    ErrorCode::Unavailable,
                    "storage unavailable: withdraw again",
                    0,
                ))
                .await;
            return;
        }
    };
    let (label, wire) = match withdrawal {
        Withdrawal::Delivered => ("delivered", WithdrawState::Delivered),
        Withdrawal::Withdrawn => ("withdrawn", WithdrawState::Withdrawn),
        Withdrawal::Unknown => ("unknown", WithdrawState::Unknown),
    };
    state
        .metrics
        .withdrawals
        .get_or_create(&Outcome { outcome: label })
        .inc();
    answer(
        &tx,
        Kind::WithdrawResult(frame::WithdrawResult {
            id: request.id,
            state: wire as i32,
        })
        .into(),
    )
    .await;
}
