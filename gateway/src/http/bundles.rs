//! `/api/v1/bundles`: push and list policy bundles (admin).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{AppState, Problem};
use crate::bundle::{ActivationError, Bundle, BundleError, MAX_BUNDLE_BYTES};
use crate::model::{Actor, AuditKind};

fn problem(e: &ActivationError) -> Problem {
    let (status, slug, title) = match e {
        ActivationError::Bundle(BundleError::Signature(_)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle-signature",
            "Bundle signature refused",
        ),
        ActivationError::Bundle(BundleError::Integrity(_)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle-integrity",
            "Bundle integrity check failed",
        ),
        ActivationError::Bundle(BundleError::TooLarge(_)) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Bundle too large",
        ),
        ActivationError::Conflict(_) => (
            StatusCode::CONFLICT,
            "bundle-conflict",
            "Bundle conflicts with an active one",
        ),
        _ => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "bundle-invalid",
            "Bundle refused",
        ),
    };
    Problem::new(
        status,
        slug,
        title,
        format!("{e}; the active bundles are unchanged"),
    )
}

/// Verifies and activates a bundle; audits either way.
pub(crate) async fn activate(
    state: &AppState,
    name: &str,
    bundle: Result<Bundle, BundleError>,
    actor: Actor,
) -> Result<crate::policy::BundleInfo, Problem> {
    let keys = state.bundle_keys.clone();
    let bundles = state.bundles.clone();
    let name_owned = name.to_owned();
    // Verification and compilation are CPU work: off the async threads.
    let result = tokio::task::spawn_blocking(move || -> Result<_, ActivationError> {
        let bundle = bundle?;
        let signed = keys.verify(&bundle)?;
        bundles.put(&name_owned, bundle, signed)
    })
    .await
    .map_err(|e| Problem::internal(format!("activation task failed: {e}")))?;
    match result {
        Ok(info) => {
            state.audit(AuditKind::BundleActivated, actor, json!({ "name": info.name, "revision": info.revision, "signed": info.signed, "attestors": info.attestors })).await;
            tracing::info!(bundle = %info.name, revision = %info.revision, "bundle activated");
            Ok(info)
        }
        Err(e) => {
            let p = problem(&e);
            state
                .audit(
                    AuditKind::BundleRefused,
                    actor,
                    json!({ "name": name, "problem": p.slug(), "detail": p.detail }),
                )
                .await;
            tracing::warn!(bundle = %name, error = %e, "bundle refused");
            Err(p)
        }
    }
}

/// `PUT /api/v1/bundles/{name}`: the body is the `.tar.gz`.
pub(super) async fn put(
    State(state): State<AppState>,
    Path(name): Path<String>,
    req: Request<Body>,
) -> Result<Response, Problem> {
    let (parts, body) = req.into_parts();
    let admin = state.require_admin(&parts.headers, "bundles.put").await?;
    let bytes = axum::body::to_bytes(body, MAX_BUNDLE_BYTES)
        .await
        .map_err(|_| Problem::too_large(MAX_BUNDLE_BYTES))?;
    let bundle = Bundle::from_tar_gz(&bytes);
    let info = activate(&state, &name, bundle, Actor::from(&admin)).await?;
    Ok(axum::Json(info).into_response())
}

/// `GET /api/v1/bundles`: the active bundles and their revisions.
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, Problem> {
    state.require_admin(&headers, "bundles.list").await?;
    Ok(axum::Json(json!({ "items": state.bundles.list() })).into_response())
}

/// A cheap fingerprint of a file or directory: paths, sizes, mtimes.
fn fingerprint(path: &std::path::Path) -> Option<Vec<(String, u64, std::time::SystemTime)>> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some(vec![(
            path.display().to_string(),
            meta.len(),
            meta.modified().ok()?,
        )]);
    }
    let mut out = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let m = e.metadata().ok()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                out.push((e.path().display().to_string(), m.len(), m.modified().ok()?));
            }
        }
    }
    out.sort();
    Some(out)
}

/// Loads each configured bundle source at start and again whenever it
/// changes on disk (polled every two seconds).
pub async fn watch(state: AppState, sources: Vec<crate::config::BundleSource>) {
    let mut seen: Vec<Option<Vec<(String, u64, std::time::SystemTime)>>> = vec![None; sources.len()];
    loop {
        for (i, source) in sources.iter().enumerate() {
            let now = fingerprint(&source.path);
            if now.is_none() || now == seen[i] {
                continue;
            }
            seen[i] = now;
            let path = source.path.clone();
            let bundle = tokio::task::spawn_blocking(move || {
                if path.is_dir() {
                    Bundle::from_dir(&path)
                } else {
                    std::fs::read(&path)
                        .map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))
                        .and_then(|b| Bundle::from_tar_gz(&b))
                }
            })
            .await
            .unwrap_or_else(|e| Err(BundleError::Io(e.to_string())));
            let _ = activate(
                &state,
                &source.name,
                bundle,
                Actor::Watch(source.path.display().to_string()),
            )
            .await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
