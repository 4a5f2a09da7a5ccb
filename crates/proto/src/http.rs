//! JSON bodies of the registration API. Unknown fields are ignored on purpose: a client that
//! sends a stray field (say, an IMEI) gets its request served and the field dropped, never stored.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/registration/code`
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeRequest {
    /// The phone number to verify, in E.164 form (`+`, country code, number; the server also
    /// accepts spaces, dashes and parentheses between the digits).
    #[schema(min_length = 3, max_length = 16, pattern = r"^\+[1-9][0-9]{1,14}$")]
    pub number: String,
}

/// Answer to a code request that sent a code.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CodeSent {
    /// Seconds the code stays valid.
    pub expires_in: u64,
}

/// `POST /v1/registration/verify`
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyRequest {
    /// The number the code was sent to, in E.164 form.
    #[schema(min_length = 3, max_length = 16, pattern = r"^\+[1-9][0-9]{1,14}$")]
    pub number: String,
    /// The 6-digit code from the SMS.
    #[schema(pattern = r"^[0-9]{6}$")]
    pub code: String,
    /// The device's Ed25519 public key, 32 bytes, base64url.
    pub device_key: String,
    /// Ed25519 signature over the register transcript, 64 bytes, base64url.
    pub signature: String,
}

/// Answer to a successful verification.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Verified {
    /// The new device's id, 16 bytes, base64url.
    pub device_id: String,
    /// How many earlier devices of this number were signed out and deleted.
    pub replaced_devices: u32,
    /// The server's OPRF public key (32-byte ristretto255 point, base64url): the client pins it
    /// and checks every `EvaluateResult` proof against it.
    #[serde(default)]
    pub oprf_public_key: String,
    /// The version of that key.
    #[serde(default)]
    pub key_version: u32,
    /// The registrant's own account pseudonym (32 bytes, base64url), which names it in session
    /// requests: the client keeps it, so it needs no evaluation of its own number.
    #[serde(default)]
    pub account: String,
}

/// `POST /v1/registration/inbound`: registration by the user's own SMS. The number is declared
/// here and proven by the SMS its phone sends; the server sends nothing.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct InboundRequest {
    /// The phone number to register, in E.164 form.
    #[schema(min_length = 3, max_length = 16, pattern = r"^\+[1-9][0-9]{1,14}$")]
    pub number: String,
}

/// Answer to a declaration: what the user's phone must text, and where.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct InboundCode {
    /// The code, 8 characters of Crockford's base 32; sent back (and signed) to complete.
    #[schema(pattern = r"^[0-9A-HJKMNP-TV-Z]{8}$")]
    pub code: String,
    /// The number to text, in E.164 form.
    pub service_number: String,
    /// The exact text to send from the declared number; it says that sending it registers the
    /// number and signs out its other devices.
    pub text: String,
    /// Seconds the code stays valid.
    pub expires_in: u64,
}

/// `POST /v1/registration/inbound/complete`: binds the device key once the SMS has arrived.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct InboundCompleteRequest {
    /// The declared number, in E.164 form.
    #[schema(min_length = 3, max_length = 16, pattern = r"^\+[1-9][0-9]{1,14}$")]
    pub number: String,
    /// The code from the declaration's answer.
    #[schema(pattern = r"^[0-9A-HJKMNP-TV-Z]{8}$")]
    pub code: String,
    /// The device's Ed25519 public key, 32 bytes, base64url.
    pub device_key: String,
    /// Ed25519 signature over the register transcript (number, code, device key), 64 bytes,
    /// base64url.
    pub signature: String,
    /// Seconds to wait for the SMS if it has not arrived yet, at most 25 [default: 0].
    #[serde(default, deserialize_with = "whole_number")]
    #[schema(maximum = 25)]
    pub wait_seconds: u64,
}

