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
    /// made before tidings/2).
    pinned: std::sync::OnceLock<PinnedKey>,
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
        let pinned = std::sync::OnceLock::new();
        if let Some(key) = data.oprf_key.clone() {
            let _ = pinned.set(key);
        }
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
        if let Some(key) = self.pinned.get() {
            return Ok(key.clone());
        }
        let key = crate::discovery::fetch_key(self).await?;
        self.pin_key(key.clone())?;
        tracing::warn!(
            key_version = key.key_version,
            "this profile had no pinned discovery key (it was made before tidings/2): pinned the one the server shows now"
        );
        Ok(key)
    }

    /// Pins `key` in the profile (replacing any pinned before).
    pub fn pin_key(&self, key: PinnedKey) -> Result<()> {
        let mut data = self.profile.load()?.ok_or(ClientError::NotRegistered)?;
        data.oprf_key = Some(key.clone());
        self.profile.save(&data)?;
        // A process pins once: a second pin (`tidings repin`) is this process's last act.
        let _ = self.pinned.set(key);
        Ok(())
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
        let account = self.pseudonym(session, number).await?;
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
