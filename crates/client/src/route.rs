//! Sending with SMS fallback: carries out what `tidings_core::fallback::Outgoing` decides, over a
//! session and the profile's SMS transport, and stores each message's state in the profile so a
//! restarted client (`tidings listen`) resumes what was pending.
//!
//! The core decides; this module only performs the actions (send, re-encrypt, withdraw, SMS) and
//! feeds the events back: it never sets a message's phase itself. The copies are made by
//! [`crate::outgoing`]; this module depends on it and on [`Account`], never on the `Client` that
//! embeds both. A withdrawn message is never sent as SMS before the server has answered the
//! withdraw, so the receiver never gets a message twice. An IP-only message that a stopped
//! `send` or a lost session left unsettled is resumed here too and sent again under its id,
//! re-encrypted and marked as a resend, until the server settles it.

use std::collections::HashMap;
use std::time::Duration;

use tidings_core::failpoint::failpoint;
use tidings_core::fallback::{Action, Event, Outcome, Outgoing, Policy, Route, Withdrawal};
use tidings_core::{Millis, SECOND};
use tidings_gateway::{Sms, Transport};
use tidings_proto::frame::{self, Kind, ReceiptKind, SendOutcome, WithdrawState};
use tidings_proto::id::MessageId;
use tidings_proto::number::E164;
use tokio::time::Instant;

use crate::account::Account;
use crate::clock::{instant_at, now_ms};
use crate::inbox::Inbox;
pub use crate::outgoing::outcome_name;
use crate::outgoing::{self, load_state, store_state, ChangedDevices};
use crate::profile::Routing;
use crate::session::Session;
use crate::{ClientError, Result};

/// Parses a route name from the profile or the command line.
pub fn parse_route(name: &str, fallback_after_seconds: u64) -> Result<Route> {
    Ok(match name {
        "auto" => Route::Auto,
        "ip-only" => Route::IP_QUEUED,
        "sms-only" => Route::SmsOnly,
        "queue-then-sms" => Route::QueueThenSms {
            after: fallback_after_seconds.saturating_mul(SECOND),
        },
        other => {
            return Err(ClientError::Profile(format!(
                "unknown route `{other}`: use auto, ip-only, sms-only or queue-then-sms"
            )))
        }
    })
}

/// The route a send takes and its name: `chosen` (from the command line) if given, else the
/// profile's. `auto` needs an SMS transport: a profile without one queues over IP instead.
pub fn choose_route(
    routing: &Routing,
    chosen: Option<String>,
    fallback_after_seconds: Option<u64>,
) -> Result<(String, Route)> {
    let name = match chosen {
        Some(name) => name,
        None if routing.route == "auto" && routing.sms.is_none() => "ip-only".to_string(),
        None => routing.route.clone(),
    };
    let route = parse_route(
        &name,
        fallback_after_seconds.unwrap_or(routing.fallback_after_seconds),
    )?;
    Ok((name, route))
}

struct Entry {
    outgoing: Outgoing,
    to: String,
    text: String,
    detail: String,
    /// The devices the server named in its last `DevicesChanged` answer, for the re-encryption.
    changed: Option<ChangedDevices>,
}

/// Where one message stands, for reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub id: MessageId,
    /// The final outcome, or `None` while it is still pending.
    pub outcome: Option<Outcome>,
    /// What is happening or went wrong, for the user.
    pub detail: String,
}

/// The outgoing messages of one profile and the means to move them along.
pub struct Router<'a> {
    account: &'a Account,
    /// Its own handle on the profile's store (the caller keeps another for receiving).
    inbox: Inbox,
    policy: Policy,
    transport: Option<Transport>,
    pending: HashMap<MessageId, Entry>,
    finished: HashMap<MessageId, (Outcome, String)>,
}

