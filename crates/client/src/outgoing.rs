//! Sending over IP: the plaintext content, one end-to-end encrypted copy per device that must get
//! it, and the one "devices changed" retry — the server names the devices the copies missed or
//! had too many of, keys are claimed for the new ones and the copies are made again, as often as
//! [`tidings_core::fallback`] allows. Both the direct send ([`send`]) and the fallback router
//! ([`crate::route`]) build their copies here.
//!
//! Promise E3's sending half: trust is checked before anything is encrypted; a changed key
//! stops the send. Promise E4's sending half: the advanced sessions are saved before a copy
//! leaves, so a message key is never used twice. Nothing here logs a number, a body or a key.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use tidings_core::fallback::{Action, Event, Outcome, Outgoing, Phase, Policy, Route};
use tidings_core::Millis;
use tidings_proto::frame::{self, Content, Kind, ReceiptKind, SendMode, SendOutcome};
use tidings_proto::id::{DeviceId, MessageId};
use tidings_proto::number::E164;
use tidings_proto::MAX_SEND_PROOFS;
use tokio::time::Instant;
use zeroize::Zeroizing;

use crate::account::Account;
use crate::clock::now_ms;
use crate::e2e::TrustCheck;
use crate::inbox::{Change, Inbox};
use crate::profile::ShowOnline;
use crate::session::Session;
use crate::{ClientError, Result};

/// What happened to a sent message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReport {
    pub id: MessageId,
    /// The server's answer; `None` if none came within the wait (the message is kept).
    pub outcome: Option<SendOutcome>,
    /// Nothing is left to do for the message: it is settled, or was refused with nothing
    /// stored. False: it is kept in the profile and `tidings listen` sends it again.
    pub settled: bool,
    /// The receipt, if one arrived while waiting.
    pub receipt: Option<ReceiptKind>,
    /// Encrypted copies sent (every device of the receiver and this number's other devices).
    pub copies: usize,
    /// This number's own devices the server skipped because their queue is full: they will miss
    /// the message (and learn how many they missed when they drain).
    pub skipped_own_devices: usize,
    /// `RateLimited`: how long until the server would accept a send.
    pub retry_after: Option<std::time::Duration>,
    /// `Accepted`/`Queued`: how long the server keeps the message at most, when that is less
    /// than asked (the receiver has not written to this number: it is a stranger there).
    pub kept_for: Option<std::time::Duration>,
    /// What the server added to its answer, for a person (empty if nothing).
    pub detail: String,
}

/// A fresh random message id.
pub fn new_message_id() -> MessageId {
    let mut id = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut id);
    MessageId(id)
}

/// The devices a `DevicesChanged` answer named: copies to drop, and devices (the receiver's and
/// this number's own) that need one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangedDevices {
    pub gone: Vec<DeviceId>,
    pub missing: Vec<DeviceId>,
    pub missing_own: Vec<DeviceId>,
}

impl ChangedDevices {
    /// The devices named in the server's answer.
    pub fn from_answer(answer: &frame::SendResult) -> Self {
        let devices = |list: &[Vec<u8>]| -> Vec<DeviceId> {
            list.iter()
                .filter_map(|d| DeviceId::from_slice(d))
                .collect()
        };
        Self {
            gone: devices(&answer.extra_devices),
            missing: devices(&answer.missing_devices),
            missing_own: devices(&answer.missing_own_devices),
        }
    }
}

/// Keys claimed and devices to forget, applied to the end-to-end state at the next encryption.
#[derive(Debug, Default)]
struct KeyChanges {
    claimed: Vec<(String, Vec<frame::ClaimedKey>)>,
    forget: Vec<DeviceId>,
}

