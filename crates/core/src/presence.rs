//! Who may see a device online (promise P7), decided the same way by the device that hands out
//! its tokens and by the server that checks the proofs.
//!
//! Each device keeps a presence key (32 random bytes, never shown to anyone but the server
//! while a session of it is live). The token it hands a device `asker` is
//! `HMAC-SHA256(key, "tidings-presence-token" || asker)`, sent end to end inside the messages
//! it writes there; the asker proves it holds one with `HMAC-SHA256(token,
//! "tidings-presence-proof" || epoch)`, `epoch` the hour since the Unix epoch (big-endian u64).
//! The server recomputes the token from the key of the live session and the asking session's
//! own device, so a token passed on to anyone else proves nothing, and a new key revokes every
//! token at once. The server keeps no list of who may see whom.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tidings_proto::id::DeviceId;

use crate::{Millis, HOUR};

/// A presence key, token or proof: 32 bytes.
pub type Secret = [u8; 32];

const TOKEN_LABEL: &[u8] = b"tidings-presence-token";
const PROOF_LABEL: &[u8] = b"tidings-presence-proof";

/// Who may see a device online.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Whoever holds a token of the device (by default, those it wrote to).
    Contacts,
    /// Everyone who knows the number.
    Everyone,
    /// Nobody.
    Nobody,
}

/// A live session's presence: its mode and its device's key.
#[derive(Clone, PartialEq, Eq)]
pub struct Setting {
    pub mode: Mode,
    pub key: Secret,
}

impl std::fmt::Debug for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Setting")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

fn hmac(key: &[u8], label: &[u8], data: &[u8]) -> Secret {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    mac.update(label);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The hour `now` falls in: the epoch a proof is made for.
pub fn epoch(now: Millis) -> u64 {
    now / HOUR
}

/// The token a device with `key` hands the device `asker`.
pub fn token(key: &Secret, asker: DeviceId) -> Secret {
    hmac(key, TOKEN_LABEL, asker.as_bytes())
}

/// The proof made with `token` for `epoch`.
pub fn proof(token: &Secret, epoch: u64) -> Secret {
    hmac(token, PROOF_LABEL, &epoch.to_be_bytes())
}

impl Setting {
    /// Whether the device shows itself online to `asker`, which presented `mac` for it (if
    /// any) at `now`. A proof is good for the current hour and the one before, so that one made
    /// just before the hour turns still holds.
    pub fn shows_to(&self, asker: DeviceId, mac: Option<&Secret>, now: Millis) -> bool {
        match self.mode {
            Mode::Everyone => true,
            Mode::Nobody => false,
            Mode::Contacts => mac.is_some_and(|mac| {
                let token = token(&self.key, asker);
                let current = epoch(now);
                [current, current.saturating_sub(1)]
                    .iter()
                    .any(|epoch| bool::from(proof(&token, *epoch).ct_eq(mac)))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_holds_for_its_asker_this_hour_and_the_last_only() {
        let key = [7; 32];
        let setting = Setting {
            mode: Mode::Contacts,
            key,
        };
        let asker = DeviceId([1; 16]);
        let other = DeviceId([2; 16]);
        let now = 100 * HOUR + 5;
        let token = token(&key, asker);
        let check = |who, epoch: u64, expected: bool| {
            let mac = proof(&token, epoch);
            assert_eq!(setting.shows_to(who, Some(&mac), now), expected, "{epoch}");
        };
        check(asker, 100, true);
        check(asker, 99, true);
        check(asker, 98, false);
        check(asker, 101, false);
        // A token passed on to another device proves nothing for it.
        check(other, 100, false);
        assert!(!setting.shows_to(asker, None, now));
        // A new key revokes every token.
        let rotated = Setting {
            mode: Mode::Contacts,
            key: [8; 32],
        };
        assert!(!rotated.shows_to(asker, Some(&proof(&token, 100)), now));
    }

    #[test]
    fn everyone_and_nobody_need_no_proof() {
        let asker = DeviceId([1; 16]);
        let mac = proof(&token(&[7; 32], asker), epoch(0));
        for (mode, expected) in [(Mode::Everyone, true), (Mode::Nobody, false)] {
            let setting = Setting { mode, key: [7; 32] };
            assert_eq!(setting.shows_to(asker, None, 0), expected);
            assert_eq!(setting.shows_to(asker, Some(&mac), 0), expected);
        }
    }
}
