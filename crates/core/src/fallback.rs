//! How every outgoing message gets through: over IP when the receiver is reachable, encrypted
//! again when the receiver's devices changed, as an SMS from the sender's own device when the
//! route allows one and IP failed, and never both.
//!
//! [`Outgoing`] is the sender-side state machine for one message, for every send: a send with an
//! SMS route ([`Route::Auto`], [`Route::QueueThenSms`], [`Route::SmsOnly`]) and a send over IP
//! only ([`Route::IpOnly`], the same machine with no SMS step). The client feeds it what happened
//! ([`Event`]: the server's answer, "devices changed", a receipt, the result of a withdraw, an SMS
//! sent or failed, the server unreachable) and the current time, and carries out the [`Action`]
//! it returns. Every change of state goes through [`Outgoing::handle`], [`Outgoing::next`] or
//! [`Outgoing::resume`]; the client never sets a phase itself.
//!
//! The rule that keeps a message from arriving twice: **an SMS is sent only when the server holds
//! no copy that a device could still show** — the send was refused (nothing stored), or a
//! withdraw answered `withdrawn` (copies deleted) or `unknown` (no copy held). While the server
//! cannot be reached after a copy may have been stored, or refuses to answer a withdraw for the
//! sender's budget, no SMS is sent: the withdraw is retried.
//!
//! The rule that keeps no device from being skipped: when the server answers that the devices
//! changed between encrypting and sending (nothing was stored), the copies are made again for the
//! devices it named, at most [`Policy::max_reencrypt`] times; then the send counts as refused.
//!
//! The rule that keeps a message from being lost: the client commits the message before its
//! first copy goes out and keeps it until it is **settled** ([`Event::Settled`]: the server's
//! answer said so, or a later `Settled` frame named it), when every copy is durable on the
//! server or has a durable decision. Over IP only, an unsettled message is sent again under the
//! same id after a lost connection or a restart ([`Phase::Resend`]; the client re-encrypts it and
//! marks the send as a resend, [`Outgoing::is_resend`]); once settled it is finished
//! ([`Outcome::Settled`]), a receipt may still follow. A route with an SMS step keeps its withdraw
//! instead, which the server decides against the same records.
//!
//! The state is plain data with no clock and no I/O: the client stores it with the message and
//! resumes it after a restart.

use tidings_proto::frame::{ReceiptKind, SendMode, SendOutcome};

use crate::{Millis, SECOND};

/// How the sender wants a message routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over IP if a device of the receiver is online now, otherwise SMS.
    Auto,
    /// Over IP only, in `mode`: queued on the server until delivered or expired, or only if a
    /// device of the receiver is online now. Never an SMS.
    IpOnly { mode: SendMode },
    /// SMS only; the server is not involved.
    SmsOnly,
    /// Queued over IP; if still undelivered `after` this long, withdrawn and sent as SMS.
    QueueThenSms { after: Millis },
}

impl Route {
    /// Over IP only, kept on the server until delivered or expired.
    pub const IP_QUEUED: Route = Route::IpOnly {
        mode: SendMode::Queue,
    };
}

/// Timing and retry rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long `Auto` waits for the receipt of an accepted message before withdrawing it.
    pub receipt_timeout: Millis,
    /// First wait before retrying a withdraw or an SMS; doubles up to `max_backoff`.
    pub backoff: Millis,
    /// Longest wait between retries.
    pub max_backoff: Millis,
    /// Times the copies are made again because the receiver's devices changed before the send
    /// counts as refused with [`SendOutcome::DevicesChanged`].
    pub max_reencrypt: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            receipt_timeout: 5 * SECOND,
            backoff: SECOND,
            max_backoff: 60 * SECOND,
            max_reencrypt: 3,
        }
    }
}

/// What a withdraw ended in, as the server answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawal {
    /// A receiver device acknowledged it first: it was delivered over IP.
    Delivered,
    /// Every copy is deleted; no device will ever show it.
    Withdrawn,
    /// The server holds no such message (never stored, or expired).
    Unknown,
}

