//! How a message gets through: over IP when the receiver is reachable, as an SMS from the
//! sender's own device when not, and never both.
//!
//! [`Outgoing`] is the sender-side state machine for one message. The client feeds it what
//! happened ([`Event`]: the server's answer, a receipt, the result of a withdraw, an SMS sent or
//! failed, the server unreachable) and the current time, and carries out the [`Action`] it returns.
//! The rule that keeps a message from arriving twice: **an SMS is sent only when the server holds
//! no copy that a device could still show** — the send was refused (nothing stored), or a
//! withdraw answered `withdrawn` (copies deleted) or `unknown` (no copy held). While the server
//! cannot be reached after a copy may have been stored, no SMS is sent: the withdraw is retried.
//!
//! The state is plain data: the client stores it with the message and resumes it after a restart.

use tidings_proto::frame::{ReceiptKind, SendMode, SendOutcome};

use crate::{Millis, SECOND};

/// How the sender wants a message routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Over IP if a device of the receiver is online now, otherwise SMS.
    Auto,
    /// Over IP only: queued on the server until delivered or expired.
    IpOnly,
    /// SMS only; the server is not involved.
    SmsOnly,
    /// Queued over IP; if still undelivered `after` this long, withdrawn and sent as SMS.
    QueueThenSms { after: Millis },
}

/// Timing rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// How long `Auto` waits for the receipt of an accepted message before withdrawing it.
    pub receipt_timeout: Millis,
    /// First wait before retrying a withdraw or an SMS; doubles up to `max_backoff`.
    pub backoff: Millis,
    /// Longest wait between retries.
    pub max_backoff: Millis,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            receipt_timeout: 5 * SECOND,
            backoff: SECOND,
            max_backoff: 60 * SECOND,
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
    /// The server's answer to the send.
    Answer(SendOutcome),
    /// A receipt for the message.
    Receipt(ReceiptKind),
    /// The server's answer to a withdraw.
    Withdrawn(Withdrawal),
    /// The server could not be reached. `maybe_stored` is false only when the send certainly
    /// never reached the server (the connection failed before it was written).
    Unreachable { maybe_stored: bool },
    /// The SMS transport accepted the SMS.
    SmsSent,
    /// The SMS transport failed; `retry` says whether trying again is safe and useful.
    SmsFailed { retry: bool },
}

/// Where the message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The send is to be made over IP.
    SendIp,
    /// The send is made; waiting for the server's answer.
    AwaitingAnswer,
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
    /// `IpOnly`: the receiver is not a user, or not reachable for a message that may not queue.
    NotSent(SendOutcome),
    /// `IpOnly`: the message expired on the server undelivered.
    Expired,
    /// The SMS transport refused it for good (for example, the number was rejected).
    SmsRejected,
}

/// What the client must do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send over IP in this mode.
    SendIp(SendMode),
    /// Ask the server to withdraw the message.
    Withdraw,
    /// Send the SMS.
    SendSms,
    /// Nothing until `until` (or until an event arrives); `Millis::MAX` waits for events only.
    Wait { until: Millis },
    /// Report the outcome; nothing more will happen.
    Finished(Outcome),
}

