//! The engine in process, for every flow and its refusal paths: real
//! wasmtime attestors, real Rego, a real signer, and the memory store.

use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};

use super::broker::{AgentRequest, Outcome};
use super::ephemeral::{Created, NewRequest};
use super::issuance::AttestedRequest;
use super::workload::HostEvidence;
use super::*;
use crate::attest::Attestors;
use crate::config::SandboxConfig;
use crate::dev::DevCluster;
use crate::model::{AuditKind, Principal, PrincipalKind, Role, Source, State, VoteDecision};
use crate::store::Store;

/// Compiling the embedded modules takes seconds: once for all tests.
fn attestors() -> Arc<Attestors> {
    static ATTESTORS: OnceLock<Arc<Attestors>> = OnceLock::new();
    ATTESTORS
        .get_or_init(|| Arc::new(Attestors::embedded(&SandboxConfig::default()).unwrap()))
        .clone()
}

struct World {
    engine: Arc<Engine>,
    cluster: DevCluster,
    _dir: tempfile::TempDir,
}

async fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let cluster = DevCluster::load_or_create(dir.path()).unwrap();
    let ca = crate::ca::load_or_create(&dir.path().join("ca"), "example.org", true).unwrap();
    let signer: Arc<dyn Signer> = Arc::new(crate::signer::InProcessSigner::new(&ca, "example.org").unwrap());
    let trust = Arc::new(Registry::new(vec![cluster.trust_source()]).unwrap());
    let (_bundles, policies) =
        crate::bundle::Bundles::start(attestors(), "default", crate::bundle::Bundle::embedded(), None)
            .unwrap();
    let engine = Engine::new(Parts {
        trust_domain: "example.org".into(),
        attestors: attestors(),
        trust,
        policies,
        signer,
        store: Store::memory(),
        limits: IssuanceConfig::default(),
        entries: Arc::new(crate::entries::Entries::new(vec![])),
        oidc: Arc::new(OidcIssuers::default()),
        max_in_flight: 4,
        rotation: None,
    })
    .await
    .unwrap();
    World {
        engine,
        cluster,
        _dir: dir,
    }
}

fn csr() -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::CertificateParams::new(vec![])
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap()
}

fn person(name: &str, role: Role, groups: &[&str]) -> Principal {
    Principal {
        id: format!("user:{name}"),
        name: name.into(),
        role,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        kind: PrincipalKind::Token,
        persons: Vec::new(),
    }
}

/// The audit kinds recorded so far, in order.
async fn audit_kinds(engine: &Engine) -> Vec<AuditKind> {
    let page = engine.store.list_audit(1000, None).await.unwrap();
    page.items.into_iter().map(|r| r.event.kind).collect()
}

/// The host-evidence body of the outside review: `unix` evidence claiming
/// to be root's sshd.
const FORGED_UNIX: &str = r#"{"pid":1,"uid":0,"gid":0,"path":"/usr/sbin/sshd"}"#;

#[tokio::test]
async fn attested_issuance_is_recorded_and_audited_before_it_returns() {
    let w = world().await;
    let token = w.cluster.mint_token("prod", "api", None, 300).unwrap();
    let issued = w
        .engine
        .issue_attested(AttestedRequest {
            method: "k8s_sat".into(),
            evidence: token,
            csr_pem: csr(),
            ttl_seconds: None,
        })
        .await
        .unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://example.org/ns/prod/sa/api");
    let certs = w.engine.store.list_certificates(10, None).await.unwrap().items;
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].serial, issued.serial);
    assert_eq!(certs[0].source, Source::AttestedIssuance);
    assert!(
        certs[0].selectors.contains(&"k8s:ns:prod".to_owned()),
        "{:?}",
        certs[0].selectors
    );
    assert_eq!(audit_kinds(&w.engine).await, [AuditKind::IssuanceIssued]);
}

#[tokio::test]
async fn refusals_are_audited_by_the_engine_and_issue_nothing() {
    let w = world().await;
    let denied = w.cluster.mint_token("kube-system", "x", None, 300).unwrap();
    let cases = [
        ("k8s_sat", denied, csr(), "policy-denied"),
        ("k8s_sat", "not.a.token".to_owned(), csr(), "attestation-failed"),
        ("carrier_pigeon", "x".to_owned(), csr(), "unknown-method"),
        ("k8s_sat", "x".to_owned(), "not a csr".to_owned(), "invalid-csr"),
    ];
    for (method, evidence, csr_pem, slug) in cases {
        let err = w
            .engine
            .issue_attested(AttestedRequest {
                method: method.into(),
                evidence,
                csr_pem,
                ttl_seconds: None,
            })
            .await
            .unwrap_err();
        assert_eq!(err.slug(), slug, "{err}");
    }
    assert_eq!(w.engine.store.count_certificates().await.unwrap(), 0);
    let audit = w.engine.store.list_audit(100, None).await.unwrap().items;
    assert_eq!(audit.len(), 4);
    for record in &audit {
        assert_eq!(record.event.kind, AuditKind::IssuanceRefused);
        assert!(record.event.detail["problem"].is_string());
    }
    assert!(audit[0].event.detail["reasons"][0].as_str().is_some());
}

