//! Accounts and devices: registering, linking, removing, vouching, deleting an account, and the
//! reads of who has which devices.
//!
//! Every deletion takes with it what refers to the deleted rows ([`delete_devices`]): the
//! schema's cascades are the writer's to do.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tidings_core::Millis;
use tidings_proto::id::DeviceId;

use super::messages::{
    delete_copies, delete_if_no_copies, delete_single_copies, note_deleted_copy,
    COPY_SENDER_AND_BYTES,
};
use super::rows::{device_id, sql_millis};
use super::writer::Notes;
use crate::{
    AccountDevices, AccountId, Actor, Backlog, Device, IdentityKeys, KeyStatus, Linked, Pseudonym,
    Registered, Rekeyed, Result, StoreError, Voucher,
};

/// A registered device, read on `conn`.
pub(super) fn device_in(conn: &Connection, id: DeviceId) -> Result<Option<Device>> {
    let row = conn
        .prepare_cached(
            "SELECT devices.account_id, devices.public_key, accounts.pseudonym
             FROM devices JOIN accounts ON accounts.id = devices.account_id WHERE devices.id = ?1",
        )?
        .query_row(params![id.as_bytes()], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
            ))
        })
        .optional()?;
    Ok(row.and_then(|(account, key, pseudonym)| {
        let public_key = <[u8; 32]>::try_from(key.as_slice()).ok()?;
        let pseudonym = <[u8; 32]>::try_from(pseudonym.as_slice()).ok()?;
        Some(Device {
            id,
            account: AccountId(account),
            pseudonym: Pseudonym(pseudonym),
            public_key,
        })
    }))
}

/// Refuses an operation whose actor is no longer a device of its account ([`Actor`]): read in
/// the operation's own transaction, so that a removal committed before it is seen.
pub(super) fn check_actor(txn: &Transaction<'_>, actor: Actor) -> Result<()> {
    let theirs = txn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1 AND account_id = ?2")?
        .query_row(
            params![actor.device.as_bytes(), actor.account.0],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if theirs {
        Ok(())
    } else {
        Err(StoreError::Revoked)
    }
}

/// The one rule that names an account by pseudonym: the account whose pseudonym it is, or,
/// while the server holds its previous OPRF key, the one that had it under that key
/// (`accounts.previous_pseudonym`). Every lookup of an account by pseudonym uses it.
/// A macro so that statements embed it in their literal (no text built per call).
macro_rules! account_of_pseudonym {
    () => {
        "SELECT id FROM accounts WHERE pseudonym = ?1 OR previous_pseudonym = ?1 LIMIT 1"
    };
}

/// The account a pseudonym names (`account_of_pseudonym!`), read on `conn`.
pub(super) fn account_id_of(conn: &Connection, pseudonym: Pseudonym) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached(account_of_pseudonym!())?
        .query_row(params![&pseudonym.0[..]], |row| row.get::<_, i64>(0))
        .optional()?)
}

