//! The [`Store`] contract on PostgreSQL: each write one transaction, committed before it is
//! answered; each read one statement or one transaction. Which locks each write takes is said
//! in the module documentation of `postgres`.

use bytes::Bytes;
use tidings_core::delivery::{receipt_expires_at, AccountDevice, QueueLimits, Usage};
use tidings_core::failpoint::failpoint;
use tidings_core::fallback::Withdrawal;
use tidings_core::verification::{CodePolicy, CodeRecord, LiveCode};
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use super::rows::{self, count, millis, sql_millis};
use super::{Pooled, PostgresStore, Sql, Txn};
use crate::{
    AccountDevices, AccountId, AckKind, Acked, Actor, Admission, Admitted, Backlog, Claimed,
    ClaimedKey, Completion, Device, Enqueued, ExpiredMessage, HeldAck, IdentityKeys, KeyStatus,
    Linked, ListedDevice, NewMessage, Pending, PendingReceipt, Pseudonym, Published, QueueCursor,
    Registered, Rekeyed, Result, Route, SignedKey, Store, StoreError, Voucher, DECISION_MARGIN,
};

// The queue limits count a copy's bytes as sent: `queue_usage` (schema version 3) subtracts what
// sealing adds (49).
const _: () = assert!(super::seal::SEAL_OVERHEAD == 49);

/// Receipts one call of [`Store::receipts`] hands out at most (as the other engines do).
const RECEIPTS_PER_READ: i64 = 1000;

/// Locks an account's row for a change of its devices; false if the account is gone.
async fn lock_account<C: Sql>(db: &C, account: AccountId) -> Result<bool> {
    let row = db
        .query_opt(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account.0],
        )
        .await?;
    Ok(row.is_some())
}

/// Locks the account's row and refuses an actor that is no longer one of its devices.
async fn lock_actor<C: Sql>(db: &C, actor: Actor) -> Result<()> {
    lock_account(db, actor.account).await?;
    check_actor(db, actor).await
}

async fn check_actor<C: Sql>(db: &C, actor: Actor) -> Result<()> {
    let row = db
        .query_opt(
            "SELECT 1 FROM devices WHERE id = $1 AND account_id = $2",
            &[&actor.device.as_bytes(), &actor.account.0],
        )
        .await?;
    match row {
        Some(_) => Ok(()),
        None => Err(StoreError::Revoked),
    }
}

/// Locks the row of the account a device belongs to; its id, or `None` if the device is gone.
async fn lock_account_of<C: Sql>(db: &C, device: DeviceId) -> Result<Option<AccountId>> {
    loop {
        let Some(row) = db
            .query_opt(
                "SELECT account_id FROM devices WHERE id = $1",
                &[&device.as_bytes()],
            )
            .await?
        else {
            return Ok(None);
        };
        let account = AccountId(row.try_get(0)?);
        lock_account(db, account).await?;
        // The device may have moved or gone while the lock was awaited: read it again under it.
        let again = db
            .query_opt(
                "SELECT account_id FROM devices WHERE id = $1",
                &[&device.as_bytes()],
            )
            .await?;
        match again {
            None => return Ok(None),
            Some(row) if row.try_get::<_, i64>(0)? == account.0 => return Ok(Some(account)),
            Some(_) => continue,
        }
    }
}

/// The account a pseudonym names: its pseudonym, or its previous one.
async fn account_of<C: Sql>(db: &C, pseudonym: Pseudonym) -> Result<Option<AccountId>> {
    let row = db
        .query_opt(
            "SELECT id FROM accounts WHERE pseudonym = $1 OR previous_pseudonym = $1",
            &[&&pseudonym.0[..]],
        )
        .await?;
    row.map(|row| Ok(AccountId(row.try_get(0)?))).transpose()
}

async fn devices_of<C: Sql>(db: &C, account: AccountId) -> Result<Vec<DeviceId>> {
    let rows = db
        .query(
            "SELECT id FROM devices WHERE account_id = $1 ORDER BY added",
            &[&account.0],
        )
        .await?;
    rows.iter().map(|row| rows::device_id(row, 0)).collect()
}

async fn device<C: Sql>(db: &C, id: DeviceId) -> Result<Option<Device>> {
    let row = db
        .query_opt(
            "SELECT d.account_id, a.pseudonym, d.public_key
             FROM devices d JOIN accounts a ON a.id = d.account_id WHERE d.id = $1",
            &[&id.as_bytes()],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Device {
        id,
        account: AccountId(row.try_get(0)?),
        pseudonym: Pseudonym(rows::array(&row, 1)?),
        public_key: rows::array(&row, 2)?,
    }))
}

async fn key_status<C: Sql>(db: &C, device: DeviceId) -> Result<KeyStatus> {
    let row = db
        .query_opt(
            "SELECT (SELECT count(*) FROM one_time_keys WHERE device_id = d.id),
                    d.identity_key IS NOT NULL AND d.fallback_key IS NOT NULL
             FROM devices d WHERE d.id = $1",
            &[&device.as_bytes()],
        )
        .await?;
    let Some(row) = row else {
        return Ok(KeyStatus::default());
    };
    Ok(KeyStatus {
        one_time_keys: u32::try_from(row.try_get::<_, i64>(0)?).unwrap_or(u32::MAX),
        published: row.try_get(1)?,
    })
}

async fn account_devices<C: Sql>(db: &C, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
    let Some(account) = account_of(db, pseudonym).await? else {
        return Ok(None);
    };
    let rows = db
        .query(
            "SELECT d.id, (SELECT count(*) FROM copies c WHERE c.device_id = d.id)
             FROM devices d WHERE d.account_id = $1 ORDER BY d.added",
            &[&account.0],
        )
        .await?;
    let devices = rows
        .iter()
        .map(|row| {
            let queued = u32::try_from(row.try_get::<_, i64>(1)?).unwrap_or(u32::MAX);
            Ok((rows::device_id(row, 0)?, queued))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(AccountDevices { account, devices }))
}

/// An account's devices as the delivery rules read them, with what `sender` has waiting in each
/// one's queue and how many strangers' copies (of the messages at `strangers`) each holds.
async fn delivery_devices<C: Sql>(
    db: &C,
    account: AccountId,
    sender: AccountId,
    strangers: &[i64],
) -> Result<Vec<AccountDevice>> {
    let rows = db
        .query(
            "SELECT d.id, d.identity_key IS NOT NULL, d.contact_token_hash,
                (SELECT coalesce(sum(u.copies), 0)::bigint FROM queue_usage u
                 WHERE u.device_id = d.id),
                coalesce(s.copies, 0), coalesce(s.bytes, 0),
                (SELECT count(*) FROM copies c
                 WHERE c.device_id = d.id AND c.to_receiver AND c.seq = ANY($3))
             FROM devices d
             LEFT JOIN queue_usage s ON s.device_id = d.id AND s.sender_account = $2
             WHERE d.account_id = $1 ORDER BY d.added",
            &[&account.0, &sender.0, &strangers],
        )
        .await?;
    rows.iter()
        .map(|row| {
            Ok(AccountDevice {
                id: rows::device_id(row, 0)?,
                keyed: row.try_get(1)?,
                contact_token_hash: rows::optional_array(row, 2)?,
                queued: count(row.try_get(3)?),
                from_sender: Usage {
                    copies: count(row.try_get(4)?),
                    bytes: count(row.try_get(5)?),
                },
                strangers: count(row.try_get(6)?),
            })
        })
        .collect()
}

/// Deletes a device with its copies (and each message left without a copy), its receipts and its
/// keys. The decision records of the messages it sent stay until they expire, as in the other
/// engines (they name no receiver); an account's deletion takes them with it.
async fn delete_device<C: Sql>(db: &C, device: DeviceId) -> Result<()> {
    // The messages first, then their copies, in the order an acknowledgement and a withdraw
    // take them: a removal racing them waits instead of deadlocking.
    db.execute(
        "SELECT 1 FROM messages m WHERE m.seq IN (SELECT seq FROM copies WHERE device_id = $1)
         ORDER BY m.seq FOR UPDATE",
        &[&device.as_bytes()],
    )
    .await?;
    db.execute(
        "WITH gone AS (DELETE FROM copies WHERE device_id = $1 RETURNING seq)
         DELETE FROM messages m USING gone
         WHERE m.seq = gone.seq
           AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.seq = m.seq AND c.device_id <> $1)",
        &[&device.as_bytes()],
    )
    .await?;
    // Receipts and keys go with the row (ON DELETE CASCADE).
    db.execute("DELETE FROM devices WHERE id = $1", &[&device.as_bytes()])
        .await?;
    Ok(())
}

