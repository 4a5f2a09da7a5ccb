use super::*;
use crate::{HOUR, MINUTE};
use Action::{Finished, Reencrypt, SendSms, Wait, Withdraw};
use Event::{Answer, DevicesChanged, Receipt, SmsFailed, SmsSent, Unreachable, Withdrawn};

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
                T0 + 5,
                Some(Event::Settled),
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
            (T0, Some(Event::Settled), Wait { until: deadline }),
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
    // The receiver came online and acknowledged during the withdraw: the server says so, and
    // settles it.
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
                Wait {
                    until: deadline + 1 + 5 * SECOND,
                },
            ),
            (
                deadline + 2,
                Some(Event::Settled),
                Finished(Outcome::Delivered),
            ),
        ],
    );
}

#[test]
fn a_withdraw_answered_delivered_before_the_message_settled_goes_on_over_ip_never_as_sms() {
    // One device acknowledged (its record is durable) while the copies for the others were held
    // in the server's memory, and the server stopped: no `Settled` ever comes for that send.
    // The message is sent again under its id, queued over IP, until the server settles it.
    let deadline = T0 + 5 * SECOND;
    let resend = deadline + 1 + 5 * SECOND;
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
                Wait { until: resend },
            ),
            (resend, None, ip(SendMode::Queue)),
            (
                resend + 1,
                Some(Unreachable { maybe_stored: true }),
                Wait {
                    until: resend + 1 + SECOND,
                },
            ),
            (resend + 1 + SECOND, None, ip(SendMode::Queue)),
            (
                resend + 2 + SECOND,
                Some(Answer(SendOutcome::Queued)),
                Wait { until: Millis::MAX },
            ),
            (
                resend + 3 + SECOND,
                Some(Event::Settled),
                Finished(Outcome::Delivered),
            ),
        ],
    );
    let mut outgoing = Outgoing::new(Route::QueueThenSms { after: MINUTE }, T0);
    let policy = Policy::default();
    outgoing.next(T0);
    outgoing.handle(&policy, Answer(SendOutcome::Queued), T0);
    assert_eq!(outgoing.next(T0 + MINUTE), Withdraw);
    outgoing.handle(&policy, Withdrawn(Withdrawal::Delivered), T0 + MINUTE);
    assert!(outgoing.is_resend() || outgoing.sends >= 1);
    // Whatever comes next, no SMS: the message was delivered to a device.
    for event in [
        Receipt(ReceiptKind::Expired),
        Unreachable { maybe_stored: true },
        Withdrawn(Withdrawal::Withdrawn),
        Answer(SendOutcome::RefusedNotReachable),
    ] {
        let mut after = outgoing;
        let mut now = T0 + MINUTE;
        let mut action = after.handle(&policy, event, now);
        for _ in 0..6 {
            assert_ne!(action, SendSms, "an SMS after a delivery, on {event:?}");
            if let Wait { until } = action {
                now = until.min(now + HOUR);
            }
            action = after.next(now);
        }
        assert_ne!(action, SendSms, "an SMS after a delivery, on {event:?}");
    }
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
                Wait {
                    until: T0 + 6 * SECOND,
                },
            ),
            (
                T0 + 2 * SECOND,
                Some(Event::Settled),
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
            (T0 + 1, Some(Event::Settled), Wait { until: T0 + after }),
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
        Route::IP_QUEUED,
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
        Route::IP_QUEUED,
        ip(SendMode::Queue),
        &[(
            T0,
            Some(Answer(SendOutcome::NotAUser)),
            Finished(Outcome::NotSent(SendOutcome::NotAUser)),
        )],
    );
    check(
        Route::IP_QUEUED,
        ip(SendMode::Queue),
        &[
            (
                T0,
                Some(Unreachable { maybe_stored: true }),
                Wait { until: T0 + SECOND },
            ),
            (T0 + SECOND, None, ip(SendMode::Queue)),
        ],
    );
}

