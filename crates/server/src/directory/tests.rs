//! Keys, link codes, vouches, removing a device and disabling an account, against a real store.

use std::sync::Arc;

use ed25519_dalek::{Signer as _, SigningKey};
use tidings_proto::frame::{self, ErrorCode, Kind, Presence};
use tidings_proto::id::DeviceId;
use tidings_store::Store as _;

use super::link_code_hash;
use crate::testing::{error_of, random_device, take_all, Device, World};

#[tokio::test]
async fn disabling_deletes_the_account_and_signs_its_sessions_out() {
    let world = World::new("disable", |_| {});
    let mut alice = world.user("+14155550181", 2).await;
    let mut bob = world.user("+14155550182", 1).await.remove(0);
    let disable = Kind::Disable(frame::Disable { request_id: 5 });
    let answers = {
        world.run(&mut alice[0], disable).await;
        take_all(&alice[0].outbox)
    };
    assert_eq!(
        answers,
        [
            Kind::DisableResult(frame::DisableResult { request_id: 5 }),
            Kind::SignedOut(frame::SignedOut {
                reason: "the account was disabled".into()
            }),
        ]
    );
    let account = world.state.store.account(world.pseudonym("+14155550181"));
    assert_eq!(
        account.await.expect("a read"),
        None,
        "nothing of it is left"
    );
    let lookup = Kind::Lookup(frame::Lookup {
        request_id: 1,
        accounts: vec![world.pseudonym("+14155550181").0.to_vec()],
        ..frame::Lookup::default()
    });
    let Kind::LookupResult(result) = world.ask(&mut bob, lookup).await else {
        panic!("not a lookup result");
    };
    assert_eq!(result.entries[0].presence, Presence::NotAUser as i32);
    drop(alice.pop());
}

/// A one-time (or fallback) key of `device`, signed by `signer`.
fn signed_key(device: &Device, signer: &SigningKey, fallback: bool) -> frame::SignedKey {
    let public_key: [u8; 32] = rand::random();
    let transcript = tidings_proto::transcript::one_time_key(
        device.identity.device.as_bytes(),
        fallback,
        &public_key,
    );
    frame::SignedKey {
        public_key: public_key.to_vec(),
        signature: signer.sign(&transcript).to_bytes().to_vec(),
    }
}

fn upload(device: &Device, one_time_keys: Vec<frame::SignedKey>) -> frame::KeysUpload {
    frame::KeysUpload {
        request_id: 4,
        identity_key: device.keys.identity_key.to_vec(),
        signing_key: device.keys.signing_key.to_vec(),
        one_time_keys,
        fallback_key: Some(signed_key(device, &device.signing, true)),
        contact_token_hash: Vec::new(),
    }
}

