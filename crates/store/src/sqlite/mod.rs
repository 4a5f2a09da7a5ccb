//! The embedded engine: one SQLite database in the data directory.
//!
//! Writes go to a single writer thread that commits them in batches (group commit): every operation
//! waiting when a transaction starts joins it, the transaction commits with one WAL sync
//! (`synchronous = FULL`), and only then is each operation answered. A write nobody waits on
//! (deleting a receipt its device has taken) is *lazy*: a batch of only lazy writes commits without
//! a sync of its own and becomes durable with the next synced batch (WAL frames are synced in
//! order), so it never holds the writer for a sync. Each operation runs in a savepoint of its own,
//! so that one failing on its input leaves the rest of its batch intact, except for the most
//! frequent writes: an acknowledgement fails only when the engine does, so it runs without one and
//! its failure rolls back its whole batch, and a receipt's deletion is one statement, which SQLite
//! undoes by itself (see `writer::Undo`). Reads run beside the writer, as WAL allows: point reads
//! by key on the calling thread, with a read connection of that thread's own (handing a read of a
//! few rows to another thread costs two thread switches, more than the read itself); longer reads
//! on the blocking pool.
//!
//! Deletion: `secure_delete` overwrites deleted rows and freed pages with zeros, and
//! [`Store::scrub`](crate::Store::scrub) checkpoints the WAL into the database and truncates it to
//! zero bytes, so that the old frames holding deleted rows are gone too. The server scrubs on a
//! fixed interval; that interval bounds how long deleted bytes can remain in the data files.
//! Temporary data (a savepoint's undo copies of the pages it changes) stays in memory, so no copy
//! of a message page is ever written outside the data directory.
//!
//! # Layout
//! - this file: [`SqliteStore`], its options, and opening it;
//! - `schema`: the tables, and how an older database is brought up to them;
//! - `connection`: connection settings (pragmas) and the read connections;
//! - `writer`: the group-commit writer: batches, what a failing write takes back, the notes a
//!   batch keeps for its commit (sync report, queue lengths, dropped routes, receipt deadlines);
//! - `routes`: what sends read instead of the tables (routes, and the devices a screen checks);
//! - `receipts` also holds the earliest receipt deadline, which the expiry sweep reads instead
//!   of an index;
//! - `rows`: how domain values are stored in columns and read back;
//! - `store`: the `impl Store`, each operation one named function of a family module:
//!   `accounts` (accounts and devices), `keys`, `messages` (copies, acknowledgements,
//!   withdrawals, expiry), `receipts`, `codes`.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, Semaphore};

use crate::{Result, StoreError, SyncObserver};

mod accounts;
mod codes;
mod connection;
mod keys;
mod messages;
mod receipts;
mod routes;
mod rows;
mod schema;
mod store;
mod writer;

pub use routes::ROUTE_CACHE_ENTRIES;
pub use writer::WRITER_QUEUE;

use connection::{ReaderPool, STORES};
use receipts::ReceiptDeadlines;
use routes::{RouteCache, ScreenCache};
use writer::{HeldInMemory, Job};

/// The database file inside the data directory.
pub const DATABASE_FILE: &str = "tidings.sqlite";

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

/// The embedded SQLite engine. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    /// Hands writes to the writer thread.
    writer: mpsc::Sender<Job>,
    readers: Arc<ReaderPool>,
    /// Routes and receipt deadlines, which the writer keeps up to date.
    held: Arc<HeldInMemory>,
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

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir` and starts the writer thread.
    pub fn open(data_dir: &Path, options: SqliteOptions) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::engine(format!("{}: {e}", data_dir.display())))?;
        let path = data_dir.join(DATABASE_FILE);
        connection::restrict_file_modes(&path)?;
        let conn = connection::open_writer(&path)?;
        schema::migrate(&conn)?;
        let senders = writer::SenderCounts::load(&conn)?;
        let next_seq = writer::first_free_seq(&conn)?;
        let (writer, jobs) = mpsc::channel(WRITER_QUEUE);
        let held = Arc::new(HeldInMemory {
            routes: RouteCache::default(),
            screened: ScreenCache::default(),
            receipt_deadlines: ReceiptDeadlines::read(&conn)?,
        });
        let max_batch = options.max_batch.max(1);
        std::thread::Builder::new()
            .name("tidings-store-writer".into())
            .spawn({
                let held = Arc::clone(&held);
                move || {
                    let observer = options.sync_observer;
                    writer::run_writer(conn, jobs, max_batch, observer, &held, senders, next_seq)
                }
            })
            .map_err(|e| StoreError::engine(e.to_string()))?;
        Ok(Self {
            writer,
            held,
            readers: Arc::new(ReaderPool {
                store: STORES.fetch_add(1, Ordering::Relaxed),
                path,
                idle: Mutex::new(Vec::new()),
                permits: Semaphore::new(8),
            }),
        })
    }
}
