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
    let mut i = 0;
    while out.len() < n {
        i += 1;
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
        // A substitution can write the character that was already there:
        // that is the genuine token, not a mutant.
        if t != bytes {
            out.push(String::from_utf8_lossy(&t).into_owned());
        }
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

    // Past `exp` but within the 60 s clock-skew leeway: good once, and
    // remembered as long as it would verify.
    let mut skewed = (m.claims)(now() - 600);
    skewed["exp"] = (now() - 30).into();
    let skewed = issuer.sign(&skewed);
    let r = issue(&server, m.method, &skewed);
    assert_eq!(r.status, 201, "{}: {}", m.method, r.body);
    let r = issue(&server, m.method, &skewed);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("already used"),
        "{}",
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

    // Of all that, two certificates were signed, and every refusal is audited.
    assert_eq!(server.certificates().len(), 2, "{}", m.method);
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

// === join_token ===

fn issue_with_csr(server: &Server, method: &str, evidence: &str, csr: &str) -> support::Resp {
    server.post(
        "/api/v1/workloads/attested-issuance",
        &json!({ "method": method, "evidence": evidence, "csr": csr }),
        None,
    )
}

#[test]
fn join_tokens_bootstrap_a_host_once_even_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::dev_in(&dir, &[]);
    // Only an admin creates them.
    server
        .post("/api/v1/join-tokens", &json!({"name": "db-7"}), None)
        .assert_problem(401, "unauthorized");
    server
        .post_admin("/api/v1/join-tokens", &json!({"name": "db 7!"}))
        .assert_problem(422, "invalid-join-token");
    let r = server.post_admin(
        "/api/v1/join-tokens",
        &json!({"name": "db-7", "ttl_seconds": 600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.body["token"].as_str().unwrap().to_owned();

    let r = issue(&server, "join_token", &token);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/host/db-7");
    let again = issue(&server, "join_token", &token);
    again.assert_problem(403, "attestation-failed");
    assert!(again.body["detail"].as_str().unwrap().contains("already used"));

    // A token for this method signed by anyone else is a forgery.
    let forger = Cluster::new("castellan:join-token:example.org");
    let forged = forger.sign(&json!({
        "iss": "castellan:join-token:example.org", "aud": ["castellan-join"], "sub": "db-8",
        "jti": "forged-1", "iat": now(), "exp": now() + 600,
    }));
    issue(&server, "join_token", &forged).assert_problem(403, "attestation-failed");
    for junk in ["", "x", "a.b.c", "{}"] {
        let r = issue(&server, "join_token", junk);
        assert!((400..500).contains(&r.status), "{junk:?}: {}", r.status);
    }
    // The spend is durable: a restart does not make the token good again.
    server.stop();
    let server = Server::dev_in(&dir, &[]);
    let r = issue(&server, "join_token", &token);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("already used"),
        "{}",
        r.body
    );
    assert_eq!(server.certificates().len(), 1);
}

/// Hex SHA-256 of a key's DER SubjectPublicKeyInfo: what a bound audience names.
fn key_digest(key: &rcgen::KeyPair) -> String {
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        rcgen::PublicKeyData::subject_public_key_info(key),
    ))
}

