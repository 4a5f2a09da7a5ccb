//! The HTTP API of the public port: registration, health, the OpenAPI document, and the upgrade
//! that opens a session (`/metrics` is served on an address of its own, by `metrics`). Routes and their OpenAPI entries are declared together (utoipa-axum), so the
//! document cannot drift from the router.

// Handlers return `Result<Response, Response>`: an error answer is a whole HTTP response, built
// once per failed request, so the size of the `Err` variant costs nothing that matters.
#![allow(clippy::result_large_err)]

use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json, Router};
use ed25519_dalek::{Signature, VerifyingKey};
use rand::{Rng as _, RngCore as _};
use tidings_core::verification::{self, Attempt};
use tidings_core::HOUR;
use tidings_proto::frame::{self, Kind};
use tidings_proto::http::{
    ApiError, CodeRequest, CodeSent, Health, InboundCode, InboundCompleteRequest, InboundRequest,
    LinkRequest, Linked, OprfKey, Verified, VerifyRequest,
};
use tidings_proto::id::DeviceId;
use tidings_proto::number::E164;
use tidings_store::Store;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::abuse::{self, AddressLimit, Refusal, Tripped};
use crate::clock::now_ms;
use crate::connection::{Peer, Slot};
use crate::directory::{identity_keys, link_code_hash, too_many_links};
use crate::inbound::{self, Completion, Refused};
use crate::metrics::Outcome;
use crate::session::{NotResumed, Opening, Resumed};
use crate::state::Shared;

#[cfg(test)]
mod tests;

#[derive(OpenApi)]
#[openapi(
    info(title = "Tidings", description = "Opt-in phone-number messaging. See docs/PROTOCOL.md for the session protocol behind /v1/connect."),
    tags((name = "registration", description = "Proving a number and binding a device key"),
         (name = "session", description = "The upgrade to the binary session protocol"),
         (name = "operations", description = "Health and this document (metrics are served on the operator's metrics address, not here)"))
)]
struct ApiDoc;

fn api_error(status: StatusCode, error: &str, message: &str) -> Response {
    api_error_with(
        status,
        ApiError {
            error: error.into(),
            message: message.into(),
            retry_after: None,
            attempts_left: None,
        },
    )
}

fn api_error_with(status: StatusCode, body: ApiError) -> Response {
    let mut response = (status, Json(body.clone())).into_response();
    if let Some(seconds) = body.retry_after {
        if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
    }
    response
}

/// A 401 `wrong_code` with the attempts left for the code.
fn wrong_code(message: &str, attempts_left: u32) -> Response {
    api_error_with(
        StatusCode::UNAUTHORIZED,
        ApiError {
            error: "wrong_code".into(),
            message: message.into(),
            retry_after: None,
            attempts_left: Some(attempts_left),
        },
    )
}

fn rate_limited(wait_ms: u64, message: &str) -> Response {
    retry_later("rate_limited", wait_ms, message)
}

/// A 429 with `error` and the seconds to wait, in the body and in `Retry-After`.
fn retry_later(error: &str, wait_ms: u64, message: &str) -> Response {
    api_error_with(
        StatusCode::TOO_MANY_REQUESTS,
        ApiError {
            error: error.into(),
            message: message.into(),
            retry_after: Some(wait_ms.div_ceil(1000)),
            attempts_left: None,
        },
    )
}

fn bad_json(rejection: JsonRejection) -> Response {
    // Keep the extractor's status (413 for an oversized body, 415 for a missing content type,
    // 400 or 422 for bad JSON) and say what was wrong.
    let status = rejection.status();
    let error = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "too_large"
    } else {
        "invalid_request"
    };
    api_error(
        status,
        error,
        &format!(
            "the body is not the expected JSON: {}",
            rejection.body_text()
        ),
    )
}

/// The body, or the error answer for a body that is not the expected JSON.
fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, Response> {
    body.map(|Json(value)| value).map_err(bad_json)
}

/// The number normalised to E.164, or a 400 answer that says what is wrong with it.
fn e164(text: &str) -> Result<E164, Response> {
    E164::parse(text)
        .map_err(|e| api_error(StatusCode::BAD_REQUEST, "invalid_number", &e.to_string()))
}

/// The number's pseudonym, or a 503 answer.
fn pseudonym_of<S: Store>(
    state: &Shared<S>,
    number: &E164,
) -> Result<tidings_store::Pseudonym, Response> {
    state.keys.pseudonym(number).map_err(|_| {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "try again shortly",
        )
    })
}

/// The pseudonym of a number that proved itself (a registration or a link), its account moved to
/// the current OPRF key if it was still on the previous one; a 503 answer if storage failed.
async fn registrant_pseudonym<S: Store>(
    state: &Shared<S>,
    number: &E164,
) -> Result<tidings_store::Pseudonym, Response> {
    crate::rotation::registrant_pseudonym(state, number)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "could not move an account to the current OPRF key");
            api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "try again shortly",
            )
        })
}

/// Counts a request against its client's address blocks (the peer, or the client a trusted proxy
/// names); a 429 answer with the wait when a block is spent.
/// At the abuse owner when there are several nodes ([`abuse::ask`]).
async fn check_address<S: Store>(
    state: &Shared<S>,
    limit: AddressLimit,
    peer: &Peer,
    headers: &HeaderMap,
    now: tidings_core::Millis,
) -> Result<(), Refusal> {
    let client = abuse::client_address(&state.config.trusted_proxies, peer.0.ip(), headers);
    abuse::ask(state, abuse::Question::Address { limit, client }, now).await
}

