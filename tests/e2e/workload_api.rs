//! The SPIFFE Workload API served by `castellan dev`, driven by the stock
//! `spiffe` crate over the Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use serde_json::json;
use spiffe::WorkloadApiClient;
use support::{Server, my_uid};

fn entry(server: &Server, spiffe_id: &str, selector: &str, hint: &str) -> String {
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": spiffe_id, "selectors": [selector], "hint": hint, "x509_svid_ttl": 3600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn client(server: &Server) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix:{}", server.dir.join("workload.sock").display()))
        .await
        .unwrap()
}

#[tokio::test]
async fn stock_spiffe_clients_get_x509_and_jwt_svids() {
    let server = Server::dev();
    let uid = my_uid();
    let id = entry(
        &server,
        "spiffe://example.org/workload/api",
        &format!("unix:uid:{uid}"),
        "internal",
    );
    entry(
        &server,
        "spiffe://example.org/workload/metrics",
        &format!("unix:uid:{uid}"),
        "external",
    );
    let c = client(&server).await;

    let svid = c.fetch_x509_svid().await.unwrap();
    assert!(
        svid.spiffe_id()
            .to_string()
            .starts_with("spiffe://example.org/workload/")
    );
    let all = c.fetch_all_x509_svids().await.unwrap();
    assert_eq!(all.len(), 2, "several matching entries give several SVIDs");
    let mut hints: Vec<_> = all
        .iter()
        .map(|s| s.hint().map(|h| h.to_string()).unwrap_or_default())
        .collect();
    hints.sort();
    assert_eq!(hints, ["external", "internal"]);
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new("example.org").unwrap();
    assert!(bundles.get(&td).is_some(), "the trust domain's X.509 bundle");
    let ctx = c.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 2);

    let jwt = c
        .fetch_jwt_svid(
            &["payments"],
            Some(&spiffe::SpiffeId::new("spiffe://example.org/workload/api").unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/workload/api");
    let token = jwt.token().to_string();
    let validated = c.validate_jwt_token("payments", &token).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/workload/api"
    );
    assert!(c.validate_jwt_token("other-audience", &token).await.is_err());
    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&td).is_some());
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert!(header.kid.is_some() && header.typ.as_deref() == Some("JWT"));

    // Deleting the entries ends the identities.
    assert_eq!(server.delete_admin(&format!("/api/v1/entries/{id}")).status, 204);
    assert_eq!(c.fetch_all_x509_svids().await.unwrap().len(), 1);
}

#[tokio::test]
async fn an_unregistered_caller_gets_permission_denied_and_streams_end_on_deletion() {
    let server = Server::dev();
    let c = client(&server).await;
    let err = c.fetch_x509_svid().await.unwrap_err();
    assert!(format!("{err:?}").contains("PermissionDenied"), "{err:?}");
    let err = c.fetch_jwt_svid(&["a"], None).await.unwrap_err();
    assert!(format!("{err:?}").contains("PermissionDenied"), "{err:?}");

    let id = entry(
        &server,
        "spiffe://example.org/workload/stream",
        &format!("unix:uid:{}", my_uid()),
        "",
    );
    let mut stream = c.stream_x509_svids().await.unwrap();
    use futures::StreamExt as _;
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(
        first.spiffe_id().to_string(),
        "spiffe://example.org/workload/stream"
    );
    assert_eq!(server.delete_admin(&format!("/api/v1/entries/{id}")).status, 204);
    let next = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("pushed at once");
    match next {
        Some(Err(e)) => assert!(format!("{e:?}").contains("PermissionDenied"), "{e:?}"),
        other => panic!("expected PermissionDenied on the stream, got {other:?}"),
    }
    // An entry in another trust domain, or without selectors, is refused.
    server
        .post_admin(
            "/api/v1/entries",
            &json!({"spiffe_id": "spiffe://evil.org/x", "selectors": ["unix:uid:0"]}),
        )
        .assert_problem(422, "invalid-entry");
    server
        .post_admin(
            "/api/v1/entries",
            &json!({"spiffe_id": "spiffe://example.org/x", "selectors": []}),
        )
        .assert_problem(422, "invalid-entry");
}