#[tokio::test]
async fn host_evidence_is_refused_on_every_caller_surface_before_any_module_runs() {
    let w = world().await;
    let only_here = |e: EngineError| {
        assert!(matches!(e, EngineError::HostEvidenceOnly(_)), "{e}");
        assert_eq!(e.slug(), "unknown-method");
        assert_eq!(e.status(), 422);
        assert!(
            e.to_string().contains("only available on the Workload API"),
            "{e}"
        );
    };
    only_here(
        w.engine
            .issue_attested(AttestedRequest {
                method: "unix".into(),
                evidence: FORGED_UNIX.into(),
                csr_pem: csr(),
                ttl_seconds: None,
            })
            .await
            .unwrap_err(),
    );
    let new = NewRequest {
        csr_pem: csr(),
        ttl_seconds: None,
        justification: "root please".into(),
        ticket: None,
        emergency: false,
        spiffe_id: None,
        dns_names: vec![],
        evidence: Some(("unix".into(), FORGED_UNIX.into())),
        extra: json!({}),
    };
    match w.engine.ephemeral_create(None, new).await {
        Err(e) => only_here(e),
        Ok(_) => panic!("unix evidence created a request"),
    }
    for surface in [Surface::Broker, Surface::TokenExchange] {
        let req = AgentRequest {
            agent_id: Some("bot".into()),
            method: "unix".into(),
            evidence: FORGED_UNIX.into(),
            scopes: vec!["tickets:read".into()],
            audience: vec!["api".into()],
            ..AgentRequest::default()
        };
        match w.engine.agent_identity(surface, req).await {
            Err(e) => only_here(e),
            Ok(_) => panic!("unix evidence minted an agent identity"),
        }
    }
    assert_eq!(
        audit_kinds(&w.engine).await,
        [
            AuditKind::IssuanceRefused,
            AuditKind::EphemeralRefused,
            AuditKind::BrokerRefused,
            AuditKind::BrokerRefused
        ]
    );
    assert_eq!(w.engine.store.count_certificates().await.unwrap(), 0);
    assert!(w.engine.store.list_requests(None).await.unwrap().is_empty());
}

fn own_process_evidence() -> HostEvidence {
    // What the Workload API adapter reads from the kernel for this process.
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    HostEvidence::from_kernel(json!({ "pid": std::process::id(), "uid": uid, "gid": gid }))
}

#[tokio::test]
async fn workload_api_svids_are_in_the_inventory_and_the_audit_log() {
    let w = world().await;
    let attestation = w
        .engine
        .workload_caller("fetch_x509_svid", own_process_evidence())
        .await
        .unwrap();
    // No entry yet: refused, and the refusal names the caller's selectors.
    let err = w
        .engine
        .workload_entitled_or_refused("fetch_x509_svid", &attestation)
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::NotRegistered));
    let uid_selector = format!("unix:uid:{}", nix::unistd::getuid().as_raw());
    let entry = crate::entries::EntrySpec {
        spiffe_id: "spiffe://example.org/svc".into(),
        selectors: vec![uid_selector.clone()],
        x509_svid_ttl: 3600,
        jwt_svid_ttl: 300,
        dns_names: vec![],
        hint: String::new(),
        federates_with: vec![],
    }
    .into_entry("example.org")
    .unwrap();
    w.engine.entries.insert(entry);
    let entries = w
        .engine
        .workload_entitled_or_refused("fetch_x509_svid", &attestation)
        .await
        .unwrap();
    let svids = w.engine.workload_x509(&attestation, &entries).await.unwrap();
    assert_eq!(svids.len(), 1);
    let jwts = w
        .engine
        .workload_jwt(
            &attestation,
            entries,
            vec!["db".into()],
            crate::signer::JwtAlg::ES256,
        )
        .await
        .unwrap();
    assert_eq!(jwts.len(), 1);

    let certs = w.engine.store.list_certificates(10, None).await.unwrap().items;
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].source, Source::WorkloadApi);
    assert_eq!(certs[0].spiffe_id, "spiffe://example.org/svc");
    assert!(certs[0].selectors.contains(&uid_selector));
    let audit = w.engine.store.list_audit(10, None).await.unwrap().items;
    let kinds: Vec<_> = audit.iter().map(|r| r.event.kind.clone()).collect();
    assert_eq!(
        kinds,
        [
            AuditKind::WorkloadRefused,
            AuditKind::WorkloadX509Issued,
            AuditKind::WorkloadJwtIssued
        ]
    );
    assert_eq!(audit[0].event.detail["problem"], "not-registered");
    assert!(
        audit[0].event.detail["selectors"]
            .as_array()
            .unwrap()
            .contains(&json!(uid_selector))
    );
    assert_eq!(audit[1].event.detail["serial"], certs[0].serial.as_str());
}

