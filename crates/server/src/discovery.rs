//! The discovery budget: which answers about another account are charged (promise P8: no request
//! answers "user / not a user / online" for free).
//!
//! Every answer that tells an account whether another number is a user, which devices it has,
//! whether one of them is reachable now, or whether a message reached it draws from one budget of
//! the asking account, whatever the request: an evaluation of blinded numbers, a lookup, a device
//! list, a send, a withdraw, a key claim. It is the lookup budget (`lookup_burst`, regained at
//! `lookup_per_hour`), kept under the account's [`BudgetKey`](crate::keys::BudgetKey): shared by
//! all its devices, kept across an opt-out and a new registration, in memory only.
//!
//! The budget is charged before the answer is given; over it the request is answered
//! `RATE_LIMITED` with the wait, and tells nothing. Whether an answer is charged depends only on
//! the request and on what the request shows its asker already knows (its own account, or device
//! ids of the other account, 16 random bytes it can only have from an answer it paid for or from a
//! message of that account), never on what the answer would say: so a refusal reveals nothing
//! either. [`units`] is the one place that decides; each handler describes its answer as a
//! [`Disclosure`] and calls [`charge`].

use tidings_core::Millis;
use tidings_proto::id::DeviceId;
use tidings_store::Store;

use crate::budget::Budget;
use crate::clock::now_ms;
use crate::identity::Identity;
use crate::state::Shared;

/// The message of every refusal for this budget.
pub const BUDGET_USED_UP: &str = "lookup budget used up";

/// An answer about another account, as a request is about to get it, with what the request
/// showed its asker knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disclosure<'a> {
    /// `Evaluate` of `elements` blinded numbers: it tells nothing by itself, but its result is
    /// what a lookup or a send needs. `free_sender_check`: the hourly free evaluation of the one
    /// number a held copy's sender claims (so a spoofer cannot spend its receiver's budget).
    Evaluation {
        elements: usize,
        free_sender_check: bool,
    },
    /// `Lookup`: whether each of `accounts` accounts is a user, and online.
    Lookup { accounts: usize },
    /// `DevicesRequest`: a number's devices. `own`: the asker's own number; `free_sender_check`:
    /// the hourly free check of the sender of a copy the asker holds (it lists the devices only
    /// if that device is one of them, so it tells nothing the message did not).
    DeviceList { own: bool, free_sender_check: bool },
    /// `Send`, before it is routed: `NOT_A_USER`, `REFUSED_NOT_REACHABLE`, `DEVICES_CHANGED`,
    /// `ACCEPTED` or `QUEUED` each tell something. `receiver`: the devices of the receiver's
    /// account (`None`: not a user); `copies`: the devices the send has a copy for; `own`: the
    /// receiver is the sender's own account.
    Send {
        own: bool,
        receiver: Option<&'a [DeviceId]>,
        copies: &'a [DeviceId],
    },
    /// A send that was free so far, for which storage found `missing` receiver devices without a
    /// copy: `DEVICES_CHANGED` would name devices the sender did not know.
    SendMissingDevices { own: bool, missing: usize },
    /// A withdraw's outcome: whether a receiver device took the message first.
    Withdraw,
    /// `KeysClaim`: `account` the devices of the number's account (`None`: not a user), `named`
    /// the devices the claim names (none: all of them); `own`: the asker's own number.
    KeysClaim {
        own: bool,
        account: Option<&'a [DeviceId]>,
        named: &'a [DeviceId],
    },
}

/// How many units of the discovery budget an answer costs: none when it tells nothing the
/// request did not show its asker knew already.
pub fn units(disclosure: &Disclosure<'_>) -> u32 {
    let named_one = |devices: &[DeviceId], named: &[DeviceId]| {
        named.iter().any(|device| devices.contains(device))
    };
    let free = match *disclosure {
        Disclosure::Evaluation {
            elements,
            free_sender_check,
        } => {
            if free_sender_check {
                return 0;
            }
            return u32::try_from(elements).unwrap_or(u32::MAX);
        }
        Disclosure::Lookup { accounts } => return u32::try_from(accounts).unwrap_or(u32::MAX),
        Disclosure::DeviceList {
            own,
            free_sender_check,
        } => own || free_sender_check,
        // A send whose copies go to a device of the receiver comes from someone who knows the
        // account and its devices already (a contact): its answers (`ACCEPTED`, `QUEUED`,
        // `REFUSED_NOT_REACHABLE`, or `DEVICES_CHANGED` naming only copies the sender made) are
        // free, so people who talk a lot never run dry. Any other send to another account pays:
        // its answer tells whether the number is a user, lists its devices, or says whether one
        // is online.
        Disclosure::Send {
            own,
            receiver,
            copies,
        } => own || receiver.is_some_and(|devices| named_one(devices, copies)),
        Disclosure::SendMissingDevices { own, missing } => own || missing == 0,
        // Whether a message was delivered is whether a receiver device was reachable.
        Disclosure::Withdraw => false,
        // A claim naming only devices of the account tells nothing new; one of all devices (or
        // of a number that is not a user, or naming a device that is not the account's) tells
        // whether the number is a user and lists its devices.
        Disclosure::KeysClaim {
            own,
            account,
            named,
        } => {
            own || account.is_some_and(|devices| {
                !named.is_empty() && named.iter().all(|device| devices.contains(device))
            })
        }
    };
    u32::from(!free)
}

