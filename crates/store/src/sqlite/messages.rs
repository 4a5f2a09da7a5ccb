//! Messages and their copies: storing a message under the delivery rules, reading a device's
//! queue, acknowledging, withdrawing and expiring.
//!
//! The rules of what may be stored (E1, full queues) are `tidings_core::delivery`'s; this module
//! reads what they decide on and writes what they decided. Every statement that stores or
//! deletes a copy notes it in the batch's queue counts, in what its sending account has
//! waiting (`writer::SenderCounts`) and in the strangers' copies (`writer::StrangerCopies`,
//! never written: no row says whose copy is a stranger's).

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tidings_core::delivery::{receipt_expires_at, AccountDevice, Usage};
use tidings_core::fallback::Withdrawal;
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use super::receipts;
use super::rows::{device_id, message_id, millis, sql_millis};
use super::writer::Notes;
use crate::{
    AccountId, AckKind, Acked, Admission, Admitted, Enqueued, ExpiredMessage, HeldAck, NewMessage,
    Pending, QueueCursor, QueueLimits, Result, DECISION_MARGIN,
};

/// The devices of an account as the delivery rules read them: whether each has published
/// identity keys, its queue length with the copies stored and deleted earlier in the batch, what
/// `sender` has waiting in it and its stranger pool's fill (both from the writer's counts, held in
/// memory) and its contact token hash.
pub(super) fn keyed_devices(
    conn: &Connection,
    notes: &Notes,
    account: AccountId,
    sender: AccountId,
) -> rusqlite::Result<Vec<AccountDevice>> {
    // Whether identity keys are published, as `identity_of` reads them, without reading them.
    let mut statement = conn.prepare_cached(
        "SELECT id, length(identity_key) = 32 AND length(signing_key) = 32, queue_len,
                contact_token_hash
         FROM devices WHERE account_id = ?1",
    )?;
    let rows = statement
        .query_map(params![account.0], |row| {
            let id = device_id(row.get(0)?)?;
            let queued = row.get::<_, i64>(2)? + notes.queued.pending(id);
            Ok(AccountDevice {
                id,
                keyed: row.get::<_, Option<bool>>(1)?.unwrap_or(false),
                queued: u64::try_from(queued).unwrap_or(0),
                from_sender: notes.senders.on_device(sender, id),
                strangers: notes.strangers.on_device(id),
                contact_token_hash: row
                    .get::<_, Option<Vec<u8>>>(3)?
                    .and_then(|hash| <[u8; 32]>::try_from(hash).ok()),
            })
        })?
        .collect();
    rows
}

/// The devices of an account as a screen reads them ([`Store::screen`](crate::Store::screen)),
/// on a read connection: whether
/// each has published identity keys and its contact token hash. Queues are not looked at (the
/// writer's counts are its own), so they read as empty.
pub(super) fn screened_devices(
    conn: &Connection,
    account: AccountId,
) -> rusqlite::Result<Vec<AccountDevice>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, length(identity_key) = 32 AND length(signing_key) = 32, contact_token_hash
         FROM devices WHERE account_id = ?1",
    )?;
    let rows = statement
        .query_map(params![account.0], |row| {
            Ok(AccountDevice {
                id: device_id(row.get(0)?)?,
                keyed: row.get::<_, Option<bool>>(1)?.unwrap_or(false),
                queued: 0,
                from_sender: Usage::default(),
                strangers: 0,
                contact_token_hash: row
                    .get::<_, Option<Vec<u8>>>(2)?
                    .and_then(|hash| <[u8; 32]>::try_from(hash).ok()),
            })
        })?
        .collect();
    rows
}

