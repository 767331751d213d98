//! The server's life through the real binary: restarts on the same data
//! directory, the trust-source API, `serve` with TLS from a config file, and
//! the CLI's help and errors.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use serde_json::json;
use support::{Cluster, Server, castellan, csr, issuance_body, postgres_url, serve_refused};

const ISSUE: &str = "/api/v1/workloads/attested-issuance";

#[test]
fn ca_token_and_trust_sources_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cluster = Cluster::new("https://k8s.restart.example");

    let first = Server::dev_in(&dir, &[]);
    let id = first.add_trust_source("restart", &cluster);
    let (_, csr1) = csr();
    let r1 = first.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &csr1, None), None);
    assert_eq!(r1.status, 201, "{}", r1.body);
    let token_before = first.admin_token.clone();
    let root_before = std::fs::read(dir.join("ca/root.crt")).unwrap();
    first.stop();

    let second = Server::dev_in(&dir, &[]);
    assert_eq!(second.admin_token, token_before, "the admin token is reused");
    assert_eq!(std::fs::read(dir.join("ca/root.crt")).unwrap(), root_before);
    let listed = second.get_admin("/api/v1/trust-sources");
    assert!(
        listed.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id),
        "persisted trust source"
    );
    let (_, csr2) = csr();
    let r2 = second.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &csr2, None), None);
    assert_eq!(r2.status, 201, "{}", r2.body);
    assert_eq!(
        r1.body["bundle_pem"], r2.body["bundle_pem"],
        "same trust anchor after restart"
    );
    assert_eq!(second.certificates().len(), 2, "inventory survives too");
}

/// Issue 15: `[store] backend = "postgres"` keeps every record in the
/// database (none in the data directory), across a restart; a database
/// migrated by a newer Castellan is refused at start, saying so.
#[test]
fn serve_keeps_its_records_in_postgres() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let url = postgres_url();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [store]\nbackend = \"postgres\"\nurl = \"{url}\"\nmax_connections = 4\n"
        ),
    )
    .unwrap();
    let cluster = Cluster::new("https://k8s.postgres.example");
    let first = Server::serve(&config, &dir);
    let id = first.add_trust_source("pg", &cluster);
    let (_, csr1) = csr();
    let r = first.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &csr1, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    first.stop();
    assert!(
        !dir.join("castellan.redb").exists(),
        "nothing kept in the data directory"
    );

    let second = Server::serve(&config, &dir);
    let listed = second.get_admin("/api/v1/trust-sources");
    assert!(
        listed.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == id)
    );
    let (_, csr2) = csr();
    let r = second.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &csr2, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(second.certificates().len(), 2, "the inventory is in the database");
    let audit = second.audit();
    assert!(audit.iter().filter(|e| e["kind"] == "issuance.issued").count() >= 2);
    second.stop();

    let mut db = url
        .parse::<postgres::Config>()
        .unwrap()
        .connect(postgres::NoTls)
        .unwrap();
    db.execute("INSERT INTO castellan_schema (version) VALUES (999)", &[])
        .unwrap();
    let stderr = serve_refused(&config);
    assert!(stderr.contains("schema is version 999"), "{stderr}");
}

/// `sslmode=verify-full`: `serve` talks to PostgreSQL over TLS when the
/// server's certificate chains to `sslrootcert` and names the host, and
/// refuses to start, saying why, when it does not.
#[test]
fn serve_reaches_postgres_over_verified_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let url = postgres_url().replace("@127.0.0.1:", "@localhost:");
    let ca = support::postgres_tls_ca();
    let write = |roots: &std::path::Path| {
        let config = tmp.path().join("castellan.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
                 [store]\nbackend = \"postgres\"\nurl = \"{url}?hostaddr=127.0.0.1&sslmode=verify-full\"\n\
                 ca_file = \"{}\"\nmax_connections = 2\n",
                roots.display()
            ),
        )
        .unwrap();
        config
    };
    let server = Server::serve(&write(&ca), &dir);
    let cluster = Cluster::new("https://k8s.tls-db.example");
    server.add_trust_source("tls-db", &cluster);
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    server.stop();

    let other = tmp.path().join("other-ca.pem");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    std::fs::write(&other, params.self_signed(&key).unwrap().pem()).unwrap();
    let stderr = serve_refused(&write(&other));
    assert!(
        stderr.contains("PostgreSQL store") && stderr.contains("certificate"),
        "{stderr}"
    );
}