/// Counts a verification or link attempt against its client's address blocks.
async fn check_attempt_address<S: Store>(
    state: &Shared<S>,
    peer: &Peer,
    headers: &HeaderMap,
    now: tidings_core::Millis,
) -> Result<(), Response> {
    check_address(state, AddressLimit::Verifies, peer, headers, now)
        .await
        .map_err(|refusal| {
            rate_limited(
                refusal.wait,
                "too many attempts from this address or its network",
            )
        })
}

/// The answer to a code request that a limit or budget refused, counted and logged.
fn code_refused<S: Store>(
    state: &Shared<S>,
    refusal: Refusal,
    now: tidings_core::Millis,
) -> Response {
    state.abuse.report(&state.metrics, refusal, now);
    let message = match refusal.tripped {
        Tripped::Address | Tripped::AddressBlock => {
            "too many code requests from this address or its network"
        }
        Tripped::NumberDaily => {
            "this number has been sent as many codes as it may get in a day: use the last one"
        }
        Tripped::NumberPrefix | Tripped::Country | Tripped::Global => {
            "too many codes are being sent to numbers like this one"
        }
        Tripped::PremiumRate => return api_error(
            StatusCode::BAD_REQUEST,
            "unsupported_number",
            "codes are not sent to premium-rate or shared-cost numbers: register a mobile number",
        ),
    };
    rate_limited(refusal.wait, message)
}

/// Forgets the code just issued to a number, giving the number its allowance back: the user
/// never got it.
async fn withdraw_code<S: Store>(
    state: &Shared<S>,
    pseudonym: tidings_store::Pseudonym,
    now: tidings_core::Millis,
) {
    let _ = state
        .store
        .update_code_record(pseudonym, move |record| {
            if let Some(current) = record.as_mut() {
                current.sent_at.retain(|t| *t != now);
                current.live = None;
            }
        })
        .await;
}

/// Builds the router and the OpenAPI document it serves.
pub fn router<S: Store>(state: Shared<S>) -> Router {
    let body_timeout = state.config.body_timeout;
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(request_code))
        .routes(routes!(verify))
        .routes(routes!(declare_inbound))
        .routes(routes!(complete_inbound))
        .routes(routes!(link))
        .routes(routes!(connect))
        .routes(routes!(oprf_key))
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi))
        .split_for_parts();
    let json = api.to_pretty_json().unwrap_or_else(|_| "{}".into());
    let _ = state.openapi_json.set(json);
    router
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn(move |request, next| {
            body_in_time(body_timeout, request, next)
        }))
        .with_state(state)
}

/// Largest request body, in bytes.
const BODY_LIMIT: usize = 16 * 1024;

/// Reads the whole request body (at most [`BODY_LIMIT`]) within `timeout` (the
/// `body_timeout_seconds` setting: hyper bounds the headers, not the body, and a body sent
/// slowly, or never finished, must not hold a connection) before the route sees the request: 408
/// when it does not arrive in time (hyper then closes the connection, whose body is unfinished),
/// 413 when it is too large.
async fn body_in_time(
    timeout: Duration,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, BODY_LIMIT)).await;
    match read {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let cause = e.into_inner();
            if cause.is::<http_body_util::LengthLimitError>() {
                api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    "the body is larger than 16 KiB",
                )
            } else {
                api_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "the body could not be read",
                )
            }
        }
        Err(_) => api_error(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            &format!(
                "the body did not arrive within {} seconds of the headers: send it whole",
                timeout.as_secs()
            ),
        ),
    }
}

/// Sends a one-time code to a number.
#[utoipa::path(post, path = "/v1/registration/code", tag = "registration",
    request_body = CodeRequest,
    responses(
        (status = 202, description = "A code was sent", body = CodeSent),
        (status = 400, description = "Not a valid phone number (`invalid_number`), a premium-rate or shared-cost number no code is sent to (`unsupported_number`), or not JSON", body = ApiError),
        (status = 408, description = "The body did not arrive within `body_timeout_seconds` (10 by default) of the headers", body = ApiError),
        (status = 413, description = "The body is larger than 16 KiB", body = ApiError),
        (status = 415, description = "The body is not declared as JSON (Content-Type: application/json)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 429, description = "Too many codes: `too_many_codes` when the number has had all the codes it may have in 8 hours; otherwise `rate_limited`: a code for this number within 2 minutes, 5 SMS to it today, or too many from this client's address or address block, or to numbers of this prefix, of this country or in all. `retry_after` and the Retry-After header say in how many seconds to try again", body = ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (also `retry_after` in the body)"))),
        (status = 503, description = "The SMS gateway failed", body = ApiError),
    ))]