/// [`Store::enqueue`](crate::Store::enqueue): applies the delivery rules to the devices it reads
/// and stores what they decided.
pub(super) fn enqueue(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    message: NewMessage,
    limits: QueueLimits,
) -> Result<Enqueued> {
    // Stored already, or decided withdrawn (a resend never brings back what was withdrawn).
    let duplicate = txn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM single_copies WHERE sender_device = ?1 AND msg_id = ?2)
                 OR EXISTS (SELECT 1 FROM messages WHERE sender_device = ?1 AND msg_id = ?2)
                 OR EXISTS (SELECT 1 FROM withdrawn
                            WHERE sender_device = ?1 AND msg_id = ?2 AND delivered = 0)",
        )?
        .query_row(
            params![message.sender_device.as_bytes(), message.id.as_bytes()],
            |row| row.get::<_, bool>(0),
        )?;
    if duplicate {
        return Ok(Enqueued::Duplicate);
    }
    let sender = message.sender_account;
    let receiver = keyed_devices(txn, notes, message.receiver, sender)?;
    let own = if sender == message.receiver {
        Vec::new()
    } else {
        keyed_devices(txn, notes, sender, sender)?
    };
    // Checked inside the transaction that stores the copies, so a device linked or
    // removed at the same moment cannot slip between the check and the write.
    let sender_bytes = notes.senders.bytes_of(sender);
    let Admitted {
        addressees,
        skipped,
        stranger,
        expires_at,
    } = match message.admit(&receiver, &own, sender_bytes, limits)? {
        Admission::Admitted(admitted) => admitted,
        Admission::Refused(answer) => return Ok(answer),
    };
    for device in &skipped {
        txn.prepare_cached("UPDATE devices SET missed = missed + 1 WHERE id = ?1")?
            .execute(params![device.as_bytes()])?;
    }
    // A decided copy is stored nowhere.
    let stored: Vec<&(DeviceId, Bytes)> = message
        .copies
        .iter()
        .filter(|(device, _)| !skipped.contains(device) && !message.decided.contains(device))
        .collect();
    if stored.is_empty() {
        return Ok(Admission::stored(skipped, message.expires_at, expires_at));
    }
    let seq = notes.take_seq();
    match stored[..] {
        // One copy, to the receiver: one row (see `single_copies` in the schema). Its message
        // may have had other receiver copies, decided already: the `DELIVERED` record says so.
        [(device, payload)] if addressees.to_receiver(*device) => {
            txn.prepare_cached(
                "INSERT INTO single_copies
                     (device_id, seq, sender_device, msg_id, sender_account, sent_at, expires_at, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                device.as_bytes(),
                seq,
                message.sender_device.as_bytes(),
                message.id.as_bytes(),
                sender.0,
                sql_millis(message.sent_at),
                sql_millis(expires_at),
                &payload[..],
            ])?;
        }
        _ => {
            txn.prepare_cached(
                "INSERT INTO messages (seq, sender_device, msg_id, receiver_account, sent_at, expires_at, payload, sender_account)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, x'', ?7)")?.execute(
                params![
                    seq,
                    message.sender_device.as_bytes(),
                    message.id.as_bytes(),
                    message.receiver.0,
                    sql_millis(message.sent_at),
                    sql_millis(expires_at),
                    sender.0,
                ],
            )?;
            let mut insert = txn.prepare_cached(
                "INSERT INTO copies (device_id, seq, payload, to_receiver) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (device, payload) in &stored {
                let to_receiver = addressees.to_receiver(*device);
                insert.execute(params![device.as_bytes(), seq, &payload[..], to_receiver])?;
            }
        }
    }
    for (device, payload) in stored {
        let to_receiver = addressees.to_receiver(*device);
        // Only the receiver's copies of a stranger's message count in a stranger pool.
        if stranger && to_receiver {
            notes.strangers.stored(*device, seq);
        }
        notes.queued.add(*device, 1);
        notes
            .senders
            .note(sender, *device, payload_len(payload.len()), 1);
    }
    notes.messages.push((message.sender_device, message.id));
    Ok(Admission::stored(skipped, message.expires_at, expires_at))
}

