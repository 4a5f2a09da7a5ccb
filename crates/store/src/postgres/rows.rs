//! Row mapping: how values of the domain are stored in columns and read back. A column that does
//! not hold what it should reads as an engine failure or as absent, never as a panic.

use tidings_core::Millis;
use tidings_proto::frame::ReceiptKind;
use tidings_proto::id::{DeviceId, MessageId};
use tokio_postgres::Row;

use crate::{IdentityKeys, Result, SignedKey, StoreError, Voucher};

pub(super) fn device_id(row: &Row, column: usize) -> Result<DeviceId> {
    let bytes: Vec<u8> = row.try_get(column)?;
    DeviceId::from_slice(&bytes).ok_or_else(|| StoreError::engine("a device id of a bad length"))
}

pub(super) fn message_id(row: &Row, column: usize) -> Result<MessageId> {
    let bytes: Vec<u8> = row.try_get(column)?;
    MessageId::from_slice(&bytes).ok_or_else(|| StoreError::engine("a message id of a bad length"))
}

pub(super) fn array<const N: usize>(row: &Row, column: usize) -> Result<[u8; N]> {
    let bytes: Vec<u8> = row.try_get(column)?;
    <[u8; N]>::try_from(bytes.as_slice()).map_err(|_| StoreError::engine("a key of a bad length"))
}

pub(super) fn optional_array<const N: usize>(row: &Row, column: usize) -> Result<Option<[u8; N]>> {
    let bytes: Option<Vec<u8>> = row.try_get(column)?;
    Ok(bytes.and_then(|bytes| <[u8; N]>::try_from(bytes.as_slice()).ok()))
}

/// Identity keys from two columns, absent unless both hold a key.
pub(super) fn identity(row: &Row, identity: usize, signing: usize) -> Result<Option<IdentityKeys>> {
    Ok(
        match (
            optional_array(row, identity)?,
            optional_array(row, signing)?,
        ) {
            (Some(identity_key), Some(signing_key)) => Some(IdentityKeys {
                identity_key,
                signing_key,
            }),
            _ => None,
        },
    )
}

pub(super) fn voucher(row: &Row, by: usize, signature: usize) -> Result<Option<Voucher>> {
    let by: Option<Vec<u8>> = row.try_get(by)?;
    let by = by.and_then(|by| DeviceId::from_slice(&by));
    Ok(match (by, optional_array(row, signature)?) {
        (Some(by), Some(signature)) => Some(Voucher { by, signature }),
        _ => None,
    })
}

pub(super) fn signed_key(row: &Row, key: usize, signature: usize) -> Result<Option<SignedKey>> {
    Ok(
        match (optional_array(row, key)?, optional_array(row, signature)?) {
            (Some(public_key), Some(signature)) => Some(SignedKey {
                public_key,
                signature,
            }),
            _ => None,
        },
    )
}

pub(super) fn millis(value: i64) -> Millis {
    Millis::try_from(value).unwrap_or(0)
}

pub(super) fn sql_millis(value: Millis) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(super) fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(super) fn receipt_kind(kind: i16) -> ReceiptKind {
    if kind == ReceiptKind::Expired as i16 {
        ReceiptKind::Expired
    } else {
        ReceiptKind::Delivered
    }
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
