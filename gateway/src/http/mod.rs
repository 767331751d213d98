//! The HTTP API: a thin adapter that parses requests, authenticates the
//! caller, calls the pipeline and renders the answer (JSON, or RFC 9457
//! problems). No issuance logic lives here.

mod broker;
pub(crate) mod bundles;
mod ephemeral;
mod idempotency;
mod problem;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use problem::{Problem, TYPE_PREFIX};

use crate::approvals::Approvals;
use crate::auth::{Authenticator, Principal, Role};
use crate::issuance::{AttestedRequest, IssuanceError, Pipeline};
use crate::store::AuditEvent;
use crate::trust::{TrustError, TrustSourceSpec};

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    pub pipeline: Arc<Pipeline>,
    pub auth: Arc<Authenticator>,
    pub approvals: Arc<Approvals>,
    pub broker: Arc<crate::broker::Broker>,
    pub bundles: Arc<crate::bundle::Bundles>,
    pub entries: Arc<crate::workload_api::Entries>,
    pub bundle_keys: Arc<crate::server::BundleKeys>,
    pub federation: Arc<crate::federation::Federation>,
    /// `spiffe_refresh_hint` of the bundle this server publishes.
    pub bundle_refresh_hint: u64,
    pub max_body_bytes: usize,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/workloads/attested-issuance", post(attested_issuance))
        .route(
            "/api/v1/trust-sources",
            post(create_trust_source).get(list_trust_sources),
        )
        .route(
            "/api/v1/trust-sources/{id}",
            delete(delete_trust_source).get(get_trust_source),
        )
        .route("/api/v1/certificates", get(list_certificates))
        .route("/api/v1/audit", get(list_audit))
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/ephemeral", post(ephemeral::create).get(ephemeral::list))
        .route("/api/v1/ephemeral/{id}", get(ephemeral::get))
        .route("/api/v1/ephemeral/{id}/approvals", post(ephemeral::vote))
        .route("/api/v1/ephemeral/{id}/cancel", post(ephemeral::cancel))
        .route("/api/v1/broker/agent-identities", post(broker::agent_identities))
        .route(
            "/api/v1/broker/revocations",
            post(broker::revoke).get(broker::revocation_feed),
        )
        .route("/oauth2/token", post(broker::token))
        .route("/oauth2/introspect", post(broker::introspect))
        .route("/.well-known/openid-configuration", get(broker::discovery))
        .route("/.well-known/jwks.json", get(broker::jwks))
        .route("/.well-known/spiffe-bundle", get(spiffe_bundle))
        .route("/api/v1/federation", get(federation_status))
        .route("/api/v1/trust-sources/{id}/rotate", post(rotate_trust_source))
        .route("/api/v1/trust-sources/{id}/revoke", post(revoke_trust_source))
        .route("/api/v1/attestation/challenges", post(create_challenge))
        .route("/api/v1/join-tokens", post(create_join_token))
        .route("/api/v1/bundles", get(bundles::list))
        .route("/api/v1/entries", post(create_entry).get(list_entries))
        .route("/api/v1/entries/{id}", get(get_entry).delete(delete_entry))
        .route("/api/v1/bundles/{name}", axum::routing::put(bundles::put))
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
        .with_state(state)
}

/// Reads a JSON body of at most `limit` bytes.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, Problem> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
        // `to_bytes` reports the limit through the error's source chain.
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.is::<http_body_util::LengthLimitError>() {
                return Problem::too_large(limit);
            }
            source = s.source();
        }
        Problem::malformed("the request body could not be read")
    })?;
    serde_json::from_slice(&bytes).map_err(|e| Problem::malformed(format!("invalid JSON body: {e}")))
}