/// A whole number of JSON's either form: JSON Schema's `integer` admits `2.0` as well as `2`, so a
/// body the OpenAPI document allows must not be refused for writing it as a float.
fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let value = <f64 as serde::Deserialize>::deserialize(deserializer)?;
    if value.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&value) {
        // Whole and within f64's exact integers: the conversion is exact.
        Ok(value as u64)
    } else {
        Err(serde::de::Error::custom(
            "expected a whole number of seconds, at least 0",
        ))
    }
}

/// `POST /v1/registration/link`: a new device joins a number with a link code shown on one of
/// its devices.
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct LinkRequest {
    /// The number to join, in E.164 form.
    #[schema(min_length = 3, max_length = 16, pattern = r"^\+[1-9][0-9]{1,14}$")]
    pub number: String,
    /// The link code shown by `tidings link` on a device of that number.
    pub code: String,
    /// The new device's Ed25519 public key, 32 bytes, base64url.
    pub device_key: String,
    /// The new device's Olm Curve25519 identity key, 32 bytes, base64url.
    pub identity_key: String,
    /// The new device's Olm Ed25519 signing key, 32 bytes, base64url.
    pub signing_key: String,
    /// Ed25519 signature by `device_key` over the link transcript, 64 bytes, base64url.
    pub signature: String,
    /// HMAC-SHA256 by the secret shown with the code (never sent to the server) over the identity
    /// keys, 32 bytes, base64url; relayed to the device that showed the code, which checks it.
    pub proof: String,
}

/// Answer to a successful link.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Linked {
    /// The new device's id, 16 bytes, base64url.
    pub device_id: String,
    /// As in [`Verified`].
    #[serde(default)]
    pub oprf_public_key: String,
    /// As in [`Verified`].
    #[serde(default)]
    pub key_version: u32,
    /// As in [`Verified`].
    #[serde(default)]
    pub account: String,
}

/// `GET /v1/oprf-key`: the key that evaluates blinded numbers now, for a profile that has none
/// pinned (one registered before tidings/2) or must pin it again after the key changed.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct OprfKey {
    /// 32-byte ristretto255 point, base64url.
    pub public_key: String,
    /// The version of that key.
    pub key_version: u32,
    /// The key before the last rotation, while the server still holds it (base64url): a
    /// contact not yet moved to the current key is found by evaluating under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_public_key: Option<String>,
    /// The version of `previous_public_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_version: Option<u32>,
}

/// Every error answer of the HTTP API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    /// A stable, machine-readable code such as `invalid_number` or `wrong_code`.
    pub error: String,
    /// What went wrong and what to do next, for a person.
    pub message: String,
    /// Seconds to wait before trying again, for `rate_limited`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Attempts left for this code, for `wrong_code`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts_left: Option<u32>,
}

/// `GET /v1/health`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
    /// The server's version.
    pub version: String,
}

// Hand-written so that a number or code in a request can never reach a log through `{:?}`.
impl std::fmt::Debug for CodeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeRequest").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for LinkRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkRequest").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InboundCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundCode")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InboundCompleteRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundCompleteRequest")
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for VerifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyRequest").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stray_fields_are_dropped() {
        let body = r#"{"number":"+4915112345678","imei":"356938035643809"}"#;
        let parsed: CodeRequest = serde_json::from_str(body).expect("stray field is ignored");
        let again = serde_json::to_string(&parsed).expect("serialises");
        assert!(!again.contains("356938035643809"));
    }

    #[test]
    fn a_wait_is_a_whole_number_in_either_json_form() {
        let with = |wait: &str| {
            let body = format!(
                r#"{{"number":"+15550101","code":"NHGAFBBJ","device_key":"k","signature":"s","wait_seconds":{wait}}}"#
            );
            serde_json::from_str::<InboundCompleteRequest>(&body).map(|r| r.wait_seconds)
        };
        assert_eq!(with("2").expect("an integer"), 2);
        assert_eq!(with("2.0").expect("a whole float"), 2);
        for refused in ["2.5", "-1", "1e300", "\"2\""] {
            assert!(with(refused).is_err(), "{refused} was taken");
        }
    }
}
