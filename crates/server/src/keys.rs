//! The server's secrets: the OPRF key that turns numbers into pseudonyms, the key that hashes
//! verification codes and the key that seals resumption tokens. They live in one file outside the
//! data directory, so that a copy of the data directory alone can neither be tested against
//! guessed numbers nor make a token that logs a device in.

use std::path::Path;

use anyhow::Context as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tidings_core::oprf::OprfKey;
pub use tidings_core::oprf::{EvaluateError, Evaluated};
use tidings_proto::number::E164;
use tidings_store::Pseudonym;
use voprf::{Ristretto255, VoprfServer};

const OPRF_INFO: &[u8] = b"tidings-oprf-v1";
/// The version of the OPRF key in use. One key so far: the version lets a client tell, in
/// `Verified`, `Linked`, `GET /v1/oprf-key` and every `EvaluateResult`, which key it pinned.
pub const OPRF_KEY_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct KeyFile {
    oprf_seed: String,
    code_key: String,
    /// Added with resumption tokens: a key file written before has none, and gets one at its
    /// next load ([`ServerKeys::load_or_create`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_key: Option<String>,
}

/// The key file's name for the resumption key.
const RESUME_KEY_FIELD: &str = "resume_key";

/// The loaded secrets.
pub struct ServerKeys {
    oprf: VoprfServer<Ristretto255>,
    /// The OPRF key as the batch evaluation uses it ([`ServerKeys::evaluate_blinded`]).
    oprf_key: OprfKey,
    code_key: [u8; 32],
    /// The MAC key of resumption tokens ([`crate::resume`]); the same on every node that shares
    /// the key file.
    resume_key: [u8; 32],
}

impl std::fmt::Debug for ServerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerKeys(<secret>)")
    }
}

impl ServerKeys {
    /// Loads the key file, creating it (mode 0600) with fresh random keys if it does not exist.
    /// A key file without a resumption key (written before there was one) gets one, written
    /// back in place with every other field kept as it was.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            let mut seed = [0u8; 32];
            let mut code_key = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            rand::rngs::OsRng.fill_bytes(&mut code_key);
            let file = KeyFile {
                oprf_seed: tidings_proto::id::to_text(&seed),
                code_key: tidings_proto::id::to_text(&code_key),
                resume_key: Some(tidings_proto::id::to_text(&random_key())),
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
        let resume_key = match &file.resume_key {
            Some(text) => tidings_proto::id::from_text(text)
                .and_then(|key| <[u8; 32]>::try_from(key.as_slice()).ok())
                .context("key file: resume_key must be 32 bytes of base64url")?,
            None => add_resume_key(path, &text)?,
        };
        let oprf = VoprfServer::<Ristretto255>::new_from_seed(&seed, OPRF_INFO)
            .map_err(|e| anyhow::anyhow!("key file: oprf_seed is unusable: {e:?}"))?;
        let oprf_key = OprfKey::new(&oprf).context("key file: oprf_seed gives no usable scalar")?;
        Ok(Self {
            oprf,
            oprf_key,
            code_key,
            resume_key,
        })
    }

    /// The number's pseudonym: the RFC 9497 VOPRF output under the server key, first 32 bytes.
    /// The same value a client computes by blinding the number, having `Evaluate` evaluate it
    /// and unblinding: only the HTTP registration requests, which carry the registrant's own
    /// number, compute it here.
    pub fn pseudonym(&self, number: &E164) -> anyhow::Result<Pseudonym> {
        let output = self
            .oprf
            .evaluate(number.as_str().as_bytes())
            .map_err(|e| anyhow::anyhow!("OPRF failed: {e:?}"))?;
        let mut pseudonym = [0u8; 32];
        pseudonym.copy_from_slice(&output[..32]);
        Ok(Pseudonym(pseudonym))
    }

    /// The OPRF public key (a compressed ristretto255 point), which clients pin and check every
    /// evaluation's proof against.
    pub fn oprf_public_key(&self) -> [u8; 32] {
        self.oprf_key.public_key()
    }

