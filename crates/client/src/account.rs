//! A registered profile, opened: the identity of this device and the means to reach its server
//! and its local store. Every other part of the crate that talks to the server starts from an
//! [`Account`]; the operations a user asks for are in the modules that use it.
//!
//! Promise P1 lives here: [`Account::open`] refuses a profile that has not been registered and
//! verified by its user before anything touches the network, and nothing else in this crate
//! opens a session. It must never log a number, a key or a message.

use ed25519_dalek::SigningKey;
use tidings_proto::frame::{self, Kind};
use tidings_proto::id::DeviceId;

use crate::discovery::AccountKey;
use crate::inbox::{Change, Inbox};
use crate::net::Endpoint;
use crate::profile::{PinnedKey, Profile, ProfileData, Routing, ShowOnline};
use crate::session::{KeySupply, Session};
use crate::vault::{Passphrase, Vault};
use crate::{ClientError, Result};

/// A registered and verified profile, ready to talk to its server.
#[derive(Debug)]
pub struct Account {
    profile: Profile,
    data: ProfileData,
    device: DeviceId,
    /// The login key, unsealed with the passphrase the first time a session needs it.
    key: std::sync::OnceLock<SigningKey>,
    endpoint: Endpoint,
    passphrase: Option<Passphrase>,
    /// The passphrase's key, derived once per account (the KDF is slow on purpose).
    vault: std::sync::OnceLock<Vault>,
    /// The local store was brought up to date once ([`Account::inbox`]).
    inbox_migrated: std::sync::OnceLock<()>,
    /// The server's discovery key as pinned (from the profile, or fetched once for a profile
    /// made before tidings/2), and the one pinned before the server's last rotation while the
    /// server still holds it. Changed only by [`Account::pin_key`] and
    /// [`Account::follow_rotation`], which save the profile too.
    pinned: std::sync::Mutex<Pinned>,
}

/// The keys an [`Account`] pinned.
#[derive(Debug, Default, Clone)]
struct Pinned {
    current: Option<PinnedKey>,
    previous: Option<PinnedKey>,
}

/// A 32-byte key from the wire, if it is one.
pub fn key_of(bytes: &[u8]) -> Option<[u8; 32]> {
    <[u8; 32]>::try_from(bytes).ok()
}

impl Account {
    /// Opens a registered profile. Fails, without touching the network, for a profile that has
    /// not been registered and verified (promise P1).
    pub fn open(profile: Profile) -> Result<Self> {
        let data = profile.load()?.ok_or(ClientError::NotRegistered)?;
        let device = data
            .device_id
            .as_deref()
            .and_then(DeviceId::from_text)
            .ok_or(ClientError::NotVerified)?;
        let endpoint = Endpoint::parse(&data.server, data.trust.clone())?;
        let pinned = std::sync::Mutex::new(Pinned {
            current: data.oprf_key.clone(),
            previous: data.previous_oprf_key.clone(),
        });
        Ok(Self {
            pinned,
            profile,
            data,
            device,
            key: std::sync::OnceLock::new(),
            endpoint,
            passphrase: None,
            vault: std::sync::OnceLock::new(),
            inbox_migrated: std::sync::OnceLock::new(),
        })
    }

    /// Gives the client the passphrase that unlocks the profile's keys and messages (needed for
    /// anything that talks to the server, since the login key is sealed under it).
    pub fn with_passphrase(mut self, passphrase: Passphrase) -> Self {
        self.passphrase = Some(passphrase);
        self
    }

    /// Gives the client the passphrase's key, already derived (no second KDF run).
    pub fn with_vault(self, vault: Vault) -> Self {
        let _ = self.vault.set(vault);
        self
    }

    /// The profile's own number.
    pub fn number(&self) -> &str {
        &self.data.number
    }

    /// How this profile routes messages.
    pub fn routing(&self) -> &Routing {
        &self.data.routing
    }