#[test]
fn trust_source_api_requires_the_admin_token_and_validates() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.api.example");
    let spec = json!({
        "name": "api-test", "method": "k8s_sat", "issuer": cluster.issuer,
        "audiences": ["castellan"], "jwks": cluster.jwks(),
    });
    server
        .post("/api/v1/trust-sources", &spec, None)
        .assert_problem(401, "unauthorized");
    server
        .post("/api/v1/trust-sources", &spec, Some("cst_wrong"))
        .assert_problem(401, "unauthorized");
    server
        .get("/api/v1/trust-sources", None)
        .assert_problem(401, "unauthorized");
    server
        .get("/api/v1/certificates", None)
        .assert_problem(401, "unauthorized");

    let mut private = spec.clone();
    private["jwks"]["keys"][0]["d"] = "c2VjcmV0".into();
    let r = server.post_admin("/api/v1/trust-sources", &private);
    r.assert_problem(422, "invalid-trust-source");
    assert!(r.body["detail"].as_str().unwrap().contains("private"));
    let mut hmac = spec.clone();
    hmac["jwks"] = json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]});
    server
        .post_admin("/api/v1/trust-sources", &hmac)
        .assert_problem(422, "invalid-trust-source");
    let mut no_aud = spec.clone();
    no_aud["audiences"] = json!([]);
    server
        .post_admin("/api/v1/trust-sources", &no_aud)
        .assert_problem(422, "invalid-trust-source");
    let mut bad_method = spec.clone();
    bad_method["method"] = "carrier_pigeon".into();
    server
        .post_admin("/api/v1/trust-sources", &bad_method)
        .assert_problem(422, "invalid-trust-source");

    let created = server.post_admin("/api/v1/trust-sources", &spec);
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_owned();
    server
        .post_admin("/api/v1/trust-sources", &spec)
        .assert_problem(409, "trust-source-exists");

    let items = server.get_admin("/api/v1/trust-sources").body["items"]
        .as_array()
        .unwrap()
        .clone();
    let names: Vec<_> = items.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"api-test") && names.contains(&"dev-cluster"),
        "{names:?}"
    );
    let dev = items.iter().find(|s| s["name"] == "dev-cluster").unwrap();
    server
        .delete_admin(&format!("/api/v1/trust-sources/{}", dev["id"].as_str().unwrap()))
        .assert_problem(409, "trust-source-not-deletable");

    // Deleting a source stops its tokens at once.
    let (_, c) = csr();
    assert_eq!(
        server
            .post(ISSUE, &issuance_body(&cluster.token("x", "y"), &c, None), None)
            .status,
        201
    );
    assert_eq!(
        server.delete_admin(&format!("/api/v1/trust-sources/{id}")).status,
        204
    );
    server
        .delete_admin(&format!("/api/v1/trust-sources/{id}"))
        .assert_problem(404, "not-found");
    server
        .post(ISSUE, &issuance_body(&cluster.token("x", "y"), &c, None), None)
        .assert_problem(403, "attestation-failed");

    let kinds: Vec<_> = server
        .audit()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.contains(&"trust_source.created".to_owned()));
    assert!(kinds.contains(&"trust_source.deleted".to_owned()));
    assert!(kinds.contains(&"auth.refused".to_owned()));
}

#[test]
fn certificate_inventory_pages_with_a_cursor() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.pages.example");
    server.add_trust_source("pages", &cluster);
    for i in 0..5 {
        let (_, c) = csr();
        let r = server.post(
            ISSUE,
            &issuance_body(&cluster.token("ns", &format!("sa{i}")), &c, None),
            None,
        );
        assert_eq!(r.status, 201);
    }
    let p1 = server.get_admin("/api/v1/certificates?limit=2");
    assert_eq!(p1.body["items"].as_array().unwrap().len(), 2);
    let cursor = p1.body["next_cursor"].as_str().unwrap().to_owned();
    let p2 = server.get_admin(&format!("/api/v1/certificates?limit=10&cursor={cursor}"));
    assert_eq!(p2.body["items"].as_array().unwrap().len(), 3);
    assert!(p2.body["next_cursor"].is_null());
    assert_eq!(
        p2.body["items"][2]["spiffe_id"],
        "spiffe://example.org/pages/ns/ns/sa/sa4"
    );
    server
        .get_admin("/api/v1/certificates?limit=0")
        .assert_problem(400, "malformed-request");
    server
        .get_admin("/api/v1/certificates?cursor=zzz")
        .assert_problem(400, "malformed-request");
    let health = server.get("/healthz", None);
    assert_eq!(health.status, 200);
    assert_eq!(health.body["status"], "ok");
}

