use super::*;

use crate::model::Attestation;
use crate::model::policy::IssuanceAsk;

fn attestation(ns: &str) -> Attestation {
    Attestation {
        method: "k8s_sat".into(),
        subject: format!("ns/{ns}/sa/api"),
        selectors: vec![format!("k8s:ns:{ns}"), "k8s:sa:api".into()],
        claims: serde_json::json!({"namespace": ns, "service_account": "api", "trust_source": "dev-cluster"}),
        single_use: None,
    }
}

/// The issuance decision of the active snapshot for a k8s workload in `ns`.
fn decide(p: &Policies, ns: &str, ttl: Option<u64>) -> IssuanceDecision {
    let attestation = attestation(ns);
    let input = IssuanceInput {
        version: INPUT_VERSION,
        trust_domain: "example.org",
        attestation: &attestation,
        request: IssuanceAsk {
            ttl_seconds: ttl,
            dns_names: vec![],
        },
    };
    p.snapshot().decide_issuance(&input).unwrap()
}

#[test]
fn embedded_bundle_allows_and_caps_ttl() {
    let p = Policies::embedded().unwrap();
    assert_eq!(p.revision(), "castellan-default-1");
    let d = decide(&p, "prod", None);
    assert!(d.allow);
    assert_eq!(
        d.spiffe_id.as_deref(),
        Some("spiffe://example.org/ns/prod/sa/api")
    );
    assert_eq!(d.ttl_seconds, Some(900));
    assert_eq!(decide(&p, "prod", Some(7200)).ttl_seconds, Some(3600));
    assert_eq!(decide(&p, "prod", Some(300)).ttl_seconds, Some(300));
}

#[test]
fn embedded_bundle_denies_kube_system_with_a_reason() {
    let p = Policies::embedded().unwrap();
    let d = decide(&p, "kube-system", None);
    assert!(!d.allow);
    assert_eq!(
        d.reasons,
        ["namespace \"kube-system\" may not receive identities"]
    );
}

#[test]
fn a_bundle_without_the_entry_point_is_refused() {
    let files = BundleFiles {
        manifest: None,
        rego: vec![("x.rego".into(), "package castellan.other\nallow := true\n".into())],
        data: None,
    };
    assert!(matches!(
        Policies::load(&files),
        Err(PolicyError::BadDecision(_)) | Err(PolicyError::Eval(_))
    ));
    let broken = BundleFiles {
        manifest: None,
        rego: vec![(
            "x.rego".into(),
            "package castellan.issuance\ndecision := {\n".into(),
        )],
        data: None,
    };
    assert!(matches!(
        Policies::load(&broken),
        Err(PolicyError::Compile { .. })
    ));
}

#[test]
fn the_default_bundles_rego_tests_pass() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let report = run_tests(&dir).unwrap();
    assert!(report.results.len() >= 5, "found {} tests", report.results.len());
    for (name, outcome, _) in &report.results {
        assert_eq!(outcome, &TestOutcome::Pass, "{name}");
    }
}
