//! Errors for encoding and decoding.
//!
//! Messages never contain the phone number or the message text, because
//! callers may log errors and both are personal data.

use thiserror::Error;

/// Why a text could not be turned into SMS parts or PDUs.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EncodeError {
    /// The text needs more concatenated parts than the configured limit.
    #[error("the message needs {needed} SMS parts but at most {limit} are allowed")]
    TooManyParts {
        /// How many parts the text would need.
        needed: usize,
        /// The configured maximum (`SplitOptions::max_parts`).
        limit: u8,
    },
    /// The destination is not `+` followed by 1 to 20 digits.
    #[error(
        "the destination is not an international number (+ followed by 1 to 20 digits): {reason}"
    )]
    InvalidDestination {
        /// What is wrong with it, without repeating the number.
        reason: &'static str,
    },
}

/// Why a PDU could not be read. Decoding never panics, whatever the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The hex string has an odd number of digits.
    #[error("the PDU hex string has an odd length ({length} characters)")]
    OddHexLength {
        /// Length of the string in characters.
        length: usize,
    },
    /// The hex string contains something that is not a hex digit.
    #[error("the PDU hex string has a non-hex character at byte {position}")]
    InvalidHex {
        /// Zero-based byte offset in the string.
        position: usize,
    },
    /// The PDU ended in the middle of a field.
    #[error("the PDU ends at octet {offset} while reading {field}")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Octet offset (from the start of the PDU) where data ran out.
        offset: usize,
    },
    /// Octets remain after the user data that TP-UDL announced.
    #[error("the PDU has {extra} octet(s) after the user data announced by TP-UDL")]
    TrailingData {
        /// How many octets are left over.
        extra: usize,
    },
    /// The first octet says this is not an SMS-SUBMIT.
    #[error("the PDU is not an SMS-SUBMIT (TP-MTI is {mti}, expected 1)")]
    NotSubmit {
        /// The TP-MTI value found.
        mti: u8,
    },
    /// The first octet says this is not an SMS-DELIVER.
    #[error("the PDU is not an SMS-DELIVER (TP-MTI is {mti}, expected 0)")]
    NotDeliver {
        /// The TP-MTI value found.
        mti: u8,
    },
    /// The data coding scheme is not GSM 7-bit or UCS-2 (e.g. 8-bit data or
    /// compressed text).
    #[error(
        "unsupported data coding scheme 0x{dcs:02X} (only GSM 7-bit and UCS-2 text are supported)"
    )]
    UnsupportedDataCoding {
        /// The TP-DCS octet.
        dcs: u8,
    },
    /// An address field is longer than TS 23.040 §9.1.2.5 allows.
    #[error("the {field} is too long ({length})")]
    AddressTooLong {
        /// Which address.
        field: &'static str,
        /// The length found in the PDU (digits, or octets for the SMSC).
        length: u8,
    },
    /// An address contains a semi-octet that is not a digit, `*`, `#`, `a`,
    /// `b` or `c`, or a filler where a digit should be.
    #[error("the {field} contains an invalid semi-octet 0x{nibble:X}")]
    InvalidAddressDigit {
        /// Which address.
        field: &'static str,
        /// The offending semi-octet.
        nibble: u8,
    },
    /// TP-UDL is larger than one SMS can carry.
    #[error("TP-UDL {udl} exceeds the maximum of {max} for this data coding")]
    UserDataTooLong {
        /// The TP-UDL octet.
        udl: u8,
        /// 160 septets for GSM 7-bit, 140 octets for UCS-2.
        max: u8,
    },
    /// The user data header does not fit or its elements overrun it.
    #[error("invalid user data header: {reason}")]
    InvalidUdh {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// UCS-2 user data with an odd number of octets.
    #[error("UCS-2 user data has an odd number of octets ({length})")]
    OddUcs2Length {
        /// Octets of text after the header.
        length: usize,
    },
    /// UCS-2 user data with a lone UTF-16 surrogate, e.g. an emoji split
    /// across two parts by the sender.
    #[error("UCS-2 user data contains an unpaired UTF-16 surrogate")]
    UnpairedSurrogate,
    /// GSM 7-bit user data ending in an escape septet, e.g. an extension
    /// character split across two parts by the sender.
    #[error("GSM 7-bit user data ends with an escape septet that has no character after it")]
    DanglingEscape,
}
