//! Which devices a stored message must reach, and when a queue is too long to take it.
//!
//! Two rules every storage engine applies inside the write that stores a message, so that a
//! device linked or removed at the same moment cannot slip between the check and the write:
//! - E1, "no device is skipped silently": the copies must name exactly the receiver's devices
//!   that have published keys and the sender's other such devices ([`check_copies`]);
//! - a message is refused whole if a queue it would join has no room for it ([`room_for`]): any
//!   device it goes to already holds the most copies allowed, or the sending account would pass
//!   its share of one device's queue or its storage quota across all queues ([`QueueLimits`]),
//!   so that no one sender can fill a victim's queue;
//! - a sender that is not a contact of the receiver (it presented none of the receiver's contact
//!   tokens, [`from_contact`]) is a stranger: its copies share a small pool of each receiver
//!   device's queue ([`stranger_pool_has_room`]) and are kept at most [`STRANGER_TTL`]
//!   ([`stranger_expires_at`]), so that strangers together cannot crowd out the contacts.
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
    /// What the sending account of the message being checked already has waiting in this
    /// device's queue.
    pub from_sender: Usage,
    /// Strangers' copies waiting in its queue (the stranger pool's fill), as the engine counts
    /// them: in memory only, since it opened.
    pub strangers: u64,
    /// SHA-256 of the device's contact token, once it registered one.
    pub contact_token_hash: Option<[u8; 32]>,
}

/// Copies and their bytes waiting in queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub copies: u64,
    pub bytes: u64,
}

impl Usage {
    /// One copy of `bytes` more.
    pub fn plus_copy(self, bytes: u64) -> Usage {
        Usage {
            copies: self.copies.saturating_add(1),
            bytes: self.bytes.saturating_add(bytes),
        }
    }
}

/// How much queues may hold: in all, and of one sending account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Copies one device's queue holds at most, from every sender together.
    pub device_copies: u32,
    /// Copies one sending account may have waiting in one device's queue.
    pub sender_copies: u32,
    /// Bytes one sending account may have waiting in one device's queue.
    pub sender_bytes: u64,
    /// Bytes one sending account may have waiting across every queue (its storage quota).
    pub account_bytes: u64,
    /// Copies from strangers one device's queue holds at most, from every stranger together.
    pub stranger_copies: u32,
}

impl QueueLimits {
    /// The server's limits; `docs/ARCHITECTURE.md` (the bounds list) says why these numbers.
    /// A device queue holds 10,000 copies; one sender gets a twentieth of it (500 copies, and
    /// 8 MiB, so 128 copies of the largest payload), so that it takes twenty accounts to fill
    /// one device; and one account keeps at most 64 MiB waiting across all of its receivers.
    /// Strangers together get 200 copies of a device's queue: the rest is the contacts'.
    pub const DEFAULT: QueueLimits = QueueLimits {
        device_copies: 10_000,
        sender_copies: 500,
        sender_bytes: 8 * 1024 * 1024,
        account_bytes: 64 * 1024 * 1024,
        stranger_copies: 200,
    };

    /// Only a bound on each device's queue, with no share per sender (for tests of other rules).
    pub const fn device_only(device_copies: u32) -> QueueLimits {
        QueueLimits {
            device_copies,
            sender_copies: u32::MAX,
            sender_bytes: u64::MAX,
            account_bytes: u64::MAX,
            stranger_copies: u32::MAX,
        }
    }
}

impl From<u32> for QueueLimits {
    /// A bare number bounds each device's queue only.
    fn from(device_copies: u32) -> Self {
        QueueLimits::device_only(device_copies)
    }
}

/// What [`room_for`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Every queue has room for its copy.
    Fits,
    /// A device's queue is full, or the sending account's share of it is.
    QueueFull,
    /// The sending account's storage quota across all queues would be passed.
    OverQuota,
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

    /// Every device that gets a copy.
    pub fn devices(&self) -> impl Iterator<Item = &AccountDevice> + '_ {
        self.receiver.iter().chain(&self.own)
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