#[test]
fn ip_only_is_kept_until_settled_and_sent_again_unsettled() {
    // Settled with the answer: finished, whatever receipt comes later.
    check(
        Route::IP_QUEUED,
        ip(SendMode::Queue),
        &[
            (
                T0,
                Some(Answer(SendOutcome::Queued)),
                Wait { until: Millis::MAX },
            ),
            (
                T0,
                Some(Event::Settled),
                Finished(Outcome::Settled(SendOutcome::Queued)),
            ),
            (
                T0 + 1,
                Some(Receipt(ReceiptKind::Delivered)),
                Finished(Outcome::Settled(SendOutcome::Queued)),
            ),
        ],
    );
    // Accepted unsettled, the connection lost: sent again, then settled by a `Settled`.
    check(
        Route::IP_QUEUED,
        ip(SendMode::Queue),
        &[
            (
                T0,
                Some(Answer(SendOutcome::Accepted)),
                Wait { until: Millis::MAX },
            ),
            (
                T0 + 1,
                Some(Unreachable { maybe_stored: true }),
                Wait {
                    until: T0 + 1 + SECOND,
                },
            ),
            (T0 + 1 + SECOND, None, ip(SendMode::Queue)),
            (
                T0 + 2 * SECOND,
                Some(Answer(SendOutcome::Accepted)),
                Wait { until: Millis::MAX },
            ),
            (
                T0 + 3 * SECOND,
                Some(Event::Settled),
                Finished(Outcome::Settled(SendOutcome::Accepted)),
            ),
        ],
    );
    let policy = Policy::default();
    let mut outgoing = Outgoing::new(Route::IP_QUEUED, T0);
    outgoing.next(T0);
    assert!(!outgoing.is_resend(), "the first send");
    outgoing.handle(&policy, Answer(SendOutcome::Accepted), T0);
    assert!(outgoing.awaits_server(), "accepted, not settled");
    // Stopped before it was settled: resumed as a resend of the same id, now.
    let mut resumed = outgoing.resume(&policy, T0 + MINUTE).expect("pending");
    assert_eq!(resumed.next(T0 + MINUTE), ip(SendMode::Queue));
    assert!(resumed.is_resend());
    // A settled message is not waited on, nor sent again; a route with an SMS step keeps its
    // withdraw and is never resent.
    outgoing.handle(&policy, Event::Settled, T0);
    assert!(outgoing.is_done());
    assert_eq!(outgoing.resume(&policy, T0 + MINUTE), None);
    let mut auto = Outgoing::new(Route::Auto, T0);
    auto.next(T0);
    auto.handle(&policy, Answer(SendOutcome::Accepted), T0);
    assert!(!auto.awaits_server());
    auto.handle(&policy, Event::Settled, T0);
    assert!(
        auto.settled && !auto.is_done(),
        "waits for its receipt or withdraw"
    );
}

#[test]
fn a_receipt_before_the_message_is_settled_leaves_the_decision_to_the_withdraw() {
    // The server may send the receipt before the decision behind it is durable: a crash then
    // forgets both, and the withdraw that follows is answered by what is durable.
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
            (
                T0 + 1,
                Some(Receipt(ReceiptKind::Delivered)),
                Wait { until: deadline },
            ),
            (deadline, None, Withdraw),
            (deadline + 1, Some(Withdrawn(Withdrawal::Unknown)), SendSms),
        ],
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

#[test]
fn ip_only_sends_in_its_mode_and_resends_what_certainly_never_arrived() {
    let now_or_never = Route::IpOnly {
        mode: SendMode::NowOrNever,
    };
    check(
        now_or_never,
        ip(SendMode::NowOrNever),
        &[(
            T0,
            Some(Answer(SendOutcome::RefusedNotReachable)),
            Finished(Outcome::NotSent(SendOutcome::RefusedNotReachable)),
        )],
    );
    check(
        now_or_never,
        ip(SendMode::NowOrNever),
        &[
            (
                T0,
                Some(Answer(SendOutcome::Accepted)),
                Wait { until: Millis::MAX },
            ),
            // A receipt alone settles nothing: it finishes the message once settled.
            (
                T0 + 3,
                Some(Receipt(ReceiptKind::Delivered)),
                Wait { until: Millis::MAX },
            ),
            (T0 + 4, Some(Event::Settled), Finished(Outcome::Delivered)),
        ],
    );
    // The connection failed before the send was written: send again, never an SMS.
    check(
        Route::IP_QUEUED,
        ip(SendMode::Queue),
        &[
            (
                T0,
                Some(Unreachable {
                    maybe_stored: false,
                }),
                Wait { until: T0 + SECOND },
            ),
            (T0 + SECOND, None, ip(SendMode::Queue)),
        ],
    );
}