impl AppState {
    async fn audit(&self, kind: &str, actor: &str, detail: Value) {
        let event = AuditEvent {
            kind: kind.into(),
            actor: actor.into(),
            detail,
        };
        if let Err(e) = self.pipeline.store.audit(event).await {
            tracing::error!(error = %e, kind, "could not write audit event");
        }
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
        self.audit(
            "auth.refused",
            "anonymous",
            json!({ "endpoint": what, "token_present": present }),
        )
        .await;
        Err(Problem::unauthorized())
    }

    /// Requires the admin role; a failed attempt is audited.
    async fn require_admin(&self, headers: &HeaderMap, what: &str) -> Result<(), Problem> {
        let p = self.require_principal(headers, what).await?;
        if p.role == Role::Admin {
            return Ok(());
        }
        self.audit(
            "auth.refused",
            &p.id,
            json!({ "endpoint": what, "reason": "not an admin" }),
        )
        .await;
        Err(Problem::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "Forbidden",
            format!("{what} needs the admin role"),
        ))
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    axum::Json(json!({
        "status": "ok",
        "trust_domain": state.pipeline.trust_domain,
        "policy_revision": state.pipeline.policies.revision(),
        "attestors": state.pipeline.policies.snapshot().methods(),
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestedIssuanceBody {
    method: String,
    evidence: String,
    csr: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
}

/// `POST /api/v1/tokens` (admin): a token shown once, stored hashed.
async fn create_token(State(state): State<AppState>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let result = async {
        state.require_admin(&parts.headers, "tokens.create").await?;
        let body: TokenBody = read_json(body, state.max_body_bytes).await?;
        let invalid = |m: String| Problem::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-token-request", "Invalid token request", m);
        if !crate::auth::valid_name(&body.name) {
            return Err(invalid("`name` must be 1-64 letters, digits, `-`, `_`, `.` or `@`".into()));
        }
        if let Some(g) = body.groups.iter().find(|g| !crate::auth::valid_name(g)) {
            return Err(invalid(format!("group `{}` must be 1-64 letters, digits, `-`, `_`, `.` or `@`", g.chars().take(64).collect::<String>())));
        }
        if state.auth.name_taken(&body.name) {
            return Err(Problem::new(StatusCode::CONFLICT, "token-name-taken", "Token name taken", format!("a token named `{}` exists; names identify people", body.name)));
        }
        let (token, record) = crate::auth::new_api_token(&body.name, body.role, body.groups);
        let event = AuditEvent {
            kind: "token.created".into(),
            actor: "user:admin".into(),
            detail: json!({ "id": record.id, "name": record.name, "role": record.role, "groups": record.groups }),
        };
        state.pipeline.store.put_token(record.clone(), event).await.map_err(|e| {
            tracing::error!(error = %e, "could not store token");
            Problem::unavailable("the token could not be stored")
        })?;
        state.auth.add_token(record.clone());
        Ok(json!({
            "id": record.id, "name": record.name, "role": record.role, "groups": record.groups,
            "created_at": record.created_at, "token": token,
        }))
    }
    .await;
    match result {
        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Err(p) => p.into_response(),
    }
}

fn issuance_problem(e: IssuanceError) -> Problem {
    let detail = e.to_string();
    match e {
        IssuanceError::BadRequest(_) => Problem::malformed(detail),
        IssuanceError::BadCsr(_) => {
            Problem::new(StatusCode::BAD_REQUEST, "invalid-csr", "Invalid CSR", detail)
        }
        IssuanceError::UnknownMethod(_) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown-method",
            "Unknown attestation method",
            detail,
        ),
        IssuanceError::NoTrustSource(_) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no-trust-source",
            "No trust source for this method",
            detail,
        ),
        IssuanceError::AttestationFailed(_) => Problem::new(
            StatusCode::FORBIDDEN,
            "attestation-failed",
            "Attestation failed",
            detail,
        ),
        IssuanceError::PolicyDenied(reasons) => {
            let mut p = Problem::new(StatusCode::FORBIDDEN, "policy-denied", "Denied by policy", detail);
            p.reasons = Some(reasons);
            p
        }
        IssuanceError::Internal(_) => Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "issuance-failed",
            "Issuance failed",
            format!("{detail}; nothing was issued"),
        ),
        IssuanceError::Unavailable(_) => Problem::unavailable(detail),
    }
}

/// `POST /api/v1/workloads/attested-issuance`: no API token; the evidence is
/// the credential.
async fn attested_issuance(State(state): State<AppState>, req: Request<Body>) -> Response {
    let body: AttestedIssuanceBody = match read_json(req.into_body(), state.max_body_bytes).await {
        Ok(b) => b,
        Err(p) => return state.refuse_issuance(None, p).await,
    };
    let method = printable(&body.method);
    let request = AttestedRequest {
        method: body.method,
        evidence: body.evidence,
        csr_pem: body.csr,
        ttl_seconds: body.ttl_seconds,
    };
    match state.pipeline.issue_attested(request).await {
        Ok(issued) => (StatusCode::CREATED, axum::Json(issued)).into_response(),
        Err(e) => state.refuse_issuance(Some(method), issuance_problem(e)).await,
    }
}

impl AppState {
    /// Audits a refused issuance and renders the problem.
    async fn refuse_issuance(&self, method: Option<String>, problem: Problem) -> Response {
        let actor = method
            .as_deref()
            .map(|m| format!("evidence:{m}"))
            .unwrap_or_else(|| "anonymous".into());
        self.audit(
            "issuance.refused",
            &actor,
            json!({
                "surface": "attested-issuance",
                "status": problem.status,
                "problem": problem.slug(),
                "detail": problem.detail,
                "method": method,
            }),
        )
        .await;
        problem.into_response()
    }
}

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

fn trust_problem(e: TrustError) -> Problem {
    match e {
        TrustError::Duplicate(_) => Problem::new(
            StatusCode::CONFLICT,
            "trust-source-exists",
            "Trust source exists",
            e.to_string(),
        ),
        _ => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-trust-source",
            "Invalid trust source",
            e.to_string(),
        ),
    }
}