/// Claims keys for the devices the server named as new, and marks the gone ones to be
/// forgotten: what a re-encryption needs. No device is skipped.
async fn claim_changed(
    account: &Account,
    session: &mut Session,
    to: &str,
    changed: &ChangedDevices,
) -> Result<KeyChanges> {
    let mut changes = KeyChanges {
        claimed: Vec::new(),
        forget: changed.gone.clone(),
    };
    if !changed.missing.is_empty() {
        let keys = account.claim(session, to, &changed.missing).await?;
        changes.claimed.push((to.to_string(), keys));
    }
    if !changed.missing_own.is_empty() {
        let own = account.number().to_string();
        let keys = account.claim(session, &own, &changed.missing_own).await?;
        changes.claimed.push((own, keys));
    }
    Ok(changes)
}

/// The plaintext every copy of a message carries, with this device's contact token so that the
/// receiver can write back as a contact.
fn content(
    from: &str,
    to: &str,
    text: &str,
    id: MessageId,
    contact_token: [u8; 32],
) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(
        Content {
            from: from.to_string(),
            text: text.to_string(),
            sent_at_ms: now_ms(),
            id: id.as_bytes().to_vec(),
            to: to.to_string(),
            sender_contact_token: contact_token.to_vec(),
            // Set per receiving device by `encrypt_copies`.
            sender_presence_token: Vec::new(),
        }
        .encode_to_vec(),
    )
}

/// `plaintext` (an encoded `Content`) carrying the presence token `token`.
fn with_presence_token(plaintext: &[u8], token: [u8; 32]) -> Result<Zeroizing<Vec<u8>>> {
    let mut content = Content::decode(plaintext)
        .map_err(|_| ClientError::Protocol("malformed content to send".into()))?;
    content.sender_presence_token = token.to_vec();
    let encoded = Zeroizing::new(content.encode_to_vec());
    zeroize::Zeroize::zeroize(&mut content.text);
    Ok(encoded)
}

/// Proofs that this device may see the devices of `to` online, for the `Send`.
fn presence_proofs(inbox: &mut Inbox, to: &str) -> Result<Vec<frame::PresenceProof>> {
    inbox.look(|crypto| crypto.presence_proofs(to, now_ms(), MAX_SEND_PROOFS))
}

/// Encrypts one copy of `plaintext` per device that must get one (the receiver's and this
/// number's other devices), after opening sessions with the claimed keys and forgetting the
/// gone devices in `changes`. Trust is checked first: a changed key stops everything.
fn encrypt_copies(
    account: &Account,
    inbox: &mut Inbox,
    changes: &mut KeyChanges,
    to: &str,
    plaintext: &[u8],
) -> Result<Vec<frame::Copy>> {
    let own = account.number();
    let this_device = account.device();
    inbox.update(|_, crypto| {
        for device in changes.forget.drain(..) {
            crypto.forget_device(device);
        }
        for (number, keys) in changes.claimed.drain(..) {
            for key in &keys {
                crypto.open_session(&number, key)?;
            }
        }
        let mut numbers = vec![to];
        if own != to {
            numbers.push(own);
        }
        for number in numbers {
            let keys: Vec<[u8; 32]> = crypto
                .devices_of(number)
                .into_iter()
                .filter(|device| *device != this_device)
                .filter_map(|device| crypto.device(device).map(|k| k.identity_key))
                .collect();
            if keys.is_empty() {
                continue;
            }
            if let TrustCheck::Changed(new) = crypto.check_trust(number, &keys) {
                // A new device vouched for by a trusted device of the number is accepted.
                let untrusted = crypto.accept_vouched(number, &new);
                if !untrusted.is_empty() {
                    return Err(ClientError::IdentityChanged {
                        number: number.to_string(),
                        count: untrusted.len(),
                    });
                }
            }
        }
        let receivers = crypto.devices_of(to);
        let mut targets = receivers.clone();
        if own != to {
            targets.extend(crypto.devices_of(own));
        }
        targets.retain(|device| *device != this_device);
        crypto.note_written_to(to);
        let shows = account.presence() != ShowOnline::Nobody && own != to;
        let mut copies = Vec::with_capacity(targets.len());
        for device in targets {
            // Each of the receiver's devices gets the token this device hands it, so that it may
            // see this device online (P7); the sender's own other devices get none.
            let with_token;
            let plaintext = if shows && receivers.contains(&device) {
                with_token = with_presence_token(plaintext, crypto.presence_token_for(device))?;
                &with_token[..]
            } else {
                plaintext
            };
            let envelope = crypto.encrypt(device, plaintext)?;
            copies.push(frame::Copy {
                device_id: device.as_bytes().to_vec(),
                payload: Bytes::from(envelope.encode_to_vec()),
            });
        }
        // Saved before the copies leave: a used message key is never used again, even if
        // this process dies right after.
        Ok(Change::Save(copies))
    })
}