/// Something that happened to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The server's answer to the send. `Answer(SendOutcome::DevicesChanged)` is taken as
    /// [`Event::DevicesChanged`].
    Answer(SendOutcome),
    /// The server answered that the receiver's devices (or this number's other devices) changed
    /// since the copies were made; nothing was stored.
    DevicesChanged,
    /// A receipt for the message.
    Receipt(ReceiptKind),
    /// The server's answer to a withdraw.
    Withdrawn(Withdrawal),
    /// The server did not answer a withdraw for now (`RATE_LIMITED`: the number's discovery
    /// budget is used up): nothing was withdrawn, so no SMS may go yet. `retry_after` is the wait
    /// it gave (0: none given).
    WithdrawLater { retry_after: Millis },
    /// The server could not be reached. `maybe_stored` is false only when the send certainly
    /// never reached the server (the connection failed before it was written).
    Unreachable { maybe_stored: bool },
    /// The SMS transport accepted the SMS.
    SmsSent,
    /// The SMS transport failed; `retry` says whether trying again is safe and useful.
    SmsFailed { retry: bool },
    /// The server said the message is settled: every copy is durable there or decided.
    Settled,
}

/// Where the message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The send is to be made over IP.
    SendIp,
    /// The server named devices that changed: the copies are to be made again and sent.
    Reencrypt,
    /// The send is made; waiting for the server's answer.
    AwaitingAnswer,
    /// Over IP only: the send is to be made again under the same id at `at` (the connection
    /// was lost, or the client stopped, before the message was settled).
    Resend { at: Millis, attempt: u32 },
    /// Accepted or queued; waiting for a receipt until `until` (`Millis::MAX`: no deadline).
    AwaitingReceipt { until: Millis },
    /// A withdraw is to be made (again) at `at`.
    Withdraw { at: Millis, attempt: u32 },
    /// A withdraw is made; waiting for its answer.
    Withdrawing { attempt: u32 },
    /// An SMS is to be sent (again) at `at`.
    Sms { at: Millis, attempt: u32 },
    /// The SMS is handed to the transport; waiting for its result.
    SendingSms { attempt: u32 },
    /// Finished.
    Done(Outcome),
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered over IP (a receipt or a withdraw that lost to an acknowledgement says so).
    Delivered,
    /// Sent as SMS by the sender's device.
    SentAsSms,
    /// `IpOnly`: the receiver is not a user, or not reachable for a message that may not queue,
    /// or its devices kept changing while sending.
    NotSent(SendOutcome),
    /// `IpOnly`: the message expired on the server undelivered.
    Expired,
    /// The SMS transport refused it for good (for example, the number was rejected).
    SmsRejected,
    /// `IpOnly`: the server took it (`ACCEPTED` or `QUEUED`) and it is settled: nothing is left
    /// for the sender to do (a receipt may still come).
    Settled(SendOutcome),
}

/// What the client must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Encrypt a copy for every device and send over IP in this mode.
    SendIp(SendMode),
    /// Make the copies again for the devices the server named (forget the gone ones, claim keys
    /// for the new ones) and send over IP in this mode.
    Reencrypt(SendMode),
    /// Ask the server to withdraw the message.
    Withdraw,
    /// Send the SMS.
    SendSms,
    /// Nothing until `until` (or until an event arrives); `Millis::MAX` waits for events only.
    Wait { until: Millis },
    /// Report the outcome; nothing more will happen.
    Finished(Outcome),
}

/// One outgoing message's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub route: Route,
    pub phase: Phase,
    /// When the user sent it.
    pub created: Millis,
    /// Times the copies were made again because the devices changed.
    pub reencrypted: u32,
    /// Times a send was made (or may have been): more than one makes the next a resend.
    pub sends: u32,
    /// Whether the server said the message is settled.
    pub settled: bool,
    /// A delivery receipt came before the message was settled: it finishes once settled.
    pub delivered: bool,
    /// What the server answered the send, once it took it (`ACCEPTED` or `QUEUED`).
    pub taken: Option<SendOutcome>,
}