/// The account behind a pseudonym and its devices, read on `conn` in one statement (a lookup
/// runs it once per number of a phonebook).
pub(super) fn account_in(
    conn: &Connection,
    pseudonym: Pseudonym,
) -> Result<Option<AccountDevices>> {
    let mut statement = conn.prepare_cached(concat!(
        "SELECT accounts.id, devices.id, devices.queue_len
         FROM accounts LEFT JOIN devices ON devices.account_id = accounts.id
         WHERE accounts.id = (",
        account_of_pseudonym!(),
        ")"
    ))?;
    let mut rows = statement.query(params![&pseudonym.0[..]])?;
    let mut found: Option<AccountDevices> = None;
    while let Some(row) = rows.next()? {
        let id = AccountId(row.get(0)?);
        let account = found.get_or_insert_with(|| AccountDevices {
            account: id,
            devices: Vec::new(),
        });
        // An account without devices has one row, with no device in it.
        if let Some(id) = row.get::<_, Option<Vec<u8>>>(1)? {
            account.devices.push((
                device_id(id)?,
                u32::try_from(row.get::<_, i64>(2)?).unwrap_or(u32::MAX),
            ));
        }
    }
    Ok(found)
}

/// [`Store::login_device`](crate::Store::login_device): [`resume_device`] without the backlog.
pub(super) fn login_device(conn: &Connection, id: DeviceId) -> Result<Option<(Device, KeyStatus)>> {
    Ok(resume_device(conn, id)?.map(|(device, keys, _)| (device, keys)))
}

/// [`Store::resume_device`](crate::Store::resume_device): a device, its key supply and what
/// waits for it, read on `conn` in one statement. Every login and every resumed connect runs
/// it: one statement is one read transaction, whose locks (on the database file and on the
/// write-ahead log's index) are system calls, where a statement each for the device, its
/// one-time keys, its identity key and its backlog took four. It answers what [`device_in`],
/// [`key_status_in`](super::keys::key_status_in) and
/// [`backlog`](super::receipts::backlog) answer together.
pub(super) fn resume_device(
    conn: &Connection,
    id: DeviceId,
) -> Result<Option<(Device, KeyStatus, Backlog)>> {
    let row = conn
        .prepare_cached(
            "SELECT devices.account_id, devices.public_key, accounts.pseudonym,
                    devices.identity_key IS NOT NULL,
                    (SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?1 AND fallback = 0),
                    EXISTS (SELECT 1 FROM one_time_keys WHERE device_id = ?1 AND fallback = 1),
                    devices.queue_len > 0,
                    EXISTS (SELECT 1 FROM receipts WHERE device_id = ?1),
                    devices.missed
             FROM devices JOIN accounts ON accounts.id = devices.account_id WHERE devices.id = ?1",
        )?
        .query_row(params![id.as_bytes()], |row| {
            let backlog = Backlog {
                registered: true,
                queued: row.get(6)?,
                receipts: row.get(7)?,
                missed: u32::try_from(row.get::<_, i64>(8)?).unwrap_or(u32::MAX),
            };
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Vec<u8>>(1)?,
                row.get::<_, Vec<u8>>(2)?,
                row.get::<_, bool>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, bool>(5)?,
                backlog,
            ))
        })
        .optional()?;
    Ok(row.and_then(
        |(account, key, pseudonym, has_identity, one_time_keys, has_fallback, backlog)| {
            let public_key = <[u8; 32]>::try_from(key.as_slice()).ok()?;
            let pseudonym = <[u8; 32]>::try_from(pseudonym.as_slice()).ok()?;
            let device = Device {
                id,
                account: AccountId(account),
                pseudonym: Pseudonym(pseudonym),
                public_key,
            };
            let keys = KeyStatus {
                one_time_keys: u32::try_from(one_time_keys).unwrap_or(u32::MAX),
                published: has_identity && has_fallback,
            };
            Some((device, keys, backlog))
        },
    ))
}

/// [`Store::devices_of`](crate::Store::devices_of).
pub(super) fn devices_of(conn: &Connection, account: AccountId) -> Result<Vec<DeviceId>> {
    let mut statement = conn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
    let devices = statement
        .query_map(params![account.0], |row| device_id(row.get(0)?))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(devices)
}

/// [`Store::register_device`](crate::Store::register_device).
pub(super) fn register_device(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    pseudonym: Pseudonym,
    key_version: u32,
    device: DeviceId,
    public_key: [u8; 32],
    now: Millis,
) -> Result<Registered> {
    let account = match account_id_of(txn, pseudonym)? {
        Some(account) => account,
        None => {
            // A new account takes the id after the last one ever handed out (see
            // `account_ids` in the schema).
            txn.prepare_cached("UPDATE account_ids SET last = last + 1")?
                .execute([])?;
            txn.prepare_cached(
                "INSERT INTO accounts (id, pseudonym, created_at, key_version)
                 SELECT last, ?1, ?2, ?3 FROM account_ids",
            )?
            .execute(params![&pseudonym.0[..], sql_millis(now), key_version])?;
            txn.prepare_cached("SELECT last FROM account_ids")?
                .query_row([], |row| row.get(0))?
        }
    };
    let removed = {
        let mut statement = txn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
        let removed = statement
            .query_map(params![account], |row| device_id(row.get(0)?))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        removed
    };
    // Messages queued for this account go, with the copies their senders' other devices
    // hold; then the old devices, with their queues, receipts and keys.
    delete_copies(
        txn,
        notes,
        "seq IN (SELECT seq FROM messages WHERE receiver_account = ?1)",
        params![account],
    )?;
    txn.prepare_cached("DELETE FROM messages WHERE receiver_account = ?1")?
        .execute(params![account])?;
    delete_devices(txn, notes, &removed)?;
    notes.devices_changed = true;
    txn.prepare_cached(
        "INSERT INTO devices (id, account_id, public_key, created_at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        device.as_bytes(),
        account,
        &public_key[..],
        sql_millis(now)
    ])?;
    Ok(Registered {
        account: AccountId(account),
        removed,
    })
}

