//! `/api/v1/ephemeral`: just-in-time requests and their approvals. Parses,
//! authenticates, calls [`Approvals`], renders; refusals are audited.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Problem, issuance_problem, printable, read_json};
use crate::approvals::{ApprovalError, Created, Decision, EphemeralError, NewRequest, State as ReqState};

/// Longest long-poll accepted, in seconds.
const MAX_WAIT_SECONDS: u64 = 60;

fn problem(e: EphemeralError) -> Problem {
    let detail = e.to_string();
    let p = |status, slug, title| Problem::new(status, slug, title, detail.clone());
    match e {
        EphemeralError::Issuance(i) => issuance_problem(i),
        EphemeralError::Unauthenticated => Problem::unauthorized(),
        EphemeralError::Forbidden(_) => p(StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
        EphemeralError::Approval(a) => match a {
            ApprovalError::NotFound => p(StatusCode::NOT_FOUND, "not-found", "Not found"),
            ApprovalError::Expired => p(StatusCode::GONE, "request-expired", "Request expired"),
            ApprovalError::NotPending(_) => {
                p(StatusCode::CONFLICT, "request-not-pending", "Request not pending")
            }
            ApprovalError::SelfApproval => p(StatusCode::FORBIDDEN, "self-approval", "Self-approval refused"),
            ApprovalError::NotEligible(_) => {
                p(StatusCode::FORBIDDEN, "not-eligible", "Not an eligible approver")
            }
            ApprovalError::BindingMismatch => p(StatusCode::CONFLICT, "binding-mismatch", "Binding mismatch"),
            ApprovalError::NotRequester => p(StatusCode::FORBIDDEN, "not-requester", "Not the requester"),
        },
    }
}

impl AppState {
    async fn refuse_ephemeral(&self, actor: &str, what: &str, p: Problem) -> Response {
        self.audit(
            "ephemeral.refused",
            actor,
            json!({ "operation": what, "status": p.status, "problem": p.slug(), "detail": p.detail }),
        )
        .await;
        p.into_response()
    }
}

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
pub(super) async fn create(State(state): State<AppState>, req: Request<Body>) -> Response {
    let (parts, body) = req.into_parts();
    let caller = state.principal(&parts.headers);
    let actor = caller
        .as_ref()
        .map(|c| c.id.clone())
        .unwrap_or_else(|| "anonymous".into());
    let body: CreateBody = match read_json(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(p) => return state.refuse_ephemeral(&actor, "create", p).await,
    };
    let evidence = match (body.method, body.evidence) {
        (Some(m), Some(e)) => Some((m, e)),
        (None, None) => None,
        _ => {
            let p = Problem::malformed("`method` and `evidence` go together");
            return state.refuse_ephemeral(&actor, "create", p).await;
        }
    };
    let actor = evidence
        .as_ref()
        .map(|(m, _)| format!("evidence:{}", printable(m)))
        .unwrap_or(actor);
    let new = NewRequest {
        csr_pem: body.csr,
        ttl_seconds: body.ttl_seconds,
        justification: body.justification,
        ticket: body.ticket,
        emergency: body.emergency,
        spiffe_id: body.spiffe_id,
        dns_names: body.dns_names,
        evidence,
        extra: Value::Object(body.extra),
    };
    match state.approvals.create(caller, new).await {
        Ok(Created::Issued(r)) => (StatusCode::CREATED, axum::Json(r.view())).into_response(),
        Ok(Created::Pending(r)) => (StatusCode::ACCEPTED, axum::Json(r.view())).into_response(),
        Err(e) => state.refuse_ephemeral(&actor, "create", problem(e)).await,
    }
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
) -> Response {
    let Ok(Query(q)) = q else {
        return Problem::malformed("`wait` must be a number of seconds").into_response();
    };
    let not_found = || Problem::not_found("no ephemeral request with that id").into_response();
    let current = match state.approvals.get(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => return not_found(),
        Err(e) => return problem(e).into_response(),
    };
    let request = match q.wait {
        Some(w) if w > 0 && !current.state.is_terminal() => {
            let wait = Duration::from_secs(w.min(MAX_WAIT_SECONDS));
            match state.approvals.wait(&id, current.state, wait).await {
                Ok(Some(r)) => r,
                Ok(None) => return not_found(),
                Err(e) => return problem(e).into_response(),
            }
        }
        _ => current,
    };
    axum::Json(request.view()).into_response()
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
) -> Response {
    let who = match state.require_principal(&headers, "ephemeral.list").await {
        Ok(p) => p,
        Err(p) => return p.into_response(),
    };
    let Ok(Query(q)) = q else {
        return Problem::malformed("invalid query").into_response();
    };
    let filter = match q.state.as_deref().map(|s| (s, ReqState::parse(s))) {
        None => None,
        Some((_, Some(s))) => Some(s),
        Some((s, None)) => {
            return Problem::malformed(format!("unknown state `{}`", printable(s))).into_response();
        }
    };
    match state.approvals.list(&who, filter).await {
        Ok(items) => {
            axum::Json(json!({ "items": items.iter().map(|r| r.view()).collect::<Vec<_>>() })).into_response()
        }
        Err(e) => problem(e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VoteBody {
    decision: Decision,
    #[serde(default)]
    reason: String,
    binding: String,
}

/// `POST /api/v1/ephemeral/{id}/approvals`.
pub(super) async fn vote(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Response {
    let (parts, body) = req.into_parts();
    let voter = match state.require_principal(&parts.headers, "ephemeral.vote").await {
        Ok(p) => p,
        Err(p) => return p.into_response(),
    };
    let body: VoteBody = match read_json(body, state.max_body_bytes).await {
        Ok(b) => b,
        Err(p) => return state.refuse_ephemeral(&voter.id, "vote", p).await,
    };
    match state
        .approvals
        .vote(&voter, &id, body.decision, &body.reason, &body.binding)
        .await
    {
        Ok(r) => axum::Json(r.view()).into_response(),
        Err(e) => state.refuse_ephemeral(&voter.id, "vote", problem(e)).await,
    }
}

/// `POST /api/v1/ephemeral/{id}/cancel` (the requester).
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match state.require_principal(&headers, "ephemeral.cancel").await {
        Ok(p) => p,
        Err(p) => return p.into_response(),
    };
    match state.approvals.cancel(&who, &id).await {
        Ok(r) => axum::Json(r.view()).into_response(),
        Err(e) => state.refuse_ephemeral(&who.id, "cancel", problem(e)).await,
    }
}
