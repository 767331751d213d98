//! `examples/agent` against the real binary: an agent acting for a person
//! calls a tool server that verifies the JWT-SVID offline, its DPoP proof of
//! possession, the scope and the chain; it renews before expiry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Duration;

use castellan_client::{Agent, AgentConfig, Verifier};
use serde_json::json;
use support::{Cluster, Server};

fn serve_castellan(tmp: &std::path::Path, cluster: &Cluster, idp: &Cluster) -> Server {
    std::fs::write(tmp.join("k8s.json"), cluster.jwks().to_string()).unwrap();
    std::fs::write(tmp.join("idp.json"), idp.jwks().to_string()).unwrap();
    let config = tmp.join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n[issuance]\nmin_ttl_seconds = 1\n\
             [[trust_sources]]\nname = \"agents\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\naudiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n\
             [[oidc_issuers]]\nname = \"corp\"\nissuer = \"https://idp.example.com\"\naudiences = [\"castellan\"]\n\
             delegation_audiences = [\"castellan-delegation\"]\njwks_file = \"idp.json\"\n",
            cluster.issuer
        ),
    )
    .unwrap();
    Server::serve(&config, &tmp.join("data"))
}

#[test]
fn the_example_tool_server_checks_token_proof_scope_and_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.example-agents.example");
    let idp = Cluster::new("https://idp.example.com");
    let castellan = serve_castellan(tmp.path(), &cluster, &idp);

    // The tool server, verifying offline against Castellan's discovery.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tool = format!("http://{}", listener.local_addr().unwrap());
    let verifier = Arc::new(Verifier::discover(&castellan.base, &tool).unwrap());
    castellan_example_agent::serve_tools(listener, tool.clone(), verifier.clone());

    // The agent acts for Alice.
    let now = support::now();
    let alice = idp.sign(
        &json!({"iss": "https://idp.example.com", "aud": "castellan-delegation", "sub": "alice-7f3a",
        "email": "alice@example.com", "email_verified": true, "iat": now, "exp": now + 600}),
    );
    let sa_token = cluster.token("agents", "triage-bot");
    let config = AgentConfig {
        castellan_url: castellan.base.clone(),
        agent_id: "triage-bot".into(),
        method: "k8s_sat".into(),
        evidence: Arc::new(move || sa_token.clone()),
        scopes: vec!["tickets:read".into()],
        audience: vec![tool.clone()],
        subject_token: Some(alice),
        task: Some(json!({"id": "T-1", "purpose": "summarise open tickets"})),
        renew_before: Duration::from_secs(60),
    };
    let agent = Agent::new(config.clone()).unwrap();
    let (status, body) =
        castellan_example_agent::call_tool(&agent, "GET", &format!("{tool}/tickets")).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["agent"], "spiffe://example.org/agents/agent/triage-bot");
    assert_eq!(
        body["on_behalf_of"], "alice-7f3a",
        "the person's `sub` at their issuer"
    );

    // Scope not granted: the tool refuses.
    let (status, body) =
        castellan_example_agent::call_tool(&agent, "POST", &format!("{tool}/tickets")).unwrap();
    assert_eq!(status, 403, "{body}");

    // The token alone, without its proof of possession, is refused.
    let id = agent.identity().unwrap();
    let http: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{tool}/tickets");
    let bare = http
        .get(&url)
        .header("authorization", format!("DPoP {}", id.jwt_svid))
        .call()
        .unwrap();
    assert_eq!(bare.status().as_u16(), 401);
    let as_bearer = http
        .get(&url)
        .header("authorization", format!("Bearer {}", id.jwt_svid))
        .call()
        .unwrap();
    assert_eq!(as_bearer.status().as_u16(), 401);
    // A proof made by another key (a thief holding only the token) is refused.
    let thief = Agent::new(config.clone()).unwrap();
    let stolen_proof = thief.dpop_proof("GET", &url, &id.jwt_svid).unwrap();
    let r = http
        .get(&url)
        .header("authorization", format!("DPoP {}", id.jwt_svid))
        .header("dpop", &stolen_proof)
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A genuine proof for another URL, or replayed, is refused.
    let other = agent
        .dpop_proof("GET", &format!("{tool}/admin"), &id.jwt_svid)
        .unwrap();
    let r = http
        .get(&url)
        .header("authorization", format!("DPoP {}", id.jwt_svid))
        .header("dpop", &other)
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let proof = agent.dpop_proof("GET", &url, &id.jwt_svid).unwrap();
    let first = http
        .get(&url)
        .header("authorization", format!("DPoP {}", id.jwt_svid))
        .header("dpop", &proof)
        .call()
        .unwrap();
    assert_eq!(first.status().as_u16(), 200);
    let replay = http
        .get(&url)
        .header("authorization", format!("DPoP {}", id.jwt_svid))
        .header("dpop", &proof)
        .call()
        .unwrap();
    assert_eq!(replay.status().as_u16(), 401);

    // Revocation reaches the offline verifier through the feed.
    let admin = castellan.admin_token.clone();
    castellan.post(
        "/api/v1/broker/revocations",
        &json!({"jti": claims_jti(&id.jwt_svid)}),
        Some(&admin),
    );
    assert_eq!(verifier.refresh_revocations().unwrap(), 1);
    let (status, body) =
        castellan_example_agent::call_tool(&agent, "GET", &format!("{tool}/tickets")).unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("revoked"));

    // Renewal: with less than `renew_before` left, the SDK asks again.
    let mut short = config;
    short.renew_before = Duration::from_secs(3600);
    let renewing = Agent::new(short).unwrap();
    let a = renewing.identity().unwrap();
    let b = renewing.identity().unwrap();
    assert_ne!(
        claims_jti(&a.jwt_svid),
        claims_jti(&b.jwt_svid),
        "renewed because it expires within the hour"
    );
}

fn claims_jti(jwt: &str) -> String {
    use base64::Engine as _;
    let p = jwt.split('.').nth(1).unwrap();
    let c: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(p)
            .unwrap(),
    )
    .unwrap();
    c["jti"].as_str().unwrap().to_owned()
}