#[tokio::test]
async fn keys_are_stored_only_when_every_signature_verifies() {
    let world = World::new("upload", |_| {});
    let mut alice = world.user("+14155550201", 1).await.remove(0);
    let stranger = SigningKey::generate(&mut rand::rngs::OsRng);
    let good = |n: usize| -> Vec<frame::SignedKey> {
        (0..n)
            .map(|_| signed_key(&alice, &alice.signing, false))
            .collect()
    };
    let too_many = tidings_proto::MAX_ONE_TIME_KEYS_PER_UPLOAD + 1;
    let other_identity = frame::KeysUpload {
        identity_key: rand::random::<[u8; 32]>().to_vec(),
        ..upload(&alice, good(1))
    };
    // (what, the upload, the error's words; none: stored)
    let cases = [
        (
            "a one-time key signed by another key",
            upload(&alice, vec![signed_key(&alice, &stranger, false)]),
            Some("a one-time key is malformed or its signature does not verify"),
        ),
        (
            "a fallback key signed by another key",
            frame::KeysUpload {
                fallback_key: Some(signed_key(&alice, &stranger, true)),
                ..upload(&alice, good(1))
            },
            Some("the fallback key is malformed or its signature does not verify"),
        ),
        (
            "identity keys of the wrong length",
            frame::KeysUpload {
                identity_key: vec![1, 2, 3],
                ..upload(&alice, good(1))
            },
            Some("identity keys must be a 32-byte Curve25519 key"),
        ),
        (
            "more keys than one upload takes",
            upload(&alice, good(too_many)),
            Some("one-time keys per upload"),
        ),
        ("two good keys", upload(&alice, good(2)), None),
        (
            "identity keys that differ from the published ones",
            other_identity,
            Some("identity keys are already published and cannot change"),
        ),
    ];
    for (what, request, refused) in cases {
        let answer = world.ask(&mut alice, Kind::KeysUpload(request)).await;
        match refused {
            Some(words) => {
                let (code, message, request_id) = error_of(&answer);
                assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 4), "{what}");
                assert!(message.contains(words), "{what}: {message}");
            }
            None => assert_eq!(
                answer,
                Kind::KeysUploadResult(frame::KeysUploadResult {
                    request_id: 4,
                    one_time_keys: 2,
                }),
                "{what}"
            ),
        }
    }
    let status = world.state.store.key_status(alice.identity.device).await;
    assert_eq!(
        status.expect("a read").one_time_keys,
        2,
        "nothing refused was stored"
    );
}

#[tokio::test]
async fn a_claim_hands_out_each_key_once_then_the_fallback_within_its_budget() {
    let world = World::new("claim", |args| {
        args.key_claim_burst = Some(5);
        args.key_claims_per_hour = Some(0);
    });
    let mut alice = world.user("+14155550211", 1).await.remove(0);
    let mut bob = world.user("+14155550212", 1).await.remove(0);
    let keys = vec![
        signed_key(&alice, &alice.signing, false),
        signed_key(&alice, &alice.signing, false),
    ];
    let request = upload(&alice, keys.clone());
    let fallback = request.fallback_key.clone();
    world.ask(&mut alice, Kind::KeysUpload(request)).await;
    let claim = |account: &[u8], devices: &[DeviceId]| {
        Kind::KeysClaim(frame::KeysClaim {
            request_id: 6,
            account: account.to_vec(),
            device_ids: devices.iter().map(|d| d.as_bytes().to_vec()).collect(),
            ..frame::KeysClaim::default()
        })
    };
    // Two one-time keys, each once (in no particular order), then the fallback key.
    let mut handed_out = Vec::new();
    for _ in 0..3 {
        let Kind::KeysClaimResult(result) = world.ask(&mut bob, claim(&alice.account, &[])).await
        else {
            panic!("not a claim result");
        };
        assert_eq!(result.request_id, 6);
        let [claimed] = result.devices.as_slice() else {
            panic!("one device: {:?}", result.devices);
        };
        assert_eq!(claimed.device_id, alice.identity.device.as_bytes().to_vec());
        assert_eq!(claimed.identity_key, alice.keys.identity_key.to_vec());
        handed_out.push((claimed.key.clone().expect("a key"), claimed.fallback));
    }
    handed_out[..2].sort_by(|a, b| a.0.public_key.cmp(&b.0.public_key));
    let mut expected: Vec<_> = keys.into_iter().map(|key| (key, false)).collect();
    expected.sort_by(|a, b| a.0.public_key.cmp(&b.0.public_key));
    expected.push((fallback.expect("a fallback key"), true));
    assert_eq!(handed_out, expected);
    let answer = world
        .ask(&mut bob, claim(&alice.account, &[random_device()]))
        .await;
    let (code, message, _) = error_of(&answer);
    assert_eq!(code, ErrorCode::InvalidRequest);
    assert!(
        message.contains("no such device for that number"),
        "{message}"
    );
    let Kind::KeysClaimResult(result) = world.ask(&mut bob, claim(&[0x19; 32], &[])).await else {
        panic!("not a claim result");
    };
    assert!(result.devices.is_empty(), "not a user: no devices");
    // Five claimed from a budget of five: the next one is refused, a claim of a number that is
    // not a user included (it would otherwise be a free lookup).
    let answer = world.ask(&mut bob, claim(&[0x19; 32], &[])).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::RateLimited, "too many key claims", 6)
    );
    // A device's own number costs nothing.
    let own = claim(&alice.account, &[]);
    let own = world.ask(&mut alice, own).await;
    assert!(matches!(own, Kind::KeysClaimResult(_)), "{own:?}");
}

