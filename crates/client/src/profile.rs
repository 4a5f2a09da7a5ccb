//! The profile: one directory per user of this machine, holding everything the device knows.
//!
//! - `profile.json`: the number, the server address and how to trust it, the device id;
//! - `device.key`: the Ed25519 login key, sealed under the passphrase (see [`crate::vault`]) and
//!   readable only by its owner;
//! - `resume.token`: the server's resumption token for the next connect, sealed the same way;
//! - `inbox.sqlite`: received messages (see [`crate::inbox`]).
//!
//! Files are written to a temporary name and renamed, so a crash leaves the old or the new
//! version, never half of one.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::vault::Vault;
use crate::{defaults, ClientError, Result};

/// How the client trusts the server's certificate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// A PEM file with the CA certificate(s) to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server's certificate (DER), as 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_sha256: Option<String>,
    /// Allow plain HTTP to a server that is not on this machine.
    #[serde(default)]
    pub insecure: bool,
}

/// How this profile routes messages (issue: SMS fallback). Stored in `profile.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Routing {
    /// `auto`, `ip-only`, `sms-only` or `queue-then-sms`. `auto` needs an SMS transport; without
    /// one, messages queue over IP.
    pub route: String,
    /// For `queue-then-sms`: seconds before an undelivered message is withdrawn and sent as SMS.
    pub fallback_after_seconds: u64,
    /// For `auto`: seconds to wait for the receipt of an accepted message before falling back.
    pub receipt_timeout_seconds: u64,
    /// Most SMS parts one fallback message may take.
    pub max_sms_parts: u8,
    /// The SMS transport for fallback, if any.
    pub sms: Option<tidings_gateway::TransportConfig>,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            route: defaults::ROUTE.into(),
            fallback_after_seconds: defaults::FALLBACK_AFTER_SECONDS,
            receipt_timeout_seconds: defaults::RECEIPT_TIMEOUT_SECONDS,
            max_sms_parts: defaults::MAX_SMS_PARTS,
            sms: None,
        }
    }
}

impl Routing {
    /// Sets the most SMS parts one fallback message may take: at least one, or nothing could
    /// ever be sent.
    pub fn set_max_sms_parts(&mut self, parts: u8) {
        self.max_sms_parts = parts.max(1);
    }
}

/// What `profile.json` holds.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileData {
    /// The user's own number, E.164.
    pub number: String,
    /// The server's base URL, `http://` or `https://`.
    pub server: String,
    /// How to trust the server.
    #[serde(default)]
    pub trust: Trust,
    /// The device id, once verified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// How messages are routed.
    #[serde(default)]
    pub routing: Routing,
    /// Who may see this device online.
    #[serde(default)]
    pub presence: ShowOnline,
    /// The server's OPRF public key, pinned at registration or link: every evaluation's proof
    /// is checked against it (see [`crate::discovery`]). `None` in a profile made before
    /// tidings/2, until it is first needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oprf_key: Option<PinnedKey>,
    /// The key pinned before the server's last rotation, kept while the server still evaluates
    /// under it: a contact not yet moved to the new key is found under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_oprf_key: Option<PinnedKey>,
}

/// Who may see this device online (`tidings settings --presence`). Sent to the server by every
/// listening session; the key it goes with is sealed in the local store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShowOnline {
    /// Those this device wrote to (they hold a presence token of it).
    #[default]
    Contacts,
    /// Everyone who knows the number.
    Everyone,
    /// Nobody.
    Nobody,
}

impl ShowOnline {
    /// The name used by the CLI and in `--json` output.
    pub fn as_str(self) -> &'static str {
        match self {
            ShowOnline::Contacts => "contacts",
            ShowOnline::Everyone => "everyone",
            ShowOnline::Nobody => "nobody",
        }
    }

    /// The mode named `name` ([`ShowOnline::as_str`]).
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Contacts, Self::Everyone, Self::Nobody]
            .into_iter()
            .find(|mode| mode.as_str() == name)
    }

    /// The mode as the wire has it.
    pub fn wire(self) -> tidings_proto::frame::PresenceMode {
        use tidings_proto::frame::PresenceMode;
        match self {
            ShowOnline::Contacts => PresenceMode::Contacts,
            ShowOnline::Everyone => PresenceMode::Everyone,
            ShowOnline::Nobody => PresenceMode::Nobody,
        }
    }
}

