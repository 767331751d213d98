//! The `tpm` attestor through the real binary against real software TPMs:
//! each test manufactures swtpm instances with EK certificates from a CA it
//! creates, asks the challenge endpoint for a credential, activates it and
//! quotes PCRs in the TPM (tss-esapi), and posts the evidence for an SVID.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use castellan_tpm::client::Attestor;
use castellan_tpm::testing::{Ca, SwTpm};
use serde_json::{Value, json};
use support::Server;

const PCRS: [u32; 3] = [0, 7, 16];

/// A manufactured TPM and its attestor (dropped before the TPM).
struct Machine {
    attestor: Attestor,
    ek_cert: Vec<u8>,
    tpm: SwTpm,
}

impl Machine {
    fn new(ca: &Ca) -> Self {
        let tpm = SwTpm::manufacture(ca);
        let mut attestor = Attestor::connect(&tpm.tcti()).unwrap();
        let ek_cert = attestor.ek_certificate().unwrap().expect("an EK certificate");
        Self {
            attestor,
            ek_cert,
            tpm,
        }
    }

    fn ek_sha256(&self) -> String {
        let ek = castellan_tpm::wire::Public::from_tpm2b(self.attestor.ek_public()).unwrap();
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ek.tpmt_bytes()))
    }
}

fn pem(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
        lines.join("\n")
    )
}

/// Asks for a challenge presenting `ek_of`'s EK (certificate and public
/// area) and `ak_of`'s AK; returns the response body.
fn challenge(server: &Server, ek_of: &Machine, ak_of: &Machine) -> support::Resp {
    server.post(
        "/api/v1/attestation/challenges",
        &json!({
            "method": "tpm",
            "ek_certificate": STANDARD.encode(&ek_of.ek_cert),
            "ek_public": STANDARD.encode(ek_of.attestor.ek_public()),
            "ak_public": STANDARD.encode(ak_of.attestor.ak_public()),
        }),
        None,
    )
}

/// A CSR and the SHA-256 of its key's SubjectPublicKeyInfo.
fn csr() -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let pem = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    (pem, <sha2::Sha256 as sha2::Digest>::digest(spki).to_vec())
}

/// The quote's qualifying data for a challenge nonce and a key: binds the
/// quote to the key being certified.
fn qualifying(c: &Value, key_sha256: &[u8]) -> Vec<u8> {
    let mut data = STANDARD.decode(c["nonce"].as_str().unwrap()).unwrap();
    data.extend_from_slice(key_sha256);
    <sha2::Sha256 as sha2::Digest>::digest(&data).to_vec()
}

/// Answers a challenge with `m`'s TPM for the key `key_sha256`: activate,
/// quote.
fn answer(m: &mut Machine, c: &Value, key_sha256: &[u8]) -> Value {
    let blob = STANDARD.decode(c["credential_blob"].as_str().unwrap()).unwrap();
    let secret = STANDARD.decode(c["encrypted_secret"].as_str().unwrap()).unwrap();
    let activated = m.attestor.activate_credential(&blob, &secret).unwrap();
    let quote = m.attestor.quote(&qualifying(c, key_sha256), &PCRS).unwrap();
    let pcrs: serde_json::Map<String, Value> = quote
        .pcrs
        .iter()
        .map(|(i, v)| (i.to_string(), Value::String(hex::encode(v))))
        .collect();
    json!({
        "challenge_id": c["challenge_id"], "activated_secret": STANDARD.encode(activated),
        "attest": STANDARD.encode(&quote.attest), "signature": STANDARD.encode(&quote.signature),
        "pcrs": pcrs,
    })
}

fn issue(server: &Server, evidence: &Value, csr: &str) -> support::Resp {
    server.post(
        "/api/v1/workloads/attested-issuance",
        &json!({ "method": "tpm", "evidence": evidence.to_string(), "csr": csr }),
        None,
    )
}

