//! Crypto-shredding of the copies that wait in PostgreSQL.
//!
//! PostgreSQL leaves a deleted row's bytes in its table files and WAL for as long as nothing
//! happens to overwrite them (docs/ARCHITECTURE.md, "Deleted bytes on PostgreSQL"), so deleting a
//! delivered copy does not remove it from the disk. This engine therefore stores every copy's
//! payload sealed (XChaCha20-Poly1305) under a key of the hour its message expires in, and
//! forgets each hour's key once every message of that hour has expired: what stays on disk can
//! no longer be read.
//!
//! The hours' keys form a one-way chain: `K[e + 1] = SHA-256(step ‖ K[e])`. A node keeps one link,
//! the key of the oldest hour that may still hold a live message, in a small file beside the
//! server's key file (the *key chain file*, mode 0600), from which it derives every later hour's
//! key; once that hour is over (plus [`GRACE_MS`] for clocks that differ), the node writes the
//! next link over it in place and the earlier hours' keys cannot be derived again by anyone. Every
//! node of a deployment holds a copy of the same chain and moves it on by the same clock, so any
//! node reads what any other sealed. The database holds no key: only a check value of the current
//! link and the chain's name (`key_chain`), so that a node started without the chain, or with another deployment's,
//! is refused instead of sealing copies no other node can read.
//!
//! So a delivered or expired copy becomes unreadable at most the longest time-to-live, plus an hour
//! and the grace, after it was stored, whatever PostgreSQL keeps of it; the key chain file itself
//! is overwritten in place (the file system keeps no earlier block of it unless it copies on write
//! or snapshots, which the operator avoids for that file).

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use tidings_core::Millis;
use zeroize::Zeroizing;

use crate::{Result, StoreError};

/// One link of the chain covers this long (an hour).
pub const EPOCH_MS: Millis = 3_600_000;
/// An hour's key is kept this long after the hour ends: the expiry sweep's lag and the
/// difference between the nodes' clocks.
pub const GRACE_MS: Millis = 600_000;
/// Links ahead of the current one a seal may ask for (400 days): bounds the hashing a message
/// with a far expiry can cause.
const MAX_AHEAD: u64 = 24 * 400;
/// What sealing adds to a payload: a version byte, the hour (8), the nonce (24) and the tag (16).
pub const SEAL_OVERHEAD: usize = 1 + 8 + 24 + 16;
const VERSION: u8 = 1;

const STEP: &[u8] = b"tidings key chain step v1";
const PAYLOAD_KEY: &[u8] = b"tidings key chain payload key v1";
const CHECK: &[u8] = b"tidings key chain check v1";
const FILE_HEAD: &str = "tidings key chain v1";

type Key = Zeroizing<[u8; 32]>;

/// The hour `at` falls in.
pub fn epoch_of(at: Millis) -> u64 {
    at / EPOCH_MS
}

/// The oldest hour whose key is still needed at `now`.
fn oldest_needed(now: Millis) -> u64 {
    epoch_of(now.saturating_sub(GRACE_MS))
}

fn next_link(key: &[u8; 32]) -> Key {
    let mut hasher = Sha256::new();
    hasher.update(STEP);
    hasher.update(key);
    Zeroizing::new(hasher.finalize().into())
}

fn keyed(key: &[u8; 32], label: &[u8]) -> Key {
    // A key of any length is accepted by HMAC: this cannot fail.
    let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(label);
    Zeroizing::new(mac.finalize().into_bytes().into())
}

/// What the node holds: the current link and the payload keys derived from it so far.
struct Links {
    epoch: u64,
    key: Key,
    payload_keys: BTreeMap<u64, Key>,
}

