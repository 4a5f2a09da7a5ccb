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
//! A waiting copy's payload is stored sealed under a key of the hour its message expires in,
//! which every node forgets once that hour is over: PostgreSQL keeps deleted rows' bytes, so
//! deleting is not enough (`seal`, crypto-shredding).
//!
//! # Layout
//! - this file: [`PostgresStore`], its options, the connection pool and connecting;
//! - `schema`: the versioned migrations, applied when the store connects;
//! - `rows`: how domain values are stored in columns and read back;
//! - `seal`: the key chain that seals waiting copies, and the hourly move that forgets its keys;
//! - `store`: the `impl Store`.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement, Transaction};

use crate::{Result, StoreError};

mod rows;
mod schema;
mod seal;
mod store;
mod strangers;

pub use schema::SCHEMA_VERSION;
pub use seal::{KeyChain, EPOCH_MS as KEY_CHAIN_EPOCH_MS, GRACE_MS as KEY_CHAIN_GRACE_MS};

/// How to connect the engine.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// Connections held open at most.
    pub max_connections: usize,
    /// The schema the tables live in (created if missing), instead of the connection's default
    /// search path: lets several stores share one database, as tests do. Letters, digits and `_`
    /// only.
    pub schema: Option<String>,
    /// The key chain file (`seal`): read if it exists, made if neither it nor the database's
    /// check of a chain does; every node of a deployment holds a copy of the same one.
    pub key_chain: PathBuf,
}

impl PostgresOptions {
    /// The defaults, with the key chain file at `key_chain`.
    pub fn new(key_chain: PathBuf) -> Self {
        Self {
            max_connections: 16,
            schema: None,
            key_chain,
        }
    }
}

/// The PostgreSQL engine. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Arc<Pool>,
    /// Queue positions of waiting messages sent by strangers of their receiver, held in memory
    /// only (see the module documentation).
    strangers: Arc<Mutex<strangers::Strangers>>,
    /// Seals and opens the payloads of waiting copies.
    chain: Arc<KeyChain>,
}

/// How often a store checks its key chain and forgets strangers' positions whose copies are gone.
const UPKEEP_TICK: std::time::Duration = std::time::Duration::from_secs(30);

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
        let chain = {
            let mut conn = pool.get().await?;
            schema::migrate(&mut conn.client().client).await?;
            Arc::new(seal::attach(&conn.client().client, &options.key_chain, wall_clock()).await?)
        };
        let store = Self {
            pool,
            strangers: Arc::default(),
            chain,
        };
        // Every node moves its own copy of the chain on, whichever node runs the sweeps, and
        // forgets the strangers' positions whose copies another node deleted; the task ends with
        // the last clone of the store.
        let pool_ref = Arc::downgrade(&store.pool);
        let (moving, strangers) = (Arc::clone(&store.chain), Arc::clone(&store.strangers));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_TICK);
            loop {
                tick.tick().await;
                let Some(pool) = pool_ref.upgrade() else {
                    break;
                };
                if let Err(e) = seal::move_on(&pool, &moving, wall_clock()).await {
                    tracing::error!(error = %e, "the key chain did not move on");
                }
                let checked = match pool.get().await {
                    Ok(mut conn) => forget_gone_strangers(conn.client(), &strangers).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = checked {
                    tracing::warn!(error = %e, "strangers' positions were not checked");
                }
            }
        });
        Ok(store)
    }

    /// The strangers' messages held.
    fn strangers(&self) -> Result<std::sync::MutexGuard<'_, strangers::Strangers>> {
        self.strangers
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))
    }

    /// Notes a stored message (to `receiver`) as a stranger's, here and for the other nodes.
    fn note_stranger(&self, position: i64, receiver: i64) -> Result<()> {
        self.strangers()?.note(position, receiver, true);
        Ok(())
    }

    /// Forgets positions of messages that are gone (a sweep calls it with what it deleted).
    fn forget_strangers(&self, positions: &[i64]) -> Result<()> {
        self.strangers()?.forget(positions);
        Ok(())
    }
}

/// Forgets the strangers' positions whose messages are gone (delivered, withdrawn or expired
/// through another node's store, or deleted with a device or an account); one noted after the
/// read is left alone.
async fn forget_gone_strangers<C: Sql>(
    db: &C,
    strangers: &Mutex<strangers::Strangers>,
) -> Result<()> {
    let held = strangers
        .lock()
        .map_err(|_| StoreError::engine("an earlier operation panicked"))?
        .all();
    if held.is_empty() {
        return Ok(());
    }
    let gone: Vec<i64> = db
        .query(
            "SELECT p FROM unnest($1::bigint[]) AS p
             WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.seq = p)",
            &[&held],
        )
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    strangers
        .lock()
        .map_err(|_| StoreError::engine("an earlier operation panicked"))?
        .forget(&gone);
    Ok(())
}

/// The system clock in milliseconds since 1970 (the key chain's hours follow it on every node).
fn wall_clock() -> tidings_core::Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            tidings_core::Millis::try_from(d.as_millis()).unwrap_or(0)
        })
}

