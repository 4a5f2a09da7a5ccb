//! Lookups and device lists against a real store: presences, bounds and the shared budget.

use tidings_core::HOUR;
use tidings_proto::frame::{self, ErrorCode, Kind, Presence};

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
    let lookup = |request_id: u64, numbers: &[&str]| {
        Kind::Lookup(frame::Lookup {
            request_id,
            numbers: numbers.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        })
    };
    let numbers = ["+14155550162", "+14155550163", "+14155550164", "hello"];
    let Kind::LookupResult(result) = world.ask(&mut alice, lookup(7, &numbers)).await else {
        panic!("not a lookup result");
    };
    assert_eq!(result.request_id, 7);
    let presences: Vec<(String, i32)> = result
        .entries
        .into_iter()
        .map(|entry| (entry.number, entry.presence))
        .collect();
    let expected: Vec<(String, i32)> = numbers
        .iter()
        .zip([
            Presence::Online,
            Presence::Offline,
            Presence::NotAUser,
            Presence::NotAUser,
        ])
        .map(|(number, presence)| (number.to_string(), presence as i32))
        .collect();
    assert_eq!(presences, expected, "in the order asked");

    let too_many: Vec<String> = (0..=tidings_proto::MAX_LOOKUP_NUMBERS)
        .map(|n| format!("+1415555{n:04}"))
        .collect();
    let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let answer = world.ask(&mut alice, lookup(8, &too_many)).await;
    let (code, _, request_id) = error_of(&answer);
    assert_eq!((code, request_id), (ErrorCode::InvalidRequest, 8));

    // Four of six spent: three more are past the budget, and a device list costs one too.
    let answer = world.ask(&mut alice, lookup(9, &numbers[..3])).await;
    assert_eq!(
        error_of(&answer),
        (ErrorCode::RateLimited, "lookup budget used up", 9)
    );
    let devices = |request_id: u64, number: &str| {
        Kind::Devices(frame::DevicesRequest {
            request_id,
            number: number.into(),
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
            number: number.into(),
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
    // Not a user, or not a number: the same empty list.
    for number in ["+14155550179", "hello"] {
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
            state.take_free_sender_check(asking, sender, now),
            free,
            "case {n}"
        );
    }
}