impl Links {
    /// The payload key of hour `epoch` (at or after the current link), derived once.
    fn payload_key(&mut self, epoch: u64) -> Result<&Key> {
        if epoch < self.epoch {
            return Err(StoreError::engine("that hour's key is forgotten"));
        }
        if epoch - self.epoch > MAX_AHEAD {
            return Err(StoreError::engine("an expiry too far ahead to seal for"));
        }
        if !self.payload_keys.contains_key(&epoch) {
            let link = self.link_at(epoch);
            self.payload_keys.insert(epoch, keyed(&link, PAYLOAD_KEY));
        }
        // Inserted just above if it was missing.
        self.payload_keys
            .get(&epoch)
            .ok_or_else(|| StoreError::engine("payload key missing"))
    }

    /// The check value of hour `epoch` (at or after the current link).
    fn check_at(&self, epoch: u64) -> Option<[u8; 32]> {
        (epoch >= self.epoch).then(|| *keyed(&self.link_at(epoch), CHECK))
    }

    /// The link of hour `epoch`, derived forward from the current one (itself if `epoch` is not
    /// after it).
    fn link_at(&self, epoch: u64) -> Key {
        let mut link = Zeroizing::new(*self.key);
        for _ in self.epoch..epoch {
            link = next_link(&link);
        }
        link
    }
}

/// A node's copy of the chain, and the file it lives in.
pub struct KeyChain {
    path: PathBuf,
    /// Names the chain (not secret): the database records it, so that a node with another
    /// deployment's chain is refused.
    id: [u8; 16],
    links: Mutex<Links>,
}

impl std::fmt::Debug for KeyChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never a key.
        f.debug_struct("KeyChain")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::engine(format!("key chain file {}: {what}: {e}", path.display()))
}

/// The file's text for a link: always the same length, so that a new link overwrites the old one
/// byte for byte.
fn file_text(id: &[u8; 16], epoch: u64, key: &[u8; 32]) -> Zeroizing<String> {
    let b64 = &base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = Zeroizing::new(b64.encode(key));
    Zeroizing::new(format!(
        "{FILE_HEAD}\nchain {}\nepoch {epoch:020}\nkey {}\n",
        b64.encode(id),
        key.as_str()
    ))
}

fn parse_file(path: &Path, text: &str) -> Result<([u8; 16], u64, Key)> {
    let bad = |what: &str| file_error(path, "not a key chain file", what);
    let mut lines = text.lines();
    let mut field = |name: &str| lines.next().and_then(|l| l.strip_prefix(name));
    let bytes = |value: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()
            .map(Zeroizing::new)
    };
    if field("") != Some(FILE_HEAD) {
        return Err(bad("its first line"));
    }
    let id = field("chain ")
        .and_then(bytes)
        .and_then(|k| <[u8; 16]>::try_from(k.as_slice()).ok())
        .ok_or_else(|| bad("its chain line"))?;
    let epoch = field("epoch ")
        .and_then(|e| e.parse::<u64>().ok())
        .ok_or_else(|| bad("its epoch line"))?;
    let key = field("key ")
        .and_then(bytes)
        .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
        .ok_or_else(|| bad("its key line"))?;
    Ok((id, epoch, Zeroizing::new(key)))
}

