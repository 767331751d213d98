//! `/api/v1/ephemeral`: just-in-time requests and their approvals. Parses,
//! authenticates, calls the engine, renders; the engine audits refusals.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Problem, printable, read_json};
use crate::engine::ephemeral::{Created, NewRequest};
use crate::engine::{EngineError, Refusal, Surface};
use crate::model::{Actor, State as ReqState, VoteDecision};

/// Longest long-poll accepted, in seconds.
const MAX_WAIT_SECONDS: u64 = 60;

#[derive(Deserialize)]
struct CreateBody {
    csr: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
    #[serde(default)]
    justification: String,
    #[serde(default)]
    ticket: Option<String>,
    #[serde(default)]
    emergency: bool,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    evidence: Option<String>,
    #[serde(default)]
    spiffe_id: Option<String>,
    #[serde(default)]
    dns_names: Vec<String>,
    /// Whatever else the policy needs.
    #[serde(flatten)]
    extra: serde_json::Map<String, Value>,
}

/// `POST /api/v1/ephemeral`.
pub(super) async fn create(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let caller = state.principal(&parts.headers);
    let actor = caller.as_ref().map(Actor::from).unwrap_or(Actor::Anonymous);
    let parsed = read_json::<CreateBody>(body, state.max_body_bytes)
        .await
        .and_then(|body| match (&body.method, &body.evidence) {
            (Some(_), Some(_)) | (None, None) => Ok(body),
            _ => Err(EngineError::BadRequest(
                "`method` and `evidence` go together".into(),
            )),
        });
    let body = match parsed {
        Ok(b) => b,
        Err(e) => {
            let refusal = Refusal::new(Surface::Ephemeral, "create", actor);
            state.engine.audit_refusal(refusal, &e).await;
            return Err(e.into());
        }
    };
    let new = NewRequest {
        csr_pem: body.csr,
        ttl_seconds: body.ttl_seconds,
        justification: body.justification,
        ticket: body.ticket,
        emergency: body.emergency,
        spiffe_id: body.spiffe_id,
        dns_names: body.dns_names,
        evidence: body.method.zip(body.evidence),
        extra: Value::Object(body.extra),
    };
    Ok(match state.engine.ephemeral_create(caller, new).await? {
        Created::Issued(r) => (StatusCode::CREATED, axum::Json(r.view())).into_response(),
        Created::Pending(r) => (StatusCode::ACCEPTED, axum::Json(r.view())).into_response(),
    })
}

#[derive(Deserialize)]
pub(super) struct GetQuery {
    wait: Option<u64>,
}

/// `GET /api/v1/ephemeral/{id}`: the id is an unguessable capability, so a
/// workload that asked with evidence can follow its request without a token.
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<GetQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Ok(Query(q)) = q else {
        return Err(Problem::malformed("`wait` must be a number of seconds"));
    };
    let not_found = || Problem::not_found("no ephemeral request with that id");
    let current = state.engine.ephemeral_get(&id).await?.ok_or_else(not_found)?;
    let request = match q.wait {
        Some(w) if w > 0 && !current.state.is_terminal() => {
            let wait = Duration::from_secs(w.min(MAX_WAIT_SECONDS));
            state
                .engine
                .ephemeral_wait(&id, current.state, wait)
                .await?
                .ok_or_else(not_found)?
        }
        _ => current,
    };
    Ok(axum::Json(request.view()).into_response())
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    state: Option<String>,
}

/// `GET /api/v1/ephemeral?state=pending`: what the caller may act on.
pub(super) async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let who = state.require_principal(&headers, "ephemeral.list").await?;
    let Ok(Query(q)) = q else {
        return Err(Problem::malformed("invalid query"));
    };
    let filter = match q.state.as_deref().map(|s| (s, ReqState::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((s, None)) => return Err(Problem::malformed(format!("unknown state `{}`", printable(s)))),
    };
    let items = state.engine.ephemeral_list(&who, filter).await?;
    Ok(axum::Json(json!({ "items": items.iter().map(|r| r.view()).collect::<Vec<_>>() })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoteBody {
    decision: VoteDecision,
    #[serde(default)]
    reason: String,
    binding: String,
}

/// `POST /api/v1/ephemeral/{id}/approvals`.
pub(super) async fn vote(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let voter = state.require_principal(&parts.headers, "ephemeral.vote").await?;
    let body: VoteBody = match read_json(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let refusal = Refusal::new(Surface::Ephemeral, "vote", Actor::from(&voter));
            state.engine.audit_refusal(refusal, &e).await;
            return Err(e.into());
        }
    };
    let request = state
        .engine
        .ephemeral_vote(&voter, &id, body.decision, &body.reason, &body.binding)
        .await?;
    Ok(axum::Json(request.view()).into_response())
}

/// `POST /api/v1/ephemeral/{id}/cancel` (the requester).
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let who = state.require_principal(&headers, "ephemeral.cancel").await?;
    let request = state.engine.ephemeral_cancel(&who, &id).await?;
    Ok(axum::Json(request.view()).into_response())
}

/// `POST /api/v1/ephemeral/{id}/collect` (the agent, with a `DPoP` proof of
/// the key it asked with): an approved agent identity, delivered once.
pub(super) async fn collect(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let proof = super::broker::dpop_header(&headers);
    let granted = state.engine.agent_collect(&id, proof.as_deref()).await?;
    Ok(super::secret_response(StatusCode::CREATED, granted))
}
