//! Frames decoded into requests, and the one request answered without a task.

use tidings_proto::frame::{self, Frame, Kind};

use crate::request::{NotARequest, Request};

#[test]
fn a_frame_is_a_request_or_says_why_not() {
    let check = |kind: Option<Kind>, expected: Result<&str, NotARequest>| {
        let decoded = Request::from_frame(Frame { kind: kind.clone() });
        match (decoded, expected) {
            (Ok(request), Ok(name)) => assert!(
                format!("{request:?}").starts_with(name),
                "{kind:?} is {request:?}"
            ),
            (Err(not), Err(expected)) => assert_eq!(not, expected, "{kind:?}"),
            (decoded, expected) => panic!("{kind:?}: {decoded:?}, expected {expected:?}"),
        }
    };
    check(Some(Kind::Ping(frame::Ping { nonce: 1 })), Ok("Ping"));
    check(Some(Kind::Send(frame::Send::default())), Ok("Send"));
    check(Some(Kind::Ack(frame::Ack::default())), Ok("Ack"));
    check(
        Some(Kind::ReceiptAck(frame::ReceiptAck::default())),
        Ok("ReceiptAck"),
    );
    check(
        Some(Kind::Withdraw(frame::Withdraw::default())),
        Ok("Withdraw"),
    );
    check(Some(Kind::Lookup(frame::Lookup::default())), Ok("Lookup"));
    check(
        Some(Kind::Devices(frame::DevicesRequest::default())),
        Ok("Devices"),
    );
    check(
        Some(Kind::KeysUpload(frame::KeysUpload::default())),
        Ok("KeysUpload"),
    );
    check(
        Some(Kind::KeysClaim(frame::KeysClaim::default())),
        Ok("KeysClaim"),
    );
    check(
        Some(Kind::LinkCodeRequest(frame::LinkCodeRequest::default())),
        Ok("LinkCode"),
    );
    check(
        Some(Kind::RemoveDevice(frame::RemoveDevice::default())),
        Ok("RemoveDevice"),
    );
    check(Some(Kind::Vouch(frame::Vouch::default())), Ok("Vouch"));
    check(
        Some(Kind::Disable(frame::Disable::default())),
        Ok("Disable"),
    );
    check(
        Some(Kind::Login(frame::Login::default())),
        Err(NotARequest::SecondLogin),
    );
    check(
        Some(Kind::Pong(frame::Pong { nonce: 1 })),
        Err(NotARequest::FromServer),
    );
    check(
        Some(Kind::Deliver(frame::Deliver::default())),
        Err(NotARequest::FromServer),
    );
    check(None, Err(NotARequest::Empty));
    assert_eq!(
        NotARequest::Empty.complaint(),
        None,
        "an empty frame is ignored"
    );
    assert_eq!(
        NotARequest::SecondLogin.complaint(),
        Some("already logged in")
    );
    assert_eq!(
        NotARequest::FromServer.complaint(),
        Some("this frame is sent by servers, not clients")
    );
}

#[test]
fn a_ping_is_answered_inline_and_nothing_else_is() {
    let ping = Request::from_frame(Kind::Ping(frame::Ping { nonce: 42 }).into());
    let answer = ping.expect("a ping").inline_answer();
    assert_eq!(
        answer.and_then(|frame| frame.kind),
        Some(Kind::Pong(frame::Pong { nonce: 42 }))
    );
    let ack = Request::from_frame(Kind::Ack(frame::Ack::default()).into());
    assert!(ack.expect("an ack").inline_answer().is_none());
}
