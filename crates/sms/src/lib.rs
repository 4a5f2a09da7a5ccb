//! SMS text encoding for Tidings, following 3GPP TS 23.038 (alphabets) and
//! TS 23.040 (SMS-SUBMIT, user data headers). It is what the SMS fallback
//! and verification codes use to turn a text into parts: the GSM 7-bit
//! default alphabet with its extension table when the text fits it,
//! otherwise UCS-2 (UTF-16 big-endian); concatenated parts with an 8-bit
//! reference header, never splitting an extension character or a surrogate
//! pair; SMS-SUBMIT PDUs for a modem's `AT+CMGS` in PDU mode; the user data,
//! header and coding an SMPP `submit_sm` or a Kannel HTTP request needs; and
//! a decoder that reads SMS-SUBMIT PDUs back for tests and simulated modems,
//! and one for the SMS-DELIVER PDUs a modem lists when it receives a message.
//!
//! This crate must never perform I/O (no files, sockets, clocks or
//! randomness) and never logs anything: message texts and phone numbers are
//! personal data, so they only ever leave through the values it returns,
//! and its error messages do not repeat them. All input is treated as
//! untrusted: nothing here panics on any text or any PDU.
//!
//! ```
//! use tidings_sms::{encode_submit, SubmitOptions};
//!
//! let pdus = encode_submit("+46708251358", "hellohello", &SubmitOptions::default())?;
//! assert_eq!(pdus[0].hex, "0001000B916407281553F800000AE8329BFD4697D9EC37");
//! assert_eq!(pdus[0].tpdu_length, 22); // AT+CMGS=22
//! # Ok::<(), tidings_sms::EncodeError>(())
//! ```

mod error;
mod gsm7;
mod pdu;
mod split;

pub use error::{DecodeError, EncodeError};
pub use pdu::{
    decode_deliver, decode_deliver_hex, decode_submit, decode_submit_hex, encode_submit, from_hex,
    to_hex, DecodedDeliver, DecodedSubmit, InformationElement, SubmitOptions, SubmitPdu, Validity,
    ValidityPeriod,
};
pub use split::{
    coding_for, split, Concat, DataCoding, Part, SplitOptions, DEFAULT_MAX_PARTS,
    GSM7_PART_SEPTETS, GSM7_SINGLE_SEPTETS, SMPP_ESM_CLASS_UDHI, UCS2_PART_UNITS,
    UCS2_SINGLE_UNITS,
};