#[test]
fn serve_uses_tls_and_config_file_trust_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let cluster = Cluster::new("https://k8s.serve.example");
    std::fs::write(tmp.path().join("jwks.json"), cluster.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "data"
trust_domain = "serve.example"

[http]
addr = "127.0.0.1:0"

[[trust_sources]]
name = "serve-cluster"
method = "k8s_sat"
issuer = "{}"
audiences = ["castellan"]
jwks_file = "jwks.json"
"#,
            cluster.issuer
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &dir);
    assert!(server.base.starts_with("https://"), "{}", server.base);
    let port = server.base.rsplit(':').next().unwrap();
    let addr = format!("https://localhost:{port}");

    // The CLI trusts the server through Castellan's own root.
    let token_file = tmp.path().join("token");
    std::fs::write(&token_file, cluster.token("billing", "worker")).unwrap();
    let out = castellan()
        .args(["svid", "issue", "--addr", &addr, "--ca-file"])
        .arg(dir.join("ca/root.crt"))
        .arg("--evidence-file")
        .arg(&token_file)
        .arg("--out-dir")
        .arg(tmp.path().join("svid"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "spiffe://serve.example/serve-cluster/ns/billing/sa/worker"
    );

    // Without the CA the TLS handshake fails: the server is not anonymous.
    let out = castellan()
        .args(["svid", "issue", "--addr", &addr, "--ca-file"])
        .arg(tmp.path().join("jwks.json"))
        .arg("--evidence-file")
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The dev cluster does not exist outside `dev`.
    assert!(!dir.join("dev").exists());
    drop(server);

    // No trust source for the method: 422.
    std::fs::write(&config, "data_dir = \"data2\"\n[http]\naddr = \"127.0.0.1:0\"\n").unwrap();
    let bare = Server::serve(&config, &tmp.path().join("data2"));
    let port = bare.base.rsplit(':').next().unwrap();
    let out = castellan()
        .args([
            "svid",
            "issue",
            "--addr",
            &format!("https://localhost:{port}"),
            "--ca-file",
        ])
        .arg(tmp.path().join("data2/ca/root.crt"))
        .arg("--evidence-file")
        .arg(&token_file)
        .arg("--out-dir")
        .arg(tmp.path().join("svid2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: 422 no-trust-source"), "{stderr}");
}

