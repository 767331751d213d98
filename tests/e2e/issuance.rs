//! Attested X.509-SVID issuance through the real binary: a real JWKS and
//! trust source, real tokens and CSRs, real path validation of the result.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use support::{Cluster, Server, csr, issuance_body, pem_certs};
use x509_parser::prelude::*;

const ISSUE: &str = "/api/v1/workloads/attested-issuance";

#[test]
fn happy_path_issues_a_valid_bound_x509_svid() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.prod.example");
    server.add_trust_source("prod", &cluster);
    let (key, csr_pem) = csr();
    let token = cluster.token("payments", "api");

    let r = server.post(ISSUE, &issuance_body(&token, &csr_pem, Some(600)), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let b = &r.body;
    assert_eq!(b["spiffe_id"], "spiffe://example.org/prod/ns/payments/sa/api");
    assert_eq!(b["attestation"]["method"], "k8s_sat");
    assert_eq!(b["attestation"]["subject"], "ns/payments/sa/api");
    let selectors: Vec<&str> = b["attestation"]["selectors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for s in [
        "k8s:ns:payments",
        "k8s:sa:api",
        "k8s:pod-name:api-7d9f8",
        "k8s:pod-uid:6a1b0c7e-0000-4000-8000-000000000002",
    ] {
        assert!(selectors.contains(&s), "missing selector {s}: {selectors:?}");
    }

    // Parse the leaf as an X.509-SVID the way a user's SPIFFE library would.
    let chain = pem_certs(b["chain_pem"].as_str().unwrap());
    // One tier by default, as a SPIRE server: the leaf, signed by the root
    // the bundle holds.
    assert_eq!(chain.len(), 1, "the leaf alone");
    assert_eq!(pem_certs(b["certificate_pem"].as_str().unwrap())[0], chain[0]);
    let chain_der: Vec<u8> = chain.concat();
    let svid = spiffe::X509Svid::parse_from_der(&chain_der, &key.serialize_der())
        .expect("spiffe crate accepts the SVID");
    assert_eq!(
        svid.spiffe_id().to_string(),
        "spiffe://example.org/prod/ns/payments/sa/api"
    );

    // Certificate fields, as the X.509-SVID standard asks.
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().raw,
        &rcgen::PublicKeyData::subject_public_key_info(&key)[..],
        "bound to the CSR's key"
    );
    let san = leaf.subject_alternative_name().unwrap().unwrap().value;
    let uris: Vec<_> = san
        .general_names
        .iter()
        .filter(|n| matches!(n, GeneralName::URI(_)))
        .collect();
    assert_eq!(uris.len(), 1, "exactly one URI SAN");
    let bc = leaf.basic_constraints().unwrap().unwrap().value;
    assert!(!bc.ca);
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let eku = leaf.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth);
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    let backdate = support::now() - leaf.validity().not_before.timestamp();
    assert!((0..=60).contains(&backdate), "NotBefore backdated {backdate}s");
    assert!((600..=660).contains(&lifetime), "lifetime {lifetime}s");
    assert!(leaf.raw_serial().len() >= 8, "serial of at least 64 bits");
    assert_eq!(b["serial"].as_str().unwrap(), hex_of(leaf.raw_serial()));

    // The chain validates to bundle_pem with a real path validator.
    let bundle = pem_certs(b["bundle_pem"].as_str().unwrap());
    let anchors: Vec<_> = bundle
        .iter()
        .map(|d| {
            webpki::anchor_from_trusted_cert(&rustls_pki_types::CertificateDer::from(d.as_slice()))
                .unwrap()
                .to_owned()
        })
        .collect();
    let leaf_der = rustls_pki_types::CertificateDer::from(chain[0].as_slice());
    let end_entity = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    let intermediates: [rustls_pki_types::CertificateDer<'_>; 0] = [];
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("chain validates to the bundle");

    // Recorded in the inventory and the audit log.
    let certs = server.certificates();
    assert_eq!(certs.len(), 1);
    assert_eq!(certs[0]["serial"], b["serial"]);
    assert_eq!(certs[0]["spiffe_id"], b["spiffe_id"]);
    assert_eq!(certs[0]["source"], "attested-issuance");
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "issuance.issued" && e["detail"]["serial"] == b["serial"])
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn ttl_is_the_smaller_of_request_and_policy_maximum() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.ttl.example");
    server.add_trust_source("ttl", &cluster);
    let lifetime = |ttl: Option<u64>| {
        let (_, csr_pem) = csr();
        let r = server.post(
            ISSUE,
            &issuance_body(&cluster.token("web", "frontend"), &csr_pem, ttl),
            None,
        );
        assert_eq!(r.status, 201, "{}", r.body);
        let der = pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
        let (_, c) = X509Certificate::from_der(&der).unwrap();
        c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
    };
    let default = lifetime(None);
    assert!(
        (900..=960).contains(&default),
        "default 15 minutes, got {default}"
    );
    let capped = lifetime(Some(86_400));
    assert!((3600..=3660).contains(&capped), "capped at 1 hour, got {capped}");
    let short = lifetime(Some(120));
    assert!((120..=180).contains(&short), "got {short}");
}

