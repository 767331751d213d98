//! Signing in to the console through an OIDC issuer: the authorization-code
//! flow with PKCE (RFC 7636, `S256`) and a nonce.
//!
//! `GET /console/oidc/login?issuer=NAME` keeps the flow's `state`, code
//! verifier and nonce in a short-lived cookie (`HttpOnly`, `Secure`,
//! `SameSite=Lax` so that it comes back on the issuer's redirect, scoped to
//! `/console/oidc`) and sends the browser to the issuer. The callback checks
//! `state`, redeems the code with the verifier at the token endpoint, and
//! accepts the ID token only if it verifies as an approver login (issuer's
//! keys, audience, lifetime) and carries the nonce and this client's id.
//! The ID token then becomes the session's credential.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{Console, session_cookie};
use crate::auth::LoginClient;
use crate::model::{Actor, AuditEvent, AuditKind};

/// The cookie holding a sign-in in progress.
const FLOW_COOKIE: &str = "castellan_console_login";
/// How long a sign-in may take at the issuer.
const FLOW_SECONDS: i64 = 600;
/// How long the issuer's endpoints may take to answer.
const ISSUER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The largest answer read from the issuer.
const MAX_ANSWER: usize = 1 << 20;

#[derive(Deserialize)]
pub(super) struct LoginQuery {
    issuer: String,
}

fn random() -> String {
    URL_SAFE_NO_PAD.encode(crate::util::random_bytes::<32>())
}

/// `S256` of a code verifier.
fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// The console's page, telling it why a sign-in failed.
fn back_to_console(error: Option<&str>) -> Response {
    let location = match error {
        Some(e) => format!(
            "/console/?login_error={}",
            serde_urlencoded::to_string([("", e)])
                .map(|q| q.trim_start_matches('=').to_owned())
                .unwrap_or_default()
        ),
        None => "/console/".to_owned(),
    };
    let mut resp = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

fn flow_cookie(value: &str, max_age: i64) -> HeaderValue {
    let cookie = format!(
        "{FLOW_COOKIE}={value}; Path=/console/oidc; HttpOnly; Secure; SameSite=Lax; Max-Age={max_age}"
    );
    HeaderValue::from_str(&cookie)
        .unwrap_or_else(|_| HeaderValue::from_static("castellan_console_login=; Max-Age=0"))
}

/// The address the issuer sends the browser back to.
fn redirect_uri(c: &Console) -> Option<String> {
    let base = c.state.engine.public_url.get()?;
    (base.starts_with("https://") || base.starts_with("http://"))
        .then(|| format!("{}/console/oidc/callback", base.trim_end_matches('/')))
}

fn client(c: &Console, name: &str) -> Option<LoginClient> {
    c.state.auth.login_clients().into_iter().find(|l| l.name == name)
}

/// `GET /console/oidc/login?issuer=NAME`: off to the issuer.
pub(super) async fn login(
    State(c): State<Console>,
    q: Result<Query<LoginQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(q)) = q else {
        return back_to_console(Some("name the issuer to sign in with"));
    };
    let Some(login) = client(&c, &q.issuer) else {
        return back_to_console(Some("no such issuer for the console"));
    };
    let Some(redirect) = redirect_uri(&c) else {
        return back_to_console(Some("set `public_url` so the issuer can send you back"));
    };
    let endpoints = match endpoints(&login).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(issuer = %login.name, error = %e, "OIDC discovery failed");
            return back_to_console(Some("the issuer could not be reached"));
        }
    };
    let (state, verifier, nonce) = (random(), random(), random());
    let query = serde_urlencoded::to_string([
        ("response_type", "code"),
        ("client_id", login.client_id.as_str()),
        ("redirect_uri", redirect.as_str()),
        ("scope", login.scopes.join(" ").as_str()),
        ("state", state.as_str()),
        ("nonce", nonce.as_str()),
        ("code_challenge", challenge(&verifier).as_str()),
        ("code_challenge_method", "S256"),
    ])
    .unwrap_or_default();
    let sep = if endpoints.0.contains('?') { '&' } else { '?' };
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let Ok(location) = HeaderValue::from_str(&format!("{}{sep}{query}", endpoints.0)) else {
        return back_to_console(Some("the issuer's authorization endpoint is not a valid address"));
    };
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut().insert(
        header::SET_COOKIE,
        flow_cookie(
            &format!("{}~{state}~{verifier}~{nonce}", login.name),
            FLOW_SECONDS,
        ),
    );
    resp
}

