//! Storage-engine comparison for the Tidings message queue.
//!
//! For each engine (SQLite via rusqlite, redb, fjall) this measures:
//!   1. durable group-commit insert throughput (batch sizes 1, 64, 512),
//!   2. durable delete throughput (batches of 64),
//!   3. residue: whether planted 32-byte markers (in payloads and as an
//!      account key) can still be found by a raw byte scan of every file in
//!      the data directory right after deletion, and after the engine's
//!      cleanup operation (and how long that cleanup took),
//!   4. final on-disk size.
//!
//! Every transaction is committed durably (fsync/fdatasync before commit
//! returns). See README.md for the exact command and caveats.

use anyhow::{bail, Context, Result};
use rand::rngs::{OsRng, SmallRng};
use rand::{Rng, RngCore, SeedableRng};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// Workload parameters
// ---------------------------------------------------------------------------

const PAYLOAD_LEN: usize = 1024;
const LARGE_PAYLOAD_LEN: usize = 64 * 1024;
const ROWS_B1: usize = 2_000;
const ROWS_B64: usize = 50_000;
const ROWS_B512: usize = 50_000;
const DELETE_BATCH: usize = 64;
const ACCOUNTS: usize = 2_000;
const RECEIVER_DEVICES: usize = 1_000;

type Id16 = [u8; 16];
type Key32 = [u8; 32];

#[derive(Clone)]
struct Msg {
    receiver: Id16,
    sender: Id16,
    message_id: Id16,
    expires_at: i64,
    payload: Vec<u8>,
}

impl Msg {
    /// Key used by the KV engines: receiver_device || message_id.
    fn kv_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(&self.receiver);
        k[16..].copy_from_slice(&self.message_id);
        k
    }
    /// Value used by the KV engines: sender || expires_at (BE) || payload.
    fn kv_value(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + self.payload.len());
        v.extend_from_slice(&self.sender);
        v.extend_from_slice(&self.expires_at.to_be_bytes());
        v.extend_from_slice(&self.payload);
        v
    }
}

#[derive(Clone, Copy)]
struct MsgKey {
    receiver: Id16,
    message_id: Id16,
}

impl MsgKey {
    fn kv_key(&self) -> [u8; 32] {
        let mut k = [0u8; 32];
        k[..16].copy_from_slice(&self.receiver);
        k[16..].copy_from_slice(&self.message_id);
        k
    }
}

// ---------------------------------------------------------------------------
// Engine abstraction: every method is ONE durable transaction.
// ---------------------------------------------------------------------------

trait Engine {
    fn insert_messages(&mut self, rows: &[Msg]) -> Result<()>;
    fn delete_messages(&mut self, keys: &[MsgKey]) -> Result<()>;
    fn insert_accounts(&mut self, rows: &[(Key32, Vec<u8>)]) -> Result<()>;
    fn delete_account(&mut self, key: &Key32) -> Result<()>;
    /// The engine's documented cleanup; returns a short description of what ran.
    fn cleanup(&mut self) -> Result<String>;
    /// Close the database (flush/drop everything).
    fn close(self: Box<Self>) -> Result<()>;
}

// ----------------------------- SQLite --------------------------------------

struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    fn open(dir: &Path) -> Result<Self> {
        let conn = rusqlite::Connection::open(dir.join("tidings.db"))?;
        // secure_delete must be set per connection, at open.
        conn.pragma_update(None, "secure_delete", "ON")?;
        let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("journal_mode is {mode}, expected wal");
        }
        // FULL: the WAL is fsynced at every commit (NORMAL would not be durable).
        conn.pragma_update(None, "synchronous", "FULL")?;
        let sd: i64 = conn.pragma_query_value(None, "secure_delete", |r| r.get(0))?;
        let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
        if sd != 1 || sync != 2 {
            bail!("pragmas not applied: secure_delete={sd} synchronous={sync}");
        }
        conn.execute_batch(
            "CREATE TABLE messages (
                 receiver_device BLOB NOT NULL,
                 sender_device   BLOB NOT NULL,
                 message_id      BLOB NOT NULL,
                 expires_at      INTEGER NOT NULL,
                 payload         BLOB NOT NULL
             );
             CREATE UNIQUE INDEX messages_by_receiver ON messages(receiver_device, message_id);
             CREATE TABLE accounts (
                 pseudonym BLOB PRIMARY KEY NOT NULL,
                 data      BLOB NOT NULL
             ) WITHOUT ROWID;",
        )?;
        Ok(Self { conn })
    }
}