#[test]
fn plain_http_is_refused_off_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "[http]\naddr = \"0.0.0.0:0\"\ntls = { enabled = false }\n",
    )
    .unwrap();
    let stderr = serve_refused(&config);
    assert!(
        stderr.contains("http.tls.enabled") && stderr.contains("loopback"),
        "{stderr}"
    );

    let out = castellan()
        .args(["dev", "--data-dir"])
        .arg(tmp.path().join("d"))
        .args(["--http-addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}

#[test]
fn cli_has_help_everywhere_and_one_line_errors() {
    for args in [
        vec!["--help"],
        vec!["dev", "--help"],
        vec!["dev", "token", "k8s", "--help"],
        vec!["serve", "--help"],
        vec!["svid", "issue", "--help"],
        vec!["bench", "issuance", "--help"],
        vec!["policy", "test", "--help"],
    ] {
        let out = castellan().args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage:"),
            "{args:?}"
        );
    }
    let out = castellan()
        .args(["serve", "--config", "/nonexistent/castellan.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: cannot read config file"), "{stderr}");

    let out = castellan()
        .args([
            "dev",
            "token",
            "k8s",
            "--data-dir",
            "/nonexistent",
            "--namespace",
            "a",
            "--service-account",
            "b",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: no dev cluster key"));

    // `castellan policy test` runs the default bundle's Rego tests.
    let policies = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let out = castellan()
        .args(["policy", "test"])
        .arg(&policies)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains(" passed, 0 failed"));
}

#[test]
fn the_load_tools_run_against_a_live_server() {
    let server = Server::dev();
    let token_file = server.dir.join("admin.token");
    let socket = server.dir.join("workload.sock");
    for args in [
        vec![
            "bench",
            "issuance",
            "--requests",
            "40",
            "--warmup",
            "5",
            "--concurrency",
            "4",
        ],
        vec!["bench", "broker", "--requests", "20", "--concurrency", "2"],
        vec![
            "bench",
            "broker",
            "--requests",
            "20",
            "--concurrency",
            "2",
            "--rate",
            "50",
        ],
        vec!["bench", "approvals", "--requests", "3"],
        vec!["bench", "attestors", "--requests", "5", "--concurrency", "2"],
        vec![
            "bench",
            "workload-api",
            "--socket",
            socket.to_str().unwrap(),
            "--streams",
            "20",
            "--jwt-requests",
            "50",
        ],
    ] {
        let out = castellan()
            .args(&args)
            .args([
                "--addr",
                &server.base,
                "--token-file",
                token_file.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("p99"), "{args:?}: {stdout}");
        // Every attestation method issued all it was given.
        if args[1] == "attestors" {
            assert_eq!(stdout.matches("   []").count(), 6, "{stdout}");
        }
    }
}

/// Issue 16, item 1 (the review's expired-CA attack): the signing CA's life
/// bounds every credential. Past its life `serve` refuses to start, saying
/// so; too close to its end issuance is refused with `503 ca-unavailable`,
/// audited; otherwise a certificate's lifetime is cut to the CA's.
#[test]
fn a_ca_past_or_near_its_end_signs_nothing_that_outlives_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = { enabled = false }\n[ca]\nintermediate = true\n",
    )
    .unwrap();
    Server::serve(&config, &dir).stop();
    // Re-sign the intermediate (same key) with the validity the test wants.
    let ca = dir.join("ca");
    let resign = |from: time::OffsetDateTime, until: time::OffsetDateTime| {
        let read = |f: &str| std::fs::read_to_string(ca.join(f)).unwrap();
        let root_key = rcgen::KeyPair::from_pem(&read("root.key")).unwrap();
        let root = rcgen::Issuer::from_ca_cert_pem(&read("root.crt"), root_key).unwrap();
        let key = rcgen::KeyPair::from_pem(&read("intermediate.key")).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Castellan Intermediate CA");
        params.subject_alt_names = vec![rcgen::SanType::URI("spiffe://example.org".try_into().unwrap())];
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = from;
        params.not_after = until;
        let cert = params.signed_by(&key, &root).unwrap();
        std::fs::write(ca.join("intermediate.crt"), cert.pem()).unwrap();
        // Taken into the keyring anew at the next start.
        std::fs::remove_file(ca.join("authorities.json")).unwrap();
    };
    let now = time::OffsetDateTime::now_utc();
    let hours = time::Duration::hours;

    resign(now - hours(2), now - hours(1));
    let stderr = serve_refused(&config);
    assert!(
        stderr.contains("the CA expired at") && stderr.contains("castellan ca prepare --offline"),
        "{stderr}"
    );
    // The way out it names: rotate on the stopped server's data directory.
    let offline = |args: &[&str]| {
        let out = support::castellan()
            .args(["ca"])
            .args(args)
            .args(["--offline", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let prepared = offline(&["prepare"]);
    let id = prepared["prepared"]["id"].as_str().unwrap().to_owned();
    offline(&["activate", &id]);
    let server = Server::serve(&config, &dir);
    let listed = server.get_admin("/api/v1/ca/authorities");
    assert_eq!(
        listed.body["authorities"][0]["id"],
        id.as_str(),
        "{}",
        listed.body
    );
    assert_eq!(listed.body["authorities"][0]["state"], "active");
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "ca.rotated" && e["detail"]["offline"] == true),
        "offline steps are audited"
    );
    server.stop();
    resign(now + hours(1), now + hours(2));
    let stderr = serve_refused(&config);
    assert!(stderr.contains("not valid until"), "{stderr}");

    // Valid for 30 more seconds: less than the shortest credential (60 s).
    resign(now - hours(1), now + time::Duration::seconds(30));
    let server = Server::serve(&config, &dir);
    let cluster = Cluster::new("https://k8s.ca-life.example");
    server.add_trust_source("ca-life", &cluster);
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None);
    r.assert_problem(503, "ca-unavailable");
    assert!(
        r.body["detail"].as_str().unwrap().contains("rotate the CA"),
        "{}",
        r.body
    );
    assert!(r.body.get("certificate_pem").is_none());
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "issuance.refused" && e["detail"]["problem"] == "ca-unavailable"),
        "the refusal is audited"
    );
    assert!(server.certificates().is_empty(), "nothing signed");
    server.stop();

    // Twenty minutes left: issued, and cut to the CA's end.
    let until = now + time::Duration::minutes(20);
    resign(now - hours(1), until);
    let server = Server::serve(&config, &dir);
    let (_, c) = csr();
    let r = server.post(
        ISSUE,
        &issuance_body(&cluster.token("a", "b"), &c, Some(3600)),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let der = support::pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    let (nb, na) = (
        leaf.validity().not_before.timestamp(),
        leaf.validity().not_after.timestamp(),
    );
    assert!(nb < na, "notBefore {nb} before notAfter {na}");
    assert!(na <= until.unix_timestamp(), "the leaf ends by the CA's end");
}

