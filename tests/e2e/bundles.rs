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

// ---- Loading into a running gateway -------------------------------------

use serde_json::{Value, json};
use support::{Cluster, Server, csr, issuance_body};

const ISSUE: &str = "/api/v1/workloads/attested-issuance";

/// A bundle directory copied from the default one, with `edit` applied.
fn bundle_dir(root: &Path, name: &str, edit: impl FnOnce(&Path)) -> std::path::PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(policies()).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    edit(&dir);
    dir
}

fn set_manifest(dir: &Path, manifest: Value) {
    std::fs::write(dir.join(".manifest"), manifest.to_string()).unwrap();
}

/// Builds and (optionally) signs a bundle directory; returns the archive bytes.
fn build_signed(dir: &Path, key: Option<&str>) -> Vec<u8> {
    let out = dir.with_extension("tar.gz");
    let (ok, _, err) = run(&[
        "bundle",
        "build",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    if let Some(k) = key {
        let (ok, _, err) = run(&["bundle", "sign", out.to_str().unwrap(), "--key", k]);
        assert!(ok, "{err}");
    }
    std::fs::read(out).unwrap()
}

/// `castellan serve` requiring bundles signed by `public`.
fn serve_verifying(tmp: &Path, public: &str, cluster: &Cluster) -> Server {
    std::fs::write(tmp.join("k8s.json"), cluster.jwks().to_string()).unwrap();
    let config = tmp.join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [bundles]\nkeys = [{{ public_key_file = \"{public}\" }}]\n\
             [[trust_sources]]\nname = \"c\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\naudiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n",
            cluster.issuer
        ),
    )
    .unwrap();
    Server::serve(&config, &tmp.join("data"))
}

fn issue(server: &Server, cluster: &Cluster, ns: &str) -> support::Resp {
    let (_, c) = csr();
    server.post(ISSUE, &issuance_body(&cluster.token(ns, "api"), &c, None), None)
}

fn revision(server: &Server) -> Value {
    server.get_admin("/api/v1/bundles").body["items"].clone()
}

#[test]
fn signed_bundles_load_and_bad_ones_are_refused_while_the_old_one_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = keys(tmp.path(), "authors");
    let (stranger, _) = keys(tmp.path(), "stranger");
    let cluster = Cluster::new("https://k8s.bundles.example");
    let server = serve_verifying(tmp.path(), &public, &cluster);
    assert_eq!(issue(&server, &cluster, "payments").status, 201);

    // v2 denies `payments`: build → sign → PUT → it decides at once.
    let v2 = bundle_dir(tmp.path(), "v2", |d| {
        set_manifest(d, json!({"revision": "v2", "roots": ["castellan"]}));
        let mut data: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("data.json")).unwrap()).unwrap();
        data["castellan"]["issuance"]["denied_namespaces"] = json!(["kube-system", "payments"]);
        std::fs::write(d.join("data.json"), data.to_string()).unwrap();
    });
    let r = server.put_admin("/api/v1/bundles/default", build_signed(&v2, Some(&private)));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["revision"], "v2");
    assert_eq!(r.body["signed"], true);
    issue(&server, &cluster, "payments").assert_problem(403, "policy-denied");
    assert_eq!(server.get("/healthz", None).body["policy_revision"], "v2");

    // Each bad bundle is refused and v2 keeps serving.
    let v3 = bundle_dir(tmp.path(), "v3", |d| {
        set_manifest(d, json!({"revision": "v3", "roots": ["castellan"]}))
    });
    let unsigned = build_signed(&v3, None);
    server
        .put_admin("/api/v1/bundles/default", unsigned)
        .assert_problem(422, "bundle-signature");
    let wrong_key = build_signed(&v3, Some(&stranger));
    server
        .put_admin("/api/v1/bundles/default", wrong_key)
        .assert_problem(422, "bundle-signature");
    let mut files = unpack(&build_signed(&v3, Some(&private)));
    files.iter_mut().find(|(p, _)| p == "data.json").unwrap().1 = br#"{"castellan": {"issuance": {"default_ttl_seconds": 900, "max_ttl_seconds": 3600, "denied_namespaces": []}}}"#.to_vec();
    server
        .put_admin("/api/v1/bundles/default", pack(&files))
        .assert_problem(422, "bundle-integrity");
    let overlapping = bundle_dir(tmp.path(), "team", |d| {
        for f in [
            "issuance.rego",
            "cloud_ci.rego",
            "hosts.rego",
            "ephemeral.rego",
            "broker.rego",
            "data.json",
        ] {
            std::fs::remove_file(d.join(f)).unwrap();
        }
        for f in std::fs::read_dir(d)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with("_test.rego"))
        {
            std::fs::remove_file(f.path()).unwrap();
        }
        set_manifest(d, json!({"revision": "t1", "roots": ["castellan/issuance"]}));
        std::fs::write(d.join("team.rego"), "package castellan.issuance.team\nx := 1\n").unwrap();
    });
    let r = server.put_admin("/api/v1/bundles/team", build_signed(&overlapping, Some(&private)));
    r.assert_problem(409, "bundle-conflict");
    assert!(r.body["detail"].as_str().unwrap().contains("overlaps"));
    server
        .put_admin("/api/v1/bundles/default", b"not a bundle".to_vec())
        .assert_problem(422, "bundle-invalid");
    assert_eq!(
        revision(&server)[0]["revision"],
        "v2",
        "the old bundle still serves"
    );
    issue(&server, &cluster, "payments").assert_problem(403, "policy-denied");
    assert_eq!(issue(&server, &cluster, "shop").status, 201);
    let audit = server.audit();
    assert_eq!(audit.iter().filter(|e| e["kind"] == "bundle.refused").count(), 5);
    assert_eq!(
        audit.iter().filter(|e| e["kind"] == "bundle.activated").count(),
        1
    );
}

