//! The broker's surfaces: `/api/v1/broker/*`, RFC 8693 token exchange at
//! `/oauth2/token`, RFC 7662 introspection at `/oauth2/introspect`, and
//! discovery (`/.well-known/openid-configuration`, its JWKS). OAuth
//! endpoints answer errors the RFC 6749 way (`{"error", "error_description"}`)
//! because standard OAuth clients parse that shape.

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Problem, read_json};
use crate::engine::broker::{AgentRequest, Outcome};
use crate::engine::{EngineError, Refusal, Surface};
use crate::model::{Actor, RevocationFilter, Task};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Delegation {
    subject_token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentBody {
    agent_id: String,
    method: String,
    evidence: String,
    scopes: Vec<String>,
    audience: Vec<String>,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    public_key_jwk: Option<Value>,
    #[serde(default)]
    csr: Option<String>,
    #[serde(default)]
    delegation: Option<Delegation>,
    #[serde(default)]
    task: Option<Task>,
}

/// `POST /api/v1/broker/agent-identities`: the evidence is the credential.
pub(super) async fn agent_identities(
    State(state): State<AppState>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let body: AgentBody = match read_json(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let refusal = Refusal::new(Surface::Broker, "agent-identity", Actor::Anonymous);
            state.engine.audit_refusal(refusal, &e).await;
            return Err(e.into());
        }
    };
    let request = AgentRequest {
        agent_id: Some(body.agent_id),
        method: body.method,
        evidence: body.evidence,
        scopes: body.scopes,
        audience: body.audience,
        ttl_seconds: body.ttl_seconds,
        public_key_jwk: body.public_key_jwk,
        csr: body.csr,
        subject_token: body.delegation.map(|d| d.subject_token),
        task: body.task,
        dpop: dpop_header(&parts.headers),
        endpoint: "/api/v1/broker/agent-identities",
    };
    Ok(
        match state.engine.agent_identity(Surface::Broker, request).await? {
            Outcome::Issued(g) => super::secret_response(StatusCode::CREATED, g),
            Outcome::Pending(r) => (StatusCode::ACCEPTED, axum::Json(r.view())).into_response(),
        },
    )
}

/// The `DPoP` header (RFC 9449), if exactly one was sent.
pub(super) fn dpop_header(headers: &HeaderMap) -> Option<String> {
    let mut all = headers.get_all("dpop").iter();
    match (all.next(), all.next()) {
        (Some(v), None) => v.to_str().ok().map(str::to_owned),
        // Two proofs prove nothing; an unreadable one is no proof.
        (Some(_), Some(_)) => Some(String::new()),
        _ => None,
    }
}