impl Outgoing {
    /// A new message; `next` gives its first action.
    pub fn new(route: Route, now: Millis) -> Self {
        let phase = match route {
            Route::SmsOnly => Phase::Sms {
                at: now,
                attempt: 0,
            },
            _ => Phase::SendIp,
        };
        Self {
            route,
            phase,
            created: now,
            reencrypted: 0,
            sends: 0,
            settled: false,
            delivered: false,
            taken: None,
        }
    }

    /// Whether the send the last [`Action::SendIp`] or [`Action::Reencrypt`] asked for may repeat
    /// an earlier one of the same id (`Send.resend`).
    pub fn is_resend(&self) -> bool {
        self.sends > 1
    }

    /// A stored message, taken up again by a client that stopped at any point. Steps that were
    /// under way are made safe: an unanswered send or withdraw is withdrawn (again) before any
    /// SMS; an SMS handed to the transport is sent again (a stop exactly then may send it twice;
    /// it is never lost); over IP only, an unsettled message is sent again now. `None` for a
    /// finished message.
    pub fn resume(self, policy: &Policy, now: Millis) -> Option<Self> {
        let mut outgoing = self;
        match outgoing.phase {
            Phase::Done(_) => return None,
            Phase::SendingSms { attempt } => outgoing.phase = Phase::Sms { at: now, attempt },
            _ if outgoing.awaits_server() && !outgoing.falls_back() => {
                // A state stored before sends were counted was sent at least once.
                outgoing.sends = outgoing.sends.max(1);
                outgoing.phase = Phase::Resend {
                    at: now,
                    attempt: 0,
                };
            }
            Phase::AwaitingAnswer | Phase::Withdrawing { .. } => {
                outgoing.transition(policy, Event::Unreachable { maybe_stored: true }, now);
            }
            _ => {}
        }
        Some(outgoing)
    }

    fn backoff(policy: &Policy, attempt: u32) -> Millis {
        policy
            .backoff
            .saturating_mul(1 << attempt.min(16))
            .min(policy.max_backoff)
    }

    /// The mode of the IP send for this route.
    fn mode(&self) -> SendMode {
        match self.route {
            Route::Auto => SendMode::NowOrNever,
            Route::IpOnly { mode } => mode,
            Route::SmsOnly | Route::QueueThenSms { .. } => SendMode::Queue,
        }
    }

    fn falls_back(&self) -> bool {
        matches!(self.route, Route::Auto | Route::QueueThenSms { .. })
    }

    /// The receipt deadline once the server has taken the message.
    fn receipt_deadline(&self, policy: &Policy, now: Millis) -> Millis {
        match self.route {
            Route::Auto => now.saturating_add(policy.receipt_timeout),
            Route::QueueThenSms { after } => self.created.saturating_add(after),
            Route::IpOnly { .. } | Route::SmsOnly => Millis::MAX,
        }
    }

    /// The phase after a send that stored nothing: an SMS if the route has one (it cannot
    /// duplicate anything), otherwise not sent.
    fn refused(&self, refused: SendOutcome, now: Millis) -> Phase {
        if self.falls_back() {
            Phase::Sms {
                at: now,
                attempt: 0,
            }
        } else {
            Phase::Done(Outcome::NotSent(refused))
        }
    }

    /// What to do at `now`, without a new event: the current phase's action, or the time-driven
    /// transition (a receipt deadline passing, a retry falling due).
    pub fn next(&mut self, now: Millis) -> Action {
        match self.phase {
            Phase::SendIp => {
                self.phase = Phase::AwaitingAnswer;
                self.sends = self.sends.saturating_add(1);
                Action::SendIp(self.mode())
            }
            Phase::Reencrypt => {
                self.phase = Phase::AwaitingAnswer;
                self.sends = self.sends.saturating_add(1);
                Action::Reencrypt(self.mode())
            }
            Phase::Resend { at, .. } if now < at => Action::Wait { until: at },
            Phase::Resend { .. } => {
                self.phase = Phase::AwaitingAnswer;
                self.sends = self.sends.saturating_add(1);
                Action::SendIp(self.mode())
            }
            Phase::AwaitingAnswer | Phase::Withdrawing { .. } | Phase::SendingSms { .. } => {
                Action::Wait { until: Millis::MAX }
            }
            Phase::AwaitingReceipt { until } if now >= until => {
                self.phase = Phase::Withdrawing { attempt: 0 };
                Action::Withdraw
            }
            Phase::AwaitingReceipt { until } => Action::Wait { until },
            Phase::Withdraw { at, attempt } if now >= at => {
                self.phase = Phase::Withdrawing { attempt };
                Action::Withdraw
            }
            Phase::Withdraw { at, .. } | Phase::Sms { at, .. } if now < at => {
                Action::Wait { until: at }
            }
            Phase::Sms { attempt, .. } => {
                self.phase = Phase::SendingSms { attempt };
                Action::SendSms
            }
            Phase::Withdraw { at, .. } => Action::Wait { until: at },
            Phase::Done(outcome) => Action::Finished(outcome),
        }
    }

