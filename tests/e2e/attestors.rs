//! The attestor suite through the real binary: every method's module gets
//! the same conformance run over HTTP, with evidence in the method's real
//! format made here (tokens signed by keys the test creates). A genuine
//! proof issues; a forgery, an expired proof, a proof for another
//! audience, a replay and garbage are each refused with a problem, and
//! nothing is signed for them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use serde_json::{Value, json};
use support::{Cluster, Server, csr, now};

/// One JWT-based method under test.
struct JwtMethod {
    method: &'static str,
    issuer: &'static str,
    audience: &'static str,
    /// Claims of a genuine token issued at `now`, valid for ten minutes.
    claims: fn(now: i64) -> Value,
    /// What data.json must say for `claims` to be allowed.
    allow: fn(&mut Value),
    /// The SPIFFE ID the default policy gives.
    spiffe_id: &'static str,
    /// The policy's deny when the allow list is empty.
    denied: &'static str,
}

fn github_claims(now: i64) -> Value {
    json!({
        "iss": "https://token.actions.githubusercontent.com", "aud": "castellan",
        "iat": now, "nbf": now, "exp": now + 600,
        "jti": format!("gh-{}", uuid::Uuid::new_v4()),
        "sub": "repo:acme/api:environment:production",
        "repository": "acme/api", "repository_owner": "acme", "ref": "refs/heads/main",
        "environment": "production", "event_name": "push",
        "workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main",
        "job_workflow_ref": "acme/api/.github/workflows/deploy.yml@refs/heads/main",
        "runner_environment": "github-hosted",
    })
}

fn gcp_claims(now: i64) -> Value {
    json!({
        "iss": "https://accounts.google.com", "aud": "https://castellan.example",
        "azp": "1234567890", "email": "web@acme-prod.iam.gserviceaccount.com",
        "iat": now, "exp": now + 600, "sub": "1234567890",
        "google": {"compute_engine": {
            "project_id": "acme-prod", "project_number": 42, "zone": "europe-west1-b",
            "instance_id": "4567890123", "instance_name": "web-1",
            "instance_creation_timestamp": now - 86_400,
        }},
    })
}

fn azure_claims(now: i64) -> Value {
    json!({
        "iss": "https://sts.windows.net/7f3d1a2b-0000-4000-8000-00000000aaaa/",
        "aud": "https://management.azure.com/", "iat": now, "nbf": now, "exp": now + 600,
        "tid": "7f3d1a2b-0000-4000-8000-00000000aaaa", "oid": "0e1f2a3b-0000-4000-8000-00000000bbbb",
        "xms_mirid": "/subscriptions/sub-1/resourcegroups/rg-web/providers/Microsoft.Compute/virtualMachines/web-1",
        "uti": uuid::Uuid::new_v4().to_string(),
    })
}

const METHODS: &[JwtMethod] = &[
    JwtMethod {
        method: "github_oidc",
        issuer: "https://token.actions.githubusercontent.com",
        audience: "castellan",
        claims: github_claims,
        allow: |d| {
            d["castellan"]["issuance"]["github_oidc"]["allow"] =
                json!([{"repository": "acme/api", "environments": ["production"]}])
        },
        spiffe_id: "spiffe://example.org/github/acme/api",
        denied: "not in data.castellan.issuance.github_oidc.allow",
    },
    JwtMethod {
        method: "gcp_iit",
        issuer: "https://accounts.google.com",
        audience: "https://castellan.example",
        claims: gcp_claims,
        allow: |d| d["castellan"]["issuance"]["gcp_iit"]["allowed_projects"] = json!(["acme-prod"]),
        spiffe_id: "spiffe://example.org/gcp/acme-prod/instance/4567890123",
        denied: "not in data.castellan.issuance.gcp_iit.allowed_projects",
    },
    JwtMethod {
        method: "azure_msi",
        issuer: "https://sts.windows.net/7f3d1a2b-0000-4000-8000-00000000aaaa/",
        audience: "https://management.azure.com/",
        claims: azure_claims,
        allow: |d| {
            d["castellan"]["issuance"]["azure_msi"]["allow"] =
                json!([{"tenant": "7f3d1a2b-0000-4000-8000-00000000aaaa", "subscriptions": ["sub-1"]}])
        },
        spiffe_id: "spiffe://example.org/azure/7f3d1a2b-0000-4000-8000-00000000aaaa/principal/0e1f2a3b-0000-4000-8000-00000000bbbb",
        denied: "not in data.castellan.issuance.azure_msi.allow",
    },
];

fn issue(server: &Server, method: &str, evidence: &str) -> support::Resp {
    let (_, csr) = csr();
    server.post(
        "/api/v1/workloads/attested-issuance",
        &json!({ "method": method, "evidence": evidence, "csr": csr }),
        None,
    )
}

