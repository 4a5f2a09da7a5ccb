//! The PostgreSQL engine: every node of a deployment over one database.
//!
//! Each operation is one transaction on a pooled connection, answered once it has committed, at
//! read committed (set for every connection, whatever the database's default: the locks below
//! rely on each statement reading what committed before it); `synchronous_commit` is on for
//! every connection, so a commit is durable (its WAL flushed)
//! when it returns: a [`Completion`](crate::Completion) this engine hands back is answered at
//! once, both its executed and its durable answer at COMMIT.
//!
//! What SQLite's single writer makes atomic, a transaction makes atomic here, with row locks
//! rather than one lock for the whole database:
//! - every change to an account's devices (registering, linking, removing, publishing identity
//!   keys, a contact token, a voucher, deleting the account) locks the account's row first, and a
//!   send locks the sending and the receiving account's rows (in id order) before it reads their
//!   devices: the copy-set check (rule E1), the queue limits and the insert of the copies see one
//!   state, which no device change can slip into. The queue position is taken after those locks,
//!   so positions in one device's queue are handed out in commit order and a reader paging with a
//!   [`QueueCursor`](crate::QueueCursor) never skips a copy committed later below it;
//! - a one-time key is handed out by one `DELETE ... RETURNING` of the device's lowest key,
//!   `FOR UPDATE SKIP LOCKED`: two claims never get the same key;
//! - an acknowledgement and a withdraw both take the message's row lock (`FOR UPDATE`) and decide
//!   under it, so whichever commits first wins and the other sees its outcome (the copy gone and
//!   a tombstone, or the message delivered);
//! - a message's decision record (a row of `withdrawn`: delivered or withdrawn, naming only the
//!   sending device and the id) is written by one `INSERT ... ON CONFLICT DO NOTHING`, by a
//!   receiver's copy shown, a held copy's acknowledgement or a withdraw: of two at once, the
//!   insert of one waits for the other to commit and then reads its record, so a held copy's
//!   acknowledgement and a withdraw on two nodes end in one state;
//! - a send and a withdraw of one message take a transaction-scoped advisory lock on its id
//!   (sending device and id) first: a withdraw that finds nothing stored and decides the message
//!   withdrawn is never overtaken by a send of it still under way;
//! - a code record is read and rewritten under a transaction-scoped advisory lock on its
//!   pseudonym, so that two first writes of one number cannot both insert.
//!
//! Which waiting copies are strangers' (a hint of who is whose contact) is never written: each
//! store holds it in memory, as the SQLite engine does, and forgets it when reopened.
//!
//! # Layout
//! - this file: [`PostgresStore`], its options, the connection pool and connecting;
//! - `schema`: the versioned migrations, applied when the store connects;
//! - `rows`: how domain values are stored in columns and read back;
//! - `store`: the `impl Store`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::{Client, Config, NoTls};

use crate::{Result, StoreError};

mod rows;
mod schema;
mod store;

pub use schema::SCHEMA_VERSION;

/// How to connect the engine.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections held open at most.
    pub max_connections: usize,
    /// The schema the tables live in (created if missing), instead of the connection's default
    /// search path: lets several stores share one database, as tests do. Letters, digits and `_`
    /// only.
    pub schema: Option<String>,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            schema: None,
        }
    }
}

/// The PostgreSQL engine. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Arc<Pool>,
    /// Queue positions of waiting messages sent by strangers of their receiver, held in memory
    /// only (see the module documentation).
    strangers: Arc<Mutex<HashSet<i64>>>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Engine(Box::new(e))
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL or a key-value connection string)
    /// and brings its schema up to [`SCHEMA_VERSION`].
    pub async fn connect(url: &str, options: PostgresOptions) -> Result<Self> {
        let config: Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::engine(format!("bad URL: {e}")))?;
        if let Some(schema) = &options.schema {
            let plain = !schema.is_empty()
                && schema
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !plain {
                return Err(StoreError::engine(
                    "a schema name is lowercase letters, digits and _",
                ));
            }
        }
        let pool = Arc::new(Pool {
            config,
            schema: options.schema,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(options.max_connections.max(1)),
        });
        {
            let mut conn = pool.get().await?;
            schema::migrate(conn.client()).await?;
        }
        Ok(Self {
            pool,
            strangers: Arc::default(),
        })
    }

    /// The stranger positions held, to pass to a statement.
    fn stranger_positions(&self) -> Result<Vec<i64>> {
        let held = self
            .strangers
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))?;
        Ok(held.iter().copied().collect())
    }

    /// Notes a stored message as a stranger's.
    fn note_stranger(&self, position: i64) -> Result<()> {
        self.strangers
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))?
            .insert(position);
        Ok(())
    }

    /// Forgets positions of messages that are gone (a sweep calls it with what it deleted).
    fn forget_strangers(&self, positions: &[i64]) -> Result<()> {
        let mut held = self
            .strangers
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))?;
        for position in positions {
            held.remove(position);
        }
        Ok(())
    }
}

/// Open connections, each with its settings applied, and a bound on how many there are.
struct Pool {
    config: Config,
    schema: Option<String>,
    idle: Mutex<Vec<Client>>,
    permits: Semaphore,
}

/// A connection taken from the pool; it goes back when dropped, unless it has closed.
struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn client(&mut self) -> &mut Client {
        // Set when the connection is taken, taken out only in `drop`.
        self.client
            .as_mut()
            .expect("a pooled connection holds its client until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(client);
                }
            }
        }
    }
}

impl Pool {
    async fn get(&self) -> Result<Conn<'_>> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let reused = loop {
            let next = self
                .idle
                .lock()
                .map_err(|_| StoreError::engine("an earlier operation panicked"))?
                .pop();
            match next {
                Some(client) if client.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reused {
            Some(client) => client,
            None => self.open().await?,
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }

    async fn open(&self) -> Result<Client> {
        let (client, connection) = self.config.connect(NoTls).await?;
        tokio::spawn(async move {
            // Ends when the client is dropped or the server goes; the client then reports
            // itself closed and the pool drops it.
            let _ = connection.await;
        });
        // Read committed whatever the database's default: the locking writes rely on each
        // statement reading what committed before it (a decision record another transaction
        // inserted, a row re-read under its lock).
        let mut settings = String::from(
            "SET synchronous_commit = on; SET default_transaction_isolation = 'read committed';",
        );
        if let Some(schema) = &self.schema {
            settings.push_str(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\"; SET search_path = \"{schema}\";"
            ));
        }
        client.batch_execute(&settings).await?;
        Ok(client)
    }
}
