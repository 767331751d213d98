//! The approver console in a real headless Chromium, driven over WebDriver:
//! a request made through the API is approved by two approvers in two
//! browser sessions (one signed in with an API token, one through the OIDC
//! authorization-code flow with PKCE against a small identity provider run
//! here), the requester receives the certificate, and the console's
//! cookies, CSRF protection and Content Security Policy hold.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;
#[path = "../support/webdriver.rs"]
mod webdriver;

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use sha2::Digest as _;
use support::{AgentKey, Cluster, Server, csr};

/// A code the identity provider issued: what the sign-in asked for.
struct Grant {
    challenge: String,
    nonce: String,
    redirect_uri: String,
}

/// A minimal OpenID provider on loopback: `/authorize` signs `carol` in at
/// once and sends the browser back with a code; `/token` redeems the code
/// only with the PKCE verifier that matches its challenge.
struct Idp {
    base: String,
    /// Codes redeemed with a verifier that matched.
    pkce_ok: Arc<Mutex<u32>>,
}

fn query_of(s: &str) -> HashMap<String, String> {
    serde_urlencoded::from_str(s).unwrap_or_default()
}

fn respond(stream: &mut std::net::TcpStream, status: &str, headers: &[(&str, String)], body: &str) {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    let _ = stream.write_all(out.as_bytes());
}

impl Idp {
    fn start(signer: Arc<Cluster>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let pkce_ok = Arc::new(Mutex::new(0));
        let grants: Arc<Mutex<HashMap<String, Grant>>> = Arc::default();
        let counter = pkce_ok.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let mut length = 0;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':')
                        && k.eq_ignore_ascii_case("content-length")
                    {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                let (path, query) = target.split_once('?').unwrap_or((&target, ""));
                match path {
                    "/authorize" => {
                        let q = query_of(query);
                        assert_eq!(q["response_type"], "code");
                        assert_eq!(q["client_id"], "castellan");
                        assert_eq!(q["code_challenge_method"], "S256");
                        let code = format!("code-{}", grants.lock().unwrap().len());
                        grants.lock().unwrap().insert(
                            code.clone(),
                            Grant {
                                challenge: q["code_challenge"].clone(),
                                nonce: q["nonce"].clone(),
                                redirect_uri: q["redirect_uri"].clone(),
                            },
                        );
                        let back = format!(
                            "{}?{}",
                            q["redirect_uri"],
                            serde_urlencoded::to_string([
                                ("code", code.as_str()),
                                ("state", q["state"].as_str())
                            ])
                            .unwrap()
                        );
                        respond(&mut stream, "302 Found", &[("Location", back)], "");
                    }
                    "/token" => {
                        let f = query_of(&String::from_utf8_lossy(&body));
                        let grant = grants
                            .lock()
                            .unwrap()
                            .remove(f.get("code").map(String::as_str).unwrap_or(""));
                        let verified = grant.as_ref().is_some_and(|g| {
                            let s256 = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(
                                f.get("code_verifier").cloned().unwrap_or_default(),
                            ));
                            s256 == g.challenge
                                && f.get("redirect_uri") == Some(&g.redirect_uri)
                                && f.get("grant_type").map(String::as_str) == Some("authorization_code")
                        });
                        let json_type = [("Content-Type", "application/json".to_owned())];
                        match grant.filter(|_| verified) {
                            Some(g) => {
                                *counter.lock().unwrap() += 1;
                                let now = support::now();
                                let id_token = signer.sign(&json!({
                                    "iss": "https://idp.example.com", "aud": "castellan", "azp": "castellan",
                                    "sub": "sub-carol", "email": "carol@example.com", "email_verified": true,
                                    "groups": ["sre"], "nonce": g.nonce, "iat": now, "exp": now + 600,
                                }));
                                let answer =
                                    json!({"id_token": id_token, "token_type": "Bearer"}).to_string();
                                respond(&mut stream, "200 OK", &json_type, &answer);
                            }
                            None => respond(
                                &mut stream,
                                "400 Bad Request",
                                &json_type,
                                r#"{"error":"invalid_grant"}"#,
                            ),
                        }
                    }
                    _ => respond(&mut stream, "404 Not Found", &[], ""),
                }
            }
        });
        Self { base, pkce_ok }
    }
}

