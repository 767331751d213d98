//! A toy tool server for agents: every call must carry a Castellan JWT-SVID
//! and a DPoP proof by the key it is bound to. It verifies offline (JWKS from
//! discovery, polled revocation feed), then checks the scope the tool needs
//! and reports who the agent acts for.
//!
//! Tools: `GET /tickets` needs `tickets:read`; `POST /tickets` needs
//! `tickets:write`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use castellan_client::{Agent, Verifier, VerifyError};
use serde_json::{Value, json};

/// Serves the tools on `listener` (one thread per connection) until the
/// process ends. `base_url` is how callers address this server: DPoP proofs
/// must name it exactly.
pub fn serve_tools(listener: TcpListener, base_url: String, verifier: Arc<Verifier>) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (base, verifier) = (base_url.clone(), verifier.clone());
            std::thread::spawn(move || {
                let _ = handle(stream, &base, &verifier);
            });
        }
    });
}

fn handle(mut stream: std::net::TcpStream, base: &str, verifier: &Verifier) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_owned(),
        parts.next().unwrap_or("/").to_owned(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.trim_end().split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    let header = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let len: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;

    let (status, reply) = answer(
        &method,
        &path,
        base,
        verifier,
        header("authorization"),
        header("dpop"),
    );
    let text = reply.to_string();
    write!(
        stream,
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        text.len()
    )
}

fn answer(
    method: &str,
    path: &str,
    base: &str,
    verifier: &Verifier,
    auth: Option<&str>,
    dpop: Option<&str>,
) -> (&'static str, Value) {
    let needed = match (method, path) {
        ("GET", "/tickets") => "tickets:read",
        ("POST", "/tickets") => "tickets:write",
        _ => return ("404 Not Found", json!({ "error": "no such tool" })),
    };
    let url = format!("{base}{path}");
    let verified = match verifier.verify(method, &url, auth, dpop) {
        Ok(v) => v,
        Err(e) => return ("401 Unauthorized", json!({ "error": e.to_string() })),
    };
    if let Err(e @ VerifyError::Scope(_)) = verified.require_scope(needed) {
        return ("403 Forbidden", json!({ "error": e.to_string() }));
    }
    (
        "200 OK",
        json!({
            "tool": format!("{method} {path}"),
            "agent": verified.spiffe_id,
            "on_behalf_of": verified.on_behalf_of(),
            "act": verified.act,
            "tickets": [{"id": 7, "title": "printer on fire"}],
        }),
    )
}

/// Calls a tool as `agent`; returns the status and JSON body.
pub fn call_tool(agent: &Agent, method: &str, url: &str) -> Result<(u16, Value), String> {
    let [(_, authorization), (_, dpop)] = agent.authorize(method, url).map_err(|e| e.to_string())?;
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = match method {
        "POST" => http
            .post(url)
            .header("authorization", &authorization)
            .header("dpop", &dpop)
            .send(&b"{}"[..]),
        _ => http
            .get(url)
            .header("authorization", &authorization)
            .header("dpop", &dpop)
            .call(),
    }
    .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp.into_body().read_json().map_err(|e| e.to_string())?;
    Ok((status, body))
}
