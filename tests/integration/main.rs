//! Integration tests: a real `tidings server` on a real port, real `tidings` commands and the
//! client library against it. One test binary; each test starts its own server.

mod support;

mod e2e;
mod gateways;
mod messaging;
mod operations;
mod privacy;
mod registration;
mod robustness;
mod sms;