    /// Evaluates blinded elements with one batch proof ([`OprfKey::evaluate_blinded`]): each
    /// element is checked first (32 bytes, a valid point, not the identity); a bad one names its
    /// place and nothing is evaluated. About one scalar multiplication per element plus the
    /// proof's: run it on the blocking pool.
    pub fn evaluate_blinded(&self, blinded: &[Vec<u8>]) -> Result<Evaluated, EvaluateError> {
        self.oprf_key
            .evaluate_blinded(blinded, &mut rand::rngs::OsRng)
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

    /// The MAC of a resumption token's body: HMAC-SHA256 under the resumption key.
    pub fn resume_mac(&self, body: &[u8]) -> [u8; 32] {
        resume_hmac(&self.resume_key, body)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `mac` is the MAC of `body` ([`ServerKeys::resume_mac`]), compared in constant
    /// time.
    pub fn resume_mac_holds(&self, body: &[u8], mac: &[u8]) -> bool {
        resume_hmac(&self.resume_key, body)
            .verify_slice(mac)
            .is_ok()
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

/// HMAC-SHA256 under the resumption key, fed the token body.
fn resume_hmac(key: &[u8; 32], body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(b"tidings-resume-v1");
    mac.update(body);
    mac
}

fn random_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key
}

/// Adds a fresh resumption key to the key file read as `text`, keeping every other field as it
/// is (fields this version does not know included), and replaces the file atomically.
fn add_resume_key(path: &Path, text: &str) -> anyhow::Result<[u8; 32]> {
    let key = random_key();
    let mut table: toml::Table =
        toml::from_str(text).with_context(|| format!("key file {} is damaged", path.display()))?;
    table.insert(
        RESUME_KEY_FIELD.into(),
        toml::Value::String(tidings_proto::id::to_text(&key)),
    );
    let text = toml::to_string(&table).context("cannot encode the key file")?;
    let temp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&temp);
    write_private(&temp, text.as_bytes())?;
    std::fs::rename(&temp, path)
        .with_context(|| format!("cannot replace key file {}", path.display()))?;
    tracing::info!(path = %path.display(), "added a resumption key to the server key file; back it up");
    Ok(key)
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
        keys_named(name)
    }

    fn keys_named(name: &str) -> ServerKeys {
        let dir = std::env::temp_dir().join(format!("tidings-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = ServerKeys::load_or_create(&dir.join("keys.toml")).expect("keys");
        let _ = std::fs::remove_dir_all(&dir);
        keys
    }

    /// A key file written before resumption tokens loads with the same OPRF and code keys, and
    /// gets a resumption key that the next load reads back, every other field kept.
    #[test]
    fn a_key_file_without_a_resumption_key_gets_one_and_keeps_the_rest() {
        let dir = std::env::temp_dir().join(format!("tidings-keys-old-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("keys.toml");
        let seed = tidings_proto::id::to_text(&[7u8; 32]);
        let code = tidings_proto::id::to_text(&[9u8; 32]);
        let old = format!("oprf_seed = \"{seed}\"\ncode_key = \"{code}\"\nfuture_field = 3\n");
        std::fs::write(&path, &old).expect("write");
        let first = ServerKeys::load_or_create(&path).expect("old file loads");
        let again = ServerKeys::load_or_create(&path).expect("new file loads");
        let text = std::fs::read_to_string(&path).expect("read");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(first.resume_key, again.resume_key, "the added key is kept");
        assert_eq!(first.code_key, [9u8; 32]);
        assert_eq!(first.oprf_public_key(), again.oprf_public_key());
        assert!(text.contains(&seed) && text.contains(&code) && text.contains("future_field"));
        assert!(first.resume_mac_holds(b"body", &first.resume_mac(b"body")));
        assert!(!first.resume_mac_holds(b"other", &first.resume_mac(b"body")));
    }

    /// The pseudonym the server computes from a number equals what a client gets by blinding,
    /// having the server evaluate, checking the proof and unblinding; a bad element is refused
    /// with its place, and a proof under another key does not verify.
    #[test]
    fn a_blinded_evaluation_gives_the_servers_pseudonym() {
        use voprf::{EvaluationElement, Group as _, Proof, VoprfClient};
        let keys = keys("blind");
        let other = keys_named("other");
        let numbers = ["+14155550101", "+14155550102"];
        let blinds: Vec<_> = numbers
            .iter()
            .map(|n| {
                VoprfClient::<Ristretto255>::blind(n.as_bytes(), &mut rand::rngs::OsRng)
                    .expect("blind")
            })
            .collect();
        let blinded: Vec<Vec<u8>> = blinds
            .iter()
            .map(|b| b.message.serialize().to_vec())
            .collect();
        let evaluated = keys.evaluate_blinded(&blinded).expect("evaluated");
        let messages: Vec<_> = evaluated
            .elements
            .iter()
            .map(|e| EvaluationElement::<Ristretto255>::deserialize(e).expect("element"))
            .collect();
        let proof = Proof::<Ristretto255>::deserialize(&evaluated.proof).expect("proof");
        let clients: Vec<_> = blinds.iter().map(|b| b.state.clone()).collect();
        let inputs: Vec<&[u8]> = numbers.iter().map(|n| n.as_bytes()).collect();
        let public = |keys: &ServerKeys| {
            Ristretto255::deserialize_elem(&keys.oprf_public_key()).expect("public key")
        };
        let outputs: Vec<_> =
            VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, public(&keys))
                .expect("the proof verifies")
                .collect::<Result<_, _>>()
                .expect("outputs");
        for (number, output) in numbers.iter().zip(outputs) {
            let expected = keys
                .pseudonym(&E164::parse(number).expect("number"))
                .expect("pseudonym");
            assert_eq!(&output[..32], &expected.0[..]);
        }
        assert!(
            VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, public(&other))
                .is_err(),
            "a proof checked against another key must fail"
        );
        let check = |blinded: Vec<Vec<u8>>, expected: EvaluateError| {
            assert_eq!(
                keys.evaluate_blinded(&blinded).expect_err("refused"),
                expected
            );
        };
        check(
            vec![blinded[0].clone(), vec![1; 31]],
            EvaluateError::WrongLength(1),
        );
        check(vec![vec![1; 33]], EvaluateError::WrongLength(0));
        check(vec![vec![0; 32]], EvaluateError::NotAnElement(0));
        check(vec![vec![0xff; 32]], EvaluateError::NotAnElement(0));
    }
}