/// Parameters of a statement, as tokio-postgres takes them.
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// What the engine's statements run on: a pooled connection or a transaction on one. Every
/// statement is one of the engine's own literals, prepared once per connection and kept
/// ([`Statements`]), so running it again costs one round trip and no parsing or planning.
pub(super) trait Sql: Sync {
    fn query(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = std::result::Result<Vec<Row>, tokio_postgres::Error>> + Send;
    fn query_opt(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = std::result::Result<Option<Row>, tokio_postgres::Error>> + Send;
    fn query_one(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = std::result::Result<Row, tokio_postgres::Error>> + Send;
    fn execute(
        &self,
        sql: &'static str,
        params: Params<'_>,
    ) -> impl Future<Output = std::result::Result<u64, tokio_postgres::Error>> + Send;
}

/// A connection's prepared statements, by their text. Bounded by the engine's literals.
#[derive(Default)]
struct Statements(Mutex<HashMap<&'static str, Statement>>);

impl Statements {
    async fn get<C: GenericClient + Sync>(
        &self,
        client: &C,
        sql: &'static str,
    ) -> std::result::Result<Statement, tokio_postgres::Error> {
        if let Some(found) = self.0.lock().ok().and_then(|held| held.get(sql).cloned()) {
            return Ok(found);
        }
        let prepared = client.prepare(sql).await?;
        if let Ok(mut held) = self.0.lock() {
            held.insert(sql, prepared.clone());
        }
        Ok(prepared)
    }
}

/// [`Sql`] for a client and its statements, whichever kind of client it is.
macro_rules! impl_sql {
    ($type:ty, $client:ident) => {
        impl Sql for $type {
            async fn query(
                &self,
                sql: &'static str,
                params: Params<'_>,
            ) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
                let statement = self.statements.get(&self.$client, sql).await?;
                self.$client.query(&statement, params).await
            }
            async fn query_opt(
                &self,
                sql: &'static str,
                params: Params<'_>,
            ) -> std::result::Result<Option<Row>, tokio_postgres::Error> {
                let statement = self.statements.get(&self.$client, sql).await?;
                self.$client.query_opt(&statement, params).await
            }
            async fn query_one(
                &self,
                sql: &'static str,
                params: Params<'_>,
            ) -> std::result::Result<Row, tokio_postgres::Error> {
                let statement = self.statements.get(&self.$client, sql).await?;
                self.$client.query_one(&statement, params).await
            }
            async fn execute(
                &self,
                sql: &'static str,
                params: Params<'_>,
            ) -> std::result::Result<u64, tokio_postgres::Error> {
                let statement = self.statements.get(&self.$client, sql).await?;
                self.$client.execute(&statement, params).await
            }
        }
    };
}

/// An open connection with its prepared statements.
struct Pooled {
    client: Client,
    statements: Statements,
}

impl Pooled {
    /// Starts a transaction, which prepares its statements into the connection's.
    async fn transaction(&mut self) -> std::result::Result<Txn<'_>, tokio_postgres::Error> {
        Ok(Txn {
            txn: self.client.transaction().await?,
            statements: &self.statements,
        })
    }

    /// Starts a read-only transaction that reads one snapshot throughout.
    async fn snapshot(&mut self) -> std::result::Result<Txn<'_>, tokio_postgres::Error> {
        Ok(Txn {
            txn: self
                .client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?,
            statements: &self.statements,
        })
    }

    async fn batch_execute(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }
}

/// A transaction on a pooled connection.
struct Txn<'a> {
    txn: Transaction<'a>,
    statements: &'a Statements,
}

impl Txn<'_> {
    async fn commit(self) -> std::result::Result<(), tokio_postgres::Error> {
        self.txn.commit().await
    }
}

impl_sql!(Pooled, client);
impl_sql!(Txn<'_>, txn);

/// Open connections, each with its settings applied, and a bound on how many there are.
struct Pool {
    config: Config,
    schema: Option<String>,
    idle: Mutex<Vec<Pooled>>,
    permits: Semaphore,
}

/// A connection taken from the pool; it goes back when dropped, unless it has closed.
struct Conn<'a> {
    client: Option<Pooled>,
    pool: &'a Pool,
    _permit: SemaphorePermit<'a>,
}

impl Conn<'_> {
    fn client(&mut self) -> &mut Pooled {
        // Set when the connection is taken, taken out only in `drop`.
        self.client
            .as_mut()
            .expect("a pooled connection holds its client until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(pooled) = self.client.take() {
            if !pooled.client.is_closed() {
                if let Ok(mut idle) = self.pool.idle.lock() {
                    idle.push(pooled);
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
                Some(pooled) if pooled.client.is_closed() => continue,
                other => break other,
            }
        };
        let client = match reused {
            Some(pooled) => pooled,
            None => Pooled {
                client: self.open().await?,
                statements: Statements::default(),
            },
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