    /// This device's id.
    pub fn device(&self) -> DeviceId {
        self.device
    }

    /// The profile directory's handle.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// How this profile reaches its server.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The server's discovery key this profile pinned. A profile made before tidings/2 has
    /// none: the key the server shows now is fetched and pinned, once, and a warning says so.
    pub async fn pinned_key(&self) -> Result<PinnedKey> {
        if let Some(key) = self.pinned().current {
            return Ok(key);
        }
        let key = crate::discovery::fetch_key(self).await?;
        self.pin_key(key.clone())?;
        tracing::warn!(
            key_version = key.key_version,
            "this profile had no pinned discovery key (it was made before tidings/2): pinned the one the server shows now"
        );
        Ok(key)
    }

    /// Pins `key` in the profile (replacing any pinned before, and forgetting a previous one).
    pub fn pin_key(&self, key: PinnedKey) -> Result<()> {
        self.set_pinned(Some(key), None)
    }

    /// The keys pinned now.
    fn pinned(&self) -> Pinned {
        self.pinned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// The key pinned before the server's last rotation, while the server still holds it.
    pub fn previous_key(&self) -> Option<PinnedKey> {
        self.pinned().previous
    }

    /// Saves the pinned keys in the profile, then holds them here.
    fn set_pinned(&self, current: Option<PinnedKey>, previous: Option<PinnedKey>) -> Result<()> {
        let mut data = self.profile.load()?.ok_or(ClientError::NotRegistered)?;
        data.oprf_key = current.clone();
        data.previous_oprf_key = previous.clone();
        self.profile.save(&data)?;
        *self
            .pinned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Pinned { current, previous };
        Ok(())
    }

    /// Forgets the previous key: the server no longer evaluates under it.
    pub fn forget_previous_key(&self) -> Result<()> {
        let current = self.pinned().current;
        self.set_pinned(current, None)
    }

    /// Follows a rotation of the server's discovery key: if the server now evaluates under a
    /// newer key and names the pinned one as its previous key, pins the new one (keeping the old
    /// as the previous one while the server holds it), moves this account to it (`Rekey`, with
    /// this device's own number, as at registration) and keeps its own new pseudonym (which
    /// drops the pseudonyms learned under the old key: they are derived again when next needed).
    /// True if it did. A server key that does not follow from the pinned one is
    /// [`ClientError::DiscoveryKeyChanged`]: the user checks with the operator and runs
    /// `tidings repin`.
    pub async fn follow_rotation(&self, session: &mut Session) -> Result<bool> {
        let Some(pinned) = self.pinned().current else {
            return Ok(false);
        };
        let (current, previous) = crate::discovery::fetch_keys(self).await?;
        if current == pinned {
            if self.previous_key().is_some() && previous.is_none() {
                self.forget_previous_key()?;
            }
            return Ok(false);
        }
        if current.key_version <= pinned.key_version || previous.as_ref() != Some(&pinned) {
            return Err(ClientError::DiscoveryKeyChanged);
        }
        // Moved first, pinned after: a pin that is not saved is followed again at the next login
        // (a second `Rekey` changes nothing), while a pin without the move would never be.
        let own = self.rekey(session).await?;
        self.set_pinned(Some(current.clone()), Some(pinned))?;
        self.inbox()?
            .learn_pseudonyms(&current, &[(self.number().to_string(), own)])?;
        tracing::info!(
            key_version = current.key_version,
            "the server rotated its discovery key: pinned the new one and moved this account to it"
        );
        Ok(true)
    }

    /// Right after a registration or link, which pinned the server's current key: if the server
    /// is in a rotation's window, keeps the key before it as the previous key too, so that this
    /// new profile also finds the contacts not moved to the current key yet.
    pub(crate) async fn learn_previous_key(&self) -> Result<()> {
        let Some(pinned) = self.pinned().current else {
            return Ok(());
        };
        let (current, previous) = crate::discovery::fetch_keys(self).await?;
        if current == pinned && previous.is_some() {
            self.set_pinned(Some(current), previous)?;
        }
        Ok(())
    }

    /// `Rekey`: moves this account to the server's current key; its pseudonym under it.
    pub(crate) async fn rekey(&self, session: &mut Session) -> Result<AccountKey> {
        let request_id = session.request_id();
        let request = Kind::Rekey(frame::Rekey {
            request_id,
            number: self.number().to_string(),
        });
        match session.call(request, request_id).await? {
            Kind::RekeyResult(result) => key_of(&result.account)
                .ok_or_else(|| ClientError::Protocol("a Rekey answer without a pseudonym".into())),
            Kind::Error(e) => Err(e.into()),
            _ => Err(ClientError::Protocol("unexpected answer to a Rekey".into())),
        }
    }

    /// The pseudonym that reaches `number`'s account. Outside a rotation, its pseudonym; while
    /// the server still holds the key this profile pinned before, a contact not found under the
    /// current key (its owner has not moved to it yet) is named by its pseudonym under the
    /// previous one, so that no account is unreachable meanwhile. That check costs a device
    /// list, during the window only.
    pub async fn reachable_pseudonym(
        &self,
        session: &mut Session,
        number: &str,
    ) -> Result<AccountKey> {
        let current = self.pseudonym(session, number).await?;
        if self.previous_key().is_none() || number == self.number() {
            return Ok(current);
        }
        if !self.devices_of(session, current, None).await?.is_empty() {
            return Ok(current);
        }
        Ok(crate::discovery::previous_pseudonym(self, session, number)
            .await?
            .unwrap_or(current))
    }

    /// The pseudonym that names `number`'s account (see [`crate::discovery`]): learned before,
    /// or evaluated now.
    pub async fn pseudonym(&self, session: &mut Session, number: &str) -> Result<AccountKey> {
        self.pseudonym_checking(session, number, None).await
    }

    /// [`Account::pseudonym`], evaluated (when not known) with the free check of the delivery
    /// sender `sender_device` if one is given.
    async fn pseudonym_checking(
        &self,
        session: &mut Session,
        number: &str,
        sender_device: Option<DeviceId>,
    ) -> Result<AccountKey> {
        let number = tidings_proto::number::E164::parse(number)?;
        let found = crate::discovery::pseudonyms(
            self,
            session,
            &[number.as_str().to_string()],
            sender_device,
        )
        .await?;
        found
            .into_iter()
            .next()
            .ok_or_else(|| ClientError::Protocol("no pseudonym".into()))
    }

    /// Who may see this device online.
    pub fn presence(&self) -> ShowOnline {
        self.data.presence
    }

    /// Opens a session, unsealing the login key the first time: with the resumption token the
    /// last login left sealed in the profile if the server takes it (one round trip, no
    /// signature), else by signing the server's challenge; the new token the answer carries
    /// replaces the one kept. A listening session (the one that makes the device online) first
    /// tells the server who may see it online: until it does, the server shows it to nobody.
    pub async fn session(&self, listen: bool) -> Result<Session> {
        let key = self.login_key()?;
        let vault = self.vault()?;
        let token = self.profile.resume_token(&vault);
        let mut session =
            Session::open(&self.endpoint, self.device, key, listen, token.as_deref()).await?;
        let fresh = session.take_resume_token();
        if !fresh.is_empty() || token.is_some() {
            // A token not kept only costs the next connect its signature.
            if let Err(e) = self.profile.store_resume_token(&vault, &fresh) {
                tracing::warn!(error = %e, "could not keep the resumption token");
            }
        }
        // The server rotated its discovery key since this profile pinned one.
        let pinned = self.pinned().current.map_or(0, |key| key.key_version);
        if pinned != 0 && session.oprf_key_version() > pinned {
            match self.follow_rotation(&mut session).await {
                // Said again, as an error, by the first evaluation that needs the key.
                Err(ClientError::DiscoveryKeyChanged) => tracing::warn!(
                    "the server's discovery key changed and does not follow from the pinned one: check with its operator, then run `tidings repin`"
                ),
                Err(e) => return Err(e),
                Ok(_) => {}
            }
        }
        if listen {
            self.set_presence(&mut session).await?;
        }
        Ok(session)
    }

    /// Sends the presence mode and key (`PresenceSet`).
    async fn set_presence(&self, session: &mut Session) -> Result<()> {
        let mode = self.presence();
        let key = match mode {
            ShowOnline::Nobody => Vec::new(),
            _ => self.inbox()?.look(|crypto| crypto.presence_key())?.to_vec(),
        };
        let request_id = session.request_id();
        let request = Kind::PresenceSet(frame::PresenceSet {
            request_id,
            mode: mode.wire() as i32,
            key,
        });
        match session.call(request, request_id).await? {
            Kind::PresenceSetResult(_) => Ok(()),
            Kind::Error(e) => Err(e.into()),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a presence setting".into(),
            )),
        }
    }

    fn login_key(&self) -> Result<&SigningKey> {
        if let Some(key) = self.key.get() {
            return Ok(key);
        }
        let key = self.profile.device_key(&self.vault()?)?;
        Ok(self.key.get_or_init(|| key))
    }

    /// The passphrase's key, derived (by opening the local store) the first time.
    fn vault(&self) -> Result<Vault> {
        match self.vault.get() {
            Some(vault) => Ok(vault.clone()),
            None => Ok(self.inbox()?.vault().clone()),
        }
    }

    /// Opens the local store with the passphrase; the first open brings a store made by an
    /// earlier version up to date ([`Account::migrate`]).
    pub fn inbox(&self) -> Result<Inbox> {
        let mut inbox = match self.vault.get() {
            Some(vault) => Inbox::open_unlocked(self.profile.dir(), vault.clone())?,
            None => {
                let passphrase = self.passphrase.as_ref().ok_or_else(|| {
                    ClientError::Passphrase(
                        "this needs the profile's passphrase: set TIDINGS_PASSPHRASE or pass --passphrase-file".into(),
                    )
                })?;
                let inbox = Inbox::open(self.profile.dir(), passphrase)?;
                let _ = self.vault.set(inbox.vault().clone());
                inbox
            }
        };
        if self.inbox_migrated.get().is_none() {
            self.migrate(&mut inbox)?;
            let _ = self.inbox_migrated.set(());
        }
        Ok(inbox)
    }

    /// A profile verified before a device trusted its own key at verification holds no trust
    /// for its own number, so a later device of the number would be trusted on first use. It
    /// trusts its own key now, and only that: any other device of the number needs a vouch, as
    /// on a profile made today. A store without keys yet has nothing to bring up to date.
    fn migrate(&self, inbox: &mut Inbox) -> Result<()> {
        let own = self.number().to_string();
        let unset = inbox
            .look(|crypto| crypto.trusts_nothing_for(&own))
            .unwrap_or(false);
        if unset {
            inbox.update(|_, crypto| {
                if !crypto.trusts_nothing_for(&own) {
                    return Ok(Change::Unchanged(()));
                }
                crypto.trust_itself(&own);
                Ok(Change::Save(()))
            })?;
        }
        Ok(())
    }

    /// Publishes identity keys, one-time keys and a fallback key if the server holds too few.
    pub async fn ensure_keys(&self, inbox: &mut Inbox, session: &mut Session) -> Result<()> {
        let supply = session.key_supply();
        let request_id = session.request_id();
        let upload = inbox.update(|_, crypto| {
            Ok(
                match crypto.keys_to_publish(self.device, supply, request_id) {
                    Some(upload) => Change::Save(Some(upload)),
                    None => Change::Unchanged(None),
                },
            )
        })?;
        let Some(upload) = upload else {
            return Ok(());
        };
        let hash = upload.contact_token_hash.clone();
        match session.call(Kind::KeysUpload(upload), request_id).await? {
            Kind::KeysUploadResult(result) => {
                session.set_key_supply(KeySupply {
                    one_time_keys: result.one_time_keys,
                    published: true,
                });
                // Only now does the server hold the contact token's hash: an upload that failed
                // or went unanswered carries it again at the next session.
                inbox.update(|_, crypto| {
                    crypto.contact_token_hash_confirmed(&hash);
                    Ok(Change::Save(()))
                })?;
                Ok(())
            }
            Kind::Error(e) => Err(e.into()),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a key upload".into(),
            )),
        }
    }

    /// The devices the server lists for `number`, with their identity keys.
    pub async fn directory(
        &self,
        session: &mut Session,
        number: &str,
    ) -> Result<Vec<frame::DeviceKeys>> {
        self.devices_request(session, number, None).await
    }

    /// Whether `sender_device`, stamped on a delivery waiting for this device, is one of
    /// `number`'s: the server's devices for `number` if it is, none if it is not. Costs no lookup
    /// budget.
    pub async fn sender_directory(
        &self,
        session: &mut Session,
        number: &str,
        sender_device: DeviceId,
    ) -> Result<Vec<frame::DeviceKeys>> {
        self.devices_request(session, number, Some(sender_device))
            .await
    }

    async fn devices_request(
        &self,
        session: &mut Session,
        number: &str,
        sender_device: Option<DeviceId>,
    ) -> Result<Vec<frame::DeviceKeys>> {
        // A delivery's claimed sender is evaluated with the free check of that sender, so a
        // spoofer cannot spend this account's budget.
        let account = self
            .pseudonym_checking(session, number, sender_device)
            .await?;
        let devices = self.devices_of(session, account, sender_device).await?;
        if !devices.is_empty() || self.previous_key().is_none() {
            return Ok(devices);
        }
        // Not found under the current key: its owner may not have moved to it yet.
        match crate::discovery::previous_pseudonym(self, session, number).await? {
            Some(previous) => self.devices_of(session, previous, sender_device).await,
            None => Ok(devices),
        }
    }

    /// The devices the server lists for the account `account` names.
    async fn devices_of(
        &self,
        session: &mut Session,
        account: AccountKey,
        sender_device: Option<DeviceId>,
    ) -> Result<Vec<frame::DeviceKeys>> {
        let request_id = session.request_id();
        let request = Kind::Devices(frame::DevicesRequest {
            request_id,
            account: account.to_vec(),
            sender_device: sender_device.map_or_else(Vec::new, |d| d.as_bytes().to_vec()),
            ..frame::DevicesRequest::default()
        });
        match session.call(request, request_id).await? {
            Kind::DeviceList(list) => Ok(list.devices),
            Kind::Error(e) => Err(e.into()),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a device list request".into(),
            )),
        }
    }

    /// Claims one key per device of `number` (or of `only`).
    pub async fn claim(
        &self,
        session: &mut Session,
        number: &str,
        only: &[DeviceId],
    ) -> Result<Vec<frame::ClaimedKey>> {
        let account = self.reachable_pseudonym(session, number).await?;
        let request_id = session.request_id();
        let request = Kind::KeysClaim(frame::KeysClaim {
            request_id,
            account: account.to_vec(),
            device_ids: only.iter().map(|d| d.as_bytes().to_vec()).collect(),
            ..frame::KeysClaim::default()
        });
        match session.call(request, request_id).await? {
            Kind::KeysClaimResult(result) => Ok(result.devices),
            Kind::Error(e) => Err(e.into()),
            _ => Err(ClientError::Protocol(
                "unexpected answer to a key claim".into(),
            )),
        }
    }
}