impl Engine for Sqlite {
    fn insert_messages(&mut self, rows: &[Msg]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO messages (receiver_device, sender_device, message_id, expires_at, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in rows {
                st.execute(rusqlite::params![
                    &m.receiver[..],
                    &m.sender[..],
                    &m.message_id[..],
                    m.expires_at,
                    &m.payload[..]
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_messages(&mut self, keys: &[MsgKey]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "DELETE FROM messages WHERE receiver_device = ?1 AND message_id = ?2",
            )?;
            for k in keys {
                let n = st.execute(rusqlite::params![&k.receiver[..], &k.message_id[..]])?;
                if n != 1 {
                    bail!("sqlite: delete affected {n} rows");
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_accounts(&mut self, rows: &[(Key32, Vec<u8>)]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st =
                tx.prepare_cached("INSERT INTO accounts (pseudonym, data) VALUES (?1, ?2)")?;
            for (k, v) in rows {
                st.execute(rusqlite::params![&k[..], &v[..]])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_account(&mut self, key: &Key32) -> Result<()> {
        let tx = self.conn.transaction()?;
        let n = tx.execute("DELETE FROM accounts WHERE pseudonym = ?1", [&key[..]])?;
        if n != 1 {
            bail!("sqlite: account delete affected {n} rows");
        }
        tx.commit()?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<String> {
        let (busy, log, ckpt): (i64, i64, i64) = self.conn.query_row(
            "PRAGMA wal_checkpoint(TRUNCATE)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        if busy != 0 {
            bail!("wal_checkpoint(TRUNCATE) was blocked (busy={busy})");
        }
        Ok(format!("wal_checkpoint(TRUNCATE): busy={busy} log={log} checkpointed={ckpt}"))
    }

    fn close(self: Box<Self>) -> Result<()> {
        self.conn.close().map_err(|(_, e)| e)?;
        Ok(())
    }
}

// ------------------------------- redb --------------------------------------

const REDB_MESSAGES: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("messages");
const REDB_ACCOUNTS: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("accounts");

struct Redb {
    db: redb::Database,
}

impl Redb {
    fn open(dir: &Path) -> Result<Self> {
        let db = redb::Database::create(dir.join("tidings.redb"))?;
        let mut tx = db.begin_write()?;
        tx.set_durability(redb::Durability::Immediate);
        tx.open_table(REDB_MESSAGES)?;
        tx.open_table(REDB_ACCOUNTS)?;
        tx.commit()?;
        Ok(Self { db })
    }

    fn write(&self) -> Result<redb::WriteTransaction> {
        let mut tx = self.db.begin_write()?;
        // Immediate (the default) = fsync before commit() returns.
        tx.set_durability(redb::Durability::Immediate);
        Ok(tx)
    }
}

impl Engine for Redb {
    fn insert_messages(&mut self, rows: &[Msg]) -> Result<()> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(REDB_MESSAGES)?;
            for m in rows {
                let k = m.kv_key();
                let v = m.kv_value();
                t.insert(&k[..], &v[..])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_messages(&mut self, keys: &[MsgKey]) -> Result<()> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(REDB_MESSAGES)?;
            for k in keys {
                let kk = k.kv_key();
                if t.remove(&kk[..])?.is_none() {
                    bail!("redb: key not found on delete");
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn insert_accounts(&mut self, rows: &[(Key32, Vec<u8>)]) -> Result<()> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(REDB_ACCOUNTS)?;
            for (k, v) in rows {
                t.insert(&k[..], &v[..])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn delete_account(&mut self, key: &Key32) -> Result<()> {
        let tx = self.write()?;
        {
            let mut t = tx.open_table(REDB_ACCOUNTS)?;
            if t.remove(&key[..])?.is_none() {
                bail!("redb: account not found on delete");
            }
        }
        tx.commit()?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<String> {
        // Database::compact() relocates pages towards the start of the file
        // and truncates the tail. It iterates internally until no progress.
        let compacted = self.db.compact()?;
        Ok(format!("Database::compact() -> {compacted}"))
    }

    fn close(self: Box<Self>) -> Result<()> {
        drop(self.db);
        Ok(())
    }
}

// ------------------------------- fjall -------------------------------------

struct Fjall {
    db: fjall::Database,
    messages: fjall::Keyspace,
    accounts: fjall::Keyspace,
}

impl Fjall {
    /// Durability used for every commit: fdatasync of the journal (same
    /// syscall redb uses; SQLite uses fdatasync on Linux as well).
    const DURABILITY: Option<fjall::PersistMode> = Some(fjall::PersistMode::SyncData);

    fn open(dir: &Path) -> Result<Self> {
        let db = fjall::Database::builder(dir.join("fjall")).open()?;
        let messages = db.keyspace("messages", fjall::KeyspaceCreateOptions::default)?;
        let accounts = db.keyspace("accounts", fjall::KeyspaceCreateOptions::default)?;
        Ok(Self { db, messages, accounts })
    }

    fn batch(&self) -> fjall::OwnedWriteBatch {
        self.db.batch().durability(Self::DURABILITY)
    }
}

impl Engine for Fjall {
    fn insert_messages(&mut self, rows: &[Msg]) -> Result<()> {
        let mut b = self.batch();
        for m in rows {
            b.insert(&self.messages, m.kv_key().to_vec(), m.kv_value());
        }
        b.commit()?;
        Ok(())
    }

    fn delete_messages(&mut self, keys: &[MsgKey]) -> Result<()> {
        let mut b = self.batch();
        for k in keys {
            b.remove(&self.messages, k.kv_key().to_vec());
        }
        b.commit()?;
        Ok(())
    }

    fn insert_accounts(&mut self, rows: &[(Key32, Vec<u8>)]) -> Result<()> {
        let mut b = self.batch();
        for (k, v) in rows {
            b.insert(&self.accounts, k.to_vec(), v.clone());
        }
        b.commit()?;
        Ok(())
    }

    fn delete_account(&mut self, key: &Key32) -> Result<()> {
        let mut b = self.batch();
        b.remove(&self.accounts, key.to_vec());
        b.commit()?;
        Ok(())
    }

    fn cleanup(&mut self) -> Result<String> {
        // fjall 3.1 has no documented "purge deleted data" operation. The
        // closest it exposes are #[doc(hidden)] methods: flush the memtable
        // to a table file and force a major compaction (drops tombstones and
        // shadowed values at the last level). Journal files are only deleted
        // after they were rotated (at 64 MB) and fully flushed.
        let mut s = String::new();
        for ks in [&self.messages, &self.accounts] {
            ks.rotate_memtable_and_wait()?;
            ks.major_compact()?;
            let _ = write!(s, "{}: tables={} ", ks.name().as_ref() as &str, ks.table_count());
        }
        self.db.persist(fjall::PersistMode::SyncAll)?;
        let _ = write!(s, "journals={}", self.db.journal_count());
        Ok(format!("rotate_memtable_and_wait + major_compact (hidden APIs); {s}"))
    }

    fn close(self: Box<Self>) -> Result<()> {
        let Fjall { db, messages, accounts } = *self;
        db.persist(fjall::PersistMode::SyncAll)?;
        drop(messages);
        drop(accounts);
        drop(db);
        // Background workers finish asynchronously after the last handle is
        // dropped; give them a moment before we scan.
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Residue scanning
// ---------------------------------------------------------------------------

struct Marker {
    name: &'static str,
    bytes: Key32,
}

/// Per marker: list of files (relative) where it was found. A hit is either
/// the full 32 bytes, or (flagged "~") only its last 16 bytes, to catch
/// prefix-compressed keys in LSM blocks.
fn scan(dir: &Path, markers: &[&Marker]) -> Result<Vec<(String, Vec<String>)>> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    let mut out: Vec<(String, Vec<String>)> =
        markers.iter().map(|m| (m.name.to_string(), Vec::new())).collect();
    for f in &files {
        let data = std::fs::read(f).with_context(|| format!("read {}", f.display()))?;
        let rel = f.strip_prefix(dir).unwrap_or(f).display().to_string();
        for (i, m) in markers.iter().enumerate() {
            if memchr::memmem::find(&data, &m.bytes).is_some() {
                out[i].1.push(rel.clone());
            } else if memchr::memmem::find(&data, &m.bytes[16..]).is_some() {
                out[i].1.push(format!("~{rel}"));
            }
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let ft = e.file_type()?;
        if ft.is_dir() {
            walk(&e.path(), out)?;
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    Ok(())
}

fn dir_listing(dir: &Path) -> Result<(u64, String)> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    let mut total = 0;
    let mut s = String::new();
    for f in &files {
        let len = std::fs::metadata(f)?.len();
        total += len;
        let rel = f.strip_prefix(dir).unwrap_or(f).display().to_string();
        let _ = write!(s, "{rel}={} ", human(len));
    }
    Ok((total, s))
}

/// Bytes actually allocated on disk (st_blocks * 512), catches sparse files.
fn allocated_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    let mut total = 0;
    for f in &files {
        total += std::fs::metadata(f)?.blocks() * 512;
    }
    Ok(total)
}

fn fmt_scan(res: &[(String, Vec<String>)]) -> String {
    let found: Vec<String> = res
        .iter()
        .filter(|(_, files)| !files.is_empty())
        .map(|(n, files)| format!("{n}[{}]", files.join(",")))
        .collect();
    if found.is_empty() {
        "GONE".to_string()
    } else {
        format!("FOUND {}", found.join(" "))
    }
}

/// Identity hasher: the census keys are random bytes already.
#[derive(Default)]
struct IdHasher(u64);
impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}
type Census = std::collections::HashMap<u64, (usize, [u8; 32]), std::hash::BuildHasherDefault<IdHasher>>;

/// 32-byte window of a payload that the census looks for (bytes 64..96;
/// the planted markers live elsewhere).
fn census_window(payload: &[u8]) -> [u8; 32] {
    let mut w = [0u8; 32];
    w.copy_from_slice(&payload[64..96]);
    w
}

/// Count how many of the given deleted rows still have their 32-byte
/// payload window anywhere in any file of `dir` (byte-granular scan).
fn census(dir: &Path, windows: &Census) -> Result<usize> {
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    let mut seen = vec![false; windows.values().map(|(i, _)| i + 1).max().unwrap_or(0)];
    for f in &files {
        let data = std::fs::read(f)?;
        if data.len() < 32 {
            continue;
        }
        for off in 0..=data.len() - 32 {
            let k = u64::from_le_bytes(data[off..off + 8].try_into().expect("8 bytes"));
            if let Some((idx, w)) = windows.get(&k) {
                if data[off..off + 32] == w[..] {
                    seen[*idx] = true;
                }
            }
        }
    }
    Ok(seen.iter().filter(|s| **s).count())
}

fn census_of(windows: &[[u8; 32]]) -> Census {
    let mut c = Census::default();
    for (i, w) in windows.iter().enumerate() {
        let k = u64::from_le_bytes(w[..8].try_into().expect("8 bytes"));
        c.insert(k, (i, *w));
    }
    c
}

fn human(b: u64) -> String {
    if b >= 1 << 20 {
        format!("{:.1}MiB", b as f64 / (1u64 << 20) as f64)
    } else if b >= 1 << 10 {
        format!("{:.1}KiB", b as f64 / 1024.0)
    } else {
        format!("{b}B")
    }
}

// ---------------------------------------------------------------------------
// Benchmark driver
// ---------------------------------------------------------------------------

#[derive(Default)]
struct Report {
    engine: String,
    ins_b1: f64,
    ins_b64: f64,
    ins_b512: f64,
    del_b64: f64,
    sanity: String,
    mid_after_delete: String,
    mid_after_cleanup: String,
    mid_cleanup: Duration,
    end_after_delete: String,
    end_after_cleanup: String,
    end_cleanup: Duration,
    after_close: String,
    census_mid_after_delete: usize,
    census_mid_after_cleanup: usize,
    census_end_after_delete: usize,
    census_end_after_cleanup: usize,
    census_after_close: usize,
    census_mid_total: usize,
    census_total: usize,
    peak_size: u64,
    size_before_cleanup: u64,
    final_size: u64,
    final_allocated: u64,
    total: Duration,
    notes: Vec<String>,
}

fn gen_rows(rng: &mut SmallRng, devices: &[Id16], seq: &mut u64, n: usize) -> Vec<Msg> {
    (0..n)
        .map(|_| {
            let mut sender = [0u8; 16];
            rng.fill_bytes(&mut sender);
            // Time-ordered message id: 8-byte sequence || 8 random bytes.
            let mut message_id = [0u8; 16];
            message_id[..8].copy_from_slice(&seq.to_be_bytes());
            rng.fill_bytes(&mut message_id[8..]);
            *seq += 1;
            let mut payload = vec![0u8; PAYLOAD_LEN];
            rng.fill_bytes(&mut payload);
            Msg {
                receiver: devices[rng.gen_range(0..devices.len())],
                sender,
                message_id,
                expires_at: 1_800_000_000 + *seq as i64,
                payload,
            }
        })
        .collect()
}

/// Plant `marker` into row `idx` of `rows` (global index `global`), making it
/// a 64 KiB payload if `large`, marker placed deep inside (overflow pages).
fn plant(rows: &mut [Msg], idx: usize, marker: &Marker, large: bool, rng: &mut SmallRng) {
    let m = &mut rows[idx];
    if large {
        let mut p = vec![0u8; LARGE_PAYLOAD_LEN];
        rng.fill_bytes(&mut p);
        let off = 40 * 1024 + 123;
        p[off..off + 32].copy_from_slice(&marker.bytes);
        m.payload = p;
    } else {
        let off = 500;
        m.payload[off..off + 32].copy_from_slice(&marker.bytes);
    }
}

fn timed_inserts(
    eng: &mut dyn Engine,
    rows: &[Msg],
    batch: usize,
    dir: &Path,
    peak: &mut u64,
) -> Result<f64> {
    let t = Instant::now();
    for (i, chunk) in rows.chunks(batch).enumerate() {
        eng.insert_messages(chunk)?;
        if i % 64 == 0 {
            // cheap (a stat per file); tracks WAL / journal high-water mark
            let (sz, _) = dir_listing(dir)?;
            *peak = (*peak).max(sz);
        }
    }
    Ok(rows.len() as f64 / t.elapsed().as_secs_f64())
}

fn run_engine(name: &str, root: &Path) -> Result<Report> {
    let tmp = tempfile::Builder::new()
        .prefix(&format!("tidings-bench-{name}-"))
        .tempdir_in(root)?;
    let dir = tmp.path().to_path_buf();
    eprintln!("\n=== {name} (data dir {}) === loadavg at start: {}", dir.display(), loadavg());
    let t_total = Instant::now();

    let mut eng: Box<dyn Engine> = match name {
        "sqlite" => Box::new(Sqlite::open(&dir)?),
        "redb" => Box::new(Redb::open(&dir)?),
        "fjall" => Box::new(Fjall::open(&dir)?),
        _ => bail!("unknown engine {name}"),
    };
    let mut r = Report { engine: name.to_string(), ..Default::default() };

    // Fresh markers each run, from the OS RNG.
    let mk = |name| {
        let mut b = [0u8; 32];
        OsRng.fill_bytes(&mut b);
        Marker { name, bytes: b }
    };
    let pa = mk("PA"); // payload marker, deleted in the first (mid-queue) half
    let ka = mk("KA"); // account-key marker, deleted at mid-queue
    let pb = mk("PB"); // payload marker, deleted in the second half
    let kb = mk("KB"); // account-key marker, deleted at the end
    let all = [&pa, &ka, &pb, &kb];

    let mut rng = SmallRng::seed_from_u64(0x7161_6e67);
    let devices: Vec<Id16> = (0..RECEIVER_DEVICES)
        .map(|_| {
            let mut d = [0u8; 16];
            rng.fill_bytes(&mut d);
            d
        })
        .collect();

    // Accounts: 2,000 small rows, two of them keyed by the marker pseudonyms.
    let mut accounts: Vec<(Key32, Vec<u8>)> = (0..ACCOUNTS)
        .map(|_| {
            let mut k = [0u8; 32];
            rng.fill_bytes(&mut k);
            let mut v = vec![0u8; 64];
            rng.fill_bytes(&mut v);
            (k, v)
        })
        .collect();
    accounts[700].0 = ka.bytes;
    accounts[1400].0 = kb.bytes;
    eng.insert_accounts(&accounts)?;

    // Generate all rows up front (not timed).
    let mut seq = 0u64;
    let mut rows_b1 = gen_rows(&mut rng, &devices, &mut seq, ROWS_B1);
    let mut rows_b64 = gen_rows(&mut rng, &devices, &mut seq, ROWS_B64);
    let mut rows_b512 = gen_rows(&mut rng, &devices, &mut seq, ROWS_B512);
    // PA in the first half of the global insertion order, PB in the second.
    plant(&mut rows_b1, 100, &pa, false, &mut rng); // global 100
    plant(&mut rows_b64, 8_000, &pa, false, &mut rng); // global 10,000
    plant(&mut rows_b64, 28_000, &pa, false, &mut rng); // global 30,000
    plant(&mut rows_b64, 38_000, &pa, true, &mut rng); // global 40,000 (64 KiB)
    plant(&mut rows_b512, 8_000, &pb, false, &mut rng); // global 60,000
    plant(&mut rows_b512, 28_000, &pb, false, &mut rng); // global 80,000
    plant(&mut rows_b512, 38_000, &pb, true, &mut rng); // global 90,000 (64 KiB)
    plant(&mut rows_b512, 49_000, &pb, false, &mut rng); // global 101,000

    let mut peak = 0u64;
    r.ins_b1 = timed_inserts(eng.as_mut(), &rows_b1, 1, &dir, &mut peak)?;
    eprintln!("  insert batch=1   : {:>9.0} msg/s", r.ins_b1);
    r.ins_b64 = timed_inserts(eng.as_mut(), &rows_b64, 64, &dir, &mut peak)?;
    eprintln!("  insert batch=64  : {:>9.0} msg/s", r.ins_b64);
    r.ins_b512 = timed_inserts(eng.as_mut(), &rows_b512, 512, &dir, &mut peak)?;
    eprintln!("  insert batch=512 : {:>9.0} msg/s", r.ins_b512);

    let keys: Vec<MsgKey> = rows_b1
        .iter()
        .chain(&rows_b64)
        .chain(&rows_b512)
        .map(|m| MsgKey { receiver: m.receiver, message_id: m.message_id })
        .collect();
    let windows: Vec<[u8; 32]> = rows_b1
        .iter()
        .chain(&rows_b64)
        .chain(&rows_b512)
        .map(|m| census_window(&m.payload))
        .collect();
    drop((rows_b1, rows_b64, rows_b512));

    // Sanity: the scanner must find every marker before anything is deleted.
    let s = scan(&dir, &all)?;
    r.sanity = fmt_scan(&s);
    eprintln!("  sanity scan (before delete): {}", r.sanity);
    if s.iter().any(|(_, f)| f.is_empty()) {
        r.notes.push("sanity scan did not find every marker before deletion".into());
    }
    let (sz, listing) = dir_listing(&dir)?;
    peak = peak.max(sz);
    eprintln!("  files before delete: {listing}");
    let t = Instant::now();
    let sanity_census = census(&dir, &census_of(&windows))?;
    eprintln!(
        "  sanity census (before delete): {sanity_census} of {} payloads found ({:.2}s)",
        windows.len(),
        t.elapsed().as_secs_f64()
    );
    if sanity_census != windows.len() {
        r.notes.push(format!("sanity census found only {sanity_census} of {} payloads", windows.len()));
    }

    // --- Phase A: delete the first half (mid-queue: half the data still live)
    let half = keys.len() / 2;
    let mut del_time = Duration::ZERO;
    let t = Instant::now();
    for chunk in keys[..half].chunks(DELETE_BATCH) {
        eng.delete_messages(chunk)?;
    }
    del_time += t.elapsed();
    eng.delete_account(&ka.bytes)?;
    let census_mid = census_of(&windows[..half]);
    let census_all = census_of(&windows);
    r.census_mid_total = half;
    r.census_total = windows.len();
    r.census_mid_after_delete = census(&dir, &census_mid)?;
    eprintln!("  mid-queue census: {} of {half} deleted payloads still on disk", r.census_mid_after_delete);
    let s = scan(&dir, &[&pa, &ka])?;
    r.mid_after_delete = fmt_scan(&s);
    let (sz, listing) = dir_listing(&dir)?;
    peak = peak.max(sz);
    eprintln!("  mid-queue, right after delete: {}", r.mid_after_delete);
    eprintln!("    files: {listing}");
    let t = Instant::now();
    let what = eng.cleanup()?;
    r.mid_cleanup = t.elapsed();
    let s = scan(&dir, &[&pa, &ka])?;
    r.mid_after_cleanup = fmt_scan(&s);
    r.census_mid_after_cleanup = census(&dir, &census_mid)?;
    eprintln!("  mid-queue census after cleanup: {}", r.census_mid_after_cleanup);
    let (_, listing) = dir_listing(&dir)?;
    eprintln!("  mid-queue cleanup ({what}) took {:.3}s", r.mid_cleanup.as_secs_f64());
    eprintln!("  mid-queue, after cleanup: {}", r.mid_after_cleanup);
    eprintln!("    files: {listing}");

    // --- Phase B: delete the rest (queue drained)
    let t = Instant::now();
    for chunk in keys[half..].chunks(DELETE_BATCH) {
        eng.delete_messages(chunk)?;
    }
    del_time += t.elapsed();
    r.del_b64 = keys.len() as f64 / del_time.as_secs_f64();
    eprintln!("  delete batch=64  : {:>9.0} msg/s", r.del_b64);
    eng.delete_account(&kb.bytes)?;
    let s = scan(&dir, &all)?;
    r.end_after_delete = fmt_scan(&s);
    r.census_end_after_delete = census(&dir, &census_all)?;
    eprintln!("  drained census: {} of {} deleted payloads still on disk", r.census_end_after_delete, windows.len());
    let (sz, listing) = dir_listing(&dir)?;
    peak = peak.max(sz);
    r.size_before_cleanup = sz;
    eprintln!("  drained, right after delete: {}", r.end_after_delete);
    eprintln!("    files: {listing}");
    let t = Instant::now();
    let what = eng.cleanup()?;
    r.end_cleanup = t.elapsed();
    let s = scan(&dir, &all)?;
    r.end_after_cleanup = fmt_scan(&s);
    r.census_end_after_cleanup = census(&dir, &census_all)?;
    eprintln!("  drained census after cleanup: {}", r.census_end_after_cleanup);
    let (_, listing) = dir_listing(&dir)?;
    eprintln!("  drained cleanup ({what}) took {:.3}s", r.end_cleanup.as_secs_f64());
    eprintln!("  drained, after cleanup: {}", r.end_after_cleanup);
    eprintln!("    files: {listing}");

    eng.close()?;
    let s = scan(&dir, &all)?;
    r.after_close = fmt_scan(&s);
    r.census_after_close = census(&dir, &census_all)?;
    eprintln!("  census after close: {}", r.census_after_close);
    let (sz, listing) = dir_listing(&dir)?;
    r.final_size = sz;
    r.final_allocated = allocated_bytes(&dir)?;
    r.peak_size = peak;
    eprintln!("  after close: {}", r.after_close);
    eprintln!("    files: {listing}");
    r.total = t_total.elapsed();
    eprintln!("  engine total: {:.1}s, loadavg at end: {}", r.total.as_secs_f64(), loadavg());

    tmp.close()?; // remove the data dir
    Ok(r)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Pick the directory for data. /tmp is used unless it is tmpfs/ramfs (where
/// fsync is free and the numbers would be meaningless).
fn data_root() -> Result<(PathBuf, String)> {
    if let Ok(p) = std::env::var("TIDINGS_BENCH_DIR") {
        let p = PathBuf::from(p);
        std::fs::create_dir_all(&p)?;
        let fs = fs_type(&p)?;
        return Ok((p, fs));
    }
    let tmp = PathBuf::from("/tmp");
    let fs = fs_type(&tmp)?;
    if fs == "tmpfs" || fs == "ramfs" {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data");
        std::fs::create_dir_all(&p)?;
        let fs2 = fs_type(&p)?;
        return Ok((p, format!("{fs2} (/tmp is {fs}, not used)")));
    }
    Ok((tmp, fs))
}

/// Filesystem type of the mount containing `p` (longest mount-point prefix
/// in /proc/self/mounts).
fn fs_type(p: &Path) -> Result<String> {
    let p = std::fs::canonicalize(p)?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut it = line.split_whitespace();
        let (_dev, mnt, fstype) = match (it.next(), it.next(), it.next()) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => continue,
        };
        let mnt = mnt.replace("\\040", " ");
        if p.starts_with(&mnt) && best.as_ref().is_none_or(|(l, _)| mnt.len() >= *l) {
            best = Some((mnt.len(), fstype.to_string()));
        }
    }
    Ok(best.map(|(_, t)| t).unwrap_or_else(|| "unknown".into()))
}

fn main() -> Result<()> {
    let engines: Vec<String> = {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.is_empty() {
            vec!["sqlite".into(), "redb".into(), "fjall".into()]
        } else {
            args
        }
    };
    let (root, fs) = data_root()?;
    eprintln!(
        "data root: {} (filesystem: {fs}); SQLite {}; rows: {ROWS_B1} @b1, {ROWS_B64} @b64, {ROWS_B512} @b512, payload {PAYLOAD_LEN} B",
        root.display(),
        rusqlite::version()
    );

    let mut reports = Vec::new();
    for e in &engines {
        reports.push(run_engine(e, &root)?);
    }

    println!();
    println!(
        "data root: {} ({fs}), SQLite library {}, {} CPUs, loadavg at end {}",
        root.display(),
        rusqlite::version(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        loadavg()
    );
    println!();
    println!("| engine | insert b=1 (msg/s) | insert b=64 (msg/s) | insert b=512 (msg/s) | delete b=64 (msg/s) | peak dir size | size before cleanup | final size (alloc) | total time |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &reports {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} ({}) | {:.1}s |",
            r.engine,
            r.ins_b1,
            r.ins_b64,
            r.ins_b512,
            r.del_b64,
            human(r.peak_size),
            human(r.size_before_cleanup),
            human(r.final_size),
            human(r.final_allocated),
            r.total.as_secs_f64()
        );
    }
    println!();
    println!("Residue (PA/KA deleted with half the queue still live; PB/KB deleted when drained; \"~\" = only the last 16 bytes matched):");
    println!();
    println!("| engine | before delete (sanity) | mid: after delete | mid: cleanup time | mid: after cleanup | drained: after delete | drained: cleanup time | drained: after cleanup | after close |");
    println!("|---|---|---|---:|---|---|---:|---|---|");
    for r in &reports {
        println!(
            "| {} | {} | {} | {:.3}s | {} | {} | {:.3}s | {} | {} |",
            r.engine,
            r.sanity,
            r.mid_after_delete,
            r.mid_cleanup.as_secs_f64(),
            r.mid_after_cleanup,
            r.end_after_delete,
            r.end_cleanup.as_secs_f64(),
            r.end_after_cleanup,
            r.after_close
        );
    }
    println!();
    println!("Census: deleted message payloads whose 32-byte probe (payload[64..96]) is still present anywhere in the data dir:");
    println!();
    println!("| engine | mid: after delete | mid: after cleanup | drained: after delete | drained: after cleanup | after close |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &reports {
        println!(
            "| {} | {} / {} | {} / {} | {} / {} | {} / {} | {} / {} |",
            r.engine,
            r.census_mid_after_delete, r.census_mid_total,
            r.census_mid_after_cleanup, r.census_mid_total,
            r.census_end_after_delete, r.census_total,
            r.census_end_after_cleanup, r.census_total,
            r.census_after_close, r.census_total,
        );
    }
    for r in &reports {
        for n in &r.notes {
            println!("\nNOTE {}: {n}", r.engine);
        }
    }
    Ok(())
}