#[test]
fn a_hot_swap_under_load_loses_nothing_and_mixes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = keys(tmp.path(), "authors");
    let cluster = Cluster::new("https://k8s.swap.example");
    let server = serve_verifying(tmp.path(), &public, &cluster);
    // Two bundles whose decisions differ in a way a half-loaded one would show:
    // A names identities /a/<ns>/<sa> with 600 s, B /b/<ns>/<sa> with 1200 s.
    let variant = |tag: &str, ttl: u64| {
        bundle_dir(tmp.path(), tag, |d| {
            set_manifest(d, json!({"revision": tag, "roots": ["castellan"]}));
            let rego = std::fs::read_to_string(d.join("issuance.rego")).unwrap();
            let rego = rego.replace("\"ns/%s/sa/%s\"", &format!("\"{tag}/%s/%s\""));
            std::fs::write(d.join("issuance.rego"), rego).unwrap();
            let mut data: Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("data.json")).unwrap()).unwrap();
            data["castellan"]["issuance"]["default_ttl_seconds"] = ttl.into();
            data["castellan"]["source_prefixes"]["c"] = "".into();
            std::fs::write(d.join("data.json"), data.to_string()).unwrap();
        });
        build_signed(&tmp.path().join(tag), Some(&private))
    };
    let (a, b) = (variant("a", 600), variant("b", 1200));
    assert_eq!(server.put_admin("/api/v1/bundles/default", a.clone()).status, 200);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut seen = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = issue(&server, &cluster, "swap");
                        let lifetime = if r.status == 201 {
                            let der = support::pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
                            let (_, c) = <x509_parser::certificate::X509Certificate as x509_parser::prelude::FromDer<_>>::from_der(&der).unwrap();
                            c.validity().not_after.timestamp() - c.validity().not_before.timestamp()
                        } else {
                            0
                        };
                        seen.push((r.status, r.body["spiffe_id"].as_str().unwrap_or("").to_owned(), lifetime));
                    }
                    seen
                })
            })
            .collect();
        for i in 0..10 {
            let bundle = if i % 2 == 0 { b.clone() } else { a.clone() };
            assert_eq!(server.put_admin("/api/v1/bundles/default", bundle).status, 200);
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect::<Vec<_>>()
    });
    assert!(results.len() > 20, "load ran: {}", results.len());
    let (mut saw_a, mut saw_b) = (false, false);
    for (status, id, lifetime) in &results {
        assert_eq!(*status, 201, "no request lost during swaps");
        // Identity shape and lifetime must come from the same bundle.
        match id.as_str() {
            "spiffe://example.org/a/swap/api" => {
                saw_a = true;
                assert!((600..=660).contains(lifetime), "A's id with lifetime {lifetime}");
            }
            "spiffe://example.org/b/swap/api" => {
                saw_b = true;
                assert!(
                    (1200..=1260).contains(lifetime),
                    "B's id with lifetime {lifetime}"
                );
            }
            other => panic!("unexpected identity {other}"),
        }
    }
    assert!(saw_a && saw_b, "both bundles served");
}

