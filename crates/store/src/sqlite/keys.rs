//! Device keys: identity keys, one-time and fallback keys, their claims, and the directory's
//! listing of an account's devices.
//!
//! A one-time key is handed out at most once; identity keys are stored once and never changed.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tidings_proto::id::DeviceId;

use super::rows::{device_id, identity_of, signed_key, voucher_of};
use crate::{
    AccountId, Claimed, ClaimedKey, IdentityKeys, KeyStatus, ListedDevice, Published, Result,
    SignedKey, StoreError,
};

/// A device's key supply, read on `conn`.
pub(super) fn key_status_in(conn: &Connection, device: DeviceId) -> Result<KeyStatus> {
    let (one_time_keys, fallback): (i64, i64) = conn
        .prepare_cached(
            "SELECT COALESCE(SUM(fallback = 0), 0), COALESCE(SUM(fallback = 1), 0)
             FROM one_time_keys WHERE device_id = ?1",
        )?
        .query_row(params![device.as_bytes()], |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?;
    let has_identity = conn
        .prepare_cached("SELECT 1 FROM devices WHERE id = ?1 AND identity_key IS NOT NULL")?
        .query_row(params![device.as_bytes()], |_| Ok(()))
        .optional()?
        .is_some();
    Ok(KeyStatus {
        one_time_keys: u32::try_from(one_time_keys).unwrap_or(u32::MAX),
        published: has_identity && fallback > 0,
    })
}

/// The devices of an account as the directory lists them, with their queue lengths.
pub(super) fn listed_devices(
    conn: &Connection,
    account: AccountId,
) -> rusqlite::Result<Vec<(ListedDevice, i64)>> {
    let mut statement = conn.prepare_cached(
        "SELECT id, identity_key, signing_key, queue_len, voucher, voucher_signature
         FROM devices WHERE account_id = ?1",
    )?;
    let rows = statement
        .query_map(params![account.0], |row| {
            Ok((
                ListedDevice {
                    id: device_id(row.get(0)?)?,
                    identity: identity_of(row.get(1)?, row.get(2)?),
                    voucher: voucher_of(row.get(4)?, row.get(5)?),
                },
                row.get::<_, i64>(3)?,
            ))
        })?
        .collect();
    rows
}

/// [`Store::set_contact_token`](crate::Store::set_contact_token).
pub(super) fn set_contact_token(
    txn: &Transaction<'_>,
    device: DeviceId,
    hash: [u8; 32],
) -> Result<()> {
    let changed = txn
        .prepare_cached("UPDATE devices SET contact_token_hash = ?2 WHERE id = ?1")?
        .execute(params![device.as_bytes(), &hash[..]])?;
    if changed == 0 {
        return Err(crate::StoreError::Revoked);
    }
    Ok(())
}

/// [`Store::publish_keys`](crate::Store::publish_keys).
pub(super) fn publish_keys(
    txn: &Transaction<'_>,
    device: DeviceId,
    identity: IdentityKeys,
    one_time_keys: Vec<SignedKey>,
    fallback: Option<SignedKey>,
    max_stored: u32,
) -> Result<Published> {
    let stored = txn
        .prepare_cached("SELECT identity_key, signing_key FROM devices WHERE id = ?1")?
        .query_row(params![device.as_bytes()], |row| {
            Ok(identity_of(row.get(0)?, row.get(1)?))
        })
        .optional()?;
    match stored {
        // The device is the actor: gone, it publishes nothing.
        None => return Err(StoreError::Revoked),
        Some(Some(existing)) if existing != identity => return Ok(Published::IdentityMismatch),
        Some(Some(_)) => {}
        Some(None) => {
            txn.prepare_cached(
                "UPDATE devices SET identity_key = ?2, signing_key = ?3 WHERE id = ?1",
            )?
            .execute(params![
                device.as_bytes(),
                &identity.identity_key[..],
                &identity.signing_key[..]
            ])?;
        }
    }
    let count_keys = || -> rusqlite::Result<u32> {
        let count: i64 = txn
            .prepare_cached(
                "SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?1 AND fallback = 0",
            )?
            .query_row(params![device.as_bytes()], |row| row.get(0))?;
        Ok(u32::try_from(count).unwrap_or(u32::MAX))
    };
    let new = u32::try_from(one_time_keys.len()).unwrap_or(u32::MAX);
    if count_keys()?.saturating_add(new) > max_stored {
        return Ok(Published::TooMany);
    }
    let mut insert = txn.prepare_cached(
        "INSERT OR IGNORE INTO one_time_keys (device_id, fallback, public_key, signature) VALUES (?1, ?2, ?3, ?4)",
    )?;
    for key in &one_time_keys {
        insert.execute(params![
            device.as_bytes(),
            false,
            &key.public_key[..],
            &key.signature[..]
        ])?;
    }
    let count = count_keys()?;
    if let Some(key) = fallback {
        txn.prepare_cached("DELETE FROM one_time_keys WHERE device_id = ?1 AND fallback = 1")?
            .execute(params![device.as_bytes()])?;
        insert.execute(params![
            device.as_bytes(),
            true,
            &key.public_key[..],
            &key.signature[..]
        ])?;
    }
    Ok(Published::Stored {
        one_time_keys: count,
    })
}

/// [`Store::claim_keys`](crate::Store::claim_keys).
pub(super) fn claim_keys(
    txn: &Transaction<'_>,
    account: AccountId,
    only: Vec<DeviceId>,
) -> Result<Claimed> {
    let devices = listed_devices(txn, account)?;
    let mut claimed = Claimed {
        keys: Vec::new(),
        unknown: only
            .iter()
            .copied()
            .filter(|d| !devices.iter().any(|(l, _)| l.id == *d))
            .collect(),
    };
    // A claim naming a device that is not there hands out nothing at all.
    if !claimed.unknown.is_empty() {
        return Ok(claimed);
    }
    for (listed, _) in devices {
        let (device, voucher) = (listed.id, listed.voucher);
        let Some(identity) = listed.identity else {
            continue;
        };
        if !only.is_empty() && !only.contains(&device) {
            continue;
        }
        // One-time keys first, each handed out once; the fallback key only when none is
        // left, and it stays (new sessions keep working while the device is offline).
        let one_time = txn
            .prepare_cached(
                "SELECT public_key, signature FROM one_time_keys WHERE device_id = ?1 AND fallback = 0 LIMIT 1")?.query_row(
                params![device.as_bytes()],
                |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)),
            )
            .optional()?;
        let (key, fallback) = match one_time {
            Some((public_key, signature)) => {
                txn.prepare_cached(
                    "DELETE FROM one_time_keys WHERE device_id = ?1 AND fallback = 0 AND public_key = ?2")?.execute(
                    params![device.as_bytes(), &public_key],
                )?;
                (signed_key(public_key, signature), false)
            }
            None => {
                let fallback = txn
                    .prepare_cached(
                        "SELECT public_key, signature FROM one_time_keys WHERE device_id = ?1 AND fallback = 1")?.query_row(
                        params![device.as_bytes()],
                        |row| Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?)),
                    )
                    .optional()?;
                (fallback.and_then(|(k, s)| signed_key(k, s)), true)
            }
        };
        if let Some(key) = key {
            claimed.keys.push(ClaimedKey {
                device,
                identity,
                key,
                fallback,
                voucher,
            });
        }
    }
    Ok(claimed)
}

/// [`Store::device_keys`](crate::Store::device_keys).
pub(super) fn device_keys(conn: &Connection, account: AccountId) -> Result<Vec<ListedDevice>> {
    Ok(listed_devices(conn, account)?
        .into_iter()
        .map(|(listed, _)| listed)
        .collect())
}
