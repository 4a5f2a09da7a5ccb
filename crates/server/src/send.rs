//! A session's sends: each is checked, decided (`tidings_core::routing`), handed to storage and,
//! once durable, pushed to the receiver's live sessions, in the order the session read them.
//!
//! A send's answer tells whether the receiver is a user, lists its devices or says whether one is
//! online: unless the send's copies go to the receiver's devices (a contact's send), it is charged
//! to the sender's discovery budget before it is routed ([`crate::discovery`]).
//!
//! Sends are decided concurrently; only the hand-over to storage and the push wait for their
//! turn ([`SendOrder`]), and the syncs themselves are shared (group commit). A copy is pushed
//! only after it is durable, so a crash never loses a message a sender was told was stored.
//! Nothing here logs a number, a payload or a key.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tidings_core::delivery::STRANGER_TTL;
use tidings_core::failpoint::failpoint;
use tidings_core::routing::{self, Decision, Receiver};
use tidings_core::{Millis, DAY, SECOND};
use tidings_proto::frame::{self, Kind, SendMode, SendOutcome};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::{MAX_COPIES, MAX_PAYLOAD_BYTES, MAX_SEND_PROOFS};
use tidings_store::{DeviceDifference, Enqueued, NewMessage, Store, StoreError};
use tokio::sync::Notify;

use crate::budget::Budget;
use crate::clock::now_ms;
use crate::delivery::deliver_frame;
use crate::discovery::{self, Disclosure, BUDGET_USED_UP};
use crate::hub::Outbox;
use crate::identity::Identity;
use crate::metrics::Outcome;
use crate::presence::parse_proofs;
use crate::reply::reply;
use crate::state::Shared;

#[cfg(test)]
mod tests;

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

impl SendOrder {
    /// The place of the next send frame in `order` (made at a session's first send: a session
    /// that only listens never needs one), taken when the frame is read.
    pub fn next_place(order: &mut Option<Arc<SendOrder>>) -> Place {
        let order = Arc::clone(order.get_or_insert_with(Arc::default));
        let ticket = order.issued.fetch_add(1, Ordering::AcqRel);
        Place { order, ticket }
    }
}

