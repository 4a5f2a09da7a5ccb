//! The secret that binds a device link to the user who approved it.
//!
//! `tidings link` on a registered device asks the server for a link code, draws a secret of
//! [`SECRET_BYTES`] bytes here, and shows both to its user as one [`LinkString`] (typed, or read
//! from a QR code, on the new device). The secret never goes to the server. The new device proves
//! that it knows it with an HMAC over its device id (which stands for its login key) and identity
//! keys ([`proof`]) that the server relays; the approving device checks it ([`proof_holds`])
//! against the device the server says joined before it vouches, so a device linked by someone
//! else who holds the approver's login key, or one the server made with the genuine proof, is
//! refused. No I/O here, and
//! nothing here prints the secret except [`LinkString::to_text`], for its user.

use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use sha2::Sha256;
use zeroize::Zeroizing;

/// The secret's length: 160 bits, so that a server relaying the proof cannot guess the secret
/// offline (the brief for it asks for at least 128).
pub const SECRET_BYTES: usize = 20;
/// Digits in the server's link code.
const CODE_DIGITS: usize = 12;
/// Base32 characters of the secret (160 bits, no padding).
const SECRET_CHARS: usize = SECRET_BYTES * 8 / 5;
const PROOF_LABEL: &[u8] = b"tidings-link-proof-v2";

/// The server's link code and the secret, as the user carries them from one device to the other.
pub struct LinkString {
    /// The server's code, 12 digits as `1234-5678-9012`.
    code: String,
    secret: Zeroizing<[u8; SECRET_BYTES]>,
}

impl std::fmt::Debug for LinkString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LinkString(<redacted>)")
    }
}

/// Why a typed link string is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkStringError {
    #[error("that is only the server's link code: type the whole link string `tidings link` shows (12 digits, then 32 letters and digits), which carries the secret that proves this device to the one approving it")]
    CodeOnly,
    #[error("that is not a link string: type it exactly as `tidings link` shows it (12 digits, then 32 letters and digits; dashes and spaces do not matter)")]
    Malformed,
}

impl LinkString {
    /// A fresh secret for the server's `code`.
    pub fn new(code: &str) -> Result<Self, LinkStringError> {
        let code = normalised_code(code).ok_or(LinkStringError::Malformed)?;
        let mut secret = Zeroizing::new([0u8; SECRET_BYTES]);
        rand::rngs::OsRng.fill_bytes(secret.as_mut());
        Ok(Self { code, secret })
    }

    /// Reads what the user typed: dashes, spaces and case do not matter.
    pub fn parse(text: &str) -> Result<Self, LinkStringError> {
        let compact: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if compact.len() == CODE_DIGITS && compact.bytes().all(|b| b.is_ascii_digit()) {
            return Err(LinkStringError::CodeOnly);
        }
        if compact.len() != CODE_DIGITS + SECRET_CHARS || !compact.is_ascii() {
            return Err(LinkStringError::Malformed);
        }
        let (code, secret) = compact.split_at(CODE_DIGITS);
        let code = normalised_code(code).ok_or(LinkStringError::Malformed)?;
        // Base32 has no 0, 1 or 8: read them as the letters they are mistaken for.
        let secret: String = secret
            .chars()
            .map(|c| match c {
                '0' => 'O',
                '1' => 'I',
                '8' => 'B',
                other => other,
            })
            .collect();
        let bytes = Zeroizing::new(
            data_encoding::BASE32_NOPAD
                .decode(secret.as_bytes())
                .map_err(|_| LinkStringError::Malformed)?,
        );
        let secret = <[u8; SECRET_BYTES]>::try_from(bytes.as_slice())
            .map_err(|_| LinkStringError::Malformed)?;
        Ok(Self {
            code,
            secret: Zeroizing::new(secret),
        })
    }

    /// The server's link code, the only part that goes to the server.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// What the user carries to the new device: the code, then the secret in base32, in groups
    /// of four.
    pub fn to_text(&self) -> String {
        format!(
            "{}-{}",
            self.code,
            base32_groups(self.secret.as_ref(), "-").as_str()
        )
    }

