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
/// The version of the first OPRF key, and of a key file written before keys had versions. A
/// rotation ([`rotate_oprf_key`]) gives the new key the next version.
pub const FIRST_OPRF_KEY_VERSION: u32 = 1;

fn first_version() -> u32 {
    FIRST_OPRF_KEY_VERSION
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    oprf_seed: String,
    #[serde(default = "first_version")]
    oprf_key_version: u32,
    /// The key before the last rotation, kept until it is retired ([`retire_oprf_key`]):
    /// accounts not yet moved to the current key are still found under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_oprf_seed: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_oprf_key_version: Option<u32>,
    code_key: String,
    /// Added with resumption tokens: a key file written before has none, and gets one at its
    /// next load ([`ServerKeys::load_or_create`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resume_key: Option<String>,
}

/// One OPRF key with its version.
struct VersionedKey {
    version: u32,
    oprf: VoprfServer<Ristretto255>,
    /// The OPRF key as the batch evaluation uses it ([`ServerKeys::evaluate_blinded`]).
    key: OprfKey,
}

impl VersionedKey {
    fn from_seed(seed_text: &str, version: u32, field: &str) -> anyhow::Result<Self> {
        let seed = tidings_proto::id::from_text(seed_text)
            .with_context(|| format!("key file: {field} is not base64url"))?;
        let oprf = VoprfServer::<Ristretto255>::new_from_seed(&seed, OPRF_INFO)
            .map_err(|e| anyhow::anyhow!("key file: {field} is unusable: {e:?}"))?;
        let key = OprfKey::new(&oprf)
            .with_context(|| format!("key file: {field} gives no usable scalar"))?;
        Ok(Self { version, oprf, key })
    }

    fn pseudonym(&self, number: &E164) -> anyhow::Result<Pseudonym> {
        let output = self
            .oprf
            .evaluate(number.as_str().as_bytes())
            .map_err(|e| anyhow::anyhow!("OPRF failed: {e:?}"))?;
        let mut pseudonym = [0u8; 32];
        pseudonym.copy_from_slice(&output[..32]);
        Ok(Pseudonym(pseudonym))
    }
}

/// The key file's name for the resumption key.
const RESUME_KEY_FIELD: &str = "resume_key";

/// The loaded secrets.
pub struct ServerKeys {
    current: VersionedKey,
    /// The key before the last rotation, while it is held.
    previous: Option<VersionedKey>,
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

fn fresh_secret() -> String {
    let mut secret = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut secret);
    tidings_proto::id::to_text(&secret)
}

fn read_key_file(path: &Path) -> anyhow::Result<KeyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("key file {} is damaged", path.display()))
}