/// Stores (or replaces) a receipt for a sending device if it still exists; true if it did.
async fn store_receipt<C: Sql>(
    db: &C,
    device: DeviceId,
    id: MessageId,
    kind: ReceiptKind,
    expires_at: Millis,
) -> Result<bool> {
    let stored = db
        .execute(
            "INSERT INTO receipts (device_id, msg_id, kind, expires_at)
             SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = $1)
             ON CONFLICT (device_id, msg_id)
             DO UPDATE SET kind = EXCLUDED.kind, expires_at = EXCLUDED.expires_at",
            &[
                &device.as_bytes(),
                &id.as_bytes(),
                &(kind as i16),
                &sql_millis(expires_at),
            ],
        )
        .await?;
    Ok(stored > 0)
}

/// Writes a message's decision record (`delivered`, else withdrawn), kept until `ends`, unless it
/// has one: `None` when this wrote it, else what the record it found says (true: delivered).
///
/// Decided by one conditional write on the record's row: of two transactions deciding one
/// message at once (a held copy's acknowledgement and a withdraw, on two connections or two
/// nodes), the insert of one waits for the other to end and then finds its record, which the
/// next statement reads (each statement reads what has committed before it).
async fn decide<C: Sql>(
    db: &C,
    sender_device: DeviceId,
    id: MessageId,
    ends: Millis,
    delivered: bool,
) -> Result<Option<bool>> {
    // A record found here and deleted before it is read (its time was up) is written again.
    for _ in 0..3 {
        let written = db
            .query_opt(
                "INSERT INTO withdrawn (sender_device, msg_id, expires_at, delivered)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (sender_device, msg_id) DO NOTHING RETURNING delivered",
                &[
                    &sender_device.as_bytes(),
                    &id.as_bytes(),
                    &sql_millis(ends),
                    &delivered,
                ],
            )
            .await?;
        if written.is_some() {
            return Ok(None);
        }
        if let Some(found) = tombstone(db, sender_device, id).await? {
            return Ok(Some(found));
        }
    }
    Err(StoreError::engine(
        "a decision record kept changing under its write",
    ))
}

/// When the decision record of a message whose TTL ends at `expires_at` ends.
fn record_ends(expires_at: Millis) -> Millis {
    expires_at.saturating_add(DECISION_MARGIN)
}

/// Takes the transaction-scoped advisory lock on a message's id (its sending device and id),
/// which the writes that decide whether a message with nothing stored is stored or withdrawn
/// take first ([`Store::enqueue`] and [`Store::withdraw_held`]): a withdraw that finds nothing
/// stored waits for a send of the message that is under way, and a send for a withdraw's record.
/// Its two 32-bit keys are a space apart from the single 64-bit keys of code records and
/// migrations; two ids that hash alike only wait for each other.
async fn lock_message_id<C: Sql>(db: &C, sender_device: DeviceId, id: MessageId) -> Result<()> {
    // FNV-1a over the sending device and the id.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sender_device.as_bytes().iter().chain(id.as_bytes()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    let [a, b, c, d, e, f, g, h] = hash.to_le_bytes();
    let (high, low) = (
        i32::from_le_bytes([a, b, c, d]),
        i32::from_le_bytes([e, f, g, h]),
    );
    db.execute("SELECT pg_advisory_xact_lock($1, $2)", &[&high, &low])
        .await?;
    Ok(())
}

/// The decision record of a message: whether it was delivered (else withdrawn).
async fn tombstone<C: Sql>(db: &C, sender_device: DeviceId, id: MessageId) -> Result<Option<bool>> {
    let row = db
        .query_opt(
            "SELECT delivered FROM withdrawn WHERE sender_device = $1 AND msg_id = $2",
            &[&sender_device.as_bytes(), &id.as_bytes()],
        )
        .await?;
    row.map(|row| Ok(row.try_get(0)?)).transpose()
}

fn message_bytes(id: &MessageId) -> &[u8] {
    id.as_bytes()
}

