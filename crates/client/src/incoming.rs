//! Receiving: the listening session, decrypting each delivery, judging who sent it, storing it
//! and acknowledging it, and showing it once.
//!
//! Promise E4 lives here: a delivery is decrypted, stored and the advanced session state saved
//! in one local transaction before it is acknowledged, so a crash never loses a message nor uses
//! a message key twice. Promise E3's receiving half: the sender a message claims is checked
//! against the directory ([`judge_sender`]) after decrypting, before the message is kept. While
//! it listens it also carries on routed messages left pending ([`crate::route`]). Nothing here
//! logs a number or a message.

use std::time::Duration;

use prost::Message as _;
use tidings_core::failpoint::failpoint;
use tidings_proto::frame::{self, AckStatus, Content, Envelope, Kind, ReceiptKind};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tokio::time::Instant;

use crate::account::{key_of, Account};
use crate::clock::{far_future, instant_at};
use crate::e2e::Crypto;
use crate::inbox::{Change, Inbox, Received};
use crate::profile::ShowOnline;
use crate::route::{outcome_name, Router};
use crate::session::Session;
use crate::{ClientError, Result};

/// First wait before connecting again after a listening session was lost.
pub const RECONNECT_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts to connect again (the wait doubles after each failure).
pub const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// How long a listening client remembers that a device is not one of a number's, so that a
/// spoofer repeating a claim makes it ask the server once.
pub const NOT_THEIRS_KEPT: Duration = Duration::from_secs(3600);
/// Most such answers remembered at once; past it the oldest are forgotten first.
pub const NOT_THEIRS_ENTRIES: usize = 10_000;

/// Devices found not to be a claimed number's, with when each answer came: a listening client's
/// memory, never stored.
#[derive(Debug, Default)]
struct NotTheirs {
    answers: std::collections::HashMap<(String, DeviceId), Instant>,
}

impl NotTheirs {
    /// Whether `device` was found not to be `number`'s within [`NOT_THEIRS_KEPT`].
    fn known(&self, number: &str, device: DeviceId) -> bool {
        self.answers
            .get(&(number.to_string(), device))
            .is_some_and(|at| at.elapsed() < NOT_THEIRS_KEPT)
    }

    fn remember(&mut self, number: &str, device: DeviceId) {
        if self.answers.len() >= NOT_THEIRS_ENTRIES {
            self.answers.retain(|_, at| at.elapsed() < NOT_THEIRS_KEPT);
        }
        if self.answers.len() >= NOT_THEIRS_ENTRIES {
            let oldest = self
                .answers
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                self.answers.remove(&oldest);
            }
        }
        self.answers
            .insert((number.to_string(), device), Instant::now());
    }
}

/// Something `listen` reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message, shown for the first time.
    Message(Received),
    /// A receipt for a message this device sent.
    Receipt { id: MessageId, kind: ReceiptKind },
    /// A routed message (SMS fallback) finished: `outcome` as in `route::outcome_name`.
    Routed {
        id: MessageId,
        outcome: &'static str,
        detail: String,
    },
    /// The connection to the server was lost or could not be made again (`reason`); the next
    /// attempt comes after `after`.
    Reconnecting { after: Duration, reason: String },
    /// A delivery that could not be decrypted or did not hold together; it was discarded.
    Rejected {
        sender_device: DeviceId,
        id: MessageId,
        reason: String,
    },
    /// Messages sent from this number's other devices that the server could not keep for this
    /// one (its queue was full while it was away): this device will never show them.
    Missed { messages: u32 },
}

