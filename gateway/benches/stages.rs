//! Per-stage cost of attested issuance, measured in-process: attest (WASM),
//! decide (Rego), sign, and CSR verification. Run with
//! `cargo bench -p castellan --bench stages`. Prints medians; asserts nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use castellan::attest::Attestors;
use castellan::config::SandboxConfig;
use castellan::policy::Policies;
use castellan::signer::{InProcessSigner, Signer, Template};
use castellan::spiffe_id::SpiffeId;
use castellan::trust::Registry;

fn median(name: &str, iters: usize, mut f: impl FnMut()) {
    let mut samples: Vec<Duration> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect();
    samples.sort();
    println!(
        "{name:<28} median {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs",
        us(samples[iters / 2]),
        us(samples[iters * 9 / 10]),
        us(samples[iters * 99 / 100])
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    sandbox::run();
    let dir = tempfile::tempdir().unwrap();
    let cluster = castellan::dev::DevCluster::load_or_create(dir.path()).unwrap();
    let registry = Arc::new(Registry::new(vec![cluster.trust_source()]).unwrap());
    let attestors = Attestors::embedded(&SandboxConfig::default()).unwrap();
    let token = cluster.mint_token("prod", "api", None, 3600).unwrap();
    let ctx = serde_json::json!({});
    median("attest k8s_sat (wasm)", 2000, || {
        attestors
            .attest("k8s_sat", &token, registry.snapshot(), &ctx)
            .unwrap();
    });
    let keys = registry.snapshot();
    let ks = keys.key_sets.values().next().unwrap().clone();
    median("  of which: host verify-jws", 2000, || {
        ks.verify_compact(&token).unwrap();
    });

    let policies = Policies::embedded().unwrap();
    let attestation = attestors
        .attest("k8s_sat", &token, registry.snapshot(), &ctx)
        .unwrap();
    let input = castellan::model::policy::IssuanceInput {
        version: castellan::model::policy::INPUT_VERSION,
        trust_domain: "example.org",
        attestation: &attestation,
        request: castellan::model::policy::IssuanceAsk {
            ttl_seconds: Some(600),
            dns_names: vec![],
        },
    };
    let snapshot = policies.snapshot();
    median("decide (rego)", 2000, || {
        snapshot.decide_issuance(&input).unwrap();
    });

    let ca = castellan::ca::load_or_create(&dir.path().join("ca"), "example.org", false).unwrap();
    let signer = InProcessSigner::new(&ca, "example.org").unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap();
    let template = Template {
        spiffe_id: SpiffeId::parse("spiffe://example.org/ns/prod/sa/api").unwrap(),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        ttl: time::Duration::seconds(600),
        dns_names: vec![],
        extensions: vec![],
    };
    median("sign x509-svid", 2000, || {
        signer.sign_x509_svid(&template).unwrap();
    });
    let pem = csr.pem().unwrap();
    median("verify csr", 2000, || {
        let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, c) =
            <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<
                _,
            >>::from_der(&p.contents)
            .unwrap();
        c.verify_signature().unwrap();
    });
}

/// Issue 5's figures: per-call overhead of the sandbox (instantiate + call,
/// no crypto: the fixture's well-behaved path), and activating a bundle of
/// six modules cold and from the precompiled cache.
mod sandbox {
    use super::*;
    use castellan::bundle::{Bundle, Bundles};

    const HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.wasm"));
    const K8S_SAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/k8s_sat.wasm"));
    const CI_JOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ci_job_attestor.wasm"));

    /// A distinct copy of a component: a trailing custom section changes its
    /// hash (so nothing is shared with another copy) but not its code.
    fn variant(module: &[u8], n: u8) -> Vec<u8> {
        let name = b"castellan-bench";
        let payload = [n];
        let mut out = module.to_vec();
        out.push(0); // custom section
        out.push((1 + name.len() + payload.len()) as u8);
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&payload);
        out
    }

    fn six_module_bundle() -> Bundle {
        let mut b = Bundle::embedded();
        let mut entries = Vec::new();
        for (i, base) in [K8S_SAT, CI_JOB, HOSTILE, K8S_SAT, CI_JOB, HOSTILE]
            .iter()
            .enumerate()
        {
            let bytes = variant(base, i as u8);
            let path = format!("attestors/m{i}.wasm");
            entries.push(serde_json::json!({
                "method": format!("m{i}"), "path": path, "sha256": castellan::util::sha256_hex(&bytes),
                "capabilities": ["crypto", "clock", "log"],
            }));
            b.files.insert(path, bytes);
        }
        let mut manifest: serde_json::Value = serde_json::from_slice(&b.files[".manifest"]).unwrap();
        manifest["attestors"] = serde_json::Value::Array(entries);
        b.files
            .insert(".manifest".into(), serde_json::to_vec(&manifest).unwrap());
        b
    }

    pub fn run() {
        let config = SandboxConfig::default();
        let attestors = Attestors::new(&config, &[]).unwrap();
        let module = attestors.compile("hostile", HOSTILE, &[]).unwrap();
        let modules: castellan::attest::ModuleSet = [("hostile".to_owned(), module)].into_iter().collect();
        let dir = tempfile::tempdir().unwrap();
        let cluster = castellan::dev::DevCluster::load_or_create(dir.path()).unwrap();
        let mut source = cluster.trust_source();
        source.method = "hostile".into();
        let registry = Arc::new(Registry::new(vec![source]).unwrap());
        let ctx = serde_json::json!({});
        median("sandbox call overhead", 5000, || {
            attestors
                .attest_in(&modules, "hostile", "ok", registry.snapshot(), &ctx)
                .unwrap();
        });

        let bundle = six_module_bundle();
        let cache = dir.path().join("cache");
        let activate = |label: &str| {
            let attestors = Arc::new(Attestors::with_cache_dir(&config, &[], Some(&cache)).unwrap());
            let t = Instant::now();
            let (bundles, _) = Bundles::start(attestors, "default", Bundle::embedded(), None).unwrap();
            let info = bundles.put("six", bundle.clone(), false);
            // `six` overlaps `default`'s roots; replace the default instead.
            drop(info);
            let info = bundles.put("default", bundle.clone(), false).unwrap();
            let took = t.elapsed();
            assert_eq!(info.attestors.len(), 6);
            println!("{label:<28} {:>8.1} ms", took.as_secs_f64() * 1000.0);
        };
        activate("activate 6 modules, cold");
        activate("activate 6 modules, cached");
        activate("activate 6 modules, cached");
    }
}
