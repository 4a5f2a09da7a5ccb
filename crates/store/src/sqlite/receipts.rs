//! Receipts waiting for sending devices, and whether anything waits for a device.
//!
//! A receipt names a message id and its kind, never the receiver.

use rusqlite::{params, Connection, Transaction};
use tidings_proto::id::{DeviceId, MessageId};

use super::rows::{message_id, receipt_kind};
use crate::{Backlog, PendingReceipt, Result};

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