async fn request_code<S: Store>(
    State(state): State<Shared<S>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Json<CodeRequest>, JsonRejection>,
) -> Result<Response, Response> {
    let request = json_body(body)?;
    let number = e164(&request.number)?;
    let now = now_ms();
    if abuse::is_premium_rate(&number) {
        return Err(code_refused(
            &state,
            Refusal {
                tripped: Tripped::PremiumRate,
                wait: 0,
            },
            now,
        ));
    }
    if let Err(refusal) = check_address(&state, AddressLimit::Codes, &peer, &headers, now).await {
        state
            .metrics
            .registrations
            .get_or_create(&Outcome {
                outcome: "address_limited",
            })
            .inc();
        return Err(code_refused(&state, refusal, now));
    }
    let pseudonym = pseudonym_of(&state, &number)?;
    let code = format!("{:06}", rand::rngs::OsRng.gen_range(0..1_000_000u32));
    let hash = state.keys.code_hash(&pseudonym, &code);
    let policy = state.code_policy;
    let issued = state
        .store
        .update_code_record(pseudonym, move |record| {
            let current = record.get_or_insert_with(Default::default);
            let allowed = verification::may_send(&policy, current, now);
            if allowed.is_ok() {
                verification::issue(&policy, current, hash, now);
            }
            // Whether the number has had all the codes it may have over the long window: the
            // user then learns that it is this number, not a recent code, that waits.
            let used_up = policy.per_number_long.check(&current.sent_at, now).is_err();
            allowed.map_err(|wait| (wait, used_up))
        })
        .await;
    match issued {
        Ok(Ok(())) => {}
        Ok(Err((wait, used_up))) => {
            state
                .metrics
                .registrations
                .get_or_create(&Outcome {
                    outcome: "number_limited",
                })
                .inc();
            if used_up {
                let window = policy.per_number_long;
                return Err(retry_later(
                    "too_many_codes",
                    wait,
                    &format!(
                        "this number has had too many codes ({} in {} hours)",
                        window.max,
                        window.period / HOUR
                    ),
                ));
            }
            return Err(rate_limited(
                wait,
                "a code was sent to this number recently: use it, or ask for another later",
            ));
        }
        Err(e) => {
            tracing::warn!(error = %e, "storage failed during a code request");
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage unavailable: try again shortly",
            ));
        }
    }
    // The SMS budgets are taken only for a code that is about to be sent; a refused one gives
    // the number its allowance back.
    let taken = state.abuse.sms_keys(&number, now);
    match abuse::ask(&state, abuse::Question::Sms(taken), now).await {
        Ok(()) => {}
        Err(refusal) => {
            withdraw_code(&state, pseudonym, now).await;
            state
                .metrics
                .registrations
                .get_or_create(&Outcome {
                    outcome: "budget_limited",
                })
                .inc();
            return Err(code_refused(&state, refusal, now));
        }
    };
    let text = format!("Your Tidings code is {code}. It expires in 10 minutes. Do not share it.");
    if let Err(e) = state.gateway.send(&number, &text).await {
        tracing::warn!(error = %e, "SMS gateway failed to send a code");
        withdraw_code(&state, pseudonym, now).await;
        let _ = abuse::ask(&state, abuse::Question::GiveBack(taken), now).await;
        state
            .metrics
            .registrations
            .get_or_create(&Outcome {
                outcome: "gateway_failed",
            })
            .inc();
        return Err(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway_failed",
            "the SMS gateway failed: try again later",
        ));
    }
    state
        .metrics
        .registrations
        .get_or_create(&Outcome {
            outcome: "code_sent",
        })
        .inc();
    Ok((
        StatusCode::ACCEPTED,
        Json(CodeSent {
            expires_in: state.code_policy.code_ttl / 1000,
        }),
    )
        .into_response())
}

/// Checks a code and registers the device key; replaces every other device of the number.
#[utoipa::path(post, path = "/v1/registration/verify", tag = "registration",
    request_body = VerifyRequest,
    responses(
        (status = 200, description = "The device is registered", body = Verified),
        (status = 400, description = "Invalid number, key, signature or code format", body = ApiError),
        (status = 408, description = "The body did not arrive within `body_timeout_seconds` (10 by default) of the headers", body = ApiError),
        (status = 413, description = "The body is larger than 16 KiB", body = ApiError),
        (status = 415, description = "The body is not declared as JSON (Content-Type: application/json)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 401, description = "Wrong code", body = ApiError),
        (status = 410, description = "No live code for this number", body = ApiError),
        (status = 429, description = "Attempts used up (`too_many_attempts`: request a new code), or too many attempts from this client's address or address block (`rate_limited`, with the seconds to wait)", body = ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (also `retry_after` in the body)"))),
    ))]
async fn verify<S: Store>(
    State(state): State<Shared<S>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> Result<Response, Response> {
    let request = json_body(body)?;
    let number = e164(&request.number)?;
    if request.code.len() != 6 || !request.code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the code is the 6 digits from the SMS",
        ));
    }
    let checked = code_attempt(&state, &peer, &headers, &number, &request).await?;
    let (policy, presented, now) = (state.code_policy, checked.presented, checked.now);
    let attempt = state
        .store
        .update_code_record(checked.pseudonym, move |record| match record.as_mut() {
            Some(current) => verification::attempt(&policy, current, &presented, now),
            None => Attempt::NoCode,
        })
        .await;
    let attempt = match attempt {
        Ok(attempt) => attempt,
        Err(e) => {
            tracing::warn!(error = %e, "storage failed during verification");
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage unavailable: try again shortly",
            ));
        }
    };
    let label = match attempt {
        Attempt::Accepted => "verified",
        Attempt::Wrong { .. } => "wrong_code",
        Attempt::NoCode => "no_code",
        Attempt::TooManyAttempts => "too_many_attempts",
    };
    state
        .metrics
        .registrations
        .get_or_create(&Outcome { outcome: label })
        .inc();
    match attempt {
        Attempt::Accepted => {}
        Attempt::Wrong { attempts_left } => {
            return Err(wrong_code(
                "that code is not right: check the SMS and try again",
                attempts_left,
            ))
        }
        Attempt::NoCode => {
            return Err(api_error(
                StatusCode::GONE,
                "no_code",
                "no live code for this number: request a new one",
            ))
        }
        Attempt::TooManyAttempts => {
            return Err(api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_attempts",
                "attempts used up: request a new code",
            ))
        }
    }
    register_device(&state, &number, checked.key_bytes, now).await
}