#[test]
fn jwt_tokens_can_be_bound_to_the_requested_key() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", |d| {
        d["castellan"]["issuance"]["github_oidc"]["allow"] = json!([
            {"repository": "acme/api"},
            {"repository": "acme/vault", "require_key_binding": true},
        ]);
        d["castellan"]["issuance"]["gcp_iit"]["allowed_projects"] = json!(["acme-prod"]);
    });
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let github = Cluster::new_rsa(METHODS[0].issuer, jsonwebtoken::Algorithm::RS256);
    register(&server, &METHODS[0], &github);
    let (other_key, other_csr) = csr();
    let (key, csr) = csr();
    let bound_to = |k: &rcgen::KeyPair, repository: &str| {
        let mut c = github_claims(now());
        c["aud"] = format!("castellan/key/{}", key_digest(k)).into();
        c["repository"] = repository.into();
        github.sign(&c)
    };

    // A token whose audience names the CSR's key issues for that CSR...
    let r = issue_with_csr(&server, "github_oidc", &bound_to(&key, "acme/api"), &csr);
    assert_eq!(r.status, 201, "{}", r.body);
    // ...and is worthless with any other key.
    let r = issue_with_csr(&server, "github_oidc", &bound_to(&key, "acme/api"), &other_csr);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("another key"),
        "{}",
        r.body
    );
    // Not a digest (upper case, short), or a key under an audience the
    // trust source does not accept: not an accepted audience at all.
    for aud in [
        format!("castellan/key/{}", key_digest(&key).to_uppercase()),
        "castellan/key/abc".to_owned(),
        format!("elsewhere/key/{}", key_digest(&key)),
    ] {
        let mut c = github_claims(now());
        c["aud"] = aud.into();
        let r = issue_with_csr(&server, "github_oidc", &github.sign(&c), &csr);
        r.assert_problem(403, "attestation-failed");
        assert!(
            r.body["detail"].as_str().unwrap().contains("audience"),
            "{}",
            r.body
        );
    }

    // Policy can insist on binding per repository.
    let r = issue_with_csr(
        &server,
        "github_oidc",
        &github.sign(&{
            let mut c = github_claims(now());
            c["repository"] = "acme/vault".into();
            c
        }),
        &csr,
    );
    r.assert_problem(403, "policy-denied");
    assert!(
        r.body
            .to_string()
            .contains("needs a token bound to the requested key"),
        "{}",
        r.body
    );
    let r = issue_with_csr(
        &server,
        "github_oidc",
        &bound_to(&other_key, "acme/vault"),
        &other_csr,
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // A trust source can insist on it for every token.
    server
        .post_admin(
            "/api/v1/trust-sources",
            &json!({"name": "gcp", "method": "gcp_iit", "issuer": METHODS[1].issuer,
                    "audiences": [METHODS[1].audience], "jwks": github.jwks(),
                    "settings": {"key_binding": "always"}}),
        )
        .assert_problem(422, "invalid-trust-source");
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "gcp", "method": "gcp_iit", "issuer": METHODS[1].issuer,
                "audiences": [METHODS[1].audience], "jwks": github.jwks(),
                "settings": {"key_binding": "required"}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = issue_with_csr(&server, "gcp_iit", &github.sign(&gcp_claims(now())), &csr);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("requires"),
        "{}",
        r.body
    );
    let mut c = gcp_claims(now());
    c["aud"] = format!("https://castellan.example/key/{}", key_digest(&key)).into();
    let r = issue_with_csr(&server, "gcp_iit", &github.sign(&c), &csr);
    assert_eq!(r.status, 201, "{}", r.body);

    assert_eq!(server.certificates().len(), 3);
}

