//! The embedded engine: one SQLite database in the data directory.
//!
//! Writes go to a single writer thread that commits them in batches (group commit): every
//! operation waiting when a transaction starts joins it, the transaction commits with one WAL
//! sync (`synchronous = FULL`), and only then is each operation answered. A write nobody waits on
//! (deleting a receipt its device has taken) is *lazy*: a batch of only lazy writes commits
//! without a sync of its own and becomes durable with the next synced batch (WAL frames are
//! synced in order), so it never holds the writer for a sync. Each operation runs in a savepoint
//! of its own, so that one failing on its input leaves the rest of its batch intact, except for
//! the most frequent writes: an acknowledgement fails only when the engine does, so it runs
//! without one and its failure rolls back its whole batch, and a receipt's deletion is one
//! statement, which SQLite undoes by itself (see [`Undo`]). Reads run beside the writer, as WAL
//! allows: point reads by key on the calling thread, with a read connection of that thread's
//! own (handing a read of a few rows to another thread costs two thread switches, more than the
//! read itself); longer reads on the blocking pool.
//!
//! Deletion: `secure_delete` overwrites deleted rows and freed pages with zeros, and [`Store::scrub`]
//! checkpoints the WAL into the database and truncates it to zero bytes, so that the old frames
//! holding deleted rows are gone too. The server scrubs on a fixed interval; that interval bounds
//! how long deleted bytes can remain in the data files. Temporary data (a savepoint's undo copies
//! of the pages it changes) stays in memory, so no copy of a message page is ever written
//! outside the data directory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use tokio::sync::{mpsc, oneshot, Semaphore};

use tidings_core::delivery::{self, AccountDevice, CopyCheck};
use tidings_core::fallback::Withdrawal;
use tidings_core::verification::{CodeRecord, LiveCode};
use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use crate::{
    AccountDevices, AccountId, Acked, Backlog, Claimed, ClaimedKey, Completion, Device, Durability,
    Enqueued, ExpiredMessage, IdentityKeys, KeyStatus, Linked, ListedDevice, NewMessage, Pending,
    PendingReceipt, Pseudonym, Published, QueueCursor, Registered, Result, Route, SignedKey, Store,
    StoreError, SyncObserver, SyncReport, Voucher,
};

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "tidings.sqlite";

/// Writes waiting for the writer at most; past this, handing one over waits. Each holds its
/// operation's data (a send's copies, up to 64 KiB), so this bounds the memory they take.
pub const WRITER_QUEUE: usize = 4096;

/// The tables. Their `REFERENCES` clauses say what refers to what, and `ON DELETE CASCADE` what
/// goes with a deleted row; SQLite does not enforce them (see [`open_connection`]): the writer
/// does, in the same transaction. Every insertion first reads what it refers to (a send the
/// receiver's and the sender's devices, a receipt its device, keys theirs, a device its account),
/// and every deletion deletes what refers to the rows it deletes (a device's copies, receipts and
/// keys in [`delete_devices`], a message's copies before it, an account's devices and the
/// messages queued for it before its row). The store tests check the whole database with
/// `PRAGMA foreign_key_check` after each kind of write.
const SCHEMA: &str = "
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
CREATE TABLE IF NOT EXISTS withdrawn (
    sender_device BLOB NOT NULL,
    msg_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (sender_device, msg_id)
) WITHOUT ROWID;
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
";

/// Columns added after the first schema, with their definitions; added on open where missing.
/// `copies.payload` holds each device's own ciphertext (end-to-end encryption gives every device
/// a different one); `messages.payload` stays empty for such messages.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("devices", "identity_key", "BLOB"),
    ("devices", "signing_key", "BLOB"),
    ("devices", "voucher", "BLOB"),
    ("devices", "voucher_signature", "BLOB"),
    ("copies", "payload", "BLOB"),
    ("copies", "to_receiver", "INTEGER NOT NULL DEFAULT 1"),
];

fn add_missing_columns(conn: &Connection) -> Result<()> {
    for (table, column, definition) in ADDED_COLUMNS {
        let present = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists(params![column])?;
        if !present {
            conn.execute_batch(&format!(
                "ALTER TABLE {table} ADD COLUMN {column} {definition}"
            ))?;
        }
    }
    Ok(())
}

/// How to open the engine.
#[derive(Clone, Default)]
pub struct SqliteOptions {
    /// Most operations committed by one sync.
    pub max_batch: usize,
    /// Told about every sync, after it completed and before any operation in it is answered.
    pub sync_observer: Option<SyncObserver>,
}

impl std::fmt::Debug for SqliteOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteOptions")
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

/// What a batch's operations noted: for the sync report, and the queue lengths to write.
#[derive(Default)]
struct Notes {
    messages: Vec<(DeviceId, MessageId)>,
    /// Copies stored (+1) and deleted (−1) per device in this batch, not yet in
    /// `devices.queue_len`: added to it once per device before the batch commits, so that a
    /// device whose copy is stored and another acknowledged in the same batch (the relay's
    /// steady state) costs no write at all. Every statement that stores or deletes a copy
    /// records it here ([`delete_copies`] before a deletion of messages); a deleted device's
    /// copies go with its row, and so do its changes ([`QueueCounts::forget`]).
    queued: QueueCounts,
    /// An operation run without a savepoint failed: its batch must be rolled back whole.
    batch_failed: bool,
    /// Devices were added or deleted: the routes held in memory are dropped once the batch has
    /// committed, before any of its operations is answered.
    devices_changed: bool,
}

/// A batch's changes to queue lengths: the total per device, and the log of each change so that
/// an operation rolled back to its savepoint takes its own back.
#[derive(Default)]
struct QueueCounts {
    totals: HashMap<DeviceId, i64>,
    log: Vec<(DeviceId, i64)>,
}

impl QueueCounts {
    fn add(&mut self, device: DeviceId, change: i64) {
        *self.totals.entry(device).or_default() += change;
        self.log.push((device, change));
    }

    /// Copies stored or deleted for `device` earlier in this batch.
    fn pending(&self, device: DeviceId) -> i64 {
        self.totals.get(&device).copied().unwrap_or(0)
    }

    /// A deleted device's row is gone with its length and its copies ([`delete_devices`]): a row
    /// made again with the same id in this batch starts from zero, so the changes noted for the
    /// old one must not reach it.
    fn forget(&mut self, device: DeviceId) {
        let pending = self.pending(device);
        self.add(device, -pending);
    }

    /// Takes back every change after the `mark`-th.
    fn undo_to(&mut self, mark: usize) {
        for (device, change) in self.log.drain(mark..) {
            *self.totals.entry(device).or_default() -= change;
        }
    }

