//! Other people: whether numbers can be reached now (lookup), the safety number with a contact,
//! and trusting a contact's current keys after comparing it.
//!
//! Numbers looked up go to the server as the user typed them, over the session; nothing here
//! keeps them or logs them. Trust is changed only by an explicit [`trust`]: the first keys seen
//! for a number are trusted on first use when a message arrives (see [`crate::incoming`]).

use tidings_proto::frame::{self, Kind, Presence};
use tidings_proto::number::E164;
use tidings_proto::MAX_LOOKUP_PROOFS;

use crate::account::{key_of, Account};
use crate::clock::now_ms;
use crate::inbox::Change;
use crate::{ClientError, Result};

/// The safety number with a contact, and how their keys stand with this device's trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fingerprint {
    pub number: String,
    pub safety_number: String,
    pub devices: usize,
    /// Keys of theirs not trusted here (zero when everything is trusted or nothing was yet).
    pub untrusted: usize,
    /// Whether anything was trusted for them before.
    pub known: bool,
}

/// Looks up numbers: online, offline or not a user. Order follows `numbers`. A user is online
/// only if one of its devices shows itself to this one: to everyone, or to those holding its
/// presence token (which a device hands whoever it writes to); a proof goes with the lookup for
/// each token held, up to `MAX_LOOKUP_PROOFS`.
pub async fn lookup(account: &Account, numbers: &[String]) -> Result<Vec<(String, Presence)>> {
    let proofs = {
        let mut inbox = account.inbox()?;
        let now = now_ms();
        inbox.look(|crypto| {
            let mut proofs = Vec::new();
            for number in numbers.iter().filter_map(|n| E164::parse(n).ok()) {
                let room = MAX_LOOKUP_PROOFS.saturating_sub(proofs.len());
                proofs.extend(crypto.presence_proofs(number.as_str(), now, room));
            }
            proofs
        })?
    };
    let mut session = account.session(false).await?;
    let request_id = session.request_id();
    let request = Kind::Lookup(frame::Lookup {
        request_id,
        numbers: numbers.to_vec(),
        proofs,
    });
    match session.call(request, request_id).await? {
        Kind::LookupResult(result) => Ok(result
            .entries
            .into_iter()
            .map(|e| {
                (
                    e.number,
                    Presence::try_from(e.presence).unwrap_or(Presence::NotAUser),
                )
            })
            .collect()),
        Kind::Error(e) => Err(e.into()),
        _ => Err(ClientError::Protocol(
            "unexpected answer to a lookup".into(),
        )),
    }
}

/// The safety number with `number`, from the directory's current keys of both sides.
pub async fn fingerprint(account: &Account, number: &str) -> Result<Fingerprint> {
    let number = E164::parse(number)?.as_str().to_string();
    let mut inbox = account.inbox()?;
    let mut session = account.session(false).await?;
    let mine: Vec<[u8; 32]> = account
        .directory(&mut session, account.number())
        .await?
        .iter()
        .filter_map(|d| key_of(&d.identity_key))
        .collect();
    let theirs: Vec<[u8; 32]> = account
        .directory(&mut session, &number)
        .await?
        .iter()
        .filter_map(|d| key_of(&d.identity_key))
        .collect();
    if theirs.is_empty() {
        return Err(ClientError::Refused(
            "that number has no devices with published keys (not a user?)".into(),
        ));
    }
    let trusted: Vec<Option<bool>> = inbox.look(|crypto| {
        theirs
            .iter()
            .map(|key| crypto.is_trusted(&number, key))
            .collect()
    })?;
    Ok(Fingerprint {
        safety_number: crate::e2e::safety_number((account.number(), &mine), (&number, &theirs)),
        devices: theirs.len(),
        untrusted: trusted.iter().filter(|t| **t == Some(false)).count(),
        known: trusted.iter().any(Option::is_some),
        number,
    })
}

/// Trusts the identity keys the directory lists for `number` now (after comparing safety
/// numbers). Returns how many keys that is.
pub async fn trust(account: &Account, number: &str) -> Result<usize> {
    let number = E164::parse(number)?.as_str().to_string();
    let mut inbox = account.inbox()?;
    let mut session = account.session(false).await?;
    let listed = account.directory(&mut session, &number).await?;
    inbox.update(|_, crypto| {
        let keys: Vec<[u8; 32]> = listed
            .iter()
            .filter_map(|d| key_of(&d.identity_key))
            .collect();
        crypto.trust(&number, &keys);
        Ok(Change::Save(keys.len()))
    })
}