/// [`Store::pending`](crate::Store::pending).
pub(super) fn pending(
    conn: &Connection,
    device: DeviceId,
    after: QueueCursor,
    limit: usize,
    now: Millis,
) -> Result<Vec<Pending>> {
    // Both tables' copies in one order; each branch stops at the limit by itself.
    let mut statement = conn.prepare_cached(
        "SELECT * FROM (
             SELECT m.seq, m.sender_device, m.msg_id, m.sent_at, COALESCE(c.payload, m.payload)
             FROM copies c JOIN messages m ON m.seq = c.seq
             WHERE c.device_id = ?1 AND c.seq > ?2 AND m.expires_at > ?3 AND c.discarded = 0
             ORDER BY c.seq LIMIT ?4)
         UNION ALL
         SELECT * FROM (
             SELECT seq, sender_device, msg_id, sent_at, payload FROM single_copies
             WHERE device_id = ?1 AND seq > ?2 AND expires_at > ?3 AND discarded = 0
             ORDER BY seq LIMIT ?4)
         ORDER BY 1 LIMIT ?4",
    )?;
    let rows = statement
        .query_map(
            params![
                device.as_bytes(),
                after.position(),
                sql_millis(now),
                i64::try_from(limit).unwrap_or(i64::MAX)
            ],
            |row| {
                Ok(Pending {
                    cursor: QueueCursor::at(row.get(0)?),
                    sender_device: device_id(row.get(1)?)?,
                    id: message_id(row.get(2)?)?,
                    sent_at: millis(row.get(3)?),
                    payload: Bytes::from(row.get::<_, Vec<u8>>(4)?),
                })
            },
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// [`Store::holds_copy_from`](crate::Store::holds_copy_from): the sender's messages by their
/// unique index, each copy by its key.
pub(super) fn holds_copy_from(
    conn: &Connection,
    device: DeviceId,
    sender_device: DeviceId,
) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM single_copies
             WHERE sender_device = ?2 AND device_id = ?1 AND discarded = 0
             UNION ALL
             SELECT 1 FROM messages m JOIN copies c ON c.seq = m.seq
             WHERE m.sender_device = ?2 AND c.device_id = ?1 AND c.discarded = 0 LIMIT 1",
        )?
        .exists(params![device.as_bytes(), sender_device.as_bytes()])?)
}

/// [`Store::withdraw_held`](crate::Store::withdraw_held) (and so
/// [`Store::withdraw`](crate::Store::withdraw)): decided against the message's decision record.
pub(super) fn withdraw(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    sender_device: DeviceId,
    id: MessageId,
    held_until: Option<Millis>,
) -> Result<Withdrawal> {
    let record = record(txn, sender_device, id)?;
    // A copy shown (stored or held) decided it first.
    if record == Some(true) {
        return Ok(Withdrawal::Delivered);
    }
    // A single copy is to the receiver and undelivered while its row is there (but for the
    // record read above: a held copy of the same message may have been shown).
    let single = delete_single_copies(
        txn,
        notes,
        "sender_device = ?1 AND msg_id = ?2",
        params![sender_device.as_bytes(), id.as_bytes()],
    )?;
    if let Some(expires_at) = single.first().map(|copy| copy.expires_at) {
        decide(txn, sender_device, id, expires_at, false)?;
        return Ok(Withdrawal::Withdrawn);
    }
    let message = txn
        .prepare_cached(
            "SELECT seq, delivered, expires_at FROM messages WHERE sender_device = ?1 AND msg_id = ?2")?.query_row(
            params![sender_device.as_bytes(), id.as_bytes()],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)? != 0, row.get::<_, i64>(2)?)),
        )
        .optional()?;
    match message {
        Some((_, true, _)) => Ok(Withdrawal::Delivered),
        Some((seq, false, expires_at)) => {
            // The receiver's copies go; the sender's own other devices keep theirs (the
            // message was sent, as SMS). The record names only the sending device and the id,
            // never the receiver, and lives until the TTL would have ended and the margin: an
            // acknowledgement racing the withdraw is told not to show it.
            delete_copies(txn, notes, "seq = ?1 AND to_receiver = 1", params![seq])?;
            delete_if_no_copies(txn, seq)?;
            decide(txn, sender_device, id, expires_at, false)?;
            Ok(Withdrawal::Withdrawn)
        }
        None => {
            let delivered = txn
                .prepare_cached(
                    "SELECT 1 FROM receipts WHERE device_id = ?1 AND msg_id = ?2 AND kind = ?3",
                )?
                .query_row(
                    params![
                        sender_device.as_bytes(),
                        id.as_bytes(),
                        ReceiptKind::Delivered as i64
                    ],
                    |_| Ok(()),
                )
                .optional()?
                .is_some();
            Ok(match record {
                _ if delivered => Withdrawal::Delivered,
                Some(true) => Withdrawal::Delivered,
                Some(false) => Withdrawal::Withdrawn,
                None => match held_until {
                    // Nothing stored, nothing decided, and copies held: decided withdrawn.
                    Some(until) => {
                        decide(txn, sender_device, id, sql_millis(until), false)?;
                        Withdrawal::Withdrawn
                    }
                    None => Withdrawal::Unknown,
                },
            })
        }
    }
}

