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

/// What a new device MACs, under a key derived from the link secret its user typed, to prove to
/// the device that showed the secret that it is the one the user is linking: its identity keys.
pub fn link_proof(identity_key: &[u8], signing_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(22 + identity_key.len() + signing_key.len());
    out.extend_from_slice(b"tidings-link-proof-v1\n");
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
