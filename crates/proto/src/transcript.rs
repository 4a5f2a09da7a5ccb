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
