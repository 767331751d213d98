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
use axum::extract::Path;

use crate::auth::{OidcLink, Role, TokenRecord};
use crate::model::{Actor, AuditEvent, AuditKind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    role: Role,
    #[serde(default)]
    groups: Vec<String>,
    /// The holder's OIDC identity: a login through it is the same person.
    #[serde(default)]
    oidc: Option<OidcLink>,
    /// Seconds until the token stops authenticating.
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The longest `expires_in` accepted: ten years.
const MAX_TOKEN_LIFE: u64 = 10 * 365 * 86_400;

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
    if !crate::auth::valid_token_name(&body.name) {
        return Err(invalid(
            "`name` must be 1-64 letters, digits, `-`, `_` or `.`: it becomes part of the \
             person's SPIFFE ID (spiffe://<trust domain>/user/<name>)"
                .into(),
        ));
    }
    if let Some(g) = body.groups.iter().find(|g| !crate::auth::valid_name(g)) {
        return Err(invalid(format!(
            "group `{}` must be 1-64 letters, digits, `-`, `_`, `.` or `@`",
            super::printable(g)
        )));
    }
    if let Some(link) = &body.oidc {
        if !state.auth.has_oidc_issuer(&link.issuer) {
            return Err(invalid(format!(
                "`oidc.issuer` `{}` is not the name of a configured [[oidc_issuers]] entry",
                super::printable(&link.issuer)
            )));
        }
        if link.subject.is_empty()
            || link.subject.len() > 255
            || !link.subject.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                "`oidc.subject` must be the person's `sub`: 1-255 printable ASCII characters".into(),
            ));
        }
        if let Some(other) = state.auth.linked_to(&link.issuer, &link.subject) {
            return Err(Problem::new(
                StatusCode::CONFLICT,
                "oidc-identity-linked",
                "OIDC identity already linked",
                format!("that OIDC identity is linked to the live token `{other}`; one person, one name"),
            ));
        }
    }
    let expires_at = match body.expires_in {
        None => None,
        Some(s) if (1..=MAX_TOKEN_LIFE).contains(&s) => Some(crate::util::now_unix() + s as i64),
        Some(_) => {
            return Err(invalid(format!(
                "`expires_in` must be 1-{MAX_TOKEN_LIFE} seconds"
            )));
        }
    };
    let taken = || {
        Problem::new(
            StatusCode::CONFLICT,
            "token-name-taken",
            "Token name taken",
            format!("a live token named `{}` exists; names identify people", body.name),
        )
    };
    if state.auth.name_taken(&body.name) {
        return Err(taken());
    }
    let (token, mut record) = crate::auth::new_api_token(&body.name, body.role, body.groups);
    record.oidc = body.oidc;
    record.expires_at = expires_at;
    let event = AuditEvent::new(AuditKind::TokenCreated, Actor::from(&admin), record.view());
    // Checked again in the store: another gateway may have just made one.
    let created = state
        .engine
        .store
        .create_token(record.clone(), event, crate::util::now_unix())
        .await
        .map_err(|e| AppState::unavailable("the token could not be stored", e))?;
    if !created {
        return Err(taken());
    }
    state.auth.add_token(record.clone());
    let mut body = record.view();
    body["token"] = token.into();
    Ok(super::secret_response(StatusCode::CREATED, body))
}

/// `GET /api/v1/tokens` (admin): every token's record, never a secret or
/// its hash.
pub(super) async fn list_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "tokens.list").await?;
    let mut records = state
        .engine
        .store
        .tokens()
        .await
        .map_err(|e| AppState::unavailable("the tokens could not be read", e))?;
    records.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
    let items: Vec<_> = records.iter().map(TokenRecord::view).collect();
    Ok(axum::Json(json!({ "items": items })).into_response())
}

/// `DELETE /api/v1/tokens/{id}` (admin): revokes a token; it stops
/// authenticating at once.
pub(super) async fn revoke_token(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let admin = state.require_admin(&headers, "tokens.revoke").await?;
    let records = state
        .engine
        .store
        .tokens()
        .await
        .map_err(|e| AppState::unavailable("the tokens could not be read", e))?;
    let Some(mut record) = records.into_iter().find(|r| r.id == id) else {
        return Err(Problem::new(
            StatusCode::NOT_FOUND,
            "token-not-found",
            "No such token",
            "no API token has that id",
        ));
    };
    if record.revoked_at.is_none() {
        record.revoked_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
        let event = AuditEvent::new(AuditKind::TokenRevoked, Actor::from(&admin), record.view());
        state
            .engine
            .store
            .put_token(record.clone(), event)
            .await
            .map_err(|e| AppState::unavailable("the revocation could not be stored", e))?;
        state.auth.add_token(record.clone());
    }
    Ok(axum::Json(record.view()).into_response())
}

/// `GET /api/v1/certificates` (admin or approver): the inventory, in
/// issuance order; `?newest=true` gives the last `limit` certificates.
pub(super) async fn list_certificates(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: PageParams,
) -> Result<Response, Problem> {
    state.require_reviewer(&headers, "certificates.list").await?;
    let (limit, mut cursor, newest) = parse_page(q)?;
    if newest {
        let total = state
            .engine
            .store
            .count_certificates()
            .await
            .map_err(|e| AppState::unavailable("the inventory could not be read", e))?;
        cursor = Some(total.saturating_sub(limit as u64).to_string());
    }
    let page = state
        .engine
        .store
        .list_certificates(limit, cursor.as_deref())
        .await
        .map_err(|e| AppState::unavailable("the inventory could not be read", e))?;
    Ok(axum::Json(json!({ "items": page.items, "next_cursor": page.next_cursor })).into_response())
}

