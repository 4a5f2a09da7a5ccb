//! Private discovery: turning a contact's number into the pseudonym that names its account,
//! without the number ever reaching the server (promise P3).
//!
//! The client blinds each number (RFC 9497 VOPRF, ristretto255-SHA512: the number hashed to a
//! point and multiplied by a random scalar), sends the blinded points in one `Evaluate` per batch,
//! checks the server's batch proof against the key pinned in the profile at registration or link
//! ([`PinnedKey`]), and unblinds: the first 32 bytes of the output are the pseudonym the server
//! stores for that number. A proof that does not verify means the server evaluated with another
//! key (rotated, or misbehaving): [`ClientError::DiscoveryKeyChanged`], never a generic error.
//!
//! Pseudonyms learned are kept sealed in the local store ([`Pseudonyms`], in
//! [`crate::inbox::Inbox`]), so a known contact costs no evaluation and no lookup budget again.
//! Nothing here logs a number or a pseudonym.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tidings_proto::frame::{self, Kind};
use tidings_proto::id::DeviceId;
use tidings_proto::MAX_LOOKUP_NUMBERS;
use voprf::{EvaluationElement, Group as _, Proof, Ristretto255, VoprfClient};

use crate::account::Account;
use crate::inbox::Inbox;
use crate::profile::{PinnedKey, ProfileData};
use crate::session::Session;
use crate::{ClientError, Result};

/// An account's pseudonym: how requests name accounts since tidings/2.
pub type AccountKey = [u8; 32];

/// The pseudonyms this profile learned, by number, under the key they were evaluated with.
#[derive(Default, Serialize, Deserialize)]
pub struct Pseudonyms {
    #[serde(default)]
    key: Option<PinnedKey>,
    #[serde(default)]
    by_number: BTreeMap<String, String>,
}

impl std::fmt::Debug for Pseudonyms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pseudonyms")
            .field("count", &self.by_number.len())
            .finish_non_exhaustive()
    }
}

impl Pseudonyms {
    /// The pseudonym of `number` under `key`, if it was learned.
    pub fn get(&self, key: &PinnedKey, number: &str) -> Option<AccountKey> {
        if self.key.as_ref() != Some(key) {
            return None;
        }
        let text = self.by_number.get(number)?;
        <AccountKey>::try_from(tidings_proto::id::from_text(text)?.as_slice()).ok()
    }

    /// Keeps pseudonyms learned under `key`; those of another key are dropped.
    pub fn learn(&mut self, key: &PinnedKey, learned: &[(String, AccountKey)]) {
        if self.key.as_ref() != Some(key) {
            self.key = Some(key.clone());
            self.by_number.clear();
        }
        for (number, pseudonym) in learned {
            self.by_number
                .insert(number.clone(), tidings_proto::id::to_text(pseudonym));
        }
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.by_number.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.by_number.is_empty()
    }
}

/// The key a `Verified`, `Linked` or `GET /v1/oprf-key` answer names, if it names one.
pub fn pinned_key_of(body: &serde_json::Value) -> Option<PinnedKey> {
    let public_key = body
        .get("oprf_public_key")
        .or_else(|| body.get("public_key"))?
        .as_str()?;
    let key_version = u32::try_from(body.get("key_version")?.as_u64()?).ok()?;
    point_of(public_key)?;
    Some(PinnedKey {
        public_key: public_key.to_string(),
        key_version,
    })
}

/// Keeps the profile's own pseudonym, as the server named it in `Verified` or `Linked`, so that
/// naming its own account never costs an evaluation (nor waits on the lookup budget).
pub fn learn_own(inbox: &mut Inbox, data: &ProfileData, body: &serde_json::Value) -> Result<()> {
    let own = body
        .get("account")
        .and_then(serde_json::Value::as_str)
        .and_then(tidings_proto::id::from_text)
        .and_then(|bytes| <AccountKey>::try_from(bytes.as_slice()).ok());
    if let (Some(key), Some(own)) = (&data.oprf_key, own) {
        inbox.learn_pseudonyms(key, &[(data.number.clone(), own)])?;
    }
    Ok(())
}