#[tokio::test]
async fn a_link_code_is_offered_until_the_number_has_all_its_devices() {
    let world = World::new("link-code", |_| {});
    let mut alice = world.user("+14155550221", 1).await.remove(0);
    let mut full = world
        .user("+14155550222", tidings_proto::MAX_DEVICES)
        .await
        .remove(0);
    let request = || Kind::LinkCodeRequest(frame::LinkCodeRequest { request_id: 2 });
    let Kind::LinkCode(code) = world.ask(&mut alice, request()).await else {
        panic!("not a link code");
    };
    assert_eq!((code.request_id, code.expires_in), (2, 600));
    let digits: String = code.code.chars().filter(char::is_ascii_digit).collect();
    assert_eq!((digits.len(), code.code.len()), (12, 14), "{}", code.code);
    let approver = {
        let offers = world.state.link_offers.lock().expect("offers");
        let offer = offers.get(&link_code_hash(&code.code)).copied();
        offer.expect("kept by its hash").approver
    };
    assert_eq!(approver, alice.identity.device);
    let answer = world.ask(&mut full, request()).await;
    let (code, message, request_id) = error_of(&answer);
    assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 2));
    assert!(message.contains("already has 6 devices"), "{message}");
}

#[tokio::test]
async fn a_removed_device_is_signed_out_and_gone() {
    let world = World::new("remove", |_| {});
    let mut alice = world.user("+14155550231", 2).await;
    let removed = alice.pop().expect("a second device");
    let removed_online = world.state.hub.add(
        removed.identity.device,
        true,
        Arc::clone(&removed.outbox),
        usize::MAX,
    );
    let remove = |device: Vec<u8>| {
        Kind::RemoveDevice(frame::RemoveDevice {
            request_id: 8,
            device_id: device,
        })
    };
    let answer = world
        .ask(
            &mut alice[0],
            remove(removed.identity.device.as_bytes().to_vec()),
        )
        .await;
    assert_eq!(
        answer,
        Kind::RemoveDeviceResult(frame::RemoveDeviceResult { request_id: 8 })
    );
    assert_eq!(
        take_all(&removed.outbox),
        [Kind::SignedOut(frame::SignedOut {
            reason: "this device was removed from its number".into()
        })]
    );
    drop(removed_online);
    let left = world
        .state
        .store
        .devices_of(alice[0].identity.account)
        .await;
    assert_eq!(left.expect("a read"), [alice[0].identity.device]);
    // (what, the device named, the error's words)
    let cases = [
        (
            "the same device again",
            removed.identity.device.as_bytes().to_vec(),
            "no such device on your number",
        ),
        (
            "an id that is not 16 bytes",
            vec![1],
            "device ids are 16 bytes",
        ),
    ];
    for (what, device, words) in cases {
        let answer = world.ask(&mut alice[0], remove(device)).await;
        let (code, message, request_id) = error_of(&answer);
        assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 8), "{what}");
        assert!(message.contains(words), "{what}: {message}");
    }
}