/// Receives until `handle` returns false or `until` passes. Each message is decrypted and
/// stored (with the new session state, in one local transaction), then acknowledged, then
/// shown once the server confirms the acknowledgement.
///
/// A lost connection (the server restarted, the network went away) does not end it: it reports
/// [`Event::Reconnecting`] and connects again after [`RECONNECT_FIRST`], doubling the wait after
/// each failed attempt up to [`RECONNECT_MAX`], until `until` passes. Only the first connection's
/// failure is returned, and a refusal (a removed device) or a sign-out at any time.
pub async fn listen(
    account: &Account,
    until: Option<Instant>,
    mut handle: impl FnMut(Event) -> bool,
) -> Result<()> {
    let mut inbox = account.inbox()?;
    let user_deadline = until.unwrap_or_else(far_future);
    let mut session = Some(connect(account, &mut inbox).await?);
    let mut router = Router::new(account, account.routing(), true)?;
    let mut not_theirs = NotTheirs::default();
    loop {
        match listen_on(
            account,
            &mut inbox,
            &mut router,
            &mut session,
            &mut not_theirs,
            user_deadline,
            &mut handle,
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(lost @ (ClientError::Network(_) | ClientError::Timeout)) => {
                if !report_finished(&mut router, &mut handle) {
                    return Ok(());
                }
                let Some(open) =
                    reconnect(account, &mut inbox, user_deadline, &lost, &mut handle).await?
                else {
                    return Ok(());
                };
                session = Some(open);
                // What the lost session carried is where a listen started now would find it
                // (the routing state is saved at each step): go on exactly as that one would.
                router = Router::new(account, account.routing(), true)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Opens a listening session: publishes keys if the server holds too few, and acknowledges
/// again what an earlier session stored but did not show.
async fn connect(account: &Account, inbox: &mut Inbox) -> Result<Session> {
    let mut open = account.session(true).await?;
    account.ensure_keys(inbox, &mut open).await?;
    acknowledge_unshown(account, inbox, &mut open).await?;
    Ok(open)
}

/// Connects again after the session was lost, with a growing wait between attempts. `None`:
/// `user_deadline` passed first, or `handle` asked to stop.
async fn reconnect(
    account: &Account,
    inbox: &mut Inbox,
    user_deadline: Instant,
    lost: &ClientError,
    handle: &mut impl FnMut(Event) -> bool,
) -> Result<Option<Session>> {
    let mut wait = RECONNECT_FIRST;
    let mut reason = lost.to_string();
    loop {
        if !handle(Event::Reconnecting {
            after: wait,
            reason: std::mem::take(&mut reason),
        }) {
            return Ok(None);
        }
        let wake = Instant::now() + wait;
        if wake >= user_deadline {
            tokio::time::sleep_until(user_deadline).await;
            return Ok(None);
        }
        tokio::time::sleep_until(wake).await;
        match tokio::time::timeout_at(user_deadline, connect(account, inbox)).await {
            Err(_) => return Ok(None),
            Ok(Ok(open)) => return Ok(Some(open)),
            // Still down, or answering while it starts: try again later.
            Ok(Err(
                e @ (ClientError::Network(_) | ClientError::Timeout | ClientError::Protocol(_)),
            )) => {
                reason = e.to_string();
                wait = (wait * 2).min(RECONNECT_MAX);
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// Reports routed messages that finished; false if `handle` asked to stop.
fn report_finished(router: &mut Router<'_>, handle: &mut impl FnMut(Event) -> bool) -> bool {
    for (id, outcome, detail) in router.take_finished() {
        let outcome = outcome_name(outcome);
        if !handle(Event::Routed {
            id,
            outcome,
            detail,
        }) {
            return false;
        }
    }
    true
}

/// Receives on one session until `handle` asks to stop or `user_deadline` passes (`Ok`), or
/// the session fails (`Err`; a lost connection is `Network` or `Timeout`).
async fn listen_on(
    account: &Account,
    inbox: &mut Inbox,
    router: &mut Router<'_>,
    session: &mut Option<Session>,
    not_theirs: &mut NotTheirs,
    user_deadline: Instant,
    handle: &mut impl FnMut(Event) -> bool,
) -> Result<()> {
    // Messages left pending by an earlier run or session (a delayed fallback, an SMS to retry)
    // go on.
    router.tick(session).await?;
    // Acknowledgements this session has sent and not yet heard answered, by message: the
    // session began by acknowledging again every message stored and not shown. An `UNKNOWN`
    // forgets a message only when no later acknowledgement of it is on its way (its sender's
    // resend may have arrived meanwhile, and that one's answer decides).
    let mut awaiting: std::collections::HashMap<(DeviceId, MessageId), u32> =
        inbox.unshown()?.into_iter().map(|key| (key, 1)).collect();
    loop {
        if !report_finished(router, handle) {
            return Ok(());
        }
        let deadline = router
            .next_wake()
            .map_or(user_deadline, |at| instant_at(at).min(user_deadline));
        // The router drops a session whose write failed, and may open one of its own that
        // does not listen: either way deliveries no longer come on it.
        let Some(open) = session.as_mut().filter(|open| open.is_listening()) else {
            return Err(ClientError::Network("the listening session ended".into()));
        };
        let Some(kind) = open.recv(deadline).await? else {
            if Instant::now() >= user_deadline {
                return Ok(());
            }
            router.tick(session).await?;
            continue;
        };
        if let Kind::Receipt(receipt) = &kind {
            open.send(Kind::ReceiptAck(frame::ReceiptAck {
                id: receipt.id.clone(),
            }))
            .await?;
        }
        if router.on_frame(&kind, session).await? {
            continue;
        }
        let Some(open) = session.as_mut() else {
            continue;
        };
        match kind {
            Kind::Deliver(deliver) => {
                let (Some(sender_device), Some(id)) = (
                    DeviceId::from_slice(&deliver.sender_device),
                    MessageId::from_slice(&deliver.id),
                ) else {
                    continue;
                };
                let shown = match receive(
                    account,
                    inbox,
                    not_theirs,
                    open,
                    sender_device,
                    id,
                    &deliver,
                )
                .await?
                {
                    Ok(()) => true,
                    Err(reason) => {
                        // Discarded for good: acknowledged below as such (no receipt: its sender
                        // learns nothing it would not learn from a device offline), and reported
                        // once.
                        if !handle(Event::Rejected {
                            sender_device,
                            id,
                            reason,
                        }) {
                            return Ok(());
                        }
                        false
                    }
                };
                if shown {
                    failpoint("client-received-committed");
                }
                let ack = acknowledgement(account, inbox, sender_device, id, shown)?;
                open.send(ack).await?;
                *awaiting.entry((sender_device, id)).or_default() += 1;
            }
            Kind::AckResult(result) => {
                let (Some(sender_device), Some(id)) = (
                    DeviceId::from_slice(&result.sender_device),
                    MessageId::from_slice(&result.id),
                ) else {
                    continue;
                };
                let key = (sender_device, id);
                let later = awaiting.get_mut(&key).map_or(0, |n| {
                    *n = n.saturating_sub(1);
                    *n
                });
                if later == 0 {
                    awaiting.remove(&key);
                }
                match AckStatus::try_from(result.status) {
                    // The sender withdrew it (and sends it as SMS): never show it here.
                    Ok(AckStatus::Withdrawn) => inbox.discard(sender_device, id)?,
                    // The server holds a durable record that it was delivered (ours, or our
                    // account's): ours to show once.
                    Ok(AckStatus::Confirmed) => {
                        if let Some(message) = inbox.take_to_show(sender_device, id)? {
                            if !handle(Event::Message(message)) {
                                return Ok(());
                            }
                        }
                    }
                    // No copy and no record: the message was pushed but never decided (the
                    // server stopped first). Never shown: its sender, whose message is not
                    // settled, sends it again (then it is received anew) or withdraws it and
                    // sends an SMS.
                    Ok(AckStatus::Unknown) | Err(_) => {
                        if later == 0 {
                            inbox.discard(sender_device, id)?;
                        }
                    }
                }
            }
            Kind::Receipt(receipt) => {
                if let (Some(id), Ok(kind)) = (
                    MessageId::from_slice(&receipt.id),
                    ReceiptKind::try_from(receipt.kind),
                ) {
                    if !handle(Event::Receipt { id, kind }) {
                        return Ok(());
                    }
                }
            }
            Kind::Missed(missed) => {
                let go_on = handle(Event::Missed {
                    messages: missed.messages,
                });
                // Shown: the server may forget them.
                open.send(Kind::MissedSeen(frame::MissedSeen {
                    messages: missed.messages,
                }))
                .await?;
                if !go_on {
                    return Ok(());
                }
            }
            Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
            Kind::Error(e) if e.fatal => return Err(e.into()),
            _ => {}
        }
    }
}

/// Acknowledges again every message an earlier run stored but did not show (it stopped before
/// the server confirmed the acknowledgement, or the acknowledgement never arrived). The answers
/// come back as `AckResult`s and are handled like any other: shown on `CONFIRMED`, forgotten on
/// `UNKNOWN`, discarded on `WITHDRAWN`. Showing them without asking would show a message its sender
/// withdrew meanwhile and sent as SMS: shown twice, by both routes.
async fn acknowledge_unshown(
    account: &Account,
    inbox: &mut Inbox,
    session: &mut Session,
) -> Result<()> {
    let unshown = inbox.unshown()?;
    if unshown.is_empty() {
        return Ok(());
    }
    let acks = unshown
        .into_iter()
        .map(|(sender_device, id)| acknowledgement(account, inbox, sender_device, id, true))
        .collect::<Result<Vec<_>>>()?;
    session.send_many(acks).await
}

/// The acknowledgement of a delivery (promise P7: no receipt reveals this device to a stranger).
/// One not `shown` is discarded: its sender sees what it would see for a device that never came
/// online. One shown asks for no receipt unless this device shows itself to everyone or has
/// written to the sender's number (a sender not checked to be the number's counts as a
/// stranger); the decision is this device's, the server keeps no list.
fn acknowledgement(
    account: &Account,
    inbox: &mut Inbox,
    sender_device: DeviceId,
    id: MessageId,
    shown: bool,
) -> Result<Kind> {
    let receipt = shown
        && (account.presence() == ShowOnline::Everyone
            || inbox.look(|crypto| {
                crypto
                    .device(sender_device)
                    .and_then(|known| known.number.as_deref())
                    .is_some_and(|number| crypto.has_written_to(number))
            })?);
    Ok(Kind::Ack(frame::Ack {
        sender_device: sender_device.as_bytes().to_vec(),
        id: id.as_bytes().to_vec(),
        discard: !shown,
        no_receipt: shown && !receipt,
    }))
}

/// Decrypts, checks and stores one delivery. `Ok(Err(reason))`: the delivery is rejected.
async fn receive(
    account: &Account,
    inbox: &mut Inbox,
    not_theirs: &mut NotTheirs,
    session: &mut Session,
    sender_device: DeviceId,
    id: MessageId,
    deliver: &frame::Deliver,
) -> Result<std::result::Result<(), String>> {
    // Already held, shown or not (a redelivery, or the sender's resend of an unsettled message
    // under the same id): acknowledged again so the server drops the copy, never decrypted or
    // shown again.
    if inbox.read(|tx| tx.contains(sender_device, id))? {
        return Ok(Ok(()));
    }
    // The usual case, in one transaction: a device already checked for the number its
    // message claims. Decrypted, checked, stored and the session saved together.
    let fast = inbox.update(|tx, crypto| {
        let (content, sender_key) = match open_delivery(crypto, sender_device, deliver) {
            Ok(opened) => opened,
            Err(reason) => return Ok(Change::Abandon(Some(Err(reason)))),
        };
        let checked = crypto.device(sender_device).is_some_and(|known| {
            known.number.as_deref() == Some(content.from.as_str())
                && known.identity_key == sender_key
        });
        let Some(trusted) = crypto.is_trusted(&content.from, &sender_key) else {
            return Ok(Change::Abandon(None));
        };
        if !checked {
            return Ok(Change::Abandon(None));
        }
        let warning =
            (!trusted && sender_device != account.device()).then(|| changed_warning(&content.from));
        crypto.remember_contact_token(&content.from, &content.sender_contact_token);
        crypto.remember_presence_token(
            &content.from,
            sender_device,
            &content.sender_presence_token,
        );
        tx.store(&received(sender_device, id, content, true, warning))?;
        Ok(Change::Save(Some(Ok(()))))
    })?;
    if let Some(done) = fast {
        return Ok(done);
    }
    // A device seen for the first time: a trial decryption on a throwaway copy tells who the
    // message claims to be from, which is checked against the directory before anything
    // is kept; then the real decryption, stored with the advanced session.
    let mut trial = inbox.snapshot()?;
    let claimed = match open_delivery(&mut trial, sender_device, deliver) {
        Ok((content, _)) => content.from,
        Err(reason) => return Ok(Err(reason)),
    };
    // The stamped sender is checked for free (the copy waits for us until we acknowledge it);
    // a device found not to be the claimed number's is remembered for an hour.
    let listed = match E164::parse(&claimed) {
        Err(_) => None,
        Ok(number) if not_theirs.known(number.as_str(), sender_device) => Some(Vec::new()),
        Ok(number) => match account
            .sender_directory(session, number.as_str(), sender_device)
            .await
        {
            Ok(listed) => {
                if !listed
                    .iter()
                    .any(|d| d.device_id == sender_device.as_bytes())
                {
                    not_theirs.remember(number.as_str(), sender_device);
                }
                Some(listed)
            }
            Err(ClientError::Refused(_)) => None,
            Err(e) => return Err(e),
        },
    };
    inbox.update(|tx, crypto| {
        if tx.contains(sender_device, id)? {
            return Ok(Change::Unchanged(Ok(())));
        }
        let (content, sender_key) = match open_delivery(crypto, sender_device, deliver) {
            Ok(opened) => opened,
            Err(reason) => return Ok(Change::Abandon(Err(reason))),
        };
        let (verified, warning) = judge_sender(
            account.device(),
            crypto,
            listed.as_deref(),
            &content.from,
            sender_device,
            sender_key,
        );
        // Only a sender shown to be a device of the number it claims hands us that number's token.
        if verified {
            crypto.remember_contact_token(&content.from, &content.sender_contact_token);
            crypto.remember_presence_token(
                &content.from,
                sender_device,
                &content.sender_presence_token,
            );
        }
        tx.store(&received(sender_device, id, content, verified, warning))?;
        Ok(Change::Save(Ok(())))
    })
}

/// Decrypts a delivery into its content, checking that it holds together. The error is the
/// reason to show.
fn open_delivery(
    crypto: &mut Crypto,
    sender_device: DeviceId,
    deliver: &frame::Deliver,
) -> std::result::Result<(Content, [u8; 32]), String> {
    let envelope = Envelope::decode(deliver.payload.clone())
        .map_err(|_| "not an encrypted envelope".to_string())?;
    let (plaintext, sender_key) = crypto
        .decrypt(sender_device, &envelope)
        .map_err(|e| e.to_string())?;
    let content = Content::decode(&plaintext[..])
        .map_err(|_| "the decrypted content is malformed".to_string())?;
    if content.id != deliver.id {
        return Err(
            "the message id inside does not match the one outside (replayed under another id)"
                .into(),
        );
    }
    Ok((content, sender_key))
}

/// Whether the sending device, holding `sender_key`, is a device of `claimed` in the
/// directory (`listed`; `None` if it could not be asked), and whether that key is trusted for
/// `claimed` (trusting the listed keys if nothing was trusted for it yet). Returns
/// (verified, warning); a message sent from `this_device`'s own id never warns.
fn judge_sender(
    this_device: DeviceId,
    crypto: &mut Crypto,
    listed: Option<&[frame::DeviceKeys]>,
    claimed: &str,
    sender_device: DeviceId,
    sender_key: [u8; 32],
) -> (bool, Option<String>) {
    let Some(listed) = listed else {
        return (
            false,
            Some(format!(
                "this message claims to be from {claimed}, which could not be checked now"
            )),
        );
    };
    let Some(entry) = listed.iter().find(|d| {
        d.device_id == sender_device.as_bytes() && key_of(&d.identity_key) == Some(sender_key)
    }) else {
        return (
            false,
            Some(format!(
                "this message claims to be from {claimed} but was sent by a device that is not theirs"
            )),
        );
    };
    // Every listed device is learnt: a voucher's signing key may be needed below.
    for listed_device in listed {
        if let Some(device) = DeviceId::from_slice(&listed_device.device_id) {
            crypto.learn_device(device, claimed, listed_device);
        }
    }
    crypto.learn_device(sender_device, claimed, entry);
    let trusted = match crypto.is_trusted(claimed, &sender_key) {
        Some(false) => crypto.accept_vouched(claimed, &[sender_key]).is_empty(),
        Some(true) => true,
        None => {
            let keys: Vec<[u8; 32]> = listed
                .iter()
                .filter_map(|d| key_of(&d.identity_key))
                .collect();
            crypto.check_trust(claimed, &keys);
            true
        }
    };
    if trusted || sender_device == this_device {
        (true, None)
    } else {
        (true, Some(changed_warning(claimed)))
    }
}

fn changed_warning(number: &str) -> String {
    format!(
        "the safety number with {number} changed: this comes from a key you have not trusted; compare `tidings fingerprint {number}` with them"
    )
}

fn received(
    sender_device: DeviceId,
    id: MessageId,
    content: Content,
    sender_verified: bool,
    warning: Option<String>,
) -> Received {
    Received {
        sender_device,
        id,
        from: content.from,
        to: content.to,
        text: content.text,
        sent_at_ms: content.sent_at_ms,
        sender_verified,
        warning,
    }
}