async fn create_trust_source(State(state): State<AppState>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let result = async {
        state.require_admin(&parts.headers, "trust-sources.create").await?;
        let spec: TrustSourceSpec = read_json(body, state.max_body_bytes).await?;
        if spec.jwks_file.is_some() {
            return Err(Problem::malformed("`jwks_file` is only accepted in the config file; send `jwks` inline"));
        }
        let registry = &state.pipeline.trust;
        let mut source = spec.into_source("api").map_err(trust_problem)?;
        if let Some(url) = &source.jwks_url {
            source.jwks = crate::trust::fetch_jwks(url).await.map_err(trust_problem)?;
        }
        if !state.pipeline.policies.snapshot().modules.contains_key(&source.method) {
            return Err(trust_problem(TrustError::UnknownMethod(source.method.clone())));
        }
        registry.check_insert(&source).map_err(trust_problem)?;
        let event = AuditEvent {
            kind: "trust_source.created".into(),
            actor: "admin".into(),
            detail: json!({ "id": source.id, "name": source.name, "method": source.method, "issuer": source.issuer }),
        };
        state.pipeline.store.put_trust_source(source.clone(), event).await.map_err(|e| {
            tracing::error!(error = %e, "could not persist trust source");
            Problem::unavailable("the trust source could not be stored")
        })?;
        registry.insert(source.clone()).map_err(trust_problem)?;
        Ok(source)
    }
    .await;
    match result {
        Ok(source) => (StatusCode::CREATED, axum::Json(source)).into_response(),
        Err(p) => p.into_response(),
    }
}

async fn list_trust_sources(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(p) = state.require_admin(&headers, "trust-sources.list").await {
        return p.into_response();
    }
    let items: Vec<_> = state
        .pipeline
        .trust
        .list()
        .iter()
        .map(|s| s.as_ref().clone())
        .collect();
    axum::Json(json!({ "items": items })).into_response()
}

