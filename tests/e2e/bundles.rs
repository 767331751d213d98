//! Policy bundles through the real binary's CLI: build, sign, verify,
//! inspect; refusals of tampered, wrongly signed and unsigned bundles; and
//! `castellan policy test` failing on a failing Rego test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;

use support::castellan;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = castellan().args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn policies() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn keys(dir: &Path, name: &str) -> (String, String) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    std::fs::write(&private, k.serialize_pem()).unwrap();
    std::fs::write(&public, k.public_key_pem()).unwrap();
    (
        private.to_str().unwrap().to_owned(),
        public.to_str().unwrap().to_owned(),
    )
}

#[test]
fn build_sign_verify_inspect_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle.tar.gz");
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = run(&["bundle", "build", policies().to_str().unwrap(), "-o", out_s]);
    assert!(ok, "{err}");
    let (private, public) = keys(tmp.path(), "authors");
    let (_, other_public) = keys(tmp.path(), "stranger");

    let (ok, _, err) = run(&["bundle", "verify", out_s, "--key", &public]);
    assert!(!ok && err.contains("not signed"), "unsigned: {err}");

    let (ok, _, err) = run(&["bundle", "sign", out_s, "--key", &private, "--keyid", "authors-1"]);
    assert!(ok, "{err}");
    let (ok, stdout, err) = run(&["bundle", "verify", out_s, "--key", &public]);
    assert!(
        ok && stdout.contains("verified") && stdout.contains("authors-1"),
        "{stdout}{err}"
    );
    let (ok, _, err) = run(&["bundle", "verify", out_s, "--key", &other_public]);
    assert!(
        !ok && err.starts_with("error: ") && err.contains("does not verify"),
        "wrong key: {err}"
    );

    let (ok, stdout, _) = run(&["bundle", "inspect", out_s]);
    assert!(
        ok && stdout.contains("castellan-default-1") && stdout.contains("issuance.rego"),
        "{stdout}"
    );
    let (ok, json, _) = run(&["bundle", "inspect", out_s, "--json"]);
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert!(ok && v["signed"] == true && v["manifest"]["roots"][0] == "castellan");

    // Tamper with one file inside the signed archive, keep the signature.
    let mut files = unpack(&std::fs::read(&out).unwrap());
    let rego = files.iter_mut().find(|(p, _)| p == "issuance.rego").unwrap();
    rego.1 = b"package castellan.issuance\ndecision := {\"allow\": true, \"spiffe_id\": \"spiffe://example.org/x\", \"ttl_seconds\": 86400}\n".to_vec();
    let tampered = tmp.path().join("tampered.tar.gz");
    std::fs::write(&tampered, pack(&files)).unwrap();
    let (ok, _, err) = run(&["bundle", "verify", tampered.to_str().unwrap(), "--key", &public]);
    assert!(!ok && err.contains("does not match its signed hash"), "{err}");
}

#[test]
fn policy_test_fails_on_a_failing_rego_test() {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(policies()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        tmp.path().join("broken_test.rego"),
        "package castellan.broken_test\nimport rego.v1\nimport data.castellan.issuance\n\ntest_kube_system_is_allowed if {\n\td := issuance.decision with input as {\"version\": 1, \"trust_domain\": \"example.org\", \"attestation\": {\"method\": \"k8s_sat\", \"claims\": {\"namespace\": \"kube-system\", \"service_account\": \"x\"}}, \"request\": {\"ttl_seconds\": null}}\n\td.allow\n}\n",
    )
    .unwrap();
    let (ok, stdout, _) = run(&["policy", "test", tmp.path().to_str().unwrap()]);
    assert!(!ok, "a failing test fails the command");
    assert!(
        stdout.contains("FAIL data.castellan.broken_test.test_kube_system_is_allowed"),
        "{stdout}"
    );
    assert!(stdout.contains(" passed, 1 failed"), "{stdout}");
}

fn unpack(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
    use std::io::Read;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

fn pack(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::default(),
    ));
    for (path, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        builder.append_data(&mut h, path, data.as_slice()).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}
