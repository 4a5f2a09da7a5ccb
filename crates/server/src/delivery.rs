//! What reaches a device and how it settles: delivering its stored queue and receipts, its
//! acknowledgements (which delete the copy and tell the sender), the receipts it has taken, and
//! a sender's withdraw of a message it sent by SMS instead.
//!
//! A copy is deleted the moment its device acknowledges it, and nothing here keeps a delivered
//! message anywhere. Nothing here logs a payload or a key.

use bytes::Bytes;
use tidings_core::failpoint::failpoint;
use tidings_core::fallback::Withdrawal;
use tidings_core::Millis;
use tidings_proto::frame::{self, AckStatus, ErrorCode, Frame, Kind, ReceiptKind, WithdrawState};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_store::{AckKind, Acked, HeldAck, Store};

use crate::held::ForAck;

use crate::clock::now_ms;
use crate::discovery::{self, Disclosure};
use crate::hub::{Outbound, Outbox};
use crate::identity::Identity;
use crate::metrics::Outcome;
use crate::reply::{error, reply, retry_after_ms, storage_unavailable};
use crate::state::Shared;

#[cfg(test)]
mod tests;

/// Deliveries read from the store per page.
const PAGE: usize = 256;

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

/// Sends every stored copy waiting for the device, oldest first.
pub async fn drain_queue<S: Store>(state: Shared<S>, device: DeviceId, outbox: Outbox) {
    let mut after = tidings_store::QueueCursor::START;
    loop {
        let page = match state.store.pending(device, after, PAGE, now_ms()).await {
            Ok(page) => page,
            Err(e) => {
                tracing::warn!(error = %e, "could not read a device queue");
                return;
            }
        };
        let full = page.len() == PAGE;
        for pending in page {
            after = pending.cursor;
            let frame = deliver_frame(
                pending.sender_device,
                pending.id,
                pending.sent_at,
                pending.payload,
            );
            if outbox.send(Outbound::Deliver(frame)).await.is_err() {
                return;
            }
        }
        if !full {
            return;
        }
    }
}