/// Issue 16, item 5: Castellan as an upstream authority. An OpenSSL-made
/// CA's CSR is signed as a subordinate of Castellan's root; `openssl verify`
/// accepts, against Castellan's bundle, a leaf that CA signs for a SPIFFE
/// ID in the trust domain, and rejects one for another trust domain or
/// with a DNS name (the name constraints Castellan put on it).
#[test]
fn a_subordinate_ca_is_bound_to_the_trust_domain() {
    let server = Server::dev();
    let tmp = tempfile::tempdir().unwrap();
    let path = |f: &str| tmp.path().join(f).to_str().unwrap().to_owned();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let ok = |args: &[&str]| {
        let (ok, text) = openssl(args);
        assert!(ok, "openssl {args:?}: {text}");
    };
    ok(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        &path("sub.key"),
    ]);
    ok(&[
        "req",
        "-new",
        "-key",
        &path("sub.key"),
        "-subj",
        "/CN=team-ca",
        "-out",
        &path("sub.csr"),
    ]);
    let csr_pem = std::fs::read_to_string(path("sub.csr")).unwrap();

    let ask =
        |body: serde_json::Value, token: Option<&str>| server.post("/api/v1/ca/intermediates", &body, token);
    ask(json!({"csr": csr_pem, "name": "team-ca"}), None).assert_problem(401, "unauthorized");
    ask(
        json!({"csr": "not a csr", "name": "team-ca"}),
        Some(&server.admin_token),
    )
    .assert_problem(400, "invalid-csr");
    ask(
        json!({"csr": csr_pem, "name": "bad\nname"}),
        Some(&server.admin_token),
    )
    .assert_problem(403, "policy-denied");
    let r = ask(
        json!({"csr": csr_pem, "name": "team-ca", "ttl_seconds": 86400}),
        Some(&server.admin_token),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    std::fs::write(path("sub.crt"), r.body["certificate_pem"].as_str().unwrap()).unwrap();
    std::fs::write(path("bundle.pem"), r.body["bundle_pem"].as_str().unwrap()).unwrap();
    let (_, text) = openssl(&["x509", "-in", &path("sub.crt"), "-noout", "-text"]);
    assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
    assert!(text.contains("URI:example.org"), "{text}");

    // Leaves the subordinate signs, each with one SAN.
    let leaf = |name: &str, san: &str| -> (bool, String) {
        std::fs::write(
            path(&format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nsubjectAltName={san}\n"),
        )
        .unwrap();
        ok(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &path(&format!("{name}.key")),
            "-subj",
            "/CN=leaf",
            "-out",
            &path(&format!("{name}.csr")),
        ]);
        ok(&[
            "x509",
            "-req",
            "-in",
            &path(&format!("{name}.csr")),
            "-CA",
            &path("sub.crt"),
            "-CAkey",
            &path("sub.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &path(&format!("{name}.ext")),
            "-out",
            &path(&format!("{name}.crt")),
        ]);
        openssl(&[
            "verify",
            "-CAfile",
            &path("bundle.pem"),
            "-untrusted",
            &path("sub.crt"),
            &path(&format!("{name}.crt")),
        ])
    };
    let (accepted, text) = leaf("inside", "URI:spiffe://example.org/team/api");
    assert!(accepted, "a leaf in the trust domain verifies: {text}");
    let (accepted, text) = leaf("outside", "URI:spiffe://evil.org/team/api");
    assert!(
        !accepted && text.contains("subtree violation"),
        "another trust domain: {text}"
    );
    let (accepted, text) = leaf("dns", "URI:spiffe://example.org/web,DNS:www.example.com");
    assert!(
        !accepted && text.contains("subtree violation"),
        "a DNS name: {text}"
    );

    let audit = server.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "ca.subordinate_issued" && e["detail"]["name"] == "team-ca")
    );
    assert!(audit.iter().any(|e| e["kind"] == "ca.subordinate_refused"));
}

