//! `Idempotency-Key` on every POST: the same key with the same body replays
//! the original response; the same key with another body is refused (422).
//! Keys are scoped by the caller's credentials, kept 24 hours, and a request
//! still in flight under a key makes a second one wait its turn (409). The
//! claim on a key is made in the store, so all of this holds across every
//! gateway sharing it; a claim whose gateway died is taken over after
//! [`LEASE_SECONDS`].
//!
//! Only successful responses are remembered (a refusal changed nothing and
//! simply runs again), and never a challenge's.
//!
//! A response that holds a secret (an API or join token, a JWT-SVID: every
//! such response says `Cache-Control: no-store`) is never stored: only the
//! ids it named are, and a replay is refused with `idempotency-secret`,
//! naming them, so the caller can revoke what it lost and ask again.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{AppState, Problem};
use crate::store::{IDEMPOTENCY_IN_FLIGHT, IdempotencyClaim, IdempotentResponse, Store};
use crate::util::{now_unix, sha256_hex};

/// How long a key is remembered.
const KEEP_SECONDS: i64 = 24 * 3600;

/// How long a claim holds a key for a request that never finishes (its
/// gateway died): longer than any request runs.
pub const LEASE_SECONDS: i64 = 120;

/// Lets go of a claimed key if the request ends without an answer worth
/// keeping (a refusal, an error, or the client went away).
struct Claim(Option<(Store, String)>);

impl Claim {
    /// The answer was stored: nothing to let go of.
    fn settled(&mut self) {
        self.0 = None;
    }

    /// Lets go of the key before the answer leaves, so that a retry with
    /// the same key is not taken for one still in flight.
    async fn release(mut self) {
        if let Some((store, key)) = self.0.take()
            && let Err(e) = store.idempotency_release(&key).await
        {
            tracing::warn!(error = %e, "could not release an Idempotency-Key claim");
        }
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some((store, key)) = self.0.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            handle.spawn(async move {
                if let Err(e) = store.idempotency_release(&key).await {
                    tracing::warn!(error = %e, "could not release an Idempotency-Key claim");
                }
            });
        }
    }
}

fn in_flight() -> Response {
    Problem::new(
        StatusCode::CONFLICT,
        "idempotency-key-in-flight",
        "Request in progress",
        "a request with this Idempotency-Key is still being processed; retry shortly",
    )
    .into_response()
}

/// The answer to a key already used: its replay, or why there is none.
fn answered(saved: IdempotentResponse, body_sha256: &str) -> Response {
    if saved.body_sha256 != body_sha256 {
        return Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency key reused",
            "this Idempotency-Key was used with a different request body",
        )
        .into_response();
    }
    if saved.status == IDEMPOTENCY_IN_FLIGHT {
        return in_flight();
    }
    if saved.secret {
        return Problem::new(
            StatusCode::CONFLICT,
            "idempotency-secret",
            "Response not replayable",
            format!(
                "the first response to this Idempotency-Key held a secret, which Castellan never stores; \
                 it created {}: if that response was lost, revoke what it created and send a new request \
                 with a new key",
                saved.body
            ),
        )
        .into_response();
    }
    let mut resp = (
        StatusCode::from_u16(saved.status).unwrap_or(StatusCode::OK),
        saved.body,
    )
        .into_response();
    if let Ok(ct) = HeaderValue::from_str(&saved.content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    resp
}

pub(super) async fn layer(State(state): State<AppState>, req: Request<Body>, next: Next) -> Response {
    // A challenge is a fresh nonce by definition: a replay would defeat it,
    // and anyone may ask for one, so nothing is remembered for it.
    if req.method() != Method::POST || req.uri().path() == "/api/v1/attestation/challenges" {
        return next.run(req).await;
    }
    let Some(key) = req
        .headers()
        .get("idempotency-key")
        .map(|v| v.to_str().map(str::to_owned))
    else {
        return next.run(req).await;
    };
    let Some(key) = key.ok().filter(|k| !k.is_empty() && k.len() <= 255) else {
        return Problem::malformed("`Idempotency-Key` must be 1 to 255 visible ASCII characters")
            .into_response();
    };
    let (parts, body) = req.into_parts();
    let bytes = match super::read_body(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return Problem::from(e).into_response(),
    };
    // Scope: the credentials (hashed) and the route, so callers cannot
    // collide with or replay one another's keys.
    let auth = parts
        .headers
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes().to_vec())
        .unwrap_or_default();
    let scope = sha256_hex(
        &[
            auth.as_slice(),
            b"\0",
            parts.uri.path().as_bytes(),
            b"\0",
            key.as_bytes(),
        ]
        .concat(),
    );
    let body_sha256 = sha256_hex(&bytes);

    let store = state.engine.store.clone();
    let now = now_unix();
    let fresh = |r: &IdempotentResponse| {
        let keep = if r.status == IDEMPOTENCY_IN_FLIGHT {
            LEASE_SECONDS
        } else {
            KEEP_SECONDS
        };
        now - r.created_at < keep
    };
    // A read first: a replay costs no write.
    match store.idempotency_get(&scope).await {
        Ok(Some(saved)) if fresh(&saved) => return answered(saved, &body_sha256),
        Ok(_) => {}
        Err(e) => return Problem::unavailable(format!("store: {e}")).into_response(),
    }
    let mut claim = match store
        .idempotency_claim(&scope, &body_sha256, now, (LEASE_SECONDS, KEEP_SECONDS))
        .await
    {
        Ok(IdempotencyClaim::Claimed) => Claim(Some((store.clone(), scope.clone()))),
        Ok(IdempotencyClaim::InFlight) => return in_flight(),
        Ok(IdempotencyClaim::Answered(saved)) => return answered(saved, &body_sha256),
        Err(e) => return Problem::unavailable(format!("store: {e}")).into_response(),
    };
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    // Only what changed something is remembered: a refusal or a server error
    // changed nothing, so a retry simply runs again. (Otherwise a flood of
    // refused requests, each with a new key, would fill the table.)
    if !resp.status().is_success() {
        claim.release().await;
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 4 << 20).await else {
        return Problem::internal("the response could not be buffered").into_response();
    };
    let secret = parts
        .headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("no-store")));
    let kept = if secret {
        created_ids(&body)
    } else {
        String::from_utf8_lossy(&body).into_owned()
    };
    let saved = IdempotentResponse {
        body_sha256,
        status: parts.status.as_u16(),
        body: kept,
        secret,
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned(),
        created_at: now_unix(),
    };
    match store.idempotency_put(&scope, saved).await {
        Ok(()) => claim.settled(),
        Err(e) => tracing::warn!(error = %e, "could not remember an idempotent response"),
    }
    Response::from_parts(parts, Body::from(body))
}

/// What a secret-bearing response created, by its non-secret ids.
fn created_ids(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let ids: Vec<String> = ["id", "request_id", "jti", "name", "spiffe_id"]
        .iter()
        .filter_map(|k| v.get(*k).and_then(|x| x.as_str()).map(|x| format!("{k} `{x}`")))
        .collect();
    if ids.is_empty() {
        "a credential".into()
    } else {
        ids.join(", ")
    }
}