fn point_of(text: &str) -> Option<<Ristretto255 as voprf::Group>::Elem> {
    let bytes = tidings_proto::id::from_text(text)?;
    (bytes.len() == 32)
        .then(|| Ristretto255::deserialize_elem(&bytes).ok())
        .flatten()
}

/// Asks the server for the key it evaluates with now (`GET /v1/oprf-key`).
pub async fn fetch_key(account: &Account) -> Result<PinnedKey> {
    Ok(fetch_keys(account).await?.0)
}

/// Asks the server for the key it evaluates with now and, after a rotation, the previous one
/// while it still holds it (`GET /v1/oprf-key`).
pub async fn fetch_keys(account: &Account) -> Result<(PinnedKey, Option<PinnedKey>)> {
    let (status, body) = account.endpoint().get_json("/v1/oprf-key").await?;
    if status != hyper::StatusCode::OK {
        return Err(ClientError::Protocol(format!(
            "GET /v1/oprf-key answered {status}"
        )));
    }
    let current = pinned_key_of(&body).ok_or_else(|| {
        ClientError::Protocol("GET /v1/oprf-key answered without a valid key".into())
    })?;
    let previous = body
        .get("previous_public_key")
        .and_then(serde_json::Value::as_str)
        .filter(|key| point_of(key).is_some())
        .zip(
            body.get("previous_key_version")
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok()),
        )
        .map(|(public_key, key_version)| PinnedKey {
            public_key: public_key.to_string(),
            key_version,
        });
    Ok((current, previous))
}

