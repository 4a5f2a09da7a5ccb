//! Which devices a stored message must reach, and when a queue is too long to take it.
//!
//! Two rules every storage engine applies inside the write that stores a message, so that a
//! device linked or removed at the same moment cannot slip between the check and the write:
//! - E1, "no device is skipped silently": the copies must name exactly the receiver's devices
//!   that have published keys and the sender's other such devices ([`check_copies`]);
//! - a message is refused whole if any device it goes to already holds the most copies allowed
//!   ([`queue_full`]).
//!
//! And one rule for what a delivery leaves behind: a receipt waits for its sending device one
//! more TTL of its message after the message's own ends, at least [`RECEIPT_MIN_WAIT`]
//! ([`receipt_expires_at`]).
//!
//! Engines read the devices and queue lengths these rules decide on and write what they decided;
//! they never decide themselves. This module reads nothing and stores nothing.

use tidings_proto::id::DeviceId;

use crate::{Millis, DAY};

/// A device of an account, as the delivery rules read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccountDevice {
    pub id: DeviceId,
    /// The device has published its identity keys, so a copy can be encrypted for it.
    pub keyed: bool,
    /// Copies waiting in its queue, counting the ones stored earlier in the same write.
    pub queued: u64,
}

/// How a message's copies differ from the devices that must receive it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceDifference {
    /// Receiver devices without a copy.
    pub missing: Vec<DeviceId>,
    /// The sender's other devices without a copy.
    pub missing_own: Vec<DeviceId>,
    /// Copies for devices that must not get one.
    pub extra: Vec<DeviceId>,
}

/// The devices that get a copy of a message, when its copies name exactly them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Addressees {
    /// The receiver's keyed devices (without the sending device).
    pub receiver: Vec<AccountDevice>,
    /// The sender's other keyed devices.
    pub own: Vec<AccountDevice>,
}

impl Addressees {
    /// Whether a copy for `device` goes to the receiver (rather than to the sender's own other
    /// devices): only those copies are withdrawn, and only their acknowledgement is a delivery.
    pub fn to_receiver(&self, device: DeviceId) -> bool {
        self.receiver.iter().any(|d| d.id == device)
    }

    /// The queue lengths of every device that gets a copy.
    pub fn queue_lengths(&self) -> impl Iterator<Item = u64> + '_ {
        self.receiver.iter().chain(&self.own).map(|d| d.queued)
    }
}

/// What [`check_copies`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyCheck {
    /// The copies name exactly the devices that must get one.
    Complete(Addressees),
    /// They do not; nothing may be stored, and the sender is told the difference.
    DevicesChanged(DeviceDifference),
    /// The receiver has no device a copy could go to (no device at all, or none with published
    /// keys and the copies name none either).
    NoReceiverDevice,
}

/// Rule E1: checks a message's copies against the devices that must get one. `receiver` are the
/// receiver account's devices; `own` the sending account's, empty when the receiver is that
/// account (its devices are then all in `receiver`). The sending device never gets a copy.
pub fn check_copies(
    sender_device: DeviceId,
    receiver: &[AccountDevice],
    own: &[AccountDevice],
    copies: &[DeviceId],
) -> CopyCheck {
    if receiver.is_empty() {
        return CopyCheck::NoReceiverDevice;
    }
    let must_get = |devices: &[AccountDevice]| {
        devices
            .iter()
            .filter(|d| d.keyed && d.id != sender_device)
            .copied()
            .collect::<Vec<_>>()
    };
    let addressees = Addressees {
        receiver: must_get(receiver),
        own: must_get(own),
    };
    let without_copy = |devices: &[AccountDevice]| {
        devices
            .iter()
            .map(|d| d.id)
            .filter(|d| !copies.contains(d))
            .collect::<Vec<_>>()
    };
    let difference = DeviceDifference {
        missing: without_copy(&addressees.receiver),
        missing_own: without_copy(&addressees.own),
        extra: copies
            .iter()
            .copied()
            .filter(|c| {
                !addressees
                    .receiver
                    .iter()
                    .chain(&addressees.own)
                    .any(|d| d.id == *c)
            })
            .collect(),
    };
    if difference != DeviceDifference::default() {
        return CopyCheck::DevicesChanged(difference);
    }
    if addressees.receiver.is_empty() {
        return CopyCheck::NoReceiverDevice;
    }
    CopyCheck::Complete(addressees)
}

/// Whether a message must be refused because a queue it would join is full: any device that
/// gets a copy already holds `queue_limit` copies or more.
pub fn queue_full(queue_lengths: impl IntoIterator<Item = u64>, queue_limit: u32) -> bool {
    queue_lengths
        .into_iter()
        .any(|length| length >= u64::from(queue_limit))
}

/// The shortest time a receipt waits for its sending device after its message's TTL ended: a
/// message kept for seconds (`NOW_OR_NEVER`, or a short TTL) still tells a sender that was
/// offline for a while what became of it.
pub const RECEIPT_MIN_WAIT: Millis = DAY;

