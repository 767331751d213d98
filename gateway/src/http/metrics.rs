//! `GET /metrics`: the Prometheus registry in the text exposition format
//! (OpenMetrics), with the gauges that describe state set at scrape time,
//! and the middleware that times every request by route.

use axum::extract::{MatchedPath, State};
use axum::http::{Request, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::AppState;
use crate::metrics::{Authority, Bundle, Route, get};

/// `GET /metrics` (no authentication: counts and durations, never a secret
/// or a caller's value; serve it on `[metrics] addr` to keep it private).
pub async fn render(State(state): State<AppState>) -> Response {
    let m = get();
    let now = crate::util::now_unix();
    m.authority_expiry_seconds.clear();
    for a in state
        .engine
        .authorities()
        .authorities
        .iter()
        .filter(|a| a.published())
    {
        m.authority_expiry_seconds
            .get_or_create(&Authority {
                kind: a.kind.to_string(),
                id: a.id.clone(),
                state: a.state.to_string(),
            })
            .set((a.not_after - now) as f64);
    }
    m.bundle_revision.clear();
    for b in state.bundles.list() {
        m.bundle_revision
            .get_or_create(&Bundle {
                bundle: b.name,
                revision: b.revision,
            })
            .set(1);
    }
    match state
        .engine
        .store
        .list_requests(Some(crate::approvals::State::Pending))
        .await
    {
        Ok(pending) => {
            m.pending_approvals.set(pending.len() as i64);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: pending requests could not be counted"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// Times each request end to end, labelled by the route it matched and
/// its status class (never the raw path: ids and names are the caller's).
pub async fn time_request(req: Request<axum::body::Body>, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let start = std::time::Instant::now();
    let response = next.run(req).await;
    let status = format!("{}xx", response.status().as_u16() / 100);
    get()
        .http_seconds
        .get_or_create(&Route { route, status })
        .observe(start.elapsed().as_secs_f64());
    response
}
