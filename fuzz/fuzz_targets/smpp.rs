//! What an SMSC sends over SMPP, as the SMPP transport reads it (the `rusmpp` codec, then our
//! delivery-receipt parser). Checks that no input panics and that every command read encodes;
//! where those bytes decode, they carry the same sequence number (the session matches answers by
//! it) and encode again to the same bytes. `rusmpp` is lenient where we never write back what an
//! SMSC sent: it reads a `generic_nack` without a body as no PDU (and writes it back as an empty
//! one), and writes some fields of an error response it read in a form it does not read again.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tidings_gateway::fuzzing::rusmpp::tokio_codec::CommandCodec;
use tidings_gateway::fuzzing::smpp_commands;
use tokio_util::codec::{Decoder as _, Encoder as _};

fuzz_target!(|data: &[u8]| {
    for (command, receipt) in smpp_commands(data) {
        if let Some((_, receipt)) = receipt {
            let _ = receipt.describe();
        }
        let mut codec = CommandCodec::new().without_max_length();
        let mut encoded = BytesMut::new();
        codec
            .encode(&command, &mut encoded)
            .expect("a decoded command encodes");
        let first = encoded.clone();
        let Ok(again) = codec.decode(&mut encoded) else {
            continue;
        };
        let again = again.expect("an encoded command is whole");
        assert!(encoded.is_empty());
        assert_eq!(again.sequence_number(), command.sequence_number());
        codec
            .encode(&again, &mut encoded)
            .expect("a decoded command encodes");
        assert_eq!(encoded, first);
    }
});
