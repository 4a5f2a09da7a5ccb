//! End-to-end encryption: this device's Olm account, its sessions with other devices, what it
//! knows of other devices, and whose keys it trusts. No I/O: the caller loads and stores the
//! state (sealed, see [`crate::vault`]) around each change, in one local transaction.
//!
//! - Each device has an Olm account (vodozemac): a Curve25519 identity key, an Ed25519 signing
//!   key, one-time keys and a fallback key. Olm does not sign one-time keys; we sign each with the
//!   Ed25519 key over [`tidings_proto::transcript::one_time_key`] and check that signature on
//!   every claimed key, so a server cannot slip in a key of its own.
//! - A message is encrypted once per receiving device, each with its own Olm session.
//! - Trust is per number: the set of identity keys accepted for it. The first keys seen are
//!   accepted (trust on first use); a key outside the set afterwards is a change the user must
//!   look at before anything more is sent to that number.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256, Sha512};
use tidings_proto::frame::{self, Envelope};
use tidings_proto::id::DeviceId;
use vodozemac::olm::{Account, AccountPickle, OlmMessage, Session, SessionConfig, SessionPickle};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};
use zeroize::Zeroizing;

use crate::session::KeySupply;

/// Sessions kept per peer device (the newest first); older ones are dropped.
const MAX_SESSIONS_PER_DEVICE: usize = 4;
/// Replenish one-time keys when the server holds fewer than this.
pub const REPLENISH_BELOW: u32 = 25;

/// What went wrong with encryption or decryption. Each message says what it means for the user.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("a key of device {0} has a bad signature: refusing to use it (the server handed out a key its owner did not sign)")]
    BadKeySignature(DeviceId),
    #[error("device {0} published malformed keys")]
    BadKeys(DeviceId),
    #[error("the message is not a valid encrypted envelope")]
    Malformed,
    #[error("no session with the sending device, and the message cannot open one")]
    NoSession,
    #[error("the message could not be decrypted ({0}): it was tampered with, replayed, or made for a key this device does not have")]
    Decrypt(String),
    #[error("no session with device {0}: claim its keys first")]
    UnknownDevice(DeviceId),
    #[error("the stored encryption state is damaged: {0}")]
    State(String),
}

/// Shorthand for crypto results.
pub type Result<T, E = CryptoError> = std::result::Result<T, E>;

/// What this device knows about another device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownDevice {
    /// The number the server's directory lists the device under; `None` until checked.
    pub number: Option<String>,
    pub identity_key: [u8; 32],
    pub signing_key: Option<[u8; 32]>,
    /// The device of the same number that vouched for this one (approved its link) and its
    /// signature, as the directory lists them.
    #[serde(default)]
    pub voucher: Option<([u8; 16], Vec<u8>)>,
}

fn voucher_of(by: &[u8], signature: &[u8]) -> Option<([u8; 16], Vec<u8>)> {
    let by = <[u8; 16]>::try_from(by).ok()?;
    (signature.len() == 64).then(|| (by, signature.to_vec()))
}

/// How a number's current keys compare with the ones trusted for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustCheck {
    /// Nothing was trusted for this number yet; these keys are now.
    FirstUse,
    /// Every key is trusted.
    Trusted,
    /// These keys are not trusted (a new phone, a re-registration, a new device, or an attack).
    Changed(Vec<[u8; 32]>),
}

/// The device's end-to-end state.
pub struct Crypto {
    account: Account,
    /// Sessions by the peer's Curve25519 identity key, newest first.
    sessions: BTreeMap<[u8; 32], Vec<Session>>,
    devices: BTreeMap<DeviceId, KnownDevice>,
    trusted: BTreeMap<String, BTreeSet<[u8; 32]>>,
    /// This device's contact token: sent inside every message it writes, so that whoever it
    /// writes to can reach its account as a contact. The server holds only its SHA-256.
    contact_token: [u8; 32],
    /// The server confirmed it holds the token's hash (a `KeysUploadResult` answered the
    /// `KeysUpload` that carried it); until then every upload carries it again.
    contact_token_published: bool,
    /// Contact tokens received from others, by their number: attached to what is sent to them.
    contact_tokens: BTreeMap<String, [u8; 32]>,
    /// This device's presence key: the tokens it hands the devices it writes to derive from
    /// it (`tidings_core::presence::token`); a new one revokes them all.
    presence_key: [u8; 32],
    /// Presence tokens received, by the number and the device that handed them: with one, this
    /// device may see that device online.
    presence_tokens: BTreeMap<(String, DeviceId), [u8; 32]>,
    /// The numbers this device has written to: their messages get a receipt whatever the
    /// presence mode (a receipt tells a stranger that a device is online).
    written_to: BTreeSet<String>,
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crypto")
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct Pickle {
    account: AccountPickle,
    sessions: Vec<([u8; 32], Vec<SessionPickle>)>,
    devices: Vec<(DeviceIdText, KnownDevice)>,
    trusted: Vec<(String, Vec<[u8; 32]>)>,
    /// Absent in a state saved before contact tokens: a new one is made on load.
    #[serde(default)]
    contact_token: Option<[u8; 32]>,
    #[serde(default)]
    contact_token_published: bool,
    #[serde(default)]
    contact_tokens: Vec<(String, [u8; 32])>,
    /// Absent in a state saved before presence keys: a new one is made on load.
    #[serde(default)]
    presence_key: Option<[u8; 32]>,
    #[serde(default)]
    presence_tokens: Vec<(String, DeviceIdText, [u8; 32])>,
    #[serde(default)]
    written_to: Vec<String>,
}

/// A fresh contact token or presence key: 256 random bits.
fn new_contact_token() -> [u8; 32] {
    use rand::RngCore as _;
    let mut token = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut token);
    token
}