/// Issue 16, item 5 (second half): Castellan's CA made under an external
/// root (`[ca] upstream_cert_file`, `upstream_key_file`). SVIDs chain
/// through Castellan's CA to that root, as `openssl verify` checks; the
/// upstream key is needed only once; a key that is not the certificate's is
/// refused at start.
#[test]
fn castellan_can_sit_under_an_upstream_root() {
    let tmp = tempfile::tempdir().unwrap();
    let path = |f: &str| tmp.path().join(f).to_str().unwrap().to_owned();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "openssl {args:?}: {text}");
        text
    };
    for (key, cert) in [("corp.key", "corp.pem"), ("other.key", "other.pem")] {
        openssl(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &path(key),
        ]);
        openssl(&[
            "req",
            "-x509",
            "-new",
            "-key",
            &path(key),
            "-subj",
            "/CN=Corp Root",
            "-days",
            "30",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-out",
            &path(cert),
        ]);
    }
    let config = tmp.path().join("castellan.toml");
    let write = |key: &str| {
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
                 [ca]\nupstream_cert_file = \"corp.pem\"\nupstream_key_file = \"{key}\"\n"
            ),
        )
        .unwrap();
    };
    write("other.key");
    let stderr = serve_refused(&config);
    assert!(
        stderr.contains("not the key of the upstream certificate"),
        "{stderr}"
    );

    write("corp.key");
    let dir = tmp.path().join("data");
    let server = Server::serve(&config, &dir);
    let cluster = Cluster::new("https://k8s.upstream.example");
    server.add_trust_source("upstream", &cluster);
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let corp = std::fs::read_to_string(path("corp.pem")).unwrap();
    assert_eq!(
        r.body["bundle_pem"].as_str().unwrap().trim(),
        corp.trim(),
        "the bundle is the upstream root"
    );
    std::fs::write(path("leaf.pem"), r.body["certificate_pem"].as_str().unwrap()).unwrap();
    let chain = r.body["chain_pem"].as_str().unwrap();
    let leaf = r.body["certificate_pem"].as_str().unwrap();
    std::fs::write(path("untrusted.pem"), chain.replacen(leaf, "", 1)).unwrap();
    let verified = openssl(&[
        "verify",
        "-CAfile",
        &path("corp.pem"),
        "-untrusted",
        &path("untrusted.pem"),
        &path("leaf.pem"),
    ]);
    assert!(verified.contains("OK"), "{verified}");
    server.stop();

    // Made once: the upstream key may go away.
    std::fs::remove_file(path("corp.key")).unwrap();
    let server = Server::serve(&config, &dir);
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
}

