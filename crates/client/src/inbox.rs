//! Received messages, kept in the profile so that each is shown exactly once.
//!
//! A delivery is stored *before* it is acknowledged, keyed by (sending device, message id). A
//! redelivery after a crash or a restart finds the row and is acknowledged again without being
//! shown again. SQLite in WAL mode lets several processes share one profile safely.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension as _};
use tidings_proto::id::{DeviceId, MessageId};

use crate::Result;

/// A message as the inbox keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    pub sender_device: DeviceId,
    pub id: MessageId,
    /// The sender's number as the message claims it.
    pub from: String,
    pub text: String,
    pub sent_at_ms: u64,
    /// Whether `sender_device` belongs to `from` according to the server's directory.
    pub sender_verified: bool,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// The profile's message store.
#[derive(Debug)]
pub struct Inbox {
    conn: Connection,
}

impl Inbox {
    /// Opens (creating) `inbox.sqlite` in the profile directory.
    pub fn open(profile_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(profile_dir)
            .map_err(|e| crate::ClientError::Inbox(e.to_string()))?;
        let conn = Connection::open(profile_dir.join("inbox.sqlite"))?;
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS received (
                 sender_device BLOB NOT NULL,
                 msg_id BLOB NOT NULL,
                 sender TEXT NOT NULL,
                 body TEXT NOT NULL,
                 sent_at INTEGER NOT NULL,
                 sender_verified INTEGER NOT NULL,
                 shown INTEGER NOT NULL DEFAULT 0,
                 PRIMARY KEY (sender_device, msg_id)
             ) WITHOUT ROWID;
             CREATE TABLE IF NOT EXISTS outgoing (
                 msg_id BLOB PRIMARY KEY,
                 receiver TEXT NOT NULL,
                 body TEXT NOT NULL,
                 state TEXT NOT NULL,
                 done INTEGER NOT NULL DEFAULT 0
             ) WITHOUT ROWID;",
        )?;
        Ok(Self { conn })
    }

    /// Stores a delivery unless it is already there. Durable when this returns.
    pub fn store(&self, message: &Received) -> Result<()> {
        self.conn.execute(
            "INSERT OR IGNORE INTO received (sender_device, msg_id, sender, body, sent_at, sender_verified)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                message.sender_device.as_bytes(),
                message.id.as_bytes(),
                message.from,
                message.text,
                i64::try_from(message.sent_at_ms).unwrap_or(i64::MAX),
                message.sender_verified
            ],
        )?;
        Ok(())
    }

    /// Marks a stored message as shown and returns it, exactly once: a second call for the same
    /// message (from this or another process) returns `None`.
    pub fn take_to_show(&self, sender_device: DeviceId, id: MessageId) -> Result<Option<Received>> {
        let changed = self.conn.execute(
            "UPDATE received SET shown = 1 WHERE sender_device = ?1 AND msg_id = ?2 AND shown = 0",
            params![sender_device.as_bytes(), id.as_bytes()],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        let row = self
            .conn
            .query_row(
                "SELECT sender, body, sent_at, sender_verified FROM received WHERE sender_device = ?1 AND msg_id = ?2",
                params![sender_device.as_bytes(), id.as_bytes()],
                |row| {
                    Ok(Received {
                        sender_device,
                        id,
                        from: row.get(0)?,
                        text: row.get(1)?,
                        sent_at_ms: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
                        sender_verified: row.get(3)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    /// Records an outgoing message's routing state (see [`crate::route`]).
    pub fn save_outgoing(
        &self,
        id: MessageId,
        receiver: &str,
        body: &str,
        state: &str,
        done: bool,
    ) -> Result<()> {
        self.conn.execute(
            "INSERT INTO outgoing (msg_id, receiver, body, state, done) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (msg_id) DO UPDATE SET state = ?4, done = ?5",
            params![id.as_bytes(), receiver, body, state, done],
        )?;
        Ok(())
    }

    /// Outgoing messages whose route is not finished: (id, receiver, body, state).
    pub fn pending_outgoing(&self) -> Result<Vec<(MessageId, String, String, String)>> {
        let mut statement = self.conn.prepare(
            "SELECT msg_id, receiver, body, state FROM outgoing WHERE done = 0 LIMIT 10000",
        )?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, to, body, state)| {
                MessageId::from_slice(&id).map(|id| (id, to, body, state))
            })
            .collect())
    }

    /// Forgets a stored delivery that the server says was withdrawn, so it is never shown.
    pub fn discard(&self, sender_device: DeviceId, id: MessageId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM received WHERE sender_device = ?1 AND msg_id = ?2 AND shown = 0",
            params![sender_device.as_bytes(), id.as_bytes()],
        )?;
        Ok(())
    }

    /// Whether this message is already stored.
    pub fn contains(&self, sender_device: DeviceId, id: MessageId) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM received WHERE sender_device = ?1 AND msg_id = ?2",
                params![sender_device.as_bytes(), id.as_bytes()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }
}
