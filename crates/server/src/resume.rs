//! Resumption tokens: a device that logged in gets one in every `LoginResult` and presents it in
//! the `Tidings-Resume` header of its next `GET /v1/connect`, which then logs it in at once (one
//! round trip, an HMAC check instead of an Ed25519 verification).
//!
//! A token is `version ‖ device id ‖ epoch ‖ serial ‖ expiry ‖ MAC`, the MAC an HMAC-SHA256
//! under the key file's resumption key over everything before it: a database dump is not enough
//! to make one. It is refused unless, in this order, it has the right length and version, its
//! MAC holds, its epoch is this process's, its expiry (at most 24 h after it was issued) has not
//! passed, and its serial is one this process issued to that device and has not yet seen back.
//! The caller then checks the device in the store, at every use.
//!
//! Single use without a disk write per connect, and without memory per device: serials are
//! issued in order, and a window over the last [`WINDOW`] of them holds one bit each, set while
//! its token is unused. A use clears its bit; a serial older than the window counts as used (its
//! device falls back to the challenge login). A restart forgets the window, and the epoch
//! (random, drawn at start) makes every token of an earlier process fail before its serial is
//! even looked at, so a serial the new process reissues cannot be matched by an old token. A
//! refused token is never an error for the client: it falls back to the challenge login. Nothing
//! here is written or logged.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::RngCore as _;
use tidings_core::Millis;
use tidings_proto::id::DeviceId;

use crate::keys::ServerKeys;

/// Token format version.
const VERSION: u8 = 1;
/// Bytes of a device id.
const DEVICE_BYTES: usize = 16;
/// Bytes before the MAC: version, device id, epoch, serial, expiry.
const BODY_BYTES: usize = 1 + DEVICE_BYTES + 8 + 8 + 8;
/// Bytes of the MAC.
const MAC_BYTES: usize = 32;
/// Bytes of a whole token.
pub const TOKEN_BYTES: usize = BODY_BYTES + MAC_BYTES;
/// The longest a token may be valid: the `resume_token_seconds` setting is capped to it.
pub const MAX_LIFETIME_SECONDS: u64 = 24 * 60 * 60;
/// Serials a token stays usable for: one issued this many logins later takes its place. Four per
/// device for a million devices (`state::LIMITER_CAPACITY`), in 512 KiB zeroed once at start.
pub const WINDOW: u64 = 1 << 22;

/// Why a token was refused (the `resumes` metric's outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Wrong length or version, or a MAC that does not hold.
    Malformed,
    /// Issued by another process: one before a restart, or another node.
    OtherEpoch,
    /// Past its expiry.
    Expired,
    /// Already used, or older than the window of serials.
    Used,
}

impl Refused {
    /// The outcome label of the `resumes` metric.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Malformed => "refused_malformed",
            Refused::OtherEpoch => "refused_other_epoch",
            Refused::Expired => "refused_expired",
            Refused::Used => "refused_used",
        }
    }
}

/// The tokens this process issued and has not yet seen back.
#[derive(Debug)]
pub struct Resumption {
    epoch: [u8; 8],
    next_serial: AtomicU64,
    /// How long a token is valid; 0: none is issued.
    lifetime: Millis,
    /// One bit per serial of the window (serial modulo its size), set while its token is unused.
    unused: Box<[AtomicU64]>,
}

