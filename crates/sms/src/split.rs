//! Choosing the data coding and splitting a text into SMS parts.

use crate::gsm7::{self, GsmChar};
use crate::EncodeError;

/// Septets in a single GSM 7-bit SMS (TS 23.038 §6.1.2.1).
pub const GSM7_SINGLE_SEPTETS: usize = 160;
/// Septets left in a concatenated GSM 7-bit part after the 6-octet header
/// (48 bits plus 1 fill bit take 7 septets).
pub const GSM7_PART_SEPTETS: usize = 153;
/// UTF-16 code units in a single UCS-2 SMS (140 octets).
pub const UCS2_SINGLE_UNITS: usize = 70;
/// UTF-16 code units left in a concatenated UCS-2 part after the header.
pub const UCS2_PART_UNITS: usize = 67;
/// The default for [`SplitOptions::max_parts`].
pub const DEFAULT_MAX_PARTS: u8 = 10;

/// The `esm_class` bit an SMPP `submit_sm` sets when `short_message` starts
/// with a user data header (SMPP 3.4 §5.2.12, "UDHI indicator").
pub const SMPP_ESM_CLASS_UDHI: u8 = 0x40;

/// The user data header information element for concatenated messages with
/// an 8-bit reference (TS 23.040 §9.2.3.24.1).
const IEI_CONCAT_8BIT: u8 = 0x00;

/// How the text of a message is coded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataCoding {
    /// GSM 7-bit default alphabet with the default extension table.
    Gsm7,
    /// UCS-2, sent as UTF-16 big-endian so that characters outside the Basic
    /// Multilingual Plane travel as surrogate pairs.
    Ucs2,
}

impl DataCoding {
    /// The TP-DCS octet of an SMS-SUBMIT (TS 23.038 §4): 0x00 or 0x08.
    pub const fn tp_dcs(self) -> u8 {
        match self {
            DataCoding::Gsm7 => 0x00,
            DataCoding::Ucs2 => 0x08,
        }
    }

    /// The SMPP `data_coding` value: 0x00 (SMSC default alphabet, which a
    /// GSM SMSC takes as unpacked GSM 7-bit) or 0x08 (UCS-2).
    pub const fn smpp_data_coding(self) -> u8 {
        self.tp_dcs()
    }

    /// The Kannel sendsms `coding` value: 0 (7-bit) or 2 (UCS-2).
    pub const fn kannel_coding(self) -> u8 {
        match self {
            DataCoding::Gsm7 => 0,
            DataCoding::Ucs2 => 2,
        }
    }

    /// Units one SMS holds: 160 septets or 70 UTF-16 code units without a
    /// header, 153 or 67 with the concatenation header.
    pub const fn capacity(self, concatenated: bool) -> usize {
        match (self, concatenated) {
            (DataCoding::Gsm7, false) => GSM7_SINGLE_SEPTETS,
            (DataCoding::Gsm7, true) => GSM7_PART_SEPTETS,
            (DataCoding::Ucs2, false) => UCS2_SINGLE_UNITS,
            (DataCoding::Ucs2, true) => UCS2_PART_UNITS,
        }
    }
}

/// The concatenation information element of a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Concat {
    /// Reference shared by all parts of one message. The encoder only writes
    /// 8-bit references; the decoder also reads 16-bit ones.
    pub reference: u16,
    /// Number of parts in the message.
    pub total: u8,
    /// This part's position, starting at 1.
    pub sequence: u8,
}

/// Options for [`split`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitOptions {
    /// The most parts a message may take; a longer text is an error rather
    /// than a silently huge bill. Default 10.
    pub max_parts: u8,
    /// The concatenation reference written in every part's header.
    ///
    /// The caller must vary it between messages to the same recipient (for
    /// example a per-recipient counter): a handset that sees two messages
    /// with the same reference in flight mixes their parts. The crate cannot
    /// choose one itself because it has no state and no randomness.
    pub reference: u8,
}

impl Default for SplitOptions {
    fn default() -> Self {
        Self {
            max_parts: DEFAULT_MAX_PARTS,
            reference: 0,
        }
    }
}

/// One SMS of a message, in the form an SMPP or HTTP gateway needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The data coding of every part of the message.
    pub coding: DataCoding,
    /// The slice of the original text this part carries (for Kannel's
    /// `text` together with `udh` and `coding`).
    pub text: String,
    /// The complete user data header, starting with its length octet
    /// (`05 00 03 ref total seq`), or empty for an unsplit message.
    pub udh: Vec<u8>,
    /// The text as user data: unpacked GSM septets (0..=127, one per byte,
    /// extension characters as escape pairs) or UTF-16BE bytes.
    pub user_data: Vec<u8>,
    /// The concatenation element, if the message has several parts.
    pub concat: Option<Concat>,
}