/// `castellan serve` with an OIDC issuer the console signs in with (and
/// people delegate to agents with), and a Kubernetes trust source for agents.
fn world(tmp: &std::path::Path, idp: &Idp, people: &Cluster, cluster: &Cluster) -> Server {
    std::fs::write(tmp.join("idp.json"), people.jwks().to_string()).unwrap();
    std::fs::write(tmp.join("k8s.json"), cluster.jwks().to_string()).unwrap();
    let config = tmp.join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"
[http]
addr = "127.0.0.1:0"
tls = {{ enabled = false }}
[[trust_sources]]
name = "agents-cluster"
method = "k8s_sat"
issuer = "{cluster}"
audiences = ["castellan"]
jwks_file = "k8s.json"
[[oidc_issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["castellan"]
delegation_audiences = ["castellan-delegation"]
jwks_file = "idp.json"
client_id = "castellan"
authorization_endpoint = "{idp}/authorize"
token_endpoint = "{idp}/token"
"#,
            cluster = cluster.issuer,
            idp = idp.base,
        ),
    )
    .unwrap();
    Server::serve(&config, &tmp.join("data"))
}

const LIVE: Duration = Duration::from_secs(20);

#[test]
fn two_approvers_in_two_browsers_approve_and_the_requester_gets_the_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let people = Arc::new(Cluster::new("https://idp.example.com"));
    let cluster = Cluster::new("https://k8s.agents.example");
    let idp = Idp::start(people.clone());
    let server = world(tmp.path(), &idp, &people, &cluster);
    let alice = server.token("alice", "requester", &[]);
    let sre1 = server.token("sre1", "approver", &["sre"]);

    // The request, through the API.
    let (key, csr_pem) = csr();
    let r = server.post(
        "/api/v1/ephemeral",
        &json!({"csr": csr_pem, "ttl_seconds": 600, "justification": "rotate the payments DB password", "ticket": "INC-1234"}),
        Some(&alice),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.body["request_id"].as_str().unwrap().to_owned();
    let binding = r.body["binding"].as_str().unwrap().to_owned();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let fingerprint = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&spki)));

    let driver = webdriver::Driver::start();
    let console = server.url("/console/");

    // Browser A: an approver with an API token.
    let a = driver.session(&tmp.path().join("profile-a"));
    a.goto(&console);
    let token_box = a.find("#token");
    a.type_into(&token_box, &sre1);
    a.click(&a.find("#sign-in"));
    a.wait_for_text("#signed-in-as", "sre1", LIVE);
    let cookie = a.cookie("castellan_console").expect("the session cookie");
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(
        a.execute("return document.cookie;", vec![]),
        "",
        "the page's script cannot read it"
    );
    let row = format!("#pending tr[data-request-id='{id}']");
    a.click(&a.find(&row));
    // Exactly what will be signed.
    a.wait_for_text("#d-spiffe-id", "spiffe://example.org/user/alice", LIVE);
    assert_eq!(a.text_of("#d-key"), fingerprint);
    assert_eq!(a.text_of("#d-ttl"), "600 s");
    assert_eq!(a.text_of("#d-justification"), "rotate the payments DB password");
    assert_eq!(a.text_of("#d-ticket"), "INC-1234");
    assert_eq!(a.text_of("#binding"), binding);
    assert_eq!(a.text_of("#state"), "pending");
    assert!(
        !a.displayed(&a.try_find("#d-emergency").unwrap()),
        "not break-glass"
    );
    a.type_into(&a.find("#reason"), "matches INC-1234");
    a.click(&a.find("#approve"));
    a.wait_for_text("#votes", "approve by", LIVE);
    assert_eq!(a.text_of("#state"), "pending", "one of two approvals");

    // Browser B: a person signing in through the OIDC provider (PKCE).
    let b = driver.session(&tmp.path().join("profile-b"));
    b.goto(&console);
    b.click(&b.find("a.oidc-login[data-issuer='corp']"));
    b.wait_for_text("#signed-in-as", "carol@example.com", LIVE);
    assert_eq!(
        *idp.pkce_ok.lock().unwrap(),
        1,
        "the code was redeemed with the matching verifier"
    );
    assert!(b.url().ends_with("/console/"), "{}", b.url());
    b.click(&b.find(&row));
    b.wait_for_text("#votes", "approve by user:sre1", LIVE);
    b.type_into(&b.find("#reason"), "second pair of eyes");
    b.click(&b.find("#approve"));
    b.wait_for_text("#state", "issued", LIVE);

    // Browser A sees the result live, without reloading.
    a.wait_for_text("#state", "issued", LIVE);
    assert!(
        a.text_of("#d-issued").contains("serial"),
        "{}",
        a.text_of("#d-issued")
    );
    assert!(!a.displayed(&a.try_find("#vote-form").unwrap()), "no more voting");

    // The requester receives the certificate, for the key it asked with.
    let done = server.get(&format!("/api/v1/ephemeral/{id}"), Some(&alice));
    assert_eq!(done.body["state"], "issued", "{}", done.body);
    let pem = done.body["certificate_pem"].as_str().unwrap();
    let der = support::pem_certs(pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.public_key().raw, spki.as_slice());
    let votes = done.body["approvals"].as_array().unwrap();
    assert_eq!(votes[0]["approver"], "user:sre1");
    assert_eq!(votes[1]["approver"], "oidc:corp:sub-carol");

    // The approvers browse what was issued and the audit trail.
    b.click(&b.find("#tab-certificates"));
    b.wait_for_text("#certificates", done.body["serial"].as_str().unwrap(), LIVE);
    b.click(&b.find("#tab-audit"));
    b.wait_for_text("#audit", "ephemeral.issued", LIVE);

    // An agent's escalated request shows who it acts for, as a chain.
    let delegation = people.sign(&json!({
        "iss": "https://idp.example.com", "aud": "castellan-delegation", "sub": "sub-alice",
        "email": "alice@example.com", "email_verified": true, "iat": support::now(), "exp": support::now() + 600,
    }));
    let agent_key = AgentKey::new();
    let asked = server.post(
        "/api/v1/broker/agent-identities",
        &json!({
            "agent_id": "pay-bot", "method": "k8s_sat", "evidence": cluster.token("agents", "pay-bot"),
            "scopes": ["payments:write"], "audience": ["https://tools.example.com"],
            "public_key_jwk": agent_key.jwk, "delegation": {"subject_token": delegation},
            "task": {"id": "P-1", "purpose": "refund order 77"},
        }),
        None,
    );
    assert_eq!(asked.status, 202, "{}", asked.body);
    let agent_request = asked.body["request_id"].as_str().unwrap().to_owned();
    b.click(&b.find("#tab-pending"));
    b.click(&b.find(&format!("#pending tr[data-request-id='{agent_request}']")));
    b.wait_for_text(
        "#chain",
        "spiffe://example.org/agents-cluster/agent/pay-bot",
        LIVE,
    );
    let chain = b.text_of("#chain").to_lowercase();
    assert!(
        chain.contains("person") && chain.contains("this agent"),
        "{chain}"
    );
    let person = chain.find("sub-alice").expect("the person");
    let agent = chain
        .find("spiffe://example.org/agents-cluster/agent/pay-bot")
        .expect("the agent");
    assert!(person < agent, "the person comes first: {chain}");
    assert_eq!(b.text_of("#d-scopes"), "payments:write");
    assert_eq!(b.text_of("#d-key"), format!("jkt:{}", agent_key.jkt()));
    drop(b);
    drop(a);

    // What the browser enforces is also refused to anyone else.
    let (status, content_type, page) = server.get_text("/console/");
    assert_eq!((status, content_type.as_str()), (200, "text/html; charset=utf-8"));
    assert!(page.contains("<script src=\"/console/app.js\""));
    let headers = ureq::get(&server.url("/console/")).call().unwrap();
    let csp = headers.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    let vote_path = server.url(&format!("/console/api/v1/ephemeral/{agent_request}/approvals"));
    let vote_body = json!({"decision": "approve", "binding": asked.body["binding"]});
    let no_csrf = support::agent()
        .post(&vote_path)
        .header("cookie", format!("castellan_console={sre1}"))
        .send_json(&vote_body)
        .unwrap();
    assert_eq!(no_csrf.status(), 403, "a vote without the CSRF token is refused");
    let csrf = support::agent()
        .get(&server.url("/console/session"))
        .header("cookie", format!("castellan_console={sre1}"))
        .call()
        .unwrap()
        .body_mut()
        .read_json::<Value>()
        .unwrap()["csrf"]
        .as_str()
        .unwrap()
        .to_owned();
    let cross_site = support::agent()
        .post(&vote_path)
        .header("cookie", format!("castellan_console={sre1}"))
        .header("x-csrf-token", &csrf)
        .header("origin", "https://evil.example")
        .send_json(&vote_body)
        .unwrap();
    assert_eq!(cross_site.status(), 403, "a vote from another origin is refused");
    let admin_call = support::agent()
        .post(&server.url("/console/api/v1/tokens"))
        .header("cookie", format!("castellan_console={sre1}"))
        .header("x-csrf-token", &csrf)
        .send_json(json!({"name": "x", "role": "admin"}))
        .unwrap();
    assert_eq!(
        admin_call.status(),
        404,
        "the console forwards only the approver's calls"
    );
    let requester = server.post("/console/session", &json!({"token": alice}), None);
    requester.assert_problem(403, "forbidden");
    // A callback that does not belong to a sign-in started here is refused.
    let forged = support::agent()
        .get(&server.url("/console/oidc/callback?code=code-0&state=forged"))
        .header("cookie", "castellan_console_login=corp~real-state~verifier~nonce")
        .config()
        .max_redirects(0)
        .build()
        .call()
        .unwrap();
    assert_eq!(forged.status(), 303);
    let location = forged.headers()["location"].to_str().unwrap();
    assert!(location.contains("login_error"), "{location}");
    assert!(forged.headers().get("set-cookie").is_some());
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "auth.refused" && e["detail"]["endpoint"] == "console.oidc_callback"),
        "the refused sign-in is audited"
    );
}