/// What both ways of registering with a code (`verify` and `complete_inbound`) establish before
/// the code itself is compared: the device key, signed over the register transcript; the time;
/// the number's pseudonym; and the keyed hash of the code presented.
struct CodeAttempt {
    key_bytes: [u8; 32],
    now: tidings_core::Millis,
    pseudonym: tidings_store::Pseudonym,
    presented: [u8; 32],
}

/// A registration request that carries a code and a device key signed over it.
trait SignedCode {
    /// The code, the device key and the signature, as the request has them.
    fn signed_code(&self) -> (&str, &str, &str);
}

impl SignedCode for VerifyRequest {
    fn signed_code(&self) -> (&str, &str, &str) {
        (&self.code, &self.device_key, &self.signature)
    }
}

impl SignedCode for InboundCompleteRequest {
    fn signed_code(&self) -> (&str, &str, &str) {
        (&self.code, &self.device_key, &self.signature)
    }
}

/// Checks, in this order, the device key's signature ([`signed_device_key`]) and the attempt
/// budget of the client's address, then derives the number's pseudonym and the hash of the
/// code to compare with the stored one; the error answer otherwise.
async fn code_attempt<S: Store>(
    state: &Shared<S>,
    peer: &Peer,
    headers: &HeaderMap,
    number: &E164,
    request: &impl SignedCode,
) -> Result<CodeAttempt, Response> {
    let (code, device_key, signature) = request.signed_code();
    let key_bytes = signed_device_key(number, code, device_key, signature)?;
    let now = now_ms();
    check_attempt_address(state, peer, headers, now).await?;
    let pseudonym = pseudonym_of(state, number)?;
    let presented = state.keys.code_hash(&pseudonym, code);
    Ok(CodeAttempt {
        key_bytes,
        now,
        pseudonym,
        presented,
    })
}

/// The device key of a registration, once the signature by it over the register transcript of
/// the number and the code holds; the 400 answer otherwise.
fn signed_device_key(
    number: &E164,
    code: &str,
    device_key: &str,
    signature: &str,
) -> Result<[u8; 32], Response> {
    let bad = |message: &str| api_error(StatusCode::BAD_REQUEST, "invalid_request", message);
    let Some(key_bytes) =
        tidings_proto::id::from_text(device_key).and_then(|k| <[u8; 32]>::try_from(k).ok())
    else {
        return Err(bad("device_key must be 32 bytes of base64url"));
    };
    let Ok(key) = VerifyingKey::from_bytes(&key_bytes) else {
        return Err(bad("device_key is not an Ed25519 public key"));
    };
    let signature =
        tidings_proto::id::from_text(signature).and_then(|s| Signature::from_slice(&s).ok());
    let transcript = tidings_proto::transcript::register(number.as_str(), code, &key_bytes);
    if signature.is_none_or(|signature| key.verify_strict(&transcript, &signature).is_err()) {
        return Err(bad("signature does not match device_key"));
    }
    Ok(key_bytes)
}

/// Registers a new device of the number with `key_bytes`; every other device of the number is
/// signed out and deleted.
async fn register_device<S: Store>(
    state: &Shared<S>,
    number: &E164,
    key_bytes: [u8; 32],
    now: tidings_core::Millis,
) -> Result<Response, Response> {
    let pseudonym = registrant_pseudonym(state, number).await?;
    let key_version = state.keys.current_version();
    let mut device = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut device);
    let device = DeviceId(device);
    match state
        .store
        .register_device(pseudonym, key_version, device, key_bytes, now)
        .await
    {
        Ok(registered) => {
            state.hub.sign_out(
                &registered.removed,
                "this number was registered on another device",
            );
            tracing::info!(
                replaced = registered.removed.len(),
                "a device was registered"
            );
            let replaced_devices = u32::try_from(registered.removed.len()).unwrap_or(u32::MAX);
            Ok(Json(Verified {
                device_id: device.to_text(),
                replaced_devices,
                oprf_public_key: tidings_proto::id::to_text(&state.keys.oprf_public_key()),
                key_version: state.keys.current_version(),
                account: tidings_proto::id::to_text(&pseudonym.0),
            })
            .into_response())
        }
        Err(e) => {
            tracing::warn!(error = %e, "storage failed while registering a device");
            Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "storage unavailable: verify again",
            ))
        }
    }
}

/// The longest a completion waits for its SMS, in seconds.
const MAX_INBOUND_WAIT: u64 = 25;
/// How often a completion waiting for its SMS asks again when the SMS may reach another node.
const INBOUND_POLL: Duration = Duration::from_millis(250);