#[derive(Serialize, Deserialize)]
struct DeviceIdText(String);

fn curve(bytes: &[u8]) -> Option<Curve25519PublicKey> {
    Curve25519PublicKey::from_slice(bytes).ok()
}

impl Default for Crypto {
    fn default() -> Self {
        Self::new()
    }
}

impl Crypto {
    /// A new account with fresh identity keys and a fallback key.
    pub fn new() -> Self {
        let mut account = Account::new();
        account.generate_fallback_key();
        Self {
            account,
            sessions: BTreeMap::new(),
            devices: BTreeMap::new(),
            trusted: BTreeMap::new(),
            contact_token: new_contact_token(),
            contact_token_published: false,
            contact_tokens: BTreeMap::new(),
            presence_key: new_contact_token(),
            presence_tokens: BTreeMap::new(),
            written_to: BTreeSet::new(),
        }
    }

    /// A new account that keeps what `old` trusted (a re-registration of this profile).
    pub fn replacing(old: Option<Crypto>) -> Self {
        let mut new = Self::new();
        if let Some(old) = old {
            new.trusted = old.trusted;
            new.contact_tokens = old.contact_tokens;
            new.written_to = old.written_to;
        }
        new
    }

    /// An independent copy (to try a decryption on and throw away).
    pub fn duplicate(&self) -> Self {
        Self {
            account: Account::from_pickle(self.account.pickle()),
            sessions: self
                .sessions
                .iter()
                .map(|(key, list)| {
                    (
                        *key,
                        list.iter()
                            .map(|s| Session::from_pickle(s.pickle()))
                            .collect(),
                    )
                })
                .collect(),
            devices: self.devices.clone(),
            trusted: self.trusted.clone(),
            contact_token: self.contact_token,
            contact_token_published: self.contact_token_published,
            contact_tokens: self.contact_tokens.clone(),
            presence_key: self.presence_key,
            presence_tokens: self.presence_tokens.clone(),
            written_to: self.written_to.clone(),
        }
    }