/// [`Store::add_device`](crate::Store::add_device): `device` joins its account.
pub(super) fn add_device(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    (account, device, public_key): (AccountId, DeviceId, [u8; 32]),
    identity: IdentityKeys,
    max_devices: usize,
    now: Millis,
) -> Result<Linked> {
    let count: i64 = txn
        .prepare_cached("SELECT COUNT(*) FROM devices WHERE account_id = ?1")?
        .query_row(params![account.0], |row| row.get(0))?;
    if count == 0 {
        return Err(StoreError::NoSuchAccount);
    }
    if usize::try_from(count).unwrap_or(usize::MAX) >= max_devices {
        return Ok(Linked::TooManyDevices);
    }
    notes.devices_changed = true;
    txn.prepare_cached(
        "INSERT INTO devices (id, account_id, public_key, created_at, identity_key, signing_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        device.as_bytes(),
        account.0,
        &public_key[..],
        sql_millis(now),
        &identity.identity_key[..],
        &identity.signing_key[..]
    ])?;
    Ok(Linked::Added)
}

/// [`Store::remove_device`](crate::Store::remove_device).
pub(super) fn remove_device(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    account: AccountId,
    device: DeviceId,
) -> Result<bool> {
    let theirs = txn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1 AND account_id = ?2")?
        .query_row(params![device.as_bytes(), account.0], |_| Ok(()))
        .optional()?
        .is_some();
    if !theirs {
        return Ok(false);
    }
    // Keys, queued copies and receipts go with the device.
    delete_devices(txn, notes, &[device])?;
    Ok(true)
}

/// [`Store::set_voucher`](crate::Store::set_voucher).
pub(super) fn set_voucher(
    txn: &Transaction<'_>,
    account: AccountId,
    device: DeviceId,
    voucher: Voucher,
) -> Result<bool> {
    check_actor(
        txn,
        Actor {
            account,
            device: voucher.by,
        },
    )?;
    let changed = txn
        .prepare_cached(
            "UPDATE devices SET voucher = ?3, voucher_signature = ?4
         WHERE id = ?1 AND account_id = ?2 AND voucher IS NULL
           AND EXISTS (SELECT 1 FROM devices WHERE id = ?3 AND account_id = ?2)",
        )?
        .execute(params![
            device.as_bytes(),
            account.0,
            voucher.by.as_bytes(),
            &voucher.signature[..]
        ])?;
    Ok(changed > 0)
}

/// [`Store::delete_account`](crate::Store::delete_account).
pub(super) fn delete_account(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    account: AccountId,
) -> Result<Vec<DeviceId>> {
    let devices = {
        let mut statement = txn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
        let devices = statement
            .query_map(params![account.0], |row| device_id(row.get(0)?))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        devices
    };
    // Undelivered messages this account sent go too: opting out leaves nothing behind.
    for device in &devices {
        delete_copies(
            txn,
            notes,
            "seq IN (SELECT seq FROM messages WHERE sender_device = ?1)",
            params![device.as_bytes()],
        )?;
        txn.prepare_cached("DELETE FROM messages WHERE sender_device = ?1")?
            .execute(params![device.as_bytes()])?;
        delete_single_copies(txn, notes, "sender_device = ?1", params![device.as_bytes()])?;
        txn.prepare_cached("DELETE FROM withdrawn WHERE sender_device = ?1")?
            .execute(params![device.as_bytes()])?;
    }
    txn.prepare_cached(
        "DELETE FROM codes WHERE pseudonym = (SELECT pseudonym FROM accounts WHERE id = ?1)",
    )?
    .execute(params![account.0])?;
    delete_copies(
        txn,
        notes,
        "seq IN (SELECT seq FROM messages WHERE receiver_account = ?1)",
        params![account.0],
    )?;
    txn.prepare_cached("DELETE FROM messages WHERE receiver_account = ?1")?
        .execute(params![account.0])?;
    delete_devices(txn, notes, &devices)?;
    notes.devices_changed = true;
    let deleted = txn
        .prepare_cached("DELETE FROM accounts WHERE id = ?1")?
        .execute(params![account.0])?;
    if deleted == 0 {
        return Err(StoreError::NoSuchAccount);
    }
    Ok(devices)
}

