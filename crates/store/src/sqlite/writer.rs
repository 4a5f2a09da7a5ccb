//! The group-commit writer: one thread that runs every write, in batches that share one commit
//! and one sync, with what each write takes back when it fails (see [`Undo`]) and what a batch
//! notes for its commit ([`Notes`]: the sync report, queue lengths, dropped routes, receipt
//! deadlines).
//!
//! Operations themselves live in the modules of their families; this module only runs them.
//! It must never answer a write before the commit that holds it (except a write's early,
//! executed answer, see [`Completion`]), nor let a batch commit part of a failed write.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, Transaction, TransactionBehavior};
use tidings_core::failpoint::failpoint;
use tidings_core::Millis;
use tidings_proto::id::{DeviceId, MessageId};
use tokio::sync::{mpsc, oneshot};

use super::receipts::ReceiptDeadlines;
use super::routes::{RouteCache, ScreenCache};
use super::SqliteStore;
use crate::{
    AccountId, Completion, Durability, Result, StoreError, SyncObserver, SyncReport, Usage,
};

/// Writes waiting for the writer at most; past this, handing one over waits. Each holds its
/// operation's data (a send's copies, up to 64 KiB), so this bounds the memory they take.
pub const WRITER_QUEUE: usize = 4096;

/// What a batch's operations noted: for the sync report, and the queue lengths to write.
#[derive(Default)]
pub(super) struct Notes {
    pub(super) messages: Vec<(DeviceId, MessageId)>,
    /// Copies stored (+1) and deleted (−1) per device in this batch, not yet in
    /// `devices.queue_len`: added to it once per device before the batch commits, so that a device
    /// whose copy is stored and another acknowledged in the same batch (the relay's steady state)
    /// costs no write at all. Every statement that stores or deletes a copy records it here
    /// ([`delete_copies`](super::messages::delete_copies) before a deletion of messages); a deleted
    /// device's copies go with its row, and so do its changes ([`QueueCounts::forget`]).
    pub(super) queued: QueueCounts,
    /// What each sending account has waiting, per device and in all: the writer's own state,
    /// lent to each batch, its changes taken back if the batch (or an operation's savepoint)
    /// is rolled back.
    pub(super) senders: SenderCounts,
    /// Which waiting copies are strangers': the writer's own state, lent to each batch like
    /// `senders`.
    pub(super) strangers: StrangerCopies,
    /// An operation run without a savepoint failed: its batch must be rolled back whole.
    pub(super) batch_failed: bool,
    /// Devices were added or deleted: the routes held in memory are dropped once the batch has
    /// committed, before any of its operations is answered.
    pub(super) devices_changed: bool,
    /// Keys were published or a contact token set: the screened devices held in memory are
    /// dropped once the batch has committed, before any of its operations is answered.
    pub(super) keys_changed: bool,
    /// The earliest deadline of the receipts stored in this batch, for [`ReceiptDeadlines`].
    pub(super) receipts_stored: Option<Millis>,
    /// A sweep deleted the ended receipts: the earliest deadline it left.
    pub(super) receipts_swept: Option<Millis>,
    /// The `seq` the next message stored takes, in `messages` or in `single_copies` alike: the
    /// writer's own count, lent to each batch like `senders`, never taken back (a message rolled
    /// back leaves a gap, which orders nothing differently).
    pub(super) next_seq: i64,
}

impl Notes {
    /// The `seq` of a message about to be stored.
    pub(super) fn take_seq(&mut self) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }
}

/// The `seq` the next message stored takes when the engine opens: after every one stored in
/// either table.
pub(super) fn first_free_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT MAX(IFNULL((SELECT MAX(seq) FROM messages), 0),
                    IFNULL((SELECT MAX(seq) FROM single_copies), 0)) + 1",
        [],
        |row| row.get(0),
    )
}

/// A batch's changes to queue lengths: the total per device, and the log of each change so that
/// an operation rolled back to its savepoint takes its own back.
#[derive(Default)]
pub(super) struct QueueCounts {
    totals: HashMap<DeviceId, i64>,
    log: Vec<(DeviceId, i64)>,
}

impl QueueCounts {
    pub(super) fn add(&mut self, device: DeviceId, change: i64) {
        *self.totals.entry(device).or_default() += change;
        self.log.push((device, change));
    }

