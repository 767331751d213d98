//! The approver console at `/console`: a page, its script and its style,
//! embedded in the binary (no build step, nothing fetched at run time).
//!
//! - **Sign in** with an approver (or admin) API token, or through an
//!   `[[oidc_issuers]]` entry with a `client_id` (authorization code with
//!   PKCE, [`oidc`]). The credential is kept in a cookie that is `HttpOnly`,
//!   `Secure`, `SameSite=Strict` and scoped to `/console`; every request
//!   authenticates it again, so a revoked token or an expired ID token ends
//!   the session at once, on every gateway sharing the store.
//! - **The API** is reached through `/console/api/…`, which forwards a short
//!   list of calls (pending requests, one request, a vote, the inventory and
//!   the audit log) to the ordinary API with the cookie's credential. Calls
//!   that change anything need the session's CSRF token in `X-CSRF-Token`
//!   (derived from the credential; a cross-site page can neither read it
//!   nor send the header without a preflight the server never grants) and,
//!   when the browser sends one, an `Origin` that is this server.
//! - **Headers**: a Content Security Policy allowing only this server's own
//!   script, style and API (`default-src 'none'`), no framing, no referrer,
//!   no caching, no MIME sniffing.

mod oidc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use sha2::{Digest as _, Sha256};

use super::{AppState, Problem, read_json};
use crate::auth::{Principal, Role};

/// The session cookie: the credential itself.
const SESSION_COOKIE: &str = "castellan_console";
/// How long a session signed in with an API token lasts in the browser.
const TOKEN_SESSION_SECONDS: i64 = 8 * 3600;

const INDEX_HTML: &str = include_str!("../../../console/index.html");
const APP_JS: &str = include_str!("../../../console/app.js");
const APP_CSS: &str = include_str!("../../../console/app.css");

/// The Content Security Policy of every console response.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's state: the API it forwards to.
#[derive(Clone)]
pub(super) struct Console {
    state: AppState,
    api: Router,
}

/// The console's routes; `api` is the API router calls are forwarded to.
pub(super) fn router(state: AppState, api: Router) -> Router {
    let console = Console { state, api };
    Router::new()
        .route("/console", get(page))
        .route("/console/", get(page))
        .route("/console/app.js", get(script))
        .route("/console/app.css", get(style))
        .route("/console/session", get(session).post(sign_in).delete(sign_out))
        .route("/console/oidc/login", get(oidc::login))
        .route("/console/oidc/callback", get(oidc::callback))
        .route("/console/api/{*path}", axum::routing::any(forward))
        .layer(axum::middleware::from_fn(secure_headers))
        .with_state(console)
}

/// The security headers of every console response.
async fn secure_headers(req: Request, next: axum::middleware::Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn page() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

/// The value of the cookie `name`, if the request carries a non-empty one.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value.to_owned())
        .filter(|v| !v.is_empty())
}

/// The credential in the session cookie, if any.
fn credential(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// The session's CSRF token: derived from the credential, so it needs no
/// storage and is useless without the cookie it belongs to.
fn csrf_token(credential: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"castellan-console-csrf\0");
    h.update(credential.as_bytes());
    URL_SAFE_NO_PAD.encode(h.finalize())
}

/// Whether two strings are equal, comparing every byte whatever differs.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Refuses a browser request sent from another origin: its `Origin`, when
/// present, must be this server (the `Host` it was sent to).
fn check_origin(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return Ok(());
    };
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or_default();
    if host.is_empty() || origin_host != host {
        return Err(forbidden("the request came from another origin"));
    }
    Ok(())
}

/// A change needs the session's CSRF token and a same-origin request.
fn check_csrf(headers: &HeaderMap, credential: &str) -> Result<(), Problem> {
    check_origin(headers)?;
    let sent = headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !same(sent, &csrf_token(credential)) {
        return Err(forbidden(
            "the CSRF token is missing or wrong; reload the console",
        ));
    }
    Ok(())
}

fn forbidden(detail: &str) -> Problem {
    Problem::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
}

/// The principal a credential authenticates, if it may use the console.
fn console_principal(state: &AppState, credential: &str) -> Option<Principal> {
    let p = state.auth.authenticate(Some(&format!("Bearer {credential}")))?;
    matches!(p.role, Role::Approver | Role::Admin).then_some(p)
}

/// The session cookie holding `credential` for `max_age` seconds (zero
/// clears it).
fn session_cookie(credential: &str, max_age: i64) -> HeaderValue {
    let cookie = format!(
        "{SESSION_COOKIE}={credential}; Path=/console; HttpOnly; Secure; SameSite=Strict; Max-Age={max_age}"
    );
    HeaderValue::from_str(&cookie)
        .unwrap_or_else(|_| HeaderValue::from_static("castellan_console=; Max-Age=0"))
}

/// `GET /console/session`: who is signed in (with the CSRF token), or how
/// one may sign in.
async fn session(State(c): State<Console>, headers: HeaderMap) -> Response {
    let sign_in_with: Vec<String> = c.state.auth.login_clients().into_iter().map(|l| l.name).collect();
    match credential(&headers).and_then(|cred| console_principal(&c.state, &cred).map(|p| (cred, p))) {
        Some((cred, p)) => axum::Json(json!({
            "signed_in": true,
            "name": p.name,
            "role": p.role,
            "groups": p.groups,
            "csrf": csrf_token(&cred),
        }))
        .into_response(),
        None => axum::Json(json!({ "signed_in": false, "sign_in_with": sign_in_with })).into_response(),
    }
}