/// Deletes devices with everything that refers to them: their queued copies (and each message left
/// with no copy), their receipts and their keys. The schema's cascades, done by the writer (see
/// [`SCHEMA`](super::schema::SCHEMA)). The devices' queue-length changes noted in the batch go with
/// their rows, so that a device made again with the same id starts from zero.
pub(super) fn delete_devices(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    devices: &[DeviceId],
) -> Result<()> {
    for device in devices {
        let id = device.as_bytes();
        let copies = {
            let mut statement = txn.prepare_cached(&format!(
                "DELETE FROM copies WHERE device_id = ?1 RETURNING seq, {COPY_SENDER_AND_BYTES}"
            ))?;
            let copies = statement
                .query_map(params![id], |row| {
                    Ok((row.get::<_, i64>(0)?, row.get(1)?, row.get(2)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            copies
        };
        for (seq, sender, bytes) in copies {
            note_deleted_copy(notes, *device, seq, sender, bytes);
            delete_if_no_copies(txn, seq)?;
        }
        // Its single copies are whole messages.
        delete_single_copies(txn, notes, "device_id = ?1", params![id])?;
        txn.prepare_cached("DELETE FROM receipts WHERE device_id = ?1")?
            .execute(params![id])?;
        txn.prepare_cached("DELETE FROM one_time_keys WHERE device_id = ?1")?
            .execute(params![id])?;
        txn.prepare_cached("DELETE FROM devices WHERE id = ?1")?
            .execute(params![id])?;
        notes.queued.forget(*device);
        notes.devices_changed = true;
    }
    Ok(())
}

/// [`Store::rekey_account`](crate::Store::rekey_account): moves the account from `old` to `new`
/// (keeping `old` as its previous pseudonym), if `old` is still its pseudonym.
pub(super) fn rekey_account(
    txn: &Transaction<'_>,
    account: AccountId,
    old: Pseudonym,
    new: Pseudonym,
    key_version: u32,
) -> Result<Rekeyed> {
    let current: Option<Vec<u8>> = txn
        .prepare_cached("SELECT pseudonym FROM accounts WHERE id = ?1")?
        .query_row(params![account.0], |row| row.get(0))
        .optional()?;
    let Some(current) = current else {
        return Err(StoreError::NoSuchAccount);
    };
    if current == new.0 {
        txn.prepare_cached("UPDATE accounts SET key_version = ?2 WHERE id = ?1")?
            .execute(params![account.0, key_version])?;
        return Ok(Rekeyed::AlreadyMoved);
    }
    if current != old.0 {
        return Ok(Rekeyed::NotItsPseudonym);
    }
    let clash = txn
        .prepare_cached(
            "SELECT 1 FROM accounts WHERE id != ?1
             AND (pseudonym IN (?2, ?3) OR previous_pseudonym IN (?2, ?3))",
        )?
        .exists(params![account.0, &old.0[..], &new.0[..]])?;
    if clash {
        return Err(StoreError::engine("the pseudonym names another account"));
    }
    txn.prepare_cached(
        "UPDATE accounts SET previous_pseudonym = pseudonym, pseudonym = ?2, key_version = ?3
         WHERE id = ?1",
    )?
    .execute(params![account.0, &new.0[..], key_version])?;
    Ok(Rekeyed::Moved)
}

/// [`Store::accounts_by_key_version`](crate::Store::accounts_by_key_version), read on `conn`.
pub(super) fn accounts_by_key_version(conn: &Connection) -> Result<Vec<(u32, u64)>> {
    let mut statement = conn.prepare_cached(
        "SELECT key_version, COUNT(*) FROM accounts GROUP BY key_version ORDER BY key_version",
    )?;
    let counts = statement
        .query_map([], |row| {
            Ok((
                u32::try_from(row.get::<_, i64>(0)?).unwrap_or(0),
                u64::try_from(row.get::<_, i64>(1)?).unwrap_or(0),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(counts)
}

/// [`Store::forget_previous_pseudonyms`](crate::Store::forget_previous_pseudonyms).
pub(super) fn forget_previous_pseudonyms(txn: &Transaction<'_>, notes: &mut Notes) -> Result<u64> {
    let forgotten = txn
        .prepare_cached(
            "UPDATE accounts SET previous_pseudonym = NULL WHERE previous_pseudonym IS NOT NULL",
        )?
        .execute([])?;
    // Routes held under a forgotten pseudonym must go with it.
    notes.devices_changed = true;
    Ok(forgotten as u64)
}
