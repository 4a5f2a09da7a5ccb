//! Verification-code records, keyed by pseudonym: read and rewritten atomically, pruned once
//! they no longer matter. The code itself is never stored, only its hash.

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tidings_core::verification::{CodeRecord, LiveCode};
use tidings_core::Millis;

use super::rows::{millis, pack_times, sql_millis, unpack_times};
use crate::{Pseudonym, Result};

/// [`Store::update_code_record`](crate::Store::update_code_record).
pub(super) fn update_code_record<R>(
    txn: &Transaction<'_>,
    pseudonym: Pseudonym,
    update: impl FnOnce(&mut Option<CodeRecord>) -> R,
) -> Result<R> {
    let mut record = txn
        .prepare_cached(
            "SELECT live_hash, live_expires_at, live_attempts, sent_at FROM codes WHERE pseudonym = ?1")?.query_row(
            params![&pseudonym.0[..]],
            |row| {
                let hash: Option<Vec<u8>> = row.get(0)?;
                let expires: Option<i64> = row.get(1)?;
                let attempts: Option<i64> = row.get(2)?;
                let sent: Vec<u8> = row.get(3)?;
                let live = match (hash, expires, attempts) {
                    (Some(hash), Some(expires), Some(attempts)) => {
                        <[u8; 32]>::try_from(hash.as_slice()).ok().map(|hash| LiveCode {
                            hash,
                            expires_at: millis(expires),
                            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
                        })
                    }
                    _ => None,
                };
                Ok(CodeRecord { live, sent_at: unpack_times(&sent) })
            },
        )
        .optional()?;
    let value = update(&mut record);
    match record {
        None => {
            txn.prepare_cached("DELETE FROM codes WHERE pseudonym = ?1")?
                .execute(params![&pseudonym.0[..]])?;
        }
        Some(record) => {
            let (hash, expires, attempts) = match &record.live {
                Some(live) => (
                    Some(live.hash.to_vec()),
                    Some(sql_millis(live.expires_at)),
                    Some(i64::from(live.attempts)),
                ),
                None => (None, None, None),
            };
            txn.prepare_cached(
                "INSERT INTO codes (pseudonym, live_hash, live_expires_at, live_attempts, sent_at)
                 VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (pseudonym) DO UPDATE SET live_hash = ?2, live_expires_at = ?3,
                     live_attempts = ?4, sent_at = ?5",
            )?
            .execute(params![
                &pseudonym.0[..],
                hash,
                expires,
                attempts,
                pack_times(&record.sent_at)
            ])?;
        }
    }
    Ok(value)
}

/// Whether any code record is stored (most prunes find none, and then write nothing).
pub(super) fn any_code_record(conn: &Connection) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM codes LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_some())
}

/// [`Store::prune_codes`](crate::Store::prune_codes).
pub(super) fn prune_codes(txn: &Transaction<'_>, now: Millis) -> Result<usize> {
    let policy = tidings_core::verification::CodePolicy::default();
    let spent = {
        let mut statement =
            txn.prepare_cached("SELECT pseudonym, live_expires_at, sent_at FROM codes")?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Option<i64>>(1)?,
                    row.get::<_, Vec<u8>>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .filter(|(_, expires, sent)| {
                let live_until = expires.map(millis).unwrap_or(0);
                let record = CodeRecord {
                    live: (live_until > now).then_some(LiveCode {
                        hash: [0; 32],
                        expires_at: live_until,
                        attempts: 0,
                    }),
                    sent_at: unpack_times(sent),
                };
                record.is_spent(&policy, now)
            })
            .map(|(pseudonym, _, _)| pseudonym)
            .collect::<Vec<_>>()
    };
    for pseudonym in &spent {
        txn.prepare_cached("DELETE FROM codes WHERE pseudonym = ?1")?
            .execute(params![pseudonym])?;
    }
    Ok(spent.len())
}