    /// Copies stored or deleted for `device` earlier in this batch.
    pub(super) fn pending(&self, device: DeviceId) -> i64 {
        self.totals.get(&device).copied().unwrap_or(0)
    }

    /// A deleted device's row is gone with its length and its copies
    /// ([`delete_devices`](super::accounts::delete_devices)): a row made again with the same id in
    /// this batch starts from zero, so the changes noted for the old one must not reach it.
    pub(super) fn forget(&mut self, device: DeviceId) {
        let pending = self.pending(device);
        self.add(device, -pending);
    }

    /// Takes back every change after the `mark`-th.
    pub(super) fn undo_to(&mut self, mark: usize) {
        for (device, change) in self.log.drain(mark..) {
            *self.totals.entry(device).or_default() -= change;
        }
    }

    /// Adds the batch's changes to `devices.queue_len`, one statement per device whose
    /// length changed.
    pub(super) fn write(&self, txn: &Transaction<'_>) -> rusqlite::Result<()> {
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

/// What each sending account has waiting: per (account, device) its copies and their bytes, and
/// per account its bytes across every queue, as the rules of `tidings_core::delivery` read them.
/// Held by the writer thread alone (the only one that stores or deletes copies), counted from the
/// tables when the engine opens ([`SenderCounts::load`]) and kept by every statement that stores
/// or deletes a copy, so that a send reads no table for them. Only pairs with a copy waiting have
/// an entry: the map is never larger than the queues, never written, and forgets a pair once its
/// last copy goes.
#[derive(Default)]
pub(super) struct SenderCounts {
    per_device: HashMap<(AccountId, DeviceId), Usage>,
    per_account: HashMap<AccountId, u64>,
    /// The changes of the batch lent this, in order, so that a rollback takes them back.
    log: Vec<(AccountId, DeviceId, i64, i64)>,
}

impl SenderCounts {
    /// Counts what every sending account has waiting, from the tables.
    pub(super) fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut counts = SenderCounts::default();
        let mut statement = conn.prepare(
            "SELECT m.sender_account, c.device_id, COUNT(*), SUM(IFNULL(length(c.payload), 0))
             FROM copies c JOIN messages m ON m.seq = c.seq
             WHERE m.sender_account IS NOT NULL GROUP BY m.sender_account, c.device_id
             UNION ALL
             SELECT sender_account, device_id, COUNT(*), SUM(length(payload))
             FROM single_copies
             WHERE sender_account IS NOT NULL GROUP BY sender_account, device_id",
        )?;
        let mut rows = statement.query([])?;
        while let Some(row) = rows.next()? {
            let account = AccountId(row.get(0)?);
            let device = super::rows::device_id(row.get(1)?)?;
            counts.apply(account, device, row.get(2)?, row.get(3)?);
        }
        counts.log.clear();
        Ok(counts)
    }

    /// What `sender` has waiting in `device`'s queue.
    pub(super) fn on_device(&self, sender: AccountId, device: DeviceId) -> Usage {
        self.per_device
            .get(&(sender, device))
            .copied()
            .unwrap_or_default()
    }

    /// The bytes `sender` has waiting across every queue.
    pub(super) fn bytes_of(&self, sender: AccountId) -> u64 {
        self.per_account.get(&sender).copied().unwrap_or(0)
    }

    /// A copy of `bytes` from `sender` stored (`sign` 1) or deleted (−1) in `device`'s queue.
    pub(super) fn note(&mut self, sender: AccountId, device: DeviceId, bytes: i64, sign: i64) {
        self.apply(sender, device, sign, sign * bytes);
    }

    fn apply(&mut self, sender: AccountId, device: DeviceId, copies: i64, bytes: i64) {
        let add = |value: u64, change: i64| value.saturating_add_signed(change);
        let pair = self.per_device.entry((sender, device)).or_default();
        *pair = Usage {
            copies: add(pair.copies, copies),
            bytes: add(pair.bytes, bytes),
        };
        if pair.copies == 0 {
            self.per_device.remove(&(sender, device));
        }
        let total = self.per_account.entry(sender).or_default();
        *total = add(*total, bytes);
        if *total == 0 {
            self.per_account.remove(&sender);
        }
        self.log.push((sender, device, copies, bytes));
    }

    /// Takes back every change after the `mark`-th.
    pub(super) fn undo_to(&mut self, mark: usize) {
        let undone: Vec<_> = self.log.drain(mark..).rev().collect();
        for (sender, device, copies, bytes) in undone {
            self.apply(sender, device, -copies, -bytes);
        }
        self.log.truncate(mark);
    }
}

/// Which copies waiting in the queues are strangers' (their send presented no contact token of
/// the receiver, `tidings_core::delivery::from_contact`), and how many each device holds: its
/// stranger pool's fill. Kept in memory only and never written: who is a stranger to whom is a
/// hint of who is whose contact. Held by the writer thread like [`SenderCounts`], noted by every
/// statement that stores or deletes a copy, its changes taken back with a rolled-back batch or
/// savepoint. Empty when the engine opens: copies still waiting from before count as contacts'
/// from then on (the trade-off `docs/ARCHITECTURE.md` states). A device holds at most its pool's
/// size of entries (a stranger's copy is stored only when its pool has room).
#[derive(Default)]
pub(super) struct StrangerCopies {
    /// (device, message seq) of each stranger's copy waiting.
    copies: HashSet<(DeviceId, i64)>,
    per_device: HashMap<DeviceId, u64>,
    /// The changes of the batch lent this, in order (true: a copy added), so that a rollback
    /// takes them back.
    log: Vec<(DeviceId, i64, bool)>,
}

impl StrangerCopies {
    /// Strangers' copies waiting in `device`'s queue.
    pub(super) fn on_device(&self, device: DeviceId) -> u64 {
        self.per_device.get(&device).copied().unwrap_or(0)
    }