/// Writes a message's decision record (replacing one), kept until `expires_at` (the message's
/// TTL, as stored) plus [`DECISION_MARGIN`]: `delivered` (a receiver device showed a copy), or
/// withdrawn. It names the sending device and the id, never a receiver device.
fn decide(
    txn: &Transaction<'_>,
    sender_device: DeviceId,
    id: MessageId,
    expires_at: i64,
    delivered: bool,
) -> Result<()> {
    let ends = expires_at.saturating_add(sql_millis(DECISION_MARGIN));
    txn.prepare_cached(
        "INSERT OR REPLACE INTO withdrawn (sender_device, msg_id, expires_at, delivered) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![sender_device.as_bytes(), id.as_bytes(), ends, delivered])?;
    Ok(())
}

/// A message's decision record, if it has one: whether it was decided delivered (else
/// withdrawn).
fn record(conn: &Connection, sender_device: DeviceId, id: MessageId) -> Result<Option<bool>> {
    Ok(conn
        .prepare_cached("SELECT delivered FROM withdrawn WHERE sender_device = ?1 AND msg_id = ?2")?
        .query_row(params![sender_device.as_bytes(), id.as_bytes()], |row| {
            row.get::<_, bool>(0)
        })
        .optional()?)
}

/// Writes the `DELIVERED` record of a message a receiver device showed a stored copy of, unless
/// it has a record; true if it had one (it was decided before: no second receipt).
fn decide_delivered(
    txn: &Transaction<'_>,
    sender_device: DeviceId,
    id: MessageId,
    expires_at: i64,
) -> Result<bool> {
    let decided = record(txn, sender_device, id)?.is_some();
    if !decided {
        decide(txn, sender_device, id, expires_at, true)?;
    }
    Ok(decided)
}

/// [`Store::ack_held`](crate::Store::ack_held), for [`AckKind::Shown`] or
/// [`AckKind::ShownWithoutReceipt`] (checked by the caller before the write: like an
/// acknowledgement of a stored copy, it runs without a savepoint of its own).
pub(super) fn ack_held(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    copy: HeldAck,
    kind: AckKind,
) -> Result<Acked> {
    let HeldAck {
        sender_device, id, ..
    } = copy;
    Ok(match record(txn, sender_device, id)? {
        Some(false) => Acked::Withdrawn,
        Some(true) => Acked::Confirmed { first: false },
        None => {
            decide(txn, sender_device, id, sql_millis(copy.expires_at), true)?;
            let shown = kind == AckKind::Shown;
            if shown {
                let ends = receipt_expires_at(copy.sent_at, copy.expires_at);
                receipts::store_receipt(
                    txn,
                    notes,
                    sender_device,
                    id,
                    ReceiptKind::Delivered,
                    ends,
                )?;
            }
            Acked::Confirmed { first: shown }
        }
    })
}

/// Whether any message's TTL, or decision record's time, has ended at `now` (most sweeps find
/// none, and then write nothing; receipts are looked at in memory,
/// [`ReceiptDeadlines`](super::receipts::ReceiptDeadlines)).
pub(super) fn any_expired(conn: &Connection, now: Millis) -> Result<bool> {
    Ok(conn
        .prepare_cached(
            "SELECT 1 FROM single_copies WHERE expires_at <= ?1
             UNION ALL SELECT 1 FROM messages WHERE expires_at <= ?1
             UNION ALL SELECT 1 FROM withdrawn WHERE expires_at <= ?1 LIMIT 1",
        )?
        .query_row(params![sql_millis(now)], |_| Ok(()))
        .optional()?
        .is_some())
}

/// [`Store::expire`](crate::Store::expire); receipts are swept too when `receipts_ended` (the
/// earliest receipt deadline has passed).
pub(super) fn expire(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    now: Millis,
    limit: usize,
    receipts_ended: bool,
) -> Result<Vec<ExpiredMessage>> {
    // The `limit` oldest deadlines across both tables, ties in the order stored (`seq` is one
    // count over both): the last of them bounds what each table gives up.
    let (cut_expiry, cut_seq) = txn
        .prepare_cached(
            "SELECT expires_at, seq FROM (
                 SELECT expires_at, seq FROM messages WHERE expires_at <= ?1
                 UNION ALL SELECT expires_at, seq FROM single_copies WHERE expires_at <= ?1)
             ORDER BY expires_at, seq LIMIT 1 OFFSET ?2",
        )?
        .query_row(
            params![
                sql_millis(now),
                i64::try_from(limit.saturating_sub(1)).unwrap_or(i64::MAX)
            ],
            |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)?)),
        )
        .optional()?
        .unwrap_or((sql_millis(now), i64::MAX));
    let expired = {
        // A message decided delivered (a copy shown, stored or held) has no `Expired` receipt.
        let mut statement = txn.prepare_cached(
            "SELECT seq, sender_device, msg_id,
                    delivered OR EXISTS (SELECT 1 FROM withdrawn w
                        WHERE w.sender_device = messages.sender_device
                          AND w.msg_id = messages.msg_id AND w.delivered = 1),
                    sent_at, expires_at
             FROM messages WHERE expires_at <= ?1 AND (expires_at, seq) <= (?2, ?3)",
        )?;
        let expired = statement
            .query_map(params![sql_millis(now), cut_expiry, cut_seq], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    device_id(row.get(1)?)?,
                    message_id(row.get(2)?)?,
                    row.get::<_, i64>(3)? != 0,
                    receipt_expires_at(
                        millis(row.get::<_, i64>(4)?),
                        millis(row.get::<_, i64>(5)?),
                    ),
                    row.get::<_, i64>(5)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        expired
    };
    // Receipts whose sending device did not come for them in time.
    if receipts_ended {
        receipts::expire_receipts(txn, notes, now)?;
    }
    let mut receipts = Vec::new();
    let single = delete_single_copies(
        txn,
        notes,
        "(device_id, seq) IN (SELECT device_id, seq FROM single_copies
             WHERE expires_at <= ?1 AND (expires_at, seq) <= (?2, ?3))",
        params![sql_millis(now), cut_expiry, cut_seq],
    )?;
    for copy in single {
        if record(txn, copy.sender_device, copy.id)? == Some(true) {
            continue;
        }
        let ends = receipt_expires_at(copy.sent_at, millis(copy.expires_at));
        if receipts::store_receipt(
            txn,
            notes,
            copy.sender_device,
            copy.id,
            ReceiptKind::Expired,
            ends,
        )? {
            receipts.push((
                copy.expires_at,
                copy.seq,
                ExpiredMessage {
                    sender_device: copy.sender_device,
                    id: copy.id,
                },
            ));
        }
    }
    for (seq, sender_device, id, delivered, receipt_ends, expires_at) in expired {
        delete_copies(txn, notes, "seq = ?1", params![seq])?;
        txn.prepare_cached("DELETE FROM messages WHERE seq = ?1")?
            .execute(params![seq])?;
        if !delivered {
            let stored = receipts::store_receipt(
                txn,
                notes,
                sender_device,
                id,
                ReceiptKind::Expired,
                receipt_ends,
            )?;
            if stored {
                receipts.push((expires_at, seq, ExpiredMessage { sender_device, id }));
            }
        }
    }
    // Decision records last: an expired message's record still said whether it was delivered.
    txn.prepare_cached("DELETE FROM withdrawn WHERE expires_at <= ?1")?
        .execute(params![sql_millis(now)])?;
    // The oldest deadlines first, ties in the order stored, across both tables.
    receipts.sort_unstable_by_key(|(expires_at, seq, _)| (*expires_at, *seq));
    Ok(receipts
        .into_iter()
        .map(|(_, _, expired)| expired)
        .collect())
}

