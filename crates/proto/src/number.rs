//! Phone numbers: parse anything a person would type, keep only E.164.
//!
//! A number is personal data. Nothing here logs, and [`E164`]'s `Debug` form hides the digits so
//! that a stray `{:?}` in a log line cannot print one.

use std::str::FromStr;

/// A valid phone number in E.164 form, such as `+4915112345678`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct E164(String);

/// Why a text is not a phone number.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum NumberError {
    /// The text does not parse as a phone number at all.
    #[error("not a phone number: write it in international form, such as +4915112345678")]
    Unparseable,
    /// It parses, but no numbering plan has such a number.
    #[error("not a valid phone number for its country: check the digits")]
    Invalid,
}

impl E164 {
    /// Parses a number typed in international form (`+` and country code; spaces, dashes and
    /// brackets allowed) and normalises it.
    pub fn parse(text: &str) -> Result<Self, NumberError> {
        let trimmed = text.trim();
        if trimmed.is_empty() || trimmed.len() > 40 {
            return Err(NumberError::Unparseable);
        }
        let parsed = phonenumber::parse(None, trimmed).map_err(|_| NumberError::Unparseable)?;
        if !phonenumber::is_valid(&parsed) {
            return Err(NumberError::Invalid);
        }
        Ok(Self(
            parsed.format().mode(phonenumber::Mode::E164).to_string(),
        ))
    }

    /// The E.164 text, `+` and digits only.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for E164 {
    type Err = NumberError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl std::fmt::Debug for E164 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("E164(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, NumberError>) {
        let got = E164::parse(input);
        assert_eq!(
            got.as_ref().map(E164::as_str).map_err(Clone::clone),
            expected,
            "{input}"
        );
    }

    #[test]
    fn normalises_and_rejects() {
        check("+49 151 12345678", Ok("+4915112345678"));
        check("+1 (201) 555-0123", Ok("+12015550123"));
        check("  +442079460958 ", Ok("+442079460958"));
        check("+1 555 0100", Err(NumberError::Invalid));
        check("hello", Err(NumberError::Unparseable));
        check("", Err(NumberError::Unparseable));
        check(&"9".repeat(100), Err(NumberError::Unparseable));
    }

    #[test]
    fn debug_hides_digits() {
        let number = E164::parse("+4915112345678").expect("valid test number");
        assert!(!format!("{number:?}").contains("151"));
    }
}