/// The answer when registration by own SMS is off.
fn not_offered() -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "not_offered",
        "this server does not offer registration by your own SMS: register with a code sent to you (`tidings register NUMBER`)",
    )
}

/// Declares a number for registration by the user's own SMS: no SMS is sent.
#[utoipa::path(post, path = "/v1/registration/inbound", tag = "registration",
    request_body = InboundRequest,
    responses(
        (status = 201, description = "Text `text` from the declared number to `service_number`, then complete", body = InboundCode),
        (status = 400, description = "Not a valid phone number (`invalid_number`), or not JSON", body = ApiError),
        (status = 404, description = "This server does not offer registration by own SMS (`not_offered`)", body = ApiError),
        (status = 408, description = "The body did not arrive within 10 seconds of the headers", body = ApiError),
        (status = 413, description = "The body is larger than 16 KiB", body = ApiError),
        (status = 415, description = "The body is not declared as JSON (Content-Type: application/json)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 429, description = "Too many declarations from this client's address or address block, or for this number (5 an hour); `rate_limited`, with the seconds to wait", body = ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (also `retry_after` in the body)"))),
        (status = 503, description = "Too many registrations are pending: try again shortly", body = ApiError),
    ))]
async fn declare_inbound<S: Store>(
    State(state): State<Shared<S>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Json<InboundRequest>, JsonRejection>,
) -> Result<Response, Response> {
    let request = json_body(body)?;
    let Some(offer) = state.config.inbound.clone() else {
        return Err(not_offered());
    };
    let number = e164(&request.number)?;
    let now = now_ms();
    if let Err(refusal) = check_address(&state, AddressLimit::Codes, &peer, &headers, now).await {
        return Err(code_refused(&state, refusal, now));
    }
    let pseudonym = pseudonym_of(&state, &number)?;
    let code = inbound::new_code();
    let hash = state.keys.code_hash(&pseudonym, &code);
    let outcome = match inbound::ask(
        &state,
        inbound::Question {
            asked: inbound::Asked::Declare {
                ttl: offer.code_ttl,
            },
            pseudonym,
            presented: hash,
            now,
        },
    )
    .await
    {
        inbound::Answer::Declared(outcome) => outcome,
        _ => Err(Refused::Full),
    };
    let label = match outcome {
        Ok(()) => "inbound_declared",
        Err(Refused::TooOften(_)) => "inbound_number_limited",
        Err(Refused::Full) => "inbound_full",
    };
    state
        .metrics
        .registrations
        .get_or_create(&Outcome { outcome: label })
        .inc();
    match outcome {
        Ok(()) => {}
        Err(Refused::TooOften(wait)) => {
            return Err(rate_limited(
                wait,
                "this number was declared too often: text the last code, or try again later",
            ))
        }
        Err(Refused::Full) => {
            return Err(api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "too many registrations are pending: try again shortly",
            ))
        }
    }
    Ok((
        StatusCode::CREATED,
        Json(InboundCode {
            text: inbound::sms_text(&code),
            code,
            service_number: offer.service_number.as_str().to_string(),
            expires_in: offer.code_ttl / 1000,
        }),
    )
        .into_response())
}

/// Completes a registration by own SMS once the SMS from the declared number has arrived: binds
/// the device key like `verify`, and replaces every other device of the number.
#[utoipa::path(post, path = "/v1/registration/inbound/complete", tag = "registration",
    request_body = InboundCompleteRequest,
    responses(
        (status = 200, description = "The device is registered", body = Verified),
        (status = 400, description = "Invalid number, key, signature, code format or wait", body = ApiError),
        (status = 401, description = "Wrong code (`wrong_code`, with `attempts_left`)", body = ApiError),
        (status = 404, description = "This server does not offer registration by own SMS (`not_offered`)", body = ApiError),
        (status = 408, description = "The body did not arrive within 10 seconds of the headers", body = ApiError),
        (status = 409, description = "The SMS has not arrived (yet) from the declared number (`not_received`): send it, then ask again", body = ApiError),
        (status = 410, description = "The code expired (`expired`), or no registration by SMS is pending for this number (`no_code`): declare again", body = ApiError),
        (status = 413, description = "The body is larger than 16 KiB", body = ApiError),
        (status = 415, description = "The body is not declared as JSON (Content-Type: application/json)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 429, description = "Attempts used up (`too_many_attempts`: declare again), or too many attempts from this client's address or address block (`rate_limited`, with the seconds to wait)", body = ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (also `retry_after` in the body)"))),
    ))]
