//! The HTTP API: a thin adapter over the engine. Handlers parse the request,
//! authenticate the caller, call the engine (or a registry for admin
//! resources) and render the answer as JSON or an RFC 9457 problem. No
//! issuance logic lives here; refusals are audited by the engine.
//!
//! One file per resource: attested issuance and challenges (`issuance`),
//! just-in-time requests (`ephemeral`), the broker and OAuth endpoints
//! (`broker`), trust sources, entries, bundles, and the admin resources
//! (`admin`: tokens, certificates, audit, join tokens, federation).

mod admin;
mod authorities;
mod broker;
mod bundles;
mod console;
mod entries;
mod ephemeral;
mod follow;
mod idempotency;
mod issuance;
pub mod metrics;
mod problem;
mod trust_sources;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use bundles::{activate_stored as activate_stored_bundles, watch as watch_bundle_sources};
pub use follow::follow_store;
pub use problem::{Problem, TYPE_PREFIX};

use crate::auth::{Authenticator, Principal, Role};
use crate::bundle::BundleKeys;
use crate::engine::{Engine, EngineError};
use crate::model::{Actor, AuditEvent, AuditKind};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub bundles: Arc<crate::bundle::Bundles>,
    pub bundle_keys: Arc<BundleKeys>,
    pub federation: Arc<crate::federation::Federation>,
    /// `spiffe_refresh_hint` of the bundle this server publishes.
    pub bundle_refresh_hint: u64,
    pub max_body_bytes: usize,
    /// Whether `GET /metrics` is on this listener (else on `[metrics] addr`,
    /// or nowhere).
    pub metrics_here: bool,
}

/// The API's routes, and the approver console's.
pub fn router(state: AppState) -> Router {
    let mut routes = Router::new();
    if state.metrics_here {
        routes = routes.route("/metrics", get(metrics::render));
    }
    let api = routes
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/workloads/attested-issuance", post(issuance::attested))
        .route("/api/v1/attestation/challenges", post(issuance::create_challenge))
        .route(
            "/api/v1/trust-sources",
            post(trust_sources::create).get(trust_sources::list),
        )
        .route(
            "/api/v1/trust-sources/{id}",
            delete(trust_sources::delete).get(trust_sources::get),
        )
        .route("/api/v1/trust-sources/{id}/rotate", post(trust_sources::rotate))
        .route("/api/v1/trust-sources/{id}/revoke", post(trust_sources::revoke))
        .route("/api/v1/certificates", get(admin::list_certificates))
        .route("/api/v1/audit", get(admin::list_audit))
        .route("/api/v1/audit/verify", get(admin::verify_audit))
        .route("/api/v1/audit/checkpoints", post(admin::audit_checkpoint))
        .route("/api/v1/explain", post(admin::explain))
        .route("/api/v1/ca/intermediates", post(admin::sign_subordinate))
        .route(
            "/api/v1/ca/authorities",
            post(authorities::prepare).get(authorities::list),
        )
        .route("/api/v1/ca/authorities/{id}/{op}", post(authorities::step))
        .route(
            "/api/v1/tokens",
            post(admin::create_token).get(admin::list_tokens),
        )
        .route("/api/v1/tokens/{id}", delete(admin::revoke_token))
        .route("/api/v1/join-tokens", post(admin::create_join_token))
        .route("/api/v1/federation", get(admin::federation_status))
        .route("/.well-known/spiffe-bundle", get(admin::spiffe_bundle))
        .route("/api/v1/ephemeral", post(ephemeral::create).get(ephemeral::list))
        .route("/api/v1/ephemeral/{id}", get(ephemeral::get))
        .route("/api/v1/ephemeral/{id}/approvals", post(ephemeral::vote))
        .route("/api/v1/ephemeral/{id}/cancel", post(ephemeral::cancel))
        .route("/api/v1/ephemeral/{id}/collect", post(ephemeral::collect))
        .route("/api/v1/broker/agent-identities", post(broker::agent_identities))
        .route(
            "/api/v1/broker/revocations",
            post(broker::revoke).get(broker::revocation_feed),
        )
        .route("/api/v1/broker/agents", get(broker::agents))
        .route("/oauth2/token", post(broker::token))
        .route("/oauth2/introspect", post(broker::introspect))
        .route("/.well-known/openid-configuration", get(broker::discovery))
        .route("/.well-known/jwks.json", get(broker::jwks))
        .route("/api/v1/bundles", get(bundles::list))
        .route("/api/v1/bundles/{name}", axum::routing::put(bundles::put))
        .route("/api/v1/entries", post(entries::create).get(entries::list))
        .route("/api/v1/entries/{id}", get(entries::get).delete(entries::delete))
        .fallback(|| async { Problem::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this endpoint does not accept that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route_layer(axum::middleware::from_fn(metrics::time_request))
        .layer(axum::middleware::from_fn(request_id))
        .with_state(state.clone());
    api.clone().merge(console::router(state, api))
}

/// The header that names a request's id on every answer.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Gives every request an id, always the server's own (a caller's choice
/// could collide with another request's): refusals are audited under it,
/// problem responses carry it (`request_id`, `instance`) and every answer
/// names it in `X-Request-Id`.
async fn request_id(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let id = crate::engine::new_request_id();
    let mut resp = crate::engine::as_request(id.clone(), next.run(req)).await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

/// `GET /metrics` alone, for `[metrics] addr`.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics::render))
        .with_state(state)
}

/// Reads a JSON body of at most `limit` bytes.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, EngineError> {
    let bytes = read_body(body, limit).await?;
    serde_json::from_slice(&bytes).map_err(|e| EngineError::BadRequest(format!("invalid JSON body: {e}")))
}

/// How long a request may take to send its body once its headers arrived.
const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How much of an oversized body is read and thrown away, so that the
/// client, still sending, receives the `413` instead of a reset connection.
const OVERSIZE_DRAIN: usize = 1 << 20;
/// How long that may take.
const OVERSIZE_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A request body, at most `limit` bytes, arriving within the body timeout.
async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, EngineError> {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame =
                frame.map_err(|_| EngineError::BadRequest("the request body could not be read".into()))?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(EngineError::TooLarge { limit });
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(())
    };
    let result = tokio::time::timeout(BODY_READ_TIMEOUT, read)
        .await
        .map_err(|_| EngineError::BadRequest("the request body did not arrive in time".into()))
        .and_then(|r| r);
    if let Err(EngineError::TooLarge { .. }) = &result {
        // Bounded in bytes and time: a larger or slower body is cut off.
        let drain = async {
            let mut thrown = 0;
            while thrown < OVERSIZE_DRAIN
                && let Some(Ok(frame)) = body.frame().await
            {
                thrown += frame.data_ref().map_or(0, |d| d.len());
            }
        };
        let _ = tokio::time::timeout(OVERSIZE_DRAIN_TIMEOUT, drain).await;
    }
    result.map(|()| buf.freeze())
}