fn register(server: &Server, m: &JwtMethod, issuer: &Cluster) {
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({
            "name": format!("{}-source", m.method), "method": m.method, "issuer": m.issuer,
            "audiences": [m.audience], "jwks": issuer.jwks(),
        }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Every way a token can be wrong that a mutation fuzzer finds cheaply:
/// flipped characters, truncations, swapped segments.
fn mutations(token: &str, n: usize) -> Vec<String> {
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(n);
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let alphabet = b"ABCxyz019-_.=+/{}\"\\ \x00\xff";
    for i in 0..n {
        let mut t = bytes.to_vec();
        match i % 4 {
            0 => {
                let at = (next() as usize) % t.len();
                t[at] = alphabet[(next() as usize) % alphabet.len()];
            }
            1 => t.truncate((next() as usize) % t.len()),
            2 => {
                let at = (next() as usize) % t.len();
                t.insert(at, b'.');
            }
            _ => {
                let parts: Vec<&[u8]> = bytes.split(|b| *b == b'.').collect();
                t = [parts[1], b".", parts[0], b".", parts[2]].concat();
            }
        }
        out.push(String::from_utf8_lossy(&t).into_owned());
    }
    out
}

fn conformance(m: &JwtMethod) {
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", m.allow);
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let issuer = Cluster::new_rsa(m.issuer, jsonwebtoken::Algorithm::RS256);
    register(&server, m, &issuer);

    // Genuine: issues, under the policy's SPIFFE ID.
    let token = issuer.sign(&(m.claims)(now()));
    let r = issue(&server, m.method, &token);
    assert_eq!(r.status, 201, "{}: {}", m.method, r.body);
    assert_eq!(r.body["spiffe_id"], m.spiffe_id, "{}", m.method);

    // Replay: the same token a second time.
    let r = issue(&server, m.method, &token);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("already used"),
        "{}: {}",
        m.method,
        r.body
    );

    // Forgery: same issuer and kid, another key.
    let forger = Cluster::new_rsa(m.issuer, jsonwebtoken::Algorithm::RS256);
    issue(&server, m.method, &forger.sign(&(m.claims)(now()))).assert_problem(403, "attestation-failed");

    // Expired an hour ago.
    let mut expired = (m.claims)(now() - 7200);
    expired["exp"] = (now() - 3600).into();
    issue(&server, m.method, &issuer.sign(&expired)).assert_problem(403, "attestation-failed");

    // For another audience.
    let mut elsewhere = (m.claims)(now());
    elsewhere["aud"] = "https://someone-else.example".into();
    issue(&server, m.method, &issuer.sign(&elsewhere)).assert_problem(403, "attestation-failed");

    // Garbage and mutations of a genuine token: refused, never a server fault.
    let fresh = issuer.sign(&(m.claims)(now()));
    let mut junk: Vec<String> = [
        "",
        "not a token",
        "a.b.c",
        "....",
        "eyJhbGciOiJub25lIn0.eyJpc3MiOiJ4In0.",
        "{\"iss\": \"x\"}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    junk.push("A".repeat(60_000));
    junk.extend(mutations(&fresh, 120));
    for evidence in &junk {
        let r = issue(&server, m.method, evidence);
        assert!(
            (400..500).contains(&r.status),
            "{}: {:?}… gave {} {}",
            m.method,
            evidence.chars().take(40).collect::<String>(),
            r.status,
            r.body
        );
    }

    // Allowed by the trust source but not by policy: denied.
    let tmp2 = tempfile::tempdir().unwrap();
    let strict = Server::dev_in(&tmp2.path().join("data"), &[]);
    register(&strict, m, &issuer);
    let r = issue(&strict, m.method, &issuer.sign(&(m.claims)(now())));
    r.assert_problem(403, "policy-denied");
    assert!(r.body.to_string().contains(m.denied), "{}", r.body);

    // Of all that, one certificate was signed, and every refusal is audited.
    assert_eq!(server.certificates().len(), 1, "{}", m.method);
    let refusals = server
        .audit()
        .iter()
        .filter(|e| e["kind"] == "issuance.refused")
        .count();
    assert!(refusals >= 4, "{}: {refusals} refusals audited", m.method);
}

#[test]
fn github_oidc_conformance() {
    conformance(&METHODS[0]);
}

#[test]
fn gcp_iit_conformance() {
    conformance(&METHODS[1]);
}

#[test]
fn azure_msi_conformance() {
    conformance(&METHODS[2]);
}

#[test]
fn github_selectors_and_claims_reach_policy() {
    // The attestation the policy sees carries every claim the issue names.
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", METHODS[0].allow);
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let issuer = Cluster::new_rsa(METHODS[0].issuer, jsonwebtoken::Algorithm::RS256);
    register(&server, &METHODS[0], &issuer);
    let r = issue(&server, "github_oidc", &issuer.sign(&github_claims(now())));
    assert_eq!(r.status, 201, "{}", r.body);
    let audit = server.audit();
    let issued = audit
        .iter()
        .rev()
        .find(|e| e["kind"] == "issuance.issued")
        .expect("an audit event for the issuance");
    let text = issued.to_string();
    for selector in [
        "github:repository:acme/api",
        "github:repository_owner:acme",
        "github:ref:refs/heads/main",
        "github:environment:production",
        "github:event_name:push",
        "github:runner_environment:github-hosted",
        "github:workflow_ref:acme/api/.github/workflows/deploy.yml@refs/heads/main",
        "github:job_workflow_ref:acme/api/.github/workflows/deploy.yml@refs/heads/main",
    ] {
        assert!(text.contains(selector), "{selector} in {text}");
    }
}