/// Settles a device's copy on its acknowledgement, as `kind` says: a copy shown is deleted, and
/// a receiver device's copy shown decides the message delivered (its `DELIVERED` record, unless
/// it has a record) with, on the message's first such acknowledgement and for
/// [`AckKind::Shown`], the sender's `Delivered` receipt; a copy discarded is only marked so. An
/// acknowledgement of a copy no longer stored is answered from what is left. Every answer it
/// gives comes from what it reads; it fails only when the engine does, so it runs without a
/// savepoint of its own ([`Undo::Batch`](super::writer::Undo::Batch)).
pub(super) fn ack_in(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    device: DeviceId,
    sender_device: DeviceId,
    id: MessageId,
    kind: AckKind,
) -> Result<Acked> {
    // No copy for this device: a replay (its device never heard the answer), a copy set aside,
    // or a message its sender withdrew (then the device must be told not to show it). A copy
    // set aside is known only as withdrawn; `elsewhere`: the message is still stored.
    let gone = |txn: &Transaction<'_>, set_aside: bool, elsewhere: bool| -> Result<Acked> {
        Ok(match record(txn, sender_device, id)? {
            Some(false) => Acked::Withdrawn,
            _ if set_aside => Acked::Unknown,
            Some(true) => Acked::Confirmed { first: false },
            None if elsewhere => Acked::Confirmed { first: false },
            None => Acked::Unknown,
        })
    };
    // A single copy first (nearly every message): found by the message's id, deleted by its key.
    // (A deletion by the id with `RETURNING` cost SQLite an ephemeral table and a statement
    // journal: more than the two statements.)
    let single = txn
        .prepare_cached(
            "SELECT device_id = ?3, discarded, seq, sent_at, expires_at, sender_account,
                    length(payload)
             FROM single_copies WHERE sender_device = ?1 AND msg_id = ?2",
        )?
        .query_row(
            params![sender_device.as_bytes(), id.as_bytes(), device.as_bytes()],
            |row| {
                Ok((
                    row.get::<_, bool>(0)?,
                    row.get::<_, bool>(1)?,
                    row.get::<_, i64>(2)?,
                    millis(row.get(3)?),
                    row.get::<_, i64>(4)?,
                    row.get::<_, Option<i64>>(5)?,
                    row.get::<_, i64>(6)?,
                ))
            },
        )
        .optional()?;
    if let Some((mine, discarded, seq, sent_at, expires_at, sender, bytes)) = single {
        // The message is in no other row: a copy that is not this device's is another device's.
        if !mine {
            return gone(txn, false, true);
        }
        if discarded {
            return gone(txn, true, true);
        }
        let key = params![device.as_bytes(), seq];
        if kind == AckKind::Discarded {
            txn.prepare_cached(
                "UPDATE single_copies SET discarded = 1 WHERE device_id = ?1 AND seq = ?2",
            )?
            .execute(key)?;
            return Ok(Acked::Confirmed { first: false });
        }
        txn.prepare_cached("DELETE FROM single_copies WHERE device_id = ?1 AND seq = ?2")?
            .execute(key)?;
        notes.queued.add(device, -1);
        note_deleted_copy(notes, device, seq, sender, bytes);
        // A single copy is the receiver's; another copy of its message may have been decided
        // (held and shown) before it was stored.
        let decided = decide_delivered(txn, sender_device, id, expires_at)?;
        if decided || kind == AckKind::ShownWithoutReceipt {
            return Ok(Acked::Confirmed { first: false });
        }
        let receipt_ends = receipt_expires_at(sent_at, millis(expires_at));
        receipts::store_receipt(
            txn,
            notes,
            sender_device,
            id,
            ReceiptKind::Delivered,
            receipt_ends,
        )?;
        return Ok(Acked::Confirmed { first: true });
    }
    // Otherwise the message has several copies, or is gone.
    let message = txn
        .prepare_cached(
            "SELECT seq, delivered, sent_at, expires_at, sender_account FROM messages WHERE sender_device = ?1 AND msg_id = ?2",
        )?
        .query_row(params![sender_device.as_bytes(), id.as_bytes()], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)? != 0,
                receipt_expires_at(millis(row.get(2)?), millis(row.get(3)?)),
                row.get::<_, Option<i64>>(4)?.map(AccountId),
                row.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    let Some((seq, delivered, receipt_ends, sender, expires_at)) = message else {
        return gone(txn, false, false);
    };
    // The message is stored, but not this device's copy (set aside, or none).
    let gone_here = |txn: &Transaction<'_>| -> Result<Acked> {
        let set_aside = txn
            .prepare_cached(
                "SELECT 1 FROM copies WHERE device_id = ?1 AND seq = ?2 AND discarded = 1",
            )?
            .exists(params![device.as_bytes(), seq])?;
        gone(txn, set_aside, true)
    };
    if kind == AckKind::Discarded {
        let set_aside = txn
            .prepare_cached(
                "UPDATE copies SET discarded = 1 WHERE device_id = ?1 AND seq = ?2 AND discarded = 0",
            )?
            .execute(params![device.as_bytes(), seq])?;
        return if set_aside > 0 {
            Ok(Acked::Confirmed { first: false })
        } else {
            gone_here(txn)
        };
    }
    let deleted = txn
        .prepare_cached(
            "DELETE FROM copies WHERE device_id = ?1 AND seq = ?2 AND discarded = 0
             RETURNING to_receiver, IFNULL(length(payload), 0)",
        )?
        .query_row(params![device.as_bytes(), seq], |row| {
            Ok((row.get::<_, bool>(0)?, row.get::<_, i64>(1)?))
        })
        .optional()?;
    let Some((to_receiver, bytes)) = deleted else {
        return gone_here(txn);
    };
    notes.queued.add(device, -1);
    note_deleted_copy(notes, device, seq, sender.map(|s| s.0), bytes);
    // The last copy takes the message with it.
    let message_gone = delete_if_no_copies(txn, seq)?;
    // The sender's own other devices taking their copies is not a delivery.
    if !to_receiver {
        return Ok(Acked::Confirmed { first: false });
    }
    // A message still held is marked delivered, so that a withdraw racing the other
    // devices' acknowledgements answers DELIVERED.
    if !message_gone && !delivered {
        txn.prepare_cached("UPDATE messages SET delivered = 1 WHERE seq = ?1")?
            .execute(params![seq])?;
    }
    let decided = decide_delivered(txn, sender_device, id, expires_at)?;
    if delivered || decided || kind == AckKind::ShownWithoutReceipt {
        return Ok(Acked::Confirmed { first: false });
    }
    receipts::store_receipt(
        txn,
        notes,
        sender_device,
        id,
        ReceiptKind::Delivered,
        receipt_ends,
    )?;
    Ok(Acked::Confirmed { first: true })
}