/// The hostile fixtures (built by gateway/build.rs, never shipped).
const HOSTILE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hostile.wasm"));
const WASI_FS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/wasi_fs.wasm"));
/// The real k8s_sat module, which imports `crypto` and `clock`.
const K8S_SAT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/k8s_sat.wasm"));

fn module_bundle(tmp: &Path, name: &str, module: &[u8], capabilities: &[&str]) -> Vec<u8> {
    let dir = tmp.join(name);
    std::fs::create_dir_all(dir.join("attestors")).unwrap();
    std::fs::write(dir.join("attestors/mod.wasm"), module).unwrap();
    std::fs::write(dir.join("hostile.rego"), format!("package {name}\nx := 1\n")).unwrap();
    set_manifest(
        &dir,
        json!({"revision": "h1", "roots": [name], "attestors": [{"method": "hostile", "path": "attestors/mod.wasm", "capabilities": capabilities}]}),
    );
    build_signed(&dir, None)
}

#[test]
fn hostile_modules_in_a_bundle_fail_closed_while_others_keep_working() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::dev_in(&tmp.path().join("data"), &[]);
    let cluster = Cluster::new("https://k8s.hostile.example");
    server.add_trust_source("k8s", &cluster);

    // A module importing WASI filesystem, or a capability it was not granted, never loads.
    let r = server.put_admin(
        "/api/v1/bundles/fs",
        module_bundle(tmp.path(), "fs", WASI_FS, &["crypto", "clock", "log"]),
    );
    r.assert_problem(422, "bundle-invalid");
    assert!(r.body["detail"].as_str().unwrap().contains("wasi:"), "{}", r.body);
    let r = server.put_admin(
        "/api/v1/bundles/ungranted",
        module_bundle(tmp.path(), "ungranted", K8S_SAT, &["log"]),
    );
    r.assert_problem(422, "bundle-invalid");
    assert!(
        r.body["detail"].as_str().unwrap().contains("does not grant"),
        "{}",
        r.body
    );

    let r = server.put_admin(
        "/api/v1/bundles/hostile",
        module_bundle(tmp.path(), "hostile", HOSTILE, &["crypto", "clock", "log"]),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The method needs a trust source before the module is called.
    let mut source =
        json!({"name": "h", "method": "hostile", "issuer": "x", "audiences": ["x"], "jwks": cluster.jwks()});
    assert_eq!(
        server.post_admin("/api/v1/trust-sources", &source.take()).status,
        201
    );

    let (_, c) = csr();
    let hostile = |evidence: &str| {
        let body = json!({"method": "hostile", "evidence": evidence, "csr": c});
        server.post(ISSUE, &body, None)
    };
    // Well-behaved: the module answers, and the default policy has no rule for it.
    hostile("ok").assert_problem(403, "policy-denied");
    std::thread::scope(|s| {
        let good = s.spawn(|| {
            (0..20)
                .map(|_| issue_ok(&server, &cluster))
                .filter(|ok| *ok)
                .count()
        });
        for (evidence, needle) in [
            ("loop", "time limit"),
            ("alloc", "memory limit"),
            ("recurse", "stack"),
            ("panic", "trapped"),
            ("huge-subject", "subject"),
            ("many-selectors", "selectors"),
        ] {
            let r = hostile(evidence);
            r.assert_problem(500, "issuance-failed");
            assert!(
                r.body["detail"].as_str().unwrap().contains(needle),
                "{evidence}: {}",
                r.body
            );
        }
        assert_eq!(good.join().unwrap(), 20, "well-behaved requests kept succeeding");
    });
    assert!(
        server.certificates().iter().all(|c| c["method"] == "k8s_sat"),
        "nothing issued by a hostile call"
    );
}

fn issue_ok(server: &Server, cluster: &Cluster) -> bool {
    issue(server, cluster, "good").status == 201
}