async fn complete_inbound<S: Store>(
    State(state): State<Shared<S>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Json<InboundCompleteRequest>, JsonRejection>,
) -> Result<Response, Response> {
    let request = json_body(body)?;
    if state.config.inbound.is_none() {
        return Err(not_offered());
    }
    let number = e164(&request.number)?;
    let bad = |message: &str| api_error(StatusCode::BAD_REQUEST, "invalid_request", message);
    if inbound::normalize(&request.code).as_deref() != Some(request.code.as_str()) {
        return Err(bad(
            "the code is the 8 characters of the declaration's answer, such as 7QK4M2XD",
        ));
    }
    if request.wait_seconds > MAX_INBOUND_WAIT {
        return Err(bad("wait_seconds is at most 25"));
    }
    let attempt = code_attempt(&state, &peer, &headers, &number, &request).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(request.wait_seconds);
    let completion = loop {
        // Interest is registered before the check, so an SMS that arrives between the two
        // still wakes this request.
        let arrival = state.declarations.arrival().notified();
        tokio::pin!(arrival);
        arrival.as_mut().enable();
        let question = inbound::Question {
            asked: inbound::Asked::Complete,
            pseudonym: attempt.pseudonym,
            presented: attempt.presented,
            now: now_ms(),
        };
        let completion = match inbound::ask(&state, question).await {
            inbound::Answer::Completed(completion) => completion,
            _ => Completion::NoDeclaration,
        };
        if completion != Completion::Waiting || tokio::time::Instant::now() >= deadline {
            break completion;
        }
        // An SMS that reaches another node wakes no one here: with a bus, ask again now and
        // then.
        let poll = if state.hub.bus().is_some() {
            (tokio::time::Instant::now() + INBOUND_POLL).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            () = &mut arrival => {}
            () = tokio::time::sleep_until(poll) => {}
            () = state.shutdown.cancelled() => break completion,
        }
    };
    let label = match completion {
        Completion::Done => "inbound_verified",
        Completion::Waiting => "inbound_waiting",
        Completion::Wrong { .. } => "inbound_wrong_code",
        Completion::NoDeclaration => "inbound_no_code",
        Completion::Expired => "inbound_expired",
        Completion::TooManyAttempts => "inbound_too_many_attempts",
    };
    state
        .metrics
        .registrations
        .get_or_create(&Outcome { outcome: label })
        .inc();
    match completion {
        Completion::Done => register_device(&state, &number, attempt.key_bytes, now_ms()).await,
        Completion::Waiting => Err(api_error(
            StatusCode::CONFLICT,
            "not_received",
            "the SMS has not reached the server yet: send the text from the declared number to the service number, then ask again",
        )),
        Completion::Wrong { attempts_left } => Err(wrong_code(
            "that is not the code of this number's registration",
            attempts_left,
        )),
        Completion::NoDeclaration => Err(api_error(
            StatusCode::GONE,
            "no_code",
            "no registration by SMS is pending for this number: start again for a new code",
        )),
        Completion::Expired => Err(api_error(
            StatusCode::GONE,
            "expired",
            "the code expired before its SMS arrived: start again for a new code",
        )),
        Completion::TooManyAttempts => Err(api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "attempts used up: start again for a new code",
        )),
    }
}

/// Adds a device to a number with a link code shown on one of its devices; the number's other
/// devices stay signed in.
#[utoipa::path(post, path = "/v1/registration/link", tag = "registration",
    request_body = LinkRequest,
    responses(
        (status = 200, description = "The device joined the number", body = Linked),
        (status = 400, description = "Invalid number, key or signature", body = ApiError),
        (status = 401, description = "No live link code for this number matches", body = ApiError),
        (status = 409, description = "The number already has 6 devices", body = ApiError),
        (status = 408, description = "The body did not arrive within `body_timeout_seconds` (10 by default) of the headers", body = ApiError),
        (status = 413, description = "The body is larger than 16 KiB", body = ApiError),
        (status = 415, description = "The body is not declared as JSON (Content-Type: application/json)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape", body = ApiError),
        (status = 429, description = "Too many attempts from this client's address or address block, or the number linked its most devices for the day (`links_per_day`); `rate_limited`, with the seconds to wait", body = ApiError, headers(("Retry-After" = u64, description = "Seconds to wait before trying again (also `retry_after` in the body)"))),
    ))]