/// This device's contact token (for the content) and the one `to` handed us, if any (for the
/// `Send`, empty without one), read once the keys, and with them the token, are saved.
fn contact_tokens(inbox: &mut Inbox, to: &str) -> Result<([u8; 32], Vec<u8>)> {
    inbox.look(|crypto| {
        let receiver = crypto.contact_token_of(to).map(|t| t.to_vec());
        (crypto.contact_token(), receiver.unwrap_or_default())
    })
}

/// Sends a text over IP only, in `mode`, end-to-end encrypted for every device of the receiver
/// and this number's other devices. Waits up to `wait` for the server's answer and, for an
/// accepted message, for its receipt.
///
/// The message is committed to the profile (sealed) before its first copy goes out and kept
/// until it is settled (the answer says so, or a `Settled` frame names it) or refused with
/// nothing stored; what is not settled when the wait ends stays there, and `listen` sends it
/// again under the same id ([`crate::route::Router`] resumes it), re-encrypted.
pub async fn send(
    account: &Account,
    to: &str,
    text: &str,
    mode: SendMode,
    ttl_seconds: u32,
    wait: Duration,
) -> Result<SendReport> {
    let to = E164::parse(to)?.as_str().to_string();
    let id = new_message_id();
    let mut inbox = account.inbox()?;
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
    let (own_token, receiver_token) = contact_tokens(&mut inbox, &to)?;
    let plaintext = content(account.number(), &to, text, id, own_token);
    let to_account = account.reachable_pseudonym(&mut session, &to).await?;

    // A first message to a number: claim keys for all its devices now rather than learn them
    // from a refused send.
    let mut changes = KeyChanges::default();
    if inbox.look(|crypto| crypto.devices_of(&to).is_empty())? {
        let keys = account.claim(&mut session, &to, &[]).await?;
        changes.claimed.push((to.clone(), keys));
    }
    let policy = Policy::default();
    let mut machine = Outgoing::new(Route::IpOnly { mode }, now_ms());
    // Taken when carried out: a frame that is no event for this message (another message's
    // receipt, pushed at login) must not carry the same action out again.
    let mut action = Some(machine.next(now_ms()));
    // Committed before the first copy goes out: from here on the message is `listen`'s to send
    // again if this process stops before it is settled.
    commit(&inbox, id, &to, text, &machine)?;
    tidings_core::failpoint::failpoint("client-outgoing-committed");
    let mut changed: Option<ChangedDevices> = None;
    let mut deadline = Instant::now() + wait;
    let mut answer: Option<SendOutcome> = None;
    let mut retry_after = None;
    let mut kept_for = None;
    let mut detail = String::new();
    let mut receipt: Option<ReceiptKind> = None;
    let mut receipt_came = false;
    let mut copies = 0;
    let mut skipped_own_devices = 0;
    loop {
        match action.take() {
            Some(Action::SendIp(mode) | Action::Reencrypt(mode)) => {
                let made = match make_copies(
                    account,
                    &mut inbox,
                    &mut session,
                    &mut changes,
                    changed.take(),
                    &to,
                    &plaintext,
                )
                .await
                {
                    Ok(made) => made,
                    Err(e) => {
                        // Nothing of this message left the device: it is not kept for a resend.
                        forget(&inbox, id, &to, text, &mut machine)?;
                        return Err(e);
                    }
                };
                copies = made.len();
                session
                    .send(Kind::Send(frame::Send {
                        id: id.as_bytes().to_vec(),
                        to_account: to_account.to_vec(),
                        mode: mode as i32,
                        ttl_seconds,
                        copies: made,
                        receiver_contact_token: receiver_token.clone(),
                        presence_proofs: presence_proofs(&mut inbox, &to)?,
                        resend: machine.is_resend(),
                        ..frame::Send::default()
                    }))
                    .await?;
                deadline = Instant::now() + wait;
            }
            Some(Action::Finished(Outcome::NotSent(SendOutcome::DevicesChanged))) => {
                return Err(ClientError::Refused(
                    "the receiver's devices kept changing while sending: try again".into(),
                ));
            }
            // Over IP only there is no withdraw and no SMS; the rest is waiting.
            Some(
                Action::Withdraw | Action::SendSms | Action::Wait { .. } | Action::Finished(_),
            )
            | None => {}
        }
        // Reported once the server answered and the message is settled (or refused) and, for a
        // message a device took, the receipt came.
        if answer.is_some_and(|answer| {
            machine.is_done() && (answer != SendOutcome::Accepted || receipt_came)
        }) {
            break;
        }
        let Some(kind) = session.recv(deadline).await? else {
            break;
        };
        let mut events = Vec::with_capacity(2);
        match kind {
            Kind::SendResult(result) if result.id == id.as_bytes() => {
                match SendOutcome::try_from(result.outcome).unwrap_or(SendOutcome::Invalid) {
                    SendOutcome::DevicesChanged => {
                        changed = Some(ChangedDevices::from_answer(&result));
                        events.push(Event::DevicesChanged);
                    }
                    answered => {
                        retry_after = crate::retry_after(result.retry_after_ms);
                        kept_for = (result.ttl_seconds > 0)
                            .then(|| std::time::Duration::from_secs(u64::from(result.ttl_seconds)));
                        answer = Some(answered);
                        skipped_own_devices = result.skipped_own_devices.len();
                        detail = result.detail.clone();
                        events.push(Event::Answer(answered));
                        if result.settled {
                            events.push(Event::Settled);
                        }
                    }
                }
            }
            Kind::Settled(settled) if settled.ids.iter().any(|s| s == id.as_bytes()) => {
                events.push(Event::Settled);
            }
            Kind::Receipt(r) => {
                session
                    .send(Kind::ReceiptAck(frame::ReceiptAck { id: r.id.clone() }))
                    .await?;
                if r.id != id.as_bytes() {
                    continue;
                }
                receipt = ReceiptKind::try_from(r.kind).ok();
                receipt_came = true;
                match receipt {
                    Some(kind) => events.push(Event::Receipt(kind)),
                    None => continue,
                }
            }
            Kind::SignedOut(s) => return Err(ClientError::SignedOut(s.reason)),
            Kind::Error(e) if e.fatal => return Err(e.into()),
            _ => continue,
        };
        for event in events {
            action = Some(machine.handle(&policy, event, now_ms()));
        }
        commit(&inbox, id, &to, text, &machine)?;
    }
    Ok(SendReport {
        id,
        outcome: answer,
        settled: machine.is_done(),
        receipt,
        copies,
        skipped_own_devices,
        retry_after,
        kept_for,
        detail,
    })
}