impl Part {
    /// Length of the text in septets (GSM 7-bit) or UTF-16 code units
    /// (UCS-2), not counting the header.
    pub fn units(&self) -> usize {
        match self.coding {
            DataCoding::Gsm7 => self.user_data.len(),
            DataCoding::Ucs2 => self.user_data.len() / 2,
        }
    }

    /// The SMPP `short_message`: the header (if any) followed by the user
    /// data. GSM text stays unpacked because the SMSC packs it.
    pub fn short_message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.udh.len() + self.user_data.len());
        out.extend_from_slice(&self.udh);
        out.extend_from_slice(&self.user_data);
        out
    }

    /// The SMPP `esm_class` to send with [`Part::short_message`]: the UDHI
    /// bit when there is a header, otherwise 0 (default mode and type).
    pub fn esm_class(&self) -> u8 {
        if self.udh.is_empty() {
            0
        } else {
            SMPP_ESM_CLASS_UDHI
        }
    }
}

/// The coding a text will be sent with: GSM 7-bit if every character is in
/// the default alphabet or its extension table, otherwise UCS-2.
///
/// One character outside GSM-7 (a curly apostrophe, an emoji) switches the
/// whole message to UCS-2 and so cuts a part from 160 to 70 characters; that
/// is the standard's rule and this crate never substitutes look-alikes.
pub fn coding_for(text: &str) -> DataCoding {
    if text.chars().all(|c| gsm7::encode_char(c).is_some()) {
        DataCoding::Gsm7
    } else {
        DataCoding::Ucs2
    }
}

/// Splits a text into SMS parts: one part if it fits a single SMS,
/// otherwise concatenated parts with 8-bit-reference headers.
///
/// Parts are cut only between characters, so an extension character (two
/// septets) or a surrogate pair (two code units) is never split, even if
/// that leaves a part one unit short of full.
pub fn split(text: &str, options: &SplitOptions) -> Result<Vec<Part>, EncodeError> {
    let coding = coding_for(text);
    let ranges = match coding {
        DataCoding::Gsm7 => ranges(text, coding, |c| {
            gsm7::encode_char(c).map_or(1, GsmChar::septets)
        }),
        DataCoding::Ucs2 => ranges(text, coding, char::len_utf16),
    };
    let total = ranges.len();
    // The header stores the total in one octet, and `max_parts` is a `u8`,
    // so this check also guarantees that `total` fits the header.
    let total_u8 = match u8::try_from(total) {
        Ok(n) if n <= options.max_parts => n,
        _ => {
            return Err(EncodeError::TooManyParts {
                needed: total,
                limit: options.max_parts,
            })
        }
    };
    let mut parts = Vec::with_capacity(total);
    for (sequence, (start, end)) in (1..=total_u8).zip(ranges) {
        let piece = text.get(start..end).unwrap_or_default();
        let concat = (total_u8 > 1).then_some(Concat {
            reference: u16::from(options.reference),
            total: total_u8,
            sequence,
        });
        let udh = match concat {
            Some(_) => vec![
                0x05,
                IEI_CONCAT_8BIT,
                0x03,
                options.reference,
                total_u8,
                sequence,
            ],
            None => Vec::new(),
        };
        parts.push(Part {
            coding,
            text: piece.to_owned(),
            udh,
            user_data: user_data(piece, coding),
            concat,
        });
    }
    Ok(parts)
}

/// Byte ranges of `text` for each part, given the units each character takes.
fn ranges(text: &str, coding: DataCoding, units: impl Fn(char) -> usize) -> Vec<(usize, usize)> {
    let total: usize = text.chars().map(&units).sum();
    if total <= coding.capacity(false) {
        return vec![(0, text.len())];
    }
    let capacity = coding.capacity(true);
    let mut out = Vec::new();
    let mut start = 0;
    let mut used = 0;
    for (index, c) in text.char_indices() {
        let n = units(c);
        if used + n > capacity {
            out.push((start, index));
            start = index;
            used = 0;
        }
        used += n;
    }
    out.push((start, text.len()));
    out
}

fn user_data(text: &str, coding: DataCoding) -> Vec<u8> {
    match coding {
        DataCoding::Gsm7 => {
            let mut septets = Vec::with_capacity(text.len());
            for c in text.chars() {
                // `coding_for` already checked that every character maps.
                if let Some(g) = gsm7::encode_char(c) {
                    g.push_to(&mut septets);
                }
            }
            septets
        }
        DataCoding::Ucs2 => text.encode_utf16().flat_map(u16::to_be_bytes).collect(),
    }
}