#[tokio::test]
async fn workload_api_svids_are_in_the_inventory_and_the_audit_and_decisions_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(&config, "[decision_logs]\nenabled = true\n").unwrap();
    let data = tmp.path().join("data");
    let server = Server::dev_in(&data, &["--config", config.to_str().unwrap()]);
    let selector = format!("unix:uid:{}", my_uid());
    let c = client(&server).await;
    // Refused first: the refusal is audited with what the kernel says.
    assert!(c.fetch_x509_svid().await.is_err());
    entry(&server, "spiffe://example.org/workload/inv", &selector, "");
    let svid = c.fetch_x509_svid().await.unwrap();
    let leaf = svid.cert_chain()[0].as_ref().to_vec();
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let serial = hex::encode(cert.raw_serial());
    let jwt = c.fetch_jwt_svid(&["payments"], None).await.unwrap();
    let jti = support::jwt_claims(jwt.token())["jti"]
        .as_str()
        .unwrap()
        .to_owned();

    let certs = server.certificates();
    let recorded = certs
        .iter()
        .find(|r| r["serial"] == serial.as_str())
        .unwrap_or_else(|| panic!("serial {serial} not in {certs:?}"));
    assert_eq!(recorded["source"], "workload_api");
    assert_eq!(recorded["spiffe_id"], "spiffe://example.org/workload/inv");
    assert!(recorded["not_after"].as_str().unwrap().starts_with("20"));
    assert!(
        recorded["selectors"]
            .as_array()
            .unwrap()
            .contains(&json!(selector))
    );

    let audit = server.audit();
    let kind = |k: &str| audit.iter().filter(|e| e["kind"] == k).collect::<Vec<_>>();
    let issued = kind("workload_api.x509_issued");
    let x509 = issued
        .iter()
        .find(|e| e["detail"]["serial"] == recorded["serial"])
        .unwrap();
    let jwt_issued = kind("workload_api.jwt_issued");
    assert_eq!(jwt_issued.len(), 1);
    // Each issued credential's entry names it (serial or jti), the policy
    // revision that allowed it and what the attestation proved.
    assert_eq!(jwt_issued[0]["detail"]["jtis"], json!([jti]));
    for e in [x509, jwt_issued[0]] {
        assert!(
            e["detail"]["policy_revision"]
                .as_str()
                .is_some_and(|r| !r.is_empty()),
            "{e}"
        );
        assert_eq!(e["detail"]["attestation"]["method"], "unix");
        assert!(
            e["detail"]["attestation"]["selectors"]
                .as_array()
                .unwrap()
                .contains(&json!(selector))
        );
    }
    let refused = kind("workload_api.refused");
    assert!(!refused.is_empty());
    assert_eq!(refused[0]["detail"]["problem"], "not-registered");
    assert!(
        refused[0]["detail"]["selectors"]
            .as_array()
            .unwrap()
            .contains(&json!(selector))
    );

    let log = data.join("decisions.log");
    assert!(support::eventually(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .map(|t| t.contains("castellan/workload_api/decision"))
            .unwrap_or(false)
    }));
    let line: serde_json::Value = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|l| l["path"] == "castellan/workload_api/decision")
        .unwrap();
    assert_eq!(line["input"]["version"], 1);
    assert_eq!(
        line["input"]["entry"]["spiffe_id"],
        "spiffe://example.org/workload/inv"
    );
    assert_eq!(line["result"]["allow"], true);
}