async fn link<S: Store>(
    State(state): State<Shared<S>>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
    body: Result<Json<LinkRequest>, JsonRejection>,
) -> Result<Response, Response> {
    let request = json_body(body)?;
    let number = e164(&request.number)?;
    let bad = |message: &str| api_error(StatusCode::BAD_REQUEST, "invalid_request", message);
    let Some(key_bytes) = tidings_proto::id::from_text(&request.device_key)
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
    else {
        return Err(bad("device_key must be 32 bytes of base64url"));
    };
    let Ok(key) = VerifyingKey::from_bytes(&key_bytes) else {
        return Err(bad("device_key is not an Ed25519 public key"));
    };
    let identity_key = tidings_proto::id::from_text(&request.identity_key).unwrap_or_default();
    let signing_key = tidings_proto::id::from_text(&request.signing_key).unwrap_or_default();
    let Some(identity) = identity_keys(&identity_key, &signing_key) else {
        return Err(bad(
            "identity_key and signing_key must be a 32-byte Curve25519 key and a 32-byte Ed25519 key",
        ));
    };
    let signature = tidings_proto::id::from_text(&request.signature)
        .and_then(|s| Signature::from_slice(&s).ok());
    let transcript = tidings_proto::transcript::link(
        number.as_str(),
        &request.code,
        &key_bytes,
        &identity_key,
        &signing_key,
    );
    if signature.is_none_or(|signature| key.verify_strict(&transcript, &signature).is_err()) {
        return Err(bad("signature does not match device_key"));
    }
    // Only its size is checked: the proof is keyed by a secret the server never sees, for the
    // device that showed the code to check.
    let Some(proof) = tidings_proto::id::from_text(&request.proof).filter(|p| p.len() == 32) else {
        return Err(bad(
            "proof must be 32 bytes of base64url: link with the whole link string `tidings link` shows",
        ));
    };
    let now = now_ms();
    check_attempt_address(&state, &peer, &headers, now).await?;
    let pseudonym = registrant_pseudonym(&state, &number).await?;
    let unavailable = || {
        api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "storage unavailable: try again shortly",
        )
    };
    let account = state.store.account(pseudonym).await.map_err(|e| {
        tracing::warn!(error = %e, "storage failed during a link");
        unavailable()
    })?;
    // The same answer whether the number is not a user or the code is wrong: a link attempt
    // reveals nothing about a number.
    let wrong_code = || {
        api_error(
            StatusCode::UNAUTHORIZED,
            "wrong_code",
            "no live link code for this number matches: run `tidings link` on a device of the number for a new one",
        )
    };
    let hash = link_code_hash(&request.code);
    let offer = {
        let Ok(mut offers) = state.link_offers.lock() else {
            return Err(unavailable());
        };
        match (offers.get(&hash), &account) {
            (Some(offer), Some(account))
                if offer.account == account.account && offer.expires_at > now =>
            {
                offers.remove(&hash)
            }
            _ => None,
        }
    };
    // A code asked for at another node is held there.
    let offer = match (offer, state.hub.bus(), &account) {
        (None, Some(bus), Some(account)) => bus.take_link_offer(hash, account.account, now).await,
        (offer, _, _) => offer,
    };
    let Some(offer) = offer else {
        return Err(wrong_code());
    };
    let links = crate::budget::Budget::Links { record: true };
    let key = state.keys.budget_key(&pseudonym);
    if let Err(wait) = crate::budget::take(&state, links, key, 1, now).await {
        let message = too_many_links(state.config.links_per_day);
        return Err(rate_limited(wait, &message));
    }
    // The id the new device's link proof covers: made from its login key, so that the approver
    // vouches only for the device that holds the key the new device signed with.
    let device = DeviceId(tidings_proto::transcript::link_device_id(
        number.as_str(),
        &request.code,
        &key_bytes,
    ));
    match state
        .store
        .add_device(
            tidings_store::Actor {
                account: offer.account,
                device: offer.approver,
            },
            device,
            key_bytes,
            identity,
            tidings_proto::MAX_DEVICES,
            now,
        )
        .await
    {
        Ok(tidings_store::Linked::Added) => {
            let completed = Kind::LinkCompleted(frame::LinkCompleted {
                device_id: device.as_bytes().to_vec(),
                identity_key,
                signing_key,
                proof,
            })
            .into();
            state.hub.notify(&offer.approver, &completed);
            tracing::info!("a device was linked");
            Ok(Json(Linked {
                device_id: device.to_text(),
                oprf_public_key: tidings_proto::id::to_text(&state.keys.oprf_public_key()),
                key_version: state.keys.current_version(),
                account: tidings_proto::id::to_text(&pseudonym.0),
            })
            .into_response())
        }
        Ok(tidings_store::Linked::TooManyDevices) => Err(api_error(
            StatusCode::CONFLICT,
            "too_many_devices",
            "this number already has 6 devices: remove one with `tidings devices --remove <id>` first",
        )),
        // The device that asked for the code was removed, or its account disabled, meanwhile.
        Err(tidings_store::StoreError::Revoked) => Err(wrong_code()),
        Err(e) => {
            tracing::warn!(error = %e, "storage failed while linking a device");
            Err(unavailable())
        }
    }
}

/// The OPRF public key that evaluates blinded numbers now, for a client to pin.
#[utoipa::path(get, path = "/v1/oprf-key", tag = "session",
    responses((status = 200, description = "The server's OPRF public key (ristretto255, base64url) and its version, under which every `EvaluateResult` of `key_version` 0 or that version verifies; after a rotation, while the server still holds the key before it, that key and its version too (`previous_public_key`, `previous_key_version`)", body = OprfKey)))]
async fn oprf_key<S: Store>(State(state): State<Shared<S>>) -> Json<OprfKey> {
    let previous = state.keys.previous_public_key();
    Json(OprfKey {
        public_key: tidings_proto::id::to_text(&state.keys.oprf_public_key()),
        key_version: state.keys.current_version(),
        previous_public_key: previous.map(|(_, key)| tidings_proto::id::to_text(&key)),
        previous_key_version: previous.map(|(version, _)| version),
    })
}

/// Upgrades to the session protocol (`Upgrade: tidings/3`); see docs/PROTOCOL.md. A
/// `Tidings-Resume` header with a resumption token from the last `LoginResult` (and
/// `Tidings-Listen: 1` for a listening session) logs the device in at once when the token holds.
#[utoipa::path(get, path = "/v1/connect", tag = "session",
    params(
        ("Tidings-Resume" = Option<String>, Header, description = "A resumption token (base64url) from the device's last LoginResult: single use, valid at most 24 h. When it holds, the answer carries Tidings-Resumed: 1 and the session is logged in; otherwise the challenge login follows"),
        ("Tidings-Listen" = Option<String>, Header, description = "With Tidings-Resume: 1 for a listening session (what Login.listen says in a challenge login)"),
    ),
    responses(
        (status = 101, description = "Switching to the session protocol; the Tidings-Resumed header (1) says a resumption token logged the device in and LoginResult follows; otherwise the Tidings-Challenge header carries the login challenge"),
        (status = 426, description = "The request did not ask to upgrade to tidings/3 (an older client is told to update: since tidings/2 numbers are blinded on the device, since tidings/3 a receiver shows a message only on CONFIRMED)", body = ApiError),
    ))]