/// Deletes the copies `condition` selects (an SQL condition on `copies`, with `params`) and
/// counts them off their devices' queues. Runs before a deletion of messages, which must not
/// leave their copies behind (see [`SCHEMA`](super::schema::SCHEMA)).
pub(super) fn delete_copies(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    condition: &'static str,
    params: impl rusqlite::Params,
) -> Result<()> {
    let mut statement = txn.prepare_cached(&format!(
        "DELETE FROM copies WHERE {condition} RETURNING device_id, seq, {COPY_SENDER_AND_BYTES}"
    ))?;
    let mut rows = statement.query(params)?;
    while let Some(row) = rows.next()? {
        let device = device_id(row.get(0)?)?;
        notes.queued.add(device, -1);
        note_deleted_copy(notes, device, row.get(1)?, row.get(2)?, row.get(3)?);
    }
    Ok(())
}

/// A single copy (a row of `single_copies`) deleted by [`delete_single_copies`].
pub(super) struct DeletedSingle {
    pub(super) sender_device: DeviceId,
    pub(super) id: MessageId,
    pub(super) sent_at: Millis,
    /// As stored (the decision record of a withdrawn message is kept from it).
    pub(super) expires_at: i64,
    /// Its place in its device's queue (one count over both tables).
    pub(super) seq: i64,
}

