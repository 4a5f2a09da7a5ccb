//! Frames to bytes and back: a 4-byte big-endian length, then one protobuf `Frame`.
//!
//! No I/O here: the caller owns the socket and hands bytes in. Every length is checked against
//! [`MAX_FRAME_BYTES`] (or a smaller bound the caller gives, such as
//! [`crate::MAX_LOGIN_FRAME_BYTES`]) before anything is allocated for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::frame::Frame;
use crate::MAX_FRAME_BYTES;

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    /// The length prefix is larger than the reader accepts here.
    #[error("frame of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The length the prefix announced.
        len: usize,
        /// The largest frame the reader accepts at this point.
        limit: usize,
    },
    /// A zero length prefix: no frame is empty.
    #[error("empty frame")]
    Empty,
    /// The body is not a protobuf `Frame`.
    #[error("frame does not decode: {0}")]
    Malformed(String),
    /// The frame decodes but carries nothing this version knows.
    #[error("frame carries no known message")]
    UnknownKind,
}

/// Appends one encoded frame to `out`.
pub fn encode(frame: &Frame, out: &mut BytesMut) {
    let len = frame.encoded_len();
    out.reserve(4 + len);
    // `len` fits u32: every frame we build is bounded by MAX_FRAME_BYTES; clamp defensively.
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    // Encoding into a buffer with enough reserved capacity cannot fail.
    let _ = frame.encode(out);
}

/// Encodes one frame into fresh bytes.
pub fn encode_to_bytes(frame: &Frame) -> Bytes {
    let mut out = BytesMut::new();
    encode(frame, &mut out);
    out.freeze()
}

/// How many bytes the next frame needs in total (prefix included), if the prefix is in `buf`.
/// Fails as soon as the prefix announces an impossible size, before its body is read.
pub fn needed(buf: &[u8]) -> Result<Option<usize>, CodecError> {
    needed_within(buf, MAX_FRAME_BYTES)
}

/// [`needed`] for a frame of at most `limit` bytes (without its prefix).
pub fn needed_within(buf: &[u8], limit: usize) -> Result<Option<usize>, CodecError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(CodecError::Empty);
    }
    if len > limit.min(MAX_FRAME_BYTES) {
        return Err(CodecError::TooLarge {
            len,
            limit: limit.min(MAX_FRAME_BYTES),
        });
    }
    Ok(Some(4 + len))
}

/// Takes one whole frame off the front of `buf`, if one is there.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
    decode_within(buf, MAX_FRAME_BYTES)
}

/// [`decode`] for a frame of at most `limit` bytes (without its prefix).
pub fn decode_within(buf: &mut BytesMut, limit: usize) -> Result<Option<Frame>, CodecError> {
    let Some(total) = needed_within(buf, limit)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    buf.advance(4);
    let body = buf.split_to(total - 4).freeze();
    let frame = Frame::decode(body).map_err(|e| CodecError::Malformed(e.to_string()))?;
    if frame.kind.is_none() {
        return Err(CodecError::UnknownKind);
    }
    Ok(Some(frame))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Kind, Ping, Send, SendMode};

    fn check(bytes: &[u8], expected: Result<Option<Frame>, CodecError>) {
        let mut buf = BytesMut::from(bytes);
        assert_eq!(decode(&mut buf), expected, "{bytes:02x?}");
    }

    #[test]
    fn round_trip_and_bad_input() {
        let ping: Frame = Kind::Ping(Ping { nonce: 7 }).into();
        let encoded = encode_to_bytes(&ping);
        check(&encoded, Ok(Some(ping.clone())));
        check(&encoded[..3], Ok(None));
        check(&encoded[..encoded.len() - 1], Ok(None));
        check(&[0, 0, 0, 0], Err(CodecError::Empty));
        let too_large = |len: usize| {
            Err(CodecError::TooLarge {
                len,
                limit: MAX_FRAME_BYTES,
            })
        };
        check(&[0, 2, 0, 0], too_large(0x20000));
        check(&[0xff, 0xff, 0xff, 0xff], too_large(u32::MAX as usize));
        let mut malformed = BytesMut::from(&[0u8, 0, 0, 2, 0xff, 0xff][..]);
        assert!(matches!(
            decode(&mut malformed),
            Err(CodecError::Malformed(_))
        ));
        // A frame of only an unknown field (field 99, varint 1) decodes to nothing we know.
        check(
            &[0, 0, 0, 3, 0x98, 0x06, 0x01],
            Err(CodecError::UnknownKind),
        );
    }

    #[test]
    fn a_smaller_bound_refuses_at_the_prefix() {
        let ping = encode_to_bytes(&Kind::Ping(Ping { nonce: 7 }).into());
        let mut buf = BytesMut::from(&ping[..]);
        assert!(matches!(decode_within(&mut buf, 64), Ok(Some(_))));
        let mut buf = BytesMut::from(&[0u8, 0, 1, 1][..]);
        assert_eq!(
            decode_within(&mut buf, 256),
            Err(CodecError::TooLarge {
                len: 257,
                limit: 256
            })
        );
        // A bound above the general one is the general one.
        assert_eq!(
            needed_within(&[0, 2, 0, 0], usize::MAX),
            Err(CodecError::TooLarge {
                len: 0x20000,
                limit: MAX_FRAME_BYTES
            })
        );
    }

    #[test]
    fn unknown_fields_are_dropped() {
        // A Send with an extra field 15 ("imei") still decodes, and re-encoding drops the field.
        let send = Send {
            id: vec![1; 16],
            to_account: vec![2; 32],
            mode: SendMode::Queue as i32,
            payload: Bytes::from_static(b"x"),
            ..Send::default()
        };
        let mut body = prost::Message::encode_to_vec(&Frame::from(Kind::Send(send.clone())));
        let stray = b"356938035643809";
        // Field 15 of Frame, wire type 2 (length-delimited).
        body.extend_from_slice(&[0x7a, stray.len() as u8]);
        body.extend_from_slice(stray);
        let mut framed = BytesMut::new();
        framed.put_u32(body.len() as u32);
        framed.extend_from_slice(&body);
        let decoded = decode(&mut framed).expect("decodes").expect("whole frame");
        let again = encode_to_bytes(&decoded);
        assert!(!again.windows(stray.len()).any(|w| w == stray));
        assert_eq!(decoded, Frame::from(Kind::Send(send)));
    }
}
