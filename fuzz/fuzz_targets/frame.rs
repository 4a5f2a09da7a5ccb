//! The session stream, as either side reads it: 4-byte length prefixes and protobuf `Frame`s
//! (`tidings_proto::codec`). Checks that no input panics, that the stream decodes to the same
//! frames however it is cut into reads, and that every frame decoded re-encodes to itself.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tidings_proto::codec::{self, CodecError};
use tidings_proto::frame::Frame;
use tidings_proto::MAX_FRAME_BYTES;

/// Decodes frames off `chunks` as they arrive, like a session's read loop: the frames and the
/// error that ended the stream, if one did.
fn read(chunks: &[&[u8]]) -> (Vec<Frame>, Option<CodecError>) {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            let needed = codec::needed(&buf);
            match codec::decode(&mut buf) {
                Ok(Some(frame)) => {
                    // What `needed` announced is exactly what `decode` took.
                    assert_eq!(needed, Ok(Some(before - buf.len())));
                    frames.push(frame);
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = read(&[stream]);
    let cut = usize::from(cut).min(stream.len());
    let (head, tail) = stream.split_at(cut);
    assert_eq!(
        read(&[head, tail]),
        whole,
        "the frames depend on how reads cut the stream"
    );

    for frame in &whole.0 {
        // What the client and server do with every frame they read.
        let _ = format!("{frame:?}");
        let _ = frame.kind.as_ref().and_then(|kind| kind.answer_to());
        let encoded = codec::encode_to_bytes(frame);
        if encoded.len() - 4 > MAX_FRAME_BYTES {
            // Non-minimal varints can make a frame longer when encoded again; it is never
            // sent again, so only the bound matters.
            continue;
        }
        let mut again = BytesMut::from(&encoded[..]);
        assert_eq!(codec::decode(&mut again), Ok(Some(frame.clone())));
        assert!(again.is_empty());
    }
});