#[test]
fn the_methods_serve_ephemeral_requests_and_the_broker_too() {
    // The default ephemeral policy names identities for k8s_sat only; a
    // copy gives github_oidc jobs theirs.
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", |_| {});
    let rule = r#"
identity := sprintf("spiffe://%s/github/%s", [input.trust_domain, input.attestation.claims.repository]) if {
	input.requester.kind == "evidence"
	input.attestation.method == "github_oidc"
}
"#;
    let path = policies.join("ephemeral.rego");
    let text = std::fs::read_to_string(&path).unwrap() + rule;
    std::fs::write(&path, text).unwrap();
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let github = Cluster::new_rsa(METHODS[0].issuer, jsonwebtoken::Algorithm::RS256);
    register(&server, &METHODS[0], &github);
    let (_, other_csr) = csr();
    let (key, csr) = csr();
    let mut claims = github_claims(now());
    claims["aud"] = format!("castellan/key/{}", key_digest(&key)).into();
    let token = github.sign(&claims);
    let ask = |token: &str, csr: &str| {
        server.post(
            "/api/v1/ephemeral",
            &json!({"csr": csr, "justification": "release 4.2", "method": "github_oidc", "evidence": token}),
            None,
        )
    };

    let r = ask(&token, &csr);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/github/acme/api");
    assert_eq!(r.body["attestation"]["method"], "github_oidc");
    // Single use and key binding hold here as for attested issuance.
    ask(&token, &csr).assert_problem(403, "attestation-failed");
    let mut claims = github_claims(now());
    claims["aud"] = format!("castellan/key/{}", key_digest(&key)).into();
    ask(&github.sign(&claims), &other_csr).assert_problem(403, "attestation-failed");

    // The broker attests with the same modules; its default policy then
    // wants agents attested by k8s_sat, so a genuine job token gets as far
    // as policy, and a forgery does not.
    let broker = |token: &str| {
        server.post(
            "/api/v1/broker/agent-identities",
            &json!({"agent_id": "deploy-bot", "method": "github_oidc", "evidence": token,
                    "scopes": ["read"], "audience": ["https://tools.example.com"]}),
            None,
        )
    };
    let r = broker(&github.sign(&github_claims(now())));
    r.assert_problem(403, "policy-denied");
    assert!(r.body.to_string().contains("not github_oidc"), "{}", r.body);
    let forger = Cluster::new_rsa(METHODS[0].issuer, jsonwebtoken::Algorithm::RS256);
    broker(&forger.sign(&github_claims(now()))).assert_problem(403, "attestation-failed");
    assert!(server.certificates().is_empty());
}

// === x509pop ===

struct Pki {
    root: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        Self {
            root: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A client certificate for `cn` and its key.
    fn client(&self, cn: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let issuer = rcgen::Issuer::from_ca_cert_der(self.root.der(), &self.key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec![format!("{cn}.hosts.example")]).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        (p.signed_by(&key, &issuer).unwrap(), key)
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Asks for a challenge and answers it with `cert`/`key`, binding `csr_key`.
fn x509pop_evidence(
    server: &Server,
    cert: &rcgen::Certificate,
    key: &rcgen::KeyPair,
    csr_key: &rcgen::KeyPair,
) -> String {
    let r = server.post(
        "/api/v1/attestation/challenges",
        &json!({"method": "x509pop"}),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let nonce = r.body["nonce"].as_str().unwrap();
    let key_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        rcgen::PublicKeyData::subject_public_key_info(csr_key),
    ));
    let message = format!("castellan-x509pop-v1\n{nonce}\n{key_sha}\n");
    let signature = rcgen::SigningKey::sign(key, message.as_bytes()).unwrap();
    json!({
        "challenge_id": r.body["challenge_id"], "certificates": [b64(cert.der())],
        "algorithm": "ecdsa-p256-sha256", "signature": b64(&signature),
    })
    .to_string()
}

fn csr_for(key: &rcgen::KeyPair) -> String {
    rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(key)
        .unwrap()
        .pem()
        .unwrap()
}

#[test]
fn x509pop_proves_a_certificate_key_bound_to_the_requested_key() {
    let server = Server::dev();
    let pki = Pki::new("Acme Hosts CA");
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "acme-hosts", "method": "x509pop", "certificates": pki.root.pem()}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let (cert, key) = pki.client("edge-1");
    let csr_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = csr_for(&csr_key);

    let evidence = x509pop_evidence(&server, &cert, &key, &csr_key);
    let r = issue_with_csr(&server, "x509pop", &evidence, &csr);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/x509pop/edge-1");

    // Replay: the challenge was taken.
    issue_with_csr(&server, "x509pop", &evidence, &csr).assert_problem(403, "attestation-failed");
    // Bound to the key: the same kind of proof presented with another CSR fails.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let evidence = x509pop_evidence(&server, &cert, &key, &csr_key);
    issue_with_csr(&server, "x509pop", &evidence, &csr_for(&other)).assert_problem(403, "attestation-failed");
    // A certificate from a CA the trust source does not hold.
    let (stranger, stranger_key) = Pki::new("Other CA").client("edge-1");
    let evidence = x509pop_evidence(&server, &stranger, &stranger_key, &csr_key);
    issue_with_csr(&server, "x509pop", &evidence, &csr).assert_problem(403, "attestation-failed");
    // Signed by a key that is not the certificate's.
    let evidence = x509pop_evidence(&server, &cert, &stranger_key, &csr_key);
    issue_with_csr(&server, "x509pop", &evidence, &csr).assert_problem(403, "attestation-failed");
    // No live challenge, a challenge for another method, garbage.
    let mut bogus: Value = serde_json::from_str(&x509pop_evidence(&server, &cert, &key, &csr_key)).unwrap();
    bogus["challenge_id"] = "00000000-0000-4000-8000-000000000000".into();
    issue_with_csr(&server, "x509pop", &bogus.to_string(), &csr).assert_problem(403, "attestation-failed");
    server
        .post(
            "/api/v1/attestation/challenges",
            &json!({"method": "k8s_sat"}),
            None,
        )
        .assert_problem(422, "unknown-method");
    for junk in ["", "{", "{}", "[1,2]", "{\"challenge_id\": 5}"] {
        let r = issue_with_csr(&server, "x509pop", junk, &csr);
        assert!(
            (400..500).contains(&r.status),
            "{junk:?}: {} {}",
            r.status,
            r.body
        );
    }
    assert_eq!(server.certificates().len(), 1);
}

// === aws_iid ===

/// An "AWS region" signing certificate (RSA, as AWS's are) and its key.
struct AwsRegion {
    cert_pem: String,
    cert_der: Vec<u8>,
    key: ring::signature::RsaKeyPair,
}

impl AwsRegion {
    fn new() -> Self {
        use rsa::pkcs8::EncodePrivateKey as _;
        let private = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
        let pkcs8 = private.to_pkcs8_der().unwrap();
        let pem = private.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let kp = rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::OrganizationName, "Amazon Web Services LLC");
        let cert = p.self_signed(&kp).unwrap();
        Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key: ring::signature::RsaKeyPair::from_pkcs8(pkcs8.as_bytes()).unwrap(),
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let mut sig = vec![0; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                message,
                &mut sig,
            )
            .unwrap();
        sig
    }

