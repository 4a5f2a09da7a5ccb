//! The profile's local store (`inbox.sqlite`): the sealed end-to-end state and the received
//! messages, each sealed under the passphrase's key (see [`crate::vault`]).
//!
//! Why one SQLite file: decrypting a message advances its Olm session, and the new session state
//! and the message must become durable together, before the message is acknowledged. One
//! `BEGIN IMMEDIATE` transaction does that, and also serialises several processes working on one
//! profile (a `listen` and a `send` at once): each reads the newest state, changes it and writes
//! it back before the next may start. A process killed at any point leaves the state before or
//! after a whole change: never a session that was used but not saved (a reused message key), and
//! never a message acknowledged but not kept.
//!
//! A delivery is stored *before* it is acknowledged, keyed by (sending device, message id). A
//! redelivery after a crash or a restart finds the row and is acknowledged again without being
//! decrypted or shown again.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension as _, TransactionBehavior};
use serde::{Deserialize, Serialize};
use tidings_proto::id::{DeviceId, MessageId};

use crate::discovery::Pseudonyms;
use crate::e2e::Crypto;
use crate::profile::PinnedKey;
use crate::vault::{Passphrase, Vault, VaultHeader};
use crate::{ClientError, Result};

/// Most stored-but-unshown messages acknowledged again when a session opens: a receiver
/// device's server queue holds at most 10,000, so this covers every one a crash can leave.
pub const MAX_UNSHOWN_PER_START: u32 = 10_000;

/// A message as the inbox keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct Received {
    pub sender_device: DeviceId,
    pub id: MessageId,
    /// The sender's number as the message claims it.
    pub from: String,
    /// The receiver's number (differs from this profile's for a copy sent by another of its own
    /// devices).
    pub to: String,
    pub text: String,
    pub sent_at_ms: u64,
    /// Whether the sending device's identity key is the one the directory lists for `from`.
    pub sender_verified: bool,
    /// Why the message must not be taken at face value, if it must not.
    pub warning: Option<String>,
}

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// An outgoing message as the profile keeps it, with its routing state (see [`crate::route`]).
pub struct KeptOutgoing {
    pub id: MessageId,
    /// The receiver's number.
    pub receiver: String,
    pub body: String,
    /// The route's state, as `route` stores it.
    pub state: String,
    /// Whether the route has finished.
    pub done: bool,
}

impl std::fmt::Debug for KeptOutgoing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptOutgoing")
            .field("id", &self.id)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct SealedMessage {
    from: String,
    to: String,
    text: String,
    sent_at_ms: u64,
    sender_verified: bool,
    warning: Option<String>,
}

const CRYPTO_NAME: &str = "crypto-state";
const PSEUDONYMS_NAME: &str = "pseudonyms";

fn message_name(sender_device: DeviceId, id: MessageId) -> String {
    format!("message:{}:{}", sender_device.to_text(), id.to_text())
}

fn outgoing_name(id: MessageId) -> String {
    format!("outgoing:{}", id.to_text())
}