/// When a receipt of the message sent at `sent_at` and kept until `expires_at` is deleted, if its
/// sending device has not taken it: one more TTL after the message's end, at least
/// [`RECEIPT_MIN_WAIT`]. A `Delivered` receipt is stored before that end and an `Expired` one at
/// it, so both wait as long; a sender that never comes back leaves nothing for ever.
pub fn receipt_expires_at(sent_at: Millis, expires_at: Millis) -> Millis {
    let ttl = expires_at.saturating_sub(sent_at);
    expires_at.saturating_add(ttl.max(RECEIPT_MIN_WAIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    /// A keyed device `n` with `queued` copies waiting.
    fn keyed(n: u8, queued: u64) -> AccountDevice {
        AccountDevice {
            id: device(n),
            keyed: true,
            queued,
        }
    }

    /// A device `n` that has not published keys.
    fn unkeyed(n: u8) -> AccountDevice {
        AccountDevice {
            id: device(n),
            keyed: false,
            queued: 0,
        }
    }

    fn ids(devices: &[u8]) -> Vec<DeviceId> {
        devices.iter().copied().map(device).collect()
    }

    fn changed(missing: &[u8], missing_own: &[u8], extra: &[u8]) -> CopyCheck {
        CopyCheck::DevicesChanged(DeviceDifference {
            missing: ids(missing),
            missing_own: ids(missing_own),
            extra: ids(extra),
        })
    }

    fn complete(receiver: &[AccountDevice], own: &[AccountDevice]) -> CopyCheck {
        CopyCheck::Complete(Addressees {
            receiver: receiver.to_vec(),
            own: own.to_vec(),
        })
    }

    /// Every branch of E1. The sender is device 1 (of an account that also holds 2 and 3); the
    /// receiver holds 10, 11 and 12.
    #[test]
    fn copies_against_the_devices_that_must_get_one() {
        let check = |receiver: &[AccountDevice],
                     own: &[AccountDevice],
                     copies: &[u8],
                     expected: CopyCheck| {
            assert_eq!(
                check_copies(device(1), receiver, own, &ids(copies)),
                expected,
                "receiver {receiver:?}, own {own:?}, copies {copies:?}"
            );
        };
        let (r10, r11, r12) = (keyed(10, 0), keyed(11, 4), unkeyed(12));
        let (o1, o2, o3) = (keyed(1, 0), keyed(2, 7), unkeyed(3));
        // Exactly the receiver's keyed devices and the sender's other keyed devices.
        check(
            &[r10, r11, r12],
            &[o1, o2, o3],
            &[10, 11, 2],
            complete(&[r10, r11], &[o2]),
        );
        // The order of the copies does not matter.
        check(
            &[r10, r11],
            &[o1, o2],
            &[2, 11, 10],
            complete(&[r10, r11], &[o2]),
        );
        // A sender with no other device.
        check(&[r10], &[o1], &[10], complete(&[r10], &[]));
        // A receiver device without a copy.
        check(&[r10, r11], &[o1], &[10], changed(&[11], &[], &[]));
        // One of the sender's other devices without a copy.
        check(&[r10], &[o1, o2], &[10], changed(&[], &[2], &[]));
        // A copy for a device without keys, for the sending device, for a stranger.
        check(&[r10, r12], &[o1], &[10, 12], changed(&[], &[], &[12]));
        check(&[r10], &[o1], &[10, 1], changed(&[], &[], &[1]));
        check(&[r10], &[o1], &[10, 99], changed(&[], &[], &[99]));
        // All three at once, in the order the devices are listed.
        check(
            &[r10, r11],
            &[o1, o2],
            &[11, 99],
            changed(&[10], &[2], &[99]),
        );
        // A receiver with no device at all: nothing to compare against.
        check(&[], &[o1, o2], &[2], CopyCheck::NoReceiverDevice);
        // A receiver whose devices have no keys yet, and copies that name none of them.
        check(&[r12], &[o1], &[], CopyCheck::NoReceiverDevice);
        // ... but copies for devices that must not get one are reported first.
        check(&[r12], &[o1], &[12], changed(&[], &[], &[12]));
        // A message to the sender's own account: its other devices are the receiver's.
        check(&[o1, o2, o3], &[], &[2], complete(&[o2], &[]));
        check(&[o1], &[], &[], CopyCheck::NoReceiverDevice);
    }

    #[test]
    fn addressees_know_which_copies_go_to_the_receiver() {
        let addressees = Addressees {
            receiver: vec![keyed(10, 3)],
            own: vec![keyed(2, 5)],
        };
        assert!(addressees.to_receiver(device(10)));
        assert!(!addressees.to_receiver(device(2)));
        assert!(!addressees.to_receiver(device(99)));
        assert_eq!(addressees.queue_lengths().collect::<Vec<_>>(), vec![3, 5]);
    }

    #[test]
    fn a_queue_at_its_limit_refuses_the_message() {
        let check = |lengths: &[u64], limit: u32, expected: bool| {
            assert_eq!(
                queue_full(lengths.iter().copied(), limit),
                expected,
                "{lengths:?} against {limit}"
            );
        };
        check(&[], 10, false);
        check(&[0, 9], 10, false);
        check(&[0, 10], 10, true);
        check(&[11], 10, true);
        check(&[0], 0, true);
        check(&[u64::MAX], u32::MAX, true);
    }

    #[test]
    fn a_receipt_waits_one_more_ttl_and_at_least_a_day() {
        use crate::SECOND;
        let check = |sent_at: Millis, expires_at: Millis, expected: Millis| {
            assert_eq!(
                receipt_expires_at(sent_at, expires_at),
                expected,
                "sent at {sent_at}, kept until {expires_at}"
            );
        };
        // The default 7 days: the receipt waits until 14 days after sending.
        check(0, 7 * DAY, 14 * DAY);
        check(5, 5 + 30 * DAY, 5 + 60 * DAY);
        // Short-lived messages: a day after their end.
        check(100, 100 + 60 * SECOND, 100 + 60 * SECOND + DAY);
        check(0, 0, DAY);
        // Times that make no sense still give a deadline, never an overflow.
        check(10, 5, 5 + DAY);
        check(0, Millis::MAX, Millis::MAX);
    }
}
