//! The server's secrets: the OPRF key that turns numbers into pseudonyms and the key that hashes
//! verification codes. They live in one file outside the data directory, so that a copy of the
//! data directory alone cannot be tested against guessed numbers.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tidings_proto::number::E164;
use tidings_store::Pseudonym;
use voprf::{Ristretto255, VoprfServer};

const OPRF_INFO: &[u8] = b"tidings-oprf-v1";
/// Pseudonyms kept by [`PseudonymCache`]; past this the cache starts again empty.
const CACHE_ENTRIES: usize = 100_000;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    oprf_seed: String,
    code_key: String,
}

/// The loaded secrets.
pub struct ServerKeys {
    oprf: VoprfServer<Ristretto255>,
    code_key: [u8; 32],
    cache: PseudonymCache,
}

/// Pseudonyms computed recently, so that a number sent to or looked up again costs a keyed hash
/// (about 1 µs) instead of an OPRF evaluation (tens of µs). Entries are keyed by HMAC-SHA256 of
/// the number under a key drawn at start and never stored, so the cache holds no number; it lives
/// in memory only, is bounded, and holds nothing the OPRF key beside it could not recompute. It
/// holds no account state either: a pseudonym is a fixed function of the number, so opt-out and
/// re-registration are unaffected.
struct PseudonymCache {
    key: [u8; 32],
    entries: Mutex<HashMap<[u8; 32], Pseudonym>>,
}

impl PseudonymCache {
    fn new() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Self {
            key,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The entry for a number as the client wrote it (parsed or not: the pseudonym is a
    /// function of the text either way).
    fn slot(&self, text: &str) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(text.as_bytes());
        mac.finalize().into_bytes().into()
    }

    fn get(&self, slot: &[u8; 32]) -> Option<Pseudonym> {
        self.entries.lock().ok()?.get(slot).copied()
    }

    fn put(&self, slot: [u8; 32], pseudonym: Pseudonym) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= CACHE_ENTRIES {
                *entries = HashMap::new();
            }
            entries.insert(slot, pseudonym);
        }
    }
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKeys(<secret>)")
    }
}

impl ServerKeys {
    /// Loads the key file, creating it (mode 0600) with fresh random keys if it does not exist.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            let mut seed = [0u8; 32];
            let mut code_key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            rand::rngs::OsRng.fill_bytes(&mut code_key);
            let file = KeyFile {
                oprf_seed: tidings_proto::id::to_text(&seed),
                code_key: tidings_proto::id::to_text(&code_key),
            };
            let text = toml::to_string(&file).context("cannot encode the key file")?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_private(path, text.as_bytes())?;
            tracing::info!(path = %path.display(), "created a new server key file; back it up");
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read key file {}", path.display()))?;
        let file: KeyFile = toml::from_str(&text)
            .with_context(|| format!("key file {} is damaged", path.display()))?;
        let seed = tidings_proto::id::from_text(&file.oprf_seed)
            .context("key file: oprf_seed is not base64url")?;
        let code_key = tidings_proto::id::from_text(&file.code_key)
            .and_then(|key| <[u8; 32]>::try_from(key.as_slice()).ok())
            .context("key file: code_key must be 32 bytes of base64url")?;
        let oprf = VoprfServer::<Ristretto255>::new_from_seed(&seed, OPRF_INFO)
            .map_err(|e| anyhow::anyhow!("key file: oprf_seed is unusable: {e:?}"))?;
        Ok(Self {
            oprf,
            code_key,
            cache: PseudonymCache::new(),
        })
    }

    /// The number's pseudonym: the RFC 9497 VOPRF output under the server key, first 32 bytes.
    /// The same value a client computes by blinding, so moving the blinding to the client later
    /// leaves every stored pseudonym valid.
    pub fn pseudonym(&self, number: &E164) -> anyhow::Result<Pseudonym> {
        let slot = self.cache.slot(number.as_str());
        if let Some(pseudonym) = self.cache.get(&slot) {
            return Ok(pseudonym);
        }
        let pseudonym = self.evaluate(number)?;
        self.cache.put(slot, pseudonym);
        Ok(pseudonym)
    }

    /// The pseudonym of a number as a client wrote it, `None` if it is not a valid number. A
    /// number seen recently costs neither the parse nor the OPRF evaluation.
    pub fn pseudonym_of(&self, text: &str) -> anyhow::Result<Option<Pseudonym>> {
        let slot = self.cache.slot(text);
        if let Some(pseudonym) = self.cache.get(&slot) {
            return Ok(Some(pseudonym));
        }
        let Ok(number) = E164::parse(text) else {
            return Ok(None);
        };
        let pseudonym = self.evaluate(&number)?;
        self.cache.put(slot, pseudonym);
        Ok(Some(pseudonym))
    }

    fn evaluate(&self, number: &E164) -> anyhow::Result<Pseudonym> {
        let output = self
            .oprf
            .evaluate(number.as_str().as_bytes())
            .map_err(|e| anyhow::anyhow!("OPRF failed: {e:?}"))?;
        let mut pseudonym = [0u8; 32];
        pseudonym.copy_from_slice(&output[..32]);
        Ok(Pseudonym(pseudonym))
    }

    /// The keyed hash a code is stored as.
    pub fn code_hash(&self, pseudonym: &Pseudonym, code: &str) -> [u8; 32] {
        self.keyed_hash(b"tidings-code-v1", &[&pseudonym.0, code.as_bytes()])
    }

    /// What an account's budgets are kept under in memory: a keyed hash of its pseudonym, the
    /// same for every device of the number and for every registration of it.
    pub fn budget_key(&self, pseudonym: &Pseudonym) -> BudgetKey {
        BudgetKey(self.keyed_hash(b"tidings-budget-v1", &[&pseudonym.0]))
    }

    /// HMAC-SHA256 under the code key of `label` then `parts`.
    fn keyed_hash(&self, label: &[u8], parts: &[&[u8]]) -> [u8; 32] {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.code_key)
            .unwrap_or_else(|_| unreachable!());
        mac.update(label);
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

