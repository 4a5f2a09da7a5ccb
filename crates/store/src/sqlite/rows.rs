//! Row mapping: how values of the domain are stored in columns and read back.
//!
//! Pure conversions, no statements. A column that does not hold what it should reads as an
//! error or as absent, never as a panic.

use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};

use crate::{IdentityKeys, SignedKey, Voucher};

pub(super) fn device_id(bytes: Vec<u8>) -> rusqlite::Result<DeviceId> {
    DeviceId::from_slice(&bytes).ok_or(rusqlite::Error::InvalidQuery)
}

pub(super) fn identity_of(
    identity_key: Option<Vec<u8>>,
    signing_key: Option<Vec<u8>>,
) -> Option<IdentityKeys> {
    Some(IdentityKeys {
        identity_key: <[u8; 32]>::try_from(identity_key?.as_slice()).ok()?,
        signing_key: <[u8; 32]>::try_from(signing_key?.as_slice()).ok()?,
    })
}

pub(super) fn signed_key(public_key: Vec<u8>, signature: Vec<u8>) -> Option<SignedKey> {
    Some(SignedKey {
        public_key: <[u8; 32]>::try_from(public_key.as_slice()).ok()?,
        signature: <[u8; 64]>::try_from(signature.as_slice()).ok()?,
    })
}

pub(super) fn voucher_of(by: Option<Vec<u8>>, signature: Option<Vec<u8>>) -> Option<Voucher> {
    Some(Voucher {
        by: DeviceId::from_slice(&by?)?,
        signature: <[u8; 64]>::try_from(signature?.as_slice()).ok()?,
    })
}

pub(super) fn message_id(bytes: Vec<u8>) -> rusqlite::Result<MessageId> {
    MessageId::from_slice(&bytes).ok_or(rusqlite::Error::InvalidQuery)
}

pub(super) fn pack_times(times: &[Millis]) -> Vec<u8> {
    times.iter().flat_map(|t| t.to_le_bytes()).collect()
}

pub(super) fn unpack_times(bytes: &[u8]) -> Vec<Millis> {
    bytes
        .chunks_exact(8)
        .filter_map(|chunk| <[u8; 8]>::try_from(chunk).ok().map(Millis::from_le_bytes))
        .collect()
}

pub(super) fn millis(value: i64) -> Millis {
    Millis::try_from(value).unwrap_or(0)
}

pub(super) fn sql_millis(value: Millis) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn receipt_kind(kind: i64) -> ReceiptKind {
    if kind == ReceiptKind::Expired as i64 {
        ReceiptKind::Expired
    } else {
        ReceiptKind::Delivered
    }
}
