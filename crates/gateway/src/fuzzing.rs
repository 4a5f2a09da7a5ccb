//! Entry points for the fuzz targets in `fuzz/` (compiled only with the `fuzzing` feature): the
//! parsers that read what an SMSC or a modem sends, run on bytes without a socket or a serial
//! port, exactly as the transports run them.

pub use rusmpp;

use crate::smpp::Receipt;

/// Every SMPP command in `bytes`, decoded as the SMPP session decodes what the SMSC sends, each
/// with the delivery receipt it carries (if it is one); stops at the first unreadable PDU.
pub fn smpp_commands(bytes: &[u8]) -> Vec<(rusmpp::Command, Option<(String, Receipt)>)> {
    crate::smpp::commands_in(bytes)
}

/// Every answer of a modem in `chunks`, read as they would arrive one after another, in their
/// `Debug` form; `prompt` as when waiting for the `>` prompt after `AT+CMGS`.
pub fn modem_answers(chunks: &[&[u8]], prompt: bool) -> Vec<String> {
    crate::modem::answers_in(chunks, prompt)
}

/// The received messages a modem's `AT+CMGL=4` answer lists (its information lines), as
/// (index, sender, text), decoded as the modem transport decodes them.
pub fn modem_listing(lines: &[String]) -> Vec<(u32, Option<(String, String)>)> {
    crate::modem::listed_in(lines)
}
