//! What a client decodes from a delivered copy: the `Envelope` around the Olm message, the Olm
//! message itself (vodozemac), and the `Content` inside once decrypted. Checks that no input
//! panics and that each decodes, encodes and decodes again to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use tidings_proto::frame::{Content, Envelope};
use vodozemac::olm::OlmMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(envelope) = Envelope::decode(data) {
        let _ = format!("{envelope:?}");
        assert_eq!(
            Envelope::decode(envelope.encode_to_vec().as_slice()).as_ref(),
            Ok(&envelope)
        );
        // As `Crypto::decrypt` reads it.
        if let Ok(message_type) = usize::try_from(envelope.olm_type) {
            if let Ok(message) = OlmMessage::from_parts(message_type, &envelope.ciphertext) {
                let (message_type, ciphertext) = message.to_parts();
                let again = OlmMessage::from_parts(message_type, &ciphertext)
                    .expect("an Olm message encoded again decodes");
                assert_eq!(again.to_parts(), (message_type, ciphertext));
            }
        }
    }
    // Olm's own framing, whatever the envelope: the fuzzer finds it faster without one.
    for message_type in [0, 1] {
        let _ = OlmMessage::from_parts(message_type, data);
    }
    if let Ok(content) = Content::decode(data) {
        let _ = format!("{content:?}");
        assert_eq!(
            Content::decode(content.encode_to_vec().as_slice()).as_ref(),
            Ok(&content)
        );
        // The client checks the sender's number it claims.
        let _ = tidings_proto::number::E164::parse(&content.from);
    }
});