#[derive(Deserialize)]
pub(super) struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

/// `GET /console/oidc/callback`: the issuer sent the browser back.
pub(super) async fn callback(
    State(c): State<Console>,
    headers: HeaderMap,
    q: Result<Query<CallbackQuery>, QueryRejection>,
) -> Response {
    let flow = super::cookie(&headers, FLOW_COOKIE);
    let result = finish(&c, flow.as_deref(), q.ok().map(|Query(q)| q)).await;
    let mut resp = match &result {
        Ok((id_token, exp)) => {
            let mut r = back_to_console(None);
            let max_age = (exp - crate::util::now_unix()).max(0);
            r.headers_mut()
                .append(header::SET_COOKIE, session_cookie(id_token, max_age));
            r
        }
        Err(why) => {
            tracing::info!(%why, "console OIDC sign-in refused");
            let event = AuditEvent::new(
                AuditKind::AuthRefused,
                Actor::Anonymous,
                json!({ "endpoint": "console.oidc_callback", "reason": why }),
            );
            c.state.engine.audit_refused(event, "unauthorized").await;
            back_to_console(Some(why))
        }
    };
    // The flow is over either way.
    resp.headers_mut().append(header::SET_COOKIE, flow_cookie("", 0));
    resp
}

/// Checks the callback against the flow, redeems the code and verifies the
/// ID token; returns it and its expiry, or why not (safe to show: it never
/// holds a token).
async fn finish(c: &Console, flow: Option<&str>, q: Option<CallbackQuery>) -> Result<(String, i64), String> {
    let flow = flow.ok_or("the sign-in expired or was started elsewhere; try again")?;
    let mut parts = flow.splitn(4, '~');
    let (Some(name), Some(state), Some(verifier), Some(nonce)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the sign-in cookie is malformed; try again".into());
    };
    let q = q.ok_or("the issuer's answer is malformed")?;
    if let Some(e) = q.error {
        return Err(format!("the issuer refused: {}", crate::engine::printable(&e)));
    }
    if !q.state.as_deref().is_some_and(|s| super::same(s, state)) {
        return Err("the answer does not belong to this sign-in (state)".into());
    }
    let code = q.code.ok_or("the issuer sent no code")?;
    let login = client(c, name).ok_or("the issuer is no longer configured")?;
    let redirect = redirect_uri(c).ok_or("`public_url` is not set")?;
    let (_, token_endpoint) = endpoints(&login)
        .await
        .map_err(|e| format!("the issuer could not be reached: {e}"))?;
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", redirect.as_str()),
        ("client_id", login.client_id.as_str()),
        ("code_verifier", verifier),
    ];
    if let Some(secret) = &login.client_secret {
        form.push(("client_secret", secret.as_str()));
    }
    let answer = post_form(
        &login,
        &token_endpoint,
        &serde_urlencoded::to_string(&form).unwrap_or_default(),
    )
    .await
    .map_err(|e| format!("the token endpoint: {e}"))?;
    let id_token = answer["id_token"]
        .as_str()
        .ok_or("the token endpoint returned no id_token")?
        .to_owned();
    let principal = c
        .state
        .principal(&super::bearer(&id_token))
        .ok_or("the ID token did not verify as an approver login")?;
    let claims = unverified_claims(&id_token).ok_or("the ID token is malformed")?;
    if claims["nonce"].as_str().is_none_or(|n| !super::same(n, nonce)) {
        return Err("the ID token's nonce does not match this sign-in".into());
    }
    let for_us = match &claims["aud"] {
        Value::String(a) => *a == login.client_id,
        Value::Array(a) => a.iter().any(|x| x.as_str() == Some(&login.client_id)),
        _ => false,
    };
    if !for_us || claims["azp"].as_str().is_some_and(|azp| azp != login.client_id) {
        return Err("the ID token was not issued to this client".into());
    }
    tracing::info!(name = %principal.name, issuer = %login.name, "console sign-in");
    Ok((id_token, claims["exp"].as_i64().unwrap_or_default()))
}