impl std::fmt::Debug for Router<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'a> Router<'a> {
    /// A router with the profile's settings and its stored pending messages.
    pub fn new(account: &'a Account, routing: &Routing, resume: bool) -> Result<Self> {
        let inbox = account.inbox()?;
        let policy = Policy {
            receipt_timeout: routing.receipt_timeout_seconds.saturating_mul(SECOND),
            ..Policy::default()
        };
        let transport = routing
            .sms
            .clone()
            .map(|config| Transport::new(config, routing.max_sms_parts));
        let now = now_ms();
        let mut pending = HashMap::new();
        let stored = if resume {
            inbox.pending_outgoing()?
        } else {
            Vec::new()
        };
        for (id, to, text, state) in stored {
            if let Some(outgoing) = load_state(&state, &policy, now) {
                pending.insert(
                    id,
                    Entry {
                        outgoing,
                        to,
                        text,
                        detail: String::new(),
                        changed: None,
                    },
                );
            }
        }
        Ok(Self {
            account,
            inbox,
            policy,
            transport,
            pending,
            finished: HashMap::new(),
        })
    }

    /// Whether an SMS transport is configured.
    pub fn has_transport(&self) -> bool {
        self.transport.is_some()
    }

    /// Starts a new message and takes its first steps.
    pub async fn start(
        &mut self,
        session: &mut Option<Session>,
        to: &str,
        text: &str,
        route: Route,
    ) -> Result<MessageId> {
        let id = outgoing::new_message_id();
        let outgoing = Outgoing::new(route, now_ms());
        self.pending.insert(
            id,
            Entry {
                outgoing,
                to: to.to_string(),
                text: text.to_string(),
                detail: String::new(),
                changed: None,
            },
        );
        self.persist(id)?;
        failpoint("client-outgoing-committed");
        self.advance(id, session, None).await?;
        Ok(id)
    }

    /// Where a message stands.
    pub fn status(&self, id: MessageId) -> Status {
        if let Some((outcome, detail)) = self.finished.get(&id) {
            return Status {
                id,
                outcome: Some(*outcome),
                detail: detail.clone(),
            };
        }
        let detail = self
            .pending
            .get(&id)
            .map(|e| e.detail.clone())
            .unwrap_or_default();
        Status {
            id,
            outcome: None,
            detail,
        }
    }

    /// Messages that finished since the last call.
    pub fn take_finished(&mut self) -> Vec<(MessageId, Outcome, String)> {
        self.finished
            .drain()
            .map(|(id, (outcome, detail))| (id, outcome, detail))
            .collect()
    }

    /// The earliest time a pending message needs attention without an event.
    pub fn next_wake(&mut self) -> Option<Millis> {
        let now = now_ms();
        self.pending
            .values()
            .filter_map(|entry| entry.outgoing.wake_at(now))
            .min()
    }

    /// Moves every message whose time has come.
    pub async fn tick(&mut self, session: &mut Option<Session>) -> Result<()> {
        let ids: Vec<MessageId> = self.pending.keys().copied().collect();
        for id in ids {
            self.advance(id, session, None).await?;
        }
        Ok(())
    }

    /// Offers a frame from the server; returns true if it belonged to a routed message.
    pub async fn on_frame(&mut self, kind: &Kind, session: &mut Option<Session>) -> Result<bool> {
        if let Kind::Settled(settled) = kind {
            let mut ours = false;
            for id in settled
                .ids
                .iter()
                .filter_map(|id| MessageId::from_slice(id))
            {
                if self.pending.contains_key(&id) {
                    ours = true;
                    self.advance(id, session, Some(Event::Settled)).await?;
                }
            }
            return Ok(ours);
        }
        let (id, event) = match kind {
            Kind::SendResult(result) => (
                &result.id,
                match SendOutcome::try_from(result.outcome).unwrap_or(SendOutcome::Invalid) {
                    SendOutcome::DevicesChanged => Event::DevicesChanged,
                    answered => Event::Answer(answered),
                },
            ),
            Kind::Receipt(receipt) => match ReceiptKind::try_from(receipt.kind) {
                Ok(kind) => (&receipt.id, Event::Receipt(kind)),
                Err(_) => return Ok(false),
            },
            Kind::WithdrawResult(result) => (&result.id, withdraw_event(result)),
            _ => return Ok(false),
        };
        let Some(id) = MessageId::from_slice(id) else {
            return Ok(false);
        };
        let Some(entry) = self.pending.get_mut(&id) else {
            return Ok(false);
        };
        if let (Event::DevicesChanged, Kind::SendResult(result)) = (event, kind) {
            // Kept for the re-encryption the machine may ask for next.
            entry.changed = Some(ChangedDevices::from_answer(result));
        }
        if let Some(refusal) = refusal_detail(kind) {
            entry.detail = refusal;
        }
        self.advance(id, session, Some(event)).await?;
        if let Kind::SendResult(result) = kind {
            if result.settled {
                self.advance(id, session, Some(Event::Settled)).await?;
            }
        }
        Ok(true)
    }