/// Each refusal: its status and problem type, nothing issued, the refusal audited.
#[test]
fn refusals_have_precise_problems_and_issue_nothing() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.refusals.example");
    server.add_trust_source("refusals", &cluster);
    let (_, good_csr) = csr();
    let now = support::now();

    let with = |patch: Value| {
        let mut c = cluster.claims("shop", "cart");
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        cluster.sign(&c)
    };

    // Forged: same kid and claims, signed by another key.
    let impostor = Cluster::new("https://k8s.refusals.example");
    let forged = impostor.token("shop", "cart");
    // alg none, HS256 keyed with the public JWK.
    let claims_b64 = URL_SAFE_NO_PAD.encode(cluster.claims("shop", "cart").to_string());
    let none = format!(
        "{}.{claims_b64}.",
        URL_SAFE_NO_PAD.encode(json!({"alg": "none", "kid": cluster.kid}).to_string())
    );
    let hs256 = {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = Some(cluster.kid.clone());
        let secret = jsonwebtoken::EncodingKey::from_secret(cluster.jwk().to_string().as_bytes());
        jsonwebtoken::encode(&h, &cluster.claims("shop", "cart"), &secret).unwrap()
    };
    let mut missing_ns = cluster.claims("shop", "cart");
    missing_ns["kubernetes.io"]
        .as_object_mut()
        .unwrap()
        .remove("namespace");
    missing_ns.as_object_mut().unwrap().remove("sub");

    let cases: Vec<(&str, String, u16, &str, &str)> = vec![
        ("forged signature", forged, 403, "attestation-failed", "signature"),
        ("alg none", none, 403, "attestation-failed", "not accepted"),
        (
            "HS256 with the public key",
            hs256,
            403,
            "attestation-failed",
            "not accepted",
        ),
        (
            "expired",
            with(json!({"exp": now - 3600, "iat": now - 7200, "nbf": now - 7200})),
            403,
            "attestation-failed",
            "expired",
        ),
        (
            "not yet valid",
            with(json!({"nbf": now + 3600, "iat": now})),
            403,
            "attestation-failed",
            "nbf",
        ),
        (
            "wrong issuer",
            with(json!({"iss": "https://evil.example"})),
            403,
            "attestation-failed",
            "not trusted",
        ),
        (
            "wrong audience",
            with(json!({"aud": ["someone-else"]})),
            403,
            "attestation-failed",
            "audience",
        ),
        (
            "missing claims",
            cluster.sign(&missing_ns),
            403,
            "attestation-failed",
            "namespace",
        ),
        (
            "missing exp",
            with(json!({"exp": null})),
            403,
            "attestation-failed",
            "exp",
        ),
        (
            "unknown kid",
            cluster.sign_with_kid(&cluster.claims("shop", "cart"), "rotated-away"),
            403,
            "attestation-failed",
            "kid",
        ),
        (
            "denied namespace",
            cluster.token("kube-system", "default"),
            403,
            "policy-denied",
            "kube-system",
        ),
        (
            "garbage evidence",
            "not-a-jwt".into(),
            403,
            "attestation-failed",
            "malformed",
        ),
    ];
    for (name, token, status, slug, needle) in &cases {
        let r = server.post(ISSUE, &issuance_body(token, &good_csr, None), None);
        r.assert_problem(*status, slug);
        let detail = r.body["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "{name}: detail `{detail}` should mention `{needle}`"
        );
        assert!(
            !detail.contains(token.as_str()) || token.len() < 20,
            "{name}: detail must not echo the token"
        );
    }
    let denied = server.post(
        ISSUE,
        &issuance_body(&cluster.token("kube-system", "x"), &good_csr, None),
        None,
    );
    assert_eq!(
        denied.body["reasons"][0],
        "namespace \"kube-system\" may not receive identities"
    );

    // Malformed requests.
    let token = cluster.token("shop", "cart");
    let (_, other_csr) = csr();
    let tampered_csr = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(other_csr.as_bytes()).unwrap();
        let mut der = pem.contents.clone();
        let n = der.len();
        der[n - 5] ^= 0x5a; // inside the signature
        pem_wrap("CERTIFICATE REQUEST", &der)
    };
    let r = server.post(
        ISSUE,
        &issuance_body(
            &token,
            "-----BEGIN CERTIFICATE REQUEST-----\nZ2FyYmFnZQ==\n-----END CERTIFICATE REQUEST-----\n",
            None,
        ),
        None,
    );
    r.assert_problem(400, "invalid-csr");
    let r = server.post(ISSUE, &issuance_body(&token, "hello", None), None);
    r.assert_problem(400, "invalid-csr");
    let r = server.post(ISSUE, &issuance_body(&token, &tampered_csr, None), None);
    r.assert_problem(400, "invalid-csr");
    assert!(r.body["detail"].as_str().unwrap().contains("signature"));
    server
        .post_raw(ISSUE, b"{not json".to_vec(), None)
        .assert_problem(400, "malformed-request");
    server
        .post(ISSUE, &json!({"method": "k8s_sat"}), None)
        .assert_problem(400, "malformed-request");
    server
        .post(ISSUE, &issuance_body(&token, &good_csr, Some(5)), None)
        .assert_problem(400, "malformed-request");
    let huge = json!({"method": "k8s_sat", "evidence": "a".repeat(200_000), "csr": good_csr});
    server
        .post(ISSUE, &huge, None)
        .assert_problem(413, "payload-too-large");
    let mut unknown = issuance_body(&token, &good_csr, None);
    unknown["method"] = "carrier_pigeon".into();
    server
        .post(ISSUE, &unknown, None)
        .assert_problem(422, "unknown-method");

    assert!(
        server.certificates().is_empty(),
        "nothing may be issued on any refusal"
    );
    let refused = server
        .audit()
        .iter()
        .filter(|e| e["kind"] == "issuance.refused")
        .count();
    // cases, the second denied request, 3 bad CSRs, 3 malformed bodies, 413, 422.
    let expected = cases.len() + 1 + 3 + 3 + 1 + 1;
    assert_eq!(refused, expected, "every refusal is audited");
    // The audit never stores the evidence.
    let audit_text = serde_json::to_string(&server.audit()).unwrap();
    assert!(!audit_text.contains(&token));
}

