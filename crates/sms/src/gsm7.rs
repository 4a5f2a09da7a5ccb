//! The GSM 7-bit default alphabet and its extension table (3GPP TS 23.038
//! §6.2.1 and §6.2.1.1), plus septet packing (§6.1.2.1.1).
//!
//! Only the default alphabet and the default extension table are supported;
//! the national language shift tables of §6.2.1.2 are not, because using them
//! requires a national-language UDH element that many handsets ignore.

use crate::DecodeError;

/// The escape septet that announces a character from the extension table.
pub(crate) const ESCAPE: u8 = 0x1B;

/// The default alphabet, indexed by septet value.
///
/// Position 0x1B is the escape code, not a character; it is listed here only
/// so that the table has 128 entries, and `basic_septet` never maps a
/// character to it, so the text U+001B can never be sent as an escape.
const BASIC: [char; 128] = [
    '@', '£', '$', '¥', 'è', 'é', 'ù', 'ì', 'ò', 'Ç', '\n', 'Ø', 'ø', '\r', 'Å', 'å', //
    'Δ', '_', 'Φ', 'Γ', 'Λ', 'Ω', 'Π', 'Ψ', 'Σ', 'Θ', 'Ξ', '\u{1B}', 'Æ', 'æ', 'ß', 'É', //
    ' ', '!', '"', '#', '¤', '%', '&', '\'', '(', ')', '*', '+', ',', '-', '.', '/', //
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', ':', ';', '<', '=', '>', '?', //
    '¡', 'A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J', 'K', 'L', 'M', 'N', 'O', //
    'P', 'Q', 'R', 'S', 'T', 'U', 'V', 'W', 'X', 'Y', 'Z', 'Ä', 'Ö', 'Ñ', 'Ü', '§', //
    '¿', 'a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k', 'l', 'm', 'n', 'o', //
    'p', 'q', 'r', 's', 't', 'u', 'v', 'w', 'x', 'y', 'z', 'ä', 'ö', 'ñ', 'ü', 'à', //
];

/// The characters of the default extension table, as (septet after the
/// escape, character) pairs.
const EXTENSION: [(u8, char); 10] = [
    (0x0A, '\u{0C}'), // form feed
    (0x14, '^'),
    (0x28, '{'),
    (0x29, '}'),
    (0x2F, '\\'),
    (0x3C, '['),
    (0x3D, '~'),
    (0x3E, ']'),
    (0x40, '|'),
    (0x65, '€'),
];

/// One character of text in GSM 7-bit form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GsmChar {
    /// A character of the default alphabet: one septet.
    Basic(u8),
    /// A character of the extension table: the escape septet and this one.
    Extended(u8),
}

impl GsmChar {
    /// How many septets the character takes in the user data.
    pub(crate) fn septets(self) -> usize {
        match self {
            GsmChar::Basic(_) => 1,
            GsmChar::Extended(_) => 2,
        }
    }

    /// Appends the character's septets, one per byte, to `out`.
    pub(crate) fn push_to(self, out: &mut Vec<u8>) {
        match self {
            GsmChar::Basic(s) => out.push(s),
            GsmChar::Extended(s) => {
                out.push(ESCAPE);
                out.push(s);
            }
        }
    }
}

/// Maps a character to the default alphabet or the extension table, or
/// returns `None` when GSM-7 cannot carry it and the text needs UCS-2.
///
/// This is a `match` rather than a search of `BASIC` because the text may be
/// arbitrarily long and comes from users; a unit test checks that it is the
/// exact inverse of the tables.
pub(crate) fn encode_char(c: char) -> Option<GsmChar> {
    basic_septet(c)
        .map(GsmChar::Basic)
        .or_else(|| extension_septet(c).map(GsmChar::Extended))
}

fn basic_septet(c: char) -> Option<u8> {
    let septet = match c {
        // These ASCII ranges sit at the same code points in GSM-7.
        ' '..='#' | '%'..='?' | 'A'..='Z' | 'a'..='z' => c as u8,
        '@' => 0x00,
        '£' => 0x01,
        '$' => 0x02,
        '¥' => 0x03,
        'è' => 0x04,
        'é' => 0x05,
        'ù' => 0x06,
        'ì' => 0x07,
        'ò' => 0x08,
        'Ç' => 0x09,
        '\n' => 0x0A,
        'Ø' => 0x0B,
        'ø' => 0x0C,
        '\r' => 0x0D,
        'Å' => 0x0E,
        'å' => 0x0F,
        'Δ' => 0x10,
        '_' => 0x11,
        'Φ' => 0x12,
        'Γ' => 0x13,
        'Λ' => 0x14,
        'Ω' => 0x15,
        'Π' => 0x16,
        'Ψ' => 0x17,
        'Σ' => 0x18,
        'Θ' => 0x19,
        'Ξ' => 0x1A,
        'Æ' => 0x1C,
        'æ' => 0x1D,
        'ß' => 0x1E,
        'É' => 0x1F,
        '¤' => 0x24,
        '¡' => 0x40,
        'Ä' => 0x5B,
        'Ö' => 0x5C,
        'Ñ' => 0x5D,
        'Ü' => 0x5E,
        '§' => 0x5F,
        '¿' => 0x60,
        'ä' => 0x7B,
        'ö' => 0x7C,
        'ñ' => 0x7D,
        'ü' => 0x7E,
        'à' => 0x7F,
        _ => return None,
    };
    Some(septet)
}

