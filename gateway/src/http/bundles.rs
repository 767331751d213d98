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
        ActivationError::Store(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Bundle not stored",
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

/// What an activation keeps: a pushed bundle goes to the store (with its
/// audit event, in one transaction) for every gateway; a bundle from this
/// gateway's own disk stays this gateway's.
pub(crate) enum Keep {
    /// The `.tar.gz` as pushed.
    Stored(Vec<u8>),
    Local,
}

/// Verifies and activates a bundle; audits either way.
pub(crate) async fn activate(
    state: &AppState,
    name: &str,
    bundle: Result<Bundle, BundleError>,
    actor: Actor,
    keep: Keep,
) -> Result<crate::policy::BundleInfo, Problem> {
    let keys = state.bundle_keys.clone();
    let bundles = state.bundles.clone();
    let store = state.engine.store.clone();
    let name_owned = name.to_owned();
    let audit_actor = actor.clone();
    let handle = tokio::runtime::Handle::current();
    // Verification and compilation are CPU work: off the async threads.
    let result = tokio::task::spawn_blocking(move || -> Result<_, ActivationError> {
        let bundle = bundle?;
        let signed = keys.verify(&bundle)?;
        let Keep::Stored(tar_gz) = keep else {
            let info = bundles.put(&name_owned, bundle, signed)?;
            return Ok((info, false));
        };
        let sha256 = crate::util::sha256_hex(&tar_gz);
        let info = bundles.put_then(&name_owned, bundle, signed, |info| {
            let stored = crate::model::StoredBundle {
                name: name_owned.clone(),
                tar_gz: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &tar_gz),
                sha256: sha256.clone(),
                stored_at: crate::util::now_unix(),
            };
            let event =
                crate::model::AuditEvent::new(AuditKind::BundleActivated, audit_actor, activated(info));
            handle
                .block_on(store.put_bundle(stored, event))
                .map_err(|e| ActivationError::Store(e.to_string()))
        })?;
        bundles.mark_stored(&name_owned, &sha256);
        Ok((info, true))
    })
    .await
    .map_err(|e| Problem::internal(format!("activation task failed: {e}")))?;
    match result {
        Ok((info, audited)) => {
            if !audited {
                state
                    .audit(AuditKind::BundleActivated, actor, activated(&info))
                    .await;
            }
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

fn activated(info: &crate::policy::BundleInfo) -> serde_json::Value {
    json!({ "name": info.name, "revision": info.revision, "signed": info.signed, "attestors": info.attestors })
}

/// Activates the bundles other gateways (or this one, before a restart)
/// pushed, where the stored bytes differ from what is active here. Each is
/// verified and compiled here again; one that fails is logged and skipped,
/// leaving what was active.
pub async fn activate_stored(state: &AppState) -> Result<(), crate::store::StoreError> {
    for stored in state.engine.store.bundles().await? {
        if state.bundles.stored_sha256(&stored.name).as_deref() == Some(stored.sha256.as_str()) {
            continue;
        }
        let (keys, bundles) = (state.bundle_keys.clone(), state.bundles.clone());
        let name = stored.name.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<_, ActivationError> {
            let tar_gz =
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, &stored.tar_gz)
                    .map_err(|e| ActivationError::Bundle(BundleError::Io(format!("stored bundle: {e}"))))?;
            let bundle = Bundle::from_tar_gz(&tar_gz)?;
            let signed = keys.verify(&bundle)?;
            let info = bundles.put(&stored.name, bundle, signed)?;
            bundles.mark_stored(&stored.name, &stored.sha256);
            Ok(info)
        })
        .await;
        match result {
            Ok(Ok(info)) => {
                tracing::info!(bundle = %info.name, revision = %info.revision, "stored bundle activated")
            }
            Ok(Err(e)) => tracing::warn!(bundle = %name, error = %e, "stored bundle refused here"),
            Err(e) => tracing::warn!(bundle = %name, error = %e, "stored bundle activation failed"),
        }
    }
    Ok(())
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
    let info = activate(
        &state,
        &name,
        bundle,
        Actor::from(&admin),
        Keep::Stored(bytes.to_vec()),
    )
    .await?;
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
                Keep::Local,
            )
            .await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}
