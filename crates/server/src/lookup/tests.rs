//! Lookups and device lists against a real store: presences, bounds and the shared budget.

use tidings_core::HOUR;
use tidings_proto::frame::{self, ErrorCode, Kind, Presence};

use crate::state::SenderCheck;
use crate::testing::{error_of, ids, random_device, World};

#[tokio::test]
async fn a_lookup_tells_online_offline_and_not_a_user_within_its_budget() {
    let world = World::new("lookup", |args| {
        args.lookup_burst = Some(6);
        args.lookup_per_hour = Some(0);
    });
    let mut alice = world.user("+14155550161", 1).await.remove(0);
    let _bob = world.user("+14155550162", 1).await;
    let carol = world.user("+14155550163", 1).await;
    drop(carol.into_iter().next().and_then(|carol| carol.online));
    let lookup = |request_id: u64, accounts: &[Vec<u8>]| {
        Kind::Lookup(frame::Lookup {
            request_id,
            accounts: accounts.to_vec(),
            ..frame::Lookup::default()
        })
    };
    let pseudonym = |number: &str| world.pseudonym(number).0.to_vec();
    let accounts = [
        pseudonym("+14155550162"),
        pseudonym("+14155550163"),
        pseudonym("+14155550164"),
        vec![0x55; 32],
    ];
    let Kind::LookupResult(result) = world.ask(&mut alice, lookup(7, &accounts)).await else {
        panic!("not a lookup result");
    };
    assert_eq!(result.request_id, 7);
    let presences: Vec<(Vec<u8>, i32)> = result
        .entries
        .into_iter()
        .map(|entry| (entry.account, entry.presence))
        .collect();
    let expected: Vec<(Vec<u8>, i32)> = accounts
        .iter()
        .cloned()
        .zip([
            Presence::Online,
            Presence::Offline,
            Presence::NotAUser,
            Presence::NotAUser,
        ])
        .map(|(account, presence)| (account, presence as i32))
        .collect();
    assert_eq!(presences, expected, "in the order asked");

    // Too many, or one that is not a pseudonym: refused, and nothing charged.
    let too_many = vec![vec![0x56; 32]; tidings_proto::MAX_LOOKUP_NUMBERS + 1];
    let answer = world.ask(&mut alice, lookup(8, &too_many)).await;
    let (code, _, request_id) = error_of(&answer);
    assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 8));
    let answer = world
        .ask(&mut alice, lookup(8, &[vec![0x57; 32], vec![0x57; 31]]))
        .await;
    assert_eq!(error_of(&answer).0, ErrorCode::InvalidRequest);

    // Four of six spent: three more are past the budget, and a device list costs one too.
    let answer = world.ask(&mut alice, lookup(9, &accounts[..3])).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::RateLimited, "lookup budget used up", 9)
    );
    let devices = |request_id: u64, number: &str| {
        Kind::Devices(frame::DevicesRequest {
            request_id,
            account: pseudonym(number),
            ..frame::DevicesRequest::default()
        })
    };
    for request_id in [10, 11] {
        let Kind::DeviceList(_) = world
            .ask(&mut alice, devices(request_id, "+14155550164"))
            .await
        else {
            panic!("not a device list");
        };
    }
    let answer = world.ask(&mut alice, devices(12, "+14155550162")).await;
    assert_eq!(error_of(&answer).0, ErrorCode::RateLimited);
}

#[tokio::test]
async fn a_device_list_names_every_device_and_its_keys() {
    let world = World::new("devices", |_| {});
    let mut alice = world.user("+14155550171", 1).await.remove(0);
    let bob = world.user("+14155550172", 2).await;
    let devices = |number: &str| {
        Kind::Devices(frame::DevicesRequest {
            request_id: 3,
            account: world.pseudonym(number).0.to_vec(),
            ..frame::DevicesRequest::default()
        })
    };
    let Kind::DeviceList(list) = world.ask(&mut alice, devices("+14155550172")).await else {
        panic!("not a device list");
    };
    assert_eq!(list.request_id, 3);
    let mut listed = list.device_ids.clone();
    listed.sort();
    let mut expected: Vec<Vec<u8>> = ids(&[&bob[0], &bob[1]])
        .iter()
        .map(|d| d.as_bytes().to_vec())
        .collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(list.devices.len(), 2, "both published their keys");
    // Not a user: an empty list.
    for number in ["+14155550179"] {
        let Kind::DeviceList(list) = world.ask(&mut alice, devices(number)).await else {
            panic!("not a device list");
        };
        assert!(
            list.device_ids.is_empty() && list.devices.is_empty(),
            "{number}"
        );
    }
}

