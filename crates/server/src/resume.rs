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
//! Single use without a disk write per connect: the serials issued and not yet used are kept in
//! memory only, a few per device ([`SLOTS`]), and a use takes its serial out. A restart forgets
//! them, and the epoch (random, drawn at start) makes every token of an earlier process fail
//! before its serial is even looked at, so a serial the new process reissues cannot be matched
//! by an old token. A refused token is never an error for the client: it falls back to the
//! challenge login. Nothing here is written or logged.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
/// Unused tokens kept per device: one per session it may hold ([`crate::config`]'s default
/// `sessions_per_device`). A device that logs in more often than it resumes loses its oldest
/// token, which then falls back to the challenge login.
pub const SLOTS: usize = 4;

/// Why a token was refused (the `resumes` metric's outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Wrong length or version, or a MAC that does not hold.
    Malformed,
    /// Issued by another process: one before a restart, or another node.
    OtherEpoch,
    /// Past its expiry.
    Expired,
    /// Already used, or forgotten (a newer token took its slot, or the table was full).
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
    /// Each device's unused serials (0: an empty slot), at most `capacity` devices.
    outstanding: Mutex<HashMap<DeviceId, [u64; SLOTS]>>,
    capacity: usize,
}

impl Resumption {
    /// A table for at most `capacity` devices, issuing tokens valid for `lifetime_seconds`
    /// (capped at [`MAX_LIFETIME_SECONDS`]; 0 issues none).
    pub fn new(lifetime_seconds: u64, capacity: usize) -> Self {
        let mut epoch = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut epoch);
        Self {
            epoch,
            next_serial: AtomicU64::new(1),
            lifetime: lifetime_seconds.min(MAX_LIFETIME_SECONDS) * 1000,
            outstanding: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    /// A fresh token for `device`, valid from `now` for the lifetime; empty when resumption is
    /// off.
    pub fn issue(&self, keys: &ServerKeys, device: DeviceId, now: Millis) -> Vec<u8> {
        if self.lifetime == 0 {
            return Vec::new();
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        {
            let mut outstanding = self
                .outstanding
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !outstanding.contains_key(&device) && outstanding.len() >= self.capacity {
                // Full: forget some device's tokens (they fall back to the challenge login)
                // rather than refuse to issue.
                if let Some(victim) = outstanding.keys().next().copied() {
                    outstanding.remove(&victim);
                }
            }
            let slots = outstanding.entry(device).or_insert([0; SLOTS]);
            // The empty slot, or else the oldest serial (serials only grow).
            let slot = slots
                .iter_mut()
                .min_by_key(|serial| **serial)
                .unwrap_or_else(|| unreachable!());
            *slot = serial;
        }
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
        let mut outstanding = self
            .outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let slots = outstanding.get_mut(&device).ok_or(Refused::Used)?;
        let slot = slots
            .iter_mut()
            .find(|held| **held == serial)
            .ok_or(Refused::Used)?;
        *slot = 0;
        if slots.iter().all(|held| *held == 0) {
            outstanding.remove(&device);
        }
        Ok(device)
    }

    /// Forgets every token of `device` (it was removed or signed out).
    pub fn forget(&self, device: DeviceId) {
        self.outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&device);
    }

    /// Devices holding an unused token now.
    #[cfg(test)]
    fn devices(&self) -> usize {
        self.outstanding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
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
    /// another process, with a changed byte, under another key, or past its device's slots.
    #[test]
    fn a_token_resumes_once_and_only_as_issued() {
        let keys = keys("once");
        let other_keys = self::keys("other");
        let table = Resumption::new(60, 100);
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
            Resumption::new(60, 100).redeem(&keys, &token, now),
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

        // One device holds SLOTS unused tokens: a newer one pushes out the oldest.
        let tokens: Vec<_> = (0..=SLOTS)
            .map(|_| table.issue(&keys, device(2), now))
            .collect();
        assert_eq!(table.redeem(&keys, &tokens[0], now), Err(Refused::Used));
        for token in &tokens[1..] {
            assert_eq!(table.redeem(&keys, token, now), Ok(device(2)));
        }
        assert_eq!(table.devices(), 0, "used tokens leave nothing behind");

        let token = table.issue(&keys, device(3), now);
        table.forget(device(3));
        assert_eq!(table.redeem(&keys, &token, now), Err(Refused::Used));
        assert!(Resumption::new(0, 100)
            .issue(&keys, device(4), now)
            .is_empty());
    }

    /// The table holds at most its capacity of devices, forgetting one to make room.
    #[test]
    fn the_table_is_bounded() {
        let keys = keys("bounded");
        let table = Resumption::new(60, 3);
        let tokens: Vec<_> = (0..10u8)
            .map(|n| table.issue(&keys, device(n), 0))
            .collect();
        assert_eq!(table.devices(), 3);
        let resumed = tokens
            .iter()
            .filter(|token| table.redeem(&keys, token, 1).is_ok())
            .count();
        assert_eq!(resumed, 3);
    }
}
