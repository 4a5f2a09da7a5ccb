//! What a logged-in session's frames ask for: one [`Request`] decoded from a frame, and one
//! dispatch ([`Request::run`]) that hands it to its handler.
//!
//! A handler is a plain async function of (state, identity, request, outbox): it reads and writes
//! through the store, reaches other sessions through the hub, and answers only through the
//! session's outbox, so a test can call it without a socket. This module decides nothing itself,
//! and never answers a frame a server sends (those are refused as not requests).

use std::sync::Arc;

use tidings_proto::frame::{self, Frame, Kind};
use tidings_store::Store;

use crate::hub::Outbox;
use crate::identity::Identity;
use crate::reply::reply;
use crate::send::SendOrder;
use crate::state::Shared;
use crate::{delivery, directory, evaluate, lookup, presence, rotation, send};

#[cfg(test)]
mod tests;

/// A request of a logged-in client.
#[derive(Debug)]
pub enum Request {
    Ping(frame::Ping),
    Send(frame::Send),
    Ack(frame::Ack),
    ReceiptAck(frame::ReceiptAck),
    Withdraw(frame::Withdraw),
    MissedSeen(frame::MissedSeen),
    Lookup(frame::Lookup),
    Evaluate(frame::Evaluate),
    Devices(frame::DevicesRequest),
    KeysUpload(frame::KeysUpload),
    KeysClaim(frame::KeysClaim),
    LinkCode(frame::LinkCodeRequest),
    RemoveDevice(frame::RemoveDevice),
    Vouch(frame::Vouch),
    Disable(frame::Disable),
    PresenceSet(frame::PresenceSet),
    Rekey(frame::Rekey),
}

/// Why a frame read on a logged-in session is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotARequest {
    /// A frame with no content (a newer client's kind this server does not know): ignored.
    Empty,
    /// `Login` again.
    SecondLogin,
    /// A kind only a server sends.
    FromServer,
}

impl NotARequest {
    /// What the client is told (a protocol error that does not end the session); nothing for
    /// an empty frame.
    pub fn complaint(self) -> Option<&'static str> {
        match self {
            Self::Empty => None,
            Self::SecondLogin => Some("already logged in"),
            Self::FromServer => Some("this frame is sent by servers, not clients"),
        }
    }
}

fn pong(ping: &frame::Ping) -> Frame {
    Kind::Pong(frame::Pong { nonce: ping.nonce }).into()
}

impl Request {
    /// The request a frame carries.
    pub fn from_frame(frame: Frame) -> Result<Self, NotARequest> {
        Ok(match frame.kind.ok_or(NotARequest::Empty)? {
            Kind::Ping(ping) => Self::Ping(ping),
            Kind::Send(send) => Self::Send(send),
            Kind::Ack(ack) => Self::Ack(ack),
            Kind::ReceiptAck(receipt) => Self::ReceiptAck(receipt),
            Kind::Withdraw(withdraw) => Self::Withdraw(withdraw),
            Kind::MissedSeen(seen) => Self::MissedSeen(seen),
            Kind::Lookup(lookup) => Self::Lookup(lookup),
            Kind::Evaluate(evaluate) => Self::Evaluate(evaluate),
            Kind::Devices(devices) => Self::Devices(devices),
            Kind::KeysUpload(upload) => Self::KeysUpload(upload),
            Kind::KeysClaim(claim) => Self::KeysClaim(claim),
            Kind::LinkCodeRequest(request) => Self::LinkCode(request),
            Kind::RemoveDevice(remove) => Self::RemoveDevice(remove),
            Kind::Vouch(vouch) => Self::Vouch(vouch),
            Kind::Disable(disable) => Self::Disable(disable),
            Kind::PresenceSet(set) => Self::PresenceSet(set),
            Kind::Rekey(rekey) => Self::Rekey(rekey),
            Kind::Login(_) => return Err(NotARequest::SecondLogin),
            _ => return Err(NotARequest::FromServer),
        })
    }

    /// The answer of a request that needs neither storage nor other sessions, given at once in
    /// the order read; `None` for a request to [`Request::run`].
    pub fn inline_answer(&self) -> Option<Frame> {
        match self {
            Self::Ping(ping) => Some(pong(ping)),
            _ => None,
        }
    }

    /// Serves the request, answering through `outbox`; the session runs the future as one of
    /// its tasks. Not an `async fn`: a send takes its place among the session's sends (`sends`)
    /// here, in the order the frames were read, not when its task first runs.
    pub fn run<S: Store>(
        self,
        state: Shared<S>,
        identity: Identity,
        outbox: Outbox,
        sends: &mut Option<Arc<SendOrder>>,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let place = matches!(self, Self::Send(_)).then(|| SendOrder::next_place(sends));
        async move {
            let (state, outbox) = (&state, &outbox);
            // Signed out between the read and the start of the task: the device may no longer
            // act on its account.
            if outbox.is_revoked() {
                return;
            }
            match self {
                Self::Ping(ping) => reply(outbox, pong(&ping)).await,
                Self::Send(request) => {
                    // Always there for a send: taken above.
                    if let Some(place) = place {
                        send::send(state, identity, request, outbox, place).await;
                    }
                }
                Self::Ack(ack) => delivery::ack(state, identity, ack, outbox).await,
                Self::ReceiptAck(receipt) => delivery::receipt_ack(state, identity, receipt).await,
                Self::MissedSeen(seen) => delivery::missed_seen(state, identity, seen).await,
                Self::Withdraw(request) => {
                    delivery::withdraw(state, identity, request, outbox).await
                }
                Self::Lookup(request) => lookup::lookup(state, identity, request, outbox).await,
                Self::Evaluate(request) => {
                    evaluate::evaluate(state, identity, request, outbox).await;
                }
                Self::Devices(request) => lookup::devices(state, identity, request, outbox).await,
                Self::KeysUpload(upload) => {
                    directory::upload(state, identity, upload, outbox).await
                }
                Self::KeysClaim(claim) => directory::claim(state, identity, claim, outbox).await,
                Self::LinkCode(request) => {
                    directory::link_code(state, identity, request, outbox).await;
                }
                Self::RemoveDevice(request) => {
                    directory::remove(state, identity, request, outbox).await;
                }
                Self::Vouch(vouch) => directory::vouch(state, identity, vouch, outbox).await,
                Self::Disable(request) => {
                    directory::disable(state, identity, request, outbox).await
                }
                Self::PresenceSet(request) => presence::set(state, identity, request, outbox).await,
                Self::Rekey(request) => rotation::rekey(state, identity, request, outbox).await,
            }
        }
    }
}