fn open_connection(profile_dir: &Path) -> Result<Connection> {
    std::fs::create_dir_all(profile_dir).map_err(|e| ClientError::Inbox(e.to_string()))?;
    let conn = Connection::open(profile_dir.join("inbox.sqlite"))?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         CREATE TABLE IF NOT EXISTS vault (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             header TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS crypto (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             version INTEGER NOT NULL,
             sealed BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS messages (
             sender_device BLOB NOT NULL,
             msg_id BLOB NOT NULL,
             sealed BLOB NOT NULL,
             shown INTEGER NOT NULL DEFAULT 0,
             PRIMARY KEY (sender_device, msg_id)
         ) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS pseudonyms (
             id INTEGER PRIMARY KEY CHECK (id = 1),
             sealed BLOB NOT NULL
         );
         CREATE TABLE IF NOT EXISTS outgoing (
             msg_id BLOB PRIMARY KEY,
             sealed BLOB NOT NULL,
             done INTEGER NOT NULL DEFAULT 0
         ) WITHOUT ROWID;",
    )?;
    Ok(conn)
}

/// The profile's local store, unlocked.
#[derive(Debug)]
pub struct Inbox {
    conn: Connection,
    vault: Vault,
    /// The end-to-end state as of `version`: reused while no other process changed it, so a
    /// busy `listen` does not unseal and parse the whole state for every message.
    cache: Option<(i64, Crypto)>,
}

/// What a change to the end-to-end state asks for.
#[derive(Debug)]
pub enum Change<R> {
    /// Save the changed state with the rest of the transaction.
    Save(R),
    /// Nothing was changed: commit the rest of the transaction, keep the state as it was.
    Unchanged(R),
    /// Roll everything back, including changes already made to the state.
    Abandon(R),
}

/// One local transaction: read and change the end-to-end state and the messages together.
#[derive(Debug)]
pub struct Tx<'a> {
    conn: &'a Connection,
    vault: &'a Vault,
}

