//! Other people: whether numbers can be reached now (lookup), the safety number with a contact,
//! and trusting a contact's current keys after comparing it.
//!
//! Numbers looked up never reach the server: each is blinded and named by its account's
//! pseudonym (see [`crate::discovery`]); nothing here logs them. Trust is changed only by an explicit [`trust`]: the first keys seen
//! for a number are trusted on first use when a message arrives (see [`crate::incoming`]).

use tidings_proto::frame::{self, Kind, Presence};
use tidings_proto::number::E164;
use tidings_proto::MAX_LOOKUP_PROOFS;

use crate::account::{key_of, Account};
use crate::clock::now_ms;
use crate::discovery::AccountKey;
use crate::inbox::Change;
use crate::session::Session;
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

/// Looks up numbers: online, offline or not a user. Order follows `numbers`; a number that is
/// not a valid phone number is not a user, without asking the server. A user is online only if
/// one of its devices shows itself to this one: to everyone, or to those holding its presence
/// token (which a device hands whoever it writes to); a proof goes with each lookup for each
/// token held, up to `MAX_LOOKUP_PROOFS`.
pub async fn lookup(account: &Account, numbers: &[String]) -> Result<Vec<(String, Presence)>> {
    let mut session = account.session(false).await?;
    let valid: Vec<String> = numbers
        .iter()
        .filter_map(|n| E164::parse(n).ok())
        .map(|n| n.as_str().to_string())
        .collect();
    let pseudonyms = crate::discovery::pseudonyms(account, &mut session, &valid, None).await?;
    let mut presences = Vec::with_capacity(pseudonyms.len());
    let now = now_ms();
    let batches = pseudonyms
        .chunks(tidings_proto::MAX_LOOKUP_NUMBERS)
        .zip(valid.chunks(tidings_proto::MAX_LOOKUP_NUMBERS));
    for (batch, batch_numbers) in batches {
        let proofs = account.inbox()?.look(|crypto| {
            let mut proofs = Vec::new();
            for number in batch_numbers {
                let room = MAX_LOOKUP_PROOFS.saturating_sub(proofs.len());
                proofs.extend(crypto.presence_proofs(number, now, room));
            }
            proofs
        })?;
        presences.extend(lookup_accounts(&mut session, batch, proofs).await?);
    }
    // While the server still holds the key pinned before its last rotation, a number not found
    // under the current key is looked up again under the previous one: its owner may not have
    // moved to the new key yet.
    if account.previous_key().is_some() {
        for (number, presence) in valid.iter().zip(presences.iter_mut()) {
            if *presence != Presence::NotAUser || number == account.number() {
                continue;
            }
            if let Some(previous) =
                crate::discovery::previous_pseudonym(account, &mut session, number).await?
            {
                let found = lookup_accounts(&mut session, &[previous], Vec::new()).await?;
                *presence = found.into_iter().next().unwrap_or(Presence::NotAUser);
            }
        }
    }
    let mut presences = presences.into_iter();
    Ok(numbers
        .iter()
        .map(|number| {
            let presence = match E164::parse(number) {
                Ok(_) => presences.next().unwrap_or(Presence::NotAUser),
                Err(_) => Presence::NotAUser,
            };
            (number.clone(), presence)
        })
        .collect())
}

/// One `Lookup` of accounts by pseudonym, with presence `proofs`: their presences, in order.
pub async fn lookup_accounts(
    session: &mut Session,
    accounts: &[AccountKey],
    proofs: Vec<frame::PresenceProof>,
) -> Result<Vec<Presence>> {
    let request_id = session.request_id();
    let request = Kind::Lookup(frame::Lookup {
        request_id,
        accounts: accounts.iter().map(|a| a.to_vec()).collect(),
        proofs,
        ..frame::Lookup::default()
    });
    match session.call(request, request_id).await? {
        Kind::LookupResult(result) if result.entries.len() == accounts.len() => Ok(result
            .entries
            .into_iter()
            .map(|e| Presence::try_from(e.presence).unwrap_or(Presence::NotAUser))
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