impl PostgresStore {
    async fn enqueue_in(&self, message: NewMessage, limits: QueueLimits) -> Result<Enqueued> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let sender = message.sender_account;
        // The message's id first: a withdraw deciding it withdrawn waits for this, or this for it.
        lock_message_id(&txn, message.sender_device, message.id).await?;
        // The two accounts' rows, in id order: no device change of either slips in between the
        // check of the copies and their insert, and positions follow commit order per queue.
        let mut locked = vec![sender.0, message.receiver.0];
        locked.sort_unstable();
        locked.dedup();
        txn.execute(
            "SELECT 1 FROM accounts WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&locked],
        )
        .await?;
        // Stored already, or decided withdrawn (a resend never brings back over IP what went as
        // SMS); a message decided delivered may still store the copies that must wait.
        let duplicate: bool = txn
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE sender_device = $1 AND msg_id = $2)
                     OR EXISTS (SELECT 1 FROM withdrawn
                                WHERE sender_device = $1 AND msg_id = $2 AND NOT delivered)",
                &[
                    &message.sender_device.as_bytes(),
                    &message_bytes(&message.id),
                ],
            )
            .await?
            .try_get(0)?;
        if duplicate {
            return Ok(Enqueued::Duplicate);
        }
        let strangers = self.strangers()?.of(message.receiver.0);
        let receiver = delivery_devices(&txn, message.receiver, sender, &strangers).await?;
        let own = if sender == message.receiver {
            Vec::new()
        } else {
            let own_strangers = self.strangers()?.of(sender.0);
            delivery_devices(&txn, sender, sender, &own_strangers).await?
        };
        let sender_bytes = txn
            .query_one(
                "SELECT coalesce(sum(bytes), 0)::bigint FROM queue_usage WHERE sender_account = $1",
                &[&sender.0],
            )
            .await?;
        let sender_bytes = count(sender_bytes.try_get(0)?);
        let Admitted {
            addressees,
            skipped,
            stranger,
            expires_at,
        } = match message.admit(&receiver, &own, sender_bytes, limits)? {
            Admission::Admitted(admitted) => admitted,
            Admission::Refused(answer) => return Ok(answer),
        };
        let mut copies: Vec<(DeviceId, &Bytes, bool)> = Vec::new();
        for (device, payload) in &message.copies {
            // A decided copy is stored for no one.
            if skipped.contains(device) || message.decided.contains(device) {
                continue;
            }
            if copies.iter().any(|(d, _, _)| d == device) {
                return Err(StoreError::engine("two copies for one device"));
            }
            copies.push((*device, payload, addressees.to_receiver(*device)));
        }
        for device in &skipped {
            txn.execute(
                "UPDATE devices SET missed = missed + 1 WHERE id = $1",
                &[&device.as_bytes()],
            )
            .await?;
        }
        if copies.is_empty() {
            // Every copy decided or skipped: nothing waits, so no message is stored.
            commit(txn).await?;
            return Ok(Admission::stored(skipped, message.expires_at, expires_at));
        }
        let position: i64 = txn
            .query_one("SELECT nextval('queue_positions')", &[])
            .await?
            .try_get(0)?;
        txn.execute(
            "INSERT INTO messages
                 (seq, sender_device, msg_id, sender_account, receiver_account, sent_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &position,
                &message.sender_device.as_bytes(),
                &message_bytes(&message.id),
                &sender.0,
                &message.receiver.0,
                &sql_millis(message.sent_at),
                &sql_millis(expires_at),
            ],
        )
        .await?;
        let devices: Vec<&[u8]> = copies.iter().map(|(d, _, _)| d.as_bytes()).collect();
        // Sealed under the key of the hour the message expires in (`seal`): what PostgreSQL
        // keeps of a deleted copy cannot be read once that hour's key is forgotten.
        let sealed = copies
            .iter()
            .map(|(d, p, _)| self.chain.seal(expires_at, d.as_bytes(), p))
            .collect::<Result<Vec<_>>>()?;
        let payloads: Vec<&[u8]> = sealed.iter().map(Vec::as_slice).collect();
        let to_receiver: Vec<bool> = copies.iter().map(|(_, _, r)| *r).collect();
        txn.execute(
            "INSERT INTO copies (device_id, seq, to_receiver, payload, sender_account)
             SELECT d, $1, r, p, $5
             FROM unnest($2::bytea[], $3::boolean[], $4::bytea[]) AS u(d, r, p)",
            &[&position, &devices, &to_receiver, &payloads, &sender.0],
        )
        .await?;
        commit(txn).await?;
        if stranger {
            self.note_stranger(position, message.receiver.0)?;
        }
        Ok(Admission::stored(skipped, message.expires_at, expires_at))
    }

    async fn ack_in(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Acked> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        // The message's row lock decides between this and a withdraw.
        let message = txn
            .query_opt(
                "SELECT seq, sent_at, expires_at, delivered FROM messages
                 WHERE sender_device = $1 AND msg_id = $2 FOR UPDATE",
                &[&sender_device.as_bytes(), &id.as_bytes()],
            )
            .await?;
        let copy = match &message {
            None => None,
            Some(message) => {
                let position: i64 = message.try_get(0)?;
                txn.query_opt(
                    "SELECT to_receiver, discarded FROM copies WHERE device_id = $1 AND seq = $2",
                    &[&device.as_bytes(), &position],
                )
                .await?
            }
        };
        let discarded = match &copy {
            Some(copy) => copy.try_get::<_, bool>(1)?,
            None => false,
        };
        let (Some(message), Some(copy), false) = (&message, &copy, discarded) else {
            // No copy stored (acknowledged before, the answer lost; or withdrawn): answered
            // from what is left. A copy set aside is not shown: acknowledging it again tells
            // nothing but a withdraw.
            let answer = match tombstone(&txn, sender_device, id).await? {
                Some(false) => Acked::Withdrawn,
                _ if discarded => Acked::Unknown,
                Some(true) => Acked::Confirmed { first: false },
                None if message.is_some() => Acked::Confirmed { first: false },
                None => Acked::Unknown,
            };
            return Ok(answer);
        };
        let position: i64 = message.try_get(0)?;
        let sent_at = millis(message.try_get(1)?);
        let expires_at = millis(message.try_get(2)?);
        let delivered: bool = message.try_get(3)?;
        let to_receiver: bool = copy.try_get(0)?;
        if kind == AckKind::Discarded {
            // Kept as if never fetched: a withdraw and the TTL's end treat it as waiting.
            txn.execute(
                "UPDATE copies SET discarded = true WHERE device_id = $1 AND seq = $2",
                &[&device.as_bytes(), &position],
            )
            .await?;
            commit(txn).await?;
            return Ok(Acked::Confirmed { first: false });
        }
        // A receiver's copy shown decides the message delivered, unless it was decided before
        // (a held copy acknowledged, or another stored copy shown).
        let decided = if to_receiver {
            decide(&txn, sender_device, id, record_ends(expires_at), true).await?
        } else {
            None
        };
        txn.execute(
            "DELETE FROM copies WHERE device_id = $1 AND seq = $2",
            &[&device.as_bytes(), &position],
        )
        .await?;
        // The last copy takes the message with it.
        let emptied = txn
            .execute(
                "DELETE FROM messages m WHERE m.seq = $1
                 AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.seq = m.seq)",
                &[&position],
            )
            .await?
            > 0;
        if decided == Some(false) {
            // Decided withdrawn, though a receiver's copy was still stored (a withdraw takes
            // them with it): the device must not show it, and it is not kept for it.
            commit(txn).await?;
            if emptied {
                self.forget_strangers(&[position])?;
            }
            return Ok(Acked::Withdrawn);
        }
        if !emptied && to_receiver {
            txn.execute(
                "UPDATE messages SET delivered = true WHERE seq = $1",
                &[&position],
            )
            .await?;
        }
        let first = to_receiver && !delivered && decided.is_none() && kind == AckKind::Shown;
        // The sender's own other devices taking their copies is not a delivery.
        if first {
            let ends = receipt_expires_at(sent_at, expires_at);
            store_receipt(&txn, sender_device, id, ReceiptKind::Delivered, ends).await?;
        }
        commit(txn).await?;
        if emptied {
            self.forget_strangers(&[position])?;
        }
        Ok(Acked::Confirmed { first })
    }

    async fn ack_held_in(&self, copy: HeldAck, kind: AckKind) -> Result<Acked> {
        let shown = match kind {
            AckKind::Shown => true,
            AckKind::ShownWithoutReceipt => false,
            AckKind::Discarded => {
                return Err(StoreError::engine(
                    "a held copy to be discarded is stored first",
                ))
            }
        };
        let mut conn = self.pool.get().await?;
        let receipt_ends = receipt_expires_at(copy.sent_at, copy.expires_at);
        // The usual case, no record yet, as one statement: one round trip and one commit. The
        // record's insert decides as `decide` does (of two at once, one waits for the other and
        // then inserts nothing); the receipt is written only with the record.
        failpoint("store-transaction-before");
        failpoint("store-sync-before");
        let written = conn
            .client()
            .query_opt(
                "WITH decided AS (
                     INSERT INTO withdrawn (sender_device, msg_id, expires_at, delivered)
                     VALUES ($1, $2, $3, true)
                     ON CONFLICT (sender_device, msg_id) DO NOTHING RETURNING 1
                 ), receipt AS (
                     INSERT INTO receipts (device_id, msg_id, kind, expires_at)
                     SELECT $1, $2, $4, $5 FROM decided
                     WHERE $6 AND EXISTS (SELECT 1 FROM devices WHERE id = $1)
                     ON CONFLICT (device_id, msg_id)
                     DO UPDATE SET kind = EXCLUDED.kind, expires_at = EXCLUDED.expires_at
                 )
                 SELECT 1 FROM decided",
                &[
                    &copy.sender_device.as_bytes(),
                    &copy.id.as_bytes(),
                    &sql_millis(record_ends(copy.expires_at)),
                    &(ReceiptKind::Delivered as i16),
                    &sql_millis(receipt_ends),
                    &shown,
                ],
            )
            .await?;
        failpoint("store-sync-after");
        failpoint("store-transaction-after");
        if written.is_some() {
            return Ok(Acked::Confirmed { first: shown });
        }
        // A record exists: read what it says, as every other decision does.
        let txn = begin(conn.client()).await?;
        let answer = match decide(
            &txn,
            copy.sender_device,
            copy.id,
            record_ends(copy.expires_at),
            true,
        )
        .await?
        {
            Some(false) => Acked::Withdrawn,
            Some(true) => Acked::Confirmed { first: false },
            None => {
                if shown {
                    let ends = receipt_expires_at(copy.sent_at, copy.expires_at);
                    store_receipt(
                        &txn,
                        copy.sender_device,
                        copy.id,
                        ReceiptKind::Delivered,
                        ends,
                    )
                    .await?;
                }
                Acked::Confirmed { first: shown }
            }
        };
        commit(txn).await?;
        Ok(answer)
    }

    async fn screen_in(&self, message: &NewMessage) -> Result<bool> {
        let accounts = [message.receiver.0, message.sender_account.0];
        let mut conn = self.pool.get().await?;
        // One statement, no lock: the send's write or the held copy's acknowledgement decides.
        let rows = conn
            .client()
            .query(
                "SELECT d.account_id, d.id, d.identity_key IS NOT NULL, d.contact_token_hash
                 FROM devices d WHERE d.account_id = ANY($1) ORDER BY d.added",
                &[&&accounts[..]],
            )
            .await?;
        let mut receiver = Vec::new();
        let mut own = Vec::new();
        for row in &rows {
            let device = AccountDevice {
                id: rows::device_id(row, 1)?,
                keyed: row.try_get(2)?,
                contact_token_hash: rows::optional_array(row, 3)?,
                queued: 0,
                from_sender: Usage::default(),
                strangers: 0,
            };
            let account: i64 = row.try_get(0)?;
            if account == message.receiver.0 {
                receiver.push(device);
            } else {
                own.push(device);
            }
        }
        Ok(message.screens(&receiver, &own))
    }
}

