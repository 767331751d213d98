//! Admin resources: API tokens, the certificate inventory, the audit log,
//! join tokens, and federation (this trust domain's public bundle and the
//! status of the ones it federates with).

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AppState, PageParams, Problem, parse_page, read_json};
use crate::auth::Role;
use crate::model::{Actor, AuditEvent, AuditKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
}

/// `POST /api/v1/tokens` (admin): a token shown once, stored hashed.
pub(super) async fn create_token(
    State(state): State<AppState>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let admin = state.require_admin(&parts.headers, "tokens.create").await?;
    let body: TokenBody = read_json(body, state.max_body_bytes).await?;
    let invalid = |m: String| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-token-request",
            "Invalid token request",
            m,
        )
    };
    const NAME_RULE: &str = "must be 1-64 letters, digits, `-`, `_`, `.` or `@`";
    if !crate::auth::valid_name(&body.name) {
        return Err(invalid(format!("`name` {NAME_RULE}")));
    }
    if let Some(g) = body.groups.iter().find(|g| !crate::auth::valid_name(g)) {
        return Err(invalid(format!("group `{}` {NAME_RULE}", super::printable(g))));
    }
    if state.auth.name_taken(&body.name) {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "token-name-taken",
            "Token name taken",
            format!("a token named `{}` exists; names identify people", body.name),
        ));
    }
    let (token, record) = crate::auth::new_api_token(&body.name, body.role, body.groups);
    let event = AuditEvent::new(
        AuditKind::TokenCreated,
        Actor::from(&admin),
        json!({ "id": record.id, "name": record.name, "role": record.role, "groups": record.groups }),
    );
    state
        .engine
        .store
        .put_token(record.clone(), event)
        .await
        .map_err(|e| AppState::unavailable("the token could not be stored", e))?;
    state.auth.add_token(record.clone());
    let body = json!({
        "id": record.id, "name": record.name, "role": record.role, "groups": record.groups,
        "created_at": record.created_at, "token": token,
    });
    Ok((StatusCode::CREATED, axum::Json(body)).into_response())
}

/// `GET /api/v1/certificates` (admin): the inventory, in issuance order.
pub(super) async fn list_certificates(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: PageParams,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "certificates.list").await?;
    let (limit, cursor) = parse_page(q)?;
    let page = state
        .engine
        .store
        .list_certificates(limit, cursor.as_deref())
        .await
        .map_err(|e| AppState::unavailable("the inventory could not be read", e))?;
    Ok(axum::Json(json!({ "items": page.items, "next_cursor": page.next_cursor })).into_response())
}

/// `GET /api/v1/audit` (admin): the hash-chained audit log.
pub(super) async fn list_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: PageParams,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "audit.list").await?;
    let (limit, cursor) = parse_page(q)?;
    let page = state
        .engine
        .store
        .list_audit(limit, cursor.as_deref())
        .await
        .map_err(|e| AppState::unavailable("the audit log could not be read", e))?;
    Ok(axum::Json(json!({ "items": page.items, "next_cursor": page.next_cursor })).into_response())
}

/// `POST /api/v1/join-tokens` (admin): a one-time token for bootstrapping a
/// host with the `join_token` method, minted by the engine.
pub(super) async fn create_join_token(
    State(state): State<AppState>,
    req: Request<Body>,
) -> Result<Response, Problem> {
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
    let admin = state.require_admin(&parts.headers, "join-tokens.create").await?;
    let ask: Ask = match read_json(body, state.max_body_bytes).await {
        Ok(a) => a,
        Err(e) => {
            let refusal =
                crate::engine::Refusal::new(crate::engine::Surface::JoinToken, "create", Actor::from(&admin));
            state.engine.audit_refusal(refusal, &e).await;
            return Err(e.into());
        }
    };
    let token = state
        .engine
        .join_token(&admin, &ask.name, ask.ttl_seconds)
        .await
        .map_err(|e| {
            // A bad name or lifetime keeps its own problem type.
            if matches!(e, crate::engine::EngineError::BadRequest(_)) {
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid-join-token",
                    "Invalid join token request",
                    e.to_string(),
                )
            } else {
                e.into()
            }
        })?;
    Ok((StatusCode::CREATED, axum::Json(token)).into_response())
}

/// `GET /.well-known/spiffe-bundle`: this trust domain's SPIFFE bundle, for
/// federated peers (no authentication: the bundle is public, and peers
/// authenticate this server by its certificate).
pub(super) async fn spiffe_bundle(State(state): State<AppState>) -> Response {
    let doc = crate::federation::own_bundle(state.engine.signer.as_ref(), state.bundle_refresh_hint);
    ([(axum::http::header::CACHE_CONTROL, "no-store")], axum::Json(doc)).into_response()
}

/// `GET /api/v1/federation` (admin): each federated trust domain, where its
/// bundle comes from, and how its last refresh went.
pub(super) async fn federation_status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "federation.list").await?;
    Ok(axum::Json(json!({ "items": state.federation.status() })).into_response())
}
