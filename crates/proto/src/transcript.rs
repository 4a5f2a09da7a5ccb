//! The exact bytes a device signs. Client and server both build them here, so they cannot drift.

/// What a device signs to register: proves it holds the private half of `device_key`.
pub fn register(number_e164: &str, code: &str, device_key: &[u8; 32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + number_e164.len());
    out.extend_from_slice(b"tidings-register-v1\n");
    out.extend_from_slice(number_e164.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(code.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(device_key);
    out
}

/// What a device signs to log in to a session: the server's fresh challenge and its own id.
pub fn login(challenge: &[u8], device_id: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + challenge.len() + device_id.len());
    out.extend_from_slice(b"tidings-login-v1\n");
    out.extend_from_slice(challenge);
    out.extend_from_slice(device_id);
    out
}

/// What a device signs (with its Olm Ed25519 key) to vouch for a one-time or fallback key. Olm
/// itself does not sign these keys; without this a server could hand out keys of its own.
pub fn one_time_key(device_id: &[u8], fallback: bool, public_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + device_id.len() + 1 + public_key.len());
    out.extend_from_slice(b"tidings-otk-v1\n");
    out.extend_from_slice(device_id);
    out.push(u8::from(fallback));
    out.extend_from_slice(public_key);
    out
}

/// What a new device signs (with its device key) to join a number through a link code.
pub fn link(
    number_e164: &str,
    code: &str,
    device_key: &[u8; 32],
    identity_key: &[u8],
    signing_key: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + number_e164.len() + code.len());
    out.extend_from_slice(b"tidings-link-v1\n");
    out.extend_from_slice(number_e164.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(code.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(device_key);
    out.extend_from_slice(identity_key);
    out.extend_from_slice(signing_key);
    out
}

/// The id of a device that joins a number with a link code: the first 16 bytes of SHA-256 over
/// the number, the code's digits and the device's login key. The server gives a linked device
/// this id, and the new device knows it before it asks, so that its link proof can cover it:
/// whoever relays the proof cannot attach it to a device with another login key (another id).
pub fn link_device_id(number_e164: &str, code: &str, device_key: &[u8; 32]) -> [u8; 16] {
    use sha2::{Digest as _, Sha256};
    let digits: String = code.chars().filter(char::is_ascii_digit).collect();
    let mut hash = Sha256::new();
    hash.update(b"tidings-link-device-v1\n");
    hash.update(number_e164.as_bytes());
    hash.update(b"\n");
    hash.update(digits.as_bytes());
    hash.update(b"\n");
    hash.update(device_key);
    let digest = hash.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id
}

/// What a new device MACs, under a key derived from the link secret its user typed (and the
/// number and code), to prove to the device that showed the secret that it is the one the user is
/// linking: its device id ([`link_device_id`], which stands for its login key) and identity keys.
pub fn link_proof(device_id: &[u8], identity_key: &[u8], signing_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(22 + device_id.len() + identity_key.len() + signing_key.len());
    out.extend_from_slice(b"tidings-link-proof-v2\n");
    out.extend_from_slice(device_id);
    out.extend_from_slice(identity_key);
    out.extend_from_slice(signing_key);
    out
}

/// What a device signs (with its Olm Ed25519 key) to vouch for a device it approved joining its
/// number: the new device's id and identity keys.
pub fn vouch(device_id: &[u8], identity_key: &[u8], signing_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(17 + device_id.len() + 64);
    out.extend_from_slice(b"tidings-vouch-v1\n");
    out.extend_from_slice(device_id);
    out.extend_from_slice(identity_key);
    out.extend_from_slice(signing_key);
    out
}