    /// A stranger's copy stored for `device`, of the message `seq`.
    pub(super) fn stored(&mut self, device: DeviceId, seq: i64) {
        if self.set(device, seq, true) {
            self.log.push((device, seq, true));
        }
    }

    /// A copy deleted from `device`'s queue, of the message `seq` (a stranger's or not).
    pub(super) fn deleted(&mut self, device: DeviceId, seq: i64) {
        if self.set(device, seq, false) {
            self.log.push((device, seq, false));
        }
    }

    /// Marks the copy as a stranger's (`present`) or not; whether that changed anything.
    fn set(&mut self, device: DeviceId, seq: i64, present: bool) -> bool {
        let changed = if present {
            self.copies.insert((device, seq))
        } else {
            self.copies.remove(&(device, seq))
        };
        if changed {
            let count = self.per_device.entry(device).or_default();
            *count = if present {
                count.saturating_add(1)
            } else {
                count.saturating_sub(1)
            };
            if *count == 0 {
                self.per_device.remove(&device);
            }
        }
        changed
    }

    /// Takes back every change after the `mark`-th.
    pub(super) fn undo_to(&mut self, mark: usize) {
        let undone: Vec<_> = self.log.drain(mark..).rev().collect();
        for (device, seq, added) in undone {
            self.set(device, seq, !added);
        }
    }
}

/// What a failing write takes back with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Undo {
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
pub(super) type AnswerOnCommit = Box<dyn FnOnce(Result<()>) + Send>;
pub(super) type WriteJob = Box<dyn FnOnce(&Transaction<'_>, &mut Notes) -> AnswerOnCommit + Send>;

pub(super) enum Job {
    /// A write; `lazy` when nobody waits on its durability.
    Write {
        job: WriteJob,
        lazy: bool,
    },
    Scrub(oneshot::Sender<Result<()>>),
}

impl SqliteStore {
    /// A write answered once it is durable.
    pub(super) async fn write<R, F>(&self, undo: Undo, operation: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        answered(self.hand_over(operation, Durability::Durable, undo).await?).await
    }

    /// Hands a write to the writer thread; the outcome comes through the returned completion,
    /// once the write is durable.
    pub(super) async fn submit<R, F>(&self, undo: Undo, operation: F) -> Result<Completion<R>>
    where
        R: Send + 'static,
        F: FnOnce(&Transaction<'_>, &mut Notes) -> Result<R> + Send + 'static,
    {
        let durable = self.hand_over(operation, Durability::Durable, undo).await?;
        Ok(Completion::pending(None, durable))
    }

    /// A write nobody waits on: answered once it has executed, durable with the next synced
    /// batch (see the engine's documentation in [`crate::sqlite`]).
    pub(super) async fn write_lazily<R, F>(&self, undo: Undo, operation: F) -> Result<R>
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
    pub(super) async fn hand_over<R, F>(
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
    pub(super) async fn submit_staged<R, F>(
        &self,
        undo: Undo,
        operation: F,
    ) -> Result<Completion<R>>
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

    /// Checkpoints the WAL into the database and truncates it (see the engine's documentation in
    /// [`crate::sqlite`]).
    pub(super) async fn checkpoint(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.writer
            .send(Job::Scrub(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }
}

/// Waits for the answer of a write handed over.
pub(super) async fn answered<R>(answer: oneshot::Receiver<Result<R>>) -> Result<R> {
    answer.await.map_err(|_| StoreError::Closed)?
}

/// Runs one operation inside a savepoint, so that a failing operation leaves its batch intact.
pub(super) fn in_savepoint<R>(
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
    // What the operation notes is taken back with its changes (a receipt deadline it noted
    // stays: a deadline too early only costs a sweep a look).
    let (messages, queued, swept) = (
        notes.messages.len(),
        notes.queued.log.len(),
        notes.receipts_swept,
    );
    let (senders, strangers) = (notes.senders.log.len(), notes.strangers.log.len());
    match operation(txn, notes) {
        Ok(value) => {
            checked(notes, cached("RELEASE op"))?;
            Ok(value)
        }
        Err(e) => {
            notes.messages.truncate(messages);
            notes.queued.undo_to(queued);
            notes.senders.undo_to(senders);
            notes.strangers.undo_to(strangers);
            notes.receipts_swept = swept;
            checked(notes, txn.execute_batch("ROLLBACK TO op; RELEASE op"))?;
            Err(e)
        }
    }
}

/// What the writer keeps from one batch to the next.
pub(super) struct Kept {
    /// The connection's `synchronous` setting: FULL as opened, NORMAL after a lazy batch.
    lazy_mode: bool,
    senders: SenderCounts,
    strangers: StrangerCopies,
    next_seq: i64,
}

/// What the engine holds in memory beside the database, which the writer brings up to date after
/// each batch.
pub(super) struct HeldInMemory {
    pub(super) routes: RouteCache,
    pub(super) screened: ScreenCache,
    pub(super) receipt_deadlines: ReceiptDeadlines,
}

pub(super) fn run_writer(
    mut conn: Connection,
    mut jobs: mpsc::Receiver<Job>,
    max_batch: usize,
    observer: Option<SyncObserver>,
    held: &HeldInMemory,
    senders: SenderCounts,
    next_seq: i64,
) {
    let mut seq = 0u64;
    let mut kept = Kept {
        lazy_mode: false,
        senders,
        strangers: StrangerCopies::default(),
        next_seq,
    };
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
                &mut kept,
                observer.as_ref(),
                held,
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

pub(super) fn commit_batch(
    conn: &mut Connection,
    writes: Vec<WriteJob>,
    seq: u64,
    lazy: bool,
    kept: &mut Kept,
    observer: Option<&SyncObserver>,
    held: &HeldInMemory,
) {
    // Lazy batches commit without a sync; the next synced commit syncs their frames too. The
    // setting is changed only when the kind of batch changes.
    if lazy != kept.lazy_mode {
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
        kept.lazy_mode = lazy;
    }
    let operations = writes.len();
    failpoint("store-transaction-before");
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
    let mut notes = Notes {
        senders: std::mem::take(&mut kept.senders),
        strangers: std::mem::take(&mut kept.strangers),
        next_seq: kept.next_seq,
        ..Notes::default()
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
        failpoint("store-sync-before");
        let committed = txn.commit().map_err(StoreError::from);
        failpoint("store-sync-after");
        committed
    };
    if committed.is_err() {
        // Nothing of the batch stays, nor anything it counted.
        notes.senders.undo_to(0);
        notes.strangers.undo_to(0);
    }
    notes.senders.log.clear();
    notes.strangers.log.clear();
    kept.senders = std::mem::take(&mut notes.senders);
    kept.strangers = std::mem::take(&mut notes.strangers);
    kept.next_seq = notes.next_seq;
    held.receipt_deadlines
        .after_batch(&notes, committed.is_ok());
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
        held.routes.invalidate();
    }
    if notes.devices_changed || notes.keys_changed {
        held.screened.invalidate();
    }

    for complete in completions {
        complete(match &committed {
            Ok(()) => Ok(()),
            Err(e) => Err(StoreError::engine(e.to_string())),
        });
    }
    failpoint("store-transaction-after");
}