    /// The session was lost: whatever waited for the server's answer must be made safe.
    pub async fn on_session_lost(&mut self, session: &mut Option<Session>) -> Result<()> {
        *session = None;
        let waiting: Vec<MessageId> = self
            .pending
            .iter()
            .filter(|(_, e)| e.outgoing.awaits_server())
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.advance(id, session, Some(Event::Unreachable { maybe_stored: true }))
                .await?;
        }
        Ok(())
    }

    fn persist(&self, id: MessageId) -> Result<()> {
        if let Some(entry) = self.pending.get(&id) {
            let state = store_state(&entry.outgoing, &entry.detail);
            self.inbox.save_outgoing(
                id,
                &entry.to,
                &entry.text,
                &state,
                entry.outgoing.is_done(),
            )?;
        }
        Ok(())
    }

    /// Feeds `event` (if any) and performs actions until the message waits or is finished. The
    /// state is stored before every action, so a stop at any point resumes safely.
    async fn advance(
        &mut self,
        id: MessageId,
        session: &mut Option<Session>,
        mut event: Option<Event>,
    ) -> Result<()> {
        loop {
            let now = now_ms();
            let Some(entry) = self.pending.get_mut(&id) else {
                return Ok(());
            };
            let action = match event.take() {
                Some(event) => entry.outgoing.handle(&self.policy, event, now),
                None => entry.outgoing.next(now),
            };
            self.persist(id)?;
            let Some(entry) = self.pending.get_mut(&id) else {
                return Ok(());
            };
            match action {
                Action::Wait { .. } => return Ok(()),
                Action::Finished(outcome) => {
                    let detail = std::mem::take(&mut entry.detail);
                    self.pending.remove(&id);
                    self.finished.insert(id, (outcome, detail));
                    return Ok(());
                }
                Action::SendIp(mode) | Action::Reencrypt(mode) => {
                    let (to, text) = (entry.to.clone(), entry.text.clone());
                    // Encrypted for every device of the receiver and this number's others,
                    // claiming keys first; the server only ever sees the copies.
                    let changed = match action {
                        Action::Reencrypt(_) => entry.changed.take(),
                        _ => None,
                    };
                    let prepared =
                        outgoing::prepare_one(self.account, &to, &text, id, None, changed.as_ref())
                            .await;
                    let Some(entry) = self.pending.get_mut(&id) else {
                        return Ok(());
                    };
                    event = Some(match prepared {
                        // Over IP only, copies that cannot be made (a changed safety number)
                        // end the message: nothing of it left the device.
                        Err(e)
                            if !matches!(e, ClientError::Network(_) | ClientError::Timeout)
                                && matches!(entry.outgoing.route, Route::IpOnly { .. }) =>
                        {
                            entry.detail = e.to_string();
                            Event::Answer(SendOutcome::Invalid)
                        }
                        Err(e) => {
                            entry.detail = e.to_string();
                            Event::Unreachable {
                                maybe_stored: false,
                            }
                        }
                        Ok(mut send) => {
                            send.mode = mode as i32;
                            // The same id again, re-encrypted: the server and the receiver
                            // drop what they already have of it.
                            send.resend = entry.outgoing.is_resend();
                            match ensure_session(self.account, session).await {
                                Err(e) => {
                                    entry.detail = e.to_string();
                                    Event::Unreachable {
                                        maybe_stored: false,
                                    }
                                }
                                Ok(open) => match open.send(Kind::Send(send)).await {
                                    Ok(()) => return Ok(()),
                                    Err(e) => {
                                        entry.detail = e.to_string();
                                        *session = None;
                                        Event::Unreachable { maybe_stored: true }
                                    }
                                },
                            }
                        }
                    });
                }
                Action::Withdraw => {
                    let withdraw = Kind::Withdraw(frame::Withdraw {
                        id: id.as_bytes().to_vec(),
                    });
                    let sent = match ensure_session(self.account, session).await {
                        Ok(open) => open.send(withdraw).await,
                        Err(e) => Err(e),
                    };
                    match sent {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            entry.detail =
                                format!("{e}; the withdraw will be retried before any SMS is sent");
                            *session = None;
                            event = Some(Event::Unreachable { maybe_stored: true });
                        }
                    }
                }
                Action::SendSms => {
                    let result = match &self.transport {
                        None => Err(tidings_gateway::SendError::Rejected(
                            "no SMS transport is configured: see `tidings settings --help`".into(),
                        )),
                        Some(transport) => {
                            let sms = Sms {
                                from: self.account.number().to_string(),
                                to: entry.to.clone(),
                                text: entry.text.clone(),
                            };
                            transport.send(&sms).await
                        }
                    };
                    event = Some(match result {
                        Ok(sent) => {
                            // What the gateway learned beyond "sent", such as an SMPP receipt.
                            entry.detail = sent.note();
                            Event::SmsSent
                        }
                        Err(e) => {
                            entry.detail = e.to_string();
                            Event::SmsFailed {
                                retry: e.retry_is_safe(),
                            }
                        }
                    });
                }
            }
        }
    }
}

