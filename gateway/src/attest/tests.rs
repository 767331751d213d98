use super::*;
use crate::trust::{Registry, TrustSource};

fn dev_setup() -> (crate::dev::DevCluster, Arc<Registry>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = crate::dev::DevCluster::load_or_create(dir.path()).unwrap();
    let registry = Arc::new(Registry::new(vec![cluster.trust_source()]).unwrap());
    (cluster, registry, dir)
}

fn attestors() -> Attestors {
    Attestors::embedded(&SandboxConfig::default()).unwrap()
}

#[test]
fn embedded_module_imports_only_castellan_capabilities() {
    let a = attestors();
    for (method, module) in &a.modules {
        let ty = module.pre.instance_pre().component().component_type();
        for (name, _) in ty.imports(&a.engine) {
            assert!(name.starts_with("castellan:attestor/"), "{method} imports {name}");
        }
    }
}

#[test]
fn genuine_token_attests_with_selectors() {
    let (cluster, registry, _dir) = dev_setup();
    let token = cluster.mint_token("prod", "api", Some("api-1"), 300).unwrap();
    let a = attestors()
        .attest("k8s_sat", &token, registry.snapshot(), &serde_json::json!({}))
        .unwrap();
    assert_eq!(a.subject, "ns/prod/sa/api");
    assert!(a.selectors.contains(&"k8s:pod-name:api-1".to_owned()));
    assert_eq!(a.claims["trust_source"], "dev-cluster");
}

#[test]
fn forged_token_is_rejected_and_unknown_method_refused() {
    let (_cluster, registry, _dir) = dev_setup();
    let other_dir = tempfile::tempdir().unwrap();
    let impostor = crate::dev::DevCluster::load_or_create(other_dir.path()).unwrap();
    // Same issuer and kid shape, different key: the signature must fail.
    let forged = impostor.mint_token("prod", "api", None, 300).unwrap();
    let a = attestors();
    let err = a
        .attest("k8s_sat", &forged, registry.snapshot(), &serde_json::json!({}))
        .unwrap_err();
    assert!(matches!(err, AttestError::Rejected(_)), "{err}");
    let err = a
        .attest("tpm", &forged, registry.snapshot(), &serde_json::json!({}))
        .unwrap_err();
    assert!(matches!(err, AttestError::UnknownMethod(_)));
    let empty = Arc::new(Registry::new(Vec::<TrustSource>::new()).unwrap());
    let err = a
        .attest("k8s_sat", &forged, empty.snapshot(), &serde_json::json!({}))
        .unwrap_err();
    assert!(matches!(err, AttestError::NoTrustSource(_)));
}