async fn get_trust_source(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(p) = state.require_admin(&headers, "trust-sources.get").await {
        return p.into_response();
    }
    match state.pipeline.trust.get(&id) {
        Some(s) => axum::Json(s.as_ref().clone()).into_response(),
        None => Problem::not_found(format!(
            "no trust source with id `{}`",
            id.chars().take(64).collect::<String>()
        ))
        .into_response(),
    }
}

async fn delete_trust_source(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        state.require_admin(&headers, "trust-sources.delete").await?;
        let source = state.pipeline.trust.get(&id).ok_or_else(|| {
            Problem::not_found(format!(
                "no trust source with id `{}`",
                id.chars().take(64).collect::<String>()
            ))
        })?;
        if source.origin != "api" {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "trust-source-not-deletable",
                "Trust source is not deletable",
                format!(
                    "trust source `{}` comes from the {} and can only be removed there",
                    source.name,
                    match source.origin.as_str() {
                        "config" => "config file",
                        _ => "dev environment",
                    }
                ),
            ));
        }
        let event = AuditEvent {
            kind: "trust_source.deleted".into(),
            actor: "admin".into(),
            detail: json!({ "id": source.id, "name": source.name }),
        };
        state
            .pipeline
            .store
            .delete_trust_source(&id, event)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "could not delete trust source");
                Problem::unavailable("the trust source could not be deleted")
            })?;
        state.pipeline.trust.remove(&id);
        Ok(())
    }
    .await;
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(p) => p.into_response(),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

fn page_limit(q: &PageQuery) -> Result<usize, Problem> {
    match q.limit {
        None => Ok(100),
        Some(n @ 1..=1000) => Ok(n),
        Some(_) => Err(Problem::malformed("`limit` must be between 1 and 1000")),
    }
}

fn parse_page(
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(usize, Option<String>), Problem> {
    let Query(q) = q.map_err(|e| Problem::malformed(format!("invalid query: {e}")))?;
    let limit = page_limit(&q)?;
    if let Some(c) = &q.cursor
        && c.parse::<u64>().is_err()
    {
        return Err(Problem::malformed("`cursor` is not one this server returned"));
    }
    Ok((limit, q.cursor))
}

async fn list_certificates(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result: Result<Value, Problem> = async {
        state.require_admin(&headers, "certificates.list").await?;
        let (limit, cursor) = parse_page(q)?;
        let page = state
            .pipeline
            .store
            .list_certificates(limit, cursor.as_deref())
            .await
            .map_err(|e| Problem::unavailable(format!("store: {e}")))?;
        Ok(json!({ "items": page.items, "next_cursor": page.next_cursor }))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(p) => p.into_response(),
    }
}

async fn list_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<PageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let result: Result<Value, Problem> = async {
        state.require_admin(&headers, "audit.list").await?;
        let (limit, cursor) = parse_page(q)?;
        let page = state
            .pipeline
            .store
            .list_audit(limit, cursor.as_deref())
            .await
            .map_err(|e| Problem::unavailable(format!("store: {e}")))?;
        Ok(json!({ "items": page.items, "next_cursor": page.next_cursor }))
    }
    .await;
    match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(p) => p.into_response(),
    }
}

/// `POST /api/v1/entries` (admin): a Workload API registration entry.
async fn create_entry(State(state): State<AppState>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let result: Result<crate::workload_api::Entry, Problem> = async {
        state.require_admin(&parts.headers, "entries.create").await?;
        let spec: crate::workload_api::EntrySpec = read_json(body, state.max_body_bytes).await?;
        let entry = spec.into_entry(&state.pipeline.trust_domain).map_err(|m| {
            Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-entry",
                "Invalid registration entry",
                m,
            )
        })?;
        let event = AuditEvent {
            kind: "entry.created".into(),
            actor: "user:admin".into(),
            detail: json!({ "id": entry.id, "spiffe_id": entry.spiffe_id, "selectors": entry.selectors }),
        };
        state
            .pipeline
            .store
            .put_entry(entry.clone(), event)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "could not store entry");
                Problem::unavailable("the entry could not be stored")
            })?;
        state.entries.insert(entry.clone());
        Ok(entry)
    }
    .await;
    match result {
        Ok(e) => (StatusCode::CREATED, axum::Json(e)).into_response(),
        Err(p) => p.into_response(),
    }
}