/// Whether the queues a message would join have room for it under `limits`. `copies` are the
/// devices that get a copy with its size in bytes (each with its queue and what the sending
/// account already has waiting there); `sender_bytes` what the sending account has waiting
/// across every queue. A device that already holds `device_copies` copies, or a sender that would
/// pass its share of one device's queue, is [`Room::QueueFull`]; a sender that would pass its
/// quota across all queues is [`Room::OverQuota`].
pub fn room_for<'a>(
    copies: impl IntoIterator<Item = (&'a AccountDevice, u64)>,
    sender_bytes: u64,
    limits: QueueLimits,
) -> Room {
    let mut message_bytes = 0u64;
    for (device, bytes) in copies {
        if !has_room(device, bytes, limits) {
            return Room::QueueFull;
        }
        message_bytes = message_bytes.saturating_add(bytes);
    }
    if sender_bytes.saturating_add(message_bytes) > limits.account_bytes {
        return Room::OverQuota;
    }
    Room::Fits
}

/// Whether `device`'s queue has room for a copy of `bytes` from the message's sending account:
/// the queue is not full, and the sender's share of it would not be passed.
fn has_room(device: &AccountDevice, bytes: u64, limits: QueueLimits) -> bool {
    let after = device.from_sender.plus_copy(bytes);
    device.queued < u64::from(limits.device_copies)
        && after.copies <= u64::from(limits.sender_copies)
        && after.bytes <= limits.sender_bytes
}

/// The sender's own other devices (with the size of their copy) whose queue has no room for it.
/// A message is stored without their copies rather than refused, and the sender is told which
/// were skipped: a user's own device left offline never stops the user from sending, and never
/// silently.
pub fn own_without_room<'a>(
    own: impl IntoIterator<Item = (&'a AccountDevice, u64)>,
    limits: QueueLimits,
) -> Vec<DeviceId> {
    own.into_iter()
        .filter(|(device, bytes)| !has_room(device, *bytes, limits))
        .map(|(device, _)| device.id)
        .collect()
}

/// The longest a stranger's message is kept, whatever TTL its send asked for: a stranger's
/// pool drains by itself in days, not in the 30 days a contact's message may wait.
pub const STRANGER_TTL: Millis = 3 * DAY;

/// Whether a message's sender counts as a contact of its receiver: a message within one account
/// always does; otherwise the send must present a token whose hash (`presented`) is the
/// registered contact token hash of one of the receiver's devices (`receiver`). Nothing of the
/// answer is stored: the server keeps no pairs of who is whose contact.
pub fn from_contact(
    within_account: bool,
    presented: Option<[u8; 32]>,
    receiver: &[AccountDevice],
) -> bool {
    within_account
        || presented.is_some_and(|hash| {
            receiver
                .iter()
                .any(|device| device.contact_token_hash == Some(hash))
        })
}

/// Whether every receiver device (`receiver`, the devices a stranger's message goes to) has room
/// for one more stranger's copy in its stranger pool.
pub fn stranger_pool_has_room(receiver: &[AccountDevice], limits: QueueLimits) -> bool {
    receiver
        .iter()
        .all(|device| device.strangers < u64::from(limits.stranger_copies))
}