    /// A PKCS#7 SignedData over `content` with signed attributes, as the
    /// `rsa2048` endpoint returns.
    fn pkcs7(&self, content: &[u8]) -> Vec<u8> {
        use cms::cert::x509::der::asn1::{Any, ObjectIdentifier, OctetString, SetOfVec};
        use cms::cert::x509::der::{Decode, Encode};
        use cms::signed_data::{
            EncapsulatedContentInfo, SignedData, SignerIdentifier, SignerInfo, SignerInfos,
        };
        let oid = |s: &str| ObjectIdentifier::new_unwrap(s);
        let alg = |o: &str, null: bool| cms::cert::x509::spki::AlgorithmIdentifierOwned {
            oid: oid(o),
            parameters: null.then(Any::null),
        };
        let cert = cms::cert::x509::Certificate::from_der(&self.cert_der).unwrap();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(content);
        let attr = |o: &str, v: Any| cms::cert::x509::attr::Attribute {
            oid: oid(o),
            values: SetOfVec::try_from(vec![v]).unwrap(),
        };
        let data = "1.2.840.113549.1.7.1";
        let attrs = SetOfVec::try_from(vec![
            attr("1.2.840.113549.1.9.3", Any::encode_from(&oid(data)).unwrap()),
            attr(
                "1.2.840.113549.1.9.4",
                Any::encode_from(&OctetString::new(digest.to_vec()).unwrap()).unwrap(),
            ),
        ])
        .unwrap();
        let signature = self.sign(&attrs.to_der().unwrap());
        let si = SignerInfo {
            version: cms::content_info::CmsVersion::V1,
            sid: SignerIdentifier::IssuerAndSerialNumber(cms::cert::IssuerAndSerialNumber {
                issuer: cert.tbs_certificate.issuer.clone(),
                serial_number: cert.tbs_certificate.serial_number.clone(),
            }),
            digest_alg: alg("2.16.840.1.101.3.4.2.1", false),
            signed_attrs: Some(attrs),
            signature_algorithm: alg("1.2.840.113549.1.1.1", true),
            signature: OctetString::new(signature).unwrap(),
            unsigned_attrs: None,
        };
        let sd = SignedData {
            version: cms::content_info::CmsVersion::V1,
            digest_algorithms: SetOfVec::try_from(vec![alg("2.16.840.1.101.3.4.2.1", false)]).unwrap(),
            encap_content_info: EncapsulatedContentInfo {
                econtent_type: oid(data),
                econtent: Some(Any::encode_from(&OctetString::new(content.to_vec()).unwrap()).unwrap()),
            },
            certificates: None,
            crls: None,
            signer_infos: SignerInfos(SetOfVec::try_from(vec![si]).unwrap()),
        };
        cms::content_info::ContentInfo {
            content_type: oid("1.2.840.113549.1.7.2"),
            content: Any::encode_from(&sd).unwrap(),
        }
        .to_der()
        .unwrap()
    }
}