async fn list_entries(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(p) = state.require_admin(&headers, "entries.list").await {
        return p.into_response();
    }
    let items: Vec<_> = state.entries.list().iter().map(|e| e.as_ref().clone()).collect();
    axum::Json(json!({ "items": items })).into_response()
}

async fn get_entry(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(p) = state.require_admin(&headers, "entries.get").await {
        return p.into_response();
    }
    match state.entries.get(&id) {
        Some(e) => axum::Json(e.as_ref().clone()).into_response(),
        None => Problem::not_found("no entry with that id").into_response(),
    }
}

async fn delete_entry(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(p) = state.require_admin(&headers, "entries.delete").await {
        return p.into_response();
    }
    if state.entries.get(&id).is_none() {
        return Problem::not_found("no entry with that id").into_response();
    }
    let event = AuditEvent {
        kind: "entry.deleted".into(),
        actor: "user:admin".into(),
        detail: json!({ "id": id }),
    };
    if let Err(e) = state.pipeline.store.delete_entry(&id, event).await {
        tracing::error!(error = %e, "could not delete entry");
        return Problem::unavailable("the entry could not be deleted").into_response();
    }
    state.entries.remove(&id);
    StatusCode::NO_CONTENT.into_response()
}

/// `GET /.well-known/spiffe-bundle`: this trust domain's SPIFFE bundle, for
/// federated peers (no authentication: the bundle is public, and peers
/// authenticate this server by its certificate).
async fn spiffe_bundle(State(state): State<AppState>) -> Response {
    let doc = crate::federation::own_bundle(state.pipeline.signer.as_ref(), state.bundle_refresh_hint);
    ([(axum::http::header::CACHE_CONTROL, "no-store")], axum::Json(doc)).into_response()
}

/// `GET /api/v1/federation` (admin): each federated trust domain, where its
/// bundle comes from, and how its last refresh went.
async fn federation_status(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(p) = state.require_admin(&headers, "federation.list").await {
        return p.into_response();
    }
    axum::Json(json!({ "items": state.federation.status() })).into_response()
}

/// Methods whose evidence answers a server challenge.
const CHALLENGE_METHODS: &[&str] = &["x509pop", "tpm"];

/// What a challenge request may carry: the method, and for `tpm` the EK
/// certificate, the EK public area and the AK public area (base64).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeAsk {
    method: String,
    #[serde(default)]
    ek_certificate: Option<String>,
    #[serde(default)]
    ek_public: Option<String>,
    #[serde(default)]
    ak_public: Option<String>,
}

/// `POST /api/v1/attestation/challenges`: a fresh nonce for a
/// challenge-based method. No authentication: the challenge proves nothing
/// by itself, and the evidence that answers it is verified in full.
async fn create_challenge(State(state): State<AppState>, body: Body) -> Response {
    let result: Result<_, Problem> = async {
        let ask: ChallengeAsk = read_json(body, state.max_body_bytes).await?;
        if !CHALLENGE_METHODS.contains(&ask.method.as_str()) {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-method",
                "Unknown attestation method",
                format!(
                    "method `{}` takes no challenge (challenge methods: {})",
                    ask.method.chars().take(64).collect::<String>(),
                    CHALLENGE_METHODS.join(", ")
                ),
            ));
        }
        let (private, public) = match ask.method.as_str() {
            "tpm" => tpm_credential(&ask)?,
            _ => (serde_json::Map::new(), serde_json::Map::new()),
        };
        state
            .pipeline
            .challenges
            .issue(&ask.method, private, public, crate::util::now_unix())
            .map_err(|e| Problem::unavailable(e.to_string()))
    }
    .await;
    match result {
        Ok(issued) => (StatusCode::CREATED, axum::Json(issued)).into_response(),
        Err(p) => p.into_response(),
    }
}