/// One outgoing message's routing state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    pub route: Route,
    pub phase: Phase,
    /// When the user sent it.
    pub created: Millis,
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
        }
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
            _ => SendMode::Queue,
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
            Route::IpOnly | Route::SmsOnly => Millis::MAX,
        }
    }

    /// What to do at `now`, without a new event: the current phase's action, or the time-driven
    /// transition (a receipt deadline passing, a retry falling due).
    pub fn next(&mut self, now: Millis) -> Action {
        match self.phase {
            Phase::SendIp => {
                self.phase = Phase::AwaitingAnswer;
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

    /// Takes an event and returns what to do next.
    pub fn handle(&mut self, policy: &Policy, event: Event, now: Millis) -> Action {
        // A delivery receipt settles the message whatever else is under way — except an SMS
        // already handed to the transport, which means the server said no device would show it.
        if event == Event::Receipt(ReceiptKind::Delivered)
            && !matches!(self.phase, Phase::SendingSms { .. } | Phase::Done(_))
        {
            self.phase = Phase::Done(Outcome::Delivered);
            return self.next(now);
        }
        self.phase = match (self.phase, event) {
            (Phase::AwaitingAnswer, Event::Answer(outcome)) => match outcome {
                SendOutcome::Accepted | SendOutcome::Queued => Phase::AwaitingReceipt {
                    until: self.receipt_deadline(policy, now),
                },
                // Nothing was stored: an SMS cannot duplicate anything.
                _ if self.falls_back() => Phase::Sms {
                    at: now,
                    attempt: 0,
                },
                refused => Phase::Done(Outcome::NotSent(refused)),
            },
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
            ) => Phase::SendIp,
            // The send may have been stored: only a withdraw can make an SMS safe.
            (Phase::AwaitingAnswer, Event::Unreachable { maybe_stored: true })
                if self.falls_back() =>
            {
                Phase::Withdraw {
                    at: now.saturating_add(Self::backoff(policy, 0)),
                    attempt: 1,
                }
            }
            (Phase::AwaitingAnswer, Event::Unreachable { maybe_stored: true }) => Phase::SendIp,
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
            (Phase::Withdrawing { .. }, Event::Withdrawn(Withdrawal::Delivered)) => {
                Phase::Done(Outcome::Delivered)
            }
            (
                Phase::Withdrawing { .. },
                Event::Withdrawn(Withdrawal::Withdrawn | Withdrawal::Unknown),
            ) => Phase::Sms {
                at: now,
                attempt: 0,
            },
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
        self.next(now)
    }

    /// Whether the message is finished.
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MINUTE;
    use Action::{Finished, SendSms, Wait, Withdraw};
    use Event::{Answer, Receipt, SmsFailed, SmsSent, Unreachable, Withdrawn};

    const T0: Millis = 1_000_000;

    /// A step: at time `at`, feed `event` (or just ask what is next) and expect `action`.
    type Step = (Millis, Option<Event>, Action);

    /// Runs a route through its steps with a simulated clock. The state is cloned at every step
    /// (as the client stores and reloads it), so every scenario is also a restart scenario.
    fn check(route: Route, first: Action, steps: &[Step]) {
        let policy = Policy::default();
        let mut outgoing = Outgoing::new(route, T0);
        assert_eq!(outgoing.next(T0), first, "{route:?}: first action");
        for (i, (at, event, expected)) in steps.iter().enumerate() {
            let mut restored = outgoing;
            let action = match event {
                Some(event) => restored.handle(&policy, *event, *at),
                None => restored.next(*at),
            };
            assert_eq!(
                action,
                *expected,
                "{route:?}: step {i} at +{} ms with {event:?}",
                at - T0
            );
            outgoing = restored;
        }
    }

    fn ip(mode: SendMode) -> Action {
        Action::SendIp(mode)
    }

    #[test]
    fn auto_delivered_over_ip() {
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0 + 5,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait {
                        until: T0 + 5 + 5 * SECOND,
                    },
                ),
                (
                    T0 + 20,
                    Some(Receipt(ReceiptKind::Delivered)),
                    Finished(Outcome::Delivered),
                ),
                (T0 + 30, Some(SmsSent), Finished(Outcome::Delivered)),
            ],
        );
    }

    #[test]
    fn auto_falls_back_when_nothing_was_stored() {
        for refused in [
            SendOutcome::RefusedNotReachable,
            SendOutcome::NotAUser,
            SendOutcome::RateLimited,
        ] {
            check(
                Route::Auto,
                ip(SendMode::NowOrNever),
                &[
                    (T0 + 5, Some(Answer(refused)), SendSms),
                    (T0 + 9, Some(SmsSent), Finished(Outcome::SentAsSms)),
                ],
            );
        }
        // The connection failed before the send was written: nothing can be stored.
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[(
                T0,
                Some(Unreachable {
                    maybe_stored: false,
                }),
                SendSms,
            )],
        );
    }

    #[test]
    fn auto_receipt_timeout_withdraws_then_sends_sms() {
        let deadline = T0 + 5 * SECOND;
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait { until: deadline },
                ),
                (deadline - 1, None, Wait { until: deadline }),
                (deadline, None, Withdraw),
                (
                    deadline + 3,
                    Some(Withdrawn(Withdrawal::Withdrawn)),
                    SendSms,
                ),
                (deadline + 9, Some(SmsSent), Finished(Outcome::SentAsSms)),
            ],
        );
    }

    #[test]
    fn the_receipt_just_after_the_deadline_wins() {
        let deadline = T0 + 5 * SECOND;
        // The receipt arrives while the withdraw is under way: no SMS.
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait { until: deadline },
                ),
                (deadline, None, Withdraw),
                (
                    deadline + 1,
                    Some(Receipt(ReceiptKind::Delivered)),
                    Finished(Outcome::Delivered),
                ),
                (
                    deadline + 2,
                    Some(Withdrawn(Withdrawal::Delivered)),
                    Finished(Outcome::Delivered),
                ),
            ],
        );
        // The receiver came online and acknowledged during the withdraw: the server says so.
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait { until: deadline },
                ),
                (deadline, None, Withdraw),
                (
                    deadline + 1,
                    Some(Withdrawn(Withdrawal::Delivered)),
                    Finished(Outcome::Delivered),
                ),
            ],
        );
    }

    #[test]
    fn an_unreachable_server_gets_no_sms_until_it_answers_the_withdraw() {
        let deadline = T0 + 5 * SECOND;
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait { until: deadline },
                ),
                (deadline, None, Withdraw),
                (
                    deadline,
                    Some(Unreachable { maybe_stored: true }),
                    Wait {
                        until: deadline + SECOND,
                    },
                ),
                (deadline + SECOND, None, Withdraw),
                (
                    deadline + SECOND,
                    Some(Unreachable { maybe_stored: true }),
                    Wait {
                        until: deadline + 3 * SECOND,
                    },
                ),
                (
                    deadline + 2 * SECOND,
                    None,
                    Wait {
                        until: deadline + 3 * SECOND,
                    },
                ),
                (deadline + 3 * SECOND, None, Withdraw),
                (
                    deadline + 3 * SECOND,
                    Some(Withdrawn(Withdrawal::Unknown)),
                    SendSms,
                ),
            ],
        );
        // Lost after the send was written: it may be stored, so withdraw before any SMS.
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Unreachable { maybe_stored: true }),
                    Wait { until: T0 + SECOND },
                ),
                (T0 + SECOND, None, Withdraw),
                (
                    T0 + SECOND,
                    Some(Withdrawn(Withdrawal::Delivered)),
                    Finished(Outcome::Delivered),
                ),
            ],
        );
    }

    #[test]
    fn delayed_fallback_survives_a_restart() {
        let after = 10 * MINUTE;
        check(
            Route::QueueThenSms { after },
            ip(SendMode::Queue),
            &[
                (
                    T0 + 1,
                    Some(Answer(SendOutcome::Queued)),
                    Wait { until: T0 + after },
                ),
                // The client restarts (every step reloads the stored state) and looks again.
                (T0 + 5 * MINUTE, None, Wait { until: T0 + after }),
                (T0 + after + 1, None, Withdraw),
                (
                    T0 + after + 2,
                    Some(Withdrawn(Withdrawal::Withdrawn)),
                    SendSms,
                ),
                (T0 + after + 3, Some(SmsSent), Finished(Outcome::SentAsSms)),
            ],
        );
        // Delivered over IP before the delay ran out: no SMS.
        check(
            Route::QueueThenSms { after },
            ip(SendMode::Queue),
            &[
                (
                    T0 + 1,
                    Some(Answer(SendOutcome::Queued)),
                    Wait { until: T0 + after },
                ),
                (
                    T0 + MINUTE,
                    Some(Receipt(ReceiptKind::Delivered)),
                    Finished(Outcome::Delivered),
                ),
                (T0 + after, None, Finished(Outcome::Delivered)),
            ],
        );
    }

    #[test]
    fn ip_only_never_sends_sms() {
        check(
            Route::IpOnly,
            ip(SendMode::Queue),
            &[
                (
                    T0,
                    Some(Answer(SendOutcome::Queued)),
                    Wait { until: Millis::MAX },
                ),
                (T0 + 100 * MINUTE, None, Wait { until: Millis::MAX }),
                (
                    T0 + 200 * MINUTE,
                    Some(Receipt(ReceiptKind::Expired)),
                    Finished(Outcome::Expired),
                ),
            ],
        );
        check(
            Route::IpOnly,
            ip(SendMode::Queue),
            &[(
                T0,
                Some(Answer(SendOutcome::NotAUser)),
                Finished(Outcome::NotSent(SendOutcome::NotAUser)),
            )],
        );
        check(
            Route::IpOnly,
            ip(SendMode::Queue),
            &[(
                T0,
                Some(Unreachable { maybe_stored: true }),
                ip(SendMode::Queue),
            )],
        );
    }

    #[test]
    fn sms_only_and_sms_failures() {
        check(
            Route::SmsOnly,
            SendSms,
            &[
                (
                    T0,
                    Some(SmsFailed { retry: true }),
                    Wait { until: T0 + SECOND },
                ),
                (T0 + SECOND, None, SendSms),
                (
                    T0 + SECOND,
                    Some(SmsFailed { retry: true }),
                    Wait {
                        until: T0 + 3 * SECOND,
                    },
                ),
                (T0 + 3 * SECOND, None, SendSms),
                (T0 + 3 * SECOND, Some(SmsSent), Finished(Outcome::SentAsSms)),
            ],
        );
        check(
            Route::SmsOnly,
            SendSms,
            &[(
                T0,
                Some(SmsFailed { retry: false }),
                Finished(Outcome::SmsRejected),
            )],
        );
        // Backoff is capped.
        let policy = Policy::default();
        assert_eq!(Outgoing::backoff(&policy, 30), policy.max_backoff);
    }

    #[test]
    fn stale_events_change_nothing() {
        check(
            Route::Auto,
            ip(SendMode::NowOrNever),
            &[
                (
                    T0,
                    Some(Withdrawn(Withdrawal::Withdrawn)),
                    Wait { until: Millis::MAX },
                ),
                (T0, Some(SmsSent), Wait { until: Millis::MAX }),
                (T0, Some(Answer(SendOutcome::NotAUser)), SendSms),
                (
                    T0,
                    Some(Answer(SendOutcome::Accepted)),
                    Wait { until: Millis::MAX },
                ),
                (
                    T0,
                    Some(Receipt(ReceiptKind::Delivered)),
                    Wait { until: Millis::MAX },
                ),
                (T0, Some(SmsSent), Finished(Outcome::SentAsSms)),
                (
                    T0,
                    Some(Receipt(ReceiptKind::Delivered)),
                    Finished(Outcome::SentAsSms),
                ),
            ],
        );
    }
}