/// The server's discovery (OPRF) public key as the profile pinned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinnedKey {
    /// A ristretto255 point, 32 bytes, base64url.
    pub public_key: String,
    pub key_version: u32,
}

impl std::fmt::Debug for ProfileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileData")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    dir: PathBuf,
}

const DATA_FILE: &str = "profile.json";
const KEY_FILE: &str = "device.key";
/// What a sealed `device.key` starts with; an earlier version wrote the 32 key bytes alone.
const SEALED_KEY_MAGIC: &[u8] = b"tidings-sealed-device-key-v1\n";
/// The name the key is sealed under (the vault's associated data).
const SEALED_KEY_NAME: &str = "device-key";
const UNSEALED_KEY_LEN: usize = 32;
const RESUME_FILE: &str = "resume.token";
/// What a sealed `resume.token` starts with.
const SEALED_RESUME_MAGIC: &[u8] = b"tidings-sealed-resume-token-v1\n";
/// The name the resumption token is sealed under.
const SEALED_RESUME_NAME: &str = "resume-token";

fn io_error(path: &Path, e: std::io::Error) -> ClientError {
    ClientError::Profile(format!("{}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically, readable only by the owner.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(|e| io_error(&temp, e))?;
    file.write_all(bytes).map_err(|e| io_error(&temp, e))?;
    file.sync_all().map_err(|e| io_error(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| io_error(path, e))
}

impl Profile {
    /// The profile in `dir` (which need not exist yet). Opening touches nothing.
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The profile directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The stored data, or `None` for a profile that was never registered.
    pub fn load(&self) -> Result<Option<ProfileData>> {
        let path = self.dir.join(DATA_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ClientError::Profile(format!("{} is damaged: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Stores the data.
    pub fn save(&self, data: &ProfileData) -> Result<()> {
        self.ensure_dir()?;
        let bytes =
            serde_json::to_vec_pretty(data).map_err(|e| ClientError::Profile(e.to_string()))?;
        write_atomic(&self.dir.join(DATA_FILE), &bytes)
    }

    fn ensure_dir(&self) -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::create_dir_all(&self.dir).map_err(|e| io_error(&self.dir, e))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io_error(&self.dir, e))
    }

    /// The device's login key, sealed under the passphrase's key `vault`; made on this device
    /// the first time it is needed. A key an earlier version kept in clear is sealed in place
    /// (the registration stays as it is).
    pub fn device_key(&self, vault: &Vault) -> Result<SigningKey> {
        let path = self.dir.join(KEY_FILE);
        let damaged = || {
            ClientError::Profile(format!(
                "{} is damaged: remove this device with `tidings devices --remove <id>` from another one, or register again with a new --profile",
                path.display()
            ))
        };
        match std::fs::read(&path).map(Zeroizing::new) {
            Ok(bytes) => {
                if let Some(sealed) = bytes.strip_prefix(SEALED_KEY_MAGIC) {
                    let secret = vault.open(SEALED_KEY_NAME, sealed)?;
                    let secret = <[u8; 32]>::try_from(secret.as_slice()).map_err(|_| damaged())?;
                    return Ok(SigningKey::from_bytes(&secret));
                }
                if bytes.len() != UNSEALED_KEY_LEN {
                    return Err(damaged());
                }
                let secret = <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| damaged())?;
                let key = SigningKey::from_bytes(&secret);
                self.store_device_key(vault, &key)?;
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.ensure_dir()?;
                let key = SigningKey::generate(&mut rand::rngs::OsRng);
                self.store_device_key(vault, &key)?;
                Ok(key)
            }
            Err(e) => Err(io_error(&path, e)),
        }
    }

    /// Writes the login key sealed, replacing whatever `device.key` held.
    fn store_device_key(&self, vault: &Vault, key: &SigningKey) -> Result<()> {
        let mut bytes = SEALED_KEY_MAGIC.to_vec();
        bytes.extend_from_slice(&vault.seal(SEALED_KEY_NAME, key.as_bytes()));
        write_atomic(&self.dir.join(KEY_FILE), &bytes)
    }

    /// The resumption token the server gave at the last login, if one is kept and opens under
    /// `vault`. A missing, damaged or foreign one is `None`: the next connect logs in by
    /// challenge, as it would with a token the server refuses.
    pub fn resume_token(&self, vault: &Vault) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.dir.join(RESUME_FILE)).ok()?;
        let sealed = bytes.strip_prefix(SEALED_RESUME_MAGIC)?;
        let token = vault.open(SEALED_RESUME_NAME, sealed).ok()?;
        Some(token.to_vec())
    }

    /// Keeps `token` sealed for the next connect, replacing the one kept; an empty token (a
    /// server that issues none) removes it.
    pub fn store_resume_token(&self, vault: &Vault, token: &[u8]) -> Result<()> {
        let path = self.dir.join(RESUME_FILE);
        if token.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&path, e)),
                _ => Ok(()),
            };
        }
        let mut bytes = SEALED_RESUME_MAGIC.to_vec();
        bytes.extend_from_slice(&vault.seal(SEALED_RESUME_NAME, token));
        write_atomic(&path, &bytes)
    }

    /// Forgets the registration, the device key and the resumption token (after opting out).
    pub fn forget_registration(&self) -> Result<()> {
        for name in [DATA_FILE, KEY_FILE, RESUME_FILE] {
            let path = self.dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_error(&path, e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vault::Passphrase;

    #[test]
    fn the_device_key_is_sealed_opens_only_with_its_vault_and_an_unsealed_one_is_sealed_in_place() {
        let dir = std::env::temp_dir().join(format!("tidings-profile-key-{}", std::process::id()));
        let profile = Profile::at(&dir);
        let (vault, _) = Vault::create(&Passphrase::new("right")).expect("vault");
        let (other, _) = Vault::create(&Passphrase::new("wrong")).expect("vault");
        let path = dir.join(KEY_FILE);

        let made = profile.device_key(&vault).expect("made");
        let on_disk = std::fs::read(&path).expect("read");
        assert!(!on_disk.windows(32).any(|w| w == made.as_bytes()));
        assert_eq!(
            profile.device_key(&vault).expect("again").as_bytes(),
            made.as_bytes()
        );
        assert!(matches!(
            profile.device_key(&other),
            Err(ClientError::Vault(_))
        ));

        // As an earlier version kept it: 32 bytes in clear.
        let old = SigningKey::from_bytes(&[5; 32]);
        std::fs::write(&path, old.as_bytes()).expect("write");
        assert_eq!(
            profile.device_key(&vault).expect("migrated").as_bytes(),
            old.as_bytes()
        );
        let on_disk = std::fs::read(&path).expect("read");
        assert!(on_disk.starts_with(SEALED_KEY_MAGIC));
        assert!(!on_disk.windows(32).any(|w| w == old.as_bytes()));
        assert_eq!(
            profile.device_key(&vault).expect("sealed").as_bytes(),
            old.as_bytes()
        );

        for damaged in [&b"short"[..], &[0u8; 33][..]] {
            std::fs::write(&path, damaged).expect("write");
            assert!(matches!(
                profile.device_key(&vault),
                Err(ClientError::Profile(_))
            ));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The resumption token is kept sealed, opens only under its vault, and an empty one
    /// removes it.
    #[test]
    fn the_resumption_token_is_sealed_and_replaced() {
        let dir =
            std::env::temp_dir().join(format!("tidings-profile-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let profile = Profile::at(&dir);
        let (vault, _) = Vault::create(&Passphrase::new("right")).expect("vault");
        let (other, _) = Vault::create(&Passphrase::new("wrong")).expect("vault");
        assert_eq!(profile.resume_token(&vault), None);
        profile.ensure_dir().expect("dir");
        let token = [0x5a; 73];
        profile.store_resume_token(&vault, &token).expect("store");
        let on_disk = std::fs::read(dir.join(RESUME_FILE)).expect("read");
        assert!(!on_disk.windows(16).any(|w| w == &token[..16]));
        assert_eq!(profile.resume_token(&vault).as_deref(), Some(&token[..]));
        assert_eq!(profile.resume_token(&other), None);
        profile.store_resume_token(&vault, &[]).expect("remove");
        assert_eq!(profile.resume_token(&vault), None);
        profile
            .store_resume_token(&vault, &[])
            .expect("nothing to remove");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_message_may_always_take_at_least_one_sms_part() {
        let mut routing = Routing::default();
        assert_eq!(routing.max_sms_parts, defaults::MAX_SMS_PARTS);
        for (asked, kept) in [(0, 1), (1, 1), (3, 3), (255, 255)] {
            routing.set_max_sms_parts(asked);
            assert_eq!(routing.max_sms_parts, kept, "{asked}");
        }
    }
}
