//! Connection settings (pragmas) and the read connections: point reads on the calling thread,
//! longer reads on the blocking pool.
//!
//! Every connection is opened here and nowhere else, so every one keeps temporary data in memory
//! and deletes securely. Reads never write.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;
use tokio::sync::Semaphore;

use super::SqliteStore;
use crate::{Result, StoreError};

/// Numbers open stores, so that a thread's point-read connections are told apart.
pub(super) static STORES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's point-read connections, one per open store (by its number).
    static HERE: RefCell<Vec<(usize, Connection)>> = const { RefCell::new(Vec::new()) };
}

/// The connections reads borrow, with a bound on the reads running at once.
pub(super) struct ReaderPool {
    /// The store's number among those open (see [`STORES`]).
    pub(super) store: usize,
    pub(super) path: PathBuf,
    pub(super) idle: Mutex<Vec<Connection>>,
    pub(super) permits: Semaphore,
}

/// Makes the database at `path` readable and writable by its owner only (0600), creating it
/// empty if it does not exist, before SQLite opens it: SQLite creates files with the umask (0644
/// as a rule) but gives its write-ahead log and shared-memory index the database's own mode, so
/// all three then hold pseudonyms and ciphertexts for the server's user alone. A database, log or
/// index left by an earlier version with a wider mode is narrowed too.
pub(super) fn restrict_file_modes(path: &Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let failed =
        |file: &Path, e: std::io::Error| StoreError::engine(format!("{}: {e}", file.display()));
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| failed(path, e))?;
    let mut files = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        files.push(PathBuf::from(name));
    }
    for file in &files {
        match std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)) {
            // Not there, or removed meanwhile by a connection of the same database closing (the
            // last connection to close removes the log and the index).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => other.map_err(|e| failed(file, e))?,
        }
    }
    Ok(())
}

pub(super) fn open_connection(path: &Path) -> Result<Connection> {
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
    // Foreign keys are not enforced by SQLite but by the writer (see `schema::SCHEMA`): enforcing them
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
/// ([`Store::scrub`](crate::Store::scrub), every 2 s by default) checkpoints and truncates the WAL
/// anyway; at 16,384 the WAL grows to about 17 MB between scrubs at the most, and the durable drain
/// ran 23 % faster at the median (docs/BENCHMARKS.md, change 19).
pub(super) const WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// The writer's connection: [`open_connection`] with checkpoints every [`WAL_AUTOCHECKPOINT_PAGES`]
/// (a setting of the connection that commits, which only the writer does).
pub(super) fn open_writer(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    Ok(conn)
}

/// A read connection: [`open_connection`] with a small page cache. A point read touches a few
/// pages and the operating system's file cache holds the rest, while SQLite's default of about
/// 2 MB per connection, kept by every runtime thread and pooled reader, grew with the devices read
/// at login into a few megabytes that only the writer needs.
pub(super) fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.execute_batch("PRAGMA cache_size = -256;")?;
    Ok(conn)
}

impl SqliteStore {
    /// A point read (a few rows by key) on the calling thread; see the engine's documentation in
    /// [`crate::sqlite`].
    pub(super) fn read_here<R>(&self, query: impl FnOnce(&Connection) -> Result<R>) -> Result<R> {
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

    pub(super) async fn read<R, F>(&self, query: F) -> Result<R>
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::DATABASE_FILE;

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