impl AppState {
    /// Appends an audit event (a failure is logged by the engine).
    async fn audit(&self, kind: AuditKind, actor: Actor, detail: Value) {
        self.engine.audit(AuditEvent::new(kind, actor, detail)).await;
    }

    /// The caller behind the `Authorization` header, if any.
    fn principal(&self, headers: &HeaderMap) -> Option<Principal> {
        let header = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        self.auth.authenticate(header)
    }

    /// Requires an authenticated caller; a failed attempt is audited.
    async fn require_principal(&self, headers: &HeaderMap, what: &str) -> Result<Principal, Problem> {
        if let Some(p) = self.principal(headers) {
            return Ok(p);
        }
        let present = headers.contains_key(header::AUTHORIZATION);
        let event = AuditEvent::new(
            AuditKind::AuthRefused,
            Actor::Anonymous,
            json!({ "endpoint": what, "token_present": present }),
        );
        self.engine.audit_refused(event, "unauthorized").await;
        Err(Problem::unauthorized())
    }

    /// Requires the admin role; a failed attempt is audited.
    async fn require_admin(&self, headers: &HeaderMap, what: &str) -> Result<Principal, Problem> {
        self.require_role(headers, what, &[Role::Admin]).await
    }

    /// Requires the admin or approver role (reading the inventory and the
    /// audit log, which approvers review); a failed attempt is audited.
    async fn require_reviewer(&self, headers: &HeaderMap, what: &str) -> Result<Principal, Problem> {
        self.require_role(headers, what, &[Role::Admin, Role::Approver])
            .await
    }

    async fn require_role(
        &self,
        headers: &HeaderMap,
        what: &str,
        roles: &[Role],
    ) -> Result<Principal, Problem> {
        let p = self.require_principal(headers, what).await?;
        if roles.contains(&p.role) {
            return Ok(p);
        }
        let needed = if roles.len() == 1 {
            "the admin role"
        } else {
            "the admin or approver role"
        };
        let event = AuditEvent::new(
            AuditKind::AuthRefused,
            Actor::from(&p),
            json!({ "endpoint": what, "reason": format!("needs {needed}") }),
        );
        self.engine.audit_refused(event, "forbidden").await;
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            format!("{what} needs {needed}"),
        ))
    }

    /// A store failure on an admin resource: logged, answered 503.
    fn unavailable(what: &str, e: crate::store::StoreError) -> Problem {
        tracing::error!(error = %e, "{what}");
        Problem::unavailable(format!("{what}; nothing was changed"))
    }
}

/// `GET /readyz`: whether this gateway can serve now, for load balancers:
/// 200 when its store answers, else `503 unavailable` (it would refuse
/// every credential). Says whether it leads the shared duties.
async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.store.ping().await {
        Ok(()) => axum::Json(json!({
            "status": "ready",
            "leader": state.engine.store.is_leader(),
        }))
        .into_response(),
        Err(e) => Problem::unavailable(format!("the store does not answer: {e}")).into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "trust_domain": state.engine.trust_domain,
        "policy_revision": state.engine.policies.revision(),
        "attestors": state.engine.policies.snapshot().methods(),
    }))
    .into_response()
}

/// `?limit=&cursor=` of a paged list.
#[derive(Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// The newest `limit` items instead of a page from `cursor`.
    #[serde(default)]
    newest: bool,
}

type PageParams = Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>;

/// The limit (1 to 1000, default 100) and cursor of a paged list.
/// The address a request's connection came from.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub std::net::IpAddr);

/// A response that holds a secret (a token, a JWT-SVID): never cached, and
/// never stored for an idempotent replay.
pub(super) fn secret_response(status: StatusCode, body: impl serde::Serialize) -> Response {
    (
        status,
        [(axum::http::header::CACHE_CONTROL, "no-store")],
        axum::Json(body),
    )
        .into_response()
}

fn parse_page(q: PageParams) -> Result<(usize, Option<String>, bool), Problem> {
    let Query(q) = q.map_err(|e| Problem::malformed(format!("invalid query: {e}")))?;
    let limit = match q.limit {
        None => 100,
        Some(n @ 1..=1000) => n,
        Some(_) => return Err(Problem::malformed("`limit` must be between 1 and 1000")),
    };
    if let Some(c) = &q.cursor
        && c.parse::<u64>().is_err()
    {
        return Err(Problem::malformed("`cursor` is not one this server returned"));
    }
    Ok((limit, q.cursor, q.newest))
}

/// At most 64 printable characters of a caller-supplied name.
fn printable(s: &str) -> String {
    crate::engine::printable(s)
}