impl KeyChain {
    /// Reads the chain from `path`; `None` if there is no such file.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Zeroizing::new(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(file_error(path, "cannot read it", e)),
        };
        let (id, epoch, key) = parse_file(path, &text)?;
        Ok(Some(Self::with(path, id, epoch, key)))
    }

    /// Makes a new chain starting at the hour needed at `now` and writes its file (which must not
    /// exist).
    pub fn create(path: &Path, now: Millis) -> Result<Self> {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut key[..]);
        let mut id = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut id);
        let epoch = oldest_needed(now);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| file_error(path, "cannot create it", e))?;
        file.write_all(file_text(&id, epoch, &key).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| file_error(path, "cannot write it", e))?;
        if let Some(dir) = path.parent() {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
        }
        Ok(Self::with(path, id, epoch, key))
    }

    fn with(path: &Path, id: [u8; 16], epoch: u64, key: Key) -> Self {
        Self {
            path: path.to_path_buf(),
            id,
            links: Mutex::new(Links {
                epoch,
                key,
                payload_keys: BTreeMap::new(),
            }),
        }
    }

    fn links(&self) -> Result<std::sync::MutexGuard<'_, Links>> {
        self.links
            .lock()
            .map_err(|_| StoreError::engine("an earlier operation panicked"))
    }

    /// The chain's name.
    pub fn id(&self) -> [u8; 16] {
        self.id
    }

    /// The hour of the current link.
    pub fn epoch(&self) -> Result<u64> {
        Ok(self.links()?.epoch)
    }

    /// The check value of hour `epoch`; `None` if that hour is forgotten.
    pub fn check_at(&self, epoch: u64) -> Result<Option<[u8; 32]>> {
        Ok(self.links()?.check_at(epoch))
    }

    /// Moves the chain on to the hour needed at `now`, if it is behind: the new link is written
    /// over the old one in the file (and synced) before the old one is dropped from memory.
    /// Returns the new hour and its check value if it moved.
    pub fn advance(&self, now: Millis) -> Result<Option<(u64, [u8; 32])>> {
        self.advance_to(oldest_needed(now))
    }

    /// [`KeyChain::advance`] to hour `target`.
    pub fn advance_to(&self, target: u64) -> Result<Option<(u64, [u8; 32])>> {
        let mut links = self.links()?;
        if target <= links.epoch {
            return Ok(None);
        }
        let key = links.link_at(target);
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| file_error(&self.path, "cannot open it to move the chain on", e))?;
        file.write_all_at(file_text(&self.id, target, &key).as_bytes(), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| file_error(&self.path, "cannot move the chain on", e))?;
        links.epoch = target;
        links.key = key;
        links.payload_keys = links.payload_keys.split_off(&target);
        Ok(Some((target, *keyed(&links.key, CHECK))))
    }

    /// Seals a copy's payload for `device`, under the key of the hour its message expires in
    /// (or the current link's, if that hour is already forgotten).
    pub fn seal(&self, expires_at: Millis, device: &[u8], payload: &[u8]) -> Result<Vec<u8>> {
        let mut links = self.links()?;
        let epoch = epoch_of(expires_at).max(links.epoch);
        let cipher = XChaCha20Poly1305::new(links.payload_key(epoch)?.as_slice().into());
        let mut nonce = XNonce::default();
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut head = Vec::with_capacity(SEAL_OVERHEAD + payload.len());
        head.push(VERSION);
        head.extend_from_slice(&epoch.to_be_bytes());
        let aad = [&head[..], device].concat();
        let sealed = cipher
            .encrypt(
                &nonce,
                Payload {
                    msg: payload,
                    aad: &aad,
                },
            )
            .map_err(|_| StoreError::engine("sealing failed"))?;
        head.extend_from_slice(&nonce);
        head.extend_from_slice(&sealed);
        Ok(head)
    }

    /// Opens what [`KeyChain::seal`] made for `device`; `None` if its hour's key is forgotten
    /// (its message has expired) or it was not sealed under this chain.
    pub fn open(&self, device: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD || sealed[0] != VERSION {
            return None;
        }
        let (head, rest) = sealed.split_at(9);
        let (nonce, ciphertext) = rest.split_at(24);
        let nonce: [u8; 24] = nonce.try_into().ok()?;
        let epoch = u64::from_be_bytes(head[1..9].try_into().ok()?);
        let mut links = self.links().ok()?;
        let cipher = XChaCha20Poly1305::new(links.payload_key(epoch).ok()?.as_slice().into());
        let aad = [head, device].concat();
        cipher
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .ok()
    }
}

/// What a node is told when its key chain does not fit the database.
fn refusal(path: &Path, why: &str) -> StoreError {
    StoreError::engine(format!(
        "{why}; every node of a deployment needs a copy of the same key chain file: copy {} \
         from a running node (its copy moves on every hour; an older copy catches up)",
        path.display()
    ))
}

