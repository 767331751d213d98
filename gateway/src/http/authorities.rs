//! `/api/v1/ca/authorities` (admin): the signing authorities and their
//! rotation (list, prepare, activate, taint, revoke). The engine applies
//! and audits each step; this renders it.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::{AppState, Problem, read_json};
use crate::model::Actor;
use crate::signer::{Authority, Kind, Rotation};

/// `GET /api/v1/ca/authorities`: every authority, the active ones first.
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    state.require_admin(&headers, "ca.authorities.list").await?;
    Ok(axum::Json(state.engine.authorities().view()).into_response())
}

/// `POST /api/v1/ca/authorities` with `{"kind": "x509"|"jwt", "root":
/// false}`: prepares a new authority (published, not signing).
pub(super) async fn prepare(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        kind: Kind,
        #[serde(default)]
        root: bool,
    }
    let (parts, body) = req.into_parts();
    let admin = state
        .require_admin(&parts.headers, "ca.authorities.prepare")
        .await?;
    let ask: Ask = read_json(body, state.max_body_bytes).await?;
    let before = state.engine.authorities();
    let after = state
        .engine
        .rotate(
            Rotation::Prepare {
                kind: ask.kind,
                root: ask.root,
            },
            Actor::from(&admin),
        )
        .await?;
    let new = after
        .authorities
        .iter()
        .find(|a| before.get(&a.id).is_none())
        .map(Authority::view);
    let mut doc = after.view();
    doc["prepared"] = new.unwrap_or(Value::Null);
    Ok((StatusCode::CREATED, axum::Json(doc)).into_response())
}

/// `POST /api/v1/ca/authorities/{id}/{activate|taint|revoke}`.
pub(super) async fn step(
    State(state): State<AppState>,
    Path((id, op)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let rotation = match op.as_str() {
        "activate" => Rotation::Activate { id },
        "taint" => Rotation::Taint { id },
        "revoke" => Rotation::Revoke { id },
        _ => {
            return Err(Problem::new(
                StatusCode::NOT_FOUND,
                "not-found",
                "Not found",
                format!("no operation `{op}`: activate, taint or revoke"),
            ));
        }
    };
    let admin = state
        .require_admin(&headers, &format!("ca.authorities.{}", rotation.name()))
        .await?;
    let after = state.engine.rotate(rotation, Actor::from(&admin)).await?;
    Ok(axum::Json(after.view()).into_response())
}