fn iid_document(account: &str, instance: &str, pending: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(pending).unwrap();
    let pending_time = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    json!({
        "accountId": account, "architecture": "x86_64", "availabilityZone": "eu-west-1a",
        "imageId": "ami-0abcdef1234567890", "instanceId": instance, "instanceType": "m5.large",
        "pendingTime": pending_time, "privateIp": "10.0.1.17", "region": "eu-west-1", "version": "2017-09-30",
    })
    .to_string()
}

#[test]
fn aws_iid_documents_verify_with_the_region_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", |d| {
        d["castellan"]["issuance"]["aws_iid"]["allowed_accounts"] = json!(["123456789012"])
    });
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let region = AwsRegion::new();
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "aws-eu-west-1", "method": "aws_iid", "certificates": region.cert_pem,
                "settings": {"max_age_seconds": 600}}),
    );
    assert_eq!(r.status, 201, "{}", r.body);

    // The document with its RSA-SHA256 signature.
    let doc = iid_document("123456789012", "i-0aaa", now() - 60);
    let evidence = json!({"document": doc, "signature": b64(&region.sign(doc.as_bytes()))}).to_string();
    let r = issue(&server, "aws_iid", &evidence);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        "spiffe://example.org/aws/123456789012/eu-west-1/i-0aaa"
    );
    issue(&server, "aws_iid", &evidence).assert_problem(403, "attestation-failed");

    // The PKCS#7 form of another instance's document.
    let doc = iid_document("123456789012", "i-0bbb", now() - 60);
    let evidence = json!({"pkcs7": b64(&region.pkcs7(doc.as_bytes()))}).to_string();
    let r = issue(&server, "aws_iid", &evidence);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        "spiffe://example.org/aws/123456789012/eu-west-1/i-0bbb"
    );

    // Forged: signed by another "AWS" key; a document edited after signing.
    let forger = AwsRegion::new();
    let doc = iid_document("123456789012", "i-0ccc", now() - 60);
    let forged = json!({"document": doc, "signature": b64(&forger.sign(doc.as_bytes()))}).to_string();
    issue(&server, "aws_iid", &forged).assert_problem(403, "attestation-failed");
    let edited = doc.replace("i-0ccc", "i-0ddd");
    let tampered = json!({"document": edited, "signature": b64(&region.sign(doc.as_bytes()))}).to_string();
    issue(&server, "aws_iid", &tampered).assert_problem(403, "attestation-failed");
    let forged7 = json!({"pkcs7": b64(&forger.pkcs7(doc.as_bytes()))}).to_string();
    issue(&server, "aws_iid", &forged7).assert_problem(403, "attestation-failed");
    // Too old for the trust source's max_age_seconds.
    let old = iid_document("123456789012", "i-0eee", now() - 3600);
    let stale = json!({"document": old, "signature": b64(&region.sign(old.as_bytes()))}).to_string();
    let r = issue(&server, "aws_iid", &stale);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("older than 600"),
        "{}",
        r.body
    );
    // Another account: verified, but policy has no place for it.
    let other = iid_document("999999999999", "i-0fff", now() - 60);
    let evidence = json!({"document": other, "signature": b64(&region.sign(other.as_bytes()))}).to_string();
    issue(&server, "aws_iid", &evidence).assert_problem(403, "policy-denied");
    // Garbage, and mutations of a genuine PKCS#7 once it was used: some
    // flips land in parts the signature does not cover (the signer id, the
    // algorithm sets), so they still verify, and must count as the same
    // document.
    let good7 = region.pkcs7(iid_document("123456789012", "i-0ggg", now() - 60).as_bytes());
    let r = issue(&server, "aws_iid", &json!({"pkcs7": b64(&good7)}).to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let mut junk: Vec<String> = [
        "",
        "{}",
        "{\"pkcs7\": \"!!\"}",
        "{\"document\": \"x\", \"signature\": \"AAAA\"}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for cut in [0, 1, 10, good7.len() / 2, good7.len() - 1] {
        junk.push(json!({"pkcs7": b64(&good7[..cut])}).to_string());
    }
    for i in 0..40 {
        let mut bad = good7.clone();
        let at = (i * 37) % bad.len();
        bad[at] ^= 0x5a;
        junk.push(json!({"pkcs7": b64(&bad)}).to_string());
    }
    for evidence in &junk {
        let r = issue(&server, "aws_iid", evidence);
        assert!((400..500).contains(&r.status), "{} {}", r.status, r.body);
    }
    assert_eq!(server.certificates().len(), 3);
}

