//! SMS-SUBMIT PDUs read back (`tidings_sms::decode_submit`, as a simulated modem reads what
//! `AT+CMGS` was given), and SMS-DELIVER PDUs (`tidings_sms::decode_deliver`, what a modem lists
//! as received). Checks that no input panics, that the hex and binary decoders agree,
//! and that any text, encoded into parts, decodes back to itself part by part.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tidings_sms::{
    decode_deliver, decode_deliver_hex, decode_submit, decode_submit_hex, encode_submit, to_hex,
    SubmitOptions,
};

fuzz_target!(|data: &[u8]| {
    let decoded = decode_submit(data);
    assert_eq!(decode_submit_hex(&to_hex(data)), decoded);
    assert_eq!(decode_deliver_hex(&to_hex(data)), decode_deliver(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = decode_submit_hex(text);
        let Ok(pdus) = encode_submit("+4915112345678", text, &SubmitOptions::default()) else {
            return;
        };
        let mut read_back = String::new();
        for pdu in &pdus {
            let part = decode_submit_hex(&pdu.hex).expect("an encoded PDU decodes");
            assert_eq!(part.tpdu_length, pdu.tpdu_length);
            assert_eq!(part.destination, "+4915112345678");
            read_back.push_str(&part.text);
        }
        assert_eq!(
            read_back, text,
            "a text does not survive encoding and decoding"
        );
    }
});