impl ServerKeys {
    /// Loads the key file, creating it (mode 0600) with fresh random keys if it does not exist.
    /// A key file without a resumption key (written before there was one) gets one, written
    /// back in place with every other field kept as it was.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            let file = KeyFile {
                oprf_seed: fresh_secret(),
                oprf_key_version: FIRST_OPRF_KEY_VERSION,
                previous_oprf_seed: None,
                previous_oprf_key_version: None,
                code_key: fresh_secret(),
                resume_key: Some(fresh_secret()),
            };
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create {}", parent.display()))?;
            }
            write_key_file(path, &file, false)?;
            tracing::info!(path = %path.display(), "created a new server key file; back it up");
        }
        let file = read_key_file(path)?;
        let code_key = tidings_proto::id::from_text(&file.code_key)
            .and_then(|key| <[u8; 32]>::try_from(key.as_slice()).ok())
            .context("key file: code_key must be 32 bytes of base64url")?;
        if file.oprf_key_version == 0 {
            anyhow::bail!("key file: oprf_key_version must be 1 or more");
        }
        let current = VersionedKey::from_seed(&file.oprf_seed, file.oprf_key_version, "oprf_seed")?;
        let previous = match (file.previous_oprf_seed, file.previous_oprf_key_version) {
            (None, None) => None,
            (Some(seed), Some(version)) if version != 0 && version != file.oprf_key_version => {
                Some(VersionedKey::from_seed(&seed, version, "previous_oprf_seed")?)
            }
            _ => anyhow::bail!(
                "key file: previous_oprf_seed and previous_oprf_key_version go together, with a version other than oprf_key_version"
            ),
        };
        let resume_key = match &file.resume_key {
            Some(text) => tidings_proto::id::from_text(text)
                .and_then(|key| <[u8; 32]>::try_from(key.as_slice()).ok())
                .context("key file: resume_key must be 32 bytes of base64url")?,
            None => add_resume_key(path)?,
        };
        Ok(Self {
            current,
            previous,
            code_key,
            resume_key,
        })
    }

    /// The version of the key the server evaluates with now.
    pub fn current_version(&self) -> u32 {
        self.current.version
    }

    /// The version of the previous key, while it is held.
    pub fn previous_version(&self) -> Option<u32> {
        self.previous.as_ref().map(|k| k.version)
    }

    /// The key of `version` (0: the current one), if the server holds it.
    fn key(&self, version: u32) -> Option<&VersionedKey> {
        if version == 0 || version == self.current.version {
            return Some(&self.current);
        }
        self.previous.as_ref().filter(|k| k.version == version)
    }

    /// The number's pseudonym: the RFC 9497 VOPRF output under the current key, first 32 bytes.
    /// The same value a client computes by blinding the number, having `Evaluate` evaluate it
    /// and unblinding: only the HTTP registration requests and `Rekey`, which carry the
    /// registrant's own number, compute it here.
    pub fn pseudonym(&self, number: &E164) -> anyhow::Result<Pseudonym> {
        self.current.pseudonym(number)
    }

    /// The number's pseudonym under the key of `version` (0: the current one); `None` if the
    /// server does not hold that key.
    pub fn pseudonym_under(
        &self,
        version: u32,
        number: &E164,
    ) -> Option<anyhow::Result<Pseudonym>> {
        self.key(version).map(|key| key.pseudonym(number))
    }

    /// The current OPRF public key (a compressed ristretto255 point), which clients pin and check
    /// every evaluation's proof against.
    pub fn oprf_public_key(&self) -> [u8; 32] {
        self.current.key.public_key()
    }

    /// The previous key's version and public key, while it is held.
    pub fn previous_public_key(&self) -> Option<(u32, [u8; 32])> {
        self.previous
            .as_ref()
            .map(|k| (k.version, k.key.public_key()))
    }

    /// Evaluates blinded elements under the key of `version` (0: the current one) with one batch
    /// proof ([`OprfKey::evaluate_blinded`]): each element is checked first (32 bytes, a valid
    /// point, not the identity); a bad one names its place and nothing is evaluated. `None` if
    /// the server does not hold that key. About one scalar multiplication per element plus the
    /// proof's: run it on the blocking pool.
    pub fn evaluate_blinded(
        &self,
        version: u32,
        blinded: &[Vec<u8>],
    ) -> Option<Result<Evaluated, EvaluateError>> {
        self.key(version)
            .map(|key| key.key.evaluate_blinded(blinded, &mut rand::rngs::OsRng))
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

    /// The key the registration limits hash numbers under ([`crate::abuse::AbuseLimits`]): the
    /// same on every node, so that the limits of one number meet at one node.
    pub fn abuse_hash_key(&self) -> [u8; 32] {
        self.keyed_hash(b"tidings-abuse-hash-key-v1", &[])
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

impl BudgetKey {
    /// The key's bytes, as a budget question to its owner node carries them ([`crate::budget`]).
    pub fn to_bytes(self) -> [u8; 32] {
        self.0
    }

    /// A key as a budget question carried it.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl std::fmt::Debug for BudgetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BudgetKey(<redacted>)")
    }
}

/// `tidings server rotate-oprf-key`: the current OPRF key becomes the previous one and a fresh
/// key with the next version becomes current. Refused while a previous key is still held. The
/// file is replaced atomically (a new file of mode 0600 renamed over it). Returns the new
/// version; the server uses it from its next start.
pub fn rotate_oprf_key(path: &Path) -> anyhow::Result<u32> {
    let mut file = read_key_file(path)?;
    if let Some(previous) = file.previous_oprf_key_version {
        anyhow::bail!(
            "the key file still holds the previous OPRF key (version {previous}): retire the previous key first (tidings server retire-oprf-key), once no account is left on it"
        );
    }
    let version = file
        .oprf_key_version
        .checked_add(1)
        .context("key file: oprf_key_version cannot grow further")?;
    file.previous_oprf_seed = Some(std::mem::replace(&mut file.oprf_seed, fresh_secret()));
    file.previous_oprf_key_version = Some(file.oprf_key_version);
    file.oprf_key_version = version;
    write_key_file(path, &file, true)?;
    Ok(version)
}

/// `tidings server retire-oprf-key`: drops the previous OPRF key. Returns its version, or `None`
/// if none was held. The server uses the file from its next start.
pub fn retire_oprf_key(path: &Path) -> anyhow::Result<Option<u32>> {
    let mut file = read_key_file(path)?;
    let retired = file.previous_oprf_key_version.take();
    if file.previous_oprf_seed.take().is_none() && retired.is_none() {
        return Ok(None);
    }
    write_key_file(path, &file, true)?;
    Ok(retired)
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

/// Adds a fresh resumption key to the key file at `path`, keeping every other field as it
/// is (fields this version does not know included), and replaces the file atomically.
fn add_resume_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let key = random_key();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read key file {}", path.display()))?;
    let mut table: toml::Table =
        toml::from_str(&text).with_context(|| format!("key file {} is damaged", path.display()))?;
    table.insert(
        RESUME_KEY_FIELD.into(),
        toml::Value::String(tidings_proto::id::to_text(&key)),
    );
    let text = toml::to_string(&table).context("cannot encode the key file")?;
    write_key_text(path, &text, true)?;
    tracing::info!(path = %path.display(), "added a resumption key to the server key file; back it up");
    Ok(key)
}

/// Writes the key file readable only by its owner: created new, or (`replace`) written to a new
/// file beside it and renamed over it, so that a crash leaves either the old file or the new one.
fn write_key_file(path: &Path, file: &KeyFile, replace: bool) -> anyhow::Result<()> {
    let text = toml::to_string(file).context("cannot encode the key file")?;
    write_key_text(path, &text, replace)
}

/// [`write_key_file`] of a key file already encoded.
fn write_key_text(path: &Path, text: &str, replace: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let target = if replace {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".new");
        path.with_file_name(name)
    } else {
        path.to_path_buf()
    };
    if replace {
        // Left by a write that failed half-way: it never replaced the file.
        let _ = std::fs::remove_file(&target);
    }
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&target)
        .with_context(|| format!("cannot create {}", target.display()))?;
    out.write_all(text.as_bytes())?;
    out.sync_all()?;
    if replace {
        std::fs::rename(&target, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::File::open(parent).and_then(|dir| dir.sync_all())?;
        }
    }
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
        let evaluated = keys
            .evaluate_blinded(0, &blinded)
            .expect("the current key")
            .expect("evaluated");
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
                keys.evaluate_blinded(1, &blinded)
                    .expect("version 1")
                    .expect_err("refused"),
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

    fn key_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("tidings-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    /// A key file written before keys had versions loads as version 1 with no previous key;
    /// rotating keeps the old key as the previous one (pseudonyms under it unchanged), gives the
    /// new one the next version, and a second rotation before retiring is refused; retiring
    /// drops the previous key, after which rotating works again. The file stays owner-only.
    #[test]
    fn a_rotation_keeps_the_previous_key_until_it_is_retired() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = key_dir("rotate");
        let path = dir.join("keys.toml");
        let old_format = format!(
            "oprf_seed = \"{}\"\ncode_key = \"{}\"\n",
            fresh_secret(),
            fresh_secret()
        );
        std::fs::write(&path, old_format).expect("write");
        let number = E164::parse("+14155550123").expect("number");
        let before = ServerKeys::load_or_create(&path).expect("an old key file loads");
        assert_eq!(before.current_version(), 1);
        assert_eq!(before.previous_version(), None);
        let v1 = before.pseudonym(&number).expect("pseudonym");

        assert_eq!(rotate_oprf_key(&path).expect("rotate"), 2);
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key file stays owner-only");
        let after = ServerKeys::load_or_create(&path).expect("load");
        assert_eq!(after.current_version(), 2);
        assert_eq!(after.previous_version(), Some(1));
        assert_eq!(
            after.previous_public_key().map(|(_, key)| key),
            Some(before.oprf_public_key())
        );
        let v2 = after.pseudonym(&number).expect("pseudonym");
        assert_ne!(v1, v2, "a new key gives new pseudonyms");
        let under_v1 = after
            .pseudonym_under(1, &number)
            .expect("held")
            .expect("pseudonym");
        assert_eq!(
            under_v1, v1,
            "the previous key still gives the old pseudonyms"
        );
        assert!(after.pseudonym_under(3, &number).is_none(), "no key 3");
        assert_eq!(
            after.budget_key(&v1),
            before.budget_key(&v1),
            "the code key is kept"
        );

        let refused = rotate_oprf_key(&path).expect_err("a second rotation is refused");
        assert!(
            refused
                .to_string()
                .contains("retire the previous key first"),
            "{refused}"
        );
        assert_eq!(retire_oprf_key(&path).expect("retire"), Some(1));
        assert_eq!(retire_oprf_key(&path).expect("retire again"), None);
        let retired = ServerKeys::load_or_create(&path).expect("load");
        assert_eq!(retired.current_version(), 2);
        assert_eq!(retired.previous_version(), None);
        assert_eq!(retired.pseudonym(&number).expect("pseudonym"), v2);
        assert_eq!(rotate_oprf_key(&path).expect("rotate again"), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A key file whose previous key lacks its version (or has the current one) is refused, not
    /// loaded half-way.
    #[test]
    fn a_damaged_previous_key_is_refused() {
        let dir = key_dir("damaged");
        let path = dir.join("keys.toml");
        let text = format!(
            "oprf_seed = \"{}\"\noprf_key_version = 2\nprevious_oprf_seed = \"{}\"\ncode_key = \"{}\"\n",
            fresh_secret(),
            fresh_secret(),
            fresh_secret()
        );
        std::fs::write(&path, text).expect("write");
        let error = ServerKeys::load_or_create(&path).expect_err("refused");
        assert!(error.to_string().contains("go together"), "{error}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