#[tokio::test]
async fn an_ephemeral_request_waits_for_its_quorum_and_is_minted_once() {
    let w = world().await;
    let alice = person("alice", Role::Requester, &[]);
    let new = NewRequest {
        csr_pem: csr(),
        ttl_seconds: Some(600),
        justification: "incident 42".into(),
        ticket: None,
        emergency: false,
        spiffe_id: None,
        dns_names: vec![],
        evidence: None,
        extra: json!({}),
    };
    let Created::Pending(request) = w.engine.ephemeral_create(Some(alice.clone()), new).await.unwrap() else {
        panic!("the default policy asks for approvers");
    };
    assert_eq!(request.rule.required_approvals, 2);
    // The requester cannot approve, even in the right group.
    let alice_sre = person("alice", Role::Approver, &["sre"]);
    let err = w
        .engine
        .ephemeral_vote(
            &alice_sre,
            &request.id,
            VoteDecision::Approve,
            "",
            &request.binding,
        )
        .await
        .unwrap_err();
    assert_eq!(err.slug(), "self-approval");
    // A vote for another binding counts for nothing.
    let (sre1, sre2) = (
        person("sre1", Role::Approver, &["sre"]),
        person("sre2", Role::Approver, &["sre"]),
    );
    let err = w
        .engine
        .ephemeral_vote(&sre1, &request.id, VoteDecision::Approve, "", "sha256:00")
        .await
        .unwrap_err();
    assert_eq!(err.slug(), "binding-mismatch");
    let after_one = w
        .engine
        .ephemeral_vote(&sre1, &request.id, VoteDecision::Approve, "ok", &request.binding)
        .await
        .unwrap();
    assert_eq!(after_one.state, State::Pending);
    // Two racing second votes: the quorum is reached once, one mint.
    let (a, b) = tokio::join!(
        w.engine
            .ephemeral_vote(&sre2, &request.id, VoteDecision::Approve, "ok", &request.binding),
        w.engine
            .ephemeral_vote(&sre2, &request.id, VoteDecision::Approve, "ok", &request.binding),
    );
    // The loser finds the request decided: a vote on it is refused.
    let (won, lost) = if a.is_ok() { (a, b) } else { (b, a) };
    assert_eq!(won.unwrap().state, State::Issued);
    assert_eq!(lost.unwrap_err().slug(), "request-not-pending");
    let done = w.engine.ephemeral_get(&request.id).await.unwrap().unwrap();
    assert_eq!(done.state, State::Issued);
    assert!(done.issued.is_some());
    let certs = w.engine.store.list_certificates(10, None).await.unwrap().items;
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0].source, Source::Ephemeral);
    let kinds = audit_kinds(&w.engine).await;
    assert_eq!(
        kinds.iter().filter(|k| **k == AuditKind::EphemeralIssued).count(),
        1
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| **k == AuditKind::EphemeralRefused)
            .count(),
        3
    );
}

/// The key an agent holds, and DPoP proofs (RFC 9449) signed with it.
struct AgentKey {
    key: rcgen::KeyPair,
    jwk: Value,
}

impl AgentKey {
    fn new() -> Self {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        Self { key, jwk }
    }

    fn prove(&self, url: &str) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(serde_json::from_value(self.jwk.clone()).unwrap());
        let claims = json!({"jti": uuid::Uuid::new_v4().to_string(), "htm": "POST", "htu": url,
            "iat": crate::util::now_unix()});
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap();
        jsonwebtoken::encode(&header, &claims, &signing).unwrap()
    }
}

fn agent_request(token: String, scopes: &[&str], key: &AgentKey) -> AgentRequest {
    AgentRequest {
        agent_id: Some("planner".into()),
        method: "k8s_sat".into(),
        evidence: token,
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        audience: vec!["tickets".into()],
        public_key_jwk: Some(key.jwk.clone()),
        ..AgentRequest::default()
    }
}

