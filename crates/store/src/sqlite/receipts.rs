//! Receipts waiting for sending devices, whether anything waits for a device, and when the
//! next receipt's wait ends.
//!
//! A receipt names a message id and its kind, never the receiver. Each has a deadline
//! (`receipts.expires_at`), which no index orders: nearly every receipt is taken by its sending
//! device within moments, and an index entry written and deleted with each would cost the writer
//! two more B-tree writes per message. The expiry sweep finds the ended ones by a scan instead,
//! and runs that scan only once the earliest deadline, held in memory ([`ReceiptDeadlines`]), has
//! passed.

use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use super::rows::{message_id, millis, receipt_kind, sql_millis};
use super::writer::Notes;
use crate::{Backlog, PendingReceipt, Result};

/// The earliest deadline of the stored receipts, or an earlier time, never a later one (`MAX`:
/// no receipt is stored). Lowered as each batch that stored receipts ends, whether or not it
/// committed, and set by a sweep that deleted the ended ones once its batch has committed; read
/// by the expiry sweep, which scans for ended receipts only when this has passed.
#[derive(Debug)]
pub(super) struct ReceiptDeadlines {
    earliest: AtomicU64,
}

impl ReceiptDeadlines {
    /// Reads the earliest deadline stored (a scan, once, when the engine opens).
    pub(super) fn read(conn: &Connection) -> Result<Self> {
        let earliest = earliest_deadline(conn)?;
        Ok(Self {
            earliest: AtomicU64::new(earliest.unwrap_or(Millis::MAX)),
        })
    }

    /// Whether a receipt's wait may have ended at `now`.
    pub(super) fn any_ended(&self, now: Millis) -> bool {
        self.earliest.load(Ordering::Acquire) <= now
    }

    /// What a batch noted, once it has ended: receipts it stored lower the deadline; a sweep in
    /// it sets it, if the batch committed (a batch rolled back leaves the ended receipts, and the
    /// deadline that says so).
    pub(super) fn after_batch(&self, notes: &Notes, committed: bool) {
        match (notes.receipts_swept, committed) {
            (Some(left), true) => {
                let stored = notes.receipts_stored.unwrap_or(Millis::MAX);
                self.earliest.store(left.min(stored), Ordering::Release);
            }
            _ => {
                if let Some(stored) = notes.receipts_stored {
                    self.earliest.fetch_min(stored, Ordering::AcqRel);
                }
            }
        }
    }
}

/// The earliest deadline of the stored receipts: a scan of the table.
fn earliest_deadline(conn: &Connection) -> Result<Option<Millis>> {
    Ok(conn
        .prepare_cached("SELECT MIN(expires_at) FROM receipts")?
        .query_row([], |row| row.get::<_, Option<i64>>(0))
        .optional()?
        .flatten()
        .map(millis))
}

/// Stores a receipt for a sending device that still exists, waiting until `expires_at`, and
/// notes its deadline for the batch. True if it was stored.
pub(super) fn store_receipt(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    device: DeviceId,
    id: MessageId,
    kind: ReceiptKind,
    expires_at: Millis,
) -> Result<bool> {
    let stored = txn
        .prepare_cached(
            "INSERT OR REPLACE INTO receipts (device_id, msg_id, kind, expires_at)
             SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
        )?
        .execute(params![
            device.as_bytes(),
            id.as_bytes(),
            kind as i64,
            sql_millis(expires_at)
        ])?;
    notes.receipts_stored = Some(
        notes
            .receipts_stored
            .map_or(expires_at, |d| d.min(expires_at)),
    );
    Ok(stored > 0)
}

/// Deletes the receipts whose wait ended at `now` (a scan: see the module's comment) and notes
/// the earliest deadline left.
pub(super) fn expire_receipts(txn: &Transaction<'_>, notes: &mut Notes, now: Millis) -> Result<()> {
    txn.prepare_cached("DELETE FROM receipts WHERE expires_at <= ?1")?
        .execute(params![sql_millis(now)])?;
    notes.receipts_swept = Some(earliest_deadline(txn)?.unwrap_or(Millis::MAX));
    Ok(())
}

/// [`Store::backlog`](crate::Store::backlog), read on `conn`.
pub(super) fn backlog(conn: &Connection, device: DeviceId) -> Result<Backlog> {
    // One statement for all three; `queued` is NULL for an unknown device.
    let (queued, receipts, missed) = conn
        .prepare_cached(
            "SELECT (SELECT queue_len > 0 FROM devices WHERE id = ?1),
                    EXISTS (SELECT 1 FROM receipts WHERE device_id = ?1),
                    (SELECT missed FROM devices WHERE id = ?1)",
        )?
        .query_row(params![device.as_bytes()], |row| {
            Ok((
                row.get::<_, Option<bool>>(0)?,
                row.get::<_, bool>(1)?,
                row.get::<_, Option<i64>>(2)?,
            ))
        })?;
    Ok(Backlog {
        registered: queued.is_some(),
        queued: queued.unwrap_or(false),
        receipts,
        missed: missed.map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    })
}

/// [`Store::clear_missed`](crate::Store::clear_missed).
pub(super) fn clear_missed(txn: &Transaction<'_>, device: DeviceId, seen: u32) -> Result<()> {
    txn.prepare_cached("UPDATE devices SET missed = MAX(missed - ?2, 0) WHERE id = ?1")?
        .execute(params![device.as_bytes(), seen])?;
    Ok(())
}

/// [`Store::receipts`](crate::Store::receipts).
pub(super) fn receipts(conn: &Connection, device: DeviceId) -> Result<Vec<PendingReceipt>> {
    let mut statement =
        conn.prepare_cached("SELECT msg_id, kind FROM receipts WHERE device_id = ?1 LIMIT 1000")?;
    let rows = statement
        .query_map(params![device.as_bytes()], |row| {
            Ok(PendingReceipt {
                id: message_id(row.get(0)?)?,
                kind: receipt_kind(row.get(1)?),
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

/// [`Store::ack_receipt`](crate::Store::ack_receipt): one statement.
pub(super) fn ack_receipt(txn: &Transaction<'_>, device: DeviceId, id: MessageId) -> Result<()> {
    txn.prepare_cached("DELETE FROM receipts WHERE device_id = ?1 AND msg_id = ?2")?
        .execute(params![device.as_bytes(), id.as_bytes()])?;
    Ok(())
}