/// A server trusting `ca` for the tpm method, allowing `allowed` EKs, with
/// an optional PCR policy.
fn server_for(tmp: &std::path::Path, ca: &Ca, allowed: &[String], pcr_policy: Option<Value>) -> Server {
    let allowed = allowed.to_vec();
    let policies = support::policies_with(tmp, "policies", move |d| {
        d["castellan"]["issuance"]["tpm"]["allowed_ek_sha256"] = json!(allowed)
    });
    let server = Server::dev_in(&tmp.join("data"), &["--policies", policies.to_str().unwrap()]);
    let mut source = json!({
        "name": "swtpm-manufacturer", "method": "tpm",
        "certificates": format!("{}{}", pem(&ca.root()), pem(&ca.intermediate())),
    });
    if let Some(p) = pcr_policy {
        source["settings"] = json!({ "pcr_policy": p });
    }
    let r = server.post_admin("/api/v1/trust-sources", &source);
    assert_eq!(r.status, 201, "{}", r.body);
    server
}

#[test]
fn a_genuine_quote_issues_and_forgeries_do_not() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let mut first = Machine::new(&ca);
    let mut second = Machine::new(&ca);
    let server = server_for(tmp.path(), &ca, &[first.ek_sha256(), second.ek_sha256()], None);

    // Genuine: the credential activates and the quote verifies.
    let (csr_pem, key) = csr();
    let c = challenge(&server, &first, &first);
    assert_eq!(c.status, 201, "{}", c.body);
    let evidence = answer(&mut first, &c.body, &key);
    let r = issue(&server, &evidence, &csr_pem);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        format!("spiffe://example.org/tpm/{}", first.ek_sha256())
    );
    assert!(
        r.body["attestation"]["selectors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("tpm:pcr:7:")),
        "{}",
        r.body
    );

    // Replay: the nonce (the challenge) was used.
    issue(&server, &evidence, &csr_pem).assert_problem(403, "attestation-failed");
    // Bound to the key: a genuine quote presented with another CSR fails.
    let c = challenge(&server, &first, &first);
    let evidence = answer(&mut first, &c.body, &key);
    let (other_csr, _) = csr();
    issue(&server, &evidence, &other_csr).assert_problem(403, "attestation-failed");

    // The second TPM presents the first's EK certificate with its own EK
    // public area: the certificate does not certify that EK.
    let r = server.post(
        "/api/v1/attestation/challenges",
        &json!({
            "method": "tpm", "ek_certificate": STANDARD.encode(&first.ek_cert),
            "ek_public": STANDARD.encode(second.attestor.ek_public()),
            "ak_public": STANDARD.encode(second.attestor.ak_public()),
        }),
        None,
    );
    r.assert_problem(422, "invalid-challenge-request");
    // ...or the first's EK entirely with its own AK: it cannot activate a
    // credential wrapped to the first TPM's EK, so the best it can send is
    // a guessed secret with its own quote.
    let c = challenge(&server, &first, &second);
    assert_eq!(c.status, 201, "{}", c.body);
    let blob = STANDARD
        .decode(c.body["credential_blob"].as_str().unwrap())
        .unwrap();
    let wrapped = STANDARD
        .decode(c.body["encrypted_secret"].as_str().unwrap())
        .unwrap();
    assert!(second.attestor.activate_credential(&blob, &wrapped).is_err());
    let quote = second.attestor.quote(&qualifying(&c.body, &key), &PCRS).unwrap();
    let forged = json!({
        "challenge_id": c.body["challenge_id"], "activated_secret": STANDARD.encode([7u8; 32]),
        "attest": STANDARD.encode(&quote.attest), "signature": STANDARD.encode(&quote.signature),
        "pcrs": quote.pcrs.iter().map(|(i, v)| (i.to_string(), Value::String(hex::encode(v)))).collect::<serde_json::Map<_, _>>(),
    });
    let r = issue(&server, &forged, &csr_pem);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("activated secret"),
        "{}",
        r.body
    );

    // A PCR value changed after quoting fails the quote's digest.
    let c = challenge(&server, &second, &second);
    let mut evidence = answer(&mut second, &c.body, &key);
    evidence["pcrs"]["16"] = Value::String("ab".repeat(32));
    issue(&server, &evidence, &csr_pem).assert_problem(403, "attestation-failed");

    // Garbage never reaches a 5xx.
    for junk in [
        json!({}),
        json!({"challenge_id": "x"}),
        json!("text"),
        json!([1, 2]),
    ] {
        let r = issue(&server, &junk, &csr_pem);
        assert!((400..500).contains(&r.status), "{junk}: {} {}", r.status, r.body);
    }
    assert_eq!(server.certificates().len(), 1);
}