/// What a withdraw's answer means for the message. A withdraw refused for the budget withdrew
/// nothing, and an answer this client does not know may not mean that no copy is held: both are
/// asked again later (after the wait given, else with backoff), never taken as `unknown`, which
/// would send an SMS beside a copy a device may still show.
fn withdraw_event(result: &frame::WithdrawResult) -> Event {
    match WithdrawState::try_from(result.state) {
        Ok(WithdrawState::Delivered) => Event::Withdrawn(Withdrawal::Delivered),
        Ok(WithdrawState::Withdrawn) => Event::Withdrawn(Withdrawal::Withdrawn),
        Ok(WithdrawState::Unknown) => Event::Withdrawn(Withdrawal::Unknown),
        Ok(WithdrawState::RateLimited) => Event::WithdrawLater {
            retry_after: result.retry_after_ms,
        },
        Err(_) => Event::WithdrawLater { retry_after: 0 },
    }
}

/// What the user is told about a send or withdraw the server refused for a budget or a rate: the
/// server's reason and when to try again.
fn refusal_detail(kind: &Kind) -> Option<String> {
    let (message, retry_after_ms, what) = match kind {
        Kind::SendResult(result) if result.outcome == SendOutcome::RateLimited as i32 => {
            (result.detail.as_str(), result.retry_after_ms, "")
        }
        Kind::WithdrawResult(result) if result.state == WithdrawState::RateLimited as i32 => (
            "lookup budget used up",
            result.retry_after_ms,
            ": the withdraw is asked again then, and no SMS goes before it is answered",
        ),
        _ => return None,
    };
    let message = if message.is_empty() {
        "refused by the server's limits"
    } else {
        message
    };
    Some(match crate::retry_after(retry_after_ms) {
        Some(retry_after) => format!(
            "{}{what}",
            ClientError::RetryLater {
                message: message.to_string(),
                retry_after,
            }
        ),
        None => format!("{message}{what}"),
    })
}

