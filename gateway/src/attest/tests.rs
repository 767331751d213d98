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
        .attest(
            "no_such_method",
            &forged,
            registry.snapshot(),
            &serde_json::json!({}),
        )
        .unwrap_err();
    assert!(matches!(err, AttestError::UnknownMethod(_)));
    let empty = Arc::new(Registry::new(Vec::<TrustSource>::new()).unwrap());
    let err = a
        .attest("k8s_sat", &forged, empty.snapshot(), &serde_json::json!({}))
        .unwrap_err();
    assert!(matches!(err, AttestError::NoTrustSource(_)));
}

/// The hostile fixture under method `hostile`, with a dev trust source so
/// calls reach the module.
fn hostile() -> (Attestors, Arc<Registry>, tempfile::TempDir) {
    let (cluster, _, dir) = dev_setup();
    let mut source = cluster.trust_source();
    source.method = "hostile".into();
    let registry = Arc::new(Registry::new(vec![source]).unwrap());
    let config = SandboxConfig {
        deadline_ms: 50,
        max_memory_bytes: 4 << 20,
        max_instances: 16,
    };
    let modules: &[(&str, &[u8])] = &[
        ("hostile", fixtures::HOSTILE),
        ("k8s_sat", embedded::MODULES[0].1),
    ];
    (Attestors::new(&config, modules).unwrap(), registry, dir)
}

fn module_error(a: &Attestors, registry: &Registry, evidence: &str) -> String {
    match a.attest("hostile", evidence, registry.snapshot(), &serde_json::json!({})) {
        Err(AttestError::Module(m)) => m,
        other => panic!("{evidence}: expected a module failure, got {other:?}"),
    }
}

#[test]
fn hostile_modules_are_stopped_and_fail_closed() {
    let (a, registry, _dir) = hostile();
    assert!(
        a.attest("hostile", "ok", registry.snapshot(), &serde_json::json!({}))
            .is_ok()
    );

    let started = std::time::Instant::now();
    assert_eq!(module_error(&a, &registry, "loop"), "exceeded its time limit");
    // Not a timing test: only that the endless loop was stopped at all.
    assert!(started.elapsed() < Duration::from_secs(10));

    assert_eq!(module_error(&a, &registry, "alloc"), "exceeded its memory limit");
    assert!(module_error(&a, &registry, "recurse").contains("overflowed its stack"));
    assert_eq!(
        module_error(&a, &registry, "panic"),
        "trapped (panic or unreachable)"
    );
    let huge = module_error(&a, &registry, "huge-subject");
    assert!(huge.contains("subject"), "{huge}");
    assert!(module_error(&a, &registry, "many-selectors").contains("selectors"));
    assert!(module_error(&a, &registry, "bad-claims").contains("not JSON"));

    // A trapped instance is gone: the next call gets a fresh one.
    assert!(
        a.attest("hostile", "ok", registry.snapshot(), &serde_json::json!({}))
            .is_ok()
    );
}

#[test]
fn well_behaved_calls_succeed_while_hostile_ones_run() {
    let (a, registry, dir) = hostile();
    let a = Arc::new(a);
    let cluster = crate::dev::DevCluster::load(dir.path()).unwrap();
    let k8s = Arc::new(Registry::new(vec![cluster.trust_source()]).unwrap());
    let token = cluster.mint_token("prod", "api", None, 300).unwrap();
    let mut threads = Vec::new();
    for i in 0..4 {
        let (a, registry) = (a.clone(), registry.clone());
        let evidence = if i % 2 == 0 { "loop" } else { "alloc" };
        threads.push(std::thread::spawn(move || {
            for _ in 0..3 {
                assert!(
                    a.attest("hostile", evidence, registry.snapshot(), &serde_json::json!({}))
                        .is_err()
                );
            }
        }));
    }
    for _ in 0..20 {
        let ok = a
            .attest("k8s_sat", &token, k8s.snapshot(), &serde_json::json!({}))
            .unwrap();
        assert_eq!(ok.subject, "ns/prod/sa/api");
    }
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn a_module_importing_wasi_is_refused_at_load() {
    let modules: &[(&str, &[u8])] = &[("wasi_fs", fixtures::WASI_FS)];
    let err = Attestors::new(&SandboxConfig::default(), modules)
        .err()
        .expect("must not load");
    let text = err.to_string();
    assert!(text.contains("wasi_fs") && text.contains("wasi:"), "{text}");
}

#[test]
fn precompiled_modules_are_cached_and_only_authentic_ones_are_used() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let config = SandboxConfig::default();
    let first = Attestors::with_cache_dir(&config, embedded::MODULES, Some(&cache)).unwrap();
    let artifacts: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".cwasm"))
        .map(|e| e.path())
        .collect();
    assert_eq!(
        artifacts.len(),
        embedded::MODULES.len(),
        "the built-in modules were cached"
    );
    drop(first);
    // Tamper with the artifact: the HMAC no longer matches, so it is
    // recompiled rather than deserialized, and the module still works.
    let k8s = artifacts.iter().find(|p| {
        let b = std::fs::read(p).unwrap();
        !b.is_empty()
            && p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&castellan_sha(embedded::MODULES[0].1))
    });
    let artifact = k8s.expect("k8s_sat artifact").clone();
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let again = Attestors::with_cache_dir(&config, embedded::MODULES, Some(&cache)).unwrap();
    let (cluster, registry, _d) = dev_setup();
    let token = cluster.mint_token("prod", "api", None, 300).unwrap();
    again
        .attest("k8s_sat", &token, registry.snapshot(), &serde_json::json!({}))
        .unwrap();
    assert_ne!(
        std::fs::read(&artifacts[0]).unwrap(),
        bytes,
        "rewritten with an authentic artifact"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

fn castellan_sha(bytes: &[u8]) -> String {
    crate::util::sha256_hex(bytes)
}