/// Whose budgets a request draws from: its account's, named by a keyed hash of the account's
/// pseudonym ([`ServerKeys::budget_key`]). A new device of the number, or an opt-out and a new
/// registration of it, finds the same budgets; they live in memory only, so nothing of an
/// opted-out account is left in storage.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BudgetKey([u8; 32]);

impl std::fmt::Debug for BudgetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetKey(<redacted>)")
    }
}

/// Writes a file readable only by its owner.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> ServerKeys {
        let dir = std::env::temp_dir().join(format!("tidings-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = ServerKeys::load_or_create(&dir.join("keys.toml")).expect("keys");
        let _ = std::fs::remove_dir_all(&dir);
        keys
    }

    #[test]
    fn cached_pseudonyms_equal_fresh_evaluations() {
        let keys = keys("cache");
        let alice = E164::parse("+14155550101").expect("number");
        let bob = E164::parse("+14155550102").expect("number");
        let first = keys.pseudonym(&alice).expect("pseudonym");
        assert_eq!(keys.cache.entries.lock().expect("lock").len(), 1);
        // From the cache now, and the same as an evaluation that bypasses it.
        assert_eq!(keys.pseudonym(&alice).expect("pseudonym"), first);
        let fresh = keys
            .oprf
            .evaluate(alice.as_str().as_bytes())
            .expect("evaluate");
        assert_eq!(&fresh[..32], &first.0[..]);
        assert_ne!(keys.pseudonym(&bob).expect("pseudonym"), first);
        assert_eq!(keys.cache.entries.lock().expect("lock").len(), 2);
        // As a client may write it: the same pseudonym, then from the cache.
        for _ in 0..2 {
            let written = keys.pseudonym_of(" +1 415-555-0101").expect("pseudonym");
            assert_eq!(written, Some(first));
        }
        assert_eq!(keys.pseudonym_of("+1 555").expect("no pseudonym"), None);
        assert_eq!(keys.cache.entries.lock().expect("lock").len(), 3);
    }

    #[test]
    fn a_full_cache_starts_again_empty() {
        let keys = keys("bound");
        for i in 0..CACHE_ENTRIES as u64 {
            let mut slot = [0; 32];
            slot[..8].copy_from_slice(&i.to_le_bytes());
            keys.cache.put(slot, Pseudonym([0; 32]));
        }
        assert_eq!(
            keys.cache.entries.lock().expect("lock").len(),
            CACHE_ENTRIES
        );
        keys.cache.put([0xff; 32], Pseudonym([1; 32]));
        assert_eq!(keys.cache.entries.lock().expect("lock").len(), 1);
        assert_eq!(keys.cache.get(&[0xff; 32]), Some(Pseudonym([1; 32])));
    }
}