/// Sends the receipts stored for a device that just logged in.
pub async fn send_pending_receipts<S: Store>(state: Shared<S>, device: DeviceId, outbox: Outbox) {
    match state.store.receipts(device).await {
        Ok(receipts) => {
            for receipt in receipts {
                let frame = Kind::Receipt(frame::Receipt {
                    id: receipt.id.as_bytes().to_vec(),
                    kind: receipt.kind as i32,
                })
                .into();
                if outbox.send(Outbound::Frame(frame)).await.is_err() {
                    return;
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not read pending receipts"),
    }
}

/// Handles `Ack`: deletes the device's copy (or sets it aside, `discard`), tells the sender
/// unless the device said not to (`discard`, `no_receipt`), answers `AckResult`.
pub async fn ack<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    ack: frame::Ack,
    outbox: &Outbox,
) {
    let (Some(sender_device), Some(id)) = (
        DeviceId::from_slice(&ack.sender_device),
        MessageId::from_slice(&ack.id),
    ) else {
        let message = "ack needs a 16-byte sender_device and id";
        return reply(outbox, error(ErrorCode::InvalidRequest, message, 0)).await;
    };
    // The sender's receipt goes as soon as the acknowledgement has executed; the receiver's
    // `CONFIRMED` (after which it shows the message) only once it is durable. A receipt is not
    // what settles a message: a crash between the two leaves a stored copy to deliver again, or,
    // for a held copy, no record, so the device is told `UNKNOWN` (and does not show it) and the
    // sender, whose message is not settled, sends it again or withdraws it.
    //
    // The device decides whether its sender hears of it (P7): a copy it will not show is set
    // aside as if never fetched, and one shown to a sender it never wrote to gets no receipt.
    let kind = if ack.discard {
        AckKind::Discarded
    } else if ack.no_receipt {
        AckKind::ShownWithoutReceipt
    } else {
        AckKind::Shown
    };
    let acked = match ack_held(state, identity.device, sender_device, id, kind).await {
        Some(acked) => acked,
        None => {
            // Held by the node that pushed it here, if another one did.
            let elsewhere = match state.hub.bus() {
                Some(bus) => {
                    bus.ack_held_elsewhere(identity.device, sender_device, id, kind)
                        .await
                }
                None => None,
            };
            match elsewhere {
                Some(acked) => acked,
                None => ack_stored(state, identity.device, sender_device, id, kind).await,
            }
        }
    };
    answer_ack(state, ack, acked, outbox).await;
}

/// The frame that tells a sending device its message was delivered.
fn delivered_receipt(id: MessageId) -> Frame {
    Kind::Receipt(frame::Receipt {
        id: id.as_bytes().to_vec(),
        kind: ReceiptKind::Delivered as i32,
    })
    .into()
}

/// Settles a copy the server holds in memory ([`crate::held`]) on its device's
/// acknowledgement; None when the copy is not held here (a stored copy, or none). A copy for the
/// sender's own other device needs no record (it was sent either way); a copy for the receiver
/// is decided by the message's `DELIVERED` record, `CONFIRMED` only once it is durable. A copy to
/// be set aside is stored first, then acknowledged as a stored copy.
pub(crate) async fn ack_held<S: Store>(
    state: &Shared<S>,
    device: DeviceId,
    sender_device: DeviceId,
    id: MessageId,
    kind: AckKind,
) -> Option<tidings_store::Result<Acked>> {
    let key = (sender_device, id);
    let (to_receiver, sent_at, expires_at, receipt_now) = loop {
        match state.held.for_ack(key, device, kind == AckKind::Shown) {
            ForAck::Held {
                to_receiver,
                sent_at,
                expires_at,
                receipt_now,
            } => break (to_receiver, sent_at, expires_at, receipt_now),
            ForAck::Storing => state.held.wait_stored(key, device).await,
            ForAck::NotHeld => return None,
        }
    };
    let settle = |decided: bool| {
        if state.held.decided(key, device, decided) {
            crate::held::settle(state, key);
        }
    };
    if kind == AckKind::Discarded {
        // Set aside as a stored copy is, so that its sender sees what it would see for a device
        // that never came online.
        settle(false);
        crate::held::store_held(state, key).await;
        return None;
    }
    let count = |fate| {
        state
            .metrics
            .held_copies
            .get_or_create(&Outcome { outcome: fate })
            .inc();
    };
    if !to_receiver {
        count("decided");
        settle(true);
        return Some(Ok(Acked::Confirmed { first: false }));
    }
    let copy = HeldAck {
        device,
        sender_device,
        id,
        sent_at,
        expires_at,
    };
    // The receipt goes before anything is written: it settles nothing (a withdraw racing this
    // acknowledgement is still decided against the record), and the sender, online a moment
    // ago, hears at once. The store keeps a copy of it for a sender that is not online.
    let newer = receipt_now.then(|| {
        state
            .hub
            .notify_from(&sender_device, &delivered_receipt(id), 0)
    });
    if newer.is_some() {
        // The sender's session writes the receipt before the record's write wakes the store's
        // writer (a system call, and a thread that then competes for the cores).
        crate::hub::let_woken_run().await;
    }
    failpoint("server-held-decision-before");
    let acked = match state.store.ack_held(copy, kind).await {
        Ok(staged) => {
            let acked = staged.durable().await;
            if let (Some(newer), Ok(Acked::Confirmed { first: true })) = (newer, &acked) {
                // A session that registered meanwhile may have read the receipts before this
                // one was stored.
                state
                    .hub
                    .notify_from(&sender_device, &delivered_receipt(id), newer);
            }
            acked
        }
        Err(e) => Err(e),
    };
    failpoint("server-held-decision-after");
    match &acked {
        Ok(Acked::Confirmed { .. } | Acked::Withdrawn) => {
            count("decided");
            settle(true);
        }
        // Not decided: held again, and stored when its window ends.
        Ok(Acked::Unknown) | Err(_) => settle(false),
    }
    Some(acked)
}

/// Settles a stored copy on its device's acknowledgement.
async fn ack_stored<S: Store>(
    state: &Shared<S>,
    device: DeviceId,
    sender_device: DeviceId,
    id: MessageId,
    kind: AckKind,
) -> tidings_store::Result<Acked> {
    let staged = state
        .store
        .ack_staged_as(device, sender_device, id, kind)
        .await;
    with_receipt(state, sender_device, id, staged).await
}

/// Waits for an acknowledgement's write, sending the sender's receipt as soon as the write has
/// executed (before it is durable) when it is the message's first delivery.
///
/// A sender session that registers after the early receipt but before the sync may read the
/// store too early to see the receipt, so the sessions registered since are offered it again
/// after the sync (a second copy would be ignored).
async fn with_receipt<S: Store>(
    state: &Shared<S>,
    sender_device: DeviceId,
    id: MessageId,
    staged: tidings_store::Result<tidings_store::Completion<Acked>>,
) -> tidings_store::Result<Acked> {
    let mut staged = staged?;
    let newer = match staged.executed().await {
        Some(Acked::Confirmed { first: true }) => Some(state.hub.notify_from(
            &sender_device,
            &delivered_receipt(id),
            0,
        )),
        _ => None,
    };
    let durable = staged.durable().await;
    if let (Some(newer), Ok(_)) = (newer, &durable) {
        state
            .hub
            .notify_from(&sender_device, &delivered_receipt(id), newer);
    }
    durable
}

/// Answers an acknowledgement with what its write came to.
async fn answer_ack<S: Store>(
    state: &Shared<S>,
    ack: frame::Ack,
    acked: tidings_store::Result<Acked>,
    outbox: &Outbox,
) {
    let status = match acked {
        Ok(Acked::Confirmed { .. }) => AckStatus::Confirmed,
        Ok(Acked::Unknown) => AckStatus::Unknown,
        Ok(Acked::Withdrawn) => AckStatus::Withdrawn,
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during an ack");
            return reply(outbox, storage_unavailable("acknowledge again", 0)).await;
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
    failpoint("server-ack-answer-before");
    reply(
        outbox,
        Kind::AckResult(frame::AckResult {
            sender_device: ack.sender_device,
            id: ack.id,
            status: status as i32,
        }),
    )
    .await;
    failpoint("server-ack-answer-after");
}

/// Handles `ReceiptAck`: the receipt is deleted; nothing is answered.
pub async fn receipt_ack<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    receipt: frame::ReceiptAck,
) {
    if let Some(id) = MessageId::from_slice(&receipt.id) {
        if let Err(e) = state.store.ack_receipt(identity.device, id).await {
            tracing::warn!(error = %e, "storage write failed during a receipt ack");
        }
    }
}

/// Handles `MissedSeen`: the device has shown how many own messages it missed; forget them.
pub async fn missed_seen<S: Store>(state: &Shared<S>, identity: Identity, seen: frame::MissedSeen) {
    if let Err(e) = state
        .store
        .clear_missed(identity.device, seen.messages)
        .await
    {
        tracing::warn!(error = %e, "storage write failed while clearing missed messages");
    }
}

/// Handles `Withdraw`: ends in delivered, withdrawn or unknown, decided by the store in one
/// transaction so that it cannot interleave with an acknowledgement; or, over the asking account's
/// discovery budget, refused (`RATE_LIMITED`) before anything is decided.
pub async fn withdraw<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::Withdraw,
    outbox: &Outbox,
) {
    let Some(id) = MessageId::from_slice(&request.id) else {
        let message = "withdraw needs a 16-byte id";
        return reply(outbox, error(ErrorCode::InvalidRequest, message, 0)).await;
    };
    // Its outcome tells whether a receiver device took the message: charged before the store
    // decides anything, so a refusal withdraws nothing and tells nothing.
    if let Err(wait) = discovery::charge(state, identity, Disclosure::Withdraw).await {
        state
            .metrics
            .withdrawals
            .get_or_create(&Outcome {
                outcome: "rate_limited",
            })
            .inc();
        let refused = frame::WithdrawResult {
            id: request.id,
            state: WithdrawState::RateLimited as i32,
            retry_after_ms: retry_after_ms(wait),
        };
        return reply(outbox, Kind::WithdrawResult(refused)).await;
    }
    // A message held here is decided against its record even with nothing stored: a
    // `WITHDRAWN` record then refuses its held copies' acknowledgements.
    let key = (identity.device, id);
    let held_until = state.held.expires_at(key);
    let withdrawal = match state
        .store
        .withdraw_held(identity.device, id, held_until)
        .await
    {
        Ok(withdrawal) => {
            if withdrawal == Withdrawal::Withdrawn && state.held.withdrawn(key) {
                crate::held::settle(state, key);
            }
            withdrawal
        }
        Err(e) => {
            tracing::warn!(error = %e, "storage write failed during a withdraw");
            return reply(outbox, storage_unavailable("withdraw again", 0)).await;
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
    failpoint("server-withdraw-answer-before");
    reply(
        outbox,
        Kind::WithdrawResult(frame::WithdrawResult {
            id: request.id,
            state: wire as i32,
            retry_after_ms: 0,
        }),
    )
    .await;
    failpoint("server-withdraw-answer-after");
}
