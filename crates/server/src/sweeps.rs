//! Background work on intervals, each on its own: expiry (with its receipts), storing held
//! copies whose acknowledgement window ended, the heartbeat sweep that wakes lapsed sessions, pruning of codes and limiters, and scrubbing.
//!
//! With other nodes, each store-wide job (expiry, code pruning, scrubbing) runs on one node only,
//! its owner among those that hear each other; the rest are each node's own.
//!
//! A sweep never holds up a request: each is a task of the server that runs its work, waits for
//! its next tick, and stops at shutdown. None logs what it expired or pruned beyond counts.

use std::time::Duration;

use tidings_proto::frame::{Kind, Receipt, ReceiptKind};
use tidings_store::Store;

use crate::clock::{now_ms, session_ms};
use crate::state::Shared;

/// Most messages one expiry pass deletes; the rest wait for the next second.
const EXPIRE_BATCH: usize = 1000;

/// Whether this node runs the store-wide job `job`: always when it is alone, else when it is the
/// job's owner among the nodes ([`crate::bus::Bus::runs_job`]).
fn runs<S: Store>(state: &Shared<S>, job: &str) -> bool {
    state.hub.bus().is_none_or(|bus| bus.runs_job(job))
}

/// Starts every sweep as a task of the server.
pub fn spawn<S: Store>(state: &Shared<S>) {
    every(state, Duration::from_secs(1), |state| async move {
        if !runs(&state, "expiry") {
            return;
        }
        match state.store.expire(now_ms(), EXPIRE_BATCH).await {
            Ok(expired) => {
                state.metrics.expired.inc_by(expired.len() as u64);
                for message in expired {
                    let receipt = Kind::Receipt(Receipt {
                        id: message.id.as_bytes().to_vec(),
                        kind: ReceiptKind::Expired as i32,
                    })
                    .into();
                    state.hub.notify(&message.sender_device, &receipt);
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiry sweep failed"),
        }
    });
    // Held copies not acknowledged within the window are stored.
    if state.held.enabled() {
        let period = Duration::from_millis((state.held.window() / 4).max(5));
        every(state, period, crate::held::store_due);
    }
    // The heartbeat sweep: a session keeps no timer of its own, idle or busy.
    every(state, Duration::from_millis(500), |state| async move {
        state.hub.wake_lapsed(Some(session_ms()));
    });
    every(state, Duration::from_secs(60), |state| async move {
        let now = now_ms();
        state.prune_limiters(now);
        if !runs(&state, "prune-codes") {
            return;
        }
        if let Err(e) = state.store.prune_codes(now).await {
            tracing::warn!(error = %e, "code pruning failed");
        }
    });
    let scrub_interval = Duration::from_millis(state.config.scrub_interval_ms);
    every(state, scrub_interval, |state| async move {
        if !runs(&state, "scrub") {
            return;
        }
        if let Err(e) = state.store.scrub().await {
            tracing::debug!(error = %e, "scrub deferred");
        }
    });
}

/// Runs `work` every `period` until shutdown.
fn every<S, F, Fut>(state: &Shared<S>, period: Duration, mut work: F)
where
    S: Store,
    F: FnMut(Shared<S>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let state_for_task = state.clone();
    state.tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                () = state_for_task.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            work(state_for_task.clone()).await;
        }
    });
}