#[test]
fn changed_devices_are_encrypted_for_again_a_few_times_then_refused() {
    let policy = Policy::default();
    assert_eq!(policy.max_reencrypt, 3);
    // Over IP only: three times more, then not sent. The server's answer and the event are one.
    for changed in [DevicesChanged, Answer(SendOutcome::DevicesChanged)] {
        check(
            Route::IP_QUEUED,
            ip(SendMode::Queue),
            &[
                (T0 + 1, Some(changed), Reencrypt(SendMode::Queue)),
                (T0 + 2, Some(changed), Reencrypt(SendMode::Queue)),
                (T0 + 3, Some(changed), Reencrypt(SendMode::Queue)),
                (
                    T0 + 4,
                    Some(changed),
                    Finished(Outcome::NotSent(SendOutcome::DevicesChanged)),
                ),
            ],
        );
    }
    // With an SMS route, a send that kept being refused this way falls back: nothing was stored.
    check(
        Route::Auto,
        ip(SendMode::NowOrNever),
        &[
            (
                T0 + 1,
                Some(DevicesChanged),
                Reencrypt(SendMode::NowOrNever),
            ),
            (
                T0 + 2,
                Some(DevicesChanged),
                Reencrypt(SendMode::NowOrNever),
            ),
            (
                T0 + 3,
                Some(DevicesChanged),
                Reencrypt(SendMode::NowOrNever),
            ),
            (T0 + 4, Some(DevicesChanged), SendSms),
            (T0 + 5, Some(SmsSent), Finished(Outcome::SentAsSms)),
        ],
    );
    // Encrypted again once, then taken: the count does not matter any more.
    check(
        Route::QueueThenSms { after: MINUTE },
        ip(SendMode::Queue),
        &[
            (T0 + 1, Some(DevicesChanged), Reencrypt(SendMode::Queue)),
            (
                T0 + 2,
                Some(Answer(SendOutcome::Queued)),
                Wait { until: T0 + MINUTE },
            ),
            // Late or duplicate: stale once the send was answered.
            (T0 + 3, Some(DevicesChanged), Wait { until: T0 + MINUTE }),
        ],
    );
    // Not waiting for an answer: stale.
    check(
        Route::SmsOnly,
        SendSms,
        &[(T0, Some(DevicesChanged), Wait { until: Millis::MAX })],
    );
}

#[test]
fn an_expired_message_with_an_sms_route_goes_as_sms() {
    let after = 10 * MINUTE;
    check(
        Route::QueueThenSms { after },
        ip(SendMode::Queue),
        &[
            (
                T0,
                Some(Answer(SendOutcome::Queued)),
                Wait { until: T0 + after },
            ),
            (T0 + MINUTE, Some(Receipt(ReceiptKind::Expired)), SendSms),
            (
                T0 + MINUTE,
                Some(SmsFailed { retry: false }),
                Finished(Outcome::SmsRejected),
            ),
        ],
    );
}

/// A stored state taken up again at `now`: what it becomes and what it does first.
fn resumed(outgoing: Outgoing, now: Millis) -> Option<(Phase, Action)> {
    let mut resumed = outgoing.resume(&Policy::default(), now)?;
    let action = resumed.next(now);
    Some((resumed.phase, action))
}