/// Stores the message's state in the profile: kept (and sent again by `listen`) until the
/// machine is done.
fn commit(inbox: &Inbox, id: MessageId, to: &str, text: &str, machine: &Outgoing) -> Result<()> {
    inbox.save_outgoing(id, to, text, &store_state(machine, ""), machine.is_done())
}

/// Ends a message none of whose copies left the device (they could not be made: a changed
/// safety number, too long, keys not claimed) as not sent, so nothing sends it again.
fn forget(
    inbox: &Inbox,
    id: MessageId,
    to: &str,
    text: &str,
    machine: &mut Outgoing,
) -> Result<()> {
    machine.handle(
        &Policy::default(),
        Event::Answer(SendOutcome::Invalid),
        now_ms(),
    );
    commit(inbox, id, to, text, machine)
}

/// The copies of one send: keys claimed for the devices a `DevicesChanged` answer named, then
/// one copy per device, checked against the payload bound.
async fn make_copies(
    account: &Account,
    inbox: &mut Inbox,
    session: &mut Session,
    changes: &mut KeyChanges,
    changed: Option<ChangedDevices>,
    to: &str,
    plaintext: &[u8],
) -> Result<Vec<frame::Copy>> {
    if let Some(changed) = changed {
        *changes = claim_changed(account, session, to, &changed).await?;
    }
    let made = encrypt_copies(account, inbox, changes, to, plaintext)?;
    let total: usize = made.iter().map(|c| c.payload.len()).sum();
    if total > tidings_proto::MAX_PAYLOAD_BYTES {
        return Err(ClientError::Refused(format!(
            "the message is too long: its {} encrypted copies come to {total} bytes, at most {} are allowed",
            made.len(),
            tidings_proto::MAX_PAYLOAD_BYTES
        )));
    }
    Ok(made)
}

