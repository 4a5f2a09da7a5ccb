//! [`Client`]: what an app embeds. One method per operation a user asks for, each a short
//! delegation to the module that does it: registration and linking ([`crate::registration`]),
//! sending ([`crate::outgoing`], and [`crate::route`] with SMS fallback), receiving
//! ([`crate::incoming`]) and contacts ([`crate::contacts`]). Each opens what it needs and nothing
//! more; an unregistered profile opens nothing at all ([`Client::open`] refuses, promise P1).

use std::time::Duration;

use tidings_core::fallback::Route;
use tidings_proto::frame::{self, Presence, SendMode};
use tidings_proto::id::{DeviceId, MessageId};
use tokio::time::Instant;

use crate::account::Account;
use crate::inbox::Inbox;
use crate::profile::{Profile, Routing};
use crate::session::Session;
use crate::vault::Passphrase;
use crate::{contacts, incoming, outgoing, registration, route, Result};

pub use crate::contacts::Fingerprint;
pub use crate::incoming::Event;
pub use crate::outgoing::SendReport;
pub use crate::registration::{
    link, register, register_own_sms, verify, verify_own_sms, Approved, DeviceInfo, Joined,
    LinkOffer, OwnSms,
};

/// A registered profile, ready to talk to its server.
#[derive(Debug)]
pub struct Client {
    account: Account,
}

impl Client {
    /// Opens a registered profile. Fails, without touching the network, for a profile that has
    /// not been registered and verified (promise P1).
    pub fn open(profile: Profile) -> Result<Self> {
        Ok(Self {
            account: Account::open(profile)?,
        })
    }

    /// Gives the client the passphrase that unlocks the profile's keys and messages (needed to
    /// send, receive, and check or change trust).
    pub fn with_passphrase(self, passphrase: Passphrase) -> Self {
        Self {
            account: self.account.with_passphrase(passphrase),
        }
    }

    /// The opened profile underneath, for the modules' functions.
    pub fn account(&self) -> &Account {
        &self.account
    }

    /// The profile's own number.
    pub fn number(&self) -> &str {
        self.account.number()
    }