fn pem_wrap(label: &str, der: &[u8]) -> String {
    use base64::engine::general_purpose::STANDARD;
    let b64 = STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

#[test]
fn dev_cluster_tokens_work_through_the_cli() {
    let server = Server::dev();
    let out = support::castellan()
        .args(["dev", "token", "k8s", "--data-dir"])
        .arg(&server.dir)
        .args(["--namespace", "default", "--service-account", "demo"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "the token alone on stdout");

    let tmp = tempfile::tempdir().unwrap();
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let out_dir = tmp.path().join("svid");
    let out = support::castellan()
        .args(["svid", "issue", "--addr", &server.base, "--evidence-file"])
        .arg(&token_file)
        .arg("--out-dir")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "spiffe://example.org/ns/default/sa/demo"
    );
    let chain = std::fs::read(out_dir.join("svid.pem")).unwrap();
    let key_pem = std::fs::read_to_string(out_dir.join("svid.key")).unwrap();
    let key = rcgen::KeyPair::from_pem(&key_pem).unwrap();
    let der: Vec<u8> = pem_certs(std::str::from_utf8(&chain).unwrap()).concat();
    spiffe::X509Svid::parse_from_der(&der, &key.serialize_der()).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(out_dir.join("svid.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    // A refused request is one error line and a non-zero exit.
    std::fs::write(&token_file, "not-a-token").unwrap();
    let out = support::castellan()
        .args(["svid", "issue", "--addr", &server.base, "--evidence-file"])
        .arg(&token_file)
        .arg("--out-dir")
        .arg(tmp.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: 403 attestation-failed"), "{stderr}");
}

/// `svid issue --key` certifies a key the caller already holds, in the
/// PKCS#8 PEM that `openssl genpkey` writes (EC and RSA), and leaves it
/// where it is. A key in the older PKCS#1 form is refused before anything
/// is sent, with the conversion to use, so the evidence is not spent.
#[test]
fn svid_issue_certifies_a_key_the_caller_holds() {
    use rsa::pkcs1::EncodeRsaPrivateKey as _;
    use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
    let server = Server::dev();
    let tmp = tempfile::tempdir().unwrap();
    let join_token = |name: &str| {
        let r = server.post_admin("/api/v1/join-tokens", &json!({ "name": name }));
        assert_eq!(r.status, 201, "{}", r.body);
        let file = tmp.path().join(format!("{name}.token"));
        std::fs::write(&file, r.body["token"].as_str().unwrap()).unwrap();
        file
    };
    let issue = |token: &std::path::Path, key: &std::path::Path, out_dir: &std::path::Path| {
        support::castellan()
            .args(["svid", "issue", "--addr", &server.base, "--method", "join_token"])
            .arg("--evidence-file")
            .arg(token)
            .arg("--key")
            .arg(key)
            .arg("--out-dir")
            .arg(out_dir)
            .output()
            .unwrap()
    };

    let ec = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let rsa_key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let keys = [
        (
            "ec",
            ec.serialize_pem(),
            rcgen::PublicKeyData::subject_public_key_info(&ec),
        ),
        (
            "rsa",
            rsa_key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap()
                .to_string(),
            rsa_key.to_public_key().to_public_key_der().unwrap().into_vec(),
        ),
    ];
    for (name, pem, spki) in keys {
        let key_file = tmp.path().join(format!("{name}.key"));
        std::fs::write(&key_file, &pem).unwrap();
        let out_dir = tmp.path().join(format!("{name}-svid"));
        let out = issue(&join_token(name), &key_file, &out_dir);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("spiffe://example.org/host/{name}")
        );
        let chain = std::fs::read_to_string(out_dir.join("svid.pem")).unwrap();
        let leaf = pem_certs(&chain).remove(0);
        let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
        assert_eq!(cert.public_key().raw, spki.as_slice(), "{name}");
        assert!(
            !out_dir.join("svid.key").exists(),
            "{name}: the caller's key stays where it is"
        );
        assert_eq!(std::fs::read_to_string(&key_file).unwrap(), pem, "{name}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("for the key in {}", key_file.display())),
            "{stderr}"
        );
    }

    let old = tmp.path().join("pkcs1.key");
    std::fs::write(
        &old,
        rsa_key
            .to_pkcs1_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let token = join_token("pkcs1");
    let out = issue(&token, &old, &tmp.path().join("pkcs1-svid"));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not an unencrypted PKCS#8 PEM private key"),
        "{stderr}"
    );
    assert!(stderr.contains("openssl pkcs8 -topk8 -nocrypt"), "{stderr}");
    assert_eq!(server.certificates().len(), 2, "nothing was asked for");
    // The join token was not spent: converted, the key is certified.
    let converted = tmp.path().join("converted.key");
    std::fs::write(
        &converted,
        rsa_key
            .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let out = issue(&token, &converted, &tmp.path().join("pkcs1-svid"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The README's key-binding recipe through the binary: a dev cluster token
/// whose audience names a key (`castellan/key/<SHA-256 of its SPKI>`)
/// certifies that key with `svid issue --key` and is refused with another,
/// or with a new key made by the CLI.
#[test]
fn a_dev_token_bound_to_a_key_certifies_only_that_key() {
    let server = Server::dev();
    let tmp = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        rcgen::PublicKeyData::subject_public_key_info(&key),
    ));
    let out = support::castellan()
        .args(["dev", "token", "k8s", "--data-dir"])
        .arg(&server.dir)
        .args(["--namespace", "default", "--service-account", "web"])
        .args(["--audience", &format!("castellan/key/{digest}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = tmp.path().join("token");
    std::fs::write(&token, &out.stdout).unwrap();
    let issue = |key: Option<&rcgen::KeyPair>, dir: &str| {
        let mut cmd = support::castellan();
        cmd.args(["svid", "issue", "--addr", &server.base, "--evidence-file"])
            .arg(&token)
            .arg("--out-dir")
            .arg(tmp.path().join(dir));
        if let Some(key) = key {
            let file = tmp.path().join(format!("{dir}.key"));
            std::fs::write(&file, key.serialize_pem()).unwrap();
            cmd.arg("--key").arg(file);
        }
        cmd.output().unwrap()
    };

    for (key, dir) in [(Some(&other), "other"), (None, "fresh")] {
        let out = issue(key, dir);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("bound to another key"), "{dir}: {stderr}");
    }
    let out = issue(Some(&key), "bound");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "spiffe://example.org/ns/default/sa/web"
    );
    let chain = std::fs::read_to_string(tmp.path().join("bound/svid.pem")).unwrap();
    let leaf = pem_certs(&chain).remove(0);
    let (_, cert) = X509Certificate::from_der(&leaf).unwrap();
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
    );
    assert_eq!(server.certificates().len(), 1);
    // Once verified for its key, the token is still refused for another
    // (a verified token is remembered only with the key it binds).
    let out = issue(Some(&other), "other-again");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bound to another key"));
    assert_eq!(server.certificates().len(), 1);
}

/// The evidence cache's counter of `outcome` on /metrics.
fn evidence_lookups(server: &Server, outcome: &str) -> u64 {
    let (_, _, text) = server.get_text("/metrics");
    let needle = format!("castellan_evidence_cache_lookups_total{{outcome=\"{outcome}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Issue 18: a service-account token verified once is reused until it
/// expires, for any key it does not bind, and forgotten at once when its
/// trust source is revoked.
#[test]
fn a_verified_token_is_reused_until_its_trust_source_changes() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.reuse.example");
    let source = server.add_trust_source("reuse", &cluster);
    let token = cluster.token("payments", "api");
    let issue = || {
        let (_, c) = csr();
        server.post(ISSUE, &issuance_body(&token, &c, None), None)
    };
    assert_eq!(issue().status, 201);
    let hits = evidence_lookups(&server, "hit");
    for _ in 0..3 {
        let r = issue();
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(
            r.body["spiffe_id"],
            "spiffe://example.org/reuse/ns/payments/sa/api"
        );
    }
    assert_eq!(
        evidence_lookups(&server, "hit"),
        hits + 3,
        "the token was verified once"
    );
    // Each issuance is still decided, signed, recorded and audited.
    assert_eq!(server.certificates().len(), 4);
    // A token changed by one byte is not the same token.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let (_, c) = csr();
    server
        .post(ISSUE, &issuance_body(&forged, &c, None), None)
        .assert_problem(403, "attestation-failed");
    // Revoking the trust source forgets what it verified.
    let r = server.post_admin(&format!("/api/v1/trust-sources/{source}/revoke"), &json!({}));
    assert!(r.status < 300, "{}", r.body);
    let refused = issue();
    assert!(refused.status == 403 || refused.status == 422, "{}", refused.body);
    assert_eq!(server.certificates().len(), 4);
}

/// Writes a policy bundle directory with one `issuance.rego`.
fn policy_dir(root: &std::path::Path, name: &str, rego: &str) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(".manifest"),
        json!({"revision": format!("{name}-7"), "roots": ["castellan"]}).to_string(),
    )
    .unwrap();
    std::fs::write(dir.join("issuance.rego"), rego).unwrap();
    dir
}

#[test]
fn policies_dir_replaces_the_default_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let custom = policy_dir(
        tmp.path(),
        "custom",
        r#"package castellan.issuance
import rego.v1
ns := input.attestation.claims.namespace
decision := {"allow": true, "spiffe_id": sprintf("spiffe://%s/k8s/%s/%s", [input.trust_domain, ns, input.attestation.claims.service_account]), "ttl_seconds": 300} if ns == "allowed"
decision := {"allow": false, "reasons": [sprintf("only namespace allowed, not %s", [ns])]} if ns != "allowed"
"#,
    );
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", custom.to_str().unwrap()],
    );
    assert_eq!(server.get("/healthz", None).body["policy_revision"], "custom-7");
    let cluster = Cluster::new("https://k8s.custom.example");
    server.add_trust_source("custom", &cluster);
    let (_, c) = csr();
    let r = server.post(
        ISSUE,
        &issuance_body(&cluster.token("allowed", "svc"), &c, None),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/k8s/allowed/svc");
    let r = server.post(
        ISSUE,
        &issuance_body(&cluster.token("other", "svc"), &c, None),
        None,
    );
    r.assert_problem(403, "policy-denied");
    assert_eq!(r.body["reasons"][0], "only namespace allowed, not other");
}

#[test]
fn policy_errors_fail_closed() {
    let tmp = tempfile::tempdir().unwrap();
    // A policy that never finishes in time, one that answers outside the
    // trust domain, and one that allows without a lifetime.
    let slow = policy_dir(
        tmp.path(),
        "slow",
        r#"package castellan.issuance
import rego.v1
decision := {"allow": true, "spiffe_id": "spiffe://example.org/a", "ttl_seconds": 300} if {
    input.attestation.method == "k8s_sat"
    count([x | some x in numbers.range(1, 50000000); x % 7 == 3]) > 0
}
"#,
    );
    let foreign = policy_dir(
        tmp.path(),
        "foreign",
        "package castellan.issuance\ndecision := {\"allow\": true, \"spiffe_id\": \"spiffe://evil.org/x\", \"ttl_seconds\": 300}\n",
    );
    let no_ttl = policy_dir(
        tmp.path(),
        "nottl",
        "package castellan.issuance\ndecision := {\"allow\": true, \"spiffe_id\": \"spiffe://example.org/x\"}\n",
    );
    let cluster = Cluster::new("https://k8s.failclosed.example");
    for (dir, needle) in [
        (slow, "could not decide"),
        (foreign, "trust domain"),
        (no_ttl, "ttl_seconds"),
    ] {
        let data = tmp
            .path()
            .join(format!("data-{}", dir.file_name().unwrap().to_str().unwrap()));
        let server = Server::dev_in(&data, &["--policies", dir.to_str().unwrap()]);
        server.add_trust_source("fc", &cluster);
        let (_, c) = csr();
        let r = server.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None);
        r.assert_problem(500, "issuance-failed");
        assert!(r.body["detail"].as_str().unwrap().contains(needle), "{}", r.body);
        assert!(server.certificates().is_empty());
    }
}

#[test]
fn a_broken_policy_dir_stops_start_up_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let broken = policy_dir(
        tmp.path(),
        "broken",
        "package castellan.issuance\ndecision := {\n",
    );
    let out = support::castellan()
        .args(["dev", "--data-dir"])
        .arg(tmp.path().join("data"))
        .args(["--http-addr", "127.0.0.1:0", "--policies"])
        .arg(&broken)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && stderr.contains("issuance.rego"),
        "{stderr}"
    );
}