#[test]
fn a_pcr_policy_and_the_manufacturer_roots_are_enforced() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let mut m = Machine::new(&ca);
    // The policy pins PCR 16 to its reset value (all zeros).
    let server = server_for(
        tmp.path(),
        &ca,
        &[m.ek_sha256()],
        Some(json!({ "16": "00".repeat(32) })),
    );
    let (csr_pem, key) = csr();
    let c = challenge(&server, &m, &m);
    let r = issue(&server, &answer(&mut m, &c.body, &key), &csr_pem);
    assert_eq!(r.status, 201, "{}", r.body);

    // PCR 16 extended: a genuine quote of a changed machine is refused.
    m.tpm.extend_pcr(16, &[0x42; 32]);
    let c = challenge(&server, &m, &m);
    let r = issue(&server, &answer(&mut m, &c.body, &key), &csr_pem);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("pcr_policy"),
        "{}",
        r.body
    );

    // A TPM whose EK certificate comes from a CA the trust source does not hold.
    let rogue_ca = Ca::new();
    let mut rogue = Machine::new(&rogue_ca);
    let tmp2 = tempfile::tempdir().unwrap();
    let server2 = server_for(tmp2.path(), &ca, &[rogue.ek_sha256()], None);
    let c = challenge(&server2, &rogue, &rogue);
    assert_eq!(c.status, 201, "{}", c.body);
    let r = issue(&server2, &answer(&mut rogue, &c.body, &key), &csr_pem);
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("certificate"),
        "{}",
        r.body
    );
    assert_eq!(server2.certificates().len(), 0);
}

/// The hex SHA-256 of the EK of the TPM behind `tcti` (the attestor is
/// dropped, and its handles flushed, before this returns).
#[cfg(feature = "tpm")]
fn ek_sha256_of(tpm: &SwTpm) -> String {
    let attestor = Attestor::connect(&tpm.tcti()).unwrap();
    let ek = castellan_tpm::wire::Public::from_tpm2b(attestor.ek_public()).unwrap();
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ek.tpmt_bytes()))
}