impl Inbox {
    /// Opens (creating) the store and unlocks it with `passphrase`. The first open of a profile
    /// sets the passphrase.
    pub fn open(profile_dir: &Path, passphrase: &Passphrase) -> Result<Self> {
        if passphrase.is_empty() {
            return Err(ClientError::Passphrase(
                "the passphrase is empty: set TIDINGS_PASSPHRASE, pass --passphrase-file, or type one at the prompt".into(),
            ));
        }
        let conn = open_connection(profile_dir)?;
        let stored: Option<String> = conn
            .query_row("SELECT header FROM vault WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?;
        let vault = match stored {
            Some(header) => {
                let header: VaultHeader = serde_json::from_str(&header)
                    .map_err(|e| ClientError::Inbox(format!("vault header is damaged: {e}")))?;
                Vault::unlock(passphrase, &header)?
            }
            None => {
                let (vault, header) = Vault::create(passphrase)?;
                let text = serde_json::to_string(&header)
                    .map_err(|e| ClientError::Inbox(e.to_string()))?;
                let inserted = conn.execute(
                    "INSERT OR IGNORE INTO vault (id, header) VALUES (1, ?1)",
                    params![text],
                )?;
                if inserted == 0 {
                    // Another process set the passphrase first: use that one.
                    return Self::open(profile_dir, passphrase);
                }
                vault
            }
        };
        Ok(Self {
            conn,
            vault,
            cache: None,
        })
    }

    /// Opens the store with a key already derived (see [`Inbox::vault`]): no second KDF run.
    pub fn open_unlocked(profile_dir: &Path, vault: Vault) -> Result<Self> {
        Ok(Self {
            conn: open_connection(profile_dir)?,
            vault,
            cache: None,
        })
    }

    /// The unlocked key, to open the store again without the KDF.
    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    fn version(conn: &Connection) -> Result<Option<i64>> {
        Ok(conn
            .query_row("SELECT version FROM crypto WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?)
    }

    /// The current state and its version: the cached one if no process changed it since, else
    /// unsealed anew. `conn` must be a transaction, so that the version and the state it names
    /// are read from one snapshot: a version read apart from the state may be newer than it
    /// (another process saved in between), and the cache would then hold an older state under
    /// the newer version.
    fn current(
        conn: &Connection,
        vault: &Vault,
        cache: &mut Option<(i64, Crypto)>,
    ) -> Result<(i64, Crypto)> {
        let Some(version) = Self::version(conn)? else {
            return Err(ClientError::Profile(
                "this profile has no encryption keys: register again (`tidings register`, then `tidings verify`)".into(),
            ));
        };
        if let Some((cached, crypto)) = cache.take() {
            if cached == version {
                return Ok((version, crypto));
            }
        }
        let sealed: Vec<u8> =
            conn.query_row("SELECT sealed FROM crypto WHERE id = 1", [], |row| {
                row.get(0)
            })?;
        let bytes = vault.open(CRYPTO_NAME, &sealed)?;
        Ok((version, Crypto::from_bytes(&bytes)?))
    }

    /// Changes the end-to-end state (and, through the [`Tx`], the messages) in one immediate
    /// transaction that commits only as `change` asks.
    pub fn update<R>(
        &mut self,
        change: impl FnOnce(&Tx<'_>, &mut Crypto) -> Result<Change<R>>,
    ) -> Result<R> {
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (version, mut crypto) = Self::current(&txn, &self.vault, &mut self.cache)?;
        let tx = Tx {
            conn: &txn,
            vault: &self.vault,
        };
        // On an error the state may be half changed: it is dropped, and the cache with it.
        match change(&tx, &mut crypto)? {
            Change::Save(value) => {
                let bytes = crypto.to_bytes()?;
                let sealed = self.vault.seal(CRYPTO_NAME, &bytes);
                txn.execute(
                    "UPDATE crypto SET version = ?1, sealed = ?2 WHERE id = 1",
                    params![version + 1, sealed],
                )?;
                txn.commit()?;
                self.cache = Some((version + 1, crypto));
                Ok(value)
            }
            Change::Unchanged(value) => {
                txn.commit()?;
                self.cache = Some((version, crypto));
                Ok(value)
            }
            Change::Abandon(value) => Ok(value),
        }
    }

    /// A look at the current state without changing it.
    ///
    /// Issue 30: the state and its version are read in one read transaction. Read apart, another
    /// process (a `send` beside a `listen`, or two `send`s) could save between the two reads;
    /// the cache then held the older state under the newer version, and this handle's next
    /// [`Inbox::update`] started from it and saved over the other's change: an Olm message key
    /// used twice, and a message that no device could decrypt although the server took it.
    pub fn look<R>(&mut self, look: impl FnOnce(&Crypto) -> R) -> Result<R> {
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Deferred)?;
        let (version, crypto) = Self::current(&txn, &self.vault, &mut self.cache)?;
        // Only read: ending it releases the snapshot.
        txn.rollback()?;
        let value = look(&crypto);
        self.cache = Some((version, crypto));
        Ok(value)
    }

    /// A copy of the current state, to try something on and throw away.
    pub fn snapshot(&mut self) -> Result<Crypto> {
        self.look(Crypto::duplicate)
    }

    /// Replaces the end-to-end state with what `make` builds from the old one (a registration).
    pub fn replace_crypto(
        &mut self,
        make: impl FnOnce(Option<Crypto>) -> Crypto,
    ) -> Result<Crypto> {
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let old = match Self::version(&txn)? {
            Some(_) => Some(Self::current(&txn, &self.vault, &mut self.cache)?.1),
            None => None,
        };
        let crypto = make(old);
        let bytes = crypto.to_bytes()?;
        let sealed = self.vault.seal(CRYPTO_NAME, &bytes);
        txn.execute(
            "INSERT INTO crypto (id, version, sealed) VALUES (1, 1, ?1)
             ON CONFLICT (id) DO UPDATE SET version = version + 1, sealed = ?1",
            params![sealed],
        )?;
        txn.commit()?;
        self.cache = None;
        Ok(crypto)
    }

    /// A read of the messages.
    pub fn read<R>(&self, look: impl FnOnce(&Tx<'_>) -> Result<R>) -> Result<R> {
        look(&Tx {
            conn: &self.conn,
            vault: &self.vault,
        })
    }

    /// Received messages stored but not yet shown (a process stopped between storing a message
    /// and the server's confirmation of its acknowledgement), as (sending device, message id),
    /// at most [`MAX_UNSHOWN_PER_START`] of them. They are not shown from here: the caller
    /// acknowledges each again and shows it only on `CONFIRMED` or `UNKNOWN` (a `WITHDRAWN`
    /// answer discards it), so a message its sender withdrew meanwhile is never shown. Those
    /// beyond the bound wait for the next start (or come again as deliveries).
    pub fn unshown(&self) -> Result<Vec<(DeviceId, MessageId)>> {
        let mut statement = self
            .conn
            .prepare("SELECT sender_device, msg_id FROM messages WHERE shown = 0 LIMIT ?1")?;
        let rows = statement
            .query_map([MAX_UNSHOWN_PER_START], |row| {
                Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, Vec<u8>>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(sender_device, id)| {
                Some((
                    DeviceId::from_slice(&sender_device)?,
                    MessageId::from_slice(&id)?,
                ))
            })
            .collect())
    }

    /// Marks a stored message as shown and returns it, exactly once: a second call for the same
    /// message (from this or another process) returns `None`.
    pub fn take_to_show(&self, sender_device: DeviceId, id: MessageId) -> Result<Option<Received>> {
        let changed = self.conn.execute(
            "UPDATE messages SET shown = 1 WHERE sender_device = ?1 AND msg_id = ?2 AND shown = 0",
            params![sender_device.as_bytes(), id.as_bytes()],
        )?;
        if changed == 0 {
            return Ok(None);
        }
        let sealed: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT sealed FROM messages WHERE sender_device = ?1 AND msg_id = ?2",
                params![sender_device.as_bytes(), id.as_bytes()],
                |row| row.get(0),
            )
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        self.unseal(sender_device, id, &sealed).map(Some)
    }

    /// Every received message kept in the profile, shown or not (the history).
    pub fn history(&self) -> Result<Vec<Received>> {
        Ok(self
            .history_with_shown()?
            .into_iter()
            .map(|(message, _)| message)
            .collect())
    }

    /// Every received message kept in the profile, each with whether it was shown.
    pub fn history_with_shown(&self) -> Result<Vec<(Received, bool)>> {
        // sender_device, msg_id, sealed, shown
        type Row = (Vec<u8>, Vec<u8>, Vec<u8>, bool);
        let rows: Vec<Row> = {
            let mut statement = self
                .conn
                .prepare("SELECT sender_device, msg_id, sealed, shown FROM messages")?;
            let rows = statement
                .query_map([], |row| {
                    Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let mut history = Vec::with_capacity(rows.len());
        for (sender_device, id, sealed, shown) in rows {
            let (Some(sender_device), Some(id)) = (
                DeviceId::from_slice(&sender_device),
                MessageId::from_slice(&id),
            ) else {
                continue;
            };
            history.push((self.unseal(sender_device, id, &sealed)?, shown));
        }
        Ok(history)
    }

    fn unseal(&self, sender_device: DeviceId, id: MessageId, sealed: &[u8]) -> Result<Received> {
        let plain = self.vault.open(&message_name(sender_device, id), sealed)?;
        let message: SealedMessage =
            serde_json::from_slice(&plain).map_err(|e| ClientError::Inbox(e.to_string()))?;
        Ok(Received {
            sender_device,
            id,
            from: message.from,
            to: message.to,
            text: message.text,
            sent_at_ms: message.sent_at_ms,
            sender_verified: message.sender_verified,
            warning: message.warning,
        })
    }

    /// Records an outgoing message and its state (see [`crate::outgoing`] and [`crate::route`]),
    /// sealed under the passphrase like everything else the profile keeps of messages: from
    /// before its first copy goes out until it is settled or its route finished (`done`).
    pub fn save_outgoing(
        &self,
        id: MessageId,
        receiver: &str,
        body: &str,
        state: &str,
        done: bool,
    ) -> Result<()> {
        let record =
            serde_json::json!({ "receiver": receiver, "body": body, "state": state }).to_string();
        let sealed = self.vault.seal(&outgoing_name(id), record.as_bytes());
        self.conn.execute(
            "INSERT INTO outgoing (msg_id, sealed, done) VALUES (?1, ?2, ?3)
             ON CONFLICT (msg_id) DO UPDATE SET sealed = ?2, done = ?3",
            params![id.as_bytes(), sealed, done],
        )?;
        Ok(())
    }

    /// Outgoing messages whose route is not finished: (id, receiver, body, state).
    pub fn pending_outgoing(&self) -> Result<Vec<(MessageId, String, String, String)>> {
        Ok(self
            .outgoing(false)?
            .into_iter()
            .map(|kept| (kept.id, kept.receiver, kept.body, kept.state))
            .collect())
    }

    /// Outgoing messages kept in the profile (finished ones too with `finished`), at most
    /// 10,000.
    pub fn outgoing(&self, finished: bool) -> Result<Vec<KeptOutgoing>> {
        let mut statement = self.conn.prepare(
            "SELECT msg_id, sealed, done FROM outgoing WHERE done = 0 OR ?1 LIMIT 10000",
        )?;
        let rows = statement
            .query_map([finished], |row| {
                Ok((
                    row.get::<_, Vec<u8>>(0)?,
                    row.get::<_, Vec<u8>>(1)?,
                    row.get::<_, bool>(2)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut kept = Vec::with_capacity(rows.len());
        for (id, sealed, done) in rows {
            let Some(id) = MessageId::from_slice(&id) else {
                continue;
            };
            let plain = self.vault.open(&outgoing_name(id), &sealed)?;
            let record: serde_json::Value =
                serde_json::from_slice(&plain).map_err(|e| ClientError::Inbox(e.to_string()))?;
            let field = |name: &str| record[name].as_str().unwrap_or_default().to_string();
            kept.push(KeptOutgoing {
                id,
                receiver: field("receiver"),
                body: field("body"),
                state: field("state"),
                done,
            });
        }
        Ok(kept)
    }

    /// The pseudonyms this profile learned (see [`crate::discovery`]), sealed like the rest.
    pub fn pseudonyms(&self) -> Result<Pseudonyms> {
        Self::read_pseudonyms(&self.conn, &self.vault)
    }

    fn read_pseudonyms(conn: &Connection, vault: &Vault) -> Result<Pseudonyms> {
        let sealed: Option<Vec<u8>> = conn
            .query_row("SELECT sealed FROM pseudonyms WHERE id = 1", [], |row| {
                row.get(0)
            })
            .optional()?;
        let Some(sealed) = sealed else {
            return Ok(Pseudonyms::default());
        };
        let plain = vault.open(PSEUDONYMS_NAME, &sealed)?;
        serde_json::from_slice(&plain)
            .map_err(|e| ClientError::Inbox(format!("learned pseudonyms are damaged: {e}")))
    }

    /// Adds pseudonyms learned under `key` to those kept, in one transaction (another process may
    /// have learned some meanwhile). Those learned under another key are dropped: they name no
    /// account any more.
    pub fn learn_pseudonyms(
        &mut self,
        key: &PinnedKey,
        learned: &[(String, [u8; 32])],
    ) -> Result<()> {
        let txn = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut kept = Self::read_pseudonyms(&txn, &self.vault)?;
        kept.learn(key, learned);
        let bytes = serde_json::to_vec(&kept).map_err(|e| ClientError::Inbox(e.to_string()))?;
        let sealed = self.vault.seal(PSEUDONYMS_NAME, &bytes);
        txn.execute(
            "INSERT INTO pseudonyms (id, sealed) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET sealed = ?1",
            params![sealed],
        )?;
        txn.commit()?;
        Ok(())
    }

    /// Forgets every learned pseudonym (the server's discovery key was pinned again).
    pub fn forget_pseudonyms(&self) -> Result<()> {
        self.conn.execute("DELETE FROM pseudonyms", [])?;
        Ok(())
    }

    /// Forgets a stored delivery that the server says was withdrawn, so it is never shown.
    pub fn discard(&self, sender_device: DeviceId, id: MessageId) -> Result<()> {
        self.conn.execute(
            "DELETE FROM messages WHERE sender_device = ?1 AND msg_id = ?2 AND shown = 0",
            params![sender_device.as_bytes(), id.as_bytes()],
        )?;
        Ok(())
    }

    /// Deletes the end-to-end state (after opting out), without needing the passphrase.
    pub fn forget_keys(profile_dir: &Path) -> Result<()> {
        if !profile_dir.join("inbox.sqlite").exists() {
            return Ok(());
        }
        let conn = open_connection(profile_dir)?;
        conn.execute("DELETE FROM crypto", [])?;
        conn.execute("DELETE FROM pseudonyms", [])?;
        Ok(())
    }
}

impl Tx<'_> {
    /// Whether this message is already stored.
    pub fn contains(&self, sender_device: DeviceId, id: MessageId) -> Result<bool> {
        Ok(self
            .conn
            .query_row(
                "SELECT 1 FROM messages WHERE sender_device = ?1 AND msg_id = ?2",
                params![sender_device.as_bytes(), id.as_bytes()],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    /// Stores a received message, sealed, unless it is already there.
    pub fn store(&self, message: &Received) -> Result<()> {
        let plain = serde_json::to_vec(&SealedMessage {
            from: message.from.clone(),
            to: message.to.clone(),
            text: message.text.clone(),
            sent_at_ms: message.sent_at_ms,
            sender_verified: message.sender_verified,
            warning: message.warning.clone(),
        })
        .map_err(|e| ClientError::Inbox(e.to_string()))?;
        let plain = zeroize::Zeroizing::new(plain);
        let sealed = self
            .vault
            .seal(&message_name(message.sender_device, message.id), &plain);
        self.conn.execute(
            "INSERT OR IGNORE INTO messages (sender_device, msg_id, sealed) VALUES (?1, ?2, ?3)",
            params![
                message.sender_device.as_bytes(),
                message.id.as_bytes(),
                sealed
            ],
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile directory of its own, removed afterwards.
    struct ProfileDir(std::path::PathBuf);

    impl ProfileDir {
        fn new(label: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "tidings-inbox-{label}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            Self(dir)
        }
    }

    impl Drop for ProfileDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const ONE: &str = "+4915110000001";
    const TWO: &str = "+4915110000002";

    fn note_written_to(inbox: &mut Inbox, number: &str) {
        inbox
            .update(|_, crypto| {
                crypto.note_written_to(number);
                Ok(Change::Save(()))
            })
            .expect("update");
    }

    /// Issue 30: two processes on one profile (a `send` and another `send`, or `listen`). One
    /// looks at the state while the other saves a change: the looking one must not keep the
    /// state it read under the newer version, or its next change starts from the older state
    /// and saves over the other's. With Olm sessions in the state, that change is an
    /// encryption: a message key used twice, and a message no device can decrypt.
    #[test]
    fn a_change_saved_by_another_process_during_a_look_is_never_lost() {
        let dir = ProfileDir::new("look");
        let passphrase = Passphrase::new("correct horse battery staple");
        let mut first = Inbox::open(&dir.0, &passphrase).expect("open");
        first.replace_crypto(|_| Crypto::new()).expect("keys");
        let mut second = Inbox::open_unlocked(&dir.0, first.vault().clone()).expect("open");
        // The first has the state cached; the second changes it while the first looks.
        first.look(|_| ()).expect("look");
        first
            .look(|_| note_written_to(&mut second, ONE))
            .expect("look");
        assert!(
            first
                .look(|crypto| crypto.has_written_to(ONE))
                .expect("look"),
            "the first reads the state as the second saved it"
        );
        // The first's next change builds on the second's, which stays.
        note_written_to(&mut first, TWO);
        let mut third = Inbox::open_unlocked(&dir.0, first.vault().clone()).expect("open");
        assert_eq!(
            third
                .look(|crypto| (crypto.has_written_to(ONE), crypto.has_written_to(TWO)))
                .expect("look"),
            (true, true)
        );
    }
}