#[tokio::test]
async fn a_vouch_is_kept_only_with_a_good_signature_between_devices_of_one_number() {
    let world = World::new("vouch", |_| {});
    let mut alice = world.user("+14155550241", 2).await;
    let bob = world.user("+14155550242", 1).await.remove(0);
    let vouch_for = |target: &Device, signer: &SigningKey| {
        let transcript = tidings_proto::transcript::vouch(
            target.identity.device.as_bytes(),
            &target.keys.identity_key,
            &target.keys.signing_key,
        );
        Kind::Vouch(frame::Vouch {
            request_id: 9,
            device_id: target.identity.device.as_bytes().to_vec(),
            signature: signer.sign(&transcript).to_bytes().to_vec(),
        })
    };
    let (first, second) = (&alice[0], &alice[1]);
    // (what, the vouch, the error's words; none: kept)
    let cases = [
        (
            "signed by another key",
            vouch_for(second, &bob.signing),
            Some("the vouch signature does not verify"),
        ),
        (
            "for a device of another number",
            vouch_for(&bob, &first.signing),
            Some("both devices must be of your number"),
        ),
        (
            "a signature that is not 64 bytes",
            Kind::Vouch(frame::Vouch {
                request_id: 9,
                device_id: second.identity.device.as_bytes().to_vec(),
                signature: vec![0; 12],
            }),
            Some("a vouch needs a 16-byte device id and a 64-byte signature"),
        ),
        ("good", vouch_for(second, &first.signing), None),
    ];
    for (what, vouch, refused) in cases {
        let answer = world.ask(&mut alice[0], vouch).await;
        match refused {
            Some(words) => {
                let (code, message, request_id) = error_of(&answer);
                assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 9), "{what}");
                assert!(message.contains(words), "{what}: {message}");
            }
            None => assert_eq!(
                answer,
                Kind::VouchResult(frame::VouchResult { request_id: 9 }),
                "{what}"
            ),
        }
    }
    let listed = world
        .state
        .store
        .device_keys(alice[0].identity.account)
        .await;
    let vouched = listed
        .expect("a read")
        .into_iter()
        .find(|device| device.id == alice[1].identity.device)
        .and_then(|device| device.voucher)
        .expect("a voucher");
    assert_eq!(vouched.by, alice[0].identity.device);
}

/// A request that passed its session's revocation check just before its device's removal
/// committed (so its session was not signed out yet) is refused by the store's own check in the
/// request's transaction: the removed device changes nothing on its account.
#[tokio::test]
async fn a_request_racing_its_devices_removal_changes_nothing() {
    let world = World::new("racing-removal", |_| {});
    let mut alice = world.user("+14155550241", 3).await;
    let bob = world.user("+14155550242", 1).await.remove(0);
    let mut removed = alice.pop().expect("a third device");
    let account = alice[0].identity.account;
    // The removal commits; the hub has not signed the removed device's session out.
    let gone = world
        .state
        .store
        .remove_device(alice[0].identity.actor(), removed.identity.device)
        .await;
    assert!(gone.expect("removed"));
    // (what, the request)
    let cases = [
        (
            "removing another device",
            Kind::RemoveDevice(frame::RemoveDevice {
                request_id: 1,
                device_id: alice[1].identity.device.as_bytes().to_vec(),
            }),
        ),
        (
            "claiming another number's keys",
            Kind::KeysClaim(frame::KeysClaim {
                request_id: 2,
                account: bob.account.clone(),
                ..frame::KeysClaim::default()
            }),
        ),
        (
            "disabling the account",
            Kind::Disable(frame::Disable { request_id: 3 }),
        ),
    ];
    for (n, (what, request)) in cases.into_iter().enumerate() {
        let answer = world.ask(&mut removed, request).await;
        let (code, message, request_id) = error_of(&answer);
        assert_eq!(
            (code, request_id),
            (ErrorCode::AuthFailed, n as u64 + 1),
            "{what}: {message}"
        );
        assert!(
            message.contains("no longer registered"),
            "{what}: {message}"
        );
    }
    let mut left = world.state.store.devices_of(account).await.expect("a read");
    left.sort();
    let mut expected = vec![alice[0].identity.device, alice[1].identity.device];
    expected.sort();
    assert_eq!(
        left, expected,
        "the account and its other devices are intact"
    );
}
