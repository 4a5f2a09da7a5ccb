//! Integration tests: a real `tidings server` on a real port, real `tidings` commands and the
//! client library against it. One test binary; each test starts its own server.

mod leaks;
mod support;

// Starts no server: checks that docs/ARCHITECTURE.md names only paths and items that exist.
mod architecture_doc;
mod at_rest;
mod audit;
mod blinding;
mod budgets;
mod cluster;
mod connections;
mod crash;
mod defaults;
mod deliver_first;
mod discovery;
mod e2e;
mod gateways;
mod limits;
mod linking;
mod messaging;
mod operations;
mod own_sms;
mod postgres;
mod presence;
mod privacy;
mod queues;
mod registration;
mod resend;
mod resumption;
mod revocation;
mod robustness;
mod rotation;
mod sms;
