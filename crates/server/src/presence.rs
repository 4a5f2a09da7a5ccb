//! Presence as its owner chooses (promise P7): `PresenceSet`, which a session sends after its
//! login to say who may see its device online, and the checks of the proofs a lookup or a send
//! presents. The setting lives in the hub with the session, in memory only: nothing about
//! presence is ever written, and it is gone when the session ends or the account opts out.

use tidings_core::presence::{Mode, Secret, Setting};
use tidings_proto::frame::{self, ErrorCode, Kind, PresenceMode};
use tidings_proto::id::DeviceId;
use tidings_proto::PRESENCE_KEY_BYTES;
use tidings_store::Store;

use crate::hub::Outbox;
use crate::identity::Identity;
use crate::reply::{error, reply};
use crate::state::Shared;

/// Handles `PresenceSet`: the session's device shows itself online as it says, from now on and
/// while the session lasts.
pub async fn set<S: Store>(
    state: &Shared<S>,
    identity: Identity,
    request: frame::PresenceSet,
    outbox: &Outbox,
) {
    let request_id = request.request_id;
    let setting = match setting_of(&request) {
        Ok(setting) => setting,
        Err(message) => {
            return reply(
                outbox,
                error(ErrorCode::InvalidRequest, message, request_id),
            )
            .await
        }
    };
    // The session is registered while it runs its requests; a session already gone has nobody
    // to show anything to.
    state.hub.set_presence(&identity.device, outbox, setting);
    reply(
        outbox,
        Kind::PresenceSetResult(frame::PresenceSetResult { request_id }),
    )
    .await;
}

/// The setting a `PresenceSet` asks for, or why it is not one.
fn setting_of(request: &frame::PresenceSet) -> Result<Setting, String> {
    let mode = match PresenceMode::try_from(request.mode) {
        Ok(PresenceMode::Contacts) => Mode::Contacts,
        Ok(PresenceMode::Everyone) => Mode::Everyone,
        Ok(PresenceMode::Nobody) => Mode::Nobody,
        Err(_) => return Err("unknown presence mode".into()),
    };
    let key = match (mode, request.key.len()) {
        (Mode::Nobody, 0) => [0; PRESENCE_KEY_BYTES],
        (_, PRESENCE_KEY_BYTES) => secret(&request.key).unwrap_or_default(),
        _ => {
            return Err(format!(
                "the presence key must be {PRESENCE_KEY_BYTES} bytes"
            ))
        }
    };
    Ok(Setting { mode, key })
}

fn secret(bytes: &[u8]) -> Option<Secret> {
    <Secret>::try_from(bytes).ok()
}

/// The proofs of a lookup or a send as (device, MAC), at most `most`, each of the right shape,
/// or why they are not. A proof's account, when given, must be a pseudonym's 32 bytes; the
/// device id alone says which device it is for (device ids are unique).
pub fn parse_proofs(
    proofs: &[frame::PresenceProof],
    most: usize,
) -> Result<Vec<(DeviceId, Secret)>, String> {
    if proofs.len() > most {
        return Err(format!("at most {most} presence proofs per request"));
    }
    proofs
        .iter()
        .map(|proof| {
            if !(proof.account.is_empty() || proof.account.len() == 32) {
                return Err("a presence proof's account must be 32 bytes".to_string());
            }
            let device = DeviceId::from_slice(&proof.device_id)
                .ok_or_else(|| "a presence proof's device id must be 16 bytes".to_string())?;
            let mac = secret(&proof.mac).ok_or_else(|| {
                format!("a presence proof's mac must be {PRESENCE_KEY_BYTES} bytes")
            })?;
            Ok((device, mac))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_settings_and_proofs_are_refused_with_a_reason() {
        let set = |mode: i32, key: Vec<u8>| {
            setting_of(&frame::PresenceSet {
                request_id: 1,
                mode,
                key,
            })
        };
        assert!(set(PresenceMode::Contacts as i32, vec![1; 32]).is_ok());
        assert!(set(PresenceMode::Nobody as i32, Vec::new()).is_ok());
        for (mode, key) in [
            (PresenceMode::Contacts as i32, vec![1; 31]),
            (PresenceMode::Everyone as i32, Vec::new()),
            (PresenceMode::Contacts as i32, vec![1; 33]),
            (7, vec![1; 32]),
        ] {
            assert!(set(mode, key).is_err());
        }
        let proof = |account: usize, device: usize, mac: usize| frame::PresenceProof {
            account: vec![1; account],
            device_id: vec![2; device],
            mac: vec![3; mac],
        };
        assert_eq!(
            parse_proofs(&[proof(32, 16, 32), proof(0, 16, 32)], 2).map(|p| p.len()),
            Ok(2)
        );
        for bad in [proof(31, 16, 32), proof(32, 15, 32), proof(32, 16, 31)] {
            assert!(parse_proofs(&[bad], 2).is_err());
        }
        assert!(parse_proofs(&vec![proof(0, 16, 32); 3], 2).is_err());
    }
}