/// `castellan tpm evidence` through the real binary: it asks for the
/// challenge, answers it in the TPM for the CSR's key and writes evidence
/// that issues exactly once, leaving no handle in the TPM.
#[cfg(feature = "tpm")]
#[test]
fn the_cli_answers_a_challenge_with_the_tpm() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let tpm = SwTpm::manufacture(&ca);
    let ek_sha256 = ek_sha256_of(&tpm);
    let server = server_for(tmp.path(), &ca, std::slice::from_ref(&ek_sha256), None);
    let (csr_pem, _) = csr();
    let csr_file = tmp.path().join("csr.pem");
    std::fs::write(&csr_file, &csr_pem).unwrap();
    let evidence_file = tmp.path().join("evidence.json");

    let out = support::castellan()
        .args(["tpm", "evidence", "--addr", &server.base, "--tcti", &tpm.tcti()])
        .arg("--csr")
        .arg(&csr_file)
        .args(["--pcrs", "16,0,7"])
        .arg("--output")
        .arg(&evidence_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "the evidence goes to --output only");
    assert_eq!(tpm.handles("handles-transient"), Vec::<String>::new());
    assert_eq!(tpm.handles("handles-saved-session"), Vec::<String>::new());
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&evidence_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&evidence_file).unwrap();
    let evidence: Value = serde_json::from_str(&text).unwrap();
    let mut quoted: Vec<&str> = evidence["pcrs"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    quoted.sort_unstable();
    assert_eq!(quoted, ["0", "16", "7"]);

    // The file's text as it is, as `jq --rawfile` would post it.
    let issue_text = || {
        server.post(
            "/api/v1/workloads/attested-issuance",
            &json!({ "method": "tpm", "evidence": text, "csr": csr_pem }),
            None,
        )
    };
    let r = issue_text();
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        format!("spiffe://example.org/tpm/{ek_sha256}")
    );
    assert!(
        r.body["attestation"]["selectors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_str().unwrap().starts_with("tpm:pcr:16:")),
        "{}",
        r.body
    );
    // The evidence answered one challenge: a second use is refused.
    issue_text().assert_problem(403, "attestation-failed");
    assert_eq!(server.certificates().len(), 1);

    // Without --output the evidence is the only thing on stdout, and
    // `svid issue --key` certifies the key it is bound to.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let key_file = tmp.path().join("host.key");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();
    let host_csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    std::fs::write(&csr_file, &host_csr).unwrap();
    let out = support::castellan()
        .args(["tpm", "evidence", "--addr", &server.base, "--tcti", &tpm.tcti()])
        .arg("--csr")
        .arg(&csr_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let evidence: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(evidence["pcrs"].as_object().unwrap().len(), 8);
    let out_dir = tmp.path().join("svid");
    let mut child = support::castellan()
        .args([
            "svid",
            "issue",
            "--addr",
            &server.base,
            "--method",
            "tpm",
            "--evidence-file",
            "-",
        ])
        .arg("--key")
        .arg(&key_file)
        .arg("--out-dir")
        .arg(&out_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), &out.stdout).unwrap();
    let issued = child.wait_with_output().unwrap();
    assert!(
        issued.status.success(),
        "{}",
        String::from_utf8_lossy(&issued.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&issued.stdout).trim(),
        format!("spiffe://example.org/tpm/{ek_sha256}")
    );
    let svid = std::fs::read(out_dir.join("svid.pem")).unwrap();
    let leaf = rustls_pemfile::certs(&mut svid.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    assert_eq!(
        cert.public_key().raw,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
    assert!(
        !out_dir.join("svid.key").exists(),
        "the caller's key stays where it is"
    );

    assert_eq!(server.certificates().len(), 2);
}

/// A TPM the CLI cannot reach is a non-zero exit with an `error:` line
/// saying so (before any server is asked: nothing listens at the address).
#[cfg(feature = "tpm")]
#[test]
fn the_cli_says_which_tpm_it_cannot_use() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (csr_pem, _) = csr();
    let csr_file = tmp.path().join("csr.pem");
    std::fs::write(&csr_file, &csr_pem).unwrap();
    let closed = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let addr = format!("http://127.0.0.1:{}", closed());
    let evidence = |tcti: &str| {
        let out = support::castellan()
            .args(["tpm", "evidence", "--addr", &addr, "--tcti", tcti])
            .arg("--csr")
            .arg(&csr_file)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(out.stdout.is_empty());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let bad_tcti = format!("swtpm:host=127.0.0.1,port={}", closed());
    let stderr = evidence(&bad_tcti);
    assert!(
        stderr.contains(&format!("error: cannot use a TPM through TCTI `{bad_tcti}`")),
        "{stderr}"
    );
    let stderr = evidence("nonsense");
    assert!(
        stderr.contains("error: cannot use a TPM through TCTI `nonsense`"),
        "{stderr}"
    );
}

/// A TPM whose vendor wrote no EK certificate sends its EK public area
/// alone. The server trusts that EK only when a tpm trust source enrolls
/// its hash (as `castellan tpm ek` prints it); then the CLI's evidence
/// issues, with the RSA-2048 EK or the P-256 one, and so does the attestor
/// bench's.
#[cfg(feature = "tpm")]
#[test]
fn a_tpm_without_an_ek_certificate_is_trusted_once_enrolled() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let blank = SwTpm::blank();
    let ek_of = |kind: &str| {
        let out = support::castellan()
            .args(["tpm", "ek", "--tcti", &blank.tcti(), "--ek", kind])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(stderr.contains("EK has no certificate"), "{stderr}");
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let ek_sha256 = ek_of("auto");
    assert_eq!(ek_sha256, ek_sha256_of(&blank));
    // The TPM's P-256 EK is another key, so another identity.
    let ecc_sha256 = ek_of("ecc");
    assert_eq!(ecc_sha256.len(), 64);
    assert_ne!(ecc_sha256, ek_sha256);

    // Trusted manufacturers only (and policy allows the EKs): refused.
    let ca = Ca::new();
    let _certified = SwTpm::manufacture(&ca);
    let server = server_for(tmp.path(), &ca, &[ek_sha256.clone(), ecc_sha256.clone()], None);
    let (csr_pem, _) = csr();
    let csr_file = tmp.path().join("csr.pem");
    std::fs::write(&csr_file, &csr_pem).unwrap();
    let evidence_with = |kind: &str, digest: &str| {
        let out = support::castellan()
            .args(["tpm", "evidence", "--addr", &server.base, "--tcti", &blank.tcti()])
            .args(["--ek", kind, "--csr"])
            .arg(&csr_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("enrolls EK {digest}")), "{stderr}");
        String::from_utf8(out.stdout).unwrap()
    };
    let evidence = || evidence_with("auto", &ek_sha256);
    let issue = |evidence: &str| {
        server.post(
            "/api/v1/workloads/attested-issuance",
            &json!({ "method": "tpm", "evidence": evidence, "csr": csr_pem }),
            None,
        )
    };
    let r = issue(&evidence());
    r.assert_problem(403, "attestation-failed");
    assert!(
        r.body["detail"].as_str().unwrap().contains("enrolls its EK"),
        "{}",
        r.body
    );

    // Enrollment is checked when the source is made.
    for (settings, method) in [
        (json!({ "enrolled_ek_sha256": ["abc"] }), "tpm"),
        (json!({ "enrolled_ek_sha256": [] }), "tpm"),
        (json!({ "enrolled_ek_sha256": ek_sha256 }), "tpm"),
        (json!({ "enrolled_ek_sha256": [ek_sha256] }), "x509pop"),
    ] {
        let r = server.post_admin(
            "/api/v1/trust-sources",
            &json!({ "name": "bad", "method": method, "settings": settings }),
        );
        assert_eq!(r.status, 422, "{settings} for {method}: {}", r.body);
    }
    // A source enrolling other machines: still refused.
    let someone_else = "ab".repeat(32);
    let r = server.post_admin(
        "/api/v1/trust-sources",
        &json!({
            "name": "enrolled-hosts", "method": "tpm",
            "settings": { "enrolled_ek_sha256": [someone_else] },
        }),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["id"].as_str().unwrap().to_owned();
    issue(&evidence()).assert_problem(403, "attestation-failed");
    // Enrolling it changes the source's settings at once (a bad list
    // changes nothing); digests are compared without regard to case.
    let rotate = |settings: Value| {
        server.post_admin(
            &format!("/api/v1/trust-sources/{id}/rotate"),
            &json!({ "settings": settings }),
        )
    };
    rotate(json!({ "enrolled_ek_sha256": ["nope"] })).assert_problem(422, "invalid-trust-source");
    rotate(json!({})).assert_problem(422, "invalid-trust-source");
    let r = rotate(json!({ "enrolled_ek_sha256": [someone_else, ek_sha256.to_uppercase()] }));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = issue(&evidence());
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        format!("spiffe://example.org/tpm/{ek_sha256}")
    );
    let issued = server
        .audit()
        .into_iter()
        .rev()
        .find(|e| e["kind"] == "issuance.issued")
        .unwrap();
    assert!(issued.to_string().contains("tpm:ek_trust:enrolled"), "{issued}");
    // Struck off: refused again.
    let r = rotate(json!({ "enrolled_ek_sha256": [someone_else] }));
    assert_eq!(r.status, 200, "{}", r.body);
    issue(&evidence()).assert_problem(403, "attestation-failed");
    assert_eq!(server.certificates().len(), 1);

    // The P-256 EK: the server shares the credential's seed by ECDH.
    issue(&evidence_with("ecc", &ecc_sha256)).assert_problem(403, "attestation-failed");
    let r = rotate(json!({ "enrolled_ek_sha256": [ecc_sha256] }));
    assert_eq!(r.status, 200, "{}", r.body);
    let r = issue(&evidence_with("ecc", &ecc_sha256));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(
        r.body["spiffe_id"],
        format!("spiffe://example.org/tpm/{ecc_sha256}")
    );
    issue(&evidence()).assert_problem(403, "attestation-failed");
    assert_eq!(server.certificates().len(), 2);

    // The bench enrolls a TPM it has no EK CA for.
    let out = support::castellan()
        .args(["bench", "attestors", "--addr", &server.base, "--token-file"])
        .arg(server.dir.join("admin.token"))
        .args(["--requests", "2", "--concurrency", "1", "--methods", "tpm"])
        .args(["--tpm-tcti", &blank.tcti()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.trim_start().starts_with("tpm ") && l.ends_with("[]")),
        "{stdout}"
    );
    assert_eq!(blank.handles("handles-transient"), Vec::<String>::new());
    assert_eq!(blank.handles("handles-saved-session"), Vec::<String>::new());
}

/// `castellan bench attestors` with a TPM: the tpm row's proofs all issue
/// (nothing refused), other methods run beside it, and the TPM is left
/// with no handles.
#[cfg(feature = "tpm")]
#[test]
fn the_attestor_bench_measures_the_tpm_method() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let tpm = SwTpm::manufacture(&ca);
    let ek_ca = tmp.path().join("ek-ca.pem");
    std::fs::write(&ek_ca, format!("{}{}", pem(&ca.root()), pem(&ca.intermediate()))).unwrap();
    let server = Server::dev_in(&tmp.path().join("data"), &[]);
    let out = support::castellan()
        .args(["bench", "attestors", "--addr", &server.base, "--token-file"])
        .arg(server.dir.join("admin.token"))
        .args([
            "--requests",
            "4",
            "--concurrency",
            "2",
            "--methods",
            "tpm,join_token",
        ])
        .args(["--tpm-tcti", &tpm.tcti(), "--tpm-ek-ca"])
        .arg(&ek_ca)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<&str> = stdout.lines().filter(|l| l.ends_with("[]")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(rows[0].trim_start().starts_with("tpm "), "{stdout}");
    assert!(rows[1].trim_start().starts_with("join_token "), "{stdout}");
    assert_eq!(tpm.handles("handles-transient"), Vec::<String>::new());
    assert_eq!(tpm.handles("handles-saved-session"), Vec::<String>::new());
    assert_eq!(server.certificates().len(), 8);
    // It removed the trust source it registered.
    let sources = server.get_admin("/api/v1/trust-sources");
    assert_eq!(sources.status, 200, "{}", sources.body);
    assert!(
        !sources.body.to_string().contains("bench-tpm-"),
        "{}",
        sources.body
    );
}
