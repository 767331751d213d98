//! The outside review's attacks, each performed through the real binary and
//! refused (issue 13). A test here names the review's item it replays.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{AgentKey, Cluster, Resp, Server, castellan, csr, jwt_claims, serve_refused};

const BROKER: &str = "/api/v1/broker/agent-identities";
const EPHEMERAL: &str = "/api/v1/ephemeral";
const IDP: &str = "https://idp.example.com";

struct World {
    server: Server,
    cluster: Cluster,
    idp: Cluster,
    tmp: tempfile::TempDir,
}

/// `[[oidc_issuers]]` with distinct audiences for approver logins and for
/// delegation, as the README tells operators to configure it.
const OIDC: &str = r#"[[oidc_issuers]]
name = "corp"
issuer = "https://idp.example.com"
audiences = ["castellan"]
delegation_audiences = ["castellan-delegation"]
jwks_file = "idp.json"
"#;

/// `castellan serve` on loopback: a Kubernetes trust source for agents' and
/// workloads' pods, and the company IdP.
fn world() -> World {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.attacks.example");
    let idp = Cluster::new(IDP);
    std::fs::write(tmp.path().join("k8s.json"), cluster.jwks().to_string()).unwrap();
    std::fs::write(tmp.path().join("idp.json"), idp.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [issuance]\nmin_ttl_seconds = 1\n\
             [[trust_sources]]\nname = \"agents\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\n\
             audiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n{OIDC}",
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    World {
        server,
        cluster,
        idp,
        tmp,
    }
}

impl World {
    /// An ID token from the IdP for `sub`, with this audience and groups.
    fn id_token(&self, sub: &str, aud: &str, groups: &[&str]) -> String {
        let now = support::now();
        self.idp.sign(&json!({
            "iss": IDP, "aud": aud, "sub": sub, "email": format!("{sub}@example.com"),
            "email_verified": true, "groups": groups, "iat": now, "exp": now + 600,
        }))
    }

    /// An approver's login.
    fn login(&self, sub: &str, groups: &[&str]) -> String {
        self.id_token(sub, "castellan", groups)
    }

    /// What a person hands an agent to act for them.
    fn delegation(&self, sub: &str) -> String {
        self.id_token(sub, "castellan-delegation", &["sre"])
    }

    /// The broker request of agent `agent`, bound to `key`.
    fn agent_body(&self, agent: &str, scopes: &[&str], key: &AgentKey) -> Value {
        json!({
            "agent_id": agent, "method": "k8s_sat", "evidence": self.cluster.token("agents", agent),
            "scopes": scopes, "audience": ["https://tools.example.com", self.server.base],
            "public_key_jwk": key.jwk,
        })
    }

    fn ask(&self, agent: &str, scopes: &[&str], key: &AgentKey, subject: Option<&str>) -> Resp {
        let mut body = self.agent_body(agent, scopes, key);
        if let Some(s) = subject {
            body["delegation"] = json!({ "subject_token": s });
        }
        self.server.post(BROKER, &body, None)
    }

    /// Asks with a parent agent's token, proving the parent's key.
    fn ask_as_child(
        &self,
        agent: &str,
        scopes: &[&str],
        key: &AgentKey,
        parent: &str,
        parent_key: &AgentKey,
    ) -> Resp {
        let mut body = self.agent_body(agent, scopes, key);
        body["delegation"] = json!({ "subject_token": parent });
        let proof = parent_key.proof(&self.server.url(BROKER), Some(parent));
        self.server.post_with(BROKER, &body, None, &[("dpop", &proof)])
    }

    fn vote(&self, credential: &str, request: &Value) -> Resp {
        let id = request["request_id"].as_str().unwrap();
        self.server.post(
            &format!("{EPHEMERAL}/{id}/approvals"),
            &json!({"decision": "approve", "binding": request["binding"]}),
            Some(credential),
        )
    }

    fn collect(&self, request: &Value, key: &AgentKey) -> Resp {
        let path = format!("{EPHEMERAL}/{}/collect", request["request_id"].as_str().unwrap());
        let proof = key.proof(&self.server.url(&path), None);
        self.server
            .post_with(&path, &json!({}), None, &[("dpop", &proof)])
    }

    fn revoke(&self, filter: Value) -> Resp {
        let admin = self.server.admin_token.clone();
        self.server
            .post("/api/v1/broker/revocations", &filter, Some(&admin))
    }

    /// Creates an API token through the admin API; returns (secret, record).
    fn token(&self, body: Value) -> (String, Value) {
        let r = self.server.post_admin("/api/v1/tokens", &body);
        assert_eq!(r.status, 201, "{}", r.body);
        (r.body["token"].as_str().unwrap().to_owned(), r.body)
    }

    fn ephemeral(&self, token: &str) -> Resp {
        let (_, c) = csr();
        self.server.post(
            EPHEMERAL,
            &json!({"csr": c, "justification": "incident 42", "ttl_seconds": 600}),
            Some(token),
        )
    }
}

/// Review item 1: an agent holding its person's delegation token votes on
/// its own escalation. The token is no login, and nobody named in the
/// delegation chain may vote, through any of their credentials.
#[test]
fn an_agent_cannot_approve_its_own_escalation() {
    let w = world();
    let key = AgentKey::new();
    let alice = w.delegation("alice");
    let r = w.ask("pay-bot", &["payments:write"], &key, Some(&alice));
    assert_eq!(r.status, 202, "{}", r.body);
    let request = r.body;

    // The delegation token is not an approver login.
    w.vote(&alice, &request).assert_problem(401, "unauthorized");
    // Alice's own login, and her API token linked to that login, are
    // self-approval by delegation.
    let login = w.login("alice", &["sre"]);
    w.vote(&login, &request).assert_problem(403, "self-approval");
    let (alice_token, _) = w.token(json!({"name": "alice", "role": "approver", "groups": ["sre"],
        "oidc": {"issuer": "corp", "subject": "alice"}}));
    w.vote(&alice_token, &request)
        .assert_problem(403, "self-approval");
    let state = w.server.get(
        &format!("{EPHEMERAL}/{}", request["request_id"].as_str().unwrap()),
        None,
    );
    assert_eq!(state.body["state"], "pending");
    assert_eq!(state.body["approvals"], json!([]));

    // Someone else approves.
    let (bob, _) = w.token(json!({"name": "bob", "role": "approver", "groups": ["sre"]}));
    assert_eq!(w.vote(&bob, &request).body["state"], "approved");
    let refused = w
        .server
        .audit()
        .into_iter()
        .filter(|e| e["kind"] == "ephemeral.refused")
        .count();
    assert!(refused >= 2, "the refused votes are audited");

    // One audience for both purposes is refused at start, naming the keys.
    let bad = w.tmp.path().join("shared-audience.toml");
    std::fs::write(
        &bad,
        OIDC.replace("castellan-delegation", "castellan")
            .replace("idp.json", &w.tmp.path().join("idp.json").display().to_string())
            + "data_dir = \"bad-data\"\n",
    )
    .unwrap();
    let stderr = serve_refused(&bad);
    assert!(stderr.contains("delegation_audiences"), "{stderr}");
}

/// Review item 2: one person through an API token and an OIDC login is one
/// voter; a person's login cannot approve their own token's request; an
/// unlinked login is never taken for a token's holder.
#[test]
fn one_person_is_one_vote_whatever_the_credential() {
    let w = world();
    let (rita, _) = w.token(json!({"name": "rita", "role": "requester"}));
    let (bob, _) = w.token(json!({"name": "bob", "role": "approver", "groups": ["sre"],
        "oidc": {"issuer": "corp", "subject": "bob-7f3a"}}));
    let bob_login = w.login("bob-7f3a", &["sre"]);

    // 2 of sre: bob's token, then bob's login, is still one approval.
    let request = w.ephemeral(&rita).body;
    assert_eq!(request["state"], "pending", "{request}");
    assert_eq!(w.vote(&bob, &request).body["state"], "pending");
    let again = w.vote(&bob_login, &request);
    assert_eq!(again.body["state"], "pending", "{}", again.body);
    assert_eq!(again.body["approvals"].as_array().unwrap().len(), 1);
    // An unlinked login whose `sub` is "bob" is someone else, in its own
    // namespace: it neither is bob nor passes for him.
    let other_bob = w.login("bob", &["sre"]);
    let done = w.vote(&other_bob, &request);
    assert_eq!(done.body["state"], "issued", "{}", done.body);
    let approvers: Vec<&str> = done.body["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["approver"].as_str().unwrap())
        .collect();
    assert_eq!(approvers, ["user:bob", "oidc:corp:bob"]);

    // Bob's login cannot approve the request bob made with his token.
    let own = w.ephemeral(&bob).body;
    w.vote(&bob_login, &own).assert_problem(403, "self-approval");

    // Links name a configured issuer, and one identity links one token.
    let r = w.server.post_admin(
        "/api/v1/tokens",
        &json!({"name": "eve", "role": "approver",
        "oidc": {"issuer": "elsewhere", "subject": "x"}}),
    );
    r.assert_problem(422, "invalid-token-request");
    let r = w.server.post_admin(
        "/api/v1/tokens",
        &json!({"name": "bob2", "role": "approver",
        "oidc": {"issuer": "corp", "subject": "bob-7f3a"}}),
    );
    r.assert_problem(409, "oidc-identity-linked");

    // An email is a name only when verified: an unverified one falls back
    // to `sub`, and the identity lives in the issuer's namespace.
    let now = support::now();
    let unverified = w
        .idp
        .sign(&json!({"iss": IDP, "aud": "castellan", "sub": "mallory",
        "email": "rita@example.com", "email_verified": false, "iat": now, "exp": now + 600}));
    let (_, c) = csr();
    let r = w.server.post(
        EPHEMERAL,
        &json!({"csr": c, "justification": "x", "ttl_seconds": 600}),
        Some(&unverified),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/oidc/corp/mallory");
    assert_eq!(r.body["requester"]["name"], "mallory");
}

/// Review item 4: the JWT-SVID minted after an approved escalation is in no
/// view, list, webhook or store; only the key that asked collects it; and a
/// leaked parent token does not delegate without the parent's key.
#[test]
fn agent_tokens_reach_only_the_key_that_asked() {
    let w = world();
    let key = AgentKey::new();
    let request = w.ask("pay-bot", &["payments:write"], &key, None).body;
    let (sre, _) = w.token(json!({"name": "sre1", "role": "approver", "groups": ["sre"]}));
    let approved = w.vote(&sre, &request);
    assert_eq!(approved.body["state"], "approved", "{}", approved.body);
    assert!(!approved.body.to_string().contains("jwt"));

    // Nobody but the key's holder collects it.
    let thief = AgentKey::new();
    w.collect(&request, &thief)
        .assert_problem(401, "invalid-dpop-proof");
    let path = format!("{EPHEMERAL}/{}/collect", request["request_id"].as_str().unwrap());
    w.server
        .post(&path, &json!({}), None)
        .assert_problem(401, "invalid-dpop-proof");
    let got = w.collect(&request, &key);
    assert_eq!(got.status, 201, "{}", got.body);
    let jwt = got.body["jwt_svid"].as_str().unwrap().to_owned();
    assert_eq!(jwt_claims(&jwt)["cnf"]["jkt"], key.jkt());
    w.collect(&request, &key)
        .assert_problem(409, "request-not-pending");

    // It is nowhere to be read again.
    let id = request["request_id"].as_str().unwrap();
    let view = w.server.get(&format!("{EPHEMERAL}/{id}"), None);
    assert_eq!(view.body["state"], "issued");
    let listed = w.server.get(EPHEMERAL, Some(&sre));
    for text in [
        view.body.to_string(),
        listed.body.to_string(),
        w.server.audit_text(),
    ] {
        assert!(!text.contains(&jwt));
    }
    assert!(
        !w.server.store_bytes_contain(jwt.as_bytes()),
        "the JWT-SVID is never stored"
    );

    // A leaked parent token: without the parent's key it does not delegate.
    let parent_key = AgentKey::new();
    let parent = w.ask(
        "planner",
        &["tickets:read"],
        &parent_key,
        Some(&w.delegation("alice")),
    );
    let parent = parent.body["jwt_svid"].as_str().unwrap().to_owned();
    let child_key = AgentKey::new();
    let mut body = w.agent_body("thief", &["tickets:read"], &child_key);
    body["delegation"] = json!({"subject_token": parent});
    let r = w.server.post(BROKER, &body, None);
    r.assert_problem(403, "delegation-refused");
    assert!(r.body["detail"].as_str().unwrap().contains("DPoP"), "{}", r.body);
    w.ask_as_child("thief", &["tickets:read"], &child_key, &parent, &child_key)
        .assert_problem(403, "delegation-refused");
    // A proof for another URL or a replayed one does not count either.
    let elsewhere = parent_key.proof(&w.server.url("/oauth2/token"), Some(&parent));
    w.server
        .post_with(BROKER, &body, None, &[("dpop", &elsewhere)])
        .assert_problem(401, "invalid-dpop-proof");
    let proof = parent_key.proof(&w.server.url(BROKER), Some(&parent));
    assert_eq!(
        w.server
            .post_with(BROKER, &body, None, &[("dpop", &proof)])
            .status,
        201
    );
    w.server
        .post_with(BROKER, &body, None, &[("dpop", &proof)])
        .assert_problem(401, "invalid-dpop-proof");
    // A parent token not meant for this Castellan does not delegate.
    let mut narrow = w.agent_body("narrow", &["tickets:read"], &parent_key);
    narrow["audience"] = json!(["https://tools.example.com"]);
    narrow["delegation"] = json!({"subject_token": w.delegation("alice")});
    let narrow = w.server.post(BROKER, &narrow, None).body["jwt_svid"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = w.ask_as_child("child", &["tickets:read"], &child_key, &narrow, &parent_key);
    r.assert_problem(403, "delegation-refused");
    assert!(
        r.body["detail"].as_str().unwrap().contains("audience"),
        "{}",
        r.body
    );
}

/// Review item 5: revoking a parent (by `jti`, `agent_id` or `task_id`)
/// cancels the escalated children waiting on it, pending or approved.
#[test]
fn a_revoked_parent_has_no_pending_children() {
    let w = world();
    let (sre, _) = w.token(json!({"name": "sre1", "role": "approver", "groups": ["sre"]}));
    for filter in ["jti", "agent_id", "task_id"] {
        // The parent holds payments:write itself, approved and collected.
        let parent_key = AgentKey::new();
        let mut body = w.agent_body("planner", &["tickets:read", "payments:write"], &parent_key);
        body["delegation"] = json!({"subject_token": w.delegation("alice")});
        body["task"] = json!({"id": "T-5", "purpose": "refunds"});
        let asked = w.server.post(BROKER, &body, None).body;
        assert_eq!(w.vote(&sre, &asked).body["state"], "approved");
        let parent = w.collect(&asked, &parent_key).body;
        let parent_jwt = parent["jwt_svid"].as_str().unwrap().to_owned();
        let key = AgentKey::new();
        // Two children escalate: one stays pending, one gets approved.
        let pending = w
            .ask_as_child("payer", &["payments:write"], &key, &parent_jwt, &parent_key)
            .body;
        let approved = w
            .ask_as_child("payer", &["payments:write"], &key, &parent_jwt, &parent_key)
            .body;
        assert_eq!(pending["state"], "pending", "{pending}");
        assert_eq!(w.vote(&sre, &approved).body["state"], "approved");

        let by = match filter {
            "jti" => json!({"jti": parent["jti"]}),
            "agent_id" => json!({"agent_id": "planner"}),
            _ => json!({"task_id": "T-5"}),
        };
        assert_eq!(w.revoke(by).status, 200);
        for r in [&pending, &approved] {
            let id = r["request_id"].as_str().unwrap();
            let now = w.server.get(&format!("{EPHEMERAL}/{id}"), None).body;
            assert_eq!(now["state"], "cancelled", "revoked by {filter}: {now}");
        }
        w.vote(&sre, &pending).assert_problem(409, "request-not-pending");
        w.collect(&approved, &key)
            .assert_problem(409, "request-not-pending");
    }
    assert!(w.server.audit().iter().any(|e| e["kind"] == "broker.revoked"
        && !e["detail"]["cancelled_requests"].as_array().unwrap().is_empty()));
}

/// Review item 7: tokens can be listed (never their secrets), revoked at
/// once and expire; every audit entry names who acted.
#[test]
fn api_tokens_are_listed_revoked_and_expire() {
    let w = world();
    let (token, record) = w.token(json!({"name": "ci-bot", "role": "requester"}));
    let (short, _) = w.token(json!({"name": "temp", "role": "requester", "expires_in": 1}));
    assert_eq!(w.ephemeral(&token).status, 202);

    let list = w.server.get_admin("/api/v1/tokens");
    assert_eq!(list.status, 200);
    let text = list.body.to_string();
    assert!(!text.contains(&token) && !text.contains("token_sha256") && !text.contains(&short));
    assert!(
        list.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "ci-bot")
    );

    // The CLI lists and revokes.
    let cli = |args: &[&str]| {
        let out = castellan()
            .args(args)
            .args(["--addr", &w.server.base])
            .env("CASTELLAN_TOKEN", &w.server.admin_token)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = cli(&["token", "list"]);
    assert!(table.contains("ci-bot") && !table.contains(&token), "{table}");
    cli(&["token", "revoke", record["id"].as_str().unwrap()]);
    w.ephemeral(&token).assert_problem(401, "unauthorized");
    assert!(
        cli(&["token", "list"])
            .lines()
            .any(|l| l.contains("ci-bot") && l.ends_with("revoked"))
    );

    std::thread::sleep(std::time::Duration::from_millis(2100));
    w.ephemeral(&short).assert_problem(401, "unauthorized");

    let audit = w.server.audit();
    let kinds = |k: &str| {
        audit
            .iter()
            .filter(|e| e["kind"] == k)
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds("token.revoked")[0]["actor"], "user:admin");
    assert!(kinds("token.created").iter().all(|e| e["actor"] == "user:admin"));
    assert_eq!(kinds("ephemeral.created")[0]["actor"], "user:ci-bot");
}

/// Review item 8: no API token, join token or JWT-SVID is stored in plain
/// text, idempotency records included; their replays are refused clearly.
#[test]
fn secrets_never_reach_the_store() {
    let w = world();
    let admin = w.server.admin_token.clone();
    let key = [("idempotency-key", "make-ci-token")];
    let first = w.server.post_with(
        "/api/v1/tokens",
        &json!({"name": "ci", "role": "requester"}),
        Some(&admin),
        &key,
    );
    assert_eq!(first.status, 201);
    let secret = first.body["token"].as_str().unwrap().to_owned();
    let replay = w.server.post_with(
        "/api/v1/tokens",
        &json!({"name": "ci", "role": "requester"}),
        Some(&admin),
        &key,
    );
    replay.assert_problem(409, "idempotency-secret");
    assert!(
        replay.body["detail"]
            .as_str()
            .unwrap()
            .contains(first.body["id"].as_str().unwrap())
    );

    let join_key = [("idempotency-key", "join-1")];
    let join = w.server.post_with(
        "/api/v1/join-tokens",
        &json!({"name": "host-1"}),
        Some(&admin),
        &join_key,
    );
    assert_eq!(join.status, 201, "{}", join.body);
    let join_token = join.body["token"].as_str().unwrap().to_owned();
    w.server
        .post_with(
            "/api/v1/join-tokens",
            &json!({"name": "host-1"}),
            Some(&admin),
            &join_key,
        )
        .assert_problem(409, "idempotency-secret");

    let agent_key = AgentKey::new();
    let body = w.agent_body("reader", &["tickets:read"], &agent_key);
    let agent = w
        .server
        .post_with(BROKER, &body, None, &[("idempotency-key", "agent-1")]);
    assert_eq!(agent.status, 201, "{}", agent.body);
    let jwt = agent.body["jwt_svid"].as_str().unwrap().to_owned();

    for s in [&secret, &join_token, &jwt, &admin] {
        assert!(
            !w.server.store_bytes_contain(s.as_bytes()),
            "a secret is in the store"
        );
    }
}

/// Review item 11: identities are bound to a key unless policy explicitly
/// allows bearer tokens, on the broker and on token exchange.
#[test]
fn identities_need_a_key_to_bind_to() {
    let w = world();
    let mut body = w.agent_body("reader", &["tickets:read"], &AgentKey::new());
    body.as_object_mut().unwrap().remove("public_key_jwk");
    let r = w.server.post(BROKER, &body, None);
    r.assert_problem(400, "key-required");
    let form = [
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:id_token"),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("audience", "https://tools.example.com"),
        ("scope", "tickets:read"),
    ];
    let alice = w.delegation("alice");
    let actor = w.cluster.token("agents", "mcp");
    let mut with_tokens: Vec<(&str, &str)> = form.to_vec();
    with_tokens.push(("subject_token", &alice));
    with_tokens.push(("actor_token", &actor));
    let r = w.server.post_form("/oauth2/token", &with_tokens, None);
    assert_eq!(
        (r.status, r.body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{}",
        r.body
    );
    assert!(
        r.body["error_description"].as_str().unwrap().contains("DPoP"),
        "{}",
        r.body
    );
}

/// Review item 14: every name maps to a valid identity or is refused with
/// a 4xx problem where it enters.
#[test]
fn names_that_cannot_be_identities_are_refused_where_they_enter() {
    let w = world();
    w.server
        .post_admin(
            "/api/v1/tokens",
            &json!({"name": "alice@example.com", "role": "requester"}),
        )
        .assert_problem(422, "invalid-token-request");
    // An unlinked login whose `sub` cannot be a SPIFFE path segment.
    let odd = w.login("auth0|5f7c", &[]);
    let r = w.ephemeral(&odd);
    r.assert_problem(422, "invalid-identity");
    let (rita, _) = w.token(json!({"name": "rita", "role": "requester"}));
    let (_, c) = csr();
    w.server
        .post(
            EPHEMERAL,
            &json!({"csr": c, "justification": "x", "dns_names": ["bad name.example"]}),
            Some(&rita),
        )
        .assert_problem(400, "malformed-request");
}

/// Review item 15: on a wildcard address without `public_url`, `serve`
/// would announce `https://localhost:8443` as `iss` and `jwks_uri`; it
/// refuses to start, naming the key.
#[test]
fn serve_on_every_interface_needs_a_public_url() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(&config, "data_dir = \"data\"\n[http]\naddr = \"0.0.0.0:0\"\n").unwrap();
    let stderr = serve_refused(&config);
    assert!(stderr.contains("public_url"), "{stderr}");
    assert!(
        !tmp.path().join("data").exists(),
        "refused before anything was created"
    );
}

/// Review item 10: two clusters with the common issuer
/// `https://kubernetes.default.svc` each keep working (the source whose keys
/// verify is the source), and the second, less trusted one cannot mint the
/// first one's identities for the same namespace.
#[test]
fn clusters_sharing_an_issuer_keep_their_own_identities() {
    let server = Server::dev();
    let prod = Cluster::new("https://kubernetes.default.svc");
    let staging = Cluster::new("https://kubernetes.default.svc");
    server.add_trust_source("prod", &prod);
    server.add_trust_source("staging", &staging);
    let issue = |cluster: &Cluster| {
        let (_, c) = csr();
        server.post(
            "/api/v1/workloads/attested-issuance",
            &support::issuance_body(&cluster.token("payments", "api"), &c, None),
            None,
        )
    };
    let p = issue(&prod);
    assert_eq!(p.status, 201, "{}", p.body);
    assert_eq!(
        p.body["spiffe_id"],
        "spiffe://example.org/prod/ns/payments/sa/api"
    );
    let s = issue(&staging);
    assert_eq!(s.status, 201, "{}", s.body);
    assert_eq!(
        s.body["spiffe_id"],
        "spiffe://example.org/staging/ns/payments/sa/api"
    );
    // A third cluster's key, same issuer and kid: no source verifies it.
    issue(&Cluster::new("https://kubernetes.default.svc")).assert_problem(403, "attestation-failed");
}

/// Review item 6: floods are bounded. Half-sent requests are closed after
/// the header timeout and connections past the cap are closed at once; a
/// client cannot take the whole challenge table; a flood of refusals is
/// counted, not written one by one; and a legitimate client is served
/// throughout.
#[test]
fn floods_are_bounded_and_a_legitimate_client_is_served() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = { enabled = false }\n\
         max_connections = 64\nmax_connections_per_client = 64\nheader_read_timeout_seconds = 1\n",
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let addr = server.base.trim_start_matches("http://").to_owned();
    let healthy = || server.get("/healthz", None).status == 200;

    // 40 connections that send half a request and stop.
    let mut slow: Vec<std::net::TcpStream> = (0..40)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(&addr).unwrap();
            c.write_all(b"POST /api/v1/attestation/challenges HTTP/1.1\r\nHost: x\r\n")
                .unwrap();
            c
        })
        .collect();
    assert!(healthy(), "served while the slow connections hang");
    // The header timeout closes them.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    for c in &mut slow {
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).unwrap_or(0);
        let answer = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(n == 0 || answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    drop(slow);
    // Past the cap, a connection is closed at once; within it, served.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let held: Vec<std::net::TcpStream> = (0..64)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut extra = std::net::TcpStream::connect(&addr).unwrap();
    extra
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut buf = [0u8; 64];
    assert_eq!(extra.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
    drop(held);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(healthy());

    // One client cannot take the challenge table.
    let ask = json!({"method": "x509pop"});
    let mut limited = None;
    for i in 0..300 {
        let r = server.post("/api/v1/attestation/challenges", &ask, None);
        if r.status != 201 {
            limited = Some((i, r));
            break;
        }
    }
    let (at, r) = limited.expect("the per-client limit applies");
    r.assert_problem(429, "too-many-challenges");
    assert_eq!(at, 256);

    // 500 refusals: a burst is written, the rest counted in a summary.
    let body = support::issuance_body("not-a-token", &csr().1, None);
    for _ in 0..500 {
        server.post("/api/v1/workloads/attested-issuance", &body, None);
    }
    assert!(healthy());
    assert!(support::eventually(std::time::Duration::from_secs(15), || {
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "audit.refusals_suppressed")
    }));
    let audit = server.audit();
    let written = audit.iter().filter(|e| e["kind"] == "issuance.refused").count();
    assert!(written < 200, "{written} refusal records for 500 refusals");
    let suppressed: u64 = audit
        .iter()
        .filter(|e| e["kind"] == "audit.refusals_suppressed")
        .flat_map(|e| e["detail"]["refusals"].as_array().unwrap().clone())
        .map(|c| c["count"].as_u64().unwrap())
        .sum();
    assert_eq!(written as u64 + suppressed, 500, "every refusal is accounted for");
}

/// Review item 16: an `https://` webhook needs no `ca_file` (the public web
/// roots are built in; `ca_file` adds roots). And item 6: refused requests
/// leave no idempotency record behind, so a flood of new keys stores nothing.
#[test]
fn https_webhooks_start_without_ca_file_and_refusals_store_no_idempotency() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("hook.secret"), "a-webhook-secret-of-length").unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = { enabled = false }\n\
         [[webhooks]]\nname = \"ops\"\nurl = \"https://hooks.example.com/castellan\"\nsecret_file = \"hook.secret\"\n",
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    assert_eq!(server.get("/healthz", None).status, 200);

    let body = support::issuance_body("not-a-token", &csr().1, None);
    let key = [("idempotency-key", "k-1")];
    let first = server.post_with("/api/v1/workloads/attested-issuance", &body, None, &key);
    first.assert_problem(422, "no-trust-source");
    // Not remembered: the same key with another body is not "reused".
    let other = support::issuance_body("still-not-a-token", &csr().1, None);
    server
        .post_with("/api/v1/workloads/attested-issuance", &other, None, &key)
        .assert_problem(422, "no-trust-source");
    // A challenge is never replayed: two asks, two nonces.
    let ask = json!({"method": "x509pop"});
    let a = server.post_with(
        "/api/v1/attestation/challenges",
        &ask,
        None,
        &[("idempotency-key", "c")],
    );
    let b = server.post_with(
        "/api/v1/attestation/challenges",
        &ask,
        None,
        &[("idempotency-key", "c")],
    );
    assert_ne!(a.body["nonce"], b.body["nonce"]);
}