/// When a stranger's message sent at `sent_at` that asked to be kept until `expires_at` is
/// deleted: at most [`STRANGER_TTL`] after it was sent.
pub fn stranger_expires_at(sent_at: Millis, expires_at: Millis) -> Millis {
    expires_at.min(sent_at.saturating_add(STRANGER_TTL))
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
            from_sender: Usage::default(),
            strangers: 0,
            contact_token_hash: None,
        }
    }

    /// A device `n` that has not published keys.
    fn unkeyed(n: u8) -> AccountDevice {
        AccountDevice {
            id: device(n),
            keyed: false,
            queued: 0,
            from_sender: Usage::default(),
            strangers: 0,
            contact_token_hash: None,
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
        let lengths: Vec<u64> = addressees.devices().map(|d| d.queued).collect();
        assert_eq!(lengths, vec![3, 5]);
    }

    /// A device `n` with `queued` copies, `copies` and `bytes` of them from the sender.
    fn holding(n: u8, queued: u64, copies: u64, bytes: u64) -> AccountDevice {
        AccountDevice {
            from_sender: Usage { copies, bytes },
            ..keyed(n, queued)
        }
    }

    #[test]
    fn a_message_fits_only_where_every_queue_and_the_senders_shares_have_room() {
        let limits = QueueLimits {
            device_copies: 10,
            sender_copies: 3,
            sender_bytes: 100,
            account_bytes: 250,
            stranger_copies: 10,
        };
        let check = |devices: &[(AccountDevice, u64)], sender_bytes: u64, expected: Room| {
            assert_eq!(
                room_for(devices.iter().map(|(d, b)| (d, *b)), sender_bytes, limits),
                expected,
                "{devices:?}, sender holding {sender_bytes} bytes"
            );
        };
        check(&[], 0, Room::Fits);
        check(&[(holding(1, 9, 2, 50), 50)], 200, Room::Fits);
        // The device's queue is full, whoever filled it.
        check(&[(holding(1, 10, 0, 0), 1)], 0, Room::QueueFull);
        check(
            &[(holding(1, 0, 0, 0), 1), (holding(2, 11, 0, 0), 1)],
            0,
            Room::QueueFull,
        );
        // The sender's share of one device: copies, then bytes.
        check(&[(holding(1, 3, 3, 3), 1)], 3, Room::QueueFull);
        check(&[(holding(1, 1, 1, 60), 41)], 60, Room::QueueFull);
        // Another device of the same receiver still has room for this sender.
        check(&[(holding(2, 0, 0, 0), 41)], 60, Room::Fits);
        // The sender's quota across all queues counts every copy of the message.
        check(
            &[(holding(1, 0, 0, 0), 100), (holding(2, 0, 0, 0), 100)],
            50,
            Room::Fits,
        );
        check(
            &[(holding(1, 0, 0, 0), 100), (holding(2, 0, 0, 0), 100)],
            51,
            Room::OverQuota,
        );
        // A full queue is reported before the quota.
        check(&[(holding(1, 10, 0, 0), 100)], 250, Room::QueueFull);
        // Numbers that make no sense never overflow.
        check(
            &[(holding(1, 0, 0, u64::MAX), u64::MAX)],
            u64::MAX,
            Room::QueueFull,
        );
        let unbounded = QueueLimits::device_only(u32::MAX);
        let full = holding(1, u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(
            room_for([(&full, u64::MAX)], u64::MAX, unbounded),
            Room::QueueFull
        );
        assert_eq!(
            room_for([(&holding(1, 0, 0, 0), 1)], 0, QueueLimits::device_only(0)),
            Room::QueueFull
        );
    }

    #[test]
    fn own_devices_without_room_are_named() {
        let limits = QueueLimits {
            device_copies: 10,
            sender_copies: 3,
            sender_bytes: 100,
            account_bytes: 1_000,
            stranger_copies: 10,
        };
        let (fits, full, share_full, bytes_full) = (
            holding(1, 0, 0, 0),
            holding(2, 10, 0, 0),
            holding(3, 3, 3, 3),
            holding(4, 1, 1, 90),
        );
        let own = [
            (&fits, 10),
            (&full, 10),
            (&share_full, 10),
            (&bytes_full, 11),
        ];
        assert_eq!(own_without_room(own, limits), ids(&[2, 3, 4]));
        assert_eq!(own_without_room([(&fits, 100)], limits), ids(&[]));
    }

    #[test]
    fn strangers_are_told_from_contacts_by_a_registered_token_hash() {
        let with_token = |n: u8, hash: Option<[u8; 32]>| AccountDevice {
            contact_token_hash: hash,
            ..keyed(n, 0)
        };
        let receiver = [with_token(10, None), with_token(11, Some([7; 32]))];
        // A token of any of the receiver's devices makes a contact.
        assert!(from_contact(false, Some([7; 32]), &receiver));
        // None, or another, makes a stranger.
        assert!(!from_contact(false, None, &receiver));
        assert!(!from_contact(false, Some([8; 32]), &receiver));
        assert!(!from_contact(false, Some([7; 32]), &[with_token(10, None)]));
        // A message within one account is always a contact's.
        assert!(from_contact(true, None, &receiver));
    }

    #[test]
    fn the_stranger_pool_and_ttl_bound_strangers() {
        let limits = QueueLimits {
            stranger_copies: 2,
            ..QueueLimits::DEFAULT
        };
        let with_strangers = |n: u8, strangers: u64| AccountDevice {
            strangers,
            ..keyed(n, strangers)
        };
        assert!(stranger_pool_has_room(&[with_strangers(1, 1)], limits));
        assert!(!stranger_pool_has_room(
            &[with_strangers(1, 0), with_strangers(2, 2)],
            limits
        ));
        assert!(stranger_pool_has_room(&[], limits));
        // At most three days, never longer than asked.
        assert_eq!(stranger_expires_at(5, 5 + 30 * DAY), 5 + STRANGER_TTL);
        assert_eq!(stranger_expires_at(5, 5 + DAY), 5 + DAY);
        assert_eq!(stranger_expires_at(Millis::MAX, Millis::MAX), Millis::MAX);
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