/// Builds encrypted `Send`s (queued, the server's TTL) of `messages` for `to` without sending
/// them, claiming whatever keys are needed first on a session of its own: for the first message
/// to a number, for this number's devices not known here, or for the devices a `DevicesChanged`
/// answer named (`changed`). `claimed_from` makes the content claim another sender (tests of the
/// receiver's check only).
pub async fn prepare_batch(
    account: &Account,
    to: &str,
    messages: &[(MessageId, String)],
    claimed_from: Option<&str>,
    changed: Option<&ChangedDevices>,
) -> Result<Vec<frame::Send>> {
    let to = E164::parse(to)?.as_str().to_string();
    let own = account.number().to_string();
    let mut inbox = account.inbox()?;
    let mut session = account.session(false).await?;
    account.ensure_keys(&mut inbox, &mut session).await?;
    let (own_token, receiver_token) = contact_tokens(&mut inbox, &to)?;
    let to_account = account.reachable_pseudonym(&mut session, &to).await?;
    let mut changes = match changed {
        Some(changed) => claim_changed(account, &mut session, &to, changed).await?,
        None => claim_unknown(account, &mut inbox, &mut session, &to).await?,
    };
    let mut sends = Vec::with_capacity(messages.len());
    for (id, text) in messages {
        let plaintext = content(claimed_from.unwrap_or(&own), &to, text, *id, own_token);
        let copies = encrypt_copies(account, &mut inbox, &mut changes, &to, &plaintext)?;
        sends.push(frame::Send {
            id: id.as_bytes().to_vec(),
            to_account: to_account.to_vec(),
            mode: SendMode::Queue as i32,
            copies,
            receiver_contact_token: receiver_token.clone(),
            presence_proofs: presence_proofs(&mut inbox, &to)?,
            ..frame::Send::default()
        });
    }
    Ok(sends)
}

/// Claims keys for every device of `to` if none is known here, and for this number's other
/// devices that the directory lists but this device does not know.
async fn claim_unknown(
    account: &Account,
    inbox: &mut Inbox,
    session: &mut Session,
    to: &str,
) -> Result<KeyChanges> {
    let own = account.number().to_string();
    let (known_to, known_own) =
        inbox.look(|crypto| (crypto.devices_of(to), crypto.devices_of(&own)))?;
    let mut changes = KeyChanges::default();
    if known_to.is_empty() {
        let keys = account.claim(session, to, &[]).await?;
        changes.claimed.push((to.to_string(), keys));
    }
    if own != to {
        let missing: Vec<DeviceId> = account
            .directory(session, &own)
            .await?
            .iter()
            .filter_map(|d| DeviceId::from_slice(&d.device_id))
            .filter(|d| *d != account.device() && !known_own.contains(d))
            .collect();
        if !missing.is_empty() {
            let keys = account.claim(session, &own, &missing).await?;
            changes.claimed.push((own, keys));
        }
    }
    Ok(changes)
}