/// The claims of a JWT whose signature was checked already.
fn unverified_claims(jwt: &str) -> Option<Value> {
    let payload = URL_SAFE_NO_PAD.decode(jwt.split('.').nth(1)?).ok()?;
    serde_json::from_slice(&payload).ok()
}

/// The issuer's authorization and token endpoints: configured, or
/// discovered.
async fn endpoints(login: &LoginClient) -> Result<(String, String), String> {
    if let (Some(a), Some(t)) = (&login.authorization_endpoint, &login.token_endpoint) {
        return Ok((a.clone(), t.clone()));
    }
    let url = format!(
        "{}/.well-known/openid-configuration",
        login.issuer.trim_end_matches('/')
    );
    let doc = get_json(login, &url).await?;
    let field = |k: &str| {
        doc[k]
            .as_str()
            .map(str::to_owned)
            .ok_or(format!("discovery has no `{k}`"))
    };
    Ok((
        login
            .authorization_endpoint
            .clone()
            .map_or_else(|| field("authorization_endpoint"), Ok)?,
        login
            .token_endpoint
            .clone()
            .map_or_else(|| field("token_endpoint"), Ok)?,
    ))
}

/// A connection to `url`: TLS with the public roots (and `ca_file`), or
/// plain HTTP to a loopback address only.
async fn connect(login: &LoginClient, url: &str) -> Result<(crate::client::Conn, String), String> {
    let tls = crate::tls::web_client_config(login.ca_file.as_deref()).map_err(|e| e.to_string())?;
    let (endpoint, path) =
        crate::client::Endpoint::parse_url_with(url, Some(tls)).map_err(|e| crate::util::error_chain(&e))?;
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        let loopback =
            host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err("plain http is used only on loopback; use https".into());
        }
    }
    let conn = endpoint
        .connect()
        .await
        .map_err(|e| crate::util::error_chain(&e))?;
    Ok((conn, path))
}

fn json_answer(status: hyper::StatusCode, body: &[u8]) -> Result<Value, String> {
    if body.len() > MAX_ANSWER {
        return Err("answer too large".into());
    }
    let v: Value = serde_json::from_slice(body).map_err(|_| format!("answered {status}, not JSON"))?;
    if !status.is_success() {
        return Err(format!(
            "answered {status}: {}",
            crate::engine::printable(v["error"].as_str().unwrap_or(""))
        ));
    }
    Ok(v)
}

async fn get_json(login: &LoginClient, url: &str) -> Result<Value, String> {
    let fetch = async {
        let (mut conn, path) = connect(login, url).await?;
        conn.get_limited(&path, MAX_ANSWER)
            .await
            .map_err(|e| crate::util::error_chain(&e))
    };
    let (status, body) = tokio::time::timeout(ISSUER_TIMEOUT, fetch)
        .await
        .map_err(|_| "timed out".to_owned())??;
    json_answer(status, &body)
}

async fn post_form(login: &LoginClient, url: &str, form: &str) -> Result<Value, String> {
    let post = async {
        let (mut conn, path) = connect(login, url).await?;
        conn.send_with(
            hyper::Method::POST,
            &path,
            None,
            &[
                ("content-type", "application/x-www-form-urlencoded".to_owned()),
                ("accept", "application/json".to_owned()),
            ],
            Some(bytes::Bytes::from(form.to_owned())),
        )
        .await
        .map_err(|e| crate::util::error_chain(&e))
    };
    let (status, body) = tokio::time::timeout(ISSUER_TIMEOUT, post)
        .await
        .map_err(|_| "timed out".to_owned())??;
    json_answer(status, &body)
}