// === trust source lifecycle ===

/// A JWKS served over loopback HTTP; the test swaps the document.
struct JwksServer {
    url: String,
    doc: std::sync::Arc<std::sync::Mutex<String>>,
}

impl JwksServer {
    fn start(initial: &Value) -> Self {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let doc = std::sync::Arc::new(std::sync::Mutex::new(initial.to_string()));
        let served = doc.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf);
                let body = served.lock().unwrap().clone();
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self { url, doc }
    }

    fn serve(&self, jwks: &Value) {
        *self.doc.lock().unwrap() = jwks.to_string();
    }
}

fn github_token(issuer: &Cluster) -> String {
    issuer.sign(&github_claims(now()))
}

#[test]
fn trust_sources_rotate_with_overlap_and_revoke() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", METHODS[0].allow);
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let m = &METHODS[0];
    let mut a = Cluster::new(m.issuer);
    a.kid = "key-a".into();
    let mut b = Cluster::new(m.issuer);
    b.kid = "key-b".into();
    let mut c = Cluster::new(m.issuer);
    c.kid = "key-c".into();
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "gh", "method": "github_oidc", "issuer": m.issuer, "audiences": [m.audience], "jwks": a.jwks()}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(issue(&server, "github_oidc", &github_token(&a)).status, 201);

    // Rotate to B with an hour of overlap: both verify.
    let r = server.post_admin(
        &format!("/api/v1/trust-sources/{id}/rotate"),
        &json!({"jwks": b.jwks(), "overlap_seconds": 3600}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(issue(&server, "github_oidc", &github_token(&a)).status, 201);
    assert_eq!(issue(&server, "github_oidc", &github_token(&b)).status, 201);
    // Rotate to C with no overlap: B is gone at once, and A long since.
    let r = server.post_admin(
        &format!("/api/v1/trust-sources/{id}/rotate"),
        &json!({"jwks": c.jwks(), "overlap_seconds": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    issue(&server, "github_oidc", &github_token(&a)).assert_problem(403, "attestation-failed");
    issue(&server, "github_oidc", &github_token(&b)).assert_problem(403, "attestation-failed");
    assert_eq!(issue(&server, "github_oidc", &github_token(&c)).status, 201);
    // Bad rotations change nothing.
    server
        .post_admin(
            &format!("/api/v1/trust-sources/{id}/rotate"),
            &json!({"jwks": {"keys": []}}),
        )
        .assert_problem(422, "invalid-trust-source");
    server
        .post_admin(
            &format!("/api/v1/trust-sources/{id}/rotate"),
            &json!({"certificates": "x"}),
        )
        .assert_problem(422, "invalid-trust-source");
    assert_eq!(issue(&server, "github_oidc", &github_token(&c)).status, 201);

    // Revoked: nothing verifies, and it stays revoked.
    let r = server.post_admin(&format!("/api/v1/trust-sources/{id}/revoke"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["revoked_at"].is_string());
    let refused = issue(&server, "github_oidc", &github_token(&c));
    assert!((400..500).contains(&refused.status), "{}", refused.body);
    server
        .post_admin(
            &format!("/api/v1/trust-sources/{id}/rotate"),
            &json!({"jwks": a.jwks()}),
        )
        .assert_problem(409, "trust-source-revoked");
    let kinds: Vec<String> = server
        .audit()
        .iter()
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect();
    assert!(kinds.iter().any(|k| k == "trust_source.rotated"));
    assert!(kinds.iter().any(|k| k == "trust_source.revoked"));
}

#[test]
fn a_jwks_url_is_fetched_and_refreshed() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", METHODS[0].allow);
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let m = &METHODS[0];
    let mut a = Cluster::new(m.issuer);
    a.kid = "url-a".into();
    let mut b = Cluster::new(m.issuer);
    b.kid = "url-b".into();
    let jwks = JwksServer::start(&a.jwks());
    // Plain HTTP is only for loopback.
    server
        .post_admin(
            "/api/v1/trust-sources",
            &json!({"name": "gh", "method": "github_oidc", "issuer": m.issuer, "audiences": [m.audience],
                    "jwks_url": "http://jwks.example/keys"}),
        )
        .assert_problem(422, "invalid-trust-source");
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "gh", "method": "github_oidc", "issuer": m.issuer, "audiences": [m.audience],
                "jwks_url": jwks.url, "jwks_refresh_seconds": 10}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(issue(&server, "github_oidc", &github_token(&a)).status, 201);
    // The issuer rotates its keys: within a refresh period Castellan follows.
    jwks.serve(&b.jwks());
    let followed = support::eventually(std::time::Duration::from_secs(30), || {
        issue(&server, "github_oidc", &github_token(&b)).status == 201
    });
    assert!(followed, "the refreshed JWKS was picked up");
    issue(&server, "github_oidc", &github_token(&a)).assert_problem(403, "attestation-failed");
    // A broken document at the URL keeps the keys in use.
    jwks.serve(&json!({"keys": "nope"}));
    std::thread::sleep(std::time::Duration::from_secs(12));
    assert_eq!(issue(&server, "github_oidc", &github_token(&b)).status, 201);
}

/// Review item 12: a JWT without `jti` is single-use by its signed content,
/// not its signature. ECDSA's `(r, n−s)` verifies the same content and is
/// refused as a replay.
#[test]
fn a_malleated_ecdsa_signature_is_the_same_token() {
    let m = &METHODS[0];
    let tmp = tempfile::tempdir().unwrap();
    let policies = support::policies_with(tmp.path(), "policies", m.allow);
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let issuer = Cluster::new(m.issuer);
    register(&server, m, &issuer);
    let mut claims = github_claims(now());
    claims.as_object_mut().unwrap().remove("jti");
    let token = issuer.sign(&claims);
    assert_eq!(issue(&server, m.method, &token).status, 201);

    // The twin signature: s' = n − s over P-256's group order.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let (content, sig) = token.rsplit_once('.').unwrap();
    let sig = b64.decode(sig).unwrap();
    let n = rsa::BigUint::parse_bytes(
        b"FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551",
        16,
    )
    .unwrap();
    let s = rsa::BigUint::from_bytes_be(&sig[32..]);
    let twin_s = (&n - &s).to_bytes_be();
    let mut twin = sig[..32].to_vec();
    twin.extend(std::iter::repeat_n(0u8, 32 - twin_s.len()));
    twin.extend(twin_s);
    let twin = format!("{content}.{}", b64.encode(twin));
    assert_ne!(twin, token);
    let r = issue(&server, m.method, &twin);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("already used"),
        "{}",
        r.body
    );
}