/// `POST /api/v1/broker/revocations` (admin): by `agent_id`, `task_id` or `jti`.
pub(super) async fn revoke(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let admin = state.require_admin(&parts.headers, "broker.revoke").await?;
    let filter: RevocationFilter = read_json(body, state.max_body_bytes).await?;
    if !filter.is_valid() {
        return Err(Problem::malformed(
            "give exactly one of `agent_id`, `task_id` or `jti`",
        ));
    }
    let revoked = state.engine.revoke_agents(filter, Actor::from(&admin)).await?;
    Ok(axum::Json(json!({ "revoked": revoked })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct AgentsQuery {
    agent_id: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/broker/agents` (admin): the agent tokens kept (until they
/// expire), newest first, optionally one agent's, with whom each acts for
/// and whether it is revoked.
pub(super) async fn agents(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<AgentsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "broker.agents").await?;
    let Ok(Query(q)) = q else {
        return Err(Problem::malformed(
            "invalid query: `agent_id` and `limit` are accepted",
        ));
    };
    let limit = q.limit.unwrap_or(500).clamp(1, 5000);
    let (tokens, truncated) = state
        .engine
        .store
        .agent_tokens(q.agent_id, limit)
        .await
        .map_err(|e| AppState::unavailable("the agent tokens could not be read", e))?;
    let now = crate::util::now_unix();
    let items: Vec<Value> = tokens
        .into_iter()
        .map(|t| {
            let state = match (&t.revoked_at, t.exp <= now) {
                (Some(_), _) => "revoked",
                (None, true) => "expired",
                (None, false) => "live",
            };
            json!({
                "jti": t.jti,
                "agent_id": t.agent_id,
                "spiffe_id": t.spiffe_id,
                "task_id": t.task_id,
                "scopes": t.scopes,
                "audience": t.audience,
                "iat": t.iat,
                "exp": t.exp,
                "parent_jti": t.parent_jti,
                "chain": t.chain,
                "revoked_at": t.revoked_at,
                "state": state,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "items": items, "truncated": truncated })).into_response())
}

#[derive(Deserialize)]
pub(super) struct FeedQuery {
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/broker/revocations`: the feed offline verifiers poll. Public,
/// like the JWKS: it names token ids, nothing secret.
pub(super) async fn revocation_feed(
    State(state): State<AppState>,
    q: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Ok(Query(q)) = q else {
        return Err(Problem::malformed("invalid query"));
    };
    let limit = q.limit.unwrap_or(500).clamp(1, 1000);
    if q.cursor.as_ref().is_some_and(|c| c.parse::<u64>().is_err()) {
        return Err(Problem::malformed("`cursor` is not one this server returned"));
    }
    let page = state
        .engine
        .store
        .revocations(limit, q.cursor.as_deref())
        .await
        .map_err(|e| AppState::unavailable("the revocation feed could not be read", e))?;
    Ok(axum::Json(json!({ "items": page.items, "next_cursor": page.next_cursor })).into_response())
}

/// `GET /.well-known/openid-configuration`.
pub(super) async fn discovery(State(state): State<AppState>) -> Response {
    let iss = state.engine.issuer();
    axum::Json(json!({
        "issuer": iss,
        "jwks_uri": format!("{iss}/.well-known/jwks.json"),
        "token_endpoint": format!("{iss}/oauth2/token"),
        "introspection_endpoint": format!("{iss}/oauth2/introspect"),
        "revocation_feed": format!("{iss}/api/v1/broker/revocations"),
        "grant_types_supported": ["urn:ietf:params:oauth:grant-type:token-exchange"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "response_types_supported": [],
        "subject_types_supported": ["public"],
    }))
    .into_response()
}

/// `GET /.well-known/jwks.json`: the JWT-SVID signing keys.
pub(super) async fn jwks(State(state): State<AppState>) -> Response {
    axum::Json(state.engine.authorities().jwks()).into_response()
}

/// An RFC 6749 error response: `{"error", "error_description"}`.
struct OAuthError(StatusCode, &'static str, String);

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.1, "error_description": self.2 });
        let mut resp = (self.0, axum::Json(body)).into_response();
        resp.headers_mut()
            .insert("cache-control", axum::http::HeaderValue::from_static("no-store"));
        resp
    }
}

fn oauth_error(status: StatusCode, error: &'static str, description: impl Into<String>) -> OAuthError {
    OAuthError(status, error, description.into())
}

async fn read_form(req: Request<Body>, limit: usize) -> Result<Vec<(String, String)>, OAuthError> {
    let bytes = axum::body::to_bytes(req.into_body(), limit).await.map_err(|_| {
        oauth_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request",
            "the request body is too large",
        )
    })?;
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes).map_err(|_| {
        oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be application/x-www-form-urlencoded",
        )
    })
}

fn one<'a>(form: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, OAuthError> {
    let mut it = form.iter().filter(|(k, _)| k == key);
    let first = it.next().map(|(_, v)| v.as_str());
    if it.next().is_some() {
        return Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("`{key}` appears more than once"),
        ));
    }
    Ok(first)
}

const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
const ACCESS_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:access_token";