impl Store for PostgresStore {
    async fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        let mut conn = self.pool.get().await?;
        device(conn.client(), id).await
    }

    async fn login_device(&self, id: DeviceId) -> Result<Option<(Device, KeyStatus)>> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let Some(found) = device(&txn, id).await? else {
            return Ok(None);
        };
        let status = key_status(&txn, id).await?;
        commit(txn).await?;
        Ok(Some((found, status)))
    }

    async fn account(&self, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let account = account_devices(&txn, pseudonym).await?;
        commit(txn).await?;
        Ok(account)
    }

    async fn route(&self, pseudonym: Pseudonym) -> Result<Option<Route>> {
        let mut conn = self.pool.get().await?;
        let rows = conn
            .client()
            .query(
                "SELECT a.id, d.id FROM accounts a LEFT JOIN devices d ON d.account_id = a.id
                 WHERE a.pseudonym = $1 OR a.previous_pseudonym = $1 ORDER BY d.added",
                &[&&pseudonym.0[..]],
            )
            .await?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let account = AccountId(first.try_get(0)?);
        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            if row.try_get::<_, Option<Vec<u8>>>(1)?.is_some() {
                devices.push(rows::device_id(row, 1)?);
            }
        }
        Ok(Some(Route { account, devices }))
    }

    async fn accounts(&self, pseudonyms: Vec<Pseudonym>) -> Result<Vec<Option<AccountDevices>>> {
        let mut conn = self.pool.get().await?;
        // One snapshot for the whole batch.
        let txn = conn.client().snapshot().await?;
        let mut answers = Vec::with_capacity(pseudonyms.len());
        for pseudonym in pseudonyms {
            answers.push(account_devices(&txn, pseudonym).await?);
        }
        commit(txn).await?;
        Ok(answers)
    }

    async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceId>> {
        let mut conn = self.pool.get().await?;
        devices_of(conn.client(), account).await
    }

    async fn register_device(
        &self,
        pseudonym: Pseudonym,
        key_version: u32,
        device: DeviceId,
        public_key: [u8; 32],
        now: Millis,
    ) -> Result<Registered> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let existing = match account_of(&txn, pseudonym).await? {
            Some(account) if lock_account(&txn, account).await? => Some(account),
            _ => None,
        };
        let other = txn
            .query_opt(
                "SELECT account_id FROM devices WHERE id = $1",
                &[&device.as_bytes()],
            )
            .await?;
        if let Some(other) = other {
            if Some(AccountId(other.try_get(0)?)) != existing {
                return Err(StoreError::engine("the device is another account's"));
            }
        }
        let account = match existing {
            Some(account) => account,
            None => {
                // A sequence never hands out a value twice, even after a rollback.
                let row = txn
                    .query_one(
                        "INSERT INTO accounts (id, pseudonym, key_version, created_at)
                         VALUES (nextval('account_ids'), $1, $2, $3) RETURNING id",
                        &[&&pseudonym.0[..], &i64::from(key_version), &sql_millis(now)],
                    )
                    .await?;
                AccountId(row.try_get(0)?)
            }
        };
        // Messages queued for the account go, with the copies the senders' other devices hold;
        // then the old devices with theirs.
        txn.execute(
            "DELETE FROM messages WHERE receiver_account = $1",
            &[&account.0],
        )
        .await?;
        let removed = devices_of(&txn, account).await?;
        for old in &removed {
            delete_device(&txn, *old).await?;
        }
        txn.execute(
            "INSERT INTO devices (id, account_id, public_key, created_at) VALUES ($1, $2, $3, $4)",
            &[
                &device.as_bytes(),
                &account.0,
                &&public_key[..],
                &sql_millis(now),
            ],
        )
        .await?;
        commit(txn).await?;
        Ok(Registered { account, removed })
    }

    async fn add_device(
        &self,
        approver: Actor,
        device: DeviceId,
        public_key: [u8; 32],
        identity: IdentityKeys,
        max_devices: usize,
        now: Millis,
    ) -> Result<Linked> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        lock_actor(&txn, approver).await?;
        let count = devices_of(&txn, approver.account).await?.len();
        if count == 0 {
            return Err(StoreError::NoSuchAccount);
        }
        if count >= max_devices {
            return Ok(Linked::TooManyDevices);
        }
        let exists = txn
            .query_opt("SELECT 1 FROM devices WHERE id = $1", &[&device.as_bytes()])
            .await?;
        if exists.is_some() {
            return Err(StoreError::engine("the device exists already"));
        }
        txn.execute(
            "INSERT INTO devices (id, account_id, public_key, identity_key, signing_key, created_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &device.as_bytes(),
                &approver.account.0,
                &&public_key[..],
                &&identity.identity_key[..],
                &&identity.signing_key[..],
                &sql_millis(now),
            ],
        )
        .await?;
        commit(txn).await?;
        Ok(Linked::Added)
    }

    async fn remove_device(&self, actor: Actor, device: DeviceId) -> Result<bool> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        lock_actor(&txn, actor).await?;
        let row = txn
            .query_opt(
                "SELECT 1 FROM devices WHERE id = $1 AND account_id = $2",
                &[&device.as_bytes(), &actor.account.0],
            )
            .await?;
        if row.is_none() {
            return Ok(false);
        }
        delete_device(&txn, device).await?;
        commit(txn).await?;
        Ok(true)
    }

    async fn publish_keys(
        &self,
        device: DeviceId,
        identity: IdentityKeys,
        one_time_keys: Vec<SignedKey>,
        fallback: Option<SignedKey>,
        max_stored: u32,
    ) -> Result<Published> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        // The device is the actor: gone, it publishes nothing.
        if lock_account_of(&txn, device).await?.is_none() {
            return Err(StoreError::Revoked);
        }
        let row = txn
            .query_one(
                "SELECT identity_key, signing_key,
                     (SELECT count(*) FROM one_time_keys WHERE device_id = $1)
                 FROM devices WHERE id = $1",
                &[&device.as_bytes()],
            )
            .await?;
        match rows::identity(&row, 0, 1)? {
            Some(existing) if existing != identity => return Ok(Published::IdentityMismatch),
            Some(_) => {}
            None => {
                // Stored even if the keys below are refused, as the other engines do.
                txn.execute(
                    "UPDATE devices SET identity_key = $2, signing_key = $3 WHERE id = $1",
                    &[
                        &device.as_bytes(),
                        &&identity.identity_key[..],
                        &&identity.signing_key[..],
                    ],
                )
                .await?;
            }
        }
        let held = u32::try_from(row.try_get::<_, i64>(2)?).unwrap_or(u32::MAX);
        let new = u32::try_from(one_time_keys.len()).unwrap_or(u32::MAX);
        if held.saturating_add(new) > max_stored {
            commit(txn).await?;
            return Ok(Published::TooMany);
        }
        let publics: Vec<&[u8]> = one_time_keys.iter().map(|k| &k.public_key[..]).collect();
        let signatures: Vec<&[u8]> = one_time_keys.iter().map(|k| &k.signature[..]).collect();
        // A key published again keeps its first signature.
        txn.execute(
            "INSERT INTO one_time_keys (device_id, public_key, signature)
             SELECT $1, k, s FROM unnest($2::bytea[], $3::bytea[]) WITH ORDINALITY AS u(k, s, n)
             ORDER BY n
             ON CONFLICT (device_id, public_key) DO NOTHING",
            &[&device.as_bytes(), &publics, &signatures],
        )
        .await?;
        if let Some(fallback) = fallback {
            txn.execute(
                "UPDATE devices SET fallback_key = $2, fallback_signature = $3 WHERE id = $1",
                &[
                    &device.as_bytes(),
                    &&fallback.public_key[..],
                    &&fallback.signature[..],
                ],
            )
            .await?;
        }
        let count: i64 = txn
            .query_one(
                "SELECT count(*) FROM one_time_keys WHERE device_id = $1",
                &[&device.as_bytes()],
            )
            .await?
            .try_get(0)?;
        commit(txn).await?;
        Ok(Published::Stored {
            one_time_keys: u32::try_from(count).unwrap_or(u32::MAX),
        })
    }

    async fn set_contact_token(&self, device: DeviceId, hash: [u8; 32]) -> Result<()> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        if lock_account_of(&txn, device).await?.is_none() {
            return Err(StoreError::Revoked);
        }
        txn.execute(
            "UPDATE devices SET contact_token_hash = $2 WHERE id = $1",
            &[&device.as_bytes(), &&hash[..]],
        )
        .await?;
        commit(txn).await?;
        Ok(())
    }

    async fn key_status(&self, device: DeviceId) -> Result<KeyStatus> {
        let mut conn = self.pool.get().await?;
        key_status(conn.client(), device).await
    }

    async fn claim_keys(
        &self,
        claimer: Actor,
        account: AccountId,
        only: Vec<DeviceId>,
    ) -> Result<Claimed> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        // A share lock: claims run beside each other, not beside a removal of the claimer.
        txn.execute(
            "SELECT 1 FROM accounts WHERE id = $1 FOR SHARE",
            &[&claimer.account.0],
        )
        .await?;
        check_actor(&txn, claimer).await?;
        let rows = txn
            .query(
                "SELECT id, identity_key, signing_key, voucher_by, voucher_signature,
                        fallback_key, fallback_signature
                 FROM devices WHERE account_id = $1 ORDER BY added",
                &[&account.0],
            )
            .await?;
        let mut devices = Vec::with_capacity(rows.len());
        for row in &rows {
            devices.push(rows::device_id(row, 0)?);
        }
        let unknown: Vec<DeviceId> = only
            .iter()
            .copied()
            .filter(|d| !devices.contains(d))
            .collect();
        // A claim naming a device that is not there hands out nothing at all.
        if !unknown.is_empty() {
            return Ok(Claimed {
                keys: Vec::new(),
                unknown,
            });
        }
        let mut keys = Vec::new();
        for (device, row) in devices.into_iter().zip(&rows) {
            if !only.is_empty() && !only.contains(&device) {
                continue;
            }
            let Some(identity) = rows::identity(row, 1, 2)? else {
                continue;
            };
            // The lowest key not being handed out by another claim right now, deleted as it
            // is handed out: no key goes to two claims.
            let one_time = txn
                .query_opt(
                    "DELETE FROM one_time_keys WHERE (device_id, public_key) = (
                         SELECT device_id, public_key FROM one_time_keys WHERE device_id = $1
                         ORDER BY public_key LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING public_key, signature",
                    &[&device.as_bytes()],
                )
                .await?;
            let one_time = match one_time {
                Some(row) => rows::signed_key(&row, 0, 1)?,
                None => None,
            };
            let (key, fallback) = match one_time {
                Some(key) => (Some(key), false),
                None => (rows::signed_key(row, 5, 6)?, true),
            };
            if let Some(key) = key {
                keys.push(ClaimedKey {
                    device,
                    identity,
                    key,
                    fallback,
                    voucher: rows::voucher(row, 3, 4)?,
                });
            }
        }
        commit(txn).await?;
        Ok(Claimed { keys, unknown })
    }

    async fn device_keys(&self, account: AccountId) -> Result<Vec<ListedDevice>> {
        let mut conn = self.pool.get().await?;
        let rows = conn
            .client()
            .query(
                "SELECT id, identity_key, signing_key, voucher_by, voucher_signature
                 FROM devices WHERE account_id = $1 ORDER BY added",
                &[&account.0],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ListedDevice {
                    id: rows::device_id(row, 0)?,
                    identity: rows::identity(row, 1, 2)?,
                    voucher: rows::voucher(row, 3, 4)?,
                })
            })
            .collect()
    }

    async fn set_voucher(
        &self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> Result<bool> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        lock_actor(
            &txn,
            Actor {
                account,
                device: voucher.by,
            },
        )
        .await?;
        let set = txn
            .execute(
                "UPDATE devices SET voucher_by = $3, voucher_signature = $4
                 WHERE id = $1 AND account_id = $2 AND voucher_by IS NULL",
                &[
                    &device.as_bytes(),
                    &account.0,
                    &voucher.by.as_bytes(),
                    &&voucher.signature[..],
                ],
            )
            .await?;
        commit(txn).await?;
        Ok(set > 0)
    }

    async fn delete_account(&self, actor: Actor) -> Result<Vec<DeviceId>> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        lock_actor(&txn, actor).await?;
        let Some(row) = txn
            .query_opt(
                "SELECT pseudonym FROM accounts WHERE id = $1",
                &[&actor.account.0],
            )
            .await?
        else {
            return Err(StoreError::NoSuchAccount);
        };
        let pseudonym: Vec<u8> = row.try_get(0)?;
        let devices = devices_of(&txn, actor.account).await?;
        let ids: Vec<&[u8]> = devices.iter().map(DeviceId::as_bytes).collect();
        // Undelivered messages the account sent go too: opting out leaves nothing behind.
        txn.execute(
            "DELETE FROM messages WHERE sender_device = ANY($1) OR receiver_account = $2",
            &[&ids, &actor.account.0],
        )
        .await?;
        txn.execute(
            "DELETE FROM withdrawn WHERE sender_device = ANY($1)",
            &[&ids],
        )
        .await?;
        txn.execute("DELETE FROM codes WHERE pseudonym = $1", &[&pseudonym])
            .await?;
        for device in &devices {
            delete_device(&txn, *device).await?;
        }
        txn.execute("DELETE FROM accounts WHERE id = $1", &[&actor.account.0])
            .await?;
        commit(txn).await?;
        Ok(devices)
    }

    async fn update_code_record<R, F>(&self, pseudonym: Pseudonym, update: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Option<CodeRecord>) -> R + Send + 'static,
    {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let lock = i64::from_le_bytes([
            pseudonym.0[0],
            pseudonym.0[1],
            pseudonym.0[2],
            pseudonym.0[3],
            pseudonym.0[4],
            pseudonym.0[5],
            pseudonym.0[6],
            pseudonym.0[7],
        ]);
        txn.execute("SELECT pg_advisory_xact_lock($1)", &[&lock])
            .await?;
        let row = txn
            .query_opt(
                "SELECT live_hash, live_expires_at, live_attempts, sent_at
                 FROM codes WHERE pseudonym = $1",
                &[&&pseudonym.0[..]],
            )
            .await?;
        let mut record = match row {
            None => None,
            Some(row) => {
                let hash: Option<[u8; 32]> = rows::optional_array(&row, 0)?;
                let expires: Option<i64> = row.try_get(1)?;
                let attempts: Option<i64> = row.try_get(2)?;
                let sent: Vec<u8> = row.try_get(3)?;
                let live = match (hash, expires, attempts) {
                    (Some(hash), Some(expires), Some(attempts)) => Some(LiveCode {
                        hash,
                        expires_at: millis(expires),
                        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                    }),
                    _ => None,
                };
                Some(CodeRecord {
                    live,
                    sent_at: rows::unpack_times(&sent),
                })
            }
        };
        let value = update(&mut record);
        match record {
            None => {
                txn.execute(
                    "DELETE FROM codes WHERE pseudonym = $1",
                    &[&&pseudonym.0[..]],
                )
                .await?;
            }
            Some(record) => {
                let hash = record.live.as_ref().map(|live| live.hash.to_vec());
                let expires = record.live.as_ref().map(|live| sql_millis(live.expires_at));
                let attempts = record.live.as_ref().map(|live| i64::from(live.attempts));
                txn.execute(
                    "INSERT INTO codes (pseudonym, live_hash, live_expires_at, live_attempts, sent_at)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (pseudonym) DO UPDATE SET live_hash = $2, live_expires_at = $3,
                         live_attempts = $4, sent_at = $5",
                    &[
                        &&pseudonym.0[..],
                        &hash,
                        &expires,
                        &attempts,
                        &rows::pack_times(&record.sent_at),
                    ],
                )
                .await?;
            }
        }
        commit(txn).await?;
        Ok(value)
    }

    async fn enqueue(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Enqueued> {
        self.enqueue_in(message, limits.into()).await
    }

    async fn enqueue_submit(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Completion<Enqueued>> {
        // Committed (so in the order submitted, and durable) before this returns.
        let outcome = self.enqueue_in(message, limits.into()).await;
        Ok(Completion::done(outcome))
    }

    async fn pending(
        &self,
        device: DeviceId,
        after: QueueCursor,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<Pending>> {
        let mut conn = self.pool.get().await?;
        let rows = conn
            .client()
            .query(
                "SELECT c.seq, m.sender_device, m.msg_id, m.sent_at, c.payload, c.sealed
                 FROM copies c JOIN messages m ON m.seq = c.seq
                 WHERE c.device_id = $1 AND c.seq > $2 AND m.expires_at > $3 AND NOT c.discarded
                 ORDER BY c.seq LIMIT $4",
                &[
                    &device.as_bytes(),
                    &after.position(),
                    &sql_millis(now),
                    &i64::try_from(limit).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let stored: Vec<u8> = row.try_get(4)?;
            let payload = if row.try_get(5)? {
                let Some(payload) = self.chain.open(device.as_bytes(), &stored) else {
                    // Its hour's key is forgotten (the message expired, and the sweep takes
                    // it), or it was sealed under another chain: nothing to hand out.
                    tracing::warn!("a waiting copy could not be opened under the key chain");
                    continue;
                };
                payload
            } else {
                stored
            };
            pending.push(Pending {
                cursor: QueueCursor::at(row.try_get(0)?),
                sender_device: rows::device_id(row, 1)?,
                id: rows::message_id(row, 2)?,
                sent_at: millis(row.try_get(3)?),
                payload: Bytes::from(payload),
            });
        }
        Ok(pending)
    }

    async fn ack_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Acked> {
        self.ack_in(device, sender_device, id, kind).await
    }

    async fn ack_staged_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Completion<Acked>> {
        // Executed and durable at the same point: the commit.
        let acked = self.ack_in(device, sender_device, id, kind).await?;
        Ok(Completion::done(Ok(acked)))
    }

    async fn screen(&self, message: &NewMessage) -> Result<bool> {
        self.screen_in(message).await
    }

    async fn ack_held(&self, copy: HeldAck, kind: AckKind) -> Result<Completion<Acked>> {
        // Executed and durable at the same point: the commit.
        let acked = self.ack_held_in(copy, kind).await?;
        Ok(Completion::done(Ok(acked)))
    }

    async fn withdraw_held(
        &self,
        sender_device: DeviceId,
        id: MessageId,
        held_until: Option<Millis>,
    ) -> Result<Withdrawal> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        // A send of the message under way is stored before this looks (or refused after).
        lock_message_id(&txn, sender_device, id).await?;
        // The message's row lock decides between this and a stored copy's acknowledgement;
        // its decision record between this and a held copy's.
        let message = txn
            .query_opt(
                "SELECT seq, expires_at, delivered FROM messages
                 WHERE sender_device = $1 AND msg_id = $2 FOR UPDATE",
                &[&sender_device.as_bytes(), &id.as_bytes()],
            )
            .await?;
        let Some(message) = message else {
            let receipt = txn
                .query_opt(
                    "SELECT 1 FROM receipts WHERE device_id = $1 AND msg_id = $2 AND kind = $3",
                    &[
                        &sender_device.as_bytes(),
                        &id.as_bytes(),
                        &(ReceiptKind::Delivered as i16),
                    ],
                )
                .await?;
            if receipt.is_some() {
                return Ok(Withdrawal::Delivered);
            }
            let found = match held_until {
                // Copies are held: nothing stored and no record decides it withdrawn.
                Some(ends) => {
                    let found = decide(&txn, sender_device, id, record_ends(ends), false).await?;
                    commit(txn).await?;
                    found.or(Some(false))
                }
                None => tombstone(&txn, sender_device, id).await?,
            };
            return Ok(match found {
                Some(true) => Withdrawal::Delivered,
                Some(false) => Withdrawal::Withdrawn,
                None => Withdrawal::Unknown,
            });
        };
        let position: i64 = message.try_get(0)?;
        let expires_at = millis(message.try_get(1)?);
        if message.try_get::<_, bool>(2)? {
            return Ok(Withdrawal::Delivered);
        }
        // Decided delivered already (a held copy acknowledged): nothing is withdrawn.
        if decide(&txn, sender_device, id, record_ends(expires_at), false).await? == Some(true) {
            return Ok(Withdrawal::Delivered);
        }
        // The receiver's copies go (those set aside too); the sender's own other devices keep
        // theirs. The record lives until the message's TTL ends plus the margin.
        txn.execute(
            "DELETE FROM copies WHERE seq = $1 AND to_receiver",
            &[&position],
        )
        .await?;
        txn.execute(
            "DELETE FROM messages m WHERE m.seq = $1
             AND NOT EXISTS (SELECT 1 FROM copies c WHERE c.seq = m.seq)",
            &[&position],
        )
        .await?;
        commit(txn).await?;
        // No receiver copy is left to count in a pool.
        self.forget_strangers(&[position])?;
        Ok(Withdrawal::Withdrawn)
    }

    async fn expire(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredMessage>> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let now_sql = sql_millis(now);
        // The oldest deadlines first; a message another transaction holds (being acknowledged
        // or withdrawn) waits for the next sweep.
        let ended = txn
            .query(
                "SELECT m.seq, m.sender_device, m.msg_id, m.sent_at, m.expires_at,
                     m.delivered OR EXISTS (SELECT 1 FROM withdrawn w
                         WHERE w.sender_device = m.sender_device AND w.msg_id = m.msg_id
                           AND w.delivered)
                 FROM messages m
                 WHERE m.expires_at <= $1 ORDER BY m.expires_at, m.seq LIMIT $2
                 FOR UPDATE SKIP LOCKED",
                &[&now_sql, &i64::try_from(limit).unwrap_or(i64::MAX)],
            )
            .await?;
        // A sweep that finds no message, receipt or decision record to expire writes nothing.
        // (A message delivered by its held copies leaves only its record, which goes once its
        // time is up even if nothing else does.)
        if ended.is_empty() {
            // (A message can have ended unread here: the sweep's limit, or another
            // transaction holding it.)
            let due: bool = txn
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM receipts WHERE expires_at <= $1)
                         OR EXISTS (SELECT 1 FROM messages WHERE expires_at <= $1)
                         OR EXISTS (SELECT 1 FROM withdrawn WHERE expires_at <= $1)",
                    &[&now_sql],
                )
                .await?
                .try_get(0)?;
            if !due {
                return Ok(Vec::new());
            }
        }
        txn.execute("DELETE FROM withdrawn WHERE expires_at <= $1", &[&now_sql])
            .await?;
        txn.execute("DELETE FROM receipts WHERE expires_at <= $1", &[&now_sql])
            .await?;
        let mut receipts = Vec::new();
        let mut positions = Vec::with_capacity(ended.len());
        for row in &ended {
            let position: i64 = row.try_get(0)?;
            positions.push(position);
            let sender_device = rows::device_id(row, 1)?;
            let id = rows::message_id(row, 2)?;
            let receipt_ends = receipt_expires_at(millis(row.try_get(3)?), millis(row.try_get(4)?));
            txn.execute("DELETE FROM messages WHERE seq = $1", &[&position])
                .await?;
            let delivered: bool = row.try_get(5)?;
            if !delivered
                && store_receipt(&txn, sender_device, id, ReceiptKind::Expired, receipt_ends)
                    .await?
            {
                receipts.push(ExpiredMessage { sender_device, id });
            }
        }
        commit(txn).await?;
        self.forget_strangers(&positions)?;
        // Messages deleted with a device or an account leave their positions behind.
        super::forget_gone_strangers(conn.client(), &self.strangers).await?;
        Ok(receipts)
    }

    async fn holds_copy_from(&self, device: DeviceId, sender_device: DeviceId) -> Result<bool> {
        let mut conn = self.pool.get().await?;
        let row = conn
            .client()
            .query_opt(
                "SELECT 1 FROM copies c JOIN messages m ON m.seq = c.seq
                 WHERE c.device_id = $1 AND m.sender_device = $2 AND NOT c.discarded LIMIT 1",
                &[&device.as_bytes(), &sender_device.as_bytes()],
            )
            .await?;
        Ok(row.is_some())
    }

    async fn backlog(&self, device: DeviceId) -> Result<Backlog> {
        let mut conn = self.pool.get().await?;
        let row = conn
            .client()
            .query_one(
                "SELECT (SELECT missed FROM devices WHERE id = $1),
                        EXISTS (SELECT 1 FROM copies WHERE device_id = $1),
                        EXISTS (SELECT 1 FROM receipts WHERE device_id = $1)",
                &[&device.as_bytes()],
            )
            .await?;
        let missed: Option<i64> = row.try_get(0)?;
        Ok(Backlog {
            registered: missed.is_some(),
            queued: row.try_get(1)?,
            receipts: row.try_get(2)?,
            missed: missed.map_or(0, |m| u32::try_from(m).unwrap_or(u32::MAX)),
        })
    }

    async fn clear_missed(&self, device: DeviceId, seen: u32) -> Result<()> {
        let mut conn = self.pool.get().await?;
        conn.client()
            .execute(
                "UPDATE devices SET missed = greatest(missed - $2, 0) WHERE id = $1",
                &[&device.as_bytes(), &i64::from(seen)],
            )
            .await?;
        Ok(())
    }

    async fn receipts(&self, device: DeviceId) -> Result<Vec<PendingReceipt>> {
        let mut conn = self.pool.get().await?;
        let rows = conn
            .client()
            .query(
                "SELECT msg_id, kind FROM receipts WHERE device_id = $1 ORDER BY msg_id LIMIT $2",
                &[&device.as_bytes(), &RECEIPTS_PER_READ],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(PendingReceipt {
                    id: rows::message_id(row, 0)?,
                    kind: rows::receipt_kind(row.try_get(1)?),
                })
            })
            .collect()
    }

    async fn ack_receipt(&self, device: DeviceId, id: MessageId) -> Result<()> {
        let mut conn = self.pool.get().await?;
        conn.client()
            .execute(
                "DELETE FROM receipts WHERE device_id = $1 AND msg_id = $2",
                &[&device.as_bytes(), &id.as_bytes()],
            )
            .await?;
        Ok(())
    }

    async fn rekey_account(
        &self,
        account: AccountId,
        old: Pseudonym,
        new: Pseudonym,
        key_version: u32,
    ) -> Result<Rekeyed> {
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let row = txn
            .query_opt(
                "SELECT pseudonym FROM accounts WHERE id = $1 FOR UPDATE",
                &[&account.0],
            )
            .await?;
        let Some(row) = row else {
            return Err(StoreError::NoSuchAccount);
        };
        let current: [u8; 32] = rows::array(&row, 0)?;
        if current == new.0 {
            txn.execute(
                "UPDATE accounts SET key_version = $2 WHERE id = $1",
                &[&account.0, &i64::from(key_version)],
            )
            .await?;
            commit(txn).await?;
            return Ok(Rekeyed::AlreadyMoved);
        }
        if current != old.0 {
            return Ok(Rekeyed::NotItsPseudonym);
        }
        let clash = txn
            .query_opt(
                "SELECT 1 FROM accounts WHERE id <> $1
                 AND (pseudonym IN ($2, $3) OR previous_pseudonym IN ($2, $3))",
                &[&account.0, &&old.0[..], &&new.0[..]],
            )
            .await?;
        if clash.is_some() {
            return Err(StoreError::engine("the pseudonym names another account"));
        }
        txn.execute(
            "UPDATE accounts SET previous_pseudonym = $2, pseudonym = $3, key_version = $4
             WHERE id = $1",
            &[
                &account.0,
                &&old.0[..],
                &&new.0[..],
                &i64::from(key_version),
            ],
        )
        .await?;
        commit(txn).await?;
        Ok(Rekeyed::Moved)
    }

    async fn accounts_by_key_version(&self) -> Result<Vec<(u32, u64)>> {
        let mut conn = self.pool.get().await?;
        let rows = conn
            .client()
            .query(
                "SELECT key_version, count(*) FROM accounts GROUP BY key_version
                 ORDER BY key_version",
                &[],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let version = u32::try_from(row.try_get::<_, i64>(0)?)
                    .map_err(|_| StoreError::engine("a key version out of range"))?;
                Ok((version, count(row.try_get(1)?)))
            })
            .collect()
    }

    async fn forget_previous_pseudonyms(&self) -> Result<u64> {
        let mut conn = self.pool.get().await?;
        let forgotten = conn
            .client()
            .execute(
                "UPDATE accounts SET previous_pseudonym = NULL
                 WHERE previous_pseudonym IS NOT NULL",
                &[],
            )
            .await?;
        Ok(forgotten)
    }

    async fn prune_codes(&self, now: Millis) -> Result<usize> {
        let policy = CodePolicy::default();
        let mut conn = self.pool.get().await?;
        let txn = begin(conn.client()).await?;
        let rows = txn
            .query(
                "SELECT pseudonym, live_expires_at, sent_at FROM codes FOR UPDATE",
                &[],
            )
            .await?;
        let mut spent: Vec<Vec<u8>> = Vec::new();
        for row in &rows {
            let expires: Option<i64> = row.try_get(1)?;
            let sent: Vec<u8> = row.try_get(2)?;
            let live_until = expires.map(millis).unwrap_or(0);
            let record = CodeRecord {
                live: (live_until > now).then_some(LiveCode {
                    hash: [0; 32],
                    expires_at: live_until,
                    attempts: 0,
                }),
                sent_at: rows::unpack_times(&sent),
            };
            if record.is_spent(&policy, now) {
                spent.push(row.try_get(0)?);
            }
        }
        if !spent.is_empty() {
            txn.execute("DELETE FROM codes WHERE pseudonym = ANY($1)", &[&spent])
                .await?;
        }
        commit(txn).await?;
        Ok(spent.len())
    }

    async fn scrub(&self) -> Result<()> {
        // VACUUM marks the space of deleted rows for reuse and prunes their index entries; it
        // does not overwrite their bytes, and the WAL keeps its copies until it is recycled
        // (see docs/ARCHITECTURE.md). It cannot run inside a transaction.
        let mut conn = self.pool.get().await?;
        conn.client()
            .batch_execute("VACUUM copies, messages, one_time_keys, receipts, withdrawn, codes")
            .await?;
        Ok(())
    }

    fn new_strangers(&self) -> Vec<(i64, AccountId)> {
        self.strangers()
            .map(|mut strangers| strangers.take_new())
            .unwrap_or_default()
            .into_iter()
            .map(|(position, receiver)| (position, AccountId(receiver)))
            .collect()
    }

    fn strangers_elsewhere(&self, positions: &[(i64, AccountId)]) {
        if let Ok(mut strangers) = self.strangers() {
            for (position, receiver) in positions {
                strangers.note(*position, receiver.0, false);
            }
        }
    }
}

/// Starts a transaction on `client`, at the failpoint the embedded engine's writer passes before
/// each batch (the crash test stops the server there).
async fn begin(client: &mut Pooled) -> Result<Txn<'_>> {
    failpoint("store-transaction-before");
    Ok(client.transaction().await?)
}

/// Commits `txn`: this engine's durability point, between the failpoints the embedded engine's
/// writer passes around its sync and after its batch (the crash test stops the server at each).
async fn commit(txn: Txn<'_>) -> Result<()> {
    failpoint("store-sync-before");
    txn.commit().await?;
    failpoint("store-sync-after");
    failpoint("store-transaction-after");
    Ok(())
}