    fn key(&self, number: &str) -> Zeroizing<[u8; 32]> {
        let mut info = Vec::with_capacity(number.len() + 1 + self.code.len());
        info.extend_from_slice(number.as_bytes());
        info.push(b'\n');
        info.extend_from_slice(self.code.as_bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's limit of 255 blocks, so this cannot fail.
        let _ = Hkdf::<Sha256>::new(Some(PROOF_LABEL), self.secret.as_ref())
            .expand(&info, key.as_mut());
        key
    }

    fn mac(
        &self,
        number: &str,
        device_id: &[u8],
        identity_key: &[u8],
        signing_key: &[u8],
    ) -> Hmac<Sha256> {
        let key = self.key(number);
        // HMAC takes a key of any length.
        let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(key.as_ref())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(&tidings_proto::transcript::link_proof(
            device_id,
            identity_key,
            signing_key,
        ));
        mac
    }

    /// The new device's proof that it knows the secret: HMAC-SHA256, keyed by HKDF-SHA256 of the
    /// secret (salt `tidings-link-proof-v2`, info `number \n code`), over its device id and
    /// identity keys.
    pub fn proof(
        &self,
        number: &str,
        device_id: &[u8],
        identity_key: &[u8],
        signing_key: &[u8],
    ) -> [u8; 32] {
        self.mac(number, device_id, identity_key, signing_key)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Whether `proof` is the proof of the device with this id and these identity keys
    /// (compared in constant time).
    pub fn proof_holds(
        &self,
        number: &str,
        device_id: &[u8],
        identity_key: &[u8],
        signing_key: &[u8],
        proof: &[u8],
    ) -> bool {
        self.mac(number, device_id, identity_key, signing_key)
            .verify_slice(proof)
            .is_ok()
    }
}

/// `bytes` in base32 (RFC 4648, no padding), in groups of four joined by `separator`; wiped
/// from memory when dropped, since it may be a secret.
pub fn base32_groups(bytes: &[u8], separator: &str) -> Zeroizing<String> {
    let text = Zeroizing::new(data_encoding::BASE32_NOPAD.encode(bytes));
    let groups: Vec<&str> = text
        .as_bytes()
        .chunks(4)
        .filter_map(|chunk| std::str::from_utf8(chunk).ok())
        .collect();
    Zeroizing::new(groups.join(separator))
}

/// `1234-5678-9012` from 12 digits with or without dashes.
fn normalised_code(code: &str) -> Option<String> {
    let digits: String = code.chars().filter(|c| *c != '-').collect();
    (digits.len() == CODE_DIGITS && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| format!("{}-{}-{}", &digits[0..4], &digits[4..8], &digits[8..12]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_string_round_trips_and_typos_are_refused() {
        let shown = LinkString::new("1234-5678-9012").expect("new");
        let text = shown.to_text();
        assert_eq!(text.len(), 14 + 1 + 32 + 7);
        for typed in [
            text.clone(),
            text.to_lowercase(),
            text.replace('-', " "),
            text.replace('-', ""),
            format!(
                "{}{}",
                &text[..15],
                text[15..].replace('O', "0").replace('I', "1")
            ),
        ] {
            let parsed = LinkString::parse(&typed).expect("parse");
            assert_eq!(parsed.code(), "1234-5678-9012");
            assert_eq!(parsed.secret, shown.secret);
        }
        let check = |typed: &str, expected: LinkStringError| {
            assert_eq!(
                LinkString::parse(typed).map(|_| ()),
                Err(expected),
                "{typed}"
            );
        };
        check("1234-5678-9012", LinkStringError::CodeOnly);
        check("123456789012", LinkStringError::CodeOnly);
        check(&text[..text.len() - 1], LinkStringError::Malformed);
        check(&format!("{text}A"), LinkStringError::Malformed);
        check(&text.replacen('1', "X", 1), LinkStringError::Malformed);
        check(
            &format!("{}9", &text[..text.len() - 1]),
            LinkStringError::Malformed,
        );
        check("", LinkStringError::Malformed);
        check(&"é".repeat(44), LinkStringError::Malformed);
    }

    #[test]
    fn a_proof_holds_only_for_the_same_secret_number_code_device_and_keys() {
        let shown = LinkString::new("1234-5678-9012").expect("new");
        let typed = LinkString::parse(&shown.to_text()).expect("parse");
        let device = [5; 16];
        let proof = typed.proof("+491511", &device, &[1; 32], &[2; 32]);
        assert!(shown.proof_holds("+491511", &device, &[1; 32], &[2; 32], &proof));
        assert!(!shown.proof_holds("+491512", &device, &[1; 32], &[2; 32], &proof));
        assert!(!shown.proof_holds("+491511", &[6; 16], &[1; 32], &[2; 32], &proof));
        assert!(!shown.proof_holds("+491511", &device, &[3; 32], &[2; 32], &proof));
        assert!(!shown.proof_holds("+491511", &device, &[1; 32], &[3; 32], &proof));
        assert!(!shown.proof_holds("+491511", &device, &[1; 32], &[2; 32], &proof[..31]));
        let other = LinkString::new("1234-5678-9012").expect("new");
        assert!(!other.proof_holds("+491511", &device, &[1; 32], &[2; 32], &proof));
        let other_code = LinkString {
            code: "1234-5678-9013".into(),
            secret: shown.secret.clone(),
        };
        assert!(!other_code.proof_holds("+491511", &device, &[1; 32], &[2; 32], &proof));
    }
}
