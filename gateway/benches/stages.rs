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
        "{name:<28} median {:>8.1} µs  p90 {:>8.1} µs",
        us(samples[iters / 2]),
        us(samples[iters * 9 / 10])
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
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
    let input = serde_json::json!({
        "version": 1, "trust_domain": "example.org", "attestation": attestation,
        "request": {"ttl_seconds": 600, "dns_names": []},
    });
    median("decide (rego)", 2000, || {
        policies.decide_issuance(&input).unwrap();
    });

    let ca = castellan::ca::load_or_create(&dir.path().join("ca"), "example.org").unwrap();
    let signer = InProcessSigner::new(&ca).unwrap();
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