    /// How this profile routes messages.
    pub fn routing(&self) -> &Routing {
        self.account.routing()
    }

    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.account.device()
    }

    /// Opens a session.
    pub async fn session(&self, listen: bool) -> Result<Session> {
        self.account.session(listen).await
    }

    /// Makes a new contact token for this device and publishes its hash, replacing the old one
    /// at the server. Whoever holds only the old token (everyone this device wrote to) is a
    /// stranger from now on, until a message from this device hands them the new one.
    pub async fn rotate_contact_token(&self) -> Result<()> {
        let mut inbox = self.account.inbox()?;
        inbox.update(|_, crypto| {
            crypto.rotate_contact_token();
            Ok(crate::inbox::Change::Save(()))
        })?;
        // Answered only once the server confirmed the new hash; if this fails, the next
        // session publishes it.
        let mut session = self.account.session(false).await?;
        self.account.ensure_keys(&mut inbox, &mut session).await
    }

    /// Opens the local store with the passphrase.
    pub fn inbox(&self) -> Result<Inbox> {
        self.account.inbox()
    }

    /// Publishes identity keys, one-time keys and a fallback key if the server holds too few.
    pub async fn ensure_keys(&self, inbox: &mut Inbox, session: &mut Session) -> Result<()> {
        self.account.ensure_keys(inbox, session).await
    }

    /// The devices the server lists for `number`, with their identity keys.
    pub async fn directory(
        &self,
        session: &mut Session,
        number: &str,
    ) -> Result<Vec<frame::DeviceKeys>> {
        self.account.directory(session, number).await
    }

    /// Claims one key per device of `number` (or of `only`).
    pub async fn claim(
        &self,
        session: &mut Session,
        number: &str,
        only: &[DeviceId],
    ) -> Result<Vec<frame::ClaimedKey>> {
        self.account.claim(session, number, only).await
    }

    /// Sends a text over IP only, end-to-end encrypted for every device of the receiver and
    /// this number's other devices. Waits up to `wait` for the server's answer and, for an
    /// accepted message, for its receipt.
    pub async fn send(
        &self,
        to: &str,
        text: &str,
        mode: SendMode,
        ttl_seconds: u32,
        wait: Duration,
    ) -> Result<SendReport> {
        outgoing::send(&self.account, to, text, mode, ttl_seconds, wait).await
    }

    /// Sends a text along `route` (IP, SMS fallback, or both in turn), waiting up to `wait` for
    /// it to finish. What is still pending then is kept in the profile and carried on by
    /// `listen`.
    pub async fn send_routed(
        &self,
        to: &str,
        text: &str,
        route: Route,
        wait: Duration,
    ) -> Result<route::Status> {
        route::send_routed(&self.account, to, text, route, wait).await
    }

    /// Builds an encrypted `Send` for `to` without sending it, claiming whatever keys are
    /// needed first (for apps and tests that pipeline many sends on one session).
    pub async fn prepare_send(&self, to: &str, text: &str, id: MessageId) -> Result<frame::Send> {
        outgoing::prepare_one(&self.account, to, text, id, None, None).await
    }

    /// [`Client::prepare_send`] for many messages to one receiver, claiming keys once.
    pub async fn prepare_sends(
        &self,
        to: &str,
        messages: &[(MessageId, String)],
    ) -> Result<Vec<frame::Send>> {
        outgoing::prepare_batch(&self.account, to, messages, None, None).await
    }

    /// Like [`Client::prepare_send`], but the encrypted content claims to come from
    /// `claimed_from`. For tests of the receiver's sender check only: receivers flag it.
    pub async fn danger_prepare_send_claiming(
        &self,
        claimed_from: &str,
        to: &str,
        text: &str,
        id: MessageId,
    ) -> Result<frame::Send> {
        outgoing::prepare_one(&self.account, to, text, id, Some(claimed_from), None).await
    }

    /// [`Client::danger_prepare_send_claiming`] for several messages at once, with one look at
    /// the directory for all. For tests of the receiver's sender check only.
    pub async fn danger_prepare_sends_claiming(
        &self,
        claimed_from: &str,
        to: &str,
        messages: &[(MessageId, String)],
    ) -> Result<Vec<frame::Send>> {
        outgoing::prepare_batch(&self.account, to, messages, Some(claimed_from), None).await
    }

    /// Receives until `handle` returns false or `until` passes. Each message is decrypted and
    /// stored (with the new session state, in one local transaction), then acknowledged, then
    /// shown once the server confirms the acknowledgement.
    pub async fn listen(
        &self,
        until: Option<Instant>,
        handle: impl FnMut(Event) -> bool,
    ) -> Result<()> {
        incoming::listen(&self.account, until, handle).await
    }

    /// Looks up numbers: online, offline or not a user. Order follows `numbers`.
    pub async fn lookup(&self, numbers: &[String]) -> Result<Vec<(String, Presence)>> {
        contacts::lookup(&self.account, numbers).await
    }

    /// Pins the discovery key the server shows now and forgets the pseudonyms learned under the
    /// old one (after the operator announced a new key).
    pub async fn repin(&self) -> Result<crate::profile::PinnedKey> {
        crate::discovery::repin(&self.account).await
    }

    /// The safety number with `number`, from the directory's current keys of both sides.
    pub async fn fingerprint(&self, number: &str) -> Result<Fingerprint> {
        contacts::fingerprint(&self.account, number).await
    }

    /// Trusts the identity keys the directory lists for `number` now (after comparing safety
    /// numbers). Returns how many keys that is.
    pub async fn trust(&self, number: &str) -> Result<usize> {
        contacts::trust(&self.account, number).await
    }

    /// This number's devices.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>> {
        registration::devices(&self.account).await
    }

    /// Removes a device of this number: the server deletes its keys and queue and signs it out.
    /// Removing this device also forgets its registration here.
    pub async fn remove_device(&self, device: DeviceId) -> Result<()> {
        registration::remove_device(&self.account, device).await
    }

    /// Shows a link string for a new device (through `show`): the server's code and a secret
    /// that never goes to the server. Then waits up to `wait` for a device to join with it: one
    /// that proves the secret is trusted and vouched for; one that does not is refused (an
    /// error) and removed.
    pub async fn approve_link(
        &self,
        show: impl FnOnce(&LinkOffer),
        wait: Duration,
    ) -> Result<Option<Approved>> {
        registration::approve_link(&self.account, show, wait).await
    }

    /// Opts out: the server deletes the account and everything of it; the profile forgets the
    /// registration, the device key and the encryption keys.
    pub async fn disable(self) -> Result<()> {
        registration::disable(self.account).await
    }
}