/// Reads or makes the node's key chain and checks it against the database's record of it
/// (`key_chain`: the chain's name, an hour and that hour's check value, never a key): a node without the chain,
/// or with another deployment's, is refused. Moves the chain on to the hour needed at `now`.
pub(super) async fn attach(
    client: &tokio_postgres::Client,
    path: &Path,
    now: Millis,
) -> Result<KeyChain> {
    let recorded = client
        .query_opt(
            "SELECT chain_id, epoch, check_value FROM key_chain WHERE id = 1",
            &[],
        )
        .await?
        .map(|row| -> Result<(Vec<u8>, u64, Vec<u8>)> {
            let epoch: i64 = row.try_get(1)?;
            Ok((
                row.try_get(0)?,
                u64::try_from(epoch).unwrap_or(0),
                row.try_get(2)?,
            ))
        })
        .transpose()?;
    let chain = match (KeyChain::load(path)?, &recorded) {
        (Some(chain), Some((id, epoch, check))) => {
            let same = id[..] == chain.id()[..]
                // A copy at or behind the record must reach its check; one ahead of it cannot
                // be checked against it (and moves it on below).
                && chain
                    .check_at(*epoch)?
                    .is_none_or(|ours| ours[..] == check[..]);
            if !same {
                return Err(refusal(
                    path,
                    "the key chain file is not the one this database's copies are sealed under",
                ));
            }
            chain
        }
        (Some(chain), None) => chain,
        (None, Some(_)) => {
            return Err(refusal(
                path,
                "this database's waiting copies are sealed under a key chain this node has no \
                 file of",
            ))
        }
        (None, None) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| file_error(path, "cannot make its directory", e))?;
            }
            KeyChain::create(path, now)?
        }
    };
    chain.advance(now)?;
    let epoch = chain.epoch()?;
    let check = chain
        .check_at(epoch)?
        .ok_or_else(|| StoreError::engine("the current hour's check is missing"))?;
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    let changed = client
        .execute(
            "INSERT INTO key_chain (id, chain_id, epoch, check_value) VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET epoch = excluded.epoch, check_value = excluded.check_value
             WHERE key_chain.chain_id = excluded.chain_id AND key_chain.epoch < excluded.epoch",
            &[&&chain.id()[..], &epoch, &&check[..]],
        )
        .await?;
    if recorded.is_none() && changed == 0 {
        // Another node recorded a chain of its own between the read and this write.
        return Err(refusal(
            path,
            "another node made a key chain at the same moment",
        ));
    }
    Ok(chain)
}