/// Sends a text along `route` (IP, SMS fallback, or both in turn), waiting up to `wait` for it
/// to finish. What is still pending then is kept in the profile and carried on by `listen`.
pub async fn send_routed(
    account: &Account,
    to: &str,
    text: &str,
    route: Route,
    wait: Duration,
) -> Result<Status> {
    let to = E164::parse(to)?;
    let mut router = Router::new(account, account.routing(), false)?;
    let mut session = None;
    let id = router.start(&mut session, to.as_str(), text, route).await?;
    let deadline = Instant::now() + wait;
    while router.status(id).outcome.is_none() && Instant::now() < deadline {
        let wake = router
            .next_wake()
            .map_or(deadline, |at| instant_at(at).min(deadline));
        match session.as_mut() {
            Some(open) => match open.recv(wake).await {
                Ok(Some(kind)) => {
                    if let Kind::Receipt(receipt) = &kind {
                        open.send(Kind::ReceiptAck(frame::ReceiptAck {
                            id: receipt.id.clone(),
                        }))
                        .await?;
                    }
                    router.on_frame(&kind, &mut session).await?;
                }
                Ok(None) => router.tick(&mut session).await?,
                Err(_) => router.on_session_lost(&mut session).await?,
            },
            None => {
                tokio::time::sleep_until(wake).await;
                router.tick(&mut session).await?;
            }
        }
    }
    Ok(router.status(id))
}