impl Resumption {
    /// A table issuing tokens valid for `lifetime_seconds` (capped at [`MAX_LIFETIME_SECONDS`];
    /// 0 issues none), each usable until `window` later serials were issued (rounded up to a
    /// multiple of 64).
    pub fn new(lifetime_seconds: u64, window: u64) -> Self {
        let mut epoch = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut epoch);
        let words = window.div_ceil(64).max(1);
        Self {
            epoch,
            next_serial: AtomicU64::new(1),
            lifetime: lifetime_seconds.min(MAX_LIFETIME_SECONDS) * 1000,
            unused: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Serials in the window.
    fn window(&self) -> u64 {
        self.unused.len() as u64 * 64
    }

    /// The word and bit of `serial`.
    fn bit(&self, serial: u64) -> (&AtomicU64, u64) {
        let at = serial % self.window();
        // Below the window's length: a valid index.
        let word = &self.unused[usize::try_from(at / 64).unwrap_or(0)];
        (word, 1 << (at % 64))
    }

    /// A fresh token for `device`, valid from `now` for the lifetime; empty when resumption is
    /// off.
    pub fn issue(&self, keys: &ServerKeys, device: DeviceId, now: Millis) -> Vec<u8> {
        if self.lifetime == 0 {
            return Vec::new();
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let (word, bit) = self.bit(serial);
        word.fetch_or(bit, Ordering::AcqRel);
        let mut token = Vec::with_capacity(TOKEN_BYTES);
        token.push(VERSION);
        token.extend_from_slice(device.as_bytes());
        token.extend_from_slice(&self.epoch);
        token.extend_from_slice(&serial.to_be_bytes());
        token.extend_from_slice(&now.saturating_add(self.lifetime).to_be_bytes());
        let mac = keys.resume_mac(&token);
        token.extend_from_slice(&mac);
        token
    }

    /// The device `token` resumes, using the token up; or why it is refused. The caller checks
    /// that the device still exists.
    pub fn redeem(
        &self,
        keys: &ServerKeys,
        token: &[u8],
        now: Millis,
    ) -> Result<DeviceId, Refused> {
        if token.len() != TOKEN_BYTES || token[0] != VERSION {
            return Err(Refused::Malformed);
        }
        let (body, mac) = token.split_at(BODY_BYTES);
        if !keys.resume_mac_holds(body, mac) {
            return Err(Refused::Malformed);
        }
        let field = |at: usize| -> u64 {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&body[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        let device = DeviceId::from_slice(&body[1..1 + DEVICE_BYTES]).ok_or(Refused::Malformed)?;
        let epoch_at = 1 + DEVICE_BYTES;
        if body[epoch_at..epoch_at + 8] != self.epoch {
            return Err(Refused::OtherEpoch);
        }
        let serial = field(epoch_at + 8);
        if now >= field(epoch_at + 16) {
            return Err(Refused::Expired);
        }
        // Older than the window: its bit now stands for a newer serial.
        let issued = self.next_serial.load(Ordering::Acquire);
        if serial >= issued || issued - serial > self.window() {
            return Err(Refused::Used);
        }
        let (word, bit) = self.bit(serial);
        if word.fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
            return Err(Refused::Used);
        }
        Ok(device)
    }

    /// Serials whose tokens are unused now.
    #[cfg(test)]
    fn unused(&self) -> u32 {
        self.unused
            .iter()
            .map(|word| word.load(Ordering::Acquire).count_ones())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(name: &str) -> ServerKeys {
        let dir =
            std::env::temp_dir().join(format!("tidings-resume-keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = ServerKeys::load_or_create(&dir.join("keys.toml")).expect("keys");
        let _ = std::fs::remove_dir_all(&dir);
        keys
    }

    fn device(n: u8) -> DeviceId {
        DeviceId::from_slice(&[n; 16]).expect("device id")
    }

    /// Each rule of a token, one case each: it resumes once, and never after its expiry, from
    /// another process, with a changed byte or under another key.
    #[test]
    fn a_token_resumes_once_and_only_as_issued() {
        let keys = keys("once");
        let other_keys = self::keys("other");
        let table = Resumption::new(60, 128);
        let now = 1_000_000;
        let token = table.issue(&keys, device(1), now);
        assert_eq!(token.len(), TOKEN_BYTES);
        assert_eq!(table.redeem(&keys, &token, now + 1), Ok(device(1)));
        assert_eq!(table.redeem(&keys, &token, now + 2), Err(Refused::Used));

        let token = table.issue(&keys, device(1), now);
        assert_eq!(
            table.redeem(&keys, &token, now + 60_000),
            Err(Refused::Expired)
        );
        assert_eq!(
            Resumption::new(60, 128).redeem(&keys, &token, now),
            Err(Refused::OtherEpoch)
        );
        assert_eq!(
            table.redeem(&other_keys, &token, now),
            Err(Refused::Malformed)
        );
        for at in [0, 1, 20, 30, 40, TOKEN_BYTES - 1] {
            let mut changed = token.clone();
            changed[at] ^= 1;
            assert_eq!(
                table.redeem(&keys, &changed, now),
                Err(Refused::Malformed),
                "byte {at}"
            );
        }
        assert_eq!(
            table.redeem(&keys, &token[1..], now),
            Err(Refused::Malformed)
        );
        assert_eq!(table.redeem(&keys, &[], now), Err(Refused::Malformed));
        assert_eq!(table.redeem(&keys, &token, now), Ok(device(1)));

        // A device may hold several unused tokens, each good once.
        let tokens: Vec<_> = (0..5).map(|_| table.issue(&keys, device(2), now)).collect();
        for token in &tokens {
            assert_eq!(table.redeem(&keys, token, now), Ok(device(2)));
        }
        assert_eq!(table.unused(), 0, "used tokens leave nothing behind");
        assert!(Resumption::new(0, 128)
            .issue(&keys, device(4), now)
            .is_empty());
    }

    /// A token is refused once a window's worth of newer serials was issued: its bit then stands
    /// for a newer token, which still resumes.
    #[test]
    fn a_token_older_than_the_window_is_refused() {
        let keys = keys("window");
        let table = Resumption::new(60, 64);
        let oldest = table.issue(&keys, device(1), 0);
        let tokens: Vec<_> = (0..64u8)
            .map(|n| table.issue(&keys, device(n), 0))
            .collect();
        assert_eq!(table.redeem(&keys, &oldest, 1), Err(Refused::Used));
        for (n, token) in (0..64u8).zip(&tokens) {
            assert_eq!(table.redeem(&keys, token, 1), Ok(device(n)), "token {n}");
        }
        assert_eq!(table.unused(), 0);
    }
}