#[test]
fn attestor_run_executes_a_module_in_the_sandbox() {
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("k8s_sat.wasm");
    std::fs::write(&module, K8S_SAT).unwrap();
    let cluster = Cluster::new("https://k8s.local.example");
    let config = tmp.path().join("config.json");
    std::fs::write(&config, json!({"trust_sources": [{"name": "local", "issuer": cluster.issuer, "audiences": ["castellan"], "jwks": cluster.jwks()}]}).to_string()).unwrap();
    let evidence = tmp.path().join("token");
    std::fs::write(&evidence, cluster.token("ci", "runner")).unwrap();
    let args = |e: &Path| {
        vec![
            "attestor".to_owned(),
            "run".into(),
            module.to_str().unwrap().into(),
            "--evidence".into(),
            e.to_str().unwrap().into(),
            "--config".into(),
            config.to_str().unwrap().into(),
        ]
    };
    let out = castellan().args(args(&evidence)).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let a: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(a["subject"], "ns/ci/sa/runner");
    std::fs::write(&evidence, "garbage").unwrap();
    let out = castellan().args(args(&evidence)).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: malformed evidence"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the crypto capability, the module does not load.
    let mut a = args(&evidence);
    a.extend(["--capabilities".into(), "clock,log".into()]);
    let out = castellan().args(a).output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not grant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn decisions_are_logged_in_opas_shape_with_masking() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.logs.example");
    std::fs::write(tmp.path().join("k8s.json"), cluster.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [decision_logs]\nenabled = true\nmask = [\"/attestation/claims/pod_uid\", \"/request/ttl_seconds\"]\n\
             [[trust_sources]]\nname = \"c\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\naudiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n",
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    assert_eq!(issue(&server, &cluster, "shop").status, 201);
    issue(&server, &cluster, "kube-system").assert_problem(403, "policy-denied");
    let log = tmp.path().join("data/decisions.log");
    assert!(support::eventually(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().count() >= 2)
            .unwrap_or(false)
    }));
    let lines: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let first = &lines[0];
    assert_eq!(first["path"], "castellan/issuance/decision");
    assert!(first["decision_id"].as_str().unwrap().len() >= 32);
    assert_eq!(first["bundles"]["default"]["revision"], "castellan-default-1");
    assert!(first["timestamp"].as_str().unwrap().starts_with("20"));
    assert_eq!(first["result"]["allow"], true);
    assert_eq!(first["input"]["attestation"]["claims"]["namespace"], "shop");
    assert!(
        first["input"]["attestation"]["claims"].get("pod_uid").is_none(),
        "masked"
    );
    assert!(first["input"]["request"].get("ttl_seconds").is_none(), "masked");
    assert_eq!(
        first["erased"],
        json!(["/attestation/claims/pod_uid", "/request/ttl_seconds"])
    );
    assert_eq!(lines[1]["result"]["allow"], false);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// examples/custom-attestor, built by gateway/build.rs.
const CI_JOB: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ci_job_attestor.wasm"));

#[test]
fn a_custom_attestor_is_built_bundled_signed_loaded_and_issues() {
    let tmp = tempfile::tempdir().unwrap();
    let (private, public) = keys(tmp.path(), "authors");
    let cluster = Cluster::new("https://k8s.custom.example");
    let server = serve_verifying(tmp.path(), &public, &cluster);

    // The default policies, the example's policy extension and its module.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/custom-attestor/bundle");
    let dir = bundle_dir(tmp.path(), "ci", |d| {
        std::fs::copy(example.join("ci_job.rego"), d.join("ci_job.rego")).unwrap();
        std::fs::create_dir_all(d.join("attestors")).unwrap();
        std::fs::write(d.join("attestors/ci_job.wasm"), CI_JOB).unwrap();
        set_manifest(
            d,
            json!({"revision": "ci-1", "roots": ["castellan"],
                   "attestors": [{"method": "ci_job", "path": "attestors/ci_job.wasm", "capabilities": ["crypto", "clock"],
                                  "config_schema": {"type": "object", "required": ["trust_sources"]}}]}),
        );
    });
    let r = server.put_admin("/api/v1/bundles/default", build_signed(&dir, Some(&private)));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["attestors"], json!(["ci_job"]));
    assert!(
        server.get("/healthz", None).body["attestors"]
            .as_array()
            .unwrap()
            .contains(&json!("ci_job"))
    );

    // A CI system's issuer, trusted for the new method.
    let ci = Cluster::new("https://ci.example.com");
    let source = json!({"name": "ci", "method": "ci_job", "issuer": ci.issuer, "audiences": ["castellan"], "jwks": ci.jwks()});
    assert_eq!(server.post_admin("/api/v1/trust-sources", &source).status, 201);
    let job_token = |git_ref: &str| {
        let now = support::now();
        ci.sign(&json!({"iss": ci.issuer, "aud": "castellan", "exp": now + 300, "iat": now, "repository": "acme/payments-api", "ref": git_ref}))
    };
    let (key, c) = csr();
    let r = server.post(
        ISSUE,
        &json!({"method": "ci_job", "evidence": job_token("refs/heads/main"), "csr": c}),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/ci/acme/payments-api");
    assert_eq!(
        r.body["attestation"]["selectors"],
        json!(["ci:repo:acme/payments-api", "ci:ref:refs/heads/main"])
    );
    let chain = support::pem_certs(r.body["chain_pem"].as_str().unwrap()).concat();
    spiffe::X509Svid::parse_from_der(&chain, &key.serialize_der()).unwrap();
    // Its policy extension applies, and k8s_sat still works beside it.
    let r = server.post(
        ISSUE,
        &json!({"method": "ci_job", "evidence": job_token("refs/heads/dev"), "csr": c}),
        None,
    );
    r.assert_problem(403, "policy-denied");
    let forged = Cluster::new("https://ci.example.com").sign(&json!({"iss": "https://ci.example.com", "aud": "castellan", "exp": support::now() + 60, "repository": "a/b", "ref": "refs/heads/main"}));
    server
        .post(
            ISSUE,
            &json!({"method": "ci_job", "evidence": forged, "csr": c}),
            None,
        )
        .assert_problem(403, "attestation-failed");
    let k8s = issue(&server, &cluster, "shop");
    assert_eq!(k8s.status, 201, "{}", k8s.body);
}

#[test]
fn a_watched_bundle_source_loads_at_start_and_reloads_on_change() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.watch.example");
    std::fs::write(tmp.path().join("k8s.json"), cluster.jwks().to_string()).unwrap();
    let dir = bundle_dir(tmp.path(), "watched", |d| {
        set_manifest(d, json!({"revision": "w1", "roots": ["castellan"]}))
    });
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [bundles]\nverification = \"off\"\nsources = [{{ name = \"default\", path = \"watched\" }}]\n\
             [[trust_sources]]\nname = \"c\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\naudiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n",
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let revision = || {
        server.get("/healthz", None).body["policy_revision"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert!(
        support::eventually(std::time::Duration::from_secs(10), || revision() == "w1"),
        "loaded at start"
    );
    assert_eq!(issue(&server, &cluster, "payments").status, 201);

    // Edit the directory: deny `payments`, new revision. The gateway picks it up.
    set_manifest(&dir, json!({"revision": "w2", "roots": ["castellan"]}));
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();
    data["castellan"]["issuance"]["denied_namespaces"] = json!(["payments"]);
    std::fs::write(dir.join("data.json"), data.to_string()).unwrap();
    assert!(
        support::eventually(std::time::Duration::from_secs(15), || revision() == "w2"),
        "reloaded on change"
    );
    issue(&server, &cluster, "payments").assert_problem(403, "policy-denied");

    // A broken edit is refused and audited; w2 keeps serving.
    std::fs::write(
        dir.join("broken.rego"),
        "package castellan.issuance\ndecision := {\n",
    )
    .unwrap();
    assert!(support::eventually(std::time::Duration::from_secs(15), || {
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "bundle.refused" && e["actor"].as_str().unwrap_or("").starts_with("watch:"))
    }));
    assert_eq!(revision(), "w2");
}

/// A bundle of `files` under `roots`, built unsigned for a server that
/// accepts unsigned bundles.
fn bundle_of(tmp: &Path, name: &str, roots: &[&str], files: &[(&str, &[u8])], attestors: Value) -> Vec<u8> {
    let dir = tmp.join(name);
    for (path, bytes) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, bytes).unwrap();
    }
    set_manifest(
        &dir,
        json!({"revision": format!("{name}-1"), "roots": roots, "attestors": attestors}),
    );
    build_signed(&dir, None)
}

