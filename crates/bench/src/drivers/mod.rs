//! One client driver per target, each speaking the target's real client protocol.

pub mod mqtt;
pub mod nats;
pub mod tidings;
pub mod xmpp;