#[tokio::test]
async fn a_raw_call_without_the_security_header_is_refused() {
    let server = Server::dev();
    entry(
        &server,
        "spiffe://example.org/workload/raw",
        &format!("unix:uid:{}", my_uid()),
        "",
    );
    let path = server.dir.join("workload.sock");
    // A plain gRPC client over the socket, with no `workload.spiffe.io` header.
    let channel = tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .unwrap();
    let mut raw =
        castellan_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_jwtsvid(castellan_proto::workload::JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    // With the header, an empty audience is InvalidArgument too.
    let mut req = tonic::Request::new(castellan_proto::workload::JwtsvidRequest {
        audience: vec![],
        spiffe_id: String::new(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(
        raw.fetch_jwtsvid(req).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    let mut req = tonic::Request::new(castellan_proto::workload::JwtsvidRequest {
        audience: vec!["a".into()],
        spiffe_id: String::new(),
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(raw.fetch_jwtsvid(req).await.unwrap().into_inner().svids.len(), 1);
    // The WIT-SVID profile is not offered.
    let mut req = tonic::Request::new(castellan_proto::workload::WitsvidRequest {});
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(
        raw.fetch_witsvid(req).await.unwrap_err().code(),
        tonic::Code::Unimplemented
    );
}

#[test]
fn the_entry_cli_takes_spire_style_flags() {
    let server = Server::dev();
    let cli = |args: &[&str]| {
        let out = support::castellan()
            .env("CASTELLAN_ADDR", &server.base)
            .env("CASTELLAN_TOKEN", &server.admin_token)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = cli(&[
        "entry",
        "create",
        "-spiffeID",
        "spiffe://example.org/db",
        "-selector",
        "unix:uid:1000",
        "-selector",
        "unix:gid:1000",
        "-x509SVIDTTL",
        "600",
        "-dns",
        "db.internal",
        "-hint",
        "primary",
        "--json",
    ]);
    assert!(ok, "{err}");
    let e: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(e["selectors"], json!(["unix:uid:1000", "unix:gid:1000"]));
    assert_eq!(e["x509_svid_ttl"], 600);
    let id = e["id"].as_str().unwrap().to_owned();
    let (ok, out, _) = cli(&["entry", "list"]);
    assert!(
        ok && out.contains("Found 1 entries") && out.contains("spiffe://example.org/db"),
        "{out}"
    );
    let (ok, out, _) = cli(&["entry", "show", "-entryID", &id]);
    assert!(
        ok && out.contains("db.internal") && out.contains("primary"),
        "{out}"
    );
    let (ok, _, err) = cli(&[
        "entry",
        "create",
        "-spiffeID",
        "spiffe://other.org/x",
        "-selector",
        "unix:uid:0",
    ]);
    assert!(!ok && err.starts_with("error: 422 invalid-entry"), "{err}");
    let (ok, _, _) = cli(&["entry", "delete", "-entryID", &id]);
    assert!(ok);
    let (_, out, _) = cli(&["entry", "list"]);
    assert!(out.contains("Found 0 entries"));
}

/// Issue 14: a stock `X509Source` reconnects after its first sync and
/// treats new material as a rotation. It sees no update on that reconnect,
/// and exactly one when the SVID really rotates (half-life of a 10 s TTL).
#[tokio::test]
async fn an_x509_source_sees_no_update_on_reconnect_and_one_on_rotation() {
    let server = Server::dev();
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": "spiffe://example.org/workload/rotating", "selectors": [format!("unix:uid:{}", my_uid())], "x509_svid_ttl": 10}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", server.dir.join("workload.sock").display()))
        .build()
        .await
        .unwrap();
    let mut updates = source.updated();
    let leaf = |s: &spiffe::X509Svid| s.leaf().as_bytes().to_vec();
    let before = leaf(&source.svid().unwrap());
    assert_eq!(updates.last(), 0);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), updates.changed())
            .await
            .is_err(),
        "no update on the post-construction reconnect"
    );
    assert_eq!(leaf(&source.svid().unwrap()), before);
    // The server pushes a fresh SVID at half-life (5 s after minting).
    let seq = tokio::time::timeout(Duration::from_secs(15), updates.changed())
        .await
        .expect("the rotation reaches the source")
        .unwrap();
    assert_eq!(seq, 1, "exactly one update for one rotation");
    let after = source.svid().unwrap();
    assert_ne!(leaf(&after), before);
    assert_eq!(
        after.spiffe_id().to_string(),
        "spiffe://example.org/workload/rotating"
    );
    assert!(
        tokio::time::timeout(Duration::from_secs(1), updates.changed())
            .await
            .is_err(),
        "nothing more until the next half-life"
    );
}

/// A JWT-SVID as the stock crate validates it offline, with the JWT bundles
/// the Workload API handed out (no call back to Castellan).
async fn offline_validated(c: &WorkloadApiClient, token: &str, audience: &str) -> String {
    let bundles = c.fetch_jwt_bundles().await.unwrap();
    let svid = spiffe::JwtSvid::parse_and_validate(token, &bundles, &[audience]).unwrap();
    assert!(spiffe::JwtSvid::parse_and_validate(token, &bundles, &["someone-else"]).is_err());
    svid.spiffe_id().to_string()
}

#[tokio::test]
async fn jwt_svids_validate_offline_with_es256_and_rs256() {
    for alg in ["ES256", "RS256"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let server = Server::dev_in(&dir, &["--jwt-svid-algorithm", alg]);
        entry(
            &server,
            "spiffe://example.org/workload/signer",
            &format!("unix:uid:{}", my_uid()),
            "",
        );
        let c = WorkloadApiClient::connect_to(format!("unix:{}", dir.join("workload.sock").display()))
            .await
            .unwrap();
        let jwt = c.fetch_jwt_svid(&["ledger"], None).await.unwrap();
        let token = jwt.token().to_string();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(format!("{:?}", header.alg), alg);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        assert!(header.kid.is_some());
        assert_eq!(
            offline_validated(&c, &token, "ledger").await,
            "spiffe://example.org/workload/signer"
        );
        let online = c.validate_jwt_token("ledger", &token).await.unwrap();
        assert_eq!(
            online.spiffe_id().to_string(),
            "spiffe://example.org/workload/signer"
        );
        // A forged signature fails both ways.
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert!(c.validate_jwt_token("ledger", &forged).await.is_err());
    }
}

#[tokio::test]
async fn the_executable_hash_is_a_selector_when_enabled() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::dev_in(&dir, &["--exe-sha256"]);
    use sha2::Digest as _;
    let me = std::fs::read("/proc/self/exe").unwrap();
    let hash = hex::encode(sha2::Sha256::digest(&me));
    entry(
        &server,
        "spiffe://example.org/workload/by-hash",
        &format!("unix:sha256:{hash}"),
        "",
    );
    entry(
        &server,
        "spiffe://example.org/workload/other-binary",
        &format!("unix:sha256:{}", "0".repeat(64)),
        "",
    );
    let c = WorkloadApiClient::connect_to(format!("unix:{}", dir.join("workload.sock").display()))
        .await
        .unwrap();
    let all = c.fetch_all_x509_svids().await.unwrap();
    let ids: Vec<String> = all.iter().map(|s| s.spiffe_id().to_string()).collect();
    assert_eq!(ids, ["spiffe://example.org/workload/by-hash"]);
}

/// Runs `castellan svid-helper --once` as another user against `socket`.
fn helper_as(uid: u32, socket: &std::path::Path, out: &std::path::Path) -> std::process::Output {
    use std::os::unix::process::CommandExt as _;
    support::castellan()
        .args(["svid-helper", "--once", "--timeout-secs", "3", "--socket"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--dir")
        .arg(out)
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

#[test]
fn a_caller_whose_uid_matches_no_entry_gets_permission_denied() {
    if my_uid() != 0 {
        eprintln!(
            "SKIPPED: running a child under another uid needs root (the tests run as uid {})",
            my_uid()
        );
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let nobody = 65_534;
    let tmp = tempfile::tempdir().unwrap();
    // The socket and the output directory must be reachable by `nobody`; the
    // data directory stays 0700.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let public = tmp.path().join("public");
    std::fs::create_dir(&public).unwrap();
    std::fs::set_permissions(&public, std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = public.join("workload.sock");
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!("[workload_api]\nsocket = \"{}\"\n", socket.display()),
    )
    .unwrap();
    let server = Server::dev_in(&tmp.path().join("data"), &["--config", config.to_str().unwrap()]);
    entry(
        &server,
        "spiffe://example.org/workload/root-only",
        "unix:uid:0",
        "",
    );

    let out = helper_as(nobody, &socket, &public.join("nobody-svid"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody got an SVID: {stderr}");
    assert!(
        stderr.contains("PermissionDenied") || stderr.contains("no identity"),
        "{stderr}"
    );
    assert!(!public.join("nobody-svid/svid.pem").exists());

    // The uid is what decides: an entry for `nobody` lets the same child in.
    entry(
        &server,
        "spiffe://example.org/workload/nobody",
        &format!("unix:uid:{nobody}"),
        "",
    );
    let out = helper_as(nobody, &socket, &public.join("nobody-svid"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pem = std::fs::read_to_string(public.join("nobody-svid/svid.pem")).unwrap();
    let der = support::pem_certs(&pem).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains("spiffe://example.org/workload/nobody"));
}

/// Connects to the Workload API, then forks: the child relays one TCP
/// connection to the socket its parent connected; the parent waits for the
/// server to accept, then execs `sleep`. A client speaking through the
/// relay asks as the connecting process, which now runs another program.
const EXEC_AFTER_CONNECT: &str = r#"
import os, socket, sys, time, selectors
path, port_file = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(path)
s.set_inheritable(True)
lst = socket.socket()
lst.bind(("127.0.0.1", 0))
lst.listen(1)
if os.fork() == 0:
    with open(port_file + ".tmp", "w") as f:
        f.write(str(lst.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    c, _ = lst.accept()
    sel = selectors.DefaultSelector()
    sel.register(c, selectors.EVENT_READ, s)
    sel.register(s, selectors.EVENT_READ, c)
    while True:
        for key, _ in sel.select(timeout=20):
            data = key.fileobj.recv(65536)
            if not data:
                os._exit(0)
            key.data.sendall(data)
lst.close()
time.sleep(0.5)
os.execv("/bin/sleep", ["sleep", "20"])
"#;

/// Review item 9: a process connects, then execs a program that has an
/// identity, while a child holding the socket asks for it. The process
/// that asks must be the one that connected.
#[tokio::test]
async fn exec_after_connect_gets_no_identity() {
    let server = Server::dev();
    let sleep = std::fs::canonicalize("/bin/sleep").unwrap();
    entry(
        &server,
        "spiffe://example.org/privileged",
        &format!("unix:path:{}", sleep.display()),
        "",
    );
    let tmp = tempfile::tempdir().unwrap();
    let port_file = tmp.path().join("port");
    let mut attacker = std::process::Command::new("python3")
        .args(["-c", EXEC_AFTER_CONNECT])
        .arg(server.dir.join("workload.sock"))
        .arg(&port_file)
        .spawn()
        .unwrap();
    assert!(support::eventually(Duration::from_secs(10), || port_file.exists()));
    // Past the parent's exec.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let port = std::fs::read_to_string(&port_file).unwrap();
    let c = WorkloadApiClient::connect_to(format!("tcp:127.0.0.1:{}", port.trim()))
        .await
        .unwrap();
    let err = match c.fetch_x509_svid().await {
        Ok(svid) => panic!("the exec'd program's identity was issued: {}", svid.spiffe_id()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("not the one that connected"), "{err}");
    let _ = attacker.kill();
    let _ = attacker.wait();
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "workload_api.refused"
                && e.to_string().contains("not the one that connected"))
    );
}

/// A stock gRPC C-core client (Python's grpcio, as py-spiffe uses it, with
/// default options): it sends the socket's path as `:authority`.
/// Issue 14: clients on gRPC C-core send the socket path as `:authority`
/// (grpcio percent-encodes it); with default channel options they get an
/// answer from every Workload API RPC.
#[test]
fn a_grpc_c_core_client_works_unchanged() {
    let server = Server::dev();
    entry(
        &server,
        "spiffe://example.org/python",
        &format!("unix:uid:{}", my_uid()),
        "",
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let socket = server.dir.join("workload.sock");
    for target in [
        format!("unix:{}", socket.display()),
        format!("unix://{}", socket.display()),
    ] {
        let out = std::process::Command::new(root.join("target/grpc-venv/bin/python"))
            .arg(root.join("tests/clients/workload_client.py"))
            .arg(&target)
            .output()
            .expect("scripts/setup.sh installs grpcio in target/grpc-venv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{target}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            [
                "FetchX509SVID svids 1",
                "FetchX509Bundles bundles 1",
                "FetchJWTSVID spiffe://example.org/python",
                "FetchJWTBundles bundles 1",
                "ValidateJWTSVID spiffe://example.org/python",
            ],
            "{target}"
        );
    }
}

/// Issue 14: SVIDs are cached per identity and served identically to every
/// caller entitled to them, as a SPIRE agent does: reconnecting callers get
/// the same key, and a JWT-SVID is reused per audience until half its life.
#[tokio::test]
async fn svids_are_shared_per_identity_until_half_life() {
    let server = Server::dev();
    entry(
        &server,
        "spiffe://example.org/shared",
        &format!("unix:uid:{}", my_uid()),
        "",
    );
    let mut keys = Vec::new();
    for _ in 0..3 {
        let c = client(&server).await;
        let svid = c.fetch_x509_svid().await.unwrap();
        keys.push(svid.private_key().as_ref().to_vec());
    }
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "one key for the identity");
    let issued = server
        .audit()
        .iter()
        .filter(|e| e["kind"] == "workload_api.x509_issued")
        .count();
    assert_eq!(issued, 1, "minted once for three callers");

    let c = client(&server).await;
    let a = c.fetch_jwt_svid(&["relying-party"], None).await.unwrap();
    let b = c.fetch_jwt_svid(&["relying-party"], None).await.unwrap();
    let other = c.fetch_jwt_svid(&["someone-else"], None).await.unwrap();
    assert_eq!(a.token(), b.token(), "reused for the same audience");
    assert_ne!(a.token(), other.token());
}

/// Issue 14: an `X509Source` (which reconnects after its first sync) and any
/// other caller of the same entry see one SVID: no spurious rotation.
#[tokio::test]
async fn an_x509_source_and_other_callers_see_one_svid() {
    let server = Server::dev();
    entry(
        &server,
        "spiffe://example.org/steady",
        &format!("unix:uid:{}", my_uid()),
        "",
    );
    let source = spiffe::X509Source::builder()
        .endpoint(format!("unix:{}", server.dir.join("workload.sock").display()))
        .build()
        .await
        .unwrap();
    let leaf = |s: &spiffe::X509Svid| s.leaf().as_bytes().to_vec();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first = leaf(&source.svid().unwrap());
    let other = client(&server).await.fetch_x509_svid().await.unwrap();
    assert_eq!(
        leaf(&other),
        first,
        "another caller of the entry gets the same SVID"
    );
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(
            leaf(&source.svid().unwrap()),
            first,
            "no rotation before half-life"
        );
    }
}

/// Runs the SDS client (grpcio and Envoy's official protos, as Envoy's own
/// client would speak) against the server's socket.
fn sds_client(server: &Server, args: &[&str]) -> std::process::Command {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/grpc-venv/bin/python");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/sds_client.py");
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script)
        .arg(args[0])
        .arg(format!("unix:{}", server.dir.join("workload.sock").display()))
        .args(&args[1..]);
    cmd
}

/// One JSON line per response, or `{"error": ...}`.
fn sds_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn sds_fetch(server: &Server, names: &[&str]) -> serde_json::Value {
    let mut args = vec!["fetch"];
    args.extend_from_slice(names);
    let out = sds_client(server, &args)
        .output()
        .expect("scripts/setup.sh installs grpcio and xds-protos in target/grpc-venv");
    sds_lines(&out).remove(0)
}

fn secret<'a>(response: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    response["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no secret {name} in {response}"))
}

/// The SPIFFE ID in a PEM chain's leaf.
fn leaf_uri(chain: &str) -> String {
    let der = support::pem_certs(chain).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap();
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .unwrap()
}

/// Issue 14: Envoy reads its certificate and validation contexts over SDS
/// on the Workload API socket, with the same attestation and entries: a
/// caller with no entry gets nothing; names it may not have are refused;
/// the SVID is the one the Workload API hands out for the entry.
#[tokio::test]
async fn envoy_reads_its_certificate_and_validation_contexts_over_sds() {
    let tmp = tempfile::tempdir().unwrap();
    let partner = Server::dev_in(&tmp.path().join("partner"), &["--trust-domain", "partner.test"]);
    let file = tmp.path().join("partner-bundle.json");
    std::fs::write(
        &file,
        partner.get("/.well-known/spiffe-bundle", None).body.to_string(),
    )
    .unwrap();
    let server = Server::dev_in(
        &tmp.path().join("home"),
        &["--federate", &format!("partner.test={}", file.display())],
    );

    // No entry: refused, and audited.
    let refused = sds_fetch(&server, &["default"]);
    assert_eq!(refused["error"], "PERMISSION_DENIED", "{refused}");
    let out = sds_client(&server, &["stream", "1", "default"]).output().unwrap();
    assert_eq!(sds_lines(&out)[0]["error"], "PERMISSION_DENIED");
    assert!(server.audit_text().contains("sds_fetch_secrets"));

    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": "spiffe://example.org/envoy", "selectors": [format!("unix:uid:{}", my_uid())],
                "federates_with": ["partner.test"], "x509_svid_ttl": 3600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let names = [
        "default",
        "spiffe://example.org/envoy",
        "ROOTCA",
        "spiffe://example.org",
        "spiffe://partner.test",
        "ALL",
    ];
    let got = sds_fetch(&server, &names);
    assert_eq!(got["secrets"].as_array().unwrap().len(), names.len(), "{got}");
    let default = secret(&got, "default");
    assert_eq!(default["kind"], "tls_certificate");
    assert_eq!(
        leaf_uri(default["chain"].as_str().unwrap()),
        "spiffe://example.org/envoy"
    );
    assert_eq!(default["key_is_pkcs8_pem"], true);
    let by_id = secret(&got, "spiffe://example.org/envoy");
    assert_eq!(by_id["chain"], default["chain"]);
    // The same SVID the Workload API hands out for the entry.
    let svid = client(&server).await.fetch_x509_svid().await.unwrap();
    let key_pem = castellan::util::pem_block("PRIVATE KEY", svid.private_key().as_ref());
    assert_eq!(
        default["key_sha256"],
        castellan::util::sha256_hex(key_pem.as_bytes())
    );
    assert_eq!(
        support::pem_certs(default["chain"].as_str().unwrap())[0],
        svid.leaf().as_bytes()
    );

    let own_root = std::fs::read_to_string(server.dir.join("ca/root.crt")).unwrap();
    for name in ["ROOTCA", "spiffe://example.org"] {
        let vc = secret(&got, name);
        assert_eq!(vc["validator"], "envoy.tls.cert_validator.spiffe", "{vc}");
        let tds = vc["trust_domains"].as_object().unwrap();
        assert_eq!(tds.len(), 1);
        assert_eq!(
            support::pem_certs(tds["example.org"].as_str().unwrap()),
            support::pem_certs(&own_root)
        );
    }
    let partner_root = std::fs::read_to_string(tmp.path().join("partner/ca/root.crt")).unwrap();
    let partner_vc = secret(&got, "spiffe://partner.test");
    assert_eq!(
        support::pem_certs(partner_vc["trust_domains"]["partner.test"].as_str().unwrap()),
        support::pem_certs(&partner_root)
    );
    let all = secret(&got, "ALL")["trust_domains"].as_object().unwrap().clone();
    assert_eq!(all.keys().collect::<Vec<_>>(), ["example.org", "partner.test"]);

    // An Envoy that asks for plain validation gets `trusted_ca`.
    let plain = sds_fetch(&server, &["--no-spiffe", "ROOTCA"]);
    assert_eq!(
        support::pem_certs(secret(&plain, "ROOTCA")["trusted_ca"].as_str().unwrap()),
        support::pem_certs(&own_root)
    );
    // Nothing it is not entitled to.
    for name in ["spiffe://example.org/someone-else", "spiffe://elsewhere.test"] {
        let r = sds_fetch(&server, &[name]);
        assert_eq!(r["error"], "INVALID_ARGUMENT", "{r}");
    }
    assert!(
        server.audit_text().contains("someone-else"),
        "the probe for another identity is audited"
    );
    // With no names, everything it is entitled to (ALL and ROOTCA are aliases
    // that must be asked for).
    let everything = sds_fetch(&server, &[]);
    let mut names: Vec<&str> = everything["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "spiffe://example.org",
            "spiffe://example.org/envoy",
            "spiffe://partner.test"
        ]
    );
}

/// Issue 14: an SDS stream pushes a new certificate when the SVID rotates
/// (version and nonce move on, the validation context stays), and ends
/// with PermissionDenied when the caller loses its entry.
#[test]
fn an_sds_stream_pushes_rotations_and_ends_when_the_entry_goes() {
    use std::io::BufRead as _;
    let server = Server::dev();
    let id = {
        let r = server.post_admin(
            "/api/v1/entries",
            &json!({"spiffe_id": "spiffe://example.org/envoy", "selectors": [format!("unix:uid:{}", my_uid())],
                    "x509_svid_ttl": 10}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_owned()
    };
    let mut child = sds_client(&server, &["stream", "10", "default", "ROOTCA"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || -> serde_json::Value { serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap() };
    let first = next();
    assert_eq!(first["version"], "1", "{first}");
    assert_eq!(
        first["type_url"],
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    );
    // The acknowledgement is not answered; the rotation at half-life (5 s) is.
    let second = next();
    assert_eq!(second["version"], "2", "{second}");
    assert_ne!(second["nonce"], first["nonce"]);
    assert_ne!(
        secret(&second, "default")["chain"],
        secret(&first, "default")["chain"]
    );
    assert_ne!(
        secret(&second, "default")["key_sha256"],
        secret(&first, "default")["key_sha256"]
    );
    assert_eq!(secret(&second, "ROOTCA"), secret(&first, "ROOTCA"));

    assert_eq!(server.delete_admin(&format!("/api/v1/entries/{id}")).status, 204);
    let end = next();
    assert_eq!(end["error"], "PERMISSION_DENIED", "{end}");
    assert!(child.wait().unwrap().success());
}

const ENVOY_BOOTSTRAP_CHECK: &str = r#"
import sys, yaml
from google.protobuf import json_format
from envoy.config.bootstrap.v3 import bootstrap_pb2
# The typed configs the example uses, so their `@type`s resolve.
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
text = open(sys.argv[1]).read().replace("CASTELLAN_SOCKET", "/run/castellan/workload.sock")
b = json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())
names = sorted({c.name for c in b.static_resources.clusters})
print(" ".join(names))
"#;

/// Issue 14: `examples/envoy/envoy.yaml` is a valid Envoy v3 bootstrap by
/// Envoy's official protos (no Envoy binary is reachable from CI).
#[test]
fn the_envoy_example_is_a_valid_bootstrap() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("target/grpc-venv/bin/python"))
        .args(["-c", ENVOY_BOOTSTRAP_CHECK])
        .arg(root.join("examples/envoy/envoy.yaml"))
        .output()
        .expect("scripts/setup.sh installs xds-protos and PyYAML in target/grpc-venv");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "billing castellan local_app"
    );
}

/// The id a refusal's message names (`… (request id ID)`).
fn request_id_in(text: &str) -> String {
    let at = text
        .find("request id ")
        .expect("the refusal names its request id")
        + "request id ".len();
    text[at..at + 36].to_owned()
}

fn explain(server: &Server, args: &[&str]) -> String {
    let out = support::castellan()
        .arg("explain")
        .args(["--addr", &server.base, "--token", &server.admin_token])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn explain_says_why_a_caller_gets_no_identity_and_issues_nothing() {
    let server = Server::dev();
    let uid = my_uid();
    // One entry the caller nearly matches (it lacks a group), one it matches.
    entry(
        &server,
        "spiffe://example.org/near",
        &format!("unix:uid:{uid}"),
        "",
    );
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": "spiffe://example.org/almost", "selectors": [format!("unix:uid:{uid}"), "unix:gid:424242"]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let near = server.get_admin("/api/v1/entries").body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == "spiffe://example.org/near")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        server.delete_admin(&format!("/api/v1/entries/{near}")).status,
        204
    );
    let certificates_before = server.certificates().len();

    // The Workload API refuses, names a request id, and audits the
    // caller's selectors with why no entry gave it an identity.
    let c = client(&server).await;
    let err = format!("{:?}", c.fetch_x509_svid().await.unwrap_err());
    assert!(err.contains("PermissionDenied"), "{err}");
    let id = request_id_in(&err);
    let audit = server.audit();
    let refused = audit
        .iter()
        .find(|e| e["kind"] == "workload_api.refused" && e["detail"]["request_id"] == id.as_str())
        .expect("the refusal is audited under its request id");
    let d = &refused["detail"];
    assert!(
        d["selectors"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("unix:uid:{uid}")))
    );
    assert_eq!(d["explanation"]["matched"], json!([]));
    assert_eq!(
        d["explanation"]["closest_unmatched"][0]["missing"],
        json!(["unix:gid:424242"])
    );

    // `castellan explain --refusal` finds it and names what is missing.
    let text = explain(&server, &["--refusal", &id]);
    assert!(
        text.contains("workload_api (fetch_x509_svid): not-registered"),
        "{text}"
    );
    assert!(
        text.contains("spiffe://example.org/almost") && text.contains("lacks unix:gid:424242"),
        "{text}"
    );

    // Selectors: with the group, the entry matches and the policy allows it.
    let text = explain(
        &server,
        &[
            "--selector",
            &format!("unix:uid:{uid}"),
            "--selector",
            "unix:gid:424242",
        ],
    );
    assert!(
        text.contains("=> Workload API: would receive spiffe://example.org/almost"),
        "{text}"
    );

    // Evidence: which trust source verified it, the selectors, the policy.
    let cluster = support::Cluster::new("https://k8s.explain.example");
    server.add_trust_source("explain-cluster", &cluster);
    let token = cluster.token("payments", "api");
    let json_out = explain(&server, &["--method", "k8s_sat", "--evidence", &token, "--json"]);
    let x: serde_json::Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(x["attestation"]["verified"], true, "{x}");
    assert_eq!(x["attestation"]["trust_source"], "explain-cluster");
    assert!(
        x["selectors"]
            .as_array()
            .unwrap()
            .contains(&json!("k8s:ns:payments"))
    );
    assert_eq!(x["issuance"]["allow"], true);
    assert_eq!(
        x["issuance"]["spiffe_id"],
        "spiffe://example.org/explain-cluster/ns/payments/sa/api"
    );
    // A policy denial is given with the policy's reasons.
    let x: serde_json::Value = serde_json::from_str(&explain(
        &server,
        &[
            "--method",
            "k8s_sat",
            "--evidence",
            &cluster.token("kube-system", "default"),
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(x["issuance"]["allow"], false);
    assert!(
        x["issuance"]["reasons"].to_string().contains("kube-system"),
        "{x}"
    );
    // A forged token: the check against the trust source failed, and why.
    let forger = support::Cluster::new("https://k8s.explain.example");
    let text = explain(
        &server,
        &[
            "--method",
            "k8s_sat",
            "--evidence",
            &forger.token("payments", "api"),
        ],
    );
    assert!(text.contains("NOT verified: attestation-failed"), "{text}");
    assert!(text.contains("checked against explain-cluster: failed"), "{text}");
    // No trust source for the method.
    let text = explain(&server, &["--method", "github_oidc", "--evidence", &token]);
    assert!(
        text.contains("NOT verified: no-trust-source")
            && text.contains("trust sources for github_oidc: none"),
        "{text}"
    );

    // An HTTP refusal names its request id, and explain finds it.
    let (_, csr_pem) = support::csr();
    let r = server.post(
        "/api/v1/workloads/attested-issuance",
        &support::issuance_body(&forger.token("payments", "api"), &csr_pem, None),
        None,
    );
    r.assert_problem(403, "attestation-failed");
    let id = r.body["request_id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["instance"], format!("urn:uuid:{id}"));
    let text = explain(&server, &["--refusal", &id]);
    assert!(
        text.contains("attested-issuance (issue): attestation-failed"),
        "{text}"
    );
    assert!(
        text.contains("trust sources for k8s_sat: ") && text.contains("explain-cluster"),
        "{text}"
    );

    // Explaining issued nothing, and needs the admin role.
    assert_eq!(server.certificates().len(), certificates_before);
    server
        .post("/api/v1/explain", &json!({"selectors": ["unix:uid:0"]}), None)
        .assert_problem(401, "unauthorized");
    server
        .post_admin(
            "/api/v1/explain",
            &json!({"selectors": ["a:b:c"], "request_id": id}),
        )
        .assert_problem(400, "malformed-request");
    server
        .post_admin("/api/v1/explain", &json!({"request_id": "no-such-request"}))
        .assert_problem(404, "not-found");
}
