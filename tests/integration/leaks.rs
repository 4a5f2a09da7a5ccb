//! Searching bytes for what must not be in them: a phone number in every form a server or a
//! client could turn it into, and message texts. Shared by the privacy tests and the audit.

#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;

use base64::Engine as _;
use sha1::Digest as _;

use crate::support::files_containing;

/// Every form in which a number could leak, each with a name for reports: the number as
/// written (E.164 with and without `+`, with the international `00` prefix, national with and
/// without spaces, international with spaces), and each of those as SHA-1 and SHA-256 digests:
/// raw bytes, hex in lower and upper case, base64 (padded and not) and base64url.
pub fn leak_forms(number: &str) -> Vec<(String, Vec<u8>)> {
    let digits = number.trim_start_matches('+');
    let mut plains = vec![
        ("E.164".to_string(), number.to_string()),
        ("digits".to_string(), digits.to_string()),
        ("00-prefixed".to_string(), format!("00{digits}")),
    ];
    if let Ok(parsed) = phonenumber::parse(None, number) {
        let national = parsed
            .format()
            .mode(phonenumber::Mode::National)
            .to_string();
        let international = parsed
            .format()
            .mode(phonenumber::Mode::International)
            .to_string();
        let national_digits: String = national.chars().filter(char::is_ascii_digit).collect();
        for (name, form) in [
            ("national", national),
            ("national digits", national_digits),
            ("international", international),
        ] {
            if !plains.iter().any(|(_, known)| *known == form) {
                plains.push((name.to_string(), form));
            }
        }
    }
    let mut forms = Vec::new();
    for (name, plain) in plains {
        let digests = [
            ("SHA-1", sha1::Sha1::digest(plain.as_bytes()).to_vec()),
            ("SHA-256", sha2::Sha256::digest(plain.as_bytes()).to_vec()),
        ];
        forms.push((name.clone(), plain.into_bytes()));
        for (hash, digest) in digests {
            let of = |encoding: &str| format!("{hash} of {name}, {encoding}");
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            forms.push((of("hex"), hex.as_bytes().to_vec()));
            forms.push((of("HEX"), hex.to_uppercase().into_bytes()));
            forms.extend(encodings(&digest).map(|(encoding, bytes)| (of(encoding), bytes)));
            forms.push((of("raw"), digest));
        }
    }
    forms
}

/// The forms in which a message text could leak: as written, hex, base64 and base64url.
pub fn text_forms(text: &str) -> Vec<(String, Vec<u8>)> {
    let hex: String = text.bytes().map(|b| format!("{b:02x}")).collect();
    let mut forms = vec![
        ("plain".to_string(), text.as_bytes().to_vec()),
        ("hex".to_string(), hex.into_bytes()),
    ];
    forms.extend(encodings(text.as_bytes()).map(|(name, bytes)| (name.to_string(), bytes)));
    forms
}

/// `bytes` in base64 (padded, unpadded) and base64url (unpadded).
fn encodings(bytes: &[u8]) -> impl Iterator<Item = (&'static str, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    [
        ("base64", STANDARD.encode(bytes)),
        ("base64 unpadded", STANDARD_NO_PAD.encode(bytes)),
        ("base64url", URL_SAFE_NO_PAD.encode(bytes)),
    ]
    .into_iter()
    .filter(|(_, encoded)| !encoded.is_empty())
    .map(|(name, encoded)| (name, encoded.into_bytes()))
}

/// Fails naming `what` and the files below `dir` that contain `needle`.
pub fn assert_absent(dir: &Path, needle: &[u8], what: &str) {
    let found = files_containing(dir, needle);
    assert!(found.is_empty(), "{what} found in {found:?}");
}

/// One thing searched for: what it is (whose number, which text) and in which form.
#[derive(Debug, Clone)]
pub struct Needle {
    pub what: String,
    pub form: String,
    pub bytes: Vec<u8>,
}

/// Many needles searched for in one pass over a haystack (an Aho-Corasick automaton over all of
/// them), so that scanning a data directory for hundreds of forms stays quick.
#[derive(Debug, Default)]
pub struct Needles {
    needles: Vec<Needle>,
    /// Built at the first search after the last `add`.
    automaton: OnceLock<AhoCorasick>,
}

impl Needles {
    /// Adds every form of `forms`, each described as `what` in that form. Every form must be at
    /// least four bytes long.
    pub fn add(&mut self, what: &str, forms: Vec<(String, Vec<u8>)>) {
        self.automaton = OnceLock::new();
        for (form, bytes) in forms {
            assert!(bytes.len() >= 4, "a needle of at least four bytes");
            self.needles.push(Needle {
                what: what.to_string(),
                form,
                bytes,
            });
        }
    }

    pub fn len(&self) -> usize {
        self.needles.len()
    }

    /// The needles `haystack` contains, each once, in the order they were added.
    pub fn found_in(&self, haystack: &[u8]) -> Vec<&Needle> {
        let automaton = self.automaton.get_or_init(|| {
            AhoCorasick::new(self.needles.iter().map(|needle| &needle.bytes))
                .expect("an automaton of the needles")
        });
        let mut found = vec![false; self.needles.len()];
        for hit in automaton.find_overlapping_iter(haystack) {
            found[hit.pattern().as_usize()] = true;
        }
        self.needles
            .iter()
            .zip(found)
            .filter_map(|(needle, found)| found.then_some(needle))
            .collect()
    }
}