#[test]
fn a_resumed_message_makes_unfinished_steps_safe() {
    let at = |route: Route, phase: Phase| Outgoing {
        phase,
        ..Outgoing::new(route, T0)
    };
    let later = T0 + MINUTE;
    // A send that may have reached the server: withdrawn before any SMS.
    assert_eq!(
        resumed(at(Route::Auto, Phase::AwaitingAnswer), later),
        Some((
            Phase::Withdraw {
                at: later + SECOND,
                attempt: 1
            },
            Wait {
                until: later + SECOND
            }
        ))
    );
    // Over IP only: sent again (the server drops a duplicate id).
    assert_eq!(
        resumed(at(Route::IP_QUEUED, Phase::AwaitingAnswer), later),
        Some((Phase::AwaitingAnswer, ip(SendMode::Queue)))
    );
    // A withdraw under way: made again after a backoff.
    assert_eq!(
        resumed(at(Route::Auto, Phase::Withdrawing { attempt: 2 }), later),
        Some((
            Phase::Withdraw {
                at: later + 4 * SECOND,
                attempt: 3
            },
            Wait {
                until: later + 4 * SECOND
            }
        ))
    );
    // An SMS handed to the transport: sent again now.
    assert_eq!(
        resumed(at(Route::SmsOnly, Phase::SendingSms { attempt: 1 }), later),
        Some((Phase::SendingSms { attempt: 1 }, SendSms))
    );
    // A re-encryption to be made: made.
    assert_eq!(
        resumed(at(Route::Auto, Phase::Reencrypt), later),
        Some((Phase::AwaitingAnswer, Reencrypt(SendMode::NowOrNever)))
    );
    // Waiting for a receipt: unchanged.
    let waiting = Phase::AwaitingReceipt { until: later + 1 };
    assert_eq!(
        resumed(at(Route::Auto, waiting), later),
        Some((waiting, Wait { until: later + 1 }))
    );
    // Finished: nothing to resume.
    assert_eq!(
        resumed(at(Route::Auto, Phase::Done(Outcome::Delivered)), later),
        None
    );
}

#[test]
fn wake_and_waiting_for_the_server_are_read_without_a_change() {
    let mut outgoing = Outgoing::new(Route::Auto, T0);
    // A step to take now.
    assert_eq!(outgoing.wake_at(T0), Some(T0));
    assert_eq!(outgoing.phase, Phase::SendIp, "wake_at changes nothing");
    assert!(!outgoing.awaits_server());
    outgoing.next(T0);
    // Waiting for the answer: events only.
    assert_eq!(outgoing.wake_at(T0), None);
    assert!(outgoing.awaits_server());
    outgoing.handle(&Policy::default(), Answer(SendOutcome::Accepted), T0);
    assert_eq!(outgoing.wake_at(T0), Some(T0 + 5 * SECOND));
    assert!(!outgoing.awaits_server());
    outgoing.next(T0 + 5 * SECOND);
    assert!(outgoing.awaits_server(), "withdrawing");
}

#[test]
fn a_withdraw_refused_for_the_budget_is_retried_after_its_wait_and_sends_no_sms() {
    let wait = 30 * MINUTE;
    let asked = T0 + 5 + 5 * SECOND;
    check(
        Route::Auto,
        ip(SendMode::NowOrNever),
        &[
            (
                T0 + 5,
                Some(Answer(SendOutcome::Accepted)),
                Wait { until: asked },
            ),
            (asked, None, Withdraw),
            (
                asked + 1,
                Some(Event::WithdrawLater { retry_after: wait }),
                Wait {
                    until: asked + 1 + wait,
                },
            ),
            (
                asked + wait,
                None,
                Wait {
                    until: asked + 1 + wait,
                },
            ),
            (asked + 1 + wait, None, Withdraw),
            (
                asked + 2 + wait,
                Some(Withdrawn(Withdrawal::Withdrawn)),
                SendSms,
            ),
        ],
    );
    // No wait given: the usual backoff; a receipt meanwhile settles it over IP.
    check(
        Route::QueueThenSms { after: MINUTE },
        ip(SendMode::Queue),
        &[
            (
                T0 + 5,
                Some(Answer(SendOutcome::Queued)),
                Wait { until: T0 + MINUTE },
            ),
            (T0 + 5, Some(Event::Settled), Wait { until: T0 + MINUTE }),
            (T0 + MINUTE, None, Withdraw),
            (
                T0 + MINUTE + 1,
                Some(Event::WithdrawLater { retry_after: 0 }),
                Wait {
                    until: T0 + MINUTE + 1 + SECOND,
                },
            ),
            (
                T0 + MINUTE + 2,
                Some(Receipt(ReceiptKind::Delivered)),
                Finished(Outcome::Delivered),
            ),
        ],
    );
}