/// Issue 17: `GET /metrics` in the text exposition format, parsed by
/// Prometheus's own parser (the Python client's OpenMetrics parser), with
/// what an issuance and a refusal leave behind; and the example alert
/// rules name only metrics that exist.
#[test]
fn metrics_parse_with_prometheus_and_count_what_happened() {
    let server = Server::dev();
    let cluster = Cluster::new("https://k8s.metrics.example");
    server.add_trust_source("metrics", &cluster);
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("ns", "sa"), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let other = Cluster::new("https://k8s.metrics.example");
    let r = server.post(ISSUE, &issuance_body(&other.token("ns", "sa"), &c, None), None);
    r.assert_problem(403, "attestation-failed");

    let (status, content_type, text) = server.get_text("/metrics");
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grpc-venv/bin/python");
    let parse = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    out.append({"family": family.name, "type": family.type, "name": None, "labels": {}, "value": None})
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", parse])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("scripts/setup.sh installs prometheus-client in target/grpc-venv");
    use std::io::Write as _;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let samples: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        samples
            .iter()
            .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][*k] == *v))
            .filter(|s| s["value"].is_number())
            .map(|s| s["value"].as_f64().unwrap())
            .sum()
    };
    assert_eq!(
        value(
            "castellan_credentials_issued_total",
            &[("flow", "issuance"), ("method", "k8s_sat")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "castellan_credentials_refused_total",
            &[("flow", "issuance"), ("reason", "attestation-failed")]
        ),
        1.0
    );
    for stage in ["attest", "decide", "sign", "record"] {
        assert!(
            value("castellan_stage_duration_seconds_count", &[("stage", stage)]) >= 1.0,
            "stage {stage} timed"
        );
    }
    assert!(
        value(
            "castellan_http_request_duration_seconds_count",
            &[
                ("route", "/api/v1/workloads/attested-issuance"),
                ("status", "2xx")
            ]
        ) >= 1.0
    );
    let left = value(
        "castellan_ca_authority_expiry_seconds",
        &[("kind", "x509"), ("state", "active")],
    );
    assert!(left > 86_400.0 * 300.0, "the dev CA has years left: {left}");
    assert!(samples.iter().any(|s| s["name"] == "castellan_pending_approvals"));
    assert!(samples.iter().any(|s| s["name"] == "castellan_bundle_revision"));

    // The example alert rules parse, and every metric they name exists.
    let rules =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/prometheus/castellan-alerts.yml");
    let names = std::process::Command::new(&python)
        .args([
            "-c",
            "import sys, yaml, re, json\n\
             doc = yaml.safe_load(open(sys.argv[1]))\n\
             exprs = [r['expr'] for g in doc['groups'] for r in g['rules']]\n\
             print(json.dumps(sorted({m for e in exprs for m in re.findall(r'castellan_[a-z_]+', e)})))",
        ])
        .arg(&rules)
        .output()
        .unwrap();
    assert!(
        names.status.success(),
        "{}",
        String::from_utf8_lossy(&names.stderr)
    );
    let names: Vec<String> = serde_json::from_slice(&names.stdout).unwrap();
    assert!(names.len() >= 6);
    for n in names {
        let base = n
            .trim_end_matches("_bucket")
            .trim_end_matches("_total")
            .to_owned();
        assert!(
            samples
                .iter()
                .any(|s| s["family"] == base.as_str() || s["name"] == n.as_str()),
            "alert rules name `{n}`, which /metrics does not have"
        );
    }
}

