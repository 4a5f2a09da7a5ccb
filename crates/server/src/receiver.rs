//! Where SMS from phones reach the server, for registration by the user's own SMS: the trusted
//! inbound sources, each handing its messages to [`accept`].
//!
//! Only sources whose "from" the operator's network vouches for are trusted:
//! - the SMPP session of the configured account (`deliver_sm` on the server's own bind) and the
//!   configured modem (its stored messages), polled by a task of the server: links the operator
//!   set up to its SMSC or its SIM;
//! - Kannel's `sms-service` calling `GET /v1/sms/inbound?from=%p&text=%a`, served only on the
//!   operator's loopback metrics address (`metrics_listen`), never on the public port, where
//!   anyone could claim any "from".
//!
//! Nothing here logs a number, a code or a text; outcomes are counted by fixed words.

use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse as _, Response};
use serde::Deserialize;
use tidings_gateway::{Received, TransportConfig};
use tidings_proto::number::E164;
use tidings_store::Store;

use crate::clock::now_ms;
use crate::inbound::{self, Heard};
use crate::metrics::Outcome;
use crate::state::Shared;

/// How often the SMPP session is checked for delivered SMS.
const SMPP_POLL: Duration = Duration::from_millis(500);
/// How often the modem's stored messages are read (each read opens the port).
const MODEM_POLL: Duration = Duration::from_secs(1);
/// The longest sender and text the Kannel route reads; longer ones are not a registration SMS.
const MAX_FIELD: usize = 1024;

/// Hands one SMS to the declaration of the number it came from, and counts the outcome.
pub async fn accept<S: Store>(state: &Shared<S>, sms: &Received) -> &'static str {
    let outcome = judge(state, sms).await;
    state
        .metrics
        .registrations
        .get_or_create(&Outcome { outcome })
        .inc();
    tracing::debug!(outcome, "an SMS for registration arrived");
    outcome
}

async fn judge<S: Store>(state: &Shared<S>, sms: &Received) -> &'static str {
    if state.config.inbound.is_none() {
        return "sms_not_offered";
    }
    let Some(code) = inbound::code_in_sms(&sms.text) else {
        return "sms_without_code";
    };
    // A sender the network gave in national form, or as a name, cannot be a declared number.
    let Ok(number) = E164::parse(&sms.from) else {
        return "sms_unknown_sender";
    };
    let Ok(pseudonym) = state.keys.pseudonym(&number) else {
        return "sms_unknown_sender";
    };
    let hash = state.keys.code_hash(&pseudonym, &code);
    let question = inbound::Question {
        asked: inbound::Asked::Hear,
        pseudonym,
        presented: hash,
        now: now_ms(),
    };
    match inbound::ask(state, question).await {
        inbound::Answer::Heard(Heard::Accepted) => "sms_accepted",
        inbound::Answer::Heard(Heard::Wrong) => "sms_wrong_code",
        inbound::Answer::Heard(Heard::Spent) => "sms_spent",
        _ => "sms_no_declaration",
    }
}

/// What Kannel's `get-url` sends: `from=%p&text=%a` (other fields are ignored).
#[derive(Deserialize)]
struct KannelSms {
    from: String,
    text: String,
}

/// The routes of the operator's address that take SMS from Kannel.
pub fn router<S: Store>(state: Shared<S>) -> axum::Router {
    axum::Router::new()
        .route("/v1/sms/inbound", axum::routing::get(from_kannel::<S>))
        .with_state(state)
}

/// One SMS from Kannel. The answer body is empty, so that Kannel sends no reply SMS.
async fn from_kannel<S: Store>(
    State(state): State<Shared<S>>,
    query: Result<Query<KannelSms>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if state.config.inbound.is_none() {
        return (StatusCode::NOT_FOUND, "").into_response();
    }
    let Ok(Query(sms)) = query else {
        return (StatusCode::BAD_REQUEST, "").into_response();
    };
    if sms.from.len() > MAX_FIELD || sms.text.len() > MAX_FIELD {
        return (StatusCode::BAD_REQUEST, "").into_response();
    }
    accept(
        &state,
        &Received {
            from: sms.from,
            text: sms.text,
        },
    )
    .await;
    (StatusCode::OK, "").into_response()
}

/// Starts polling the SMPP session or the modem, when registration by own SMS is on and the
/// gateway is one of them.
pub fn spawn<S: Store>(state: &Shared<S>) {
    if state.config.inbound.is_none() {
        return;
    }
    let period = match state.config.gateway {
        TransportConfig::Smpp(_) => SMPP_POLL,
        TransportConfig::Modem(_) => MODEM_POLL,
        TransportConfig::Outbox { .. } | TransportConfig::Kannel { .. } => return,
    };
    let state = state.clone();
    let tasks = state.tasks.clone();
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match state.gateway.receive().await {
                Ok(received) => {
                    failing = false;
                    for sms in &received {
                        accept(&state, sms).await;
                    }
                }
                // Said once per outage: the gateway's error names its address, never a number.
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot read SMS from the gateway");
                }
                Err(_) => {}
            }
        }
    });
}
