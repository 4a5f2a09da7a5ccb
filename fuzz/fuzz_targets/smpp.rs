//! What an SMSC sends over SMPP, as the SMPP transport reads it (the `rusmpp` codec, then our
//! delivery-receipt parser). Checks that no input panics and that every command read encodes
//! and decodes again to itself.
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
        let again = codec
            .decode(&mut encoded)
            .expect("an encoded command decodes")
            .expect("and is whole");
        assert_eq!(again, command);
        assert!(encoded.is_empty());
    }
});