/// Moves the node's chain on if its oldest hour is over, and the database's record with it.
pub(super) async fn move_on(pool: &super::Pool, chain: &KeyChain, now: Millis) -> Result<()> {
    let Some((epoch, check)) = chain.advance(now)? else {
        return Ok(());
    };
    let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
    let mut conn = pool.get().await?;
    conn.client()
        .client
        .execute(
            "UPDATE key_chain SET epoch = $1, check_value = $2 WHERE id = 1 AND epoch < $1",
            &[&epoch, &&check[..]],
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "tidings-key-chain-{label}-{}-{}",
            std::process::id(),
            rand::rngs::OsRng.next_u64()
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir.join("keys.chain")
    }

    const HOUR: Millis = EPOCH_MS;

    #[test]
    fn a_sealed_copy_opens_for_its_device_only_and_hides_its_bytes() {
        let path = scratch("open");
        let chain = KeyChain::create(&path, 1_000 * HOUR).expect("create");
        let payload = b"an olm message, opaque to the server".to_vec();
        let sealed = chain
            .seal(1_000 * HOUR + 5 * HOUR, b"device-a", &payload)
            .expect("seal");
        assert_eq!(sealed.len(), payload.len() + SEAL_OVERHEAD);
        assert!(!sealed.windows(8).any(|w| w == &payload[..8]));
        assert_eq!(chain.open(b"device-a", &sealed), Some(payload.clone()));
        assert_eq!(chain.open(b"device-b", &sealed), None);
        let mut tampered = sealed.clone();
        *tampered.last_mut().expect("bytes") ^= 1;
        assert_eq!(chain.open(b"device-a", &tampered), None);
        // Another node's copy of the file reads it; another chain does not.
        let copy = KeyChain::load(&path).expect("load").expect("a file");
        assert_eq!(copy.open(b"device-a", &sealed), Some(payload));
        let other = KeyChain::create(&scratch("other"), 1_000 * HOUR).expect("create");
        assert_eq!(other.open(b"device-a", &sealed), None);
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }

    #[test]
    fn moving_on_forgets_an_hours_key_in_memory_and_in_the_file() {
        let path = scratch("shred");
        // Made at hour 2,000 (past its grace: the chain starts there).
        let start = 2_000 * HOUR;
        let chain = KeyChain::create(&path, start + GRACE_MS).expect("create");
        assert_eq!(chain.epoch().expect("epoch"), 2_000);
        let first_file = std::fs::read(&path).expect("read");
        let early = chain.seal(start + HOUR / 2, b"d", b"early").expect("seal");
        let late = chain.seal(start + 3 * HOUR, b"d", b"late").expect("seal");
        // Within the grace after the early message's hour, nothing moves.
        assert_eq!(
            chain.advance(start + HOUR + GRACE_MS - 1).expect("advance"),
            None
        );
        assert_eq!(chain.open(b"d", &early), Some(b"early".to_vec()));
        // Past it, the early hour's key is gone; the late one's is still derived.
        let (epoch, check) = chain
            .advance(start + HOUR + GRACE_MS)
            .expect("advance")
            .expect("it moves");
        assert_eq!(epoch, 2_001);
        assert_eq!(chain.open(b"d", &early), None);
        assert_eq!(chain.open(b"d", &late), Some(b"late".to_vec()));
        // The file was overwritten in place: same length, no trace of the old link, and what is
        // read from it again cannot open the early copy either.
        let second_file = std::fs::read(&path).expect("read");
        assert_eq!(first_file.len(), second_file.len());
        let old_key = &first_file[first_file.len() - 44..first_file.len() - 1];
        assert!(!second_file.windows(old_key.len()).any(|w| w == old_key));
        let reloaded = KeyChain::load(&path).expect("load").expect("a file");
        assert_eq!(reloaded.open(b"d", &early), None);
        assert_eq!(reloaded.open(b"d", &late), Some(b"late".to_vec()));
        assert_eq!(reloaded.check_at(epoch).expect("check"), Some(check));
        // A node whose copy is behind reaches the same check by moving on.
        let behind_path = scratch("behind");
        std::fs::write(&behind_path, &first_file).expect("copy");
        let behind = KeyChain::load(&behind_path).expect("load").expect("a file");
        assert_eq!(behind.check_at(epoch).expect("check"), Some(check));
        // A message that expired before the current link is sealed under it.
        let stale = chain.seal(start, b"d", b"stale").expect("seal");
        assert_eq!(chain.open(b"d", &stale), Some(b"stale".to_vec()));
        for p in [&path, &behind_path] {
            let _ = std::fs::remove_dir_all(p.parent().expect("dir"));
        }
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_name() {
        let path = scratch("bad");
        std::fs::write(
            &path,
            "tidings key chain v1\nchain AAAAAAAAAAAAAAAAAAAAAA\nepoch x\n",
        )
        .expect("write");
        let error = KeyChain::load(&path).expect_err("refused").to_string();
        assert!(
            error.contains("keys.chain") && error.contains("epoch"),
            "{error}"
        );
        assert!(
            KeyChain::create(&path, 0).is_err(),
            "an existing file is never replaced"
        );
        let _ = std::fs::remove_dir_all(path.parent().expect("dir"));
    }
}
