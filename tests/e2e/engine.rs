//! One engine behind every surface, through the real binary: host evidence
//! is refused on every HTTP path before any module or policy runs, and the
//! refusal is audited the same way everywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{Server, castellan, csr, issuance_body};

const ISSUE: &str = "/api/v1/workloads/attested-issuance";

/// The outside review's body: `unix` evidence claiming to be root's sshd.
const FORGED_UNIX: &str = r#"{"pid":1,"uid":0,"gid":0,"path":"/usr/sbin/sshd"}"#;

/// A bundle that allows every attested issuance: if host evidence reached
/// the policy, it would be issued. Loaded as `default`, it replaces the
/// embedded policies, so the refusal cannot come from them.
fn allow_everything(server: &Server, tmp: &std::path::Path) {
    let dir = tmp.join("allow-all");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".manifest"),
        json!({"revision": "allow-all", "roots": ["castellan"]}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("issuance.rego"),
        "package castellan.issuance\n\nimport rego.v1\n\n\
         decision := {\"allow\": true, \"spiffe_id\": sprintf(\"spiffe://%s/anything\", [input.trust_domain]), \"ttl_seconds\": 600}\n",
    )
    .unwrap();
    let out = tmp.join("allow-all.tar.gz");
    let built = castellan()
        .args(["bundle", "build"])
        .arg(&dir)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let r = server.put_admin("/api/v1/bundles/default", std::fs::read(&out).unwrap());
    assert_eq!(r.status, 200, "{}", r.body);
}

fn assert_host_only(status: u16, body: &Value) {
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["type"], "urn:castellan:problem:unknown-method", "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("only available on the Workload API"),
        "{body}"
    );
}

#[test]
fn host_evidence_is_refused_on_every_http_path_and_audited() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev_in(&tmp.path().join("data"), &[]);
    allow_everything(&server, tmp.path());
    // The permissive bundle is live: genuine evidence is issued by it.
    let token = castellan()
        .args(["dev", "token", "k8s", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--namespace", "default", "--service-account", "demo"])
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let (_, c) = csr();
    let ok = server.post(ISSUE, &issuance_body(&token, &c, None), None);
    assert_eq!(ok.status, 201, "{}", ok.body);
    assert_eq!(ok.body["spiffe_id"], "spiffe://example.org/anything");

    // 1. Attested issuance.
    let (_, c) = csr();
    let r = server.post(
        ISSUE,
        &json!({"method": "unix", "evidence": FORGED_UNIX, "csr": c}),
        None,
    );
    assert_host_only(r.status, &r.body);
    // 2. Just-in-time requests authenticated by evidence.
    let (_, c) = csr();
    let r = server.post(
        "/api/v1/ephemeral",
        &json!({"method": "unix", "evidence": FORGED_UNIX, "csr": c, "justification": "root"}),
        None,
    );
    assert_host_only(r.status, &r.body);
    // 3. The broker.
    let r = server.post(
        "/api/v1/broker/agent-identities",
        &json!({"agent_id": "sshd", "method": "unix", "evidence": FORGED_UNIX,
                "scopes": ["tickets:read"], "audience": ["api"]}),
        None,
    );
    assert_host_only(r.status, &r.body);
    // 4. Token exchange, with the evidence as the actor token.
    let r = server.post_form(
        "/oauth2/token",
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token", "eyJhbGciOiJub25lIn0.e30."),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("actor_token", FORGED_UNIX),
            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("actor_token_method", "unix"),
            ("audience", "api"),
            ("scope", "tickets:read"),
        ],
        None,
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .contains("only available on the Workload API"),
        "{}",
        r.body
    );

    // Nothing issued but the genuine certificate; every refusal audited once.
    assert_eq!(server.certificates().len(), 1);
    let audit = server.audit();
    let refused: Vec<&Value> = audit
        .iter()
        .filter(|e| e["detail"]["problem"] == "unknown-method")
        .collect();
    let kinds: Vec<&str> = refused.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "issuance.refused",
            "ephemeral.refused",
            "broker.refused",
            "broker.refused"
        ]
    );
    let surfaces: Vec<&str> = refused
        .iter()
        .map(|e| e["detail"]["surface"].as_str().unwrap())
        .collect();
    assert_eq!(
        surfaces,
        ["attested-issuance", "ephemeral", "broker", "token-exchange"]
    );
    for e in &refused {
        assert_eq!(e["detail"]["method"], "unix");
    }
}

#[test]
fn the_audit_names_the_admin_who_acted() {
    let server = Server::dev();
    // The audit names the caller that created a resource, not a fixed `admin`.
    let alice = {
        let r = server.post_admin(
            "/api/v1/tokens",
            &json!({"name": "alice", "role": "admin", "groups": []}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["token"].as_str().unwrap().to_owned()
    };
    let r = server.post(
        "/api/v1/entries",
        &json!({"spiffe_id": "spiffe://example.org/x", "selectors": ["unix:uid:0"]}),
        Some(&alice),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let audit = server.audit();
    let created = audit.iter().find(|e| e["kind"] == "entry.created").unwrap();
    assert_eq!(created["actor"], "user:alice");
    let token = audit.iter().find(|e| e["kind"] == "token.created").unwrap();
    assert_eq!(token["actor"], "user:admin");
}