    /// The state as bytes, to be sealed.
    pub fn to_bytes(&self) -> Result<Zeroizing<Vec<u8>>> {
        let pickle = Pickle {
            account: self.account.pickle(),
            sessions: self
                .sessions
                .iter()
                .map(|(key, list)| (*key, list.iter().map(Session::pickle).collect()))
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(id, known)| (DeviceIdText(id.to_text()), known.clone()))
                .collect(),
            trusted: self
                .trusted
                .iter()
                .map(|(number, keys)| (number.clone(), keys.iter().copied().collect()))
                .collect(),
            contact_token: Some(self.contact_token),
            contact_token_published: self.contact_token_published,
            contact_tokens: self
                .contact_tokens
                .iter()
                .map(|(number, token)| (number.clone(), *token))
                .collect(),
            presence_key: Some(self.presence_key),
            presence_tokens: self
                .presence_tokens
                .iter()
                .map(|((number, device), token)| {
                    (number.clone(), DeviceIdText(device.to_text()), *token)
                })
                .collect(),
            written_to: self.written_to.iter().cloned().collect(),
        };
        serde_json::to_vec(&pickle)
            .map(Zeroizing::new)
            .map_err(|e| CryptoError::State(e.to_string()))
    }

    /// The state from bytes made by [`Crypto::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let pickle: Pickle =
            serde_json::from_slice(bytes).map_err(|e| CryptoError::State(e.to_string()))?;
        let mut devices = BTreeMap::new();
        for (id, known) in pickle.devices {
            let id = DeviceId::from_text(&id.0)
                .ok_or_else(|| CryptoError::State("bad device id".into()))?;
            devices.insert(id, known);
        }
        Ok(Self {
            account: Account::from_pickle(pickle.account),
            sessions: pickle
                .sessions
                .into_iter()
                .map(|(key, list)| (key, list.into_iter().map(Session::from_pickle).collect()))
                .collect(),
            devices,
            trusted: pickle
                .trusted
                .into_iter()
                .map(|(number, keys)| (number, keys.into_iter().collect()))
                .collect(),
            contact_token_published: pickle.contact_token.is_some()
                && pickle.contact_token_published,
            contact_token: pickle.contact_token.unwrap_or_else(new_contact_token),
            contact_tokens: pickle.contact_tokens.into_iter().collect(),
            presence_key: pickle.presence_key.unwrap_or_else(new_contact_token),
            presence_tokens: pickle
                .presence_tokens
                .into_iter()
                .filter_map(|(number, device, token)| {
                    Some(((number, DeviceId::from_text(&device.0)?), token))
                })
                .collect(),
            written_to: pickle.written_to.into_iter().collect(),
        })
    }

    /// This device's presence key (sent to the server by a listening session).
    pub fn presence_key(&self) -> [u8; 32] {
        self.presence_key
    }

    /// Replaces the presence key: every token handed out so far stops working.
    pub fn rotate_presence_key(&mut self) {
        self.presence_key = new_contact_token();
    }

    /// Keeps the presence token a message from `device` of `number` carried (the newest wins);
    /// call only once the message is known to come from a device of `number`.
    pub fn remember_presence_token(&mut self, number: &str, device: DeviceId, token: &[u8]) {
        if let Ok(token) = <[u8; 32]>::try_from(token) {
            self.presence_tokens
                .insert((number.to_string(), device), token);
        }
    }

    /// The presence tokens the devices of `number` handed us.
    pub fn presence_tokens_of(&self, number: &str) -> Vec<(DeviceId, [u8; 32])> {
        self.presence_tokens
            .iter()
            .filter(|((n, _), _)| n == number)
            .map(|((_, device), token)| (*device, *token))
            .collect()
    }

    /// Proofs, for the hour `now` falls in, that this device may see the devices of `number`
    /// online: one per presence token they handed it, at most `most`.
    pub fn presence_proofs(
        &self,
        number: &str,
        now: u64,
        most: usize,
    ) -> Vec<frame::PresenceProof> {
        let epoch = tidings_core::presence::epoch(now);
        self.presence_tokens_of(number)
            .into_iter()
            .take(most)
            .map(|(device, token)| frame::PresenceProof {
                // The device id says which device it is for; the account's pseudonym is not
                // known here, and not needed.
                account: Vec::new(),
                device_id: device.as_bytes().to_vec(),
                mac: tidings_core::presence::proof(&token, epoch).to_vec(),
            })
            .collect()
    }

    /// The presence token this device hands `device` (inside what it writes there).
    pub fn presence_token_for(&self, device: DeviceId) -> [u8; 32] {
        tidings_core::presence::token(&self.presence_key, device)
    }

    /// Notes that this device wrote to `number`.
    pub fn note_written_to(&mut self, number: &str) {
        if !self.written_to.contains(number) {
            self.written_to.insert(number.to_string());
        }
    }

    /// Whether this device has written to `number`.
    pub fn has_written_to(&self, number: &str) -> bool {
        self.written_to.contains(number)
    }

    /// This device's contact token, to put in every message it sends.
    pub fn contact_token(&self) -> [u8; 32] {
        self.contact_token
    }

    /// The server answered an upload that carried `hash` (`KeysUpload.contact_token_hash`): the
    /// token counts as published, unless it was replaced since.
    pub fn contact_token_hash_confirmed(&mut self, hash: &[u8]) {
        if Sha256::digest(self.contact_token)[..] == *hash {
            self.contact_token_published = true;
        }
    }

    /// Replaces this device's contact token with a new one, to be published with the next key
    /// upload. Whoever holds only the old one is a stranger from its publication on, until a
    /// message from this device hands them the new one.
    pub fn rotate_contact_token(&mut self) {
        self.contact_token = new_contact_token();
        self.contact_token_published = false;
    }

    /// The contact token `number` handed us, to attach to what we send them.
    pub fn contact_token_of(&self, number: &str) -> Option<[u8; 32]> {
        self.contact_tokens.get(number).copied()
    }

    /// Keeps the contact token a message from `number` carried (the newest wins); call only once
    /// the message is known to come from a device of `number`. A token of the wrong length is
    /// ignored.
    pub fn remember_contact_token(&mut self, number: &str, token: &[u8]) {
        if let Ok(token) = <[u8; 32]>::try_from(token) {
            self.contact_tokens.insert(number.to_string(), token);
        }
    }

    /// This device's identity keys: Curve25519 and Ed25519.
    pub fn identity_keys(&self) -> ([u8; 32], [u8; 32]) {
        let keys = self.account.identity_keys();
        (keys.curve25519.to_bytes(), *keys.ed25519.as_bytes())
    }

    fn signed(
        &self,
        device: DeviceId,
        fallback: bool,
        key: Curve25519PublicKey,
    ) -> frame::SignedKey {
        let transcript =
            tidings_proto::transcript::one_time_key(device.as_bytes(), fallback, key.as_bytes());
        frame::SignedKey {
            public_key: key.to_vec(),
            signature: self.account.sign(&transcript).to_bytes().to_vec(),
        }
    }

    /// The keys to upload so the server holds enough: identity keys, new one-time keys when it
    /// holds fewer than [`REPLENISH_BELOW`], and a fallback key when it has none (or when keys
    /// are replenished, so one fallback key is not used forever). `None` when nothing is needed.
    /// The keys count as published from here on: if the upload fails, the next login reports
    /// the server's count again and more are made. The contact token's hash counts as published
    /// only once the server confirms it ([`Crypto::contact_token_hash_confirmed`]): until then
    /// every upload carries it again.
    pub fn keys_to_publish(
        &mut self,
        device: DeviceId,
        supply: KeySupply,
        request_id: u64,
    ) -> Option<frame::KeysUpload> {
        let replenish = supply.one_time_keys < REPLENISH_BELOW;
        if supply.published && !replenish && self.contact_token_published {
            return None;
        }
        if replenish {
            let target = self.account.max_number_of_one_time_keys();
            let have = usize::try_from(supply.one_time_keys).unwrap_or(target);
            self.account
                .generate_one_time_keys(target.saturating_sub(have));
            self.account.generate_fallback_key();
        } else if self.account.fallback_key().is_empty() {
            self.account.generate_fallback_key();
        }
        let one_time_keys = self
            .account
            .one_time_keys()
            .values()
            .map(|key| self.signed(device, false, *key))
            .collect();
        let fallback_key = self
            .account
            .fallback_key()
            .values()
            .next()
            .map(|key| self.signed(device, true, *key));
        self.account.mark_keys_as_published();
        let (identity_key, signing_key) = self.identity_keys();
        Some(frame::KeysUpload {
            request_id,
            identity_key: identity_key.to_vec(),
            signing_key: signing_key.to_vec(),
            one_time_keys,
            fallback_key,
            contact_token_hash: Sha256::digest(self.contact_token).to_vec(),
        })
    }

    /// Opens an outbound session with a claimed key, after checking the key's signature.
    pub fn open_session(&mut self, number: &str, claimed: &frame::ClaimedKey) -> Result<DeviceId> {
        let device = DeviceId::from_slice(&claimed.device_id).ok_or(CryptoError::Malformed)?;
        let identity = curve(&claimed.identity_key).ok_or(CryptoError::BadKeys(device))?;
        let signing_bytes = <[u8; 32]>::try_from(claimed.signing_key.as_slice())
            .map_err(|_| CryptoError::BadKeys(device))?;
        let signing = Ed25519PublicKey::from_slice(&signing_bytes)
            .map_err(|_| CryptoError::BadKeys(device))?;
        let key = claimed.key.as_ref().ok_or(CryptoError::BadKeys(device))?;
        let one_time = curve(&key.public_key).ok_or(CryptoError::BadKeys(device))?;
        let signature = Ed25519Signature::from_slice(&key.signature)
            .map_err(|_| CryptoError::BadKeySignature(device))?;
        let transcript = tidings_proto::transcript::one_time_key(
            device.as_bytes(),
            claimed.fallback,
            one_time.as_bytes(),
        );
        signing
            .verify(&transcript, &signature)
            .map_err(|_| CryptoError::BadKeySignature(device))?;
        let session =
            self.account
                .create_outbound_session(SessionConfig::version_2(), identity, one_time);
        let list = self.sessions.entry(identity.to_bytes()).or_default();
        list.insert(0, session);
        list.truncate(MAX_SESSIONS_PER_DEVICE);
        self.devices.insert(
            device,
            KnownDevice {
                number: Some(number.to_string()),
                identity_key: identity.to_bytes(),
                signing_key: Some(signing_bytes),
                voucher: voucher_of(&claimed.voucher, &claimed.voucher_signature),
            },
        );
        Ok(device)
    }

    /// Records what the directory says about a device.
    pub fn learn_device(&mut self, device: DeviceId, number: &str, keys: &frame::DeviceKeys) {
        let (Ok(identity_key), Ok(signing_key)) = (
            <[u8; 32]>::try_from(keys.identity_key.as_slice()),
            <[u8; 32]>::try_from(keys.signing_key.as_slice()),
        ) else {
            return;
        };
        self.devices.insert(
            device,
            KnownDevice {
                number: Some(number.to_string()),
                identity_key,
                signing_key: Some(signing_key),
                voucher: voucher_of(&keys.voucher, &keys.voucher_signature),
            },
        );
    }

    /// This device's signature vouching for a device it approved joining its number.
    pub fn vouch_for(&self, device: DeviceId, identity_key: &[u8], signing_key: &[u8]) -> Vec<u8> {
        let transcript =
            tidings_proto::transcript::vouch(device.as_bytes(), identity_key, signing_key);
        self.account.sign(&transcript).to_bytes().to_vec()
    }

    /// Trusts those of `keys` (new for `number`) whose device was vouched for by a device of
    /// `number` whose key is trusted, the signature checked; returns the keys still untrusted.
    /// This is how a contact's newly linked device is accepted without a safety-number check,
    /// while a re-registration (no trusted device left to vouch) is not.
    pub fn accept_vouched(&mut self, number: &str, keys: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let mut untrusted = Vec::new();
        for key in keys {
            let vouched = self.devices.iter().any(|(device, known)| {
                known.identity_key == *key
                    && known.number.as_deref() == Some(number)
                    && self.vouch_holds(number, *device, known)
            });
            if vouched {
                self.trust(number, &[*key]);
            } else {
                untrusted.push(*key);
            }
        }
        untrusted
    }

    fn vouch_holds(&self, number: &str, device: DeviceId, known: &KnownDevice) -> bool {
        let (Some((by, signature)), Some(signing_key)) = (&known.voucher, known.signing_key) else {
            return false;
        };
        let Some(voucher) = self.devices.get(&DeviceId(*by)) else {
            return false;
        };
        if voucher.number.as_deref() != Some(number)
            || self.is_trusted(number, &voucher.identity_key) != Some(true)
        {
            return false;
        }
        let (Some(voucher_key), Ok(signature)) = (
            voucher
                .signing_key
                .and_then(|k| Ed25519PublicKey::from_slice(&k).ok()),
            Ed25519Signature::from_slice(signature),
        ) else {
            return false;
        };
        let transcript =
            tidings_proto::transcript::vouch(device.as_bytes(), &known.identity_key, &signing_key);
        voucher_key.verify(&transcript, &signature).is_ok()
    }

    /// What this device knows of another.
    pub fn device(&self, device: DeviceId) -> Option<&KnownDevice> {
        self.devices.get(&device)
    }

    /// The devices known to belong to `number` that this device has a session with.
    pub fn devices_of(&self, number: &str) -> Vec<DeviceId> {
        self.devices
            .iter()
            .filter(|(_, known)| known.number.as_deref() == Some(number))
            .filter(|(_, known)| self.sessions.contains_key(&known.identity_key))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Forgets a device the server no longer lists (removed or replaced).
    pub fn forget_device(&mut self, device: DeviceId) {
        self.devices.remove(&device);
    }

    /// Encrypts `plaintext` for one device with the newest session.
    pub fn encrypt(&mut self, device: DeviceId, plaintext: &[u8]) -> Result<Envelope> {
        let identity = self
            .devices
            .get(&device)
            .map(|known| known.identity_key)
            .ok_or(CryptoError::UnknownDevice(device))?;
        let session = self
            .sessions
            .get_mut(&identity)
            .and_then(|list| list.first_mut())
            .ok_or(CryptoError::UnknownDevice(device))?;
        let (olm_type, ciphertext) = session.encrypt(plaintext).to_parts();
        Ok(Envelope {
            olm_type: u32::try_from(olm_type).unwrap_or(u32::MAX),
            ciphertext,
        })
    }

    /// Decrypts a copy sent by `sender_device`. Returns the plaintext and the sender's identity
    /// key, which Olm has authenticated (only its holder could have made this ciphertext).
    pub fn decrypt(
        &mut self,
        sender_device: DeviceId,
        envelope: &Envelope,
    ) -> Result<(Zeroizing<Vec<u8>>, [u8; 32])> {
        let message = OlmMessage::from_parts(
            usize::try_from(envelope.olm_type).map_err(|_| CryptoError::Malformed)?,
            &envelope.ciphertext,
        )
        .map_err(|_| CryptoError::Malformed)?;
        match message {
            OlmMessage::PreKey(pre_key) => {
                let identity = pre_key.identity_key();
                let list = self.sessions.entry(identity.to_bytes()).or_default();
                if let Some(index) = list
                    .iter()
                    .position(|s| s.session_id() == pre_key.session_id())
                {
                    let plaintext = list[index]
                        .decrypt(&OlmMessage::PreKey(pre_key))
                        .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
                    let session = list.remove(index);
                    list.insert(0, session);
                    return Ok((Zeroizing::new(plaintext), identity.to_bytes()));
                }
                let created = self
                    .account
                    .create_inbound_session(identity, &pre_key)
                    .map_err(|e| CryptoError::Decrypt(e.to_string()))?;
                let list = self.sessions.entry(identity.to_bytes()).or_default();
                list.insert(0, created.session);
                list.truncate(MAX_SESSIONS_PER_DEVICE);
                self.devices.entry(sender_device).or_insert(KnownDevice {
                    number: None,
                    identity_key: identity.to_bytes(),
                    signing_key: None,
                    voucher: None,
                });
                Ok((Zeroizing::new(created.plaintext), identity.to_bytes()))
            }
            OlmMessage::Normal(_) => {
                let identity = self
                    .devices
                    .get(&sender_device)
                    .map(|known| known.identity_key)
                    .ok_or(CryptoError::NoSession)?;
                let list = self
                    .sessions
                    .get_mut(&identity)
                    .ok_or(CryptoError::NoSession)?;
                let mut last_error = String::from("no session");
                for index in 0..list.len() {
                    match list[index].decrypt(&message) {
                        Ok(plaintext) => {
                            let session = list.remove(index);
                            list.insert(0, session);
                            return Ok((Zeroizing::new(plaintext), identity));
                        }
                        Err(e) => last_error = e.to_string(),
                    }
                }
                Err(CryptoError::Decrypt(last_error))
            }
        }
    }

    /// Compares a number's current identity keys with the trusted ones; on first use, trusts
    /// them.
    pub fn check_trust(&mut self, number: &str, keys: &[[u8; 32]]) -> TrustCheck {
        match self.trusted.get(number) {
            None => {
                self.trusted
                    .insert(number.to_string(), keys.iter().copied().collect());
                TrustCheck::FirstUse
            }
            Some(trusted) => {
                let new: Vec<[u8; 32]> = keys
                    .iter()
                    .filter(|key| !trusted.contains(*key))
                    .copied()
                    .collect();
                if new.is_empty() {
                    TrustCheck::Trusted
                } else {
                    TrustCheck::Changed(new)
                }
            }
        }
    }

    /// Whether nothing at all is trusted for `number` yet (its keys would be trusted on first
    /// use).
    pub fn trusts_nothing_for(&self, number: &str) -> bool {
        !self.trusted.contains_key(number)
    }

    /// Whether `key` is trusted for `number` (without trusting anything new).
    pub fn is_trusted(&self, number: &str, key: &[u8; 32]) -> Option<bool> {
        self.trusted.get(number).map(|keys| keys.contains(key))
    }

    /// Trusts this device's own identity key for its own number: the start of the set that a
    /// later device of the number joins only when a trusted device vouched for it.
    pub fn trust_itself(&mut self, own_number: &str) {
        let (identity_key, _) = self.identity_keys();
        self.trust(own_number, &[identity_key]);
    }

    /// Trusts these keys for `number` from now on (after the user compared safety numbers, or
    /// approved a device link).
    pub fn trust(&mut self, number: &str, keys: &[[u8; 32]]) {
        self.trusted
            .entry(number.to_string())
            .or_default()
            .extend(keys.iter().copied());
    }
}

