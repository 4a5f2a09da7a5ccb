//! Encryption at rest: a key derived from the user's passphrase seals everything secret the
//! profile keeps (the Olm account, sessions, trusted keys, received messages).
//!
//! The key comes from Argon2id over the passphrase and a random salt; each sealed value is
//! XChaCha20-Poly1305 with a fresh random 24-byte nonce and the value's name as associated data,
//! so a sealed value cannot be moved to another slot unnoticed. No I/O here: the caller stores the
//! [`VaultHeader`] and the sealed bytes.

use argon2::{Algorithm, Argon2, Params, Version};
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// A passphrase, wiped from memory when dropped.
#[derive(Clone)]
pub struct Passphrase(Zeroizing<String>);

impl Passphrase {
    /// Takes a passphrase; a trailing newline (from a file or a prompt) is not part of it.
    pub fn new(text: impl Into<String>) -> Self {
        let mut text: String = text.into();
        while text.ends_with('\n') || text.ends_with('\r') {
            text.pop();
        }
        Self(Zeroizing::new(text))
    }

    fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Whether there is nothing in it.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

/// What is stored next to the sealed values: how to derive the key again, and a sealed check
/// value that tells a wrong passphrase from damaged data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultHeader {
    pub salt: Vec<u8>,
    /// Argon2id memory in KiB, iterations, lanes.
    pub memory_kib: u32,
    pub iterations: u32,
    pub lanes: u32,
    pub check: Vec<u8>,
}

/// Why the vault could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("wrong passphrase for this profile: try again (TIDINGS_PASSPHRASE, --passphrase-file or the prompt)")]
    WrongPassphrase,
    #[error("an encrypted value in the profile is damaged or was tampered with ({0})")]
    Damaged(&'static str),
    #[error("key derivation failed: {0}")]
    Kdf(String),
}

/// The derived key, wiped from memory when dropped.
#[derive(Clone)]
pub struct Vault {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(<key>)")
    }
}

const CHECK_NAME: &str = "vault-check";
const CHECK_VALUE: &[u8] = b"tidings-vault-v1";
const NONCE_LEN: usize = 24;

/// Argon2id with the parameters recommended for interactive logins (19 MiB, 2 passes, 1 lane):
/// every command pays this once, so it stays well under a second on a phone.
const DEFAULT_PARAMS: (u32, u32, u32) = (19 * 1024, 2, 1);

fn derive(passphrase: &Passphrase, header: &VaultHeader) -> Result<Vault, VaultError> {
    let params = Params::new(header.memory_kib, header.iterations, header.lanes, Some(32))
        .map_err(|e| VaultError::Kdf(e.to_string()))?;
    let mut key = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase.as_bytes(), &header.salt, key.as_mut())
        .map_err(|e| VaultError::Kdf(e.to_string()))?;
    let cipher = XChaCha20Poly1305::new_from_slice(key.as_ref())
        .map_err(|e| VaultError::Kdf(e.to_string()))?;
    Ok(Vault { cipher })
}

impl Vault {
    /// Makes a new vault for `passphrase`: a fresh salt, and the header to store.
    pub fn create(passphrase: &Passphrase) -> Result<(Vault, VaultHeader), VaultError> {
        let mut salt = vec![0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut salt);
        let (memory_kib, iterations, lanes) = DEFAULT_PARAMS;
        let mut header = VaultHeader {
            salt,
            memory_kib,
            iterations,
            lanes,
            check: Vec::new(),
        };
        let vault = derive(passphrase, &header)?;
        header.check = vault.seal(CHECK_NAME, CHECK_VALUE);
        Ok((vault, header))
    }

    /// Opens an existing vault; a wrong passphrase is told apart from damage.
    pub fn unlock(passphrase: &Passphrase, header: &VaultHeader) -> Result<Vault, VaultError> {
        let vault = derive(passphrase, header)?;
        match vault.open(CHECK_NAME, &header.check) {
            Ok(value) if value.as_slice() == CHECK_VALUE => Ok(vault),
            _ => Err(VaultError::WrongPassphrase),
        }
    }

    /// Seals `plaintext` under the name it is stored as.
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = nonce.to_vec();
        // Encryption with a valid key and a 24-byte nonce cannot fail; an empty result would
        // only make the value unreadable later, never leak it.
        let sealed = self
            .cipher
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plaintext,
                    aad: name.as_bytes(),
                },
            )
            .unwrap_or_default();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a value sealed under `name`.
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if sealed.len() < NONCE_LEN {
            return Err(VaultError::Damaged("too short"));
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce
            .try_into()
            .map_err(|_| VaultError::Damaged("too short"))?;
        self.cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: name.as_bytes(),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| VaultError::Damaged("authentication failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_and_every_way_to_fail() {
        let (vault, header) = Vault::create(&Passphrase::new("correct horse\n")).expect("create");
        let sealed = vault.seal("slot", b"secret");
        assert_eq!(&vault.open("slot", &sealed).expect("open")[..], b"secret");
        let again = Vault::unlock(&Passphrase::new("correct horse"), &header).expect("unlock");
        assert_eq!(&again.open("slot", &sealed).expect("open")[..], b"secret");
        let check = |result: Result<Zeroizing<Vec<u8>>, VaultError>| assert!(result.is_err());
        check(vault.open("other slot", &sealed));
        let mut tampered = sealed.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        check(vault.open("slot", &tampered));
        check(vault.open("slot", &sealed[..10]));
        assert!(matches!(
            Vault::unlock(&Passphrase::new("wrong"), &header),
            Err(VaultError::WrongPassphrase)
        ));
    }
}