fn extension_septet(c: char) -> Option<u8> {
    EXTENSION
        .iter()
        .find(|&&(_, ch)| ch == c)
        .map(|&(septet, _)| septet)
}

/// Turns unpacked septets (one per byte, escape pairs included) into text.
///
/// Following TS 23.038 §6.2.1.1: an escape followed by a code the extension
/// table does not define shows the default-alphabet character for that code,
/// and escape-escape (reserved for a further extension table) shows a space.
/// An escape with nothing after it is an error, because it means the sender
/// split an extension character across parts or truncated the text.
pub(crate) fn decode_septets(septets: &[u8]) -> Result<String, DecodeError> {
    let mut text = String::with_capacity(septets.len());
    let mut iter = septets.iter().map(|s| s & 0x7F);
    while let Some(septet) = iter.next() {
        if septet != ESCAPE {
            text.push(basic_char(septet));
            continue;
        }
        match iter.next() {
            None => return Err(DecodeError::DanglingEscape),
            Some(ESCAPE) => text.push(' '),
            Some(code) => {
                let extended = EXTENSION
                    .iter()
                    .find(|&&(septet, _)| septet == code)
                    .map(|&(_, ch)| ch);
                text.push(extended.unwrap_or_else(|| basic_char(code)));
            }
        }
    }
    Ok(text)
}

fn basic_char(septet: u8) -> char {
    // The mask keeps the index inside the table even for bytes above 0x7F.
    BASIC[usize::from(septet & 0x7F)]
}

/// Packs septets into octets, least significant bit first, as TS 23.038
/// §6.1.2.1.1 describes, leaving the first `skip` septet positions zero.
///
/// The skipped positions are where the user data header and its fill bits go
/// (TS 23.040 §9.2.3.24); the caller writes the header octets over them.
pub(crate) fn pack(septets: &[u8], skip: usize) -> Vec<u8> {
    let total_bits = (skip + septets.len()) * 7;
    let mut out = vec![0u8; total_bits.div_ceil(8)];
    for (i, &septet) in septets.iter().enumerate() {
        let bit = (skip + i) * 7;
        let value = u16::from(septet & 0x7F) << (bit % 8);
        let [low, high] = value.to_le_bytes();
        if let Some(octet) = out.get_mut(bit / 8) {
            *octet |= low;
        }
        if high != 0 {
            if let Some(octet) = out.get_mut(bit / 8 + 1) {
                *octet |= high;
            }
        }
    }
    out
}

/// Reads `count` septets from packed octets; `None` if the octets run out.
pub(crate) fn unpack(octets: &[u8], count: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let bit = i * 7;
        let low = *octets.get(bit / 8)?;
        // A septet straddles two octets unless it starts in bit 0 or 1.
        let high = if bit % 8 > 1 {
            *octets.get(bit / 8 + 1)?
        } else {
            0
        };
        let value = u16::from_le_bytes([low, high]) >> (bit % 8);
        out.push((value & 0x7F) as u8);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_lookup_is_the_inverse_of_the_table() {
        for (septet, &c) in BASIC.iter().enumerate() {
            if septet == usize::from(ESCAPE) {
                assert_eq!(encode_char(c), None, "U+001B must not become an escape");
                continue;
            }
            assert_eq!(
                encode_char(c),
                Some(GsmChar::Basic(septet as u8)),
                "character {c:?}"
            );
        }
    }

    #[test]
    fn extension_lookup_is_the_inverse_of_the_table() {
        for &(septet, c) in &EXTENSION {
            assert_eq!(encode_char(c), Some(GsmChar::Extended(septet)));
            assert_eq!(
                decode_septets(&[ESCAPE, septet]).expect("decodes"),
                c.to_string()
            );
        }
    }

    #[test]
    fn characters_outside_gsm7_need_ucs2() {
        for c in ['`', 'ç', '’', 'Ж', '😀', '\u{1B}', '\t'] {
            assert_eq!(encode_char(c), None, "character {c:?}");
        }
    }

    #[test]
    fn unknown_escapes_fall_back_as_the_spec_says() {
        assert_eq!(decode_septets(&[ESCAPE, 0x41]).expect("decodes"), "A");
        assert_eq!(decode_septets(&[ESCAPE, ESCAPE]).expect("decodes"), " ");
        assert_eq!(
            decode_septets(&[0x41, ESCAPE]),
            Err(DecodeError::DanglingEscape)
        );
    }

    #[test]
    fn pack_and_unpack_agree_at_every_offset() {
        let septets: Vec<u8> = (0..40u8).map(|i| i.wrapping_mul(37) & 0x7F).collect();
        for skip in 0..9 {
            let packed = pack(&septets, skip);
            let all = unpack(&packed, skip + septets.len()).expect("long enough");
            assert_eq!(&all[skip..], &septets[..], "skip {skip}");
            assert!(all[..skip].iter().all(|&s| s == 0));
        }
        assert_eq!(unpack(&[0xE8], 2), None);
    }
}