/// Charges the asking account for `disclosure` before the answer is given: `Ok` with the units
/// taken (0 for a free answer), `Err` with the wait until the budget would allow it (the request
/// is then answered `RATE_LIMITED` and tells nothing).
pub async fn charge<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    disclosure: Disclosure<'_>,
) -> Result<u32, Millis> {
    let units = units(&disclosure);
    if units == 0 {
        return Ok(0);
    }
    crate::budget::take(state, Budget::Discovery, identity.budgets, units, now_ms()).await?;
    Ok(units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_answer_about_another_account_is_charged_unless_the_asker_showed_it_knew() {
        let (a, b, stranger) = (DeviceId([1; 16]), DeviceId([2; 16]), DeviceId([9; 16]));
        let devices = [a, b];
        let (only_a, only_b, only_stranger) = ([a], [b], [stranger]);
        let (a_and_stranger, b_and_stranger) = ([a, stranger], [b, stranger]);
        let none: [DeviceId; 0] = [];
        let send = |own, receiver, copies| Disclosure::Send {
            own,
            receiver,
            copies,
        };
        let claim = |own, account, named| Disclosure::KeysClaim {
            own,
            account,
            named,
        };
        let cases: [(&str, Disclosure<'_>, u32); 24] = [
            ("lookup of 7", Disclosure::Lookup { accounts: 7 }, 7),
            (
                "evaluation of 5",
                Disclosure::Evaluation {
                    elements: 5,
                    free_sender_check: false,
                },
                5,
            ),
            (
                "free evaluation of a sender's number",
                Disclosure::Evaluation {
                    elements: 1,
                    free_sender_check: true,
                },
                0,
            ),
            (
                "device list",
                Disclosure::DeviceList {
                    own: false,
                    free_sender_check: false,
                },
                1,
            ),
            (
                "own device list",
                Disclosure::DeviceList {
                    own: true,
                    free_sender_check: false,
                },
                0,
            ),
            (
                "free sender check",
                Disclosure::DeviceList {
                    own: false,
                    free_sender_check: true,
                },
                0,
            ),
            ("send to a non-user", send(false, None, &none), 1),
            (
                "send to a non-user with copies",
                send(false, None, &only_a),
                1,
            ),
            ("send without copies", send(false, Some(&devices), &none), 1),
            (
                "send with strangers' copies",
                send(false, Some(&devices), &only_stranger),
                1,
            ),
            (
                "send to a contact",
                send(false, Some(&devices), &devices),
                0,
            ),
            (
                "send naming one device",
                send(false, Some(&devices), &b_and_stranger),
                0,
            ),
            (
                "send to a user without devices",
                send(false, Some(&none), &none),
                1,
            ),
            (
                "send to the own account",
                send(true, Some(&devices), &none),
                0,
            ),
            (
                "new devices of a contact",
                Disclosure::SendMissingDevices {
                    own: false,
                    missing: 1,
                },
                1,
            ),
            (
                "only extra copies",
                Disclosure::SendMissingDevices {
                    own: false,
                    missing: 0,
                },
                0,
            ),
            (
                "own new devices",
                Disclosure::SendMissingDevices {
                    own: true,
                    missing: 2,
                },
                0,
            ),
            ("withdraw", Disclosure::Withdraw, 1),
            ("claim of a non-user", claim(false, None, &none), 1),
            (
                "claim of all devices",
                claim(false, Some(&devices), &none),
                1,
            ),
            (
                "claim naming a stranger",
                claim(false, Some(&devices), &a_and_stranger),
                1,
            ),
            (
                "claim naming known devices",
                claim(false, Some(&devices), &only_b),
                0,
            ),
            (
                "claim of the own number",
                claim(true, Some(&devices), &none),
                0,
            ),
            (
                "claim of a non-user naming devices",
                claim(false, None, &only_a),
                1,
            ),
        ];
        for (what, disclosure, expected) in cases {
            assert_eq!(units(&disclosure), expected, "{what}");
        }
    }
}
