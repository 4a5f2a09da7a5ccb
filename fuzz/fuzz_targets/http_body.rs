//! The JSON bodies of the HTTP API: the requests the server reads (`CodeRequest`,
//! `VerifyRequest`, `LinkRequest`) and the answers the client reads (`ApiError`, `CodeSent`,
//! `Verified`, `Linked`, `Health`), then the fields the server parses out of them (number,
//! base64url keys and signatures). The first byte picks the type. Checks that no input panics,
//! that a body that parses serialises and parses again to the same JSON, and that no `Debug`
//! form of a request repeats its number or code.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tidings_proto::http::{
    ApiError, CodeRequest, CodeSent, Health, LinkRequest, Linked, Verified, VerifyRequest,
};
use tidings_proto::id;
use tidings_proto::number::E164;

/// Parses `body` as `T`; if it parses, its JSON form parses again to the same JSON form.
fn check<T: Serialize + DeserializeOwned>(body: &[u8]) -> Option<T> {
    let value: T = serde_json::from_slice(body).ok()?;
    let json = serde_json::to_vec(&value).expect("a parsed body serialises");
    let again: T = serde_json::from_slice(&json).expect("a serialised body parses");
    assert_eq!(serde_json::to_vec(&again).expect("serialises"), json);
    Some(value)
}

/// As the handlers parse a number and the binary fields.
fn fields(number: &str, secrets: &[&str], binary: &[&str], debug: String) {
    let _ = E164::parse(number);
    for field in binary {
        let _ = id::from_text(field);
    }
    for secret in secrets.iter().chain([&number]) {
        // `Debug` forms hold only names, so any digits there would come from the request.
        if secret.len() > 3 && secret.bytes().any(|b| b.is_ascii_digit()) {
            assert!(
                !debug.contains(secret),
                "a Debug form repeats a number or code"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    match kind % 8 {
        0 => {
            if let Some(r) = check::<CodeRequest>(body) {
                fields(&r.number, &[], &[], format!("{r:?}"));
            }
        }
        1 => {
            if let Some(r) = check::<VerifyRequest>(body) {
                let binary = [r.device_key.as_str(), r.signature.as_str()];
                fields(&r.number, &[&r.code], &binary, format!("{r:?}"));
            }
        }
        2 => {
            if let Some(r) = check::<LinkRequest>(body) {
                let binary = [
                    r.device_key.as_str(),
                    r.identity_key.as_str(),
                    r.signing_key.as_str(),
                    r.signature.as_str(),
                ];
                fields(&r.number, &[&r.code], &binary, format!("{r:?}"));
            }
        }
        3 => {
            let _ = check::<ApiError>(body);
        }
        4 => {
            let _ = check::<CodeSent>(body);
        }
        5 => {
            if let Some(v) = check::<Verified>(body) {
                let _ = id::from_text(&v.device_id);
            }
        }
        6 => {
            if let Some(l) = check::<Linked>(body) {
                let _ = id::from_text(&l.device_id);
            }
        }
        _ => {
            let _ = check::<Health>(body);
        }
    }
});
