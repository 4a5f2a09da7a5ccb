//! The tables and how an older database is brought up to them.
//!
//! Run once when the engine opens, on the writer's connection. Never drops a table, nor a column
//! that holds data to keep: a database made by an older version keeps its data. The one column
//! it drops, `copies.stranger`, said who is a stranger to whom, which must not be on disk
//! ([`DROPPED_COLUMNS`]).

use rusqlite::{params, Connection};
use tidings_core::{Millis, DAY};

use super::rows::sql_millis;
use crate::Result;

/// The tables. Their `REFERENCES` clauses say what refers to what, and `ON DELETE CASCADE` what
/// goes with a deleted row; SQLite does not enforce them (see
/// [`open_connection`](super::connection::open_connection)): the writer does, in the same
/// transaction. Every insertion first reads what it refers to (a send the receiver's and the
/// sender's devices, a receipt its device, keys theirs, a device its account), and every deletion
/// deletes what refers to the rows it deletes (a device's copies, receipts and keys in
/// [`delete_devices`](super::accounts::delete_devices), a message's copies before it, an account's
/// devices and the messages queued for it before its row). The store tests check the whole database
/// with `PRAGMA foreign_key_check` after each kind of write.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id INTEGER PRIMARY KEY,
    pseudonym BLOB NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id BLOB PRIMARY KEY,
    account_id INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    public_key BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    queue_len INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS devices_by_account ON devices(account_id);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY,
    sender_device BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    receiver_account INTEGER NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    sent_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    UNIQUE (sender_device, msg_id)
);
CREATE INDEX IF NOT EXISTS messages_by_expiry ON messages(expires_at);
CREATE INDEX IF NOT EXISTS messages_by_receiver ON messages(receiver_account);
CREATE TABLE IF NOT EXISTS copies (
    device_id BLOB NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS copies_by_message ON copies(seq);
-- A message with one copy, to a receiver device (nearly every message: one receiver device, no
-- other device of the sender's), as one row: the message and its copy, keyed by the device's
-- queue. Its acknowledgement deletes one row (three B-trees) instead of a copy and a message (six),
-- with no `delivered` mark (its one copy goes with the row). `seq` comes from the same sequence as
-- `messages.seq` (`Notes::next_seq`), so a device's queue is ordered across both tables; a message
-- is in one of them, never both.
CREATE TABLE IF NOT EXISTS single_copies (
    device_id BLOB NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    sender_device BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    sender_account INTEGER,
    sent_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    discarded INTEGER NOT NULL DEFAULT 0,
    payload BLOB NOT NULL,
    PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS single_copies_by_id ON single_copies(sender_device, msg_id);
CREATE INDEX IF NOT EXISTS single_copies_by_expiry ON single_copies(expires_at);
-- `devices.queue_len` was kept by these triggers, one update of the device's row for every copy
-- stored or deleted; the writer now counts a batch's copies and updates each device once (see
-- `Notes::queued`).
DROP TRIGGER IF EXISTS copies_count_up;
DROP TRIGGER IF EXISTS copies_count_down;
CREATE TABLE IF NOT EXISTS receipts (
    device_id BLOB NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    msg_id BLOB NOT NULL,
    kind INTEGER NOT NULL,
    PRIMARY KEY (device_id, msg_id)
) WITHOUT ROWID;
-- Messages' decision records (`delivered` 0: withdrawn, 1: delivered), by the sending device and
-- the id only, never a receiver device: no social graph on disk. Each lives until its message's TTL
-- ends plus `DECISION_MARGIN`; the expiry sweep deletes it by the index.
CREATE TABLE IF NOT EXISTS withdrawn (
    sender_device BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (sender_device, msg_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS withdrawn_by_expiry ON withdrawn(expires_at);
CREATE TABLE IF NOT EXISTS one_time_keys (
    device_id BLOB NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
    fallback INTEGER NOT NULL,
    public_key BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (device_id, fallback, public_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS codes (
    pseudonym BLOB PRIMARY KEY,
    live_hash BLOB,
    live_expires_at INTEGER,
    live_attempts INTEGER,
    sent_at BLOB NOT NULL
) WITHOUT ROWID;
-- The last account id handed out, in one row: an id is never handed out again, so that nothing
-- left of a deleted account can reach the next one (`INTEGER PRIMARY KEY` alone gives the largest
-- id again once its row is deleted). A database made before this table starts from its largest
-- id; ids it deleted before are beyond knowing.
CREATE TABLE IF NOT EXISTS account_ids (
    only INTEGER PRIMARY KEY CHECK (only = 0),
    last INTEGER NOT NULL
);
INSERT OR IGNORE INTO account_ids (only, last) SELECT 0, IFNULL(MAX(id), 0) FROM accounts;
";

/// Columns added after the first schema, with their definitions; added on open where missing.
/// `copies.payload` holds each device's own ciphertext (end-to-end encryption gives every device
/// a different one); `messages.payload` stays empty for such messages.
pub(super) const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("devices", "identity_key", "BLOB"),
    ("devices", "signing_key", "BLOB"),
    ("devices", "voucher", "BLOB"),
    ("devices", "voucher_signature", "BLOB"),
    ("copies", "payload", "BLOB"),
    ("copies", "to_receiver", "INTEGER NOT NULL DEFAULT 1"),
    // When a receipt its device has not taken is deleted (`receipt_expires_at`); a receipt
    // stored before the column existed gets the longest wait a new one can have, from the open.
    ("receipts", "expires_at", "INTEGER"),
    // The sending device's account when the message was stored: what an account has waiting
    // counts against its share of each queue and its quota (`writer::SenderCounts`). Filled from
    // the devices on the open that adds it; a message whose sending device is gone counts for
    // no account.
    ("messages", "sender_account", "INTEGER"),
    // Own messages not kept for the device because its queue had no room, until it is told.
    ("devices", "missed", "INTEGER NOT NULL DEFAULT 0"),
    // SHA-256 of the device's contact token, once it registered one.
    ("devices", "contact_token_hash", "BLOB"),
    // The device set the copy aside without showing it (`AckKind::Discarded`): never handed out
    // again, otherwise kept as if never fetched until the message's TTL ends.
    ("copies", "discarded", "INTEGER NOT NULL DEFAULT 0"),
    // The record is of a message decided delivered (a receiver device showed a copy), not of a
    // withdrawn one: a withdraw answers delivered.
    ("withdrawn", "delivered", "INTEGER NOT NULL DEFAULT 0"),
    // The version of the OPRF key the account's pseudonym is under; an account made before keys
    // had versions is under the first.
    ("accounts", "key_version", "INTEGER NOT NULL DEFAULT 1"),
    // The account's pseudonym under the previous OPRF key, once it moved to the current one,
    // until the server starts without the previous key (`forget_previous_pseudonyms`). Unique
    // through `accounts_by_previous_pseudonym`.
    ("accounts", "previous_pseudonym", "BLOB"),
];

/// Columns an earlier version added that must not stay on disk, with the indexes on them (dropped
/// first: SQLite refuses to drop an indexed column). `copies.stranger` marked a copy as a
/// stranger's (its send presented no contact token of the receiver): a hint of who is whose
/// contact. The writer now keeps that mark in memory only (`writer::StrangerCopies`); the copies
/// it marked count as contacts' from the open that drops it. `secure_delete` zeroes what the
/// table's rewrite frees, and the next scrub the WAL frames.
const DROPPED_COLUMNS: &[(&str, &str, &str)] = &[("copies", "stranger", "copies_of_strangers")];

/// How long a receipt stored before `receipts.expires_at` existed still waits, from the open that
/// adds the column: the longest a new receipt can wait (a 30-day TTL, then one more).
const LEGACY_RECEIPT_WAIT: Millis = 60 * DAY;

/// Creates what is missing: tables, indexes and added columns.
pub(super) fn migrate(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA)?;
    let added = add_missing_columns(conn)?;
    if added.contains(&("receipts", "expires_at")) {
        // The one clock reading of this crate: rows older than the column get a deadline once.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| Millis::try_from(d.as_millis()).unwrap_or(Millis::MAX))
            .unwrap_or(0);
        conn.execute(
            "UPDATE receipts SET expires_at = ?1 WHERE expires_at IS NULL",
            params![sql_millis(now.saturating_add(LEGACY_RECEIPT_WAIT))],
        )?;
    }
    if added.contains(&("messages", "sender_account")) {
        conn.execute(
            "UPDATE messages SET sender_account =
                (SELECT account_id FROM devices WHERE id = messages.sender_device)",
            [],
        )?;
    }
    // `receipts.expires_at` has no index (see the `receipts` module); a database made while it
    // had one loses it.
    conn.execute_batch("DROP INDEX IF EXISTS receipts_by_expiry;")?;
    // `ALTER TABLE ... ADD COLUMN` cannot say UNIQUE; this index does (NULLs never clash).
    conn.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS accounts_by_previous_pseudonym
         ON accounts(previous_pseudonym);",
    )?;
    drop_columns(conn)?;
    Ok(())
}

/// Drops the columns of [`DROPPED_COLUMNS`] (and their indexes) where present. `ALTER TABLE ...
/// DROP COLUMN` needs SQLite 3.35; the engine is built with its own, newer one.
fn drop_columns(conn: &Connection) -> Result<()> {
    for (table, column, index) in DROPPED_COLUMNS {
        conn.execute_batch(&format!("DROP INDEX IF EXISTS {index};"))?;
        if column_exists(conn, table, column)? {
            conn.execute_batch(&format!("ALTER TABLE {table} DROP COLUMN {column};"))?;
        }
    }
    Ok(())
}

fn column_exists(conn: &Connection, table: &str, column: &str) -> Result<bool> {
    Ok(conn
        .prepare(&format!(
            "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
        ))?
        .exists(params![column])?)
}

/// Adds the columns of [`ADDED_COLUMNS`] that are missing; returns the ones it added.
pub(super) fn add_missing_columns(conn: &Connection) -> Result<Vec<(&'static str, &'static str)>> {
    let mut added = Vec::new();
    for (table, column, definition) in ADDED_COLUMNS {
        if !column_exists(conn, table, column)? {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
            added.push((*table, *column));
        }
    }
    Ok(added)
}