/// A device's fingerprint, for its user to compare across two screens (both sides of a link
/// show both devices'): SHA-256 of its identity key, the first 15 bytes in base32, six groups of
/// four.
pub fn device_fingerprint(identity_key: &[u8; 32]) -> String {
    let mut digest = Sha256::new();
    digest.update(b"tidings-device-fingerprint-v1\n");
    digest.update(identity_key);
    crate::link_secret::base32_groups(&digest.finalize()[..15], " ").to_string()
}

/// The safety number of two parties: 60 digits that both sides compute from their numbers and
/// the identity keys of all their devices; equal on both screens means nobody is in between.
/// It changes when either side adds, removes or replaces a device.
pub fn safety_number(a: (&str, &[[u8; 32]]), b: (&str, &[[u8; 32]])) -> String {
    fn half(number: &str, keys: &[[u8; 32]]) -> String {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        let mut digest = Sha512::new();
        digest.update(b"tidings-safety-number-v1\n");
        digest.update(number.as_bytes());
        digest.update(b"\n");
        for key in &keys {
            digest.update(key);
        }
        let mut hash = digest.finalize();
        // Iterated like other messengers' safety numbers, so that finding a key whose number
        // matches a victim's costs more.
        for _ in 0..5200 {
            let mut next = Sha512::new();
            next.update(hash);
            for key in &keys {
                next.update(key);
            }
            hash = next.finalize();
        }
        hash[..30]
            .chunks(5)
            .map(|chunk| {
                let value = chunk.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
                format!("{:05}", value % 100_000)
            })
            .collect()
    }
    let (first, second) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let digits = half(first.0, first.1) + &half(second.0, second.1);
    digits
        .as_bytes()
        .chunks(5)
        .map(|chunk| String::from_utf8_lossy(chunk).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contact token is made once, published as its hash once, survives a restore, and the
    /// tokens received are kept by number; a token of the wrong length is not kept.
    #[test]
    fn contact_tokens_are_kept_and_published_once() {
        let device = DeviceId([3; 16]);
        let mut alice = Crypto::new();
        let upload = alice
            .keys_to_publish(device, KeySupply::default(), 1)
            .expect("keys");
        assert_eq!(
            upload.contact_token_hash,
            Sha256::digest(alice.contact_token()).to_vec()
        );
        let published = KeySupply {
            one_time_keys: REPLENISH_BELOW,
            published: true,
        };
        // Another hash confirmed (of a token since replaced) is not this one.
        alice.contact_token_hash_confirmed(&[0; 32]);
        assert!(alice.keys_to_publish(device, published, 2).is_some());
        alice.contact_token_hash_confirmed(&upload.contact_token_hash);
        assert!(alice.keys_to_publish(device, published, 3).is_none());
        // A new token is published once more, and differs.
        let before = alice.contact_token();
        alice.rotate_contact_token();
        assert_ne!(alice.contact_token(), before);
        let rotated = alice
            .keys_to_publish(device, published, 4)
            .expect("the new token is published");
        assert_eq!(
            rotated.contact_token_hash,
            Sha256::digest(alice.contact_token()).to_vec()
        );
        alice.remember_contact_token("+4915112345678", &[9; 32]);
        alice.remember_contact_token("+4915187654321", &[9; 31]);
        let restored = Crypto::from_bytes(&alice.to_bytes().expect("bytes")).expect("restore");
        assert_eq!(restored.contact_token(), alice.contact_token());
        assert_eq!(restored.contact_token_of("+4915112345678"), Some([9; 32]));
        assert_eq!(restored.contact_token_of("+4915187654321"), None);
        assert_ne!(Crypto::new().contact_token(), alice.contact_token());
    }

    /// An upload of the contact token's hash that the server never confirmed (the connection
    /// broke, or the server refused it) is made again at the next session: the token counts as
    /// published only once the server said it holds it.
    #[test]
    fn an_unconfirmed_contact_token_is_published_again_at_the_next_session() {
        let device = DeviceId([3; 16]);
        let mut alice = Crypto::new();
        let hash = Sha256::digest(alice.contact_token()).to_vec();
        let upload = alice
            .keys_to_publish(device, KeySupply::default(), 1)
            .expect("keys");
        assert_eq!(upload.contact_token_hash, hash);
        // No `KeysUploadResult` came; the state was saved, and the next session opens it. The
        // server holds the identity keys (from an earlier upload) and enough one-time keys.
        let mut next = Crypto::from_bytes(&alice.to_bytes().expect("bytes")).expect("restore");
        let published = KeySupply {
            one_time_keys: REPLENISH_BELOW,
            published: true,
        };
        let again = next
            .keys_to_publish(device, published, 2)
            .expect("the contact token is published again");
        assert_eq!(again.contact_token_hash, hash);
        // Once confirmed, it is not.
        next.contact_token_hash_confirmed(&hash);
        let mut saved = Crypto::from_bytes(&next.to_bytes().expect("bytes")).expect("restore");
        assert!(saved.keys_to_publish(device, published, 3).is_none());
    }

    fn claim_from(crypto: &mut Crypto, device: DeviceId) -> frame::ClaimedKey {
        let upload = crypto
            .keys_to_publish(device, KeySupply::default(), 1)
            .expect("keys");
        frame::ClaimedKey {
            device_id: device.as_bytes().to_vec(),
            identity_key: upload.identity_key,
            signing_key: upload.signing_key,
            key: upload.one_time_keys.into_iter().next(),
            fallback: false,
            ..Default::default()
        }
    }

    #[test]
    fn a_session_round_trip_and_what_is_refused() {
        let (alice_device, bob_device) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let mut alice = Crypto::new();
        let mut bob = Crypto::new();
        let claimed = claim_from(&mut bob, bob_device);

        let mut forged = claimed.clone();
        if let Some(key) = forged.key.as_mut() {
            key.public_key[0] ^= 1;
        }
        assert!(matches!(
            alice.open_session("+1", &forged),
            Err(CryptoError::BadKeySignature(_))
        ));

        alice.open_session("+1", &claimed).expect("session");
        let first = alice.encrypt(bob_device, b"hello").expect("encrypt");
        let (plaintext, sender_key) = bob.decrypt(alice_device, &first).expect("decrypt");
        assert_eq!(&plaintext[..], b"hello");
        assert_eq!(sender_key, alice.identity_keys().0);
        // Replayed: the message key is used up.
        assert!(bob.decrypt(alice_device, &first).is_err());
        // Tampered.
        let mut tampered = alice.encrypt(bob_device, b"again").expect("encrypt");
        if let Some(byte) = tampered.ciphertext.last_mut() {
            *byte ^= 1;
        }
        assert!(bob.decrypt(alice_device, &tampered).is_err());
        // The state survives a round trip through bytes.
        let mut bob = Crypto::from_bytes(&bob.to_bytes().expect("bytes")).expect("restore");
        let reply = bob.encrypt(alice_device, b"hi").expect("reply");
        assert_eq!(
            &alice.decrypt(bob_device, &reply).expect("decrypt").0[..],
            b"hi"
        );
    }

    #[test]
    fn a_pre_key_message_for_a_key_this_device_does_not_have_is_refused() {
        let (alice_device, carol_device) = (DeviceId([1; 16]), DeviceId([3; 16]));
        let mut alice = Crypto::new();
        let mut bob = Crypto::new();
        let mut carol = Crypto::new();
        // Made with one of Carol's keys, delivered to Bob.
        let claimed = claim_from(&mut carol, carol_device);
        alice.open_session("+3", &claimed).expect("session");
        let first = alice.encrypt(carol_device, b"for carol").expect("encrypt");
        assert!(matches!(
            bob.decrypt(alice_device, &first),
            Err(CryptoError::Decrypt(_))
        ));
        // A normal message from a device without a session, and garbage, are refused too.
        let again = alice.encrypt(carol_device, b"again").expect("encrypt");
        let normal = Envelope {
            olm_type: 1,
            ciphertext: again.ciphertext,
        };
        assert!(bob.decrypt(DeviceId([9; 16]), &normal).is_err());
        let garbage = Envelope {
            olm_type: 0,
            ciphertext: vec![1, 2, 3],
        };
        assert!(matches!(
            bob.decrypt(alice_device, &garbage),
            Err(CryptoError::Malformed)
        ));
    }

    #[test]
    fn trust_on_first_use_then_changes_are_named() {
        let mut crypto = Crypto::new();
        assert_eq!(crypto.check_trust("+1", &[[1; 32]]), TrustCheck::FirstUse);
        assert_eq!(crypto.check_trust("+1", &[[1; 32]]), TrustCheck::Trusted);
        assert_eq!(
            crypto.check_trust("+1", &[[1; 32], [2; 32]]),
            TrustCheck::Changed(vec![[2; 32]])
        );
        crypto.trust("+1", &[[2; 32]]);
        assert_eq!(crypto.check_trust("+1", &[[2; 32]]), TrustCheck::Trusted);
    }

    #[test]
    fn a_new_device_vouched_for_by_a_trusted_one_is_accepted_and_no_other() {
        let (phone_id, laptop_id) = (DeviceId([1; 16]), DeviceId([2; 16]));
        let phone = Crypto::new();
        let laptop = Crypto::new();
        let stranger = Crypto::new();
        let mut contact = Crypto::new();
        let listed = |crypto: &Crypto, id: DeviceId, voucher: Option<(DeviceId, Vec<u8>)>| {
            let (identity_key, signing_key) = crypto.identity_keys();
            frame::DeviceKeys {
                device_id: id.as_bytes().to_vec(),
                identity_key: identity_key.to_vec(),
                signing_key: signing_key.to_vec(),
                voucher: voucher
                    .as_ref()
                    .map(|v| v.0.as_bytes().to_vec())
                    .unwrap_or_default(),
                voucher_signature: voucher.map(|v| v.1).unwrap_or_default(),
            }
        };
        let (laptop_identity, laptop_signing) = laptop.identity_keys();
        let signature = phone.vouch_for(laptop_id, &laptop_identity, &laptop_signing);
        contact.learn_device(phone_id, "+1", &listed(&phone, phone_id, None));
        contact.check_trust("+1", &[phone.identity_keys().0]);
        // Vouched for by the trusted phone: accepted.
        contact.learn_device(
            laptop_id,
            "+1",
            &listed(&laptop, laptop_id, Some((phone_id, signature.clone()))),
        );
        assert!(contact.accept_vouched("+1", &[laptop_identity]).is_empty());
        // The same signature over another device's keys, or by a key that is not trusted: not.
        let stranger_id = DeviceId([3; 16]);
        contact.learn_device(
            stranger_id,
            "+1",
            &listed(&stranger, stranger_id, Some((phone_id, signature))),
        );
        let stranger_key = stranger.identity_keys().0;
        assert_eq!(
            contact.accept_vouched("+1", &[stranger_key]),
            vec![stranger_key]
        );
        let (stranger_identity, stranger_signing) = stranger.identity_keys();
        let self_vouched = stranger.vouch_for(stranger_id, &stranger_identity, &stranger_signing);
        contact.learn_device(
            stranger_id,
            "+1",
            &listed(&stranger, stranger_id, Some((stranger_id, self_vouched))),
        );
        assert_eq!(
            contact.accept_vouched("+1", &[stranger_key]),
            vec![stranger_key]
        );
    }

    #[test]
    fn a_device_fingerprint_is_six_groups_of_four_and_differs_by_key() {
        let print = device_fingerprint(&[1; 32]);
        assert_eq!(print.len(), 6 * 4 + 5, "{print}");
        assert_eq!(print, device_fingerprint(&[1; 32]));
        assert_ne!(print, device_fingerprint(&[2; 32]));
    }

    #[test]
    fn safety_numbers_agree_on_both_sides_and_change_with_keys() {
        let alice = ("+491511", &[[1u8; 32]][..]);
        let bob = ("+491512", &[[2u8; 32], [3u8; 32]][..]);
        let number = safety_number(alice, bob);
        assert_eq!(number, safety_number(bob, alice));
        assert_eq!(number.replace(' ', "").len(), 60);
        assert_ne!(number, safety_number(alice, ("+491512", &[[2u8; 32]][..])));
    }
}