/// The pseudonym of `number` under the key pinned before the server's last rotation, while the
/// server still evaluates under it (a contact that has not moved to the current key yet); `None`
/// without such a key, and once the server refuses it (the previous key is then forgotten).
/// Not kept: it is needed only until the contact moves or the key is retired.
pub async fn previous_pseudonym(
    account: &Account,
    session: &mut Session,
    number: &str,
) -> Result<Option<AccountKey>> {
    let Some(previous) = account.previous_key() else {
        return Ok(None);
    };
    match evaluate(session, &previous, &[number], None).await {
        Ok(found) => Ok(found.into_iter().next()),
        Err(ClientError::DiscoveryKeyChanged) => {
            account.forget_previous_key()?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Pins the key the server shows now, forgets every pseudonym learned under the old one and
/// moves this account to the new key (`Rekey`, refused if the server no longer holds the key
/// the account is under): what to do after the operator announced a new discovery key that this
/// profile could not follow by itself ([`Account::follow_rotation`]).
pub async fn repin(account: &Account) -> Result<PinnedKey> {
    let key = fetch_key(account).await?;
    account.pin_key(key.clone())?;
    let mut inbox = account.inbox()?;
    inbox.forget_pseudonyms()?;
    // The account moves to the key too, if the server can still tell it is this number's.
    let mut session = account.session(false).await?;
    if let Ok(own) = account.rekey(&mut session).await {
        inbox.learn_pseudonyms(&key, &[(account.number().to_string(), own)])?;
    }
    Ok(key)
}

/// The pseudonyms of `numbers` (E.164, normalised), in order: the known ones from the sealed
/// store, the others evaluated in batches of at most [`MAX_LOOKUP_NUMBERS`] and kept.
/// `sender_device` asks for the free check of a delivery's claimed sender (one number).
pub async fn pseudonyms(
    account: &Account,
    session: &mut Session,
    numbers: &[String],
    sender_device: Option<DeviceId>,
) -> Result<Vec<AccountKey>> {
    let key = account.pinned_key().await?;
    match pseudonyms_under(account, session, &key, numbers, sender_device).await {
        // The server evaluates under another key: a rotation this profile has not followed yet
        // (then once more under the new key), or a key it cannot follow.
        Err(ClientError::DiscoveryKeyChanged) => {
            if !account.follow_rotation(session).await? {
                return Err(ClientError::DiscoveryKeyChanged);
            }
            let key = account.pinned_key().await?;
            pseudonyms_under(account, session, &key, numbers, sender_device).await
        }
        found => found,
    }
}

/// [`pseudonyms`] under the pinned `key`.
async fn pseudonyms_under(
    account: &Account,
    session: &mut Session,
    key: &PinnedKey,
    numbers: &[String],
    sender_device: Option<DeviceId>,
) -> Result<Vec<AccountKey>> {
    let key = key.clone();
    let mut inbox = account.inbox()?;
    let known = inbox.pseudonyms()?;
    let mut found: Vec<Option<AccountKey>> = numbers.iter().map(|n| known.get(&key, n)).collect();
    let mut unknown: Vec<&str> = Vec::new();
    for (number, slot) in numbers.iter().zip(&found) {
        if slot.is_none() && !unknown.contains(&number.as_str()) {
            unknown.push(number);
        }
    }
    let mut learned = Vec::with_capacity(unknown.len());
    for batch in unknown.chunks(MAX_LOOKUP_NUMBERS) {
        let evaluated = evaluate(session, &key, batch, sender_device).await?;
        learned.extend(batch.iter().map(|n| n.to_string()).zip(evaluated));
    }
    if !learned.is_empty() {
        inbox.learn_pseudonyms(&key, &learned)?;
    }
    for (number, slot) in numbers.iter().zip(found.iter_mut()) {
        if slot.is_none() {
            *slot = learned.iter().find(|(n, _)| n == number).map(|(_, p)| *p);
        }
    }
    found
        .into_iter()
        .map(|p| p.ok_or_else(|| ClientError::Protocol("a pseudonym went missing".into())))
        .collect()
}

/// One `Evaluate`: blinds `numbers`, has the server evaluate them, checks the batch proof
/// against `key` and unblinds.
async fn evaluate(
    session: &mut Session,
    key: &PinnedKey,
    numbers: &[&str],
    sender_device: Option<DeviceId>,
) -> Result<Vec<AccountKey>> {
    let public = point_of(&key.public_key)
        .ok_or_else(|| ClientError::Profile("the pinned discovery key is damaged".into()))?;
    let mut rng = rand::rngs::OsRng;
    let blinds = numbers
        .iter()
        .map(|n| VoprfClient::<Ristretto255>::blind(n.as_bytes(), &mut rng))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| ClientError::Protocol("a number could not be blinded".into()))?;
    let request_id = session.request_id();
    let request = Kind::Evaluate(frame::Evaluate {
        request_id,
        blinded: blinds
            .iter()
            .map(|b| b.message.serialize().to_vec())
            .collect(),
        sender_device: sender_device.map_or_else(Vec::new, |d| d.as_bytes().to_vec()),
        key_version: key.key_version,
    });
    let result = match session.call(request, request_id).await? {
        Kind::EvaluateResult(result) => result,
        // What this client sends is well formed: a refusal is of the key version it pinned,
        // which the server no longer holds.
        Kind::Error(e) if e.code == frame::ErrorCode::InvalidRequest as i32 => {
            return Err(ClientError::DiscoveryKeyChanged)
        }
        Kind::Error(e) => return Err(e.into()),
        _ => {
            return Err(ClientError::Protocol(
                "unexpected answer to an evaluation".into(),
            ))
        }
    };
    // Anything that does not verify under the pinned key is the same finding: the server
    // evaluated with a key this profile did not pin.
    if result.key_version != key.key_version || result.evaluated.len() != numbers.len() {
        return Err(ClientError::DiscoveryKeyChanged);
    }
    let messages = result
        .evaluated
        .iter()
        .map(|e| EvaluationElement::<Ristretto255>::deserialize(e))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| ClientError::DiscoveryKeyChanged)?;
    let proof = Proof::<Ristretto255>::deserialize(&result.proof)
        .map_err(|_| ClientError::DiscoveryKeyChanged)?;
    let clients: Vec<_> = blinds.into_iter().map(|b| b.state).collect();
    let inputs: Vec<&[u8]> = numbers.iter().map(|n| n.as_bytes()).collect();
    let outputs = VoprfClient::batch_finalize(&inputs, &clients, &messages, &proof, public)
        .map_err(|_| ClientError::DiscoveryKeyChanged)?;
    outputs
        .map(|output| {
            let output = output.map_err(|_| ClientError::DiscoveryKeyChanged)?;
            let mut pseudonym = [0u8; 32];
            pseudonym.copy_from_slice(&output[..32]);
            Ok(pseudonym)
        })
        .collect()
}