    /// When the message needs attention at `now` or later without an event: `None` while it
    /// waits for events only. Changes nothing.
    pub fn wake_at(&self, now: Millis) -> Option<Millis> {
        let mut probe = *self;
        match probe.next(now) {
            Action::Wait { until } if until == Millis::MAX => None,
            Action::Wait { until } => Some(until),
            _ => Some(now),
        }
    }

    /// Whether the message waits for the server to answer a send or a withdraw, or (over IP
    /// only) to settle it: what a lost connection must make safe (with [`Event::Unreachable`]).
    pub fn awaits_server(&self) -> bool {
        match self.phase {
            Phase::AwaitingAnswer | Phase::Withdrawing { .. } => true,
            Phase::AwaitingReceipt { .. } => !self.falls_back() && !self.settled,
            _ => false,
        }
    }

    /// Takes an event and returns what to do next.
    pub fn handle(&mut self, policy: &Policy, event: Event, now: Millis) -> Action {
        self.transition(policy, event, now);
        self.next(now)
    }

    /// The change of phase an event makes, without taking the step the new phase asks for.
    fn transition(&mut self, policy: &Policy, event: Event, now: Millis) {
        let event = match event {
            Event::Answer(SendOutcome::DevicesChanged) => Event::DevicesChanged,
            other => other,
        };
        let finishing = !matches!(self.phase, Phase::SendingSms { .. } | Phase::Done(_));
        // A delivery receipt finishes the message whatever else is under way — except an SMS
        // already handed to the transport, which means the server said no device would show it
        // — but only once the message is settled: a receipt may go out before the decision
        // behind it is durable, so it alone settles nothing.
        if event == Event::Receipt(ReceiptKind::Delivered) && finishing {
            if self.settled {
                self.phase = Phase::Done(Outcome::Delivered);
            } else {
                self.delivered = true;
            }
            return;
        }
        if event == Event::Settled {
            self.settled = true;
            if self.delivered && finishing {
                self.phase = Phase::Done(Outcome::Delivered);
                return;
            }
            // Over IP only there is nothing left to do once the server took it and settled it.
            if let (Phase::AwaitingReceipt { .. } | Phase::Resend { .. }, Some(taken)) =
                (self.phase, self.taken)
            {
                if !self.falls_back() {
                    self.phase = Phase::Done(Outcome::Settled(taken));
                }
            }
            return;
        }
        self.phase = match (self.phase, event) {
            (Phase::AwaitingAnswer, Event::Answer(outcome)) => match outcome {
                SendOutcome::Accepted | SendOutcome::Queued => {
                    self.taken = Some(outcome);
                    Phase::AwaitingReceipt {
                        until: self.receipt_deadline(policy, now),
                    }
                }
                refused => self.refused(refused, now),
            },
            // Nothing was stored: encrypt for the devices the server named and send again, a
            // few times at most.
            (Phase::AwaitingAnswer, Event::DevicesChanged)
                if self.reencrypted < policy.max_reencrypt =>
            {
                self.reencrypted = self.reencrypted.saturating_add(1);
                Phase::Reencrypt
            }
            (Phase::AwaitingAnswer, Event::DevicesChanged) => {
                self.refused(SendOutcome::DevicesChanged, now)
            }
            (
                Phase::AwaitingAnswer,
                Event::Unreachable {
                    maybe_stored: false,
                },
            ) if self.falls_back() => Phase::Sms {
                at: now,
                attempt: 0,
            },
            (
                Phase::AwaitingAnswer,
                Event::Unreachable {
                    maybe_stored: false,
                },
            ) => Phase::Resend {
                at: now.saturating_add(Self::backoff(policy, 0)),
                attempt: 1,
            },
            // The send may have been stored: only a withdraw can make an SMS safe.
            (Phase::AwaitingAnswer, Event::Unreachable { maybe_stored: true })
                if self.falls_back() =>
            {
                Phase::Withdraw {
                    at: now.saturating_add(Self::backoff(policy, 0)),
                    attempt: 1,
                }
            }
            // Over IP only, sent (or answered) but not settled: sent again under the same id
            // once the server can be reached.
            (Phase::AwaitingAnswer | Phase::AwaitingReceipt { .. }, Event::Unreachable { .. })
                if !self.falls_back() && !self.settled =>
            {
                Phase::Resend {
                    at: now.saturating_add(Self::backoff(policy, 0)),
                    attempt: 1,
                }
            }
            (Phase::AwaitingReceipt { .. }, Event::Receipt(ReceiptKind::Expired))
                if self.falls_back() =>
            {
                Phase::Sms {
                    at: now,
                    attempt: 0,
                }
            }
            (Phase::AwaitingReceipt { .. }, Event::Receipt(ReceiptKind::Expired)) => {
                Phase::Done(Outcome::Expired)
            }
            (Phase::Withdrawing { .. }, Event::Withdrawn(Withdrawal::Delivered))
                if self.settled =>
            {
                Phase::Done(Outcome::Delivered)
            }
            // Delivered to a device, but not settled: the copies for the others may have been only
            // in the server's memory when it stopped. No SMS may follow a delivery, so the message
            // goes on over IP only: a `Settled` within the receipt timeout finishes it; otherwise
            // it is sent again under its id until the server settles it (devices that have it
            // acknowledge the copy without showing it again).
            (Phase::Withdrawing { .. }, Event::Withdrawn(Withdrawal::Delivered)) => {
                self.delivered = true;
                self.route = Route::IP_QUEUED;
                self.sends = self.sends.max(1);
                Phase::Resend {
                    at: now.saturating_add(policy.receipt_timeout),
                    attempt: 0,
                }
            }
            (
                Phase::Withdrawing { .. },
                Event::Withdrawn(Withdrawal::Withdrawn | Withdrawal::Unknown),
            ) => Phase::Sms {
                at: now,
                attempt: 0,
            },
            // Refused for the sender's budget: nothing was withdrawn, so ask again once the wait
            // is over (a receipt meanwhile still settles it), never an SMS before the answer.
            (Phase::Withdrawing { attempt }, Event::WithdrawLater { retry_after }) => {
                let wait = if retry_after > 0 {
                    retry_after
                } else {
                    Self::backoff(policy, attempt)
                };
                Phase::Withdraw {
                    at: now.saturating_add(wait),
                    attempt: attempt.saturating_add(1),
                }
            }
            (Phase::Withdrawing { attempt }, Event::Unreachable { .. }) => Phase::Withdraw {
                at: now.saturating_add(Self::backoff(policy, attempt)),
                attempt: attempt.saturating_add(1),
            },
            (Phase::SendingSms { .. }, Event::SmsSent) => Phase::Done(Outcome::SentAsSms),
            (Phase::SendingSms { attempt }, Event::SmsFailed { retry: true }) => Phase::Sms {
                at: now.saturating_add(Self::backoff(policy, attempt)),
                attempt: attempt.saturating_add(1),
            },
            (Phase::SendingSms { .. }, Event::SmsFailed { retry: false }) => {
                Phase::Done(Outcome::SmsRejected)
            }
            // Anything else is stale or out of order (a late answer, a duplicate receipt): keep
            // the current phase.
            (phase, _) => phase,
        };
    }

    /// Whether the message is finished.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }
}

#[cfg(test)]
mod tests;