/// Review item 3: root confinement uses the package the Rego parser reads
/// and covers data too; a bundle replaces a method Castellan serves only if
/// the operator allows that method. Every refusal leaves the old bundles
/// serving.
#[test]
fn bundles_stay_inside_their_roots_and_their_methods() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster::new("https://k8s.confine.example");
    std::fs::write(tmp.path().join("k8s.json"), cluster.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [bundles]\nverification = \"off\"\nreplaceable_methods = [\"x509pop\"]\n\
             [[trust_sources]]\nname = \"c\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\naudiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n",
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let before = revision(&server);
    let still_serving = || {
        assert_eq!(revision(&server), before, "the old bundles keep serving");
        issue(&server, &cluster, "kube-system").assert_problem(403, "policy-denied");
    };

    // A tab after `package`, and a raw string holding a decoy package line:
    // the parser reads `castellan.issuance`, outside the root `acme`.
    let decoy = "package\tcastellan.issuance\n\nimport rego.v1\n\nnote := `\npackage acme\n`\n\n\
                 decision := {\"allow\": true, \"spiffe_id\": \"spiffe://example.org/pwned\", \"ttl_seconds\": 600}\n";
    let r = server.put_admin(
        "/api/v1/bundles/acme",
        bundle_of(
            tmp.path(),
            "acme",
            &["acme"],
            &[("evil.rego", decoy.as_bytes())],
            json!([]),
        ),
    );
    r.assert_problem(422, "bundle-invalid");
    assert!(
        r.body["detail"].as_str().unwrap().contains("castellan.issuance"),
        "{}",
        r.body
    );
    still_serving();

    // Data outside the roots.
    let data = json!({"castellan": {"issuance": {"denied_namespaces": []}}}).to_string();
    let r = server.put_admin(
        "/api/v1/bundles/acme",
        bundle_of(
            tmp.path(),
            "acme-data",
            &["acme"],
            &[
                ("acme.rego", b"package acme\nx := 1\n"),
                ("data.json", data.as_bytes()),
            ],
            json!([]),
        ),
    );
    r.assert_problem(422, "bundle-invalid");
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("outside the bundle's roots"),
        "{}",
        r.body
    );
    still_serving();

    // A module for a built-in method.
    let takeover =
        json!([{"method": "k8s_sat", "path": "attestors/mod.wasm", "capabilities": ["crypto", "clock"]}]);
    let r = server.put_admin(
        "/api/v1/bundles/mods",
        bundle_of(
            tmp.path(),
            "mods",
            &["mods"],
            &[
                ("mods.rego", b"package mods\nx := 1\n"),
                ("attestors/mod.wasm", K8S_SAT),
            ],
            takeover,
        ),
    );
    r.assert_problem(409, "bundle-conflict");
    assert!(
        r.body["detail"].as_str().unwrap().contains("replaceable_methods"),
        "{}",
        r.body
    );
    still_serving();

    // One the operator lists may be replaced.
    let r = server.put_admin(
        "/api/v1/bundles/pop",
        bundle_of(
            tmp.path(),
            "pop",
            &["pop"],
            &[
                ("pop.rego", b"package pop\nx := 1\n"),
                ("attestors/mod.wasm", K8S_SAT),
            ],
            json!([{"method": "x509pop", "path": "attestors/mod.wasm", "capabilities": ["crypto", "clock"]}]),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.body);

    // A new method is fine; two bundles never serve one.
    let ci = |name: &str| {
        bundle_of(
            tmp.path(),
            name,
            &[name],
            &[
                (
                    &format!("{name}.rego"),
                    format!("package {name}\nx := 1\n").as_bytes(),
                ),
                ("attestors/mod.wasm", CI_JOB),
            ],
            json!([{"method": "ci_job", "path": "attestors/mod.wasm", "capabilities": ["crypto", "clock"]}]),
        )
    };
    assert_eq!(server.put_admin("/api/v1/bundles/ci1", ci("ci1")).status, 200);
    let r = server.put_admin("/api/v1/bundles/ci2", ci("ci2"));
    r.assert_problem(409, "bundle-conflict");
    assert!(r.body["detail"].as_str().unwrap().contains("ci1"), "{}", r.body);
}