/// The TPM part of a challenge: checks that the EK certificate, if one is
/// given, certifies the EK public area, then wraps a fresh secret to that
/// EK for the AK's Name (MakeCredential). Only the TPM holding that EK,
/// with that AK loaded, can recover the secret. The module later checks
/// the EK certificate's chain (or, without one, that a trust source
/// enrolls the EK), the secret and the quote.
type ChallengeParts = (serde_json::Map<String, Value>, serde_json::Map<String, Value>);

fn tpm_credential(ask: &ChallengeAsk) -> Result<ChallengeParts, Problem> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let invalid = |m: String| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-challenge-request",
            "Invalid challenge request",
            m,
        )
    };
    let field = |v: &Option<String>, name: &str| -> Result<Vec<u8>, Problem> {
        let text = v
            .as_deref()
            .ok_or_else(|| invalid(format!("`{name}` is required for tpm")))?;
        STANDARD
            .decode(text.trim())
            .map_err(|_| invalid(format!("`{name}` is not base64")))
    };
    let ek_public = field(&ask.ek_public, "ek_public")?;
    let ak_public = field(&ask.ak_public, "ak_public")?;
    let ek = castellan_tpm::wire::Public::from_tpm2b(&ek_public)
        .map_err(|e| invalid(format!("ek_public: {e}")))?;
    let ak = castellan_tpm::wire::Public::from_tpm2b(&ak_public)
        .map_err(|e| invalid(format!("ak_public: {e}")))?;
    // Without a certificate the EK is trusted only if a trust source
    // enrolls its hash; the module decides.
    let ek_cert = match ask.ek_certificate {
        Some(_) => {
            let der = field(&ask.ek_certificate, "ek_certificate")?;
            let der = castellan_tpm::ek::trim_der(&der)
                .map_err(|e| invalid(format!("ek_certificate: {e}")))?
                .to_vec();
            castellan_tpm::ek::check_ek_matches(&der, &ek)
                .map_err(|e| invalid(format!("ek_certificate: {e}")))?;
            Some(der)
        }
        None => None,
    };
    let ak_name = ak.name().map_err(|e| invalid(format!("ak_public: {e}")))?;
    let secret = crate::util::random_bytes::<32>();
    let credential = castellan_tpm::make_credential(&ek, &ak_name, &secret)
        .map_err(|e| invalid(format!("MakeCredential: {e}")))?;
    let mut private = serde_json::Map::new();
    private.insert("secret_sha256".into(), crate::util::sha256_hex(&secret).into());
    if let Some(der) = &ek_cert {
        private.insert("ek_certificate".into(), STANDARD.encode(der).into());
    }
    private.insert(
        "ek_public_sha256".into(),
        crate::util::sha256_hex(ek.tpmt_bytes()).into(),
    );
    private.insert("ak_public".into(), STANDARD.encode(&ak_public).into());
    let mut public = serde_json::Map::new();
    public.insert(
        "credential_blob".into(),
        STANDARD.encode(&credential.id_object).into(),
    );
    public.insert(
        "encrypted_secret".into(),
        STANDARD.encode(&credential.encrypted_secret).into(),
    );
    Ok((private, public))
}