/// The open session, opening one if there is none.
async fn ensure_session<'s>(
    account: &Account,
    session: &'s mut Option<Session>,
) -> Result<&'s mut Session> {
    if session.is_none() {
        *session = Some(account.session(false).await?);
    }
    session.as_mut().ok_or(ClientError::Timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::fallback::Phase;
    use tidings_core::MINUTE;
    use tidings_proto::frame::SendMode;

    #[test]
    fn routes_are_chosen_from_the_command_line_then_the_profile() {
        let mut routing = Routing::default();
        let check = |routing: &Routing, chosen: Option<&str>, after: Option<u64>, expected| {
            let (name, route) = choose_route(routing, chosen.map(str::to_string), after)
                .unwrap_or_else(|e| panic!("{chosen:?}: {e}"));
            assert_eq!((name.as_str(), route), expected, "{chosen:?}");
        };
        // `auto` without an SMS transport queues over IP.
        check(&routing, None, None, ("ip-only", Route::IP_QUEUED));
        check(&routing, Some("auto"), None, ("auto", Route::Auto));
        check(
            &routing,
            Some("sms-only"),
            None,
            ("sms-only", Route::SmsOnly),
        );
        check(
            &routing,
            Some("queue-then-sms"),
            Some(90),
            ("queue-then-sms", Route::QueueThenSms { after: 90_000 }),
        );
        routing.route = "queue-then-sms".into();
        check(
            &routing,
            None,
            None,
            ("queue-then-sms", Route::QueueThenSms { after: 10 * MINUTE }),
        );
        routing.route = "auto".into();
        routing.sms = Some(tidings_gateway::TransportConfig::Outbox {
            dir: "/nonexistent".into(),
        });
        check(&routing, None, None, ("auto", Route::Auto));
        assert!(choose_route(&routing, Some("carrier-pigeon".into()), None).is_err());
    }

    #[test]
    fn only_a_withdraw_that_says_so_counts_as_withdrawn_and_a_refused_one_says_when() {
        let result = |state, retry_after_ms| frame::WithdrawResult {
            id: vec![1; 16],
            state,
            retry_after_ms,
        };
        for (state, retry_after_ms, expected) in [
            (0, 0, Event::Withdrawn(Withdrawal::Delivered)),
            (1, 0, Event::Withdrawn(Withdrawal::Withdrawn)),
            (2, 0, Event::Withdrawn(Withdrawal::Unknown)),
            (
                3,
                60_000,
                Event::WithdrawLater {
                    retry_after: 60_000,
                },
            ),
            (3, 0, Event::WithdrawLater { retry_after: 0 }),
            // A state from a newer server: asked again, never taken as "no copy held".
            (9, 0, Event::WithdrawLater { retry_after: 0 }),
        ] {
            assert_eq!(withdraw_event(&result(state, retry_after_ms)), expected);
        }
        let refused = refusal_detail(&Kind::WithdrawResult(result(3, 90_000))).expect("detail");
        assert!(
            refused.contains("try again in 1 min 30 s") && refused.contains("no SMS"),
            "{refused}"
        );
        let send = Kind::SendResult(frame::SendResult {
            outcome: SendOutcome::RateLimited as i32,
            detail: "lookup budget used up".into(),
            retry_after_ms: 3_000,
            ..frame::SendResult::default()
        });
        let refused = refusal_detail(&send).expect("detail");
        assert!(
            refused.contains("lookup budget used up; try again in 3 s"),
            "{refused}"
        );
        assert_eq!(refusal_detail(&Kind::WithdrawResult(result(1, 0))), None);
    }

    #[test]
    fn a_stored_state_comes_back_as_it_was_or_made_safe() {
        let policy = Policy::default();
        let now = 5 * MINUTE;
        let state = |route, phase, reencrypted| Outgoing {
            phase,
            reencrypted,
            ..Outgoing::new(route, MINUTE)
        };
        // Stored as is: the same state comes back.
        for outgoing in [
            state(Route::Auto, Phase::SendIp, 0),
            state(Route::Auto, Phase::Reencrypt, 2),
            state(
                Route::QueueThenSms { after: MINUTE },
                Phase::AwaitingReceipt { until: now + 1 },
                1,
            ),
            // Settled: kept as it is (an unsettled one is sent again, below).
            Outgoing {
                settled: true,
                ..state(
                    Route::IpOnly {
                        mode: SendMode::NowOrNever,
                    },
                    Phase::AwaitingReceipt { until: Millis::MAX },
                    0,
                )
            },
            state(
                Route::SmsOnly,
                Phase::Sms {
                    at: now,
                    attempt: 3,
                },
                0,
            ),
            state(
                Route::Auto,
                Phase::Withdraw {
                    at: now + 1,
                    attempt: 2,
                },
                0,
            ),
            Outgoing {
                sends: 2,
                settled: true,
                delivered: true,
                taken: Some(SendOutcome::Queued),
                ..state(
                    Route::QueueThenSms { after: MINUTE },
                    Phase::AwaitingReceipt { until: now + 1 },
                    0,
                )
            },
            state(
                Route::IP_QUEUED,
                Phase::Resend {
                    at: now + 1,
                    attempt: 1,
                },
                0,
            ),
        ] {
            let text = store_state(&outgoing, "detail");
            assert_eq!(load_state(&text, &policy, now), Some(outgoing), "{text}");
        }
        // Under way when the client stopped: the machine makes it safe on the way back.
        let stopped = state(Route::Auto, Phase::AwaitingAnswer, 1);
        let resumed = load_state(&store_state(&stopped, ""), &policy, now);
        assert_eq!(resumed, stopped.resume(&policy, now));
        assert!(matches!(
            resumed.map(|r| r.phase),
            Some(Phase::Withdraw { .. })
        ));
        // Over IP only, answered but not settled: sent again now, as a resend.
        let unsettled = Outgoing {
            sends: 1,
            taken: Some(SendOutcome::Accepted),
            ..state(
                Route::IP_QUEUED,
                Phase::AwaitingReceipt { until: Millis::MAX },
                0,
            )
        };
        let mut resumed = load_state(&store_state(&unsettled, ""), &policy, now).expect("kept");
        assert_eq!(resumed.next(now), Action::SendIp(SendMode::Queue));
        assert!(resumed.is_resend());
        // Finished, or not a state at all: nothing to resume.
        let done = state(Route::Auto, Phase::Done(Outcome::Delivered), 0);
        assert_eq!(load_state(&store_state(&done, ""), &policy, now), None);
        assert_eq!(load_state("{", &policy, now), None);
        // A state stored before the re-encryption count existed reads as zero.
        let old = r#"{"route":{"kind":"auto"},"created":60000,"phase":{"kind":"send-ip"}}"#;
        assert_eq!(
            load_state(old, &policy, now),
            Some(state(Route::Auto, Phase::SendIp, 0))
        );
    }
}