    /// Adds the batch's changes to `devices.queue_len`, one statement per device whose
    /// length changed.
    fn write(&self, txn: &Transaction<'_>) -> rusqlite::Result<()> {
        if self.totals.is_empty() {
            return Ok(());
        }
        let mut update =
            txn.prepare_cached("UPDATE devices SET queue_len = queue_len + ?2 WHERE id = ?1")?;
        for (device, change) in &self.totals {
            if *change != 0 {
                update.execute(params![device.as_bytes(), change])?;
            }
        }
        Ok(())
    }
}

/// What a failing write takes back with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Undo {
    /// The operation runs in a savepoint of its own, so that its failure undoes only its own
    /// changes: for operations that can fail on their input after they have written.
    Operation,
    /// The operation is one statement: SQLite undoes a statement that fails by itself, so it
    /// needs no savepoint, and its failure fails only itself.
    Statement,
    /// The operation runs without a savepoint, and its failure rolls back its whole batch, which
    /// is then answered as a failed commit. Only for operations that check their input before
    /// they write, so that they fail only when the engine does. A savepoint costs the writer a
    /// copy of every page the operation touches; for an acknowledgement that was a quarter of
    /// the writer's time.
    Batch,
}

/// Answers an executed write once its batch has committed (or failed to).
type AnswerOnCommit = Box<dyn FnOnce(Result<()>) + Send>;
type WriteJob = Box<dyn FnOnce(&Transaction<'_>, &mut Notes) -> AnswerOnCommit + Send>;

enum Job {
    /// A write; `lazy` when nobody waits on its durability.
    Write {
        job: WriteJob,
        lazy: bool,
    },
    Scrub(oneshot::Sender<Result<()>>),
}

/// Numbers open stores, so that a thread's point-read connections are told apart.
static STORES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's point-read connections, one per open store (by its number).
    static HERE: RefCell<Vec<(usize, Connection)>> = const { RefCell::new(Vec::new()) };
}

/// The embedded SQLite engine. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    routes: Arc<RouteCache>,
}

/// Routes held in memory at most; past this the cache starts again from empty.
pub const ROUTE_CACHE_ENTRIES: usize = 65_536;

/// The routes of accounts that sends went to, so that a send reads no table: device ids only,
/// which change only when a device is added or deleted. The writer drops every route once a
/// batch that changed devices has committed, before it answers the batch. A route read from the
/// database is kept only if no such batch committed since the read began: a read that began
/// before a change and ended after it could otherwise keep the old devices.
#[derive(Default)]
struct RouteCache {
    inner: Mutex<Routes>,
}

#[derive(Default)]
struct Routes {
    /// Counts the times the routes were dropped.
    generation: u64,
    routes: HashMap<Pseudonym, Route>,
}

impl RouteCache {
    /// The routes. Every change to them is one map operation, so a panic elsewhere while the
    /// lock was held leaves them whole: a poisoned lock is taken as it is.
    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The route held for a pseudonym, and the generation to insert a route read now under.
    fn get(&self, pseudonym: &Pseudonym) -> (u64, Option<Route>) {
        let inner = self.lock();
        (inner.generation, inner.routes.get(pseudonym).cloned())
    }

    /// Keeps a route read from the database, unless devices changed since `generation`.
    fn insert(&self, generation: u64, pseudonym: Pseudonym, route: Route) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.routes.len() >= ROUTE_CACHE_ENTRIES {
            inner.routes.clear();
        }
        inner.routes.insert(pseudonym, route);
    }

    /// Drops every route (devices were added or deleted).
    fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.routes.clear();
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Engine(Box::new(e))
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

struct ReaderPool {
    store: usize,
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // Every statement is prepared once per connection and kept (see docs/BENCHMARKS.md: a
    // message's statements were parsed anew each time before).
    conn.set_prepared_statement_cache_capacity(128);
    // 1 KiB pages (SQLite's default is 4 KiB): a message dirties one leaf in each of several
    // B-trees keyed by device, spread over the file, and every dirty page is a WAL frame written
    // and synced; at 1,000 relay pairs smaller pages cut the server's CPU per message by about a
    // fifth (docs/BENCHMARKS.md, change 17). Takes effect when the database is created; an
    // existing database keeps the page size it was made with.
    //
    // Foreign keys are not enforced by SQLite but by the writer (see [`SCHEMA`]): enforcing them
    // made every insertion look up each row it refers to and every deletion of a message search
    // for its copies, which the writer has just deleted itself; without, the durable drain ran
    // about a quarter faster (docs/BENCHMARKS.md, change 20).
    conn.execute_batch(
        "PRAGMA page_size = 1024;
         PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA secure_delete = ON;
         PRAGMA temp_store = MEMORY;
         PRAGMA foreign_keys = OFF;",
    )?;
    Ok(conn)
}

/// The WAL pages after which a commit checkpoints them into the database (SQLite's default is
/// 1,000). With 1 KiB pages the default made the writer checkpoint after every megabyte of WAL,
/// each time copying the hot pages into the database and syncing it, though the scrub
/// ([`Store::scrub`], every 2 s by default) checkpoints and truncates the WAL anyway; at 16,384
/// the WAL grows to about 17 MB between scrubs at the most, and the durable drain ran 23 % faster
/// at the median (docs/BENCHMARKS.md, change 19).
const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// The writer's connection: [`open_connection`] with checkpoints every
/// [`WAL_AUTOCHECKPOINT_PAGES`] (a setting of the connection that commits, which only the writer
/// does).
fn open_writer(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    Ok(conn)
}

/// A read connection: [`open_connection`] with a small page cache. A point read touches a few
/// pages and the operating system's file cache holds the rest, while SQLite's default of about
/// 2 MB per connection, kept by every runtime thread and pooled reader, grew with the devices read
/// at login into a few megabytes that only the writer needs.
fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.execute_batch("PRAGMA cache_size = -256;")?;
    Ok(conn)
}

/// A registered device, read on `conn`.
fn device_in(conn: &Connection, id: DeviceId) -> Result<Option<Device>> {
    let row = conn
        .prepare_cached("SELECT account_id, public_key FROM devices WHERE id = ?1")?
        .query_row(params![id.as_bytes()], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, Vec<u8>>(1)?))
        })
        .optional()?;
    Ok(row.and_then(|(account, key)| {
        let public_key = <[u8; 32]>::try_from(key.as_slice()).ok()?;
        Some(Device {
            id,
            account: AccountId(account),
            public_key,
        })
    }))
}

