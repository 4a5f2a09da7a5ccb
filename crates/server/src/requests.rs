//! The session's requests: send, acknowledge, look up, list devices, disable. Each runs as a task
//! of its session and answers through the session's queue.
//!
//! Nothing here logs a number, a payload or a key; a lookup writes nothing at all.

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
use tidings_proto::{MAX_LOOKUP_NUMBERS, MAX_PAYLOAD_BYTES};
use tidings_store::{Acked, Enqueued, NewMessage, Store as _, StoreError};

use crate::hub::{Outbound, Outbox};
use crate::metrics::Outcome;
use crate::session::Identity;
use crate::state::{now_ms, take_budget, Shared, QUEUE_LIMIT, SEND_BURST, SEND_PER_SECOND};

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

/// Handles `Send`.
pub async fn send(state: Shared, identity: Identity, send: frame::Send, tx: Outbox) {
    let id_bytes = send.id.clone();
    let (outcome, detail) = decide_and_store(&state, identity, send).await;
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
        })
        .into(),
    )
    .await;
}

async fn decide_and_store(
    state: &Shared,
    identity: Identity,
    send: frame::Send,
) -> (SendOutcome, String) {
    let Some(id) = MessageId::from_slice(&send.id) else {
        return (SendOutcome::Invalid, "id must be 16 bytes".into());
    };
    if send.payload.len() > MAX_PAYLOAD_BYTES {
        return (
            SendOutcome::Invalid,
            format!("payload exceeds {MAX_PAYLOAD_BYTES} bytes"),
        );
    }
    let Ok(mode) = SendMode::try_from(send.mode) else {
        return (SendOutcome::Invalid, "unknown send mode".into());
    };
    let Ok(number) = E164::parse(&send.to) else {
        return (
            SendOutcome::Invalid,
            "the receiver is not a valid phone number".into(),
        );
    };
    let now = now_ms();
    if take_budget(
        &state.send_budgets,
        identity.device,
        1,
        SEND_BURST,
        SEND_PER_SECOND,
        now,
    )
    .is_err()
    {
        return (
            SendOutcome::RateLimited,
            "too many messages: slow down".into(),
        );
    }
    let Ok(pseudonym) = state.keys.pseudonym(&number) else {
        return (
            SendOutcome::Unavailable,
            "the receiver cannot be looked up now".into(),
        );
    };
    let account = match state.store.account(pseudonym).await {
        Ok(account) => account,
        Err(e) => {
            tracing::warn!(error = %e, "storage read failed during a send");
            return (
                SendOutcome::Unavailable,
                "storage unavailable: try again".into(),
            );
        }
    };
    let receiver = match &account {
        None => Receiver::NotAUser,
        Some(account) => Receiver::User {
            devices_online: state
                .hub
                .count_online(account.devices.iter().map(|(device, _)| device)),
            queue_full: account.devices.iter().any(|(_, len)| *len >= QUEUE_LIMIT),
        },
    };
    let (outcome, expires_at) =
        match routing::decide(&state.retention, mode, send.ttl_seconds, receiver, now) {
            Decision::Refuse(outcome) => return (outcome, String::new()),
            Decision::Store {
                outcome,
                expires_at,
            } => (outcome, expires_at),
        };
    let Some(account) = account else {
        return (SendOutcome::NotAUser, String::new());
    };
    let message = NewMessage {
        sender_device: identity.device,
        id,
        receiver: account.account,
        sent_at: now,
        expires_at,
        payload: send.payload.clone(),
    };
    match state.store.enqueue(message, QUEUE_LIMIT).await {
        Ok(Enqueued::Stored) | Ok(Enqueued::Duplicate) => {}
        Ok(Enqueued::QueueFull) => return (SendOutcome::RefusedQueueFull, String::new()),
        Err(StoreError::NoSuchAccount) => return (SendOutcome::NotAUser, String::new()),
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during a send");
            return (
                SendOutcome::Unavailable,
                "storage unavailable: try again".into(),
            );
        }
    }
    // Durable now: push to the receiver's live sessions. A device not online, or a session
    // without room, gets the copy from its stored queue instead.
    let frame = deliver_frame(identity.device, id, now, send.payload);
    for (device, _) in &account.devices {
        state.hub.deliver(device, 0, &frame);
    }
    (outcome, String::new())
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
    let status = match state.store.ack(identity.device, sender_device, id).await {
        Ok(Acked::Confirmed { first }) => {
            if first {
                let receipt: Frame = Kind::Receipt(frame::Receipt {
                    id: id.as_bytes().to_vec(),
                    kind: ReceiptKind::Delivered as i32,
                })
                .into();
                state.hub.notify(&sender_device, &receipt);
            }
            AckStatus::Confirmed
        }
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
    let mut entries = Vec::with_capacity(lookup.numbers.len());
    for number in lookup.numbers {
        let presence = match presence_of(&state, &number).await {
            Ok(presence) => presence,
            Err(()) => {
                let _ = tx
                    .send(error(
                        ErrorCode::Unavailable,
                        "storage unavailable: try again",
                        lookup.request_id,
                    ))
                    .await;
                return;
            }
        };
        entries.push(frame::LookupEntry {
            number,
            presence: presence as i32,
        });
    }
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

async fn presence_of(state: &Shared, number: &str) -> Result<Presence, ()> {
    let Ok(number) = E164::parse(number) else {
        return Ok(Presence::NotAUser);
    };
    let pseudonym = state.keys.pseudonym(&number).map_err(|_| ())?;
    let account = state.store.account(pseudonym).await.map_err(|_| ())?;
    Ok(match account {
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
    })
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
    if let Ok(number) = E164::parse(&request.number) {
        let Ok(pseudonym) = state.keys.pseudonym(&number) else {
            return;
        };
        match state.store.account(pseudonym).await {
            Ok(Some(account)) => {
                device_ids = account
                    .devices
                    .iter()
                    .map(|(d, _)| d.as_bytes().to_vec())
                    .collect()
            }
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