/// One message prepared by [`prepare_batch`].
pub async fn prepare_one(
    account: &Account,
    to: &str,
    text: &str,
    id: MessageId,
    claimed_from: Option<&str>,
    changed: Option<&ChangedDevices>,
) -> Result<frame::Send> {
    let mut sends = prepare_batch(
        account,
        to,
        &[(id, text.to_string())],
        claimed_from,
        changed,
    )
    .await?;
    sends
        .pop()
        .ok_or_else(|| ClientError::Protocol("nothing was prepared".into()))
}

/// The name of an outcome in output and JSON.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::SentAsSms => "sent_as_sms",
        Outcome::NotSent(refused) => refused.as_str(),
        Outcome::Expired => "expired",
        Outcome::SmsRejected => "sms_rejected",
        Outcome::Settled(taken) => taken.as_str(),
    }
}

/// A message's state as stored in the profile (the routing state of [`crate::route`] and the
/// durability state of [`send`] alike).
#[derive(Serialize, Deserialize)]
struct Stored {
    route: StoredRoute,
    created: Millis,
    phase: StoredPhase,
    /// The last problem seen (gateway down, ...), for the user.
    #[serde(default)]
    detail: String,
    /// Times the copies were made again because the devices changed.
    #[serde(default)]
    reencrypted: u32,
    /// Times a send was made (or may have been).
    #[serde(default)]
    sends: u32,
    /// Whether the server said it is settled.
    #[serde(default)]
    settled: bool,
    /// A delivery receipt came before it was settled.
    #[serde(default)]
    delivered: bool,
    /// The server took it: `ACCEPTED` (true) or `QUEUED` (false).
    #[serde(default)]
    taken: Option<bool>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum StoredRoute {
    Auto,
    IpOnly {
        #[serde(default)]
        now_or_never: bool,
    },
    SmsOnly,
    QueueThenSms {
        after: Millis,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
enum StoredPhase {
    SendIp,
    Reencrypt,
    AwaitingAnswer,
    Resend { at: Millis, attempt: u32 },
    AwaitingReceipt { until: Millis },
    Withdraw { at: Millis, attempt: u32 },
    Withdrawing { attempt: u32 },
    Sms { at: Millis, attempt: u32 },
    SendingSms { attempt: u32 },
    Done { outcome: String },
}

pub(crate) fn store_state(outgoing: &Outgoing, detail: &str) -> String {
    let route = match outgoing.route {
        Route::Auto => StoredRoute::Auto,
        Route::IpOnly { mode } => StoredRoute::IpOnly {
            now_or_never: mode == SendMode::NowOrNever,
        },
        Route::SmsOnly => StoredRoute::SmsOnly,
        Route::QueueThenSms { after } => StoredRoute::QueueThenSms { after },
    };
    let phase = match outgoing.phase {
        Phase::SendIp => StoredPhase::SendIp,
        Phase::Reencrypt => StoredPhase::Reencrypt,
        Phase::AwaitingAnswer => StoredPhase::AwaitingAnswer,
        Phase::Resend { at, attempt } => StoredPhase::Resend { at, attempt },
        Phase::AwaitingReceipt { until } => StoredPhase::AwaitingReceipt { until },
        Phase::Withdraw { at, attempt } => StoredPhase::Withdraw { at, attempt },
        Phase::Withdrawing { attempt } => StoredPhase::Withdrawing { attempt },
        Phase::Sms { at, attempt } => StoredPhase::Sms { at, attempt },
        Phase::SendingSms { attempt } => StoredPhase::SendingSms { attempt },
        Phase::Done(outcome) => StoredPhase::Done {
            outcome: outcome_name(outcome).into(),
        },
    };
    let stored = Stored {
        route,
        created: outgoing.created,
        phase,
        detail: detail.to_string(),
        reencrypted: outgoing.reencrypted,
        sends: outgoing.sends,
        settled: outgoing.settled,
        delivered: outgoing.delivered,
        taken: outgoing.taken.map(|taken| taken == SendOutcome::Accepted),
    };
    serde_json::to_string(&stored).unwrap_or_default()
}

/// Restores a stored state; the machine makes safe what was under way when the client stopped
/// ([`Outgoing::resume`]).
pub(crate) fn load_state(text: &str, policy: &Policy, now: Millis) -> Option<Outgoing> {
    let stored: Stored = serde_json::from_str(text).ok()?;
    let route = match stored.route {
        StoredRoute::Auto => Route::Auto,
        StoredRoute::IpOnly { now_or_never } => Route::IpOnly {
            mode: if now_or_never {
                SendMode::NowOrNever
            } else {
                SendMode::Queue
            },
        },
        StoredRoute::SmsOnly => Route::SmsOnly,
        StoredRoute::QueueThenSms { after } => Route::QueueThenSms { after },
    };
    let phase = match stored.phase {
        StoredPhase::SendIp => Phase::SendIp,
        StoredPhase::Reencrypt => Phase::Reencrypt,
        StoredPhase::AwaitingAnswer => Phase::AwaitingAnswer,
        StoredPhase::Resend { at, attempt } => Phase::Resend { at, attempt },
        StoredPhase::AwaitingReceipt { until } => Phase::AwaitingReceipt { until },
        StoredPhase::Withdraw { at, attempt } => Phase::Withdraw { at, attempt },
        StoredPhase::Withdrawing { attempt } => Phase::Withdrawing { attempt },
        StoredPhase::Sms { at, attempt } => Phase::Sms { at, attempt },
        StoredPhase::SendingSms { attempt } => Phase::SendingSms { attempt },
        StoredPhase::Done { .. } => return None,
    };
    Outgoing {
        route,
        phase,
        created: stored.created,
        reencrypted: stored.reencrypted,
        sends: stored.sends,
        settled: stored.settled,
        delivered: stored.delivered,
        taken: stored.taken.map(|accepted| {
            if accepted {
                SendOutcome::Accepted
            } else {
                SendOutcome::Queued
            }
        }),
    }
    .resume(policy, now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_devices_changed_answer_names_the_gone_and_the_missing_devices() {
        let device = |n: u8| DeviceId([n; 16]);
        let answer = frame::SendResult {
            extra_devices: vec![device(1).as_bytes().to_vec(), vec![0; 3]],
            missing_devices: vec![device(2).as_bytes().to_vec()],
            missing_own_devices: vec![device(3).as_bytes().to_vec(), device(4).as_bytes().to_vec()],
            ..Default::default()
        };
        assert_eq!(
            ChangedDevices::from_answer(&answer),
            ChangedDevices {
                // A malformed id is dropped, not guessed at.
                gone: vec![device(1)],
                missing: vec![device(2)],
                missing_own: vec![device(3), device(4)],
            }
        );
        assert_eq!(
            ChangedDevices::from_answer(&frame::SendResult::default()),
            ChangedDevices::default()
        );
    }

    #[test]
    fn every_copy_carries_the_same_content() {
        let id = new_message_id();
        assert_ne!(id, new_message_id(), "ids are random");
        let plaintext = content("+4915112345678", "+4915187654321", "hello", id, [7; 32]);
        let decoded = Content::decode(&plaintext[..]).expect("content");
        assert_eq!(decoded.from, "+4915112345678");
        assert_eq!(decoded.to, "+4915187654321");
        assert_eq!(decoded.text, "hello");
        assert_eq!(decoded.id, id.as_bytes());
        assert!(decoded.sent_at_ms > 0);
        assert_eq!(decoded.sender_contact_token, [7; 32]);
    }
}
