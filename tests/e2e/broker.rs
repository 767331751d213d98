//! The AI-agent identity broker through the real binary: attested agents get
//! scoped, key-bound JWT-SVIDs naming who they act for; delegation chains
//! are verified, attenuated and revocable.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::{AgentKey, Cluster, Resp, Server, csr, jwt_claims};

const BROKER: &str = "/api/v1/broker/agent-identities";

struct World {
    server: Server,
    cluster: Cluster,
    idp: Cluster,
    /// The keys agents asked with, by thumbprint, to prove them later.
    keys: RefCell<HashMap<String, AgentKey>>,
    _tmp: tempfile::TempDir,
}

/// `castellan serve` on loopback with a Kubernetes trust source for the
/// agents' pods, an OIDC issuer for the people they act for, and a minimum
/// TTL of one second so expiry can be tested.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.agents.example");
    let idp = Cluster::new("https://idp.example.com");
    std::fs::write(tmp.path().join("k8s.json"), cluster.jwks().to_string()).unwrap();
    std::fs::write(tmp.path().join("idp.json"), idp.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"
[http]
addr = "127.0.0.1:0"
tls = {{ enabled = false }}
[issuance]
min_ttl_seconds = 1
[[trust_sources]]
name = "agents-cluster"
method = "k8s_sat"
issuer = "{}"
audiences = ["castellan"]
jwks_file = "k8s.json"
[[oidc_issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["castellan"]
delegation_audiences = ["castellan-delegation"]
jwks_file = "idp.json"
"#,
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    World {
        server,
        cluster,
        idp,
        keys: RefCell::default(),
        _tmp: tmp,
    }
}

impl World {
    /// A person's ID token for delegating to an agent.
    fn person(&self, email: &str) -> String {
        let now = support::now();
        self.idp.sign(&json!({
            "iss": "https://idp.example.com", "aud": "castellan-delegation", "sub": format!("sub-{email}"),
            "email": email, "email_verified": true, "iat": now, "exp": now + 600,
        }))
    }

    /// Asks the broker as `agent`, with a fresh key unless `extra` names
    /// one, for the tools and for this Castellan (so the identity can
    /// delegate). Delegating with a parent's token proves the parent's key.
    fn ask(&self, agent: &str, scopes: &[&str], extra: Value) -> Resp {
        let mut body = json!({
            "agent_id": agent, "method": "k8s_sat", "evidence": self.cluster.token("agents", agent),
            "scopes": scopes, "audience": ["https://tools.example.com", self.server.base],
        });
        if extra.get("public_key_jwk").is_none() {
            let key = AgentKey::new();
            body["public_key_jwk"] = key.jwk.clone();
            self.keys.borrow_mut().insert(key.jkt(), key);
        }
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let mut proof = None;
        if let Some(parent) = body.pointer("/delegation/subject_token").and_then(Value::as_str) {
            let c = jwt_claims(parent);
            if c["iss"] == self.server.base.as_str()
                && let Some(key) = c["cnf"]["jkt"].as_str().and_then(|j| {
                    self.keys
                        .borrow()
                        .get(j)
                        .map(|k| k.proof(&self.server.url(BROKER), Some(parent)))
                })
            {
                proof = Some(key);
            }
        }
        match proof {
            Some(p) => self.server.post_with(BROKER, &body, None, &[("dpop", &p)]),
            None => self.server.post(BROKER, &body, None),
        }
    }
}

fn claims(jwt: &str) -> Value {
    jwt_claims(jwt)
}

/// Verifies a JWT-SVID offline the way a relying party would: discovery, then
/// the JWKS it names, then the signature by `kid`.
fn verify_offline(server: &Server, jwt: &str) -> Value {
    let discovery = server.get("/.well-known/openid-configuration", None).body;
    let jwks_path = discovery["jwks_uri"]
        .as_str()
        .unwrap()
        .trim_start_matches(&server.base)
        .to_owned();
    let jwks = server.get(&jwks_path, None).body;
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    let kid = header.kid.expect("every JWT-SVID has a kid");
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("kid in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(&serde_json::from_value(jwk.clone()).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["https://tools.example.com"]);
    v.set_issuer(&[discovery["issuer"].as_str().unwrap()]);
    jsonwebtoken::decode::<Value>(jwt, &key, &v)
        .expect("valid JWT-SVID")
        .claims
}

#[test]
fn an_attested_agent_gets_a_scoped_key_bound_jwt_svid() {
    let w = world();
    let agent_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = agent_key.public_key_raw();
    let jwk = json!({"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
    let r = w.ask(
        "triage-bot",
        &["tickets:read", "root:all"],
        json!({"ttl_seconds": 3600, "public_key_jwk": jwk, "task": {"id": "T-42", "purpose": "triage the queue"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        "spiffe://example.org/agents-cluster/agent/triage-bot"
    );
    assert_eq!(
        r.body["scopes"],
        json!(["tickets:read"]),
        "attenuated to what policy allows"
    );
    let c = verify_offline(&w.server, r.body["jwt_svid"].as_str().unwrap());
    assert_eq!(c["sub"], "spiffe://example.org/agents-cluster/agent/triage-bot");
    assert_eq!(c["aud"], json!(["https://tools.example.com", w.server.base]));
    assert_eq!(c["scope"], "tickets:read");
    assert_eq!(c["task"]["id"], "T-42");
    assert!(c["jti"].as_str().is_some() && c["iat"].as_i64().is_some());
    let lifetime = c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 900, "capped by the policy's max_ttl_seconds");
    // RFC 7638 thumbprint of the agent's key, computed here independently.
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        jwk["x"].as_str().unwrap(),
        jwk["y"].as_str().unwrap()
    );
    let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
    assert_eq!(c["cnf"]["jkt"], URL_SAFE_NO_PAD.encode(digest.as_ref()));
    assert!(c.get("act").is_none(), "nobody delegated");
    let audit = w.server.audit();
    let e = audit.iter().find(|e| e["kind"] == "broker.issued").unwrap();
    assert_eq!(
        e["detail"]["scopes_requested"],
        json!(["tickets:read", "root:all"])
    );
    assert_eq!(e["detail"]["scopes_granted"], json!(["tickets:read"]));

    // With a CSR, an X.509-SVID bound to that key comes too.
    let (key, c) = csr();
    let r = w.ask("triage-bot", &["docs:read"], json!({"csr": c}));
    assert_eq!(r.status, 201, "{}", r.body);
    let chain = support::pem_certs(r.body["chain_pem"].as_str().unwrap()).concat();
    let svid = spiffe::X509Svid::parse_from_der(&chain, &key.serialize_der()).unwrap();
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/agents-cluster/agent/triage-bot"
    );
}

#[test]
fn policy_refuses_impostors_and_other_namespaces() {
    let w = world();
    // A pod in `agents` claiming another agent's id.
    let body = json!({
        "agent_id": "admin-bot", "method": "k8s_sat", "evidence": w.cluster.token("agents", "triage-bot"),
        "scopes": ["tickets:read"], "audience": ["x"],
    });
    let r = w.server.post(BROKER, &body, None);
    r.assert_problem(403, "policy-denied");
    let mut other = body.clone();
    other["agent_id"] = "web".into();
    other["evidence"] = w.cluster.token("default", "web").into();
    w.server
        .post(BROKER, &other, None)
        .assert_problem(403, "policy-denied");
    w.ask("bot", &["root:all"], json!({}))
        .assert_problem(403, "policy-denied");
    w.ask("bot", &["tickets:read"], json!({"audience": []}))
        .assert_problem(400, "malformed-request");
    let mut private = json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA"});
    w.ask(
        "bot",
        &["tickets:read"],
        json!({"public_key_jwk": private.take()}),
    )
    .assert_problem(400, "malformed-request");
    assert!(
        w.server
            .audit()
            .iter()
            .filter(|e| e["kind"] == "broker.refused")
            .count()
            >= 5
    );
}

#[test]
fn delegation_chains_name_the_person_and_parents_and_attenuate() {
    let w = world();
    let alice = w.person("alice@example.com");
    let parent = w.ask(
        "planner",
        &["tickets:read", "tickets:write", "docs:read"],
        json!({"delegation": {"subject_token": alice}}),
    );
    assert_eq!(parent.status, 201, "{}", parent.body);
    assert_eq!(
        parent.body["delegation_chain"],
        json!([{"kind": "person", "sub": "sub-alice@example.com", "iss": "https://idp.example.com"}])
    );
    let parent_jwt = parent.body["jwt_svid"].as_str().unwrap().to_owned();
    assert_eq!(
        claims(&parent_jwt)["act"],
        json!({"sub": "sub-alice@example.com", "iss": "https://idp.example.com"})
    );

    // The child asks for more than the parent holds and longer than it lives.
    let child = w.ask(
        "writer",
        &["tickets:write", "docs:read", "payments:write"],
        json!({"ttl_seconds": 3600, "delegation": {"subject_token": parent_jwt}}),
    );
    assert_eq!(child.status, 201, "{}", child.body);
    assert_eq!(
        child.body["scopes"],
        json!(["docs:read", "tickets:write"]),
        "⊆ parent's scopes"
    );
    let c = verify_offline(&w.server, child.body["jwt_svid"].as_str().unwrap());
    assert!(
        c["exp"].as_i64().unwrap() <= claims(&parent_jwt)["exp"].as_i64().unwrap(),
        "never outlives the parent"
    );
    // RFC 8693 §4.1: the current actor (the parent agent) outermost, the
    // person it acted for nested inside.
    assert_eq!(
        c["act"],
        json!({"sub": "spiffe://example.org/agents-cluster/agent/planner", "act": {"sub": "sub-alice@example.com", "iss": "https://idp.example.com"}})
    );
}

#[test]
fn chain_verification_refuses_tampered_expired_revoked_and_too_deep_parents() {
    let w = world();
    let alice = w.person("alice@example.com");
    let parent = w
        .ask(
            "planner",
            &["tickets:read"],
            json!({"delegation": {"subject_token": alice}}),
        )
        .body;
    let parent_jwt = parent["jwt_svid"].as_str().unwrap().to_owned();

    // Tampered: widen the scope in the payload, keep the signature.
    let mut parts: Vec<String> = parent_jwt.split('.').map(str::to_owned).collect();
    let mut c = claims(&parent_jwt);
    c["scope"] = "tickets:read payments:write".into();
    parts[1] = URL_SAFE_NO_PAD.encode(c.to_string());
    let tampered = parts.join(".");
    w.ask(
        "child",
        &["tickets:read"],
        json!({"delegation": {"subject_token": tampered}}),
    )
    .assert_problem(403, "delegation-refused");

    // Expired: a one-second parent.
    let short = w
        .ask(
            "blink",
            &["tickets:read"],
            json!({"ttl_seconds": 1, "delegation": {"subject_token": alice}}),
        )
        .body;
    std::thread::sleep(Duration::from_millis(2100));
    let r = w.ask(
        "child",
        &["tickets:read"],
        json!({"delegation": {"subject_token": short["jwt_svid"]}}),
    );
    r.assert_problem(403, "delegation-refused");
    assert!(
        r.body["detail"].as_str().unwrap().contains("expired"),
        "{}",
        r.body
    );

    // Too deep: planner (depth 0) → a (1) → b (2) → c (3 reaches the limit of 3).
    let mut token = parent_jwt.clone();
    for (i, name) in ["a", "b"].iter().enumerate() {
        let r = w.ask(
            name,
            &["tickets:read"],
            json!({"delegation": {"subject_token": token}}),
        );
        assert_eq!(r.status, 201, "hop {i}: {}", r.body);
        token = r.body["jwt_svid"].as_str().unwrap().to_owned();
    }
    let r = w.ask(
        "c",
        &["tickets:read"],
        json!({"delegation": {"subject_token": token}}),
    );
    r.assert_problem(403, "policy-denied");
    assert!(r.body["detail"].as_str().unwrap().contains("depth"), "{}", r.body);

    // Revoked: revoke the planner; its token no longer delegates.
    let admin = w.server.admin_token.clone();
    let rv = w.server.post(
        "/api/v1/broker/revocations",
        &json!({"agent_id": "planner"}),
        Some(&admin),
    );
    assert_eq!(rv.status, 200, "{}", rv.body);
    let r = w.ask(
        "child",
        &["tickets:read"],
        json!({"delegation": {"subject_token": parent_jwt}}),
    );
    r.assert_problem(403, "delegation-refused");
    assert!(
        r.body["detail"].as_str().unwrap().contains("revoked"),
        "{}",
        r.body
    );
    // A person's token from an unknown issuer is refused too.
    let stranger = Cluster::new("https://evil.example").sign(&json!({"iss": "https://evil.example", "aud": "castellan", "email": "x@y", "exp": support::now() + 60}));
    w.ask(
        "child",
        &["tickets:read"],
        json!({"delegation": {"subject_token": stranger}}),
    )
    .assert_problem(403, "delegation-refused");
}

#[test]
fn revocation_cascades_to_descendants_for_introspection_and_the_feed() {
    let w = world();
    let alice = w.person("alice@example.com");
    let parent = w
        .ask(
            "planner",
            &["tickets:read"],
            json!({"delegation": {"subject_token": alice}}),
        )
        .body;
    let child = w
        .ask(
            "worker",
            &["tickets:read"],
            json!({"delegation": {"subject_token": parent["jwt_svid"]}}),
        )
        .body;
    let grandchild = w
        .ask(
            "helper",
            &["tickets:read"],
            json!({"delegation": {"subject_token": child["jwt_svid"]}, "task": {"id": "T-9"}}),
        )
        .body;
    let bystander = w.ask("other", &["tickets:read"], json!({})).body;
    let rs = w.server.token("tool-server", "requester", &[]);
    let introspect = |t: &Value| {
        w.server
            .post_form("/oauth2/introspect", &[("token", t.as_str().unwrap())], Some(&rs))
    };

    let live = introspect(&child["jwt_svid"]);
    assert_eq!(live.body["active"], true, "{}", live.body);
    assert_eq!(
        live.body["sub"],
        "spiffe://example.org/agents-cluster/agent/worker"
    );
    assert_eq!(live.body["scope"], "tickets:read");
    assert_eq!(
        live.body["act"]["sub"],
        "spiffe://example.org/agents-cluster/agent/planner"
    );
    assert_eq!(live.body["act"]["act"]["sub"], "sub-alice@example.com");
    assert_eq!(
        w.server
            .post_form("/oauth2/introspect", &[("token", "x")], None)
            .status,
        401
    );

    let admin = w.server.admin_token.clone();
    let rv = w.server.post(
        "/api/v1/broker/revocations",
        &json!({"jti": parent["jti"]}),
        Some(&admin),
    );
    assert_eq!(rv.body["revoked"].as_array().unwrap().len(), 3, "{}", rv.body);
    for t in [&parent, &child, &grandchild] {
        assert_eq!(introspect(&t["jwt_svid"]).body, json!({"active": false}));
    }
    assert_eq!(introspect(&bystander["jwt_svid"]).body["active"], true);
    let feed = w.server.get("/api/v1/broker/revocations", None).body;
    let jtis: Vec<&str> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["jti"].as_str().unwrap())
        .collect();
    for t in [&parent, &child, &grandchild] {
        assert!(jtis.contains(&t["jti"].as_str().unwrap()));
    }
    // By task id.
    let tasked = w
        .ask("x", &["tickets:read"], json!({"task": {"id": "T-77"}}))
        .body;
    w.server.post(
        "/api/v1/broker/revocations",
        &json!({"task_id": "T-77"}),
        Some(&admin),
    );
    assert_eq!(introspect(&tasked["jwt_svid"]).body["active"], false);
    w.server
        .post(
            "/api/v1/broker/revocations",
            &json!({"jti": "a", "agent_id": "b"}),
            Some(&admin),
        )
        .assert_problem(400, "malformed-request");
    w.server
        .post("/api/v1/broker/revocations", &json!({"jti": "a"}), None)
        .assert_problem(401, "unauthorized");
    assert!(w.server.audit().iter().any(|e| e["kind"] == "broker.revoked"));
}

#[test]
fn scopes_that_need_approval_escalate_and_issue_after_it() {
    let w = world();
    let sre = w.server.token("sre1", "approver", &["sre"]);
    let r = w.ask(
        "pay-bot",
        &["payments:write", "tickets:read"],
        json!({"task": {"id": "P-1", "purpose": "refund order 77"}}),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["state"], "pending");
    assert_eq!(
        r.body["agent"]["scopes"],
        json!(["payments:write", "tickets:read"])
    );
    let id = r.body["request_id"].as_str().unwrap().to_owned();
    let vote = w.server.post(
        &format!("/api/v1/ephemeral/{id}/approvals"),
        &json!({"decision": "approve", "binding": r.body["binding"]}),
        Some(&sre),
    );
    assert_eq!(vote.body["state"], "approved", "{}", vote.body);
    assert!(
        vote.body.get("jwt_svid").is_none(),
        "the approver never sees the token"
    );
    // The agent collects it with a proof of the key it asked with.
    let path = format!("/api/v1/ephemeral/{id}/collect");
    let keys = w.keys.borrow();
    let key = keys.values().next().unwrap();
    let collected = w.server.post_with(
        &path,
        &json!({}),
        None,
        &[("dpop", &key.proof(&w.server.url(&path), None))],
    );
    assert_eq!(collected.status, 201, "{}", collected.body);
    let jwt = collected.body["jwt_svid"].as_str().unwrap();
    let c = verify_offline(&w.server, jwt);
    assert_eq!(c["scope"], "payments:write tickets:read");
    assert_eq!(c["sub"], "spiffe://example.org/agents-cluster/agent/pay-bot");
    assert_eq!(c["task"]["purpose"], "refund order 77");
}

#[test]
fn rfc_8693_token_exchange_and_discovery() {
    let w = world();
    let alice = w.person("alice@example.com");
    let form = |subject: &str, actor: &str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_owned(),
            ),
            ("subject_token", subject.to_owned()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token".to_owned(),
            ),
            ("actor_token", actor.to_owned()),
            (
                "actor_token_type",
                "urn:ietf:params:oauth:token-type:jwt".to_owned(),
            ),
            ("audience", "https://tools.example.com".to_owned()),
            ("scope", "tickets:read docs:read".to_owned()),
        ]
    };
    // RFC 9449 at the token endpoint: the proof's key is the one the token
    // is bound to.
    let key = AgentKey::new();
    let url = w.server.url("/oauth2/token");
    let post = |f: &[(&str, String)]| {
        let pairs: Vec<(&str, &str)> = f.iter().map(|(k, v)| (*k, v.as_str())).collect();
        w.server
            .post_form_with("/oauth2/token", &pairs, None, &[("dpop", &key.proof(&url, None))])
    };
    let r = post(&form(&alice, &w.cluster.token("agents", "mcp-client")));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(r.body["token_type"], "DPoP");
    assert_eq!(r.body["scope"], "docs:read tickets:read");
    assert!(r.body["expires_in"].as_u64().unwrap() <= 900);
    let c = verify_offline(&w.server, r.body["access_token"].as_str().unwrap());
    assert_eq!(c["sub"], "spiffe://example.org/agents-cluster/agent/mcp-client");
    assert_eq!(c["cnf"]["jkt"], key.jkt());
    assert_eq!(c["act"]["sub"], "sub-alice@example.com");

    // RFC 6749 error shapes for standard clients.
    let mut bad = form(&alice, "not-a-jwt");
    let r = post(&bad);
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{}",
        r.body
    );
    bad[0].1 = "client_credentials".into();
    assert_eq!(post(&bad).body["error"], "unsupported_grant_type");
    let no_aud: Vec<_> = form(&alice, "x")
        .into_iter()
        .filter(|(k, _)| *k != "audience")
        .collect();
    assert_eq!(post(&no_aud).body["error"], "invalid_target");

    let d = w.server.get("/.well-known/openid-configuration", None).body;
    assert_eq!(d["issuer"], w.server.base.as_str());
    assert_eq!(d["token_endpoint"], format!("{}/oauth2/token", w.server.base));
    assert_eq!(c["iss"], d["issuer"]);
    let jwks = w.server.get("/.well-known/jwks.json", None).body;
    assert!(jwks["keys"][0].get("d").is_none());
}

