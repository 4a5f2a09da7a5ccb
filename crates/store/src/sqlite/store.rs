//! The [`Store`] contract on SQLite: each operation is one named function of its family module,
//! run as a point read on the calling thread, a pooled read, or a write of the group-commit
//! writer with what its failure takes back ([`Undo`]).
//!
//! Nothing here reads or writes a table itself; only the choice of how each operation runs
//! (and so what it costs) is made here.

use tidings_core::fallback::Withdrawal;
use tidings_core::verification::CodeRecord;
use tidings_core::Millis;
use tidings_proto::id::{DeviceId, MessageId};

use super::writer::Undo;
use super::{accounts, codes, keys, messages, receipts, SqliteStore};
use crate::{
    AccountDevices, AccountId, AckKind, Acked, Actor, Backlog, Claimed, Completion, Device,
    Enqueued, ExpiredMessage, HeldAck, IdentityKeys, KeyStatus, Linked, ListedDevice, NewMessage,
    Pending, PendingReceipt, Pseudonym, Published, QueueCursor, QueueLimits, Registered, Rekeyed,
    Result, Route, SignedKey, Store, StoreError, Voucher,
};

impl Store for SqliteStore {
    async fn device(&self, id: DeviceId) -> Result<Option<Device>> {
        self.read_here(|conn| accounts::device_in(conn, id))
    }

    async fn login_device(&self, id: DeviceId) -> Result<Option<(Device, KeyStatus)>> {
        self.read_here(|conn| accounts::login_device(conn, id))
    }

    async fn resume_device(&self, id: DeviceId) -> Result<Option<(Device, KeyStatus, Backlog)>> {
        self.read_here(|conn| accounts::resume_device(conn, id))
    }

    async fn account(&self, pseudonym: Pseudonym) -> Result<Option<AccountDevices>> {
        self.read_here(|conn| accounts::account_in(conn, pseudonym))
    }

    async fn route(&self, pseudonym: Pseudonym) -> Result<Option<Route>> {
        let (generation, held) = self.held.routes.get(&pseudonym);
        if held.is_some() {
            return Ok(held);
        }
        // Not a user is not held: the number may register at any moment.
        let Some(account) = self.read_here(|conn| accounts::account_in(conn, pseudonym))? else {
            return Ok(None);
        };
        let route = Route {
            account: account.account,
            devices: account.devices.into_iter().map(|(id, _)| id).collect(),
        };
        self.held
            .routes
            .insert(generation, pseudonym, route.clone());
        Ok(Some(route))
    }

    async fn accounts(&self, pseudonyms: Vec<Pseudonym>) -> Result<Vec<Option<AccountDevices>>> {
        // One read transaction for the whole batch: one snapshot, and SQLite's locks taken
        // once instead of once per statement (a file-lock system call each).
        self.read(move |conn| {
            let snapshot = conn.unchecked_transaction()?;
            let accounts = pseudonyms
                .into_iter()
                .map(|pseudonym| accounts::account_in(&snapshot, pseudonym))
                .collect::<Result<Vec<_>>>()?;
            snapshot.commit()?;
            Ok(accounts)
        })
        .await
    }

    async fn devices_of(&self, account: AccountId) -> Result<Vec<DeviceId>> {
        self.read(move |conn| accounts::devices_of(conn, account))
            .await
    }

    async fn register_device(
        &self,
        pseudonym: Pseudonym,
        key_version: u32,
        device: DeviceId,
        public_key: [u8; 32],
        now: Millis,
    ) -> Result<Registered> {
        self.write(Undo::Operation, move |txn, notes| {
            accounts::register_device(txn, notes, pseudonym, key_version, device, public_key, now)
        })
        .await
    }

    async fn rekey_account(
        &self,
        account: AccountId,
        old: Pseudonym,
        new: Pseudonym,
        key_version: u32,
    ) -> Result<Rekeyed> {
        self.write(Undo::Operation, move |txn, _| {
            accounts::rekey_account(txn, account, old, new, key_version)
        })
        .await
    }