/// `POST /oauth2/token`: RFC 8693 token exchange. The `actor_token` is the
/// agent's attestation evidence (a JWT, e.g. its service-account token; the
/// method is `actor_token_method`, default `k8s_sat`); the `subject_token`
/// is who it acts for (a person's ID token, or a parent agent's JWT-SVID).
pub(super) async fn token(State(state): State<AppState>, req: Request<Body>) -> Response {
    let dpop = dpop_header(req.headers());
    let form = match read_form(req, state.max_body_bytes).await {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let field = |k: &str| one(&form, k);
    let get = |k: &str| -> Result<Option<String>, OAuthError> { field(k).map(|v| v.map(str::to_owned)) };
    let result = (|| -> Result<AgentRequest, OAuthError> {
        let grant_type = get("grant_type")?.unwrap_or_default();
        if grant_type != "urn:ietf:params:oauth:grant-type:token-exchange" {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "only token exchange (RFC 8693) is supported",
            ));
        }
        let subject_token = get("subject_token")?.ok_or_else(|| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`subject_token` is required",
            )
        })?;
        let subject_type = get("subject_token_type")?.unwrap_or_default();
        if ![JWT_TYPE, ID_TOKEN_TYPE, ACCESS_TOKEN_TYPE].contains(&subject_type.as_str()) {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`subject_token_type` must be a JWT, ID token or access token type",
            ));
        }
        let actor_token = get("actor_token")?.ok_or_else(|| {
            oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "`actor_token` (the agent's attestation evidence) is required",
            )
        })?;
        if get("actor_token_type")?.as_deref() != Some(JWT_TYPE) {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("`actor_token_type` must be {JWT_TYPE}"),
            ));
        }
        if let Some(t) = get("requested_token_type")?
            && t != JWT_TYPE
            && t != ACCESS_TOKEN_TYPE
        {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "only JWT tokens are issued",
            ));
        }
        let audience: Vec<String> = form
            .iter()
            .filter(|(k, _)| k == "audience" || k == "resource")
            .map(|(_, v)| v.clone())
            .collect();
        if audience.is_empty() {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "`audience` or `resource` is required",
            ));
        }
        let scopes: Vec<String> = get("scope")?
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if scopes.is_empty() {
            return Err(oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "`scope` is required",
            ));
        }
        Ok(AgentRequest {
            agent_id: get("agent_id")?,
            method: get("actor_token_method")?.unwrap_or_else(|| "k8s_sat".into()),
            evidence: actor_token,
            scopes,
            audience,
            ttl_seconds: None,
            public_key_jwk: None,
            csr: None,
            subject_token: Some(subject_token),
            task: None,
            dpop: dpop.clone(),
            endpoint: "/oauth2/token",
        })
    })();
    let request = match result {
        Ok(r) => r,
        Err(e) => {
            let refusal = Refusal::new(Surface::TokenExchange, "agent-identity", Actor::Anonymous);
            let refused = EngineError::BadRequest(e.2.clone());
            state.engine.audit_refusal(refusal, &refused).await;
            return e.into_response();
        }
    };
    // Bound to the proof's key (RFC 9449 §5), or a bearer token where policy
    // allows one.
    let token_type = if request.dpop.is_some() { "DPoP" } else { "Bearer" };
    match state.engine.agent_identity(Surface::TokenExchange, request).await {
        Ok(Outcome::Issued(g)) => {
            let mut resp = axum::Json(json!({
                "access_token": g.jwt_svid,
                "issued_token_type": JWT_TYPE,
                "token_type": token_type,
                "expires_in": g.expires_in,
                "scope": g.scopes.join(" "),
            }))
            .into_response();
            resp.headers_mut()
                .insert("cache-control", axum::http::HeaderValue::from_static("no-store"));
            resp
        }
        Ok(Outcome::Pending(r)) => oauth_error(
            StatusCode::FORBIDDEN,
            "authorization_pending",
            format!("approval required; follow /api/v1/ephemeral/{}", r.id),
        )
        .into_response(),
        // The engine audited the refusal; OAuth clients get RFC 6749's shape.
        Err(e) => oauth_refusal(e).into_response(),
    }
}

/// An engine refusal as an RFC 6749 error.
fn oauth_refusal(e: EngineError) -> OAuthError {
    let error = match e.slug() {
        "malformed-request" => "invalid_request",
        "policy-denied" => "invalid_scope",
        "issuance-failed" | "unavailable" | "overloaded" => "server_error",
        _ => "invalid_grant",
    };
    let status = match (error, e.status()) {
        ("server_error", 503) => StatusCode::SERVICE_UNAVAILABLE,
        ("server_error", _) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    oauth_error(status, error, e.detail())
}

/// `POST /oauth2/introspect` (any API token): RFC 7662.
pub(super) async fn introspect(
    State(state): State<AppState>,
    headers: HeaderMap,
    req: Request<Body>,
) -> Response {
    if state
        .require_principal(&headers, "oauth2.introspect")
        .await
        .is_err()
    {
        let mut r = oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "introspection needs an API token",
        )
        .into_response();
        r.headers_mut()
            .insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        return r;
    }
    let form = match read_form(req, state.max_body_bytes).await {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let token = match one(&form, "token") {
        Ok(Some(t)) => t.to_owned(),
        Ok(None) => {
            return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "`token` is required")
                .into_response();
        }
        Err(r) => return r.into_response(),
    };
    axum::Json(state.engine.introspect(&token).await).into_response()
}