/// Deletes the single copies `condition` selects (an SQL condition on `single_copies`, with
/// `params`), each a whole message, and counts them off their devices' queues as
/// [`delete_copies`] does.
pub(super) fn delete_single_copies(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    condition: &'static str,
    params: impl rusqlite::Params,
) -> Result<Vec<DeletedSingle>> {
    let mut statement = txn.prepare_cached(&format!(
        "DELETE FROM single_copies WHERE {condition} RETURNING device_id, seq, sender_account,
             length(payload), sender_device, msg_id, sent_at, expires_at"
    ))?;
    let mut rows = statement.query(params)?;
    let mut deleted = Vec::new();
    while let Some(row) = rows.next()? {
        let device = device_id(row.get(0)?)?;
        notes.queued.add(device, -1);
        note_deleted_copy(notes, device, row.get(1)?, row.get(2)?, row.get(3)?);
        deleted.push(DeletedSingle {
            sender_device: device_id(row.get(4)?)?,
            id: message_id(row.get(5)?)?,
            sent_at: millis(row.get(6)?),
            expires_at: row.get(7)?,
            seq: row.get(1)?,
        });
    }
    Ok(deleted)
}

/// The columns a deletion of copies returns for [`note_deleted_copy`]: the sending account of
/// the copy's message (read before the message goes) and the copy's size.
pub(super) const COPY_SENDER_AND_BYTES: &str =
    "(SELECT sender_account FROM messages WHERE seq = copies.seq), IFNULL(length(payload), 0)";

/// Counts a deleted copy (of the message `seq`) off what its sending account has waiting (a
/// message stored before the sending account was recorded counts for none) and off its device's
/// stranger pool, if it was a stranger's.
pub(super) fn note_deleted_copy(
    notes: &mut Notes,
    device: DeviceId,
    seq: i64,
    sender: Option<i64>,
    bytes: i64,
) {
    notes.strangers.deleted(device, seq);
    if let Some(sender) = sender {
        notes.senders.note(AccountId(sender), device, bytes, -1);
    }
}

/// A payload's length as the counts keep it.
fn payload_len(length: usize) -> i64 {
    i64::try_from(length).unwrap_or(i64::MAX)
}

/// Deletes a message once no copy of it is left; true if it did.
pub(super) fn delete_if_no_copies(txn: &Transaction<'_>, seq: i64) -> Result<bool> {
    let deleted = txn
        .prepare_cached(
            "DELETE FROM messages WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM copies WHERE seq = ?1)",
        )?
        .execute(params![seq])?;
    Ok(deleted > 0)
}