    async fn accounts_by_key_version(&self) -> Result<Vec<(u32, u64)>> {
        self.read(accounts::accounts_by_key_version).await
    }

    async fn forget_previous_pseudonyms(&self) -> Result<u64> {
        self.write(Undo::Operation, accounts::forget_previous_pseudonyms)
            .await
    }

    async fn add_device(
        &self,
        approver: Actor,
        device: DeviceId,
        public_key: [u8; 32],
        identity: IdentityKeys,
        max_devices: usize,
        now: Millis,
    ) -> Result<Linked> {
        self.write(Undo::Operation, move |txn, notes| {
            accounts::check_actor(txn, approver)?;
            let device = (approver.account, device, public_key);
            accounts::add_device(txn, notes, device, identity, max_devices, now)
        })
        .await
    }

    async fn remove_device(&self, actor: Actor, device: DeviceId) -> Result<bool> {
        self.write(Undo::Operation, move |txn, notes| {
            accounts::check_actor(txn, actor)?;
            accounts::remove_device(txn, notes, actor.account, device)
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
        self.write(Undo::Operation, move |txn, notes| {
            notes.keys_changed = true;
            keys::publish_keys(txn, device, identity, one_time_keys, fallback, max_stored)
        })
        .await
    }

    async fn set_contact_token(&self, device: DeviceId, hash: [u8; 32]) -> Result<()> {
        self.write(Undo::Statement, move |txn, notes| {
            notes.keys_changed = true;
            keys::set_contact_token(txn, device, hash)
        })
        .await
    }

    async fn key_status(&self, device: DeviceId) -> Result<KeyStatus> {
        self.read_here(|conn| keys::key_status_in(conn, device))
    }

    async fn claim_keys(
        &self,
        claimer: Actor,
        account: AccountId,
        only: Vec<DeviceId>,
    ) -> Result<Claimed> {
        self.write(Undo::Operation, move |txn, _| {
            accounts::check_actor(txn, claimer)?;
            keys::claim_keys(txn, account, only)
        })
        .await
    }

    async fn device_keys(&self, account: AccountId) -> Result<Vec<ListedDevice>> {
        self.read(move |conn| keys::device_keys(conn, account))
            .await
    }

    async fn set_voucher(
        &self,
        account: AccountId,
        device: DeviceId,
        voucher: Voucher,
    ) -> Result<bool> {
        self.write(Undo::Operation, move |txn, _| {
            accounts::set_voucher(txn, account, device, voucher)
        })
        .await
    }

    async fn delete_account(&self, actor: Actor) -> Result<Vec<DeviceId>> {
        self.write(Undo::Operation, move |txn, notes| {
            accounts::check_actor(txn, actor)?;
            accounts::delete_account(txn, notes, actor.account)
        })
        .await
    }

    async fn update_code_record<R, F>(&self, pseudonym: Pseudonym, update: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Option<CodeRecord>) -> R + Send + 'static,
    {
        self.write(Undo::Operation, move |txn, _| {
            codes::update_code_record(txn, pseudonym, update)
        })
        .await
    }

    async fn enqueue(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Enqueued> {
        self.enqueue_submit(message, limits).await?.durable().await
    }

    async fn enqueue_submit(
        &self,
        message: NewMessage,
        limits: impl Into<QueueLimits> + Send,
    ) -> Result<Completion<Enqueued>> {
        let limits = limits.into();
        // One writer takes writes in the order they are handed over, so a sending device's
        // messages are stored in the order it submitted them.
        self.submit(Undo::Operation, move |txn, notes| {
            messages::enqueue(txn, notes, message, limits)
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
        self.read(move |conn| messages::pending(conn, device, after, limit, now))
            .await
    }

    async fn holds_copy_from(&self, device: DeviceId, sender_device: DeviceId) -> Result<bool> {
        self.read_here(move |conn| messages::holds_copy_from(conn, device, sender_device))
    }

    async fn ack_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Acked> {
        self.write(Undo::Batch, move |txn, notes| {
            messages::ack_in(txn, notes, device, sender_device, id, kind)
        })
        .await
    }

    async fn ack_staged_as(
        &self,
        device: DeviceId,
        sender_device: DeviceId,
        id: MessageId,
        kind: AckKind,
    ) -> Result<Completion<Acked>> {
        self.submit_staged(Undo::Batch, move |txn, notes| {
            messages::ack_in(txn, notes, device, sender_device, id, kind)
        })
        .await
    }

    async fn screen(&self, message: &NewMessage) -> Result<bool> {
        let receiver = self.screened_devices(message.receiver)?;
        let own = if message.sender_account == message.receiver {
            Vec::new()
        } else {
            self.screened_devices(message.sender_account)?
        };
        Ok(message.screens(&receiver, &own))
    }

    async fn ack_held(&self, copy: HeldAck, kind: AckKind) -> Result<Completion<Acked>> {
        // Checked before the write, which runs without a savepoint (its failure would take its
        // batch with it).
        if kind == AckKind::Discarded {
            return Err(StoreError::engine(
                "a held copy is not acknowledged as discarded",
            ));
        }
        self.submit_staged(Undo::Batch, move |txn, notes| {
            messages::ack_held(txn, notes, copy, kind)
        })
        .await
    }

    async fn withdraw_held(
        &self,
        sender_device: DeviceId,
        id: MessageId,
        held_until: Option<Millis>,
    ) -> Result<Withdrawal> {
        self.write(Undo::Operation, move |txn, notes| {
            messages::withdraw(txn, notes, sender_device, id, held_until)
        })
        .await
    }

    async fn expire(&self, now: Millis, limit: usize) -> Result<Vec<ExpiredMessage>> {
        // Most sweeps find nothing: look first, so that an idle server writes nothing.
        let receipts_ended = self.held.receipt_deadlines.any_ended(now);
        if !receipts_ended
            && !self
                .read(move |conn| messages::any_expired(conn, now))
                .await?
        {
            return Ok(Vec::new());
        }
        self.write(Undo::Operation, move |txn, notes| {
            messages::expire(txn, notes, now, limit, receipts_ended)
        })
        .await
    }

    async fn backlog(&self, device: DeviceId) -> Result<Backlog> {
        self.read_here(|conn| receipts::backlog(conn, device))
    }

    async fn clear_missed(&self, device: DeviceId, seen: u32) -> Result<()> {
        self.write(Undo::Statement, move |txn, _| {
            receipts::clear_missed(txn, device, seen)
        })
        .await
    }

    async fn receipts(&self, device: DeviceId) -> Result<Vec<PendingReceipt>> {
        self.read(move |conn| receipts::receipts(conn, device))
            .await
    }

    async fn ack_receipt(&self, device: DeviceId, id: MessageId) -> Result<()> {
        // Lazy: a receipt whose deletion is lost in a crash is only sent again.
        self.write_lazily(Undo::Statement, move |txn, _| {
            receipts::ack_receipt(txn, device, id)
        })
        .await
    }

    async fn prune_codes(&self, now: Millis) -> Result<usize> {
        // Most prunes find nothing: look first, so that an idle server writes nothing.
        if !self.read(codes::any_code_record).await? {
            return Ok(0);
        }
        self.write(Undo::Operation, move |txn, _| codes::prune_codes(txn, now))
            .await
    }

    async fn scrub(&self) -> Result<()> {
        self.checkpoint().await
    }
}

impl SqliteStore {
    /// An account's devices as a screen reads them: from memory while no device, key or contact
    /// token changed since they were read, otherwise by a point read on the calling thread.
    fn screened_devices(
        &self,
        account: AccountId,
    ) -> Result<Vec<tidings_core::delivery::AccountDevice>> {
        let (generation, held) = self.held.screened.get(&account);
        if let Some(devices) = held {
            return Ok(devices);
        }
        let devices = self.read_here(|conn| Ok(messages::screened_devices(conn, account)?))?;
        self.held
            .screened
            .insert(generation, account, devices.clone());
        Ok(devices)
    }
}