/// The free check of a held copy's sender is counted per pair of devices and per hour: a second
/// check about the same sender is not free, one about another sender or by another device is,
/// and an hour later the first pair is free again.
#[test]
fn a_free_sender_check_is_free_once_an_hour_per_pair_of_devices() {
    let world = World::new("free-sender-check", |_| {});
    let (asking, other_asking) = (random_device(), random_device());
    let (sender, other_sender) = (random_device(), random_device());
    let state = &world.state;
    let start = 1_000_000;
    let cases = [
        (asking, sender, start, true),
        (asking, sender, start + 1, false),
        (asking, sender, start + HOUR - 1, false),
        (asking, other_sender, start + 2, true),
        (other_asking, sender, start + 3, true),
        (asking, sender, start + HOUR, true),
        (asking, sender, start + HOUR + 1, false),
    ];
    for (n, (asking, sender, now, free)) in cases.into_iter().enumerate() {
        assert_eq!(
            state.take_free_sender_check(asking, sender, SenderCheck::Devices, now),
            free,
            "case {n}"
        );
    }
}

/// Blinded elements a client made for `numbers` (the evaluation is checked in `keys`).
fn blinded(numbers: &[&str]) -> Vec<Vec<u8>> {
    numbers
        .iter()
        .map(|n| {
            voprf::VoprfClient::<voprf::Ristretto255>::blind(n.as_bytes(), &mut rand::rngs::OsRng)
                .expect("blind")
                .message
                .serialize()
                .to_vec()
        })
        .collect()
}

/// Evaluations are charged to the lookup budget before they are made; a bad element, an empty
/// or oversized batch or another key version gets a clear refusal that charges nothing; and the
/// device keeps being served.
#[tokio::test]
async fn evaluations_are_charged_and_bad_batches_refused() {
    let world = World::new("evaluate", |args| {
        args.lookup_burst = Some(3);
        args.lookup_per_hour = Some(0);
    });
    let mut alice = world.user("+14155550191", 1).await.remove(0);
    let evaluate = |request_id: u64, blinded: Vec<Vec<u8>>, key_version: u32| {
        Kind::Evaluate(frame::Evaluate {
            request_id,
            blinded,
            key_version,
            ..frame::Evaluate::default()
        })
    };
    let refusals = [
        (Vec::new(), 0, "1 to 1000 blinded elements"),
        (
            vec![vec![1; 32]; tidings_proto::MAX_LOOKUP_NUMBERS + 1],
            0,
            "1 to 1000 blinded elements",
        ),
        (vec![vec![1; 31]], 0, "blinded element 0 is not 32 bytes"),
        (blinded(&["+14155550192"]), 7, "pin it again"),
    ];
    for (request_id, (batch, version, said)) in (1..).zip(refusals) {
        let answer = world
            .ask(&mut alice, evaluate(request_id, batch, version))
            .await;
        let (code, message, _) = error_of(&answer);
        assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
        assert!(message.contains(said), "{message}");
    }
    // Not a point, and the identity: refused after the charge (finding out costs the work).
    for (request_id, bytes) in [(10, vec![0xff; 32]), (11, vec![0; 32])] {
        let answer = world
            .ask(&mut alice, evaluate(request_id, vec![bytes], 1))
            .await;
        let (code, message, _) = error_of(&answer);
        assert_eq!(code, ErrorCode::InvalidRequest, "{message}");
        assert!(message.contains("not a ristretto255 point"), "{message}");
    }
    // One left: a batch of two is refused for the budget, a batch of one evaluated.
    let answer = world
        .ask(
            &mut alice,
            evaluate(12, blinded(&["+1415555019", "+14155550193"]), 1),
        )
        .await;
    assert_eq!(error_of(&answer).0, ErrorCode::RateLimited);
    let Kind::EvaluateResult(result) = world
        .ask(&mut alice, evaluate(13, blinded(&["+14155550193"]), 1))
        .await
    else {
        panic!("not evaluated");
    };
    assert_eq!(
        (
            result.request_id,
            result.evaluated.len(),
            result.proof.len(),
            result.key_version
        ),
        (13, 1, 64, 1)
    );
}