#[tokio::test]
async fn broker_identities_are_minted_or_escalated_then_minted_on_approval() {
    let w = world().await;
    let token = w.cluster.mint_token("agents", "planner", None, 300).unwrap();
    let key = AgentKey::new();
    let Outcome::Issued(granted) = w
        .engine
        .agent_identity(
            Surface::Broker,
            agent_request(token.clone(), &["tickets:read", "nope"], &key),
        )
        .await
        .unwrap()
    else {
        panic!("tickets:read needs no approval");
    };
    assert_eq!(
        granted.scopes,
        ["tickets:read"],
        "attenuated to what policy allows"
    );
    let jwt = granted.jwt_svid.clone().unwrap();
    let introspected = w.engine.introspect(&jwt).await;
    assert_eq!(introspected["active"], true);

    let Outcome::Pending(request) = w
        .engine
        .agent_identity(
            Surface::TokenExchange,
            agent_request(token, &["payments:write"], &key),
        )
        .await
        .unwrap()
    else {
        panic!("payments:write needs an approver");
    };
    let sre = person("sre1", Role::Approver, &["sre"]);
    let issued = w
        .engine
        .ephemeral_vote(&sre, &request.id, VoteDecision::Approve, "ok", &request.binding)
        .await
        .unwrap();
    // Approved, the identity waits for the agent holding the key.
    assert_eq!(issued.state, State::Approved);
    let path = format!("/api/v1/ephemeral/{}/collect", request.id);
    let url = format!("{}{path}", w.engine.issuer());
    let stranger = AgentKey::new();
    assert!(matches!(
        w.engine
            .agent_collect(&request.id, Some(&stranger.prove(&url)))
            .await,
        Err(EngineError::Dpop(_))
    ));
    let collected = w
        .engine
        .agent_collect(&request.id, Some(&key.prove(&url)))
        .await
        .unwrap();
    assert!(collected.jwt_svid.is_some());
    let stored = w.engine.ephemeral_get(&request.id).await.unwrap().unwrap();
    assert_eq!(stored.state, State::Issued);
    assert!(
        !serde_json::to_string(&stored)
            .unwrap()
            .contains(collected.jwt_svid.as_deref().unwrap()),
        "the JWT-SVID is never stored"
    );
    assert!(matches!(
        w.engine.agent_collect(&request.id, Some(&key.prove(&url))).await,
        Err(EngineError::Approval(
            crate::approvals::ApprovalError::NotPending("issued")
        ))
    ));
    let kinds = audit_kinds(&w.engine).await;
    assert_eq!(kinds.iter().filter(|k| **k == AuditKind::BrokerIssued).count(), 2);
    assert!(kinds.contains(&AuditKind::BrokerEscalated));

    // Revocation is effective at once, for introspection and delegation.
    let revoked = w
        .engine
        .revoke_agents(
            crate::model::RevocationFilter {
                jti: Some(granted.jti.clone()),
                ..Default::default()
            },
            crate::model::Actor::User("admin".into()),
        )
        .await
        .unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(w.engine.introspect(&jwt).await["active"], false);
    assert!(w.engine.is_revoked(&granted.jti));
    // The in-memory set forgets a revoked token once it has expired (the
    // registry keeps refusing it until its record is purged).
    w.engine
        .forget_expired_revocations(crate::util::now_unix() + 86_400);
    assert!(!w.engine.is_revoked(&granted.jti));
    assert_eq!(w.engine.introspect(&jwt).await["active"], false);
}

#[tokio::test]
async fn a_join_token_is_audited_and_attests_once() {
    let w = world().await;
    let admin = person("root", Role::Admin, &[]);
    let err = w.engine.join_token(&admin, "bad name!", 3600).await.unwrap_err();
    assert_eq!(err.slug(), "malformed-request");
    // The join token's trust source is built from the signer's keys.
    w.engine
        .trust
        .insert(join_token::trust_source(
            "example.org",
            w.engine.authorities().jwks(),
        ))
        .unwrap();
    let joined = w.engine.join_token(&admin, "db-7", 3600).await.unwrap();
    let ask = || AttestedRequest {
        method: "join_token".into(),
        evidence: joined.token.clone(),
        csr_pem: csr(),
        ttl_seconds: None,
    };
    let issued = w.engine.issue_attested(ask()).await.unwrap();
    assert_eq!(issued.spiffe_id, "spiffe://example.org/host/db-7");
    let again = w.engine.issue_attested(ask()).await.unwrap_err();
    assert!(again.detail().contains("already used"), "{}", again.detail());
    let kinds = audit_kinds(&w.engine).await;
    assert_eq!(
        kinds,
        [
            AuditKind::JoinTokenRefused,
            AuditKind::JoinTokenCreated,
            AuditKind::IssuanceIssued,
            AuditKind::IssuanceRefused
        ]
    );
}