#[test]
fn rsa_signed_tokens_verify_and_legacy_tokens_are_accepted() {
    let server = Server::dev();
    for (i, alg) in [
        jsonwebtoken::Algorithm::RS256,
        jsonwebtoken::Algorithm::PS256,
        jsonwebtoken::Algorithm::RS512,
    ]
    .into_iter()
    .enumerate()
    {
        let cluster = Cluster::new_rsa(&format!("https://k8s.rsa{i}.example"), alg);
        server.add_trust_source(&format!("rsa{i}"), &cluster);
        let (_, c) = csr();
        let r = server.post(
            ISSUE,
            &issuance_body(&cluster.token("rsa", "svc"), &c, None),
            None,
        );
        assert_eq!(r.status, 201, "{alg:?}: {}", r.body);
        // An RSA key must not verify an EC-labelled token, nor the reverse.
        let impostor = Cluster::new_rsa(&format!("https://k8s.rsa{i}.example"), alg);
        let r = server.post(
            ISSUE,
            &issuance_body(&impostor.token("rsa", "svc"), &c, None),
            None,
        );
        r.assert_problem(403, "attestation-failed");
    }

    // A legacy (secret-based) service-account token: no pod selectors.
    let cluster = Cluster::new("https://k8s.legacy.example");
    server.add_trust_source("legacy", &cluster);
    let legacy = json!({
        "iss": cluster.issuer, "aud": "castellan", "exp": support::now() + 300,
        "sub": "system:serviceaccount:old:app",
        "kubernetes.io/serviceaccount/namespace": "old",
        "kubernetes.io/serviceaccount/service-account.name": "app",
    });
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.sign(&legacy), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/legacy/ns/old/sa/app");
    assert_eq!(
        r.body["attestation"]["selectors"],
        json!(["k8s:ns:old", "k8s:sa:app"])
    );
}
