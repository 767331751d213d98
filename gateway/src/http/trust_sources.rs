//! `/api/v1/trust-sources` (admin): where the keys and certificates that
//! verify evidence come from. Changes are persisted with their audit event
//! before the registry serving attestations swaps them in.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AppState, Problem, read_json};
use crate::model::{Actor, AuditEvent, AuditKind, TrustSource};
use crate::trust::{TrustError, TrustSourceSpec};

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

fn not_found(id: &str) -> Problem {
    Problem::not_found(format!(
        "no trust source with id `{}`",
        id.chars().take(64).collect::<String>()
    ))
}

/// `POST /api/v1/trust-sources` (admin).
pub(super) async fn create(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let admin = state
        .require_admin(&parts.headers, "trust-sources.create")
        .await?;
    let spec: TrustSourceSpec = read_json(body, state.max_body_bytes).await?;
    if spec.jwks_file.is_some() {
        return Err(Problem::malformed(
            "`jwks_file` is only accepted in the config file; send `jwks` inline",
        ));
    }
    let registry = &state.engine.trust;
    let mut source = spec.into_source("api").map_err(trust_problem)?;
    if let Some(url) = &source.jwks_url {
        source.jwks = crate::trust::fetch_jwks(url).await.map_err(trust_problem)?;
    }
    if !state
        .engine
        .policies
        .snapshot()
        .modules
        .contains_key(&source.method)
    {
        return Err(trust_problem(TrustError::UnknownMethod(source.method.clone())));
    }
    registry.check_insert(&source).map_err(trust_problem)?;
    let event = AuditEvent::new(
        AuditKind::TrustSourceCreated,
        Actor::from(&admin),
        json!({ "id": source.id, "name": source.name, "method": source.method, "issuer": source.issuer }),
    );
    let created = state
        .engine
        .store
        .create_trust_source(source.clone(), event)
        .await
        .map_err(|e| AppState::unavailable("the trust source could not be stored", e))?;
    if !created {
        return Err(trust_problem(TrustError::Duplicate(source.name.clone())));
    }
    registry.insert(source.clone()).map_err(trust_problem)?;
    Ok((StatusCode::CREATED, axum::Json(source)).into_response())
}

/// `GET /api/v1/trust-sources` (admin).
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    state.require_admin(&headers, "trust-sources.list").await?;
    let items: Vec<_> = state
        .engine
        .trust
        .list()
        .iter()
        .map(|s| s.as_ref().clone())
        .collect();
    Ok(axum::Json(json!({ "items": items })).into_response())
}

/// `GET /api/v1/trust-sources/{id}` (admin).
pub(super) async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    state.require_admin(&headers, "trust-sources.get").await?;
    let source = state.engine.trust.get(&id).ok_or_else(|| not_found(&id))?;
    Ok(axum::Json(source.as_ref().clone()).into_response())
}

/// `DELETE /api/v1/trust-sources/{id}` (admin): only sources made over the API.
pub(super) async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let admin = state.require_admin(&headers, "trust-sources.delete").await?;
    let source = state.engine.trust.get(&id).ok_or_else(|| not_found(&id))?;
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
    let event = AuditEvent::new(
        AuditKind::TrustSourceDeleted,
        Actor::from(&admin),
        json!({ "id": source.id, "name": source.name }),
    );
    state
        .engine
        .store
        .delete_trust_source(&id, event)
        .await
        .map_err(|e| AppState::unavailable("the trust source could not be deleted", e))?;
    state.engine.trust.remove(&id);
    Ok(StatusCode::NO_CONTENT.into_response())
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
fn api_source(state: &AppState, id: &str) -> Result<std::sync::Arc<TrustSource>, Problem> {
    let source = state.engine.trust.get(id).ok_or_else(|| {
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
async fn replace(state: &AppState, changed: TrustSource, event: AuditEvent) -> Result<TrustSource, Problem> {
    state
        .engine
        .store
        .put_trust_source(changed.clone(), event)
        .await
        .map_err(|e| AppState::unavailable("the trust source could not be stored", e))?;
    let stored = changed.clone();
    state
        .engine
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
pub(super) async fn rotate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let result = async {
        let admin = state
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
            kind: AuditKind::TrustSourceRotated,
            actor: Actor::from(&admin),
            detail: json!({
                "id": source.id, "name": source.name,
                "previous_until": keys_rotated.then_some(until),
                "settings_changed": settings_changed,
            }),
        };
        replace(&state, rotated, event).await
    }
    .await?;
    Ok(axum::Json(result).into_response())
}

/// `POST /api/v1/trust-sources/{id}/revoke` (admin): the source stops
/// verifying anything at once (kept, marked, for the record).
pub(super) async fn revoke(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, Problem> {
    let result = async {
        let admin = state.require_admin(&headers, "trust-sources.revoke").await?;
        let source = api_source(&state, &id)?;
        let mut revoked: TrustSource = source.as_ref().clone();
        revoked.revoked_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
        let event = AuditEvent {
            kind: AuditKind::TrustSourceRevoked,
            actor: Actor::from(&admin),
            detail: json!({ "id": source.id, "name": source.name }),
        };
        replace(&state, revoked, event).await
    }
    .await?;
    Ok(axum::Json(result).into_response())
}