/// `POST /console/session` `{"token"}`: signs in with an API token of the
/// approver or admin role. Same-origin JSON only, so no other site can sign
/// a browser in as someone else.
async fn sign_in(State(c): State<Console>, req: Request) -> Result<Response, Problem> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct SignIn {
        token: String,
    }
    let (parts, body) = req.into_parts();
    check_origin(&parts.headers)?;
    let json_body = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !json_body {
        return Err(Problem::malformed("send `{\"token\": …}` as application/json"));
    }
    let ask: SignIn = read_json(body, c.state.max_body_bytes).await?;
    let token = ask.token.trim().to_owned();
    // Cookie-safe characters only: API tokens and JWTs are.
    let printable = !token.is_empty()
        && token.len() <= 8192
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.~+/=".contains(&b));
    let principal = printable.then(|| c.state.principal(&bearer(&token))).flatten();
    let Some(p) = principal else {
        c.state
            .engine
            .audit_refused(
                crate::model::AuditEvent::new(
                    crate::model::AuditKind::AuthRefused,
                    crate::model::Actor::Anonymous,
                    json!({ "endpoint": "console.sign_in", "token_present": !token.is_empty() }),
                ),
                "unauthorized",
            )
            .await;
        return Err(Problem::unauthorized());
    };
    if !matches!(p.role, Role::Approver | Role::Admin) {
        return Err(forbidden(
            "the console is for approvers and admins; this token's role cannot vote",
        ));
    }
    let mut resp = axum::Json(json!({
        "signed_in": true, "name": p.name, "role": p.role, "groups": p.groups, "csrf": csrf_token(&token),
    }))
    .into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie(&token, TOKEN_SESSION_SECONDS));
    Ok(resp)
}

/// An `Authorization` header map for `credential`.
fn bearer(credential: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {credential}")) {
        h.insert(header::AUTHORIZATION, v);
    }
    h
}

/// `DELETE /console/session`: signs out (forgets the cookie).
async fn sign_out(State(_): State<Console>, headers: HeaderMap) -> Result<Response, Problem> {
    if let Some(cred) = credential(&headers) {
        check_csrf(&headers, &cred)?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    Ok(resp)
}

/// Whether the console forwards `method path` (the part after `/api`).
fn forwarded(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["v1", "ephemeral"]) => true,
        ("GET", ["v1", "ephemeral", id]) => !id.is_empty(),
        ("POST", ["v1", "ephemeral", id, "approvals"]) => !id.is_empty(),
        ("GET", ["v1", "certificates"]) | ("GET", ["v1", "audit"]) => true,
        _ => false,
    }
}

/// `/console/api/…`: forwards an allowed call to the API with the
/// session's credential; changes need the CSRF token.
async fn forward(State(c): State<Console>, req: Request) -> Result<Response, Problem> {
    let (mut parts, body) = req.into_parts();
    let rest = parts
        .uri
        .path()
        .strip_prefix("/console/api")
        .unwrap_or_default()
        .to_owned();
    if !forwarded(&parts.method, &rest) {
        return Err(Problem::not_found("the console does not forward this call"));
    }
    let Some(cred) = credential(&parts.headers) else {
        return Err(Problem::unauthorized());
    };
    if parts.method != Method::GET {
        check_csrf(&parts.headers, &cred)?;
    }
    let target = match parts.uri.query() {
        Some(q) => format!("/api{rest}?{q}"),
        None => format!("/api{rest}"),
    };
    parts.uri = target.parse().map_err(|_| Problem::malformed("invalid path"))?;
    parts.headers.remove(header::COOKIE);
    parts.headers.remove("x-csrf-token");
    let auth = HeaderValue::from_str(&format!("Bearer {cred}")).map_err(|_| Problem::unauthorized())?;
    parts.headers.insert(header::AUTHORIZATION, auth);
    // A fresh request: the console route's own path parameters must not
    // reach the API's handlers. The client's address is all it carries over.
    let mut forwarded = axum::http::Request::new(Body::new(body));
    *forwarded.method_mut() = parts.method;
    *forwarded.uri_mut() = parts.uri;
    *forwarded.headers_mut() = parts.headers;
    if let Some(addr) = parts.extensions.get::<super::ClientAddr>() {
        forwarded.extensions_mut().insert(*addr);
    }
    use tower::ServiceExt as _;
    match c.api.oneshot(forwarded).await {
        Ok(resp) => Ok(resp),
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_approvers_calls_are_forwarded() {
        assert!(forwarded(&Method::GET, "/v1/ephemeral"));
        assert!(forwarded(&Method::GET, "/v1/ephemeral/abc"));
        assert!(forwarded(&Method::POST, "/v1/ephemeral/abc/approvals"));
        assert!(forwarded(&Method::GET, "/v1/audit"));
        assert!(!forwarded(&Method::POST, "/v1/tokens"));
        assert!(!forwarded(&Method::POST, "/v1/ephemeral/abc/cancel"));
        assert!(!forwarded(&Method::DELETE, "/v1/entries/x"));
        assert!(!forwarded(&Method::GET, "/v1/ephemeral/abc/../../tokens"));
    }

    #[test]
    fn the_csrf_token_belongs_to_its_credential() {
        let mut h = HeaderMap::new();
        h.insert("x-csrf-token", HeaderValue::from_str(&csrf_token("a")).unwrap());
        assert!(check_csrf(&h, "a").is_ok());
        assert!(check_csrf(&h, "b").is_err());
        h.insert(header::HOST, HeaderValue::from_static("castellan.example"));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        assert!(check_csrf(&h, "a").is_err());
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://castellan.example"),
        );
        assert!(check_csrf(&h, "a").is_ok());
    }
}