/// `POST /api/v1/join-tokens` (admin): a one-time token for bootstrapping a
/// host with the `join_token` method. It is a JWT signed by Castellan's JWT
/// key (`iss` `castellan:join-token:TD`, `aud` `castellan-join`), so the
/// module verifies it like any token; its `jti` is spent at first use.
async fn create_join_token(State(state): State<AppState>, req: Request<Body>) -> Response {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        name: String,
        #[serde(default = "default_join_ttl")]
        ttl_seconds: u64,
    }
    fn default_join_ttl() -> u64 {
        3600
    }
    let (parts, body) = req.into_parts();
    let result: Result<_, Problem> = async {
        state.require_admin(&parts.headers, "join-tokens.create").await?;
        let ask: Ask = read_json(body, state.max_body_bytes).await?;
        let valid = !ask.name.is_empty()
            && ask.name.len() <= 128
            && ask
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid || !(60..=7 * 86_400).contains(&ask.ttl_seconds) {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-join-token",
                "Invalid join token request",
                "name must be 1-128 of [A-Za-z0-9-_.] and ttl_seconds between 60 and 604800",
            ));
        }
        let now = crate::util::now_unix();
        let jti = uuid::Uuid::new_v4().to_string();
        let expires_at = now + ask.ttl_seconds as i64;
        let claims = json!({
            "iss": crate::join_token::issuer(&state.pipeline.trust_domain),
            "aud": [crate::join_token::AUDIENCE], "sub": ask.name, "jti": jti,
            "iat": now, "exp": expires_at,
        });
        let token = state
            .pipeline
            .signer
            .sign_jwt(&claims)
            .map_err(|e| Problem::internal(e.to_string()))?;
        state
            .audit(
                "join_token.created",
                "user:admin",
                json!({ "name": ask.name, "jti": jti, "expires_at": expires_at }),
            )
            .await;
        Ok(json!({ "token": token, "name": ask.name, "jti": jti, "expires_at": expires_at }))
    }
    .await;
    match result {
        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Err(p) => p.into_response(),
    }
}

/// What `POST /api/v1/trust-sources/{id}/rotate` takes: the new keys or
/// certificates, and how long the replaced ones stay trusted; or new
/// method settings (e.g. a tpm source's enrolled EKs or PCR policy), which
/// apply at once.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    #[serde(default)]
    jwks: Option<Value>,
    #[serde(default)]
    certificates: Option<String>,
    #[serde(default)]
    settings: Option<Value>,
    /// Default 3600; 0 drops the old keys at once.
    #[serde(default = "default_overlap")]
    overlap_seconds: u64,
}

fn default_overlap() -> u64 {
    3600
}

/// A trust source that exists and may be changed over the API.
fn api_source(state: &AppState, id: &str) -> Result<std::sync::Arc<crate::trust::TrustSource>, Problem> {
    let source = state.pipeline.trust.get(id).ok_or_else(|| {
        Problem::not_found(format!(
            "no trust source with id `{}`",
            id.chars().take(64).collect::<String>()
        ))
    })?;
    if source.origin != "api" {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "trust-source-not-deletable",
            "Trust source is not changeable here",
            format!(
                "trust source `{}` comes from the {}; change it there",
                source.name, source.origin
            ),
        ));
    }
    if source.revoked_at.is_some() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "trust-source-revoked",
            "Trust source is revoked",
            format!("trust source `{}` was revoked", source.name),
        ));
    }
    Ok(source)
}

/// Persists a changed trust source with its audit event, then swaps it in.
async fn replace_trust_source(
    state: &AppState,
    changed: crate::trust::TrustSource,
    event: AuditEvent,
) -> Result<crate::trust::TrustSource, Problem> {
    state
        .pipeline
        .store
        .put_trust_source(changed.clone(), event)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "could not persist trust source");
            Problem::unavailable("the trust source could not be stored")
        })?;
    let stored = changed.clone();
    state
        .pipeline
        .trust
        .update(&changed.id, move |t| {
            *t = stored;
            Ok(())
        })
        .map_err(trust_problem)?;
    Ok(changed)
}