/// `castellan agent …` against the world's server, as the admin.
fn agent_cli(w: &World, args: &[&str]) -> String {
    let out = support::castellan()
        .arg("agent")
        .args(args)
        .args(["--addr", &w.server.base, "--token", &w.server.admin_token])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_agent_cli_lists_who_acts_for_whom_and_revokes() {
    let w = world();
    let alice = w.person("alice@example.com");
    let parent = w
        .ask(
            "planner",
            &["tickets:read"],
            json!({"delegation": {"subject_token": alice}}),
        )
        .body;
    let child = w
        .ask(
            "worker",
            &["tickets:read"],
            json!({"delegation": {"subject_token": parent["jwt_svid"]}}),
        )
        .body;
    w.ask("other", &["tickets:read"], json!({}));

    let table = agent_cli(&w, &["list"]);
    let worker_row = table
        .lines()
        .find(|l| l.contains("worker"))
        .expect("the worker's row");
    assert!(worker_row.contains("live"), "{table}");
    assert!(
        worker_row.contains("spiffe://example.org/agents-cluster/agent/planner")
            && worker_row.contains("sub-alice@example.com"),
        "the row names who it acts for: {table}"
    );
    let listed: Value =
        serde_json::from_str(&agent_cli(&w, &["list", "--agent-id", "worker", "--json"])).unwrap();
    let items = listed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{listed}");
    assert_eq!(items[0]["jti"], child["jti"]);

    // Revoking the planner revokes what was delegated from it.
    let out = agent_cli(&w, &["revoke", "--agent-id", "planner"]);
    assert!(out.starts_with("revoked 2 token(s)"), "{out}");
    let listed: Value = serde_json::from_str(&agent_cli(&w, &["list", "--json"])).unwrap();
    let state_of = |agent: &str| {
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["agent_id"] == agent)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of("planner"), "revoked");
    assert_eq!(state_of("worker"), "revoked");
    assert_eq!(state_of("other"), "live");
    // One selector at a time, and only for admins.
    let out = support::castellan()
        .args([
            "agent",
            "revoke",
            "--agent-id",
            "a",
            "--jti",
            "b",
            "--addr",
            &w.server.base,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    w.server
        .get("/api/v1/broker/agents", None)
        .assert_problem(401, "unauthorized");
}
