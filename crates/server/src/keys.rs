//! The server's secrets: the OPRF key that turns numbers into pseudonyms and the key that hashes
//! verification codes. They live in one file outside the data directory, so that a copy of the
//! data directory alone cannot be tested against guessed numbers.

use std::path::Path;

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tidings_proto::number::E164;
use tidings_store::Pseudonym;
use voprf::{Ristretto255, VoprfServer};

const OPRF_INFO: &[u8] = b"tidings-oprf-v1";

#[derive(Serialize, Deserialize)]
struct KeyFile {
    oprf_seed: String,
    code_key: String,
}

/// The loaded secrets.
pub struct ServerKeys {
    oprf: VoprfServer<Ristretto255>,
    code_key: [u8; 32],
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
        Ok(Self { oprf, code_key })
    }

    /// The number's pseudonym: the RFC 9497 VOPRF output under the server key, first 32 bytes.
    /// The same value a client computes by blinding, so moving the blinding to the client later
    /// leaves every stored pseudonym valid.
    pub fn pseudonym(&self, number: &E164) -> anyhow::Result<Pseudonym> {
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
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.code_key)
            .unwrap_or_else(|_| unreachable!());
        mac.update(b"tidings-code-v1");
        mac.update(&pseudonym.0);
        mac.update(code.as_bytes());
        mac.finalize().into_bytes().into()
    }
}

/// Writes a file readable only by its owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
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
