//! `/api/v1/entries` (admin): Workload API registration entries. A change
//! is persisted with its audit event, then the registry swaps it in and
//! open Workload API streams re-evaluate.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, Problem, read_json};
use crate::entries::EntrySpec;
use crate::model::{Actor, AuditEvent, AuditKind};

/// `POST /api/v1/entries` (admin).
pub(super) async fn create(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let admin = state.require_admin(&parts.headers, "entries.create").await?;
    let spec: EntrySpec = read_json(body, state.max_body_bytes).await?;
    let entry = spec.into_entry(&state.engine.trust_domain).map_err(|m| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-entry",
            "Invalid registration entry",
            m,
        )
    })?;
    let event = AuditEvent::new(
        AuditKind::EntryCreated,
        Actor::from(&admin),
        json!({ "id": entry.id, "spiffe_id": entry.spiffe_id, "selectors": entry.selectors }),
    );
    state
        .engine
        .store
        .put_entry(entry.clone(), event)
        .await
        .map_err(|e| AppState::unavailable("the entry could not be stored", e))?;
    state.engine.entries.insert(entry.clone());
    Ok((StatusCode::CREATED, axum::Json(entry)).into_response())
}

/// `GET /api/v1/entries` (admin).
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    state.require_admin(&headers, "entries.list").await?;
    let items: Vec<_> = state
        .engine
        .entries
        .list()
        .iter()
        .map(|e| e.as_ref().clone())
        .collect();
    Ok(axum::Json(json!({ "items": items })).into_response())
}

/// `GET /api/v1/entries/{id}` (admin).
pub(super) async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "entries.get").await?;
    let entry = state
        .engine
        .entries
        .get(&id)
        .ok_or_else(|| Problem::not_found("no entry with that id"))?;
    Ok(axum::Json(entry.as_ref().clone()).into_response())
}

/// `DELETE /api/v1/entries/{id}` (admin).
pub(super) async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let admin = state.require_admin(&headers, "entries.delete").await?;
    if state.engine.entries.get(&id).is_none() {
        return Err(Problem::not_found("no entry with that id"));
    }
    let event = AuditEvent::new(AuditKind::EntryDeleted, Actor::from(&admin), json!({ "id": id }));
    state
        .engine
        .store
        .delete_entry(&id, event)
        .await
        .map_err(|e| AppState::unavailable("the entry could not be deleted", e))?;
    state.engine.entries.remove(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
}
