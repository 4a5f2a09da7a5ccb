//! Issue 29: numbers are blinded on the device. No request of a session carries a contact's
//! number: the server refuses any that sets one, and addresses accounts by the pseudonym the
//! client derived through `Evaluate`.

use std::time::Duration;

use tidings_proto::frame::{self, ErrorCode, Kind};
use tokio::time::Instant;

use crate::support::{block_on, number, Server, User};

const BLINDED: &str = "numbers are blinded on the device since tidings/2";

/// A device that writes a contact's number in clear into a lookup, a send, a device list request
/// or a key claim is refused, each time with the same clear reason, and the session goes on.
#[test]
fn a_request_that_carries_a_number_is_refused() {
    let server = Server::start(&[]);
    let (alice_number, bob_number) = (number(), number());
    let alice = User::register(&alice_number, &server, &[]);
    let _bob = User::register(&bob_number, &server, &[]);
    let client = alice.client();
    block_on(async {
        let mut session = client.session(false).await.expect("session");
        let refusals = [
            Kind::Lookup(frame::Lookup {
                request_id: 1,
                numbers: vec![bob_number.clone()],
                ..Default::default()
            }),
            Kind::Devices(frame::DevicesRequest {
                request_id: 2,
                number: bob_number.clone(),
                ..Default::default()
            }),
            Kind::KeysClaim(frame::KeysClaim {
                request_id: 3,
                number: bob_number.clone(),
                ..Default::default()
            }),
        ];
        for (request_id, request) in (1..).zip(refusals) {
            match session.call(request, request_id).await.expect("answer") {
                Kind::Error(e) => {
                    assert_eq!(e.code, ErrorCode::InvalidRequest as i32, "{e:?}");
                    assert!(e.message.contains(BLINDED), "{}", e.message);
                }
                other => panic!("request {request_id} with a number was served: {other:?}"),
            }
        }
        session
            .send(Kind::Send(frame::Send {
                id: vec![9; 16],
                to: bob_number.clone(),
                mode: frame::SendMode::Queue as i32,
                ..Default::default()
            }))
            .await
            .expect("send");
        let deadline = Instant::now() + Duration::from_secs(30);
        let result = loop {
            match session.recv(deadline).await.expect("recv") {
                Some(Kind::SendResult(result)) => break result,
                Some(_) => {}
                None => panic!("no answer to the send"),
            }
        };
        assert_eq!(
            result.outcome,
            frame::SendOutcome::Invalid as i32,
            "{result:?}"
        );
        assert!(result.detail.contains(BLINDED), "{}", result.detail);
    });
}