/// Issue 17: an export of the audit log, signed by checkpoints, verifies
/// offline with nothing but the JWKS; each way of tampering is refused and
/// the first broken entry named.
#[test]
fn an_exported_audit_log_verifies_offline_and_tampering_is_named() {
    let server = Server::dev();
    server.token("auditor-a", "approver", &[]);
    server.token("auditor-b", "requester", &[]);
    let tmp = tempfile::tempdir().unwrap();
    let export = tmp.path().join("audit.jsonl");
    let run = |args: &[&str]| {
        castellan()
            .args(args)
            .args(["--addr", &server.base, "--token", &server.admin_token])
            .output()
            .unwrap()
    };
    let out = run(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let jwks = tmp.path().join("jwks.json");
    std::fs::write(&jwks, server.get("/.well-known/jwks.json", None).body.to_string()).unwrap();
    let verify = |file: &std::path::Path, extra: &[&str]| {
        castellan()
            .args(["audit", "verify"])
            .arg(file)
            .arg("--jwks")
            .arg(&jwks)
            .args(extra)
            .output()
            .unwrap()
    };
    let ok = verify(&export, &[]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).starts_with("verified:"));

    let lines: Vec<String> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(lines.len() >= 3);
    assert!(lines.last().unwrap().contains("audit.checkpoint"));
    let tampered = |name: &str, lines: &[String]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let out = verify(&path, &[]);
        assert!(!out.status.success(), "{name} verified");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let mut changed = lines.clone();
    changed[1] = changed[1].replacen("\"name\":\"", "\"name\":\"forged-", 1);
    assert_ne!(changed[1], lines[1]);
    assert!(tampered("changed", &changed).contains("entry 2 breaks the chain"));
    let mut deleted = lines.clone();
    deleted.remove(1);
    assert!(tampered("deleted", &deleted).contains("entry 3 breaks the chain"));
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    assert!(tampered("reordered", &reordered).contains("entry 3 breaks the chain"));
    let truncated = &lines[..lines.len() - 1];
    assert!(tampered("truncated", truncated).contains("does not end with a checkpoint"));
    // A JWKS that did not sign it: the checkpoint is refused.
    let other = Server::dev();
    std::fs::write(&jwks, other.get("/.well-known/jwks.json", None).body.to_string()).unwrap();
    let out = verify(&export, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("checkpoint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The log itself says who made checkpoints.
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "audit.checkpoint" && e["actor"] == "user:admin")
    );
}

/// Issue 17: the inventory and trust sources from the command line, as
/// tables and as JSON, and a health probe's exit status.
#[test]
fn certificates_trust_sources_and_health_from_the_cli() {
    let server = Server::dev();
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = castellan()
            .args(args)
            .args(["--addr", &server.base, "--token", &server.admin_token])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let cluster = Cluster::new("https://k8s.cli.example");
    let jwks = tmp.path().join("jwks.json");
    std::fs::write(&jwks, cluster.jwks().to_string()).unwrap();
    let (ok, out, err) = run(&[
        "trust-source",
        "create",
        "--name",
        "cli",
        "--method",
        "k8s_sat",
        "--issuer",
        "https://k8s.cli.example",
        "--audience",
        "castellan",
        "--jwks-file",
        jwks.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let created: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let (ok, out, _) = run(&["trust-source", "list"]);
    assert!(ok && out.contains(&id) && out.contains("k8s_sat"), "{out}");

    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("ns", "sa"), &c, None), None);
    assert_eq!(r.status, 201, "{}", r.body);
    let serial = r.body["serial"].as_str().unwrap().to_owned();
    let (ok, out, _) = run(&["certificates", "list"]);
    assert!(ok && out.contains(&serial), "{out}");
    let spiffe_id = r.body["spiffe_id"].as_str().unwrap().to_owned();
    let (ok, out, _) = run(&["certificates", "list", "--spiffe-id", &spiffe_id, "--json"]);
    assert!(ok);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.len(), 1);
    let (ok, out, _) = run(&[
        "certificates",
        "list",
        "--spiffe-id",
        "spiffe://example.org/nobody",
        "--json",
    ]);
    assert!(ok && out.trim() == "[]", "{out}");

    let (ok, _, err) = run(&["trust-source", "revoke", &id]);
    assert!(ok, "{err}");
    let (_, c) = csr();
    let r = server.post(ISSUE, &issuance_body(&cluster.token("ns", "sa"), &c, None), None);
    assert_ne!(r.status, 201, "a revoked source attests nothing");

    let probe = |addr: &str| {
        castellan()
            .args(["healthcheck", "--addr", addr])
            .output()
            .unwrap()
    };
    let up = probe(&server.base);
    assert!(up.status.success(), "{}", String::from_utf8_lossy(&up.stdout));
    let base = server.base.clone();
    server.stop();
    let down = probe(&base);
    assert_eq!(down.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&down.stdout).starts_with("not ready"));
}

/// Issue 17: with `[metrics] addr`, metrics leave the API listener for a
/// listener of their own.
#[test]
fn metrics_can_have_a_listener_of_their_own() {
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [metrics]\naddr = \"127.0.0.1:{port}\"\n"
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let (status, _, _) = server.get_text("/metrics");
    assert_eq!(status, 404, "not on the API listener");
    let body = ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(body.contains("castellan_overload_refusals_total"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"));
}