async fn connect<S: Store>(
    State(state): State<Shared<S>>,
    slot: Option<Extension<Slot>>,
    mut request: Request,
) -> Response {
    let wants_upgrade = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(tidings_proto::UPGRADE_PROTOCOL));
    if !wants_upgrade {
        let asked = request
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_ascii_lowercase);
        let message = match asked.as_deref() {
            Some("tidings/1") => "this server speaks tidings/3, where numbers are blinded on the device: update the client (tidings/1 sent contacts' numbers in clear)",
            Some("tidings/2") => "this server speaks tidings/3, where a message is shown only once the server confirms its delivery is recorded: update the client (a tidings/2 client could show a message that was also sent as SMS)",
            _ => "this endpoint opens a session: send Connection: Upgrade and Upgrade: tidings/3",
        };
        let mut response = api_error(StatusCode::UPGRADE_REQUIRED, "upgrade_required", message);
        response.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_static(tidings_proto::UPGRADE_PROTOCOL),
        );
        return response;
    }
    let resumed = match request.headers().get(tidings_proto::RESUME_HEADER) {
        Some(token) => {
            let listen = request
                .headers()
                .get(tidings_proto::LISTEN_HEADER)
                .is_some_and(|v| v.as_bytes() == b"1");
            resume(&state, token.as_bytes(), listen).await
        }
        None => None,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let session_state = state.clone();
    let slot = slot.map(|Extension(slot)| slot);
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(
        header::UPGRADE,
        HeaderValue::from_static(tidings_proto::UPGRADE_PROTOCOL),
    );
    let opening = match resumed {
        Some(resumed) => {
            headers.insert(tidings_proto::RESUMED_HEADER, HeaderValue::from_static("1"));
            Opening::Resumed(resumed)
        }
        None => {
            let mut challenge = [0u8; 32];
            rand::rngs::OsRng.fill_bytes(&mut challenge);
            if let Ok(value) = HeaderValue::from_str(&tidings_proto::id::to_text(&challenge)) {
                headers.insert(tidings_proto::CHALLENGE_HEADER, value);
            }
            Opening::Challenge(challenge)
        }
    };
    state.tasks.spawn(crate::session::start(
        session_state,
        on_upgrade,
        opening,
        slot,
    ));
    response
}

/// The device a resumption token logs in, its session registered, if the token holds
/// ([`crate::resume`]) and the device still exists (read in the store at every use,
/// [`Resumed::open`]); `None` sends the client to the challenge login, whatever the reason,
/// which only the `resumes` metric tells.
async fn resume<S: Store>(state: &Shared<S>, token: &[u8], listen: bool) -> Option<Resumed> {
    let outcome = |label: &'static str| {
        state
            .metrics
            .resumes
            .get_or_create(&Outcome { outcome: label })
            .inc();
    };
    let Some(token) = std::str::from_utf8(token)
        .ok()
        .filter(|text| text.len() <= tidings_proto::MAX_RESUME_TOKEN_BYTES * 4 / 3 + 4)
        .and_then(tidings_proto::id::from_text)
    else {
        outcome(crate::resume::Refused::Malformed.label());
        return None;
    };
    let device = match state.resumption.redeem(&state.keys, &token, now_ms()) {
        Ok(device) => device,
        Err(refused) => {
            outcome(refused.label());
            return None;
        }
    };
    match Resumed::open(state, device, listen).await {
        Ok(resumed) => {
            outcome("resumed");
            Some(resumed)
        }
        Err(NotResumed::DeviceGone) => {
            outcome("refused_device_gone");
            None
        }
        Err(NotResumed::TooManySessions) => {
            outcome("refused_too_many_sessions");
            None
        }
        Err(NotResumed::Unavailable(e)) => {
            tracing::warn!(error = %e, "storage failed while resuming a session");
            outcome("refused_unavailable");
            None
        }
    }
}

/// Answers while the server runs.
#[utoipa::path(get, path = "/v1/health", tag = "operations",
    responses((status = 200, description = "The server is up", body = Health)))]
async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Answers `ready` while this node can serve every device: on a node of several, while its bus
/// to the others is connected (without it, copies for devices on other nodes wait in storage
/// and their presence is unknown here).
#[utoipa::path(get, path = "/v1/ready", tag = "operations",
    responses(
        (status = 200, description = "The node serves every device", body = Health),
        (status = 503, description = "The node's bus to the other nodes is down", body = ApiError),
    ))]
async fn ready<S: Store>(State(state): State<Shared<S>>) -> Response {
    if state.hub.bus().is_some_and(|bus| !bus.is_up()) {
        return api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "bus_down",
            "this node cannot reach the other nodes: messages for their devices are stored until it can",
        );
    }
    Json(Health {
        status: "ready".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
    .into_response()
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document of this API", content_type = "application/json")))]
async fn openapi<S: Store>(State(state): State<Shared<S>>) -> Response {
    let json = state.openapi_json.get().cloned().unwrap_or_default();
    ([(header::CONTENT_TYPE, "application/json")], json).into_response()
}