/// `GET /api/v1/audit` (admin or approver): the hash-chained audit log;
/// `?newest=true` gives the last `limit` entries.
pub(super) async fn list_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: PageParams,
) -> Result<Response, Problem> {
    state.require_reviewer(&headers, "audit.list").await?;
    let (limit, mut cursor, newest) = parse_page(q)?;
    if newest {
        let head = state
            .engine
            .store
            .audit_head()
            .await
            .map_err(|e| AppState::unavailable("the audit log could not be read", e))?;
        let last = head.map_or(0, |(seq, _)| seq);
        cursor = Some(last.saturating_sub(limit as u64).to_string());
    }
    let page = state
        .engine
        .store
        .list_audit(limit, cursor.as_deref())
        .await
        .map_err(|e| AppState::unavailable("the audit log could not be read", e))?;
    Ok(axum::Json(json!({ "items": page.items, "next_cursor": page.next_cursor })).into_response())
}

/// `POST /api/v1/ca/intermediates` (admin): signs another CA's CSR as a
/// subordinate of Castellan's root (see `engine::upstream`).
pub(super) async fn sign_subordinate(
    State(state): State<AppState>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        csr: String,
        name: String,
        #[serde(default)]
        ttl_seconds: Option<u64>,
    }
    let (parts, body) = req.into_parts();
    let admin = state.require_admin(&parts.headers, "ca.intermediates").await?;
    let ask: Ask = read_json(body, state.max_body_bytes).await?;
    let signed = state
        .engine
        .sign_subordinate_ca(&admin, ask.csr, ask.name, ask.ttl_seconds)
        .await?;
    Ok((StatusCode::CREATED, axum::Json(signed)).into_response())
}

/// `POST /api/v1/audit/checkpoints` (admin): signs the audit log's head now
/// (appended as an `audit.checkpoint` entry); answers its size, head and JWS.
pub(super) async fn audit_checkpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let admin = state.require_admin(&headers, "audit.checkpoint").await?;
    let detail = state.engine.audit_checkpoint(Actor::from(&admin)).await?;
    Ok((StatusCode::CREATED, axum::Json(detail)).into_response())
}

/// `GET /api/v1/audit/verify` (admin): re-hashes the whole audit log, as
/// every gateway sharing the store wrote it (one chain), and says how many
/// records verified, or where the chain breaks.
pub(super) async fn verify_audit(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "audit.verify").await?;
    match state.engine.store.verify_audit_chain().await {
        Ok(n) => Ok(axum::Json(json!({ "verified": n })).into_response()),
        Err(crate::store::StoreError::ChainBroken(seq)) => Err(Problem::new(
            axum::http::StatusCode::CONFLICT,
            "audit-chain-broken",
            "Audit chain broken",
            format!("the audit record with sequence number {seq} does not follow from the one before it"),
        )),
        Err(e) => Err(AppState::unavailable("the audit log could not be read", e)),
    }
}

/// `POST /api/v1/explain` (admin): why a caller would get, or did not get,
/// an identity. The body names one of: `method` and `evidence`;
/// `selectors` (and optionally `method`); or a refused request's
/// `request_id`. Nothing is issued, spent or recorded.
pub(super) async fn explain(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ExplainBody {
        method: Option<String>,
        evidence: Option<String>,
        selectors: Option<Vec<String>>,
        request_id: Option<String>,
    }
    let (parts, body) = req.into_parts();
    state.require_admin(&parts.headers, "explain").await?;
    let b: ExplainBody = read_json(body, state.max_body_bytes).await?;
    use crate::engine::explain::Ask;
    let ask = match (b.method, b.evidence, b.selectors, b.request_id) {
        (Some(method), Some(evidence), None, None) => Ask::Evidence { method, evidence },
        (method, None, Some(selectors), None) => {
            if selectors.is_empty() || selectors.len() > 256 || selectors.iter().any(|s| s.len() > 1024) {
                return Err(Problem::malformed(
                    "`selectors` must hold 1 to 256 selectors of at most 1024 bytes",
                ));
            }
            Ask::Selectors { method, selectors }
        }
        (None, None, None, Some(id)) => Ask::Refusal(id),
        _ => {
            return Err(Problem::malformed(
                "send one of: `method` and `evidence`; `selectors` (and optionally `method`); or `request_id`",
            ));
        }
    };
    let explanation = state.engine.explain(ask).await?;
    Ok(axum::Json(explanation).into_response())
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
    Ok(super::secret_response(StatusCode::CREATED, token))
}

/// `GET /.well-known/spiffe-bundle`: this trust domain's SPIFFE bundle, for
/// federated peers (no authentication: the bundle is public, and peers
/// authenticate this server by its certificate).
pub(super) async fn spiffe_bundle(State(state): State<AppState>) -> Response {
    let doc = crate::federation::own_bundle(&state.engine.authorities(), state.bundle_refresh_hint);
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