/// `POST /api/v1/trust-sources/{id}/rotate` (admin): new keys or
/// certificates become current; the replaced ones stay trusted for
/// `overlap_seconds` so evidence signed just before the rotation passes.
async fn rotate_trust_source(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let result: Result<_, Problem> = async {
        state
            .require_admin(&parts.headers, "trust-sources.rotate")
            .await?;
        let rotation: Rotation = read_json(body, state.max_body_bytes).await?;
        let source = api_source(&state, &id)?;
        if rotation.overlap_seconds > 7 * 86_400 {
            return Err(trust_problem(TrustError::Settings(
                "overlap_seconds must be at most 604800".into(),
            )));
        }
        if rotation.jwks.is_none() && rotation.certificates.is_none() && rotation.settings.is_none() {
            return Err(trust_problem(TrustError::Missing(
                "jwks, certificates or settings",
            )));
        }
        if let Some(settings) = &rotation.settings {
            let enrolls = crate::trust::check_settings(&source.method, settings).map_err(trust_problem)?;
            let vouches = source.has_jwks() || source.certificates.is_some() || source.jwks_url.is_some();
            if !enrolls && !vouches {
                return Err(trust_problem(TrustError::Missing(
                    "settings.enrolled_ek_sha256 (this source has no keys or certificates)",
                )));
            }
        }
        if let Some(j) = &rotation.jwks {
            if !source.has_jwks() {
                return Err(trust_problem(TrustError::Jwks(
                    "this source has no JWKS to rotate".into(),
                )));
            }
            crate::trust::KeySet::from_jwks(j).map_err(trust_problem)?;
        }
        if let Some(pem) = &rotation.certificates {
            if source.certificates.is_none() {
                return Err(trust_problem(TrustError::Certificates(
                    "this source has no certificates to rotate".into(),
                )));
            }
            crate::trust::certs::CertSet::from_pem(pem)
                .map_err(TrustError::Certificates)
                .map_err(trust_problem)?;
        }
        let until = crate::util::now_unix() + rotation.overlap_seconds as i64;
        let mut rotated = source.as_ref().clone();
        let keys_rotated = rotation.jwks.is_some() || rotation.certificates.is_some();
        if keys_rotated {
            rotated.previous = Some(crate::trust::PreviousKeys {
                jwks: source.jwks.clone(),
                certificates: source.certificates.clone(),
                until,
            });
        }
        let settings_changed = rotation.settings.is_some();
        if let Some(settings) = rotation.settings {
            rotated.settings = Some(settings);
        }
        if let Some(j) = rotation.jwks {
            rotated.jwks = j;
        }
        if let Some(pem) = rotation.certificates {
            rotated.certificates = Some(pem);
        }
        let event = AuditEvent {
            kind: "trust_source.rotated".into(),
            actor: "admin".into(),
            detail: json!({
                "id": source.id, "name": source.name,
                "previous_until": keys_rotated.then_some(until),
                "settings_changed": settings_changed,
            }),
        };
        replace_trust_source(&state, rotated, event).await
    }
    .await;
    match result {
        Ok(s) => axum::Json(s).into_response(),
        Err(p) => p.into_response(),
    }
}

/// `POST /api/v1/trust-sources/{id}/revoke` (admin): the source stops
/// verifying anything at once (kept, marked, for the record).
async fn revoke_trust_source(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result: Result<_, Problem> = async {
        state.require_admin(&headers, "trust-sources.revoke").await?;
        let source = api_source(&state, &id)?;
        let mut revoked = source.as_ref().clone();
        revoked.revoked_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
        let event = AuditEvent {
            kind: "trust_source.revoked".into(),
            actor: "admin".into(),
            detail: json!({ "id": source.id, "name": source.name }),
        };
        replace_trust_source(&state, revoked, event).await
    }
    .await;
    match result {
        Ok(s) => axum::Json(s).into_response(),
        Err(p) => p.into_response(),
    }
}