/// A send's place among its session's sends.
#[derive(Debug)]
pub struct Place {
    order: Arc<SendOrder>,
    ticket: u64,
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

/// What a queued send's answer adds while this node cannot reach the others: the receiver may
/// be online at another node, which hears of the message once the bus is back.
pub const BUS_DOWN: &str = "this server cannot reach its other nodes just now: the receiver may be online at one of them and gets the message once they are reachable again";

/// Handles `Send`, in its turn among the session's sends (see [`SendOrder`]), and answers
/// `SendResult`.
pub async fn send<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    send: frame::Send,
    outbox: &Outbox,
    place: Place,
) {
    let id_bytes = send.id.clone();
    let stored = decide_and_store(state, identity, send, &place).await;
    let mut skipped = Vec::new();
    let mut retry_after_ms = 0;
    let mut ttl_seconds = 0;
    let mut settled = true;
    let (outcome, detail, difference) = match stored {
        Stored::Answer(outcome, detail) => (outcome, detail, DeviceDifference::default()),
        Stored::Held => {
            settled = false;
            (SendOutcome::Accepted, String::new(), DeviceDifference::default())
        }
        Stored::Kept {
            outcome,
            skipped: devices,
            shortened_to,
        } => {
            let mut details = Vec::new();
            if !devices.is_empty() {
                details.push(format!(
                    "not kept for {} of your own devices: their queues are full, so they miss this message",
                    devices.len()
                ));
            }
            if let Some(seconds) = shortened_to {
                details.push(format!(
                    "kept at most {}: the receiver has not written to you",
                    in_words(seconds)
                ));
                ttl_seconds = seconds;
            }
            if outcome == SendOutcome::Queued && state.hub.bus().is_some_and(|bus| !bus.is_up()) {
                details.push(BUS_DOWN.to_string());
            }
            skipped = devices;
            (outcome, details.join("; "), DeviceDifference::default())
        }
        Stored::RateLimited(wait, detail) => {
            retry_after_ms = crate::reply::retry_after_ms(wait);
            (
                SendOutcome::RateLimited,
                detail.to_string(),
                DeviceDifference::default(),
            )
        }
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
    // A held message is settled only once this answer has gone (`Settled` never overtakes it).
    let held = if settled {
        None
    } else {
        MessageId::from_slice(&id_bytes).map(|id| (identity.device, id))
    };
    let ids = |devices: &[DeviceId]| devices.iter().map(|d| d.as_bytes().to_vec()).collect();
    state
        .metrics
        .sends
        .get_or_create(&Outcome {
            outcome: outcome.as_str(),
        })
        .inc();
    failpoint("server-send-answer-before");
    reply(
        outbox,
        Kind::SendResult(frame::SendResult {
            id: id_bytes,
            outcome: outcome as i32,
            detail,
            missing_devices: ids(&difference.missing),
            missing_own_devices: ids(&difference.missing_own),
            extra_devices: ids(&difference.extra),
            skipped_own_devices: ids(&skipped),
            retry_after_ms,
            ttl_seconds,
            // Stored: answered only once every copy is durable. Held: a `Settled` follows once
            // every copy is decided or stored.
            settled: settled && matches!(outcome, SendOutcome::Accepted | SendOutcome::Queued),
        }),
    )
    .await;
    failpoint("server-send-answer-after");
    if let Some(key) = held {
        if state.held.answered(key) {
            crate::held::settle(state, key);
        }
    }
}

/// A length of time given in seconds, in whole days when it is some.
fn in_words(seconds: u32) -> String {
    let day = u32::try_from(DAY / SECOND).unwrap_or(u32::MAX);
    match (seconds / day, seconds % day) {
        (1, 0) => "1 day".to_string(),
        (days, 0) if days > 1 => format!("{days} days"),
        _ => format!("{seconds} seconds"),
    }
}

/// What deciding and storing a send came to.
enum Stored {
    Answer(SendOutcome, String),
    /// Stored, but not for the sender's own devices `skipped` (their queues had no room), and
    /// kept `shortened_to` seconds if that is less than the send asked (a stranger's message).
    Kept {
        outcome: SendOutcome,
        skipped: Vec<DeviceId>,
        shortened_to: Option<u32>,
    },
    /// Pushed to every device's live session without being stored, and held until each copy is
    /// settled ([`crate::held`]): `ACCEPTED`, not yet settled.
    Held,
    /// Refused for the sender's message rate or its discovery budget (named): the wait until a
    /// send would be accepted.
    RateLimited(Millis, &'static str),
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

async fn decide_and_store<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    send: frame::Send,
    place: &Place,
) -> Stored {
    // Sends are decided concurrently; only the hand-over to storage and the push wait for
    // their turn. A send answered before storage still passes its turns, so later sends do not
    // wait for it.
    let mut handed_over = false;
    let decided = decide_and_enqueue(state, identity, send, place, &mut handed_over).await;
    let order = &place.order;
    if !handed_over {
        drop(order.hand_over.wait(place.ticket).await);
    }
    let push_turn = order.push.wait(place.ticket).await;
    match decided {
        Ok((stored, (sender, id, sent_at, copies))) => {
            let held = matches!(stored, Stored::Held);
            let mut untaken = false;
            let mut pushed = false;
            for (device, payload) in copies {
                let frame = deliver_frame(sender, id, sent_at, payload);
                failpoint("server-push-before");
                let taken = if held {
                    // A held copy for a device served by another node goes there as held: its
                    // acknowledgement comes back here to be decided.
                    match state.hub.deliver_here(&device, &frame, 0) {
                        0 => usize::from(
                            state
                                .hub
                                .bus()
                                .is_some_and(|bus| bus.forward_held(&device, &frame)),
                        ),
                        here => here,
                    }
                } else {
                    state.hub.deliver(&device, &frame)
                };
                if taken == 0 {
                    if held {
                        // Its session went, or could not take it: stored at once, not at the
                        // end of the window.
                        state.held.not_taken((sender, id), device);
                        untaken = true;
                    }
                } else {
                    pushed = true;
                }
                failpoint("server-push-after");
            }
            if untaken {
                crate::held::store_held(state, (sender, id)).await;
            }
            drop(push_turn);
            if pushed {
                // The receivers' sessions write their copies before the sender's session writes
                // this send's answer: woken last, the sender's would run first.
                crate::hub::let_woken_run().await;
            }
            stored
        }
        Err(stored) => stored,
    }
}

/// The SHA-256 of a send's contact token for its receiver, if it carries one; the token itself
/// goes no further than this function.
fn contact_token_hash(token: &[u8]) -> Result<Option<[u8; 32]>, &'static str> {
    match token.len() {
        0 => Ok(None),
        tidings_proto::CONTACT_TOKEN_BYTES => Ok(Some(Sha256::digest(token).into())),
        _ => Err("receiver_contact_token must be 32 bytes"),
    }
}

/// A stored message's copies, to push to live sessions: sender device, id, time, copies.
type Push = (DeviceId, MessageId, Millis, Vec<(DeviceId, Bytes)>);

/// Decides a send and stores it. `Ok` holds what to push; `Err` the answer when nothing is
/// pushed (refused, a duplicate, or failed).
async fn decide_and_enqueue<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    send: frame::Send,
    place: &Place,
    handed_over: &mut bool,
) -> Result<(Stored, Push), Stored> {
    let answer = |outcome, detail: &str| Err(Stored::Answer(outcome, detail.to_string()));
    let Some(id) = MessageId::from_slice(&send.id) else {
        return answer(SendOutcome::Invalid, "id must be 16 bytes");
    };
    if !send.to.is_empty() {
        return answer(SendOutcome::Invalid, crate::lookup::NUMBERS_ARE_BLINDED);
    }
    let Some(pseudonym) = crate::lookup::account_of(&send.to_account) else {
        return answer(
            SendOutcome::Invalid,
            "to_account must be the receiver's 32-byte pseudonym",
        );
    };
    let copies = match parse_copies(&send) {
        Ok(copies) => copies,
        Err(detail) => return Err(Stored::Answer(SendOutcome::Invalid, detail)),
    };
    let Ok(mode) = SendMode::try_from(send.mode) else {
        return answer(SendOutcome::Invalid, "unknown send mode");
    };
    let proofs = match parse_proofs(&send.presence_proofs, MAX_SEND_PROOFS) {
        Ok(proofs) => proofs,
        Err(detail) => return Err(Stored::Answer(SendOutcome::Invalid, detail)),
    };
    let contact_token_hash = match contact_token_hash(&send.receiver_contact_token) {
        Ok(hash) => hash,
        Err(detail) => return answer(SendOutcome::Invalid, detail),
    };
    // Refused, not clamped: a sender told `QUEUED` would plan on being kept as long as it asked
    // (its expiry receipt, its SMS fallback), while the server drops the message sooner.
    let max_ttl_seconds = state.retention.max_ttl / SECOND;
    if Millis::from(send.ttl_seconds) > max_ttl_seconds {
        return Err(Stored::Answer(
            SendOutcome::Invalid,
            format!("ttl_seconds may be at most {max_ttl_seconds} (30 days)"),
        ));
    }
    let now = now_ms();
    if let Err(wait) = crate::budget::take(state, Budget::Sends, identity.budgets, 1, now).await {
        return Err(Stored::RateLimited(wait, "too many messages"));
    }
    let route = match state.store.route(pseudonym).await {
        Ok(route) => route,
        Err(e) => {
            tracing::warn!(error = %e, "storage read failed during a send");
            return answer(SendOutcome::Unavailable, "storage unavailable: try again");
        }
    };
    // Charged before anything about the receiver is told: whether it is a user, its devices,
    // whether one is online. Free when the copies go to a device of the receiver.
    let own = route
        .as_ref()
        .is_some_and(|route| route.account == identity.account);
    let copy_devices: Vec<DeviceId> = copies.iter().map(|(device, _)| *device).collect();
    let asked = Disclosure::Send {
        own,
        receiver: route.as_ref().map(|route| route.devices.as_slice()),
        copies: &copy_devices,
    };
    let charged = match discovery::charge(state, identity, asked).await {
        Ok(units) => units > 0,
        Err(wait) => return Err(Stored::RateLimited(wait, BUDGET_USED_UP)),
    };
    // Only the devices that show themselves online to this sender count: a receiver online but
    // hidden from it is answered as an offline one (`NOW_OR_NEVER` refused, `QUEUE` queued), so
    // that no answer tells the sender more than its lookup would (P7). Its copies still reach
    // the receiver's live sessions, which decide on a receipt themselves.
    let mut visible = Vec::new();
    let receiver = match &route {
        None => Receiver::NotAUser,
        Some(route) => Receiver::User {
            devices_online: {
                visible =
                    crate::bus::visible(&state.hub, &route.devices, identity.device, &proofs, now)
                        .await;
                visible.len()
            },
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
        decided: Vec::new(),
        sender_device: identity.device,
        sender_account: identity.account,
        id,
        receiver: route.account,
        sent_at: now,
        expires_at,
        copies: copies.clone(),
        contact_token_hash,
    };
    // Deliver first: a message accepted because the receiver is online, whose every copy goes
    // to a device with a live session (here, or at the node that serves it), is pushed with no
    // disk write on the way and held here until each copy is decided or stored
    // ([`crate::held`]).
    //
    // Only when every receiver device it goes to shows itself online to this sender (the
    // sender's own devices are its own business): an answer that says the message is held
    // (`settled = false`) then tells the sender nothing its presence proofs do not, and the
    // `Settled` goes at the window's end, not at the last acknowledgement, so that when it comes
    // says nothing of when each device took it (P7).
    let (to_receiver, own_copies): (Vec<DeviceId>, Vec<DeviceId>) = copy_devices
        .iter()
        .partition(|device| route.devices.contains(device));
    if outcome == SendOutcome::Accepted
        && state.held.enabled()
        && crate::bus::all_listening(&state.hub, &own_copies)
        && to_receiver.iter().all(|device| visible.contains(device))
    {
        let key = (identity.device, id);
        if state.held.is_held(key) {
            // Sent again while the first is still held: that one settles it.
            return Err(Stored::Held);
        }
        match state.store.screen(&message).await {
            Ok(true) => {
                let offered_from = state.hub.next_session();
                if state.held.hold(&message, &route.devices, offered_from, now) {
                    return Ok((Stored::Held, (identity.device, id, now, copies)));
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "storage read failed while screening a send"),
        }
    }
    let turn = place.order.hand_over.wait(place.ticket).await;
    let submitted = state
        .store
        .enqueue_submit(message, state.config.queue_limits)
        .await;
    // Handed over in order: the session's next send may go ahead while this one syncs.
    *handed_over = true;
    drop(turn);
    let enqueued = match submitted {
        Ok(submitted) => submitted.durable().await,
        Err(e) => Err(e),
    };
    crate::bus::share_new_strangers(state);
    let mut skipped = Vec::new();
    let mut shortened_to = None;
    match enqueued {
        Ok(Enqueued::Stored) => {}
        Ok(Enqueued::StoredSkipping(devices)) => skipped = devices,
        Ok(Enqueued::StoredShortened {
            skipped: devices,
            expires_at,
        }) => {
            skipped = devices;
            let seconds = expires_at.saturating_sub(now) / SECOND;
            shortened_to = Some(u32::try_from(seconds).unwrap_or(u32::MAX));
        }
        // The same id again: the copies were stored (and pushed) the first time.
        Ok(Enqueued::Duplicate) => return answer(outcome, ""),
        Ok(Enqueued::QueueFull) => {
            return answer(
                SendOutcome::RefusedQueueFull,
                "the receiver's queue holds as much as it takes from you: wait until it is delivered",
            )
        }
        Ok(Enqueued::StrangerPoolFull) => {
            return Err(Stored::Answer(
                SendOutcome::RefusedStrangerPoolFull,
                format!(
                    "the receiver takes few messages from people it has not written to, and that room is full: it frees as they are delivered or expire, within {}",
                    in_words(u32::try_from(STRANGER_TTL / SECOND).unwrap_or(u32::MAX))
                ),
            ))
        }
        Ok(Enqueued::OverQuota) => {
            return answer(
                SendOutcome::RefusedOverQuota,
                "you have as much waiting for delivery as the server keeps for one account: wait until some is delivered",
            )
        }
        Ok(Enqueued::DevicesChanged(difference)) => {
            // A contact's send found devices it has no copy for: naming them is news, charged
            // unless the send paid already.
            let asked = Disclosure::SendMissingDevices {
                own,
                missing: difference.missing.len(),
            };
            if !charged {
                if let Err(wait) = discovery::charge(state, identity, asked).await {
                    return Err(Stored::RateLimited(wait, BUDGET_USED_UP));
                }
            }
            return Err(Stored::DevicesChanged(difference));
        }
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
    if !skipped.is_empty() {
        tracing::info!(
            skipped = skipped.len(),
            "a message was stored without the copies for the sender's own full devices"
        );
    }
    // Durable now: each copy goes to its device's live sessions (in the session's order). A
    // device not online, or a session without room, gets its copy from its stored queue.
    let stored = Stored::Kept {
        outcome,
        skipped: skipped.clone(),
        shortened_to,
    };
    let copies = copies
        .into_iter()
        .filter(|(device, _)| !skipped.contains(device))
        .collect();
    Ok((stored, (identity.device, id, now, copies)))
}