/// A device's key supply, read on `conn`.
fn key_status_in(conn: &Connection, device: DeviceId) -> Result<KeyStatus> {
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

/// The account behind a pseudonym and its devices, read on `conn`.
fn account_in(conn: &Connection, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
    let account = conn
        .prepare_cached("SELECT id FROM accounts WHERE pseudonym = ?1")?
        .query_row(params![&pseudonym.0[..]], |row| row.get::<_, i64>(0))
        .optional()?;
    let Some(account) = account else {
        return Ok(None);
    };
    let mut statement =
        conn.prepare_cached("SELECT id, queue_len FROM devices WHERE account_id = ?1")?;
    let devices = statement
        .query_map(params![account], |row| {
            Ok((
                device_id(row.get(0)?)?,
                u32::try_from(row.get::<_, i64>(1)?).unwrap_or(u32::MAX),
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(AccountDevices {
        account: AccountId(account),
        devices,
    }))
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir` and starts the writer thread.
    pub fn open(data_dir: &Path, options: SqliteOptions) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::engine(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join(DATABASE_FILE);
        let conn = open_writer(&path)?;
        conn.execute_batch(SCHEMA)?;
        add_missing_columns(&conn)?;
        let (writer, jobs) = mpsc::channel(WRITER_QUEUE);
        let routes = Arc::new(RouteCache::default());
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name("tidings-store-writer".into())
            .spawn({
                let routes = Arc::clone(&routes);
                move || run_writer(conn, jobs, max_batch, options.sync_observer, &routes)
            })
            .map_err(|e| StoreError::engine(e.to_string()))?;
        Ok(Self {
            writer,
            routes,
            readers: Arc::new(ReaderPool {
                store: STORES.fetch_add(1, Ordering::Relaxed),
                path,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(8),
            }),
        })
    }

    /// A write answered once it is durable.
    async fn write<R, F>(&self, undo: Undo, operation: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        answered(self.hand_over(operation, Durability::Durable, undo).await?).await
    }

    /// Hands a write to the writer thread; the outcome comes through the returned completion,
    /// once the write is durable.
    async fn submit<R, F>(&self, undo: Undo, operation: F) -> Result<Completion<R>>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        let durable = self.hand_over(operation, Durability::Durable, undo).await?;
        Ok(Completion::pending(None, durable))
    }

    /// A write nobody waits on: answered once it has executed, durable with the next synced
    /// batch (see the module's documentation).
    async fn write_lazily<R, F>(&self, undo: Undo, operation: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        answered(
            self.hand_over(operation, Durability::Executed, undo)
                .await?,
        )
        .await
    }

    /// Hands a write to the writer thread, in a batch whose commit syncs unless every write in
    /// it is answered at [`Durability::Executed`]; its outcome comes once the batch committed.
    async fn hand_over<R, F>(
        &self,
        operation: F,
        answer_at: Durability,
        undo: Undo,
    ) -> Result<oneshot::Receiver<Result<R>>>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: WriteJob = Box::new(move |txn, notes| {
            let outcome = if notes.batch_failed || txn.is_autocommit() {
                // The batch is lost already (a write without a savepoint failed, or the engine
                // rolled the transaction back by itself): nothing more runs in it, so that
                // nothing commits on its own and no early answer goes out for it.
                notes.batch_failed = true;
                Err(StoreError::engine(
                    "an earlier write in its batch failed; try again",
                ))
            } else {
                match undo {
                    Undo::Operation => in_savepoint(txn, notes, operation),
                    Undo::Statement => operation(txn, notes),
                    Undo::Batch => {
                        let outcome = operation(txn, notes);
                        if let Err(e) = &outcome {
                            tracing::error!(error = %e, "a write failed; its batch is rolled back");
                            notes.batch_failed = true;
                        }
                        outcome
                    }
                }
            };
            Box::new(move |committed: Result<()>| {
                let _ = reply.send(committed.and(outcome));
            })
        });
        let lazy = answer_at == Durability::Executed;
        self.writer
            .send(Job::Write { job, lazy })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(answer)
    }

    /// Hands a write to the writer thread; its outcome is answered once it has executed and
    /// again once the sync has made it durable (see [`Completion`]).
    async fn submit_staged<R, F>(&self, undo: Undo, operation: F) -> Result<Completion<R>>
    where
        R: Clone + Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        let (executed, early) = oneshot::channel();
        let durable = self
            .hand_over(
                move |txn, notes| {
                    let outcome = operation(txn, notes);
                    if let Ok(value) = &outcome {
                        let _ = executed.send(value.clone());
                    }
                    outcome
                },
                Durability::Durable,
                undo,
            )
            .await?;
        Ok(Completion::pending(Some(early), durable))
    }

    /// A point read (a few rows by key) on the calling thread; see the module's documentation.
    fn read_here<R>(&self, query: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
        HERE.with(|here| {
            let mut here = here
                .try_borrow_mut()
                .map_err(|_| StoreError::engine("a point read inside a point read"))?;
            let at = match here
                .iter()
                .position(|(store, _)| *store == self.readers.store)
            {
                Some(at) => at,
                None => {
                    here.push((self.readers.store, open_reader(&self.readers.path)?));
                    here.len() - 1
                }
            };
            query(&here[at].1)
        })
    }

    async fn read<R, F>(&self, query: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let pool = Arc::clone(&self.readers);
        let _permit = pool
            .permits
            .acquire()
            .await
            .map_err(|_| StoreError::Closed)?;
        let worker_pool = Arc::clone(&pool);
        tokio::task::spawn_blocking(move || {
            let idle = worker_pool.idle.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match idle {
                Some(conn) => conn,
                None => open_reader(&worker_pool.path)?,
            };
            let result = query(&conn);
            if let Ok(mut idle) = worker_pool.idle.lock() {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::engine(e.to_string()))?
    }
}

/// Waits for the answer of a write handed over.
async fn answered<R>(answer: oneshot::Receiver<Result<R>>) -> Result<R> {
    answer.await.map_err(|_| StoreError::Closed)?
}

/// Runs one operation inside a savepoint, so that a failing operation leaves its batch intact.
fn in_savepoint<R>(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    operation: impl FnOnce(&Transaction<'_>, &mut Notes) -> Result<R>,
) -> Result<R> {
    // A savepoint that cannot be opened, released or rolled back to leaves the operation's
    // changes in an unknown state: its whole batch is rolled back.
    let checked = |notes: &mut Notes, done: rusqlite::Result<()>| {
        done.map_err(|e| {
            tracing::error!(error = %e, "a savepoint failed; its batch is rolled back");
            notes.batch_failed = true;
            StoreError::from(e)
        })
    };
    // Kept prepared: opening and releasing run for every such operation.
    let cached = |sql| {
        txn.prepare_cached(sql)
            .and_then(|mut statement| statement.execute([]))
            .map(drop)
    };
    checked(notes, cached("SAVEPOINT op"))?;
    // What the operation notes is taken back with its changes.
    let (messages, queued) = (notes.messages.len(), notes.queued.log.len());
    match operation(txn, notes) {
        Ok(value) => {
            checked(notes, cached("RELEASE op"))?;
            Ok(value)
        }
        Err(e) => {
            notes.messages.truncate(messages);
            notes.queued.undo_to(queued);
            checked(notes, txn.execute_batch("ROLLBACK TO op; RELEASE op"))?;
            Err(e)
        }
    }
}

fn run_writer(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    observer: Option<SyncObserver>,
    routes: &RouteCache,
) {
    let mut seq = 0u64;
    // The connection's `synchronous` setting: FULL as opened, NORMAL after a lazy batch.
    let mut lazy_mode = false;
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut writes = Vec::with_capacity(batch.len());
        let mut scrubs = Vec::new();
        let mut all_lazy = true;
        for job in batch {
            match job {
                Job::Write { job, lazy } => {
                    all_lazy &= lazy;
                    writes.push(job);
                }
                Job::Scrub(reply) => scrubs.push(reply),
            }
        }
        if !writes.is_empty() {
            seq += 1;
            commit_batch(
                &mut conn,
                writes,
                seq,
                all_lazy,
                &mut lazy_mode,
                observer.as_ref(),
                routes,
            );
        }
        if !scrubs.is_empty() {
            let outcome = conn
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                    row.get::<_, i64>(0)
                })
                .map_err(StoreError::from)
                .and_then(|busy| {
                    if busy == 0 {
                        Ok(())
                    } else {
                        Err(StoreError::engine(
                            "checkpoint blocked by a reader; will retry",
                        ))
                    }
                });
            for reply in scrubs {
                let _ = reply.send(match &outcome {
                    Ok(()) => Ok(()),
                    Err(e) => Err(StoreError::engine(e.to_string())),
                });
            }
        }
    }
}

fn commit_batch(
    conn: &mut Connection,
    writes: Vec<WriteJob>,
    seq: u64,
    lazy: bool,
    lazy_mode: &mut bool,
    observer: Option<&SyncObserver>,
    routes: &RouteCache,
) {
    // Lazy batches commit without a sync; the next synced commit syncs their frames too. The
    // setting is changed only when the kind of batch changes.
    if lazy != *lazy_mode {
        let mode = if lazy {
            "PRAGMA synchronous = NORMAL"
        } else {
            "PRAGMA synchronous = FULL"
        };
        if let Err(e) = conn
            .prepare_cached(mode)
            .and_then(|mut statement| statement.execute([]))
        {
            // Nothing ran: every operation is answered with the failure (its reply is dropped).
            tracing::error!(error = %e, "storage sync mode could not be set");
            return;
        }
        *lazy_mode = lazy;
    }
    let operations = writes.len();
    let mut notes = Notes::default();
    let txn = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(txn) => txn,
        Err(e) => {
            // Nothing ran: answer every operation with the failure.
            let message = e.to_string();
            for write in writes {
                drop(write);
            }
            tracing::error!(error = %message, "storage transaction could not start");
            return;
        }
    };
    let completions: Vec<AnswerOnCommit> = writes
        .into_iter()
        .map(|write| write(&txn, &mut notes))
        .collect();
    if !notes.batch_failed && !txn.is_autocommit() {
        if let Err(e) = notes.queued.write(&txn) {
            tracing::error!(error = %e, "queue lengths could not be written; the batch is rolled back");
            notes.batch_failed = true;
        }
    }
    // The engine may have rolled the transaction back by itself (a full disk, say).
    notes.batch_failed |= txn.is_autocommit();
    let committed = if notes.batch_failed {
        // An operation without a savepoint of its own failed part-way, or the engine gave the
        // transaction up: nothing of the batch may stay. Every operation is answered as if the
        // commit had failed.
        if let Err(e) = txn.rollback() {
            tracing::error!(error = %e, "storage rollback failed");
        }
        Err(StoreError::engine(
            "a write failed and its batch was rolled back; try again",
        ))
    } else {
        txn.commit().map_err(StoreError::from)
    };
    if committed.is_ok() {
        // Told about syncs only: a lazy batch made nothing durable yet.
        if let (Some(observer), false) = (observer, lazy) {
            observer(&SyncReport {
                seq,
                operations,
                messages: notes.messages,
            });
        }
    } else {
        tracing::error!("storage commit failed; {operations} operations answered with an error");
    }
    // Dropped whether or not the batch committed: a route read later reads the outcome.
    if notes.devices_changed {
        routes.invalidate();
    }
    for complete in completions {
        complete(match &committed {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::engine(e.to_string())),
        });
    }
}

/// Deletes a device's copy on its acknowledgement; on a message's first acknowledgement by a
/// receiver device, marks it delivered and stores the sender's `Delivered` receipt. Every
/// answer it gives comes from what it reads; it fails only when the engine does, so it runs
/// without a savepoint of its own ([`Undo::Batch`]).
fn ack_in(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    device: DeviceId,
    sender_device: DeviceId,
    id: MessageId,
) -> Result<Acked> {
    let message = txn
        .prepare_cached(
            "SELECT seq, delivered FROM messages WHERE sender_device = ?1 AND msg_id = ?2",
        )?
        .query_row(params![sender_device.as_bytes(), id.as_bytes()], |row| {
            Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)? != 0))
        })
        .optional()?;
    // No copy for this device: a replay, or a message its sender withdrew (then the
    // device must be told not to show it).
    let gone = |txn: &Transaction<'_>| -> Result<Acked> {
        let withdrawn = txn
            .prepare_cached("SELECT 1 FROM withdrawn WHERE sender_device = ?1 AND msg_id = ?2")?
            .query_row(params![sender_device.as_bytes(), id.as_bytes()], |_| Ok(()))
            .optional()?;
        Ok(if withdrawn.is_some() {
            Acked::Withdrawn
        } else {
            Acked::Unknown
        })
    };
    let Some((seq, delivered)) = message else {
        return gone(txn);
    };
    let deleted = txn
        .prepare_cached(
            "DELETE FROM copies WHERE device_id = ?1 AND seq = ?2 RETURNING to_receiver",
        )?
        .query_row(params![device.as_bytes(), seq], |row| row.get::<_, bool>(0))
        .optional()?;
    let Some(to_receiver) = deleted else {
        return gone(txn);
    };
    notes.queued.add(device, -1);
    // The last copy takes the message with it.
    let message_gone = delete_if_no_copies(txn, seq)?;
    // The sender's own other devices taking their copies is not a delivery.
    if !to_receiver {
        return Ok(Acked::Confirmed { first: false });
    }
    // A message still held is marked delivered, so that a withdraw racing the other
    // devices' acknowledgements answers DELIVERED.
    if !delivered {
        if !message_gone {
            txn.prepare_cached("UPDATE messages SET delivered = 1 WHERE seq = ?1")?
                .execute(params![seq])?;
        }
        txn.prepare_cached(
            "INSERT OR REPLACE INTO receipts (device_id, msg_id, kind)
             SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)",
        )?
        .execute(params![
            sender_device.as_bytes(),
            id.as_bytes(),
            ReceiptKind::Delivered as i64
        ])?;
    }
    Ok(Acked::Confirmed { first: !delivered })
}

/// Deletes the copies `condition` selects (an SQL condition on `copies`, with `params`) and
/// counts them off their devices' queues. Runs before a deletion of messages, which must not
/// leave their copies behind (see [`SCHEMA`]).
fn delete_copies(
    txn: &Transaction<'_>,
    notes: &mut Notes,
    condition: &'static str,
    params: impl rusqlite::Params,
) -> Result<()> {
    let mut statement = txn.prepare_cached(&format!(
        "DELETE FROM copies WHERE {condition} RETURNING device_id"
    ))?;
    let mut rows = statement.query(params)?;
    while let Some(row) = rows.next()? {
        notes.queued.add(device_id(row.get(0)?)?, -1);
    }
    Ok(())
}

/// Deletes a message once no copy of it is left; true if it did.
fn delete_if_no_copies(txn: &Transaction<'_>, seq: i64) -> Result<bool> {
    let deleted = txn
        .prepare_cached(
            "DELETE FROM messages WHERE seq = ?1 AND NOT EXISTS (SELECT 1 FROM copies WHERE seq = ?1)",
        )?
        .execute(params![seq])?;
    Ok(deleted > 0)
}

/// Deletes devices with everything that refers to them: their queued copies (and each message
/// left with no copy), their receipts and their keys. The schema's cascades, done by the writer
/// (see [`SCHEMA`]). The devices' queue-length changes noted in the batch go with their rows, so
/// that a device made again with the same id starts from zero.
fn delete_devices(txn: &Transaction<'_>, notes: &mut Notes, devices: &[DeviceId]) -> Result<()> {
    for device in devices {
        let id = device.as_bytes();
        let seqs = {
            let mut statement =
                txn.prepare_cached("DELETE FROM copies WHERE device_id = ?1 RETURNING seq")?;
            let seqs = statement
                .query_map(params![id], |row| row.get::<_, i64>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            seqs
        };
        for seq in seqs {
            delete_if_no_copies(txn, seq)?;
        }
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

fn device_id(bytes: Vec<u8>) -> rusqlite::Result<DeviceId> {
    DeviceId::from_slice(&bytes).ok_or(rusqlite::Error::InvalidQuery)
}

fn identity_of(
    identity_key: Option<Vec<u8>>,
    signing_key: Option<Vec<u8>>,
) -> Option<IdentityKeys> {
    Some(IdentityKeys {
        identity_key: <[u8; 32]>::try_from(identity_key?.as_slice()).ok()?,
        signing_key: <[u8; 32]>::try_from(signing_key?.as_slice()).ok()?,
    })
}

fn signed_key(public_key: Vec<u8>, signature: Vec<u8>) -> Option<SignedKey> {
    Some(SignedKey {
        public_key: <[u8; 32]>::try_from(public_key.as_slice()).ok()?,
        signature: <[u8; 64]>::try_from(signature.as_slice()).ok()?,
    })
}

fn voucher_of(by: Option<Vec<u8>>, signature: Option<Vec<u8>>) -> Option<Voucher> {
    Some(Voucher {
        by: DeviceId::from_slice(&by?)?,
        signature: <[u8; 64]>::try_from(signature?.as_slice()).ok()?,
    })
}

/// The devices of an account as the delivery rules read them: whether each has published
/// identity keys, and its queue length with the copies stored and deleted earlier in the batch.
fn keyed_devices(
    conn: &Connection,
    notes: &Notes,
    account: AccountId,
) -> rusqlite::Result<Vec<AccountDevice>> {
    // Whether identity keys are published, as `identity_of` reads them, without reading them.
    let mut statement = conn.prepare_cached(
        "SELECT id, length(identity_key) = 32 AND length(signing_key) = 32, queue_len
         FROM devices WHERE account_id = ?1",
    )?;
    let rows = statement
        .query_map(params![account.0], |row| {
            let id = device_id(row.get(0)?)?;
            let queued = row.get::<_, i64>(2)? + notes.queued.pending(id);
            Ok(AccountDevice {
                id,
                keyed: row.get::<_, Option<bool>>(1)?.unwrap_or(false),
                queued: u64::try_from(queued).unwrap_or(0),
            })
        })?
        .collect();
    rows
}

/// The devices of an account as the directory lists them, with their queue lengths.
fn listed_devices(
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

fn message_id(bytes: Vec<u8>) -> rusqlite::Result<MessageId> {
    MessageId::from_slice(&bytes).ok_or(rusqlite::Error::InvalidQuery)
}

fn pack_times(times: &[Millis]) -> Vec<u8> {
    times.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn unpack_times(bytes: &[u8]) -> Vec<Millis> {
    bytes
        .chunks_exact(8)
        .filter_map(|chunk| <[u8; 8]>::try_from(chunk).ok().map(Millis::from_le_bytes))
        .collect()
}

fn millis(value: i64) -> Millis {
    Millis::try_from(value).unwrap_or(0)
}

fn sql_millis(value: Millis) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn receipt_kind(kind: i64) -> ReceiptKind {
    if kind == ReceiptKind::Expired as i64 {
        ReceiptKind::Expired
    } else {
        ReceiptKind::Delivered
    }
}

impl Store for SqliteStore {
    async fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        self.read_here(|conn| device_in(conn, id))
    }

    async fn login_device(&self, id: DeviceId) -> Result<Option<(Device, KeyStatus)>> {
        self.read_here(|conn| {
            let Some(device) = device_in(conn, id)? else {
                return Ok(None);
            };
            Ok(Some((device, key_status_in(conn, id)?)))
        })
    }

    async fn account(&self, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
        self.read_here(|conn| account_in(conn, pseudonym))
    }

    async fn route(&self, pseudonym: Pseudonym) -> Result<Option<Route>> {
        let (generation, held) = self.routes.get(&pseudonym);
        if held.is_some() {
            return Ok(held);
        }
        // Not a user is not held: the number may register at any moment.
        let Some(account) = self.read_here(|conn| account_in(conn, pseudonym))? else {
            return Ok(None);
        };
        let route = Route {
            account: account.account,
            devices: account.devices.into_iter().map(|(id, _)| id).collect(),
        };
        self.routes.insert(generation, pseudonym, route.clone());
        Ok(Some(route))
    }

    async fn accounts(&self, pseudonyms: Vec<Pseudonym>) -> Result<Vec<Option<AccountDevices>>> {
        self.read(move |conn| {
            pseudonyms
                .into_iter()
                .map(|pseudonym| account_in(conn, pseudonym))
                .collect()
        })
        .await
    }

    async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceId>> {
        self.read(move |conn| {
            let mut statement =
                conn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
            let devices = statement
                .query_map(params![account.0], |row| device_id(row.get(0)?))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(devices)
        })
        .await
    }

    async fn register_device(
        &self,
        pseudonym: Pseudonym,
        device: DeviceId,
        public_key: [u8; 32],
        now: Millis,
    ) -> Result<Registered> {
        self.write(Undo::Operation, move |txn, notes| {
            txn.prepare_cached(
                "INSERT INTO accounts (pseudonym, created_at) VALUES (?1, ?2) ON CONFLICT (pseudonym) DO NOTHING")?.execute(
                params![&pseudonym.0[..], sql_millis(now)],
            )?;
            let account: i64 =
                txn.prepare_cached("SELECT id FROM accounts WHERE pseudonym = ?1")?.query_row( params![&pseudonym.0[..]], |row| {
                    row.get(0)
                })?;
            let removed = {
                let mut statement = txn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
                let removed = statement
                    .query_map(params![account], |row| device_id(row.get(0)?))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                removed
            };
            // Messages queued for this account go, with the copies their senders' other devices
            // hold; then the old devices, with their queues, receipts and keys.
            delete_copies(txn, notes, "seq IN (SELECT seq FROM messages WHERE receiver_account = ?1)", params![account])?;
            txn.prepare_cached("DELETE FROM messages WHERE receiver_account = ?1")?.execute( params![account])?;
            delete_devices(txn, notes, &removed)?;
            notes.devices_changed = true;
            txn.prepare_cached(
                "INSERT INTO devices (id, account_id, public_key, created_at) VALUES (?1, ?2, ?3, ?4)")?.execute(
                params![device.as_bytes(), account, &public_key[..], sql_millis(now)],
            )?;
            Ok(Registered { account: AccountId(account), removed })
        })
        .await
    }

    async fn add_device(
        &self,
        account: AccountId,
        device: DeviceId,
        public_key: [u8; 32],
        identity: IdentityKeys,
        max_devices: usize,
        now: Millis,
    ) -> Result<Linked> {
        self.write(Undo::Operation, move |txn, notes| {
            let count: i64 = txn.prepare_cached(
                "SELECT COUNT(*) FROM devices WHERE account_id = ?1")?.query_row(
                params![account.0],
                |row| row.get(0),
            )?;
            if count == 0 {
                return Err(StoreError::NoSuchAccount);
            }
            if usize::try_from(count).unwrap_or(usize::MAX) >= max_devices {
                return Ok(Linked::TooManyDevices);
            }
            notes.devices_changed = true;
            txn.prepare_cached(
                "INSERT INTO devices (id, account_id, public_key, created_at, identity_key, signing_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?.execute(
                params![
                    device.as_bytes(),
                    account.0,
                    &public_key[..],
                    sql_millis(now),
                    &identity.identity_key[..],
                    &identity.signing_key[..]
                ],
            )?;
            Ok(Linked::Added)
        })
        .await
    }

    async fn remove_device(&self, account: AccountId, device: DeviceId) -> Result<bool> {
        self.write(Undo::Operation, move |txn, notes| {
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
        })
        .await
    }

    async fn publish_keys(
        &self,
        device: DeviceId,
        identity: IdentityKeys,
        one_time_keys: Vec<SignedKey>,
        fallback: Option<SignedKey>,
        max_stored: u32,
    ) -> Result<Published> {
        self.write(Undo::Operation, move |txn, _| {
            let stored = txn
                .prepare_cached(
                    "SELECT identity_key, signing_key FROM devices WHERE id = ?1")?.query_row(
                    params![device.as_bytes()],
                    |row| Ok(identity_of(row.get(0)?, row.get(1)?)),
                )
                .optional()?;
            match stored {
                None => return Err(StoreError::NoSuchAccount),
                Some(Some(existing)) if existing != identity => return Ok(Published::IdentityMismatch),
                Some(Some(_)) => {}
                Some(None) => {
                    txn.prepare_cached(
                        "UPDATE devices SET identity_key = ?2, signing_key = ?3 WHERE id = ?1")?.execute(
                        params![device.as_bytes(), &identity.identity_key[..], &identity.signing_key[..]],
                    )?;
                }
            }
            let count_keys = || -> rusqlite::Result<u32> {
                let count: i64 = txn.prepare_cached(
                    "SELECT COUNT(*) FROM one_time_keys WHERE device_id = ?1 AND fallback = 0")?.query_row(
                    params![device.as_bytes()],
                    |row| row.get(0),
                )?;
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
                insert.execute(params![device.as_bytes(), false, &key.public_key[..], &key.signature[..]])?;
            }
            let count = count_keys()?;
            if let Some(key) = fallback {
                txn.prepare_cached(
                    "DELETE FROM one_time_keys WHERE device_id = ?1 AND fallback = 1")?.execute(
                    params![device.as_bytes()],
                )?;
                insert.execute(params![device.as_bytes(), true, &key.public_key[..], &key.signature[..]])?;
            }
            Ok(Published::Stored { one_time_keys: count })
        })
        .await
    }

    async fn key_status(&self, device: DeviceId) -> Result<KeyStatus> {
        self.read_here(|conn| key_status_in(conn, device))
    }

    async fn claim_keys(&self, account: AccountId, only: Vec<DeviceId>) -> Result<Claimed> {
        self.write(Undo::Operation, move |txn, _| {
            let devices = listed_devices(txn, account)?;
            let mut claimed = Claimed {
                keys: Vec::new(),
                unknown: only.iter().copied().filter(|d| !devices.iter().any(|(l, _)| l.id == *d)).collect(),
            };
            // A claim naming a device that is not there hands out nothing at all.
            if !claimed.unknown.is_empty() {
                return Ok(claimed);
            }
            for (listed, _) in devices {
                let (device, voucher) = (listed.id, listed.voucher);
                let Some(identity) = listed.identity else { continue };
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
                    claimed.keys.push(ClaimedKey { device, identity, key, fallback, voucher });
                }
            }
            Ok(claimed)
        })
        .await
    }

    async fn device_keys(&self, account: AccountId) -> Result<Vec<ListedDevice>> {
        self.read(move |conn| {
            Ok(listed_devices(conn, account)?
                .into_iter()
                .map(|(listed, _)| listed)
                .collect())
        })
        .await
    }

    async fn set_voucher(
        &self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> Result<bool> {
        self.write(Undo::Operation, move |txn, _| {
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
        })
        .await
    }

    async fn delete_account(&self, account: AccountId) -> Result<Vec<DeviceId>> {
        self.write(Undo::Operation, move |txn, notes| {
            let devices = {
                let mut statement = txn.prepare_cached("SELECT id FROM devices WHERE account_id = ?1")?;
                let devices = statement
                    .query_map(params![account.0], |row| device_id(row.get(0)?))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                devices
            };
            // Undelivered messages this account sent go too: opting out leaves nothing behind.
            for device in &devices {
                delete_copies(txn, notes, "seq IN (SELECT seq FROM messages WHERE sender_device = ?1)", params![device.as_bytes()])?;
                txn.prepare_cached("DELETE FROM messages WHERE sender_device = ?1")?.execute( params![device.as_bytes()])?;
                txn.prepare_cached("DELETE FROM withdrawn WHERE sender_device = ?1")?.execute( params![device.as_bytes()])?;
            }
            txn.prepare_cached(
                "DELETE FROM codes WHERE pseudonym = (SELECT pseudonym FROM accounts WHERE id = ?1)")?.execute(
                params![account.0],
            )?;
            delete_copies(txn, notes, "seq IN (SELECT seq FROM messages WHERE receiver_account = ?1)", params![account.0])?;
            txn.prepare_cached("DELETE FROM messages WHERE receiver_account = ?1")?.execute( params![account.0])?;
            delete_devices(txn, notes, &devices)?;
            notes.devices_changed = true;
            let deleted = txn.prepare_cached("DELETE FROM accounts WHERE id = ?1")?.execute( params![account.0])?;
            if deleted == 0 {
                return Err(StoreError::NoSuchAccount);
            }
            Ok(devices)
        })
        .await
    }

    async fn update_code_record<R, F>(&self, pseudonym: Pseudonym, update: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Option<CodeRecord>) -> R + Send + 'static,
    {
        self.write(Undo::Operation, move |txn, _| {
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
                    txn.prepare_cached("DELETE FROM codes WHERE pseudonym = ?1")?.execute( params![&pseudonym.0[..]])?;
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
                             live_attempts = ?4, sent_at = ?5")?.execute(
                        params![&pseudonym.0[..], hash, expires, attempts, pack_times(&record.sent_at)],
                    )?;
                }
            }
            Ok(value)
        })
        .await
    }

    async fn enqueue(&self, message: NewMessage, queue_limit: u32) -> Result<Enqueued> {
        self.enqueue_submit(message, queue_limit)
            .await?
            .durable()
            .await
    }

    async fn enqueue_submit(
        &self,
        message: NewMessage,
        queue_limit: u32,
    ) -> Result<Completion<Enqueued>> {
        self.submit(Undo::Operation, move |txn, notes| {
            let duplicate = txn
                .prepare_cached(
                    "SELECT 1 FROM messages WHERE sender_device = ?1 AND msg_id = ?2")?.query_row(
                    params![message.sender_device.as_bytes(), message.id.as_bytes()],
                    |_| Ok(()),
                )
                .optional()?;
            if duplicate.is_some() {
                return Ok(Enqueued::Duplicate);
            }
            let receiver = keyed_devices(txn, notes, message.receiver)?;
            let own = if message.sender_account == message.receiver {
                Vec::new()
            } else {
                keyed_devices(txn, notes, message.sender_account)?
            };
            // Checked inside the transaction that stores the copies, so a device linked or
            // removed at the same moment cannot slip between the check and the write.
            let addressed: Vec<DeviceId> = message.copies.iter().map(|(d, _)| *d).collect();
            let addressees = match delivery::check_copies(message.sender_device, &receiver, &own, &addressed) {
                CopyCheck::Complete(addressees) => addressees,
                CopyCheck::DevicesChanged(difference) => return Ok(Enqueued::DevicesChanged(difference)),
                CopyCheck::NoReceiverDevice => return Err(StoreError::NoSuchAccount),
            };
            if delivery::queue_full(addressees.queue_lengths(), queue_limit) {
                return Ok(Enqueued::QueueFull);
            }
            txn.prepare_cached(
                "INSERT INTO messages (sender_device, msg_id, receiver_account, sent_at, expires_at, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5, x'')")?.execute(
                params![
                    message.sender_device.as_bytes(),
                    message.id.as_bytes(),
                    message.receiver.0,
                    sql_millis(message.sent_at),
                    sql_millis(message.expires_at),
                ],
            )?;
            let seq = txn.last_insert_rowid();
            let mut insert = txn.prepare_cached(
                "INSERT INTO copies (device_id, seq, payload, to_receiver) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (device, payload) in &message.copies {
                let to_receiver = addressees.to_receiver(*device);
                insert.execute(params![device.as_bytes(), seq, &payload[..], to_receiver])?;
                notes.queued.add(*device, 1);
            }
            notes.messages.push((message.sender_device, message.id));
            Ok(Enqueued::Stored)
        })
        .await
    }

    async fn pending(
        &self,
        device: DeviceId,
        after: QueueCursor,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<Pending>> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT m.seq, m.sender_device, m.msg_id, m.sent_at, COALESCE(c.payload, m.payload)
                 FROM copies c JOIN messages m ON m.seq = c.seq
                 WHERE c.device_id = ?1 AND c.seq > ?2 AND m.expires_at > ?3
                 ORDER BY c.seq LIMIT ?4",
            )?;
            let rows = statement
                .query_map(
                    params![
                        device.as_bytes(),
                        after.position(),
                        sql_millis(now),
                        i64::try_from(limit).unwrap_or(i64::MAX)
                    ],
                    |row| {
                        Ok(Pending {
                            cursor: QueueCursor::at(row.get(0)?),
                            sender_device: device_id(row.get(1)?)?,
                            id: message_id(row.get(2)?)?,
                            sent_at: millis(row.get(3)?),
                            payload: Bytes::from(row.get::<_, Vec<u8>>(4)?),
                        })
                    },
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn ack(&self, device: DeviceId, sender_device: DeviceId, id: MessageId) -> Result<Acked> {
        self.write(Undo::Batch, move |txn, notes| {
            ack_in(txn, notes, device, sender_device, id)
        })
        .await
    }

    async fn ack_staged(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
    ) -> Result<Completion<Acked>> {
        self.submit_staged(Undo::Batch, move |txn, notes| {
            ack_in(txn, notes, device, sender_device, id)
        })
        .await
    }

    async fn withdraw(&self, sender_device: DeviceId, id: MessageId) -> Result<Withdrawal> {
        self.write(Undo::Operation, move |txn, notes| {
            let message = txn
                .prepare_cached(
                    "SELECT seq, delivered, expires_at FROM messages WHERE sender_device = ?1 AND msg_id = ?2")?.query_row(
                    params![sender_device.as_bytes(), id.as_bytes()],
                    |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)? != 0, row.get::<_, i64>(2)?)),
                )
                .optional()?;
            match message {
                Some((_, true, _)) => Ok(Withdrawal::Delivered),
                Some((seq, false, expires_at)) => {
                    // The receiver's copies go; the sender's own other devices keep theirs (the
                    // message was sent, as SMS). The tombstone names only the sending device and
                    // the id, never the receiver, and lives until the TTL would have ended: an
                    // acknowledgement racing the withdraw is told not to show it.
                    delete_copies(txn, notes, "seq = ?1 AND to_receiver = 1", params![seq])?;
                    delete_if_no_copies(txn, seq)?;
                    txn.prepare_cached(
                        "INSERT OR REPLACE INTO withdrawn (sender_device, msg_id, expires_at) VALUES (?1, ?2, ?3)")?.execute(
                        params![sender_device.as_bytes(), id.as_bytes(), expires_at],
                    )?;
                    Ok(Withdrawal::Withdrawn)
                }
                None => {
                    let delivered = txn
                        .prepare_cached(
                            "SELECT 1 FROM receipts WHERE device_id = ?1 AND msg_id = ?2 AND kind = ?3")?.query_row(
                            params![sender_device.as_bytes(), id.as_bytes(), ReceiptKind::Delivered as i64],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some();
                    let withdrawn = txn
                        .prepare_cached(
                            "SELECT 1 FROM withdrawn WHERE sender_device = ?1 AND msg_id = ?2")?.query_row(
                            params![sender_device.as_bytes(), id.as_bytes()],
                            |_| Ok(()),
                        )
                        .optional()?
                        .is_some();
                    Ok(if delivered {
                        Withdrawal::Delivered
                    } else if withdrawn {
                        Withdrawal::Withdrawn
                    } else {
                        Withdrawal::Unknown
                    })
                }
            }
        })
        .await
    }

    async fn expire(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredMessage>> {
        // Most sweeps find nothing: look first, so that an idle server writes nothing.
        let any = self
            .read(move |conn| {
                Ok(conn
                    .prepare_cached("SELECT 1 FROM messages WHERE expires_at <= ?1 LIMIT 1")?
                    .query_row(params![sql_millis(now)], |_| Ok(()))
                    .optional()?
                    .is_some())
            })
            .await?;
        if !any {
            return Ok(Vec::new());
        }
        self.write(Undo::Operation, move |txn, notes| {
            let expired = {
                let mut statement = txn.prepare_cached(
                    "SELECT seq, sender_device, msg_id, delivered FROM messages WHERE expires_at <= ?1 LIMIT ?2",
                )?;
                let expired = statement
                    .query_map(params![sql_millis(now), i64::try_from(limit).unwrap_or(i64::MAX)], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            device_id(row.get(1)?)?,
                            message_id(row.get(2)?)?,
                            row.get::<_, i64>(3)? != 0,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                expired
            };
            txn.prepare_cached("DELETE FROM withdrawn WHERE expires_at <= ?1")?.execute( params![sql_millis(now)])?;
            let mut receipts = Vec::new();
            for (seq, sender_device, id, delivered) in expired {
                delete_copies(txn, notes, "seq = ?1", params![seq])?;
                txn.prepare_cached("DELETE FROM messages WHERE seq = ?1")?.execute( params![seq])?;
                if !delivered {
                    let stored = txn.prepare_cached(
                        "INSERT OR REPLACE INTO receipts (device_id, msg_id, kind)
                         SELECT ?1, ?2, ?3 WHERE EXISTS (SELECT 1 FROM devices WHERE id = ?1)")?.execute(
                        params![sender_device.as_bytes(), id.as_bytes(), ReceiptKind::Expired as i64],
                    )?;
                    if stored > 0 {
                        receipts.push(ExpiredMessage { sender_device, id });
                    }
                }
            }
            Ok(receipts)
        })
        .await
    }

    async fn backlog(&self, device: DeviceId) -> Result<Backlog> {
        self.read_here(|conn| {
            // One statement for both; `queued` is NULL for an unknown device.
            let (queued, receipts) = conn
                .prepare_cached(
                    "SELECT (SELECT queue_len > 0 FROM devices WHERE id = ?1),
                            EXISTS (SELECT 1 FROM receipts WHERE device_id = ?1)",
                )?
                .query_row(params![device.as_bytes()], |row| {
                    Ok((row.get::<_, Option<bool>>(0)?, row.get::<_, bool>(1)?))
                })?;
            Ok(Backlog {
                queued: queued.unwrap_or(false),
                receipts,
            })
        })
    }

    async fn receipts(&self, device: DeviceId) -> Result<Vec<PendingReceipt>> {
        self.read(move |conn| {
            let mut statement = conn.prepare_cached(
                "SELECT msg_id, kind FROM receipts WHERE device_id = ?1 LIMIT 1000",
            )?;
            let rows = statement
                .query_map(params![device.as_bytes()], |row| {
                    Ok(PendingReceipt {
                        id: message_id(row.get(0)?)?,
                        kind: receipt_kind(row.get(1)?),
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(rows)
        })
        .await
    }

    async fn ack_receipt(&self, device: DeviceId, id: MessageId) -> Result<()> {
        // Lazy: a receipt whose deletion is lost in a crash is only sent again.
        self.write_lazily(Undo::Statement, move |txn, _| {
            txn.prepare_cached("DELETE FROM receipts WHERE device_id = ?1 AND msg_id = ?2")?
                .execute(params![device.as_bytes(), id.as_bytes()])?;
            Ok(())
        })
        .await
    }

    async fn prune_codes(&self, now: Millis) -> Result<usize> {
        let policy = tidings_core::verification::CodePolicy::default();
        let any = self
            .read(|conn| {
                Ok(conn
                    .prepare_cached("SELECT 1 FROM codes LIMIT 1")?
                    .query_row([], |_| Ok(()))
                    .optional()?
                    .is_some())
            })
            .await?;
        if !any {
            return Ok(0);
        }
        self.write(Undo::Operation, move |txn, _| {
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
        })
        .await
    }

    async fn scrub(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job::Scrub(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting of a connection made by `open` on a database of its own, which is removed.
    fn setting(open: fn(&Path) -> Result<Connection>, pragma: &str) -> i64 {
        let dir =
            std::env::temp_dir().join(format!("tidings-setting-{pragma}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let conn = open(&dir.join(DATABASE_FILE)).expect("open");
        let value = conn
            .query_row(&format!("PRAGMA {pragma}"), [], |row| row.get(0))
            .expect("pragma");
        drop(conn);
        let _ = std::fs::remove_dir_all(&dir);
        value
    }

    /// Checks that every connection asks for temporary data in memory. Otherwise a savepoint's
    /// undo copies of the pages it changes (the sub-journal) go to a temporary file: outside the
    /// data directory, beyond the reach of `secure_delete` and the scrub, and a file write for
    /// every page an operation touches.
    #[test]
    fn temporary_data_stays_in_memory() {
        for open in [open_connection, open_writer, open_reader] {
            assert_eq!(setting(open, "temp_store"), 2, "temp_store is not MEMORY");
        }
    }

    /// Checks that the writer checkpoints the WAL only after [`WAL_AUTOCHECKPOINT_PAGES`], not
    /// after SQLite's default of 1,000 pages (one megabyte with 1 KiB pages).
    #[test]
    fn the_writer_checkpoints_after_its_own_limit() {
        assert_eq!(
            setting(open_writer, "wal_autocheckpoint"),
            i64::from(WAL_AUTOCHECKPOINT_PAGES)
        );
    }
}
