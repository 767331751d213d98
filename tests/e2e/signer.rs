//! The separate signer (issue 16): `castellan signer` holds the keys, a
//! gateway with `[signer] endpoint` holds none, and the signer refuses what
//! is outside its purpose whatever a caller asks, auditing every signature.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};

use castellan_proto::signer as pb;
use serde_json::{Value, json};
use support::{Cluster, Server, SignerProcess, csr, issuance_body, my_uid, now, start_signer};

const ISSUE: &str = "/api/v1/workloads/attested-issuance";

fn gateway_config(root: &Path, signer: &SignerProcess) -> PathBuf {
    let config = root.join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [signer]\nendpoint = \"unix:{}\"\n",
            signer.socket.display()
        ),
    )
    .unwrap();
    config
}

/// A plain gRPC client of the signer's socket.
async fn raw(socket: &Path) -> pb::signer_client::SignerClient<tonic::transport::Channel> {
    pb::signer_client::SignerClient::new(channel(socket).await.unwrap())
}

async fn channel(socket: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::try_from("http://signer")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let socket = socket.clone();
            async move {
                tokio::net::UnixStream::connect(socket)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
}

/// An attested issuance through `server`, which must succeed.
fn issue(server: &Server, cluster: &Cluster) -> support::Resp {
    let (_, c) = csr();
    let r = server.post(
        ISSUE,
        &issuance_body(&cluster.token("ns", "sa"), &c, Some(600)),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// The signer's audit log, its hash chain checked.
fn signer_audit(signer: &SignerProcess) -> Vec<Value> {
    use sha2::Digest as _;
    let text = std::fs::read_to_string(signer.dir.join("signer-audit.log")).unwrap();
    let mut prev = hex::encode([0u8; 32]);
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["prev"], prev.as_str(), "the chain holds");
            prev = hex::encode(sha2::Sha256::digest(line.as_bytes()));
            v
        })
        .collect()
}

fn spki() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    rcgen::PublicKeyData::subject_public_key_info(&key)
}

fn svid_request(id: &str, ttl: i64) -> pb::X509SvidRequest {
    pb::X509SvidRequest {
        spiffe_id: id.into(),
        public_key_der: spki(),
        ttl_seconds: ttl,
        dns_names: vec![],
        extensions: vec![],
    }
}

fn jwt_request(claims: Value) -> pb::JwtRequest {
    pb::JwtRequest {
        claims_json: claims.to_string().into_bytes(),
        alg: "ES256".into(),
    }
}

#[tokio::test]
async fn a_gateway_with_a_separate_signer_holds_no_key_and_issues_through_it() {
    let tmp = tempfile::tempdir().unwrap();
    let signer = start_signer(tmp.path(), my_uid());
    let config = gateway_config(tmp.path(), &signer);
    let dir = tmp.path().join("data");
    let server = Server::serve(&config, &dir);

    // Attested issuance, signed by the signer.
    let cluster = Cluster::new("https://k8s.signer.example");
    server.add_trust_source("signer", &cluster);
    let r = issue(&server, &cluster);
    let bundle = std::fs::read_to_string(signer.dir.join("ca/bundle.pem")).unwrap();
    assert_eq!(r.body["bundle_pem"].as_str().unwrap(), bundle);
    let leaf = support::pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
    let root = support::pem_certs(&bundle).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&root).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();

    // A join token and a JWT-SVID from the Workload API, by the JWT key.
    let r = server.post_admin(
        "/api/v1/join-tokens",
        &json!({"name": "host-1", "ttl_seconds": 600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": "spiffe://example.org/w", "selectors": [format!("unix:uid:{}", my_uid())]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let wl = spiffe::WorkloadApiClient::connect_to(format!("unix:{}", dir.join("workload.sock").display()))
        .await
        .unwrap();
    let svid = wl.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/w");
    let jwt = wl.fetch_jwt_svid(&["api"], None).await.unwrap();
    wl.validate_jwt_token("api", jwt.token()).await.unwrap();

    // Rotation goes to the signer: its keyring changes, and the gateway
    // publishes the prepared authority.
    let r = server.post_admin("/api/v1/ca/authorities", &json!({"kind": "x509"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let keyring = std::fs::read_to_string(signer.dir.join("ca/authorities.json")).unwrap();
    assert!(keyring.contains(r.body["prepared"]["id"].as_str().unwrap()));
    assert_eq!(
        wl.fetch_x509_bundles()
            .await
            .unwrap()
            .iter()
            .next()
            .unwrap()
            .1
            .authorities()
            .len(),
        2
    );

    // The gateway's data directory holds no private key, nor a CA (the one
    // `.key` is the attestor cache's MAC key, not a signing key).
    let keys: Vec<PathBuf> = files(&dir)
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY"))
                || (p.extension().is_some_and(|e| e == "key") && !p.ends_with("cache/attestors/cache.key"))
        })
        .collect();
    assert!(keys.is_empty(), "keys in the gateway's data directory: {keys:?}");
    assert!(!dir.join("ca").exists());

    // Audit checkpoints are signed by the signer's JWT key too.
    let r = server.post_admin("/api/v1/audit/checkpoints", &json!({}));
    assert_eq!(r.status, 201, "{}", r.body);

    // The signer audited each signature, in an unbroken chain.
    let audit = signer_audit(&signer);
    for op in [
        "x509_svid",
        "join_token",
        "jwt_svid",
        "server_certificate",
        "rotate",
    ] {
        let signed = audit
            .iter()
            .any(|e| e["op"] == op && e["outcome"] == "signed" && e["uid"] == my_uid());
        assert!(signed || op == "server_certificate", "{op} audited: {audit:?}");
    }
    assert!(
        audit
            .iter()
            .any(|e| e["op"] == "x509_svid" && e["subject"] == "spiffe://example.org/w")
    );

    // With the signer gone, nothing is signed and the refusal is clear.
    drop(signer);
    let (_, c) = csr();
    let r = server.post(
        ISSUE,
        &issuance_body(&cluster.token("ns", "sa"), &c, Some(600)),
        None,
    );
    r.assert_problem(503, "signer-unavailable");
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "issuance.refused" && e["detail"]["problem"] == "signer-unavailable"),
        "the refusal is audited"
    );
}

#[tokio::test]
async fn the_signer_refuses_what_is_outside_its_purpose_whatever_the_caller_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let signer = start_signer(tmp.path(), my_uid());
    let mut c = raw(&signer.socket).await;
    let refused = |r: Result<tonic::Response<pb::SignedCertificate>, tonic::Status>, kind: &str| {
        let s = r.expect_err("refused");
        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        assert!(s.message().starts_with(&format!("[{kind}]")), "{s:?}");
    };
    // A leaf in its trust domain, within the cap: signed.
    let ok = c
        .sign_x509_svid(svid_request("spiffe://example.org/a", 3600))
        .await
        .unwrap()
        .into_inner();
    let (_, leaf) = x509_parser::parse_x509_certificate(&ok.der).unwrap();
    assert!(!leaf.is_ca());
    assert_eq!(
        leaf.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .len(),
        1
    );
    refused(
        c.sign_x509_svid(svid_request("spiffe://evil.org/a", 3600)).await,
        "foreign-identity",
    );
    refused(
        c.sign_x509_svid(svid_request("spiffe://example.org/a", 86_401))
            .await,
        "purpose",
    );
    let mut ca_ext = svid_request("spiffe://example.org/a", 3600);
    ca_ext.extensions = vec![pb::Extension {
        oid: vec![2, 5, 29, 19],
        der: vec![0x30, 0x03, 0x01, 0x01, 0xff],
    }];
    refused(c.sign_x509_svid(ca_ext).await, "purpose");
    refused(
        c.sign_subordinate_ca(pb::SubordinateCaRequest {
            public_key_der: spki(),
            common_name: "rogue".into(),
            ttl_seconds: 3600,
        })
        .await,
        "purpose",
    );

    // JWT-SVIDs: its trust domain, within the cap, typed claims only.
    let t = now();
    let token = c
        .sign_jwt_svid(jwt_request(
            json!({"sub": "spiffe://example.org/a", "aud": ["x"], "iat": t, "exp": t + 600, "admin": true}),
        ))
        .await
        .unwrap()
        .into_inner()
        .token;
    let claims = support::jwt_claims(&token);
    assert!(
        claims.get("admin").is_none(),
        "only JWT-SVID claims are signed: {claims}"
    );
    for (claims, kind) in [
        (
            json!({"sub": "spiffe://evil.org/a", "aud": ["x"], "iat": t, "exp": t + 600}),
            "foreign-identity",
        ),
        (
            json!({"sub": "spiffe://example.org/a", "aud": ["x"], "iat": t, "exp": t + 7200}),
            "purpose",
        ),
        (
            json!({"sub": "spiffe://example.org/a", "aud": ["x"], "iat": t - 86_400, "exp": t}),
            "purpose",
        ),
    ] {
        let s = c.sign_jwt_svid(jwt_request(claims)).await.unwrap_err();
        assert!(s.message().starts_with(&format!("[{kind}]")), "{s:?}");
    }
    let s = c
        .sign_join_token(jwt_request(json!({
            "iss": "castellan:join-token:example.org", "aud": ["someone-else"], "sub": "h",
            "jti": "j", "iat": t, "exp": t + 60
        })))
        .await
        .unwrap_err();
    assert!(s.message().starts_with("[purpose]"), "{s:?}");

    let audit = signer_audit(&signer);
    let refusals = audit.iter().filter(|e| e["outcome"] == "refused").count();
    assert_eq!(refusals, 8, "every refusal is audited: {audit:?}");
    assert!(
        !std::fs::read_to_string(signer.dir.join("signer-audit.log"))
            .unwrap()
            .contains("PRIVATE")
    );
}

#[tokio::test]
async fn callers_whose_uid_is_not_allowed_get_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let signer = start_signer(tmp.path(), my_uid() + 4242);
    let channel = channel(&signer.socket).await;
    if let Ok(channel) = channel {
        let mut c = pb::signer_client::SignerClient::new(channel);
        let r = c.sign_x509_svid(svid_request("spiffe://example.org/a", 60)).await;
        assert!(r.is_err(), "a caller not on the allow-list was answered");
    }
    let audit = signer_audit(&signer);
    assert!(
        audit
            .iter()
            .any(|e| e["op"] == "connect" && e["outcome"] == "refused" && e["uid"] == my_uid()),
        "{audit:?}"
    );
    assert!(!audit.iter().any(|e| e["outcome"] == "signed"));
    // A gateway running as that uid does not start: it says why.
    let config = gateway_config(tmp.path(), &signer);
    let stderr = support::serve_refused(&config);
    assert!(stderr.contains("signer.endpoint"), "{stderr}");
}

/// Issue 16, item 4: the CA and JWT keys generated inside a PKCS#11 token
/// (SoftHSM2), used through it, rotated in it, never on disk.
#[test]
fn keys_in_a_pkcs11_token_sign_rotate_and_never_touch_the_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = support::softhsm_token(tmp.path());
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [ca]\nintermediate = true\nkey_manager = \"pkcs11\"\n\
             [ca.pkcs11]\nmodule = \"{}\"\ntoken_label = \"castellan\"\npin_file = \"pin\"\n",
            support::SOFTHSM
        ),
    )
    .unwrap();
    let dir = tmp.path().join("data");
    let env = [("SOFTHSM2_CONF", conf.as_path())];
    let server = Server::serve_with_env(&config, &dir, &env);

    let keyring: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("ca/authorities.json")).unwrap()).unwrap();
    for a in keyring["authorities"].as_array().unwrap() {
        assert!(a["key"].as_str().unwrap().starts_with("pkcs11:castellan-"), "{a}");
    }
    let on_disk: Vec<PathBuf> = files(&dir)
        .into_iter()
        .filter(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY")))
        .collect();
    assert!(on_disk.is_empty(), "private keys on disk: {on_disk:?}");

    // An SVID, chained root → intermediate → leaf, all signed in the token.
    let cluster = Cluster::new("https://k8s.hsm.example");
    server.add_trust_source("hsm", &cluster);
    let verify_chain = |r: &support::Resp| {
        let chain = support::pem_certs(r.body["chain_pem"].as_str().unwrap());
        let root = support::pem_certs(r.body["bundle_pem"].as_str().unwrap()).remove(0);
        let parsed: Vec<_> = chain
            .iter()
            .chain(std::iter::once(&root))
            .map(|d| x509_parser::parse_x509_certificate(d).unwrap().1)
            .collect();
        for pair in parsed.windows(2) {
            pair[0].verify_signature(Some(pair[1].public_key())).unwrap();
        }
        assert_eq!(parsed.len(), 3, "leaf, intermediate, root");
    };
    verify_chain(&issue(&server, &cluster));

    // A join token by the JWT key in the token, verified with the JWKS.
    let r = server.post_admin(
        "/api/v1/join-tokens",
        &json!({"name": "host-1", "ttl_seconds": 600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.body["token"].as_str().unwrap();
    let jwks = server.get("/.well-known/jwks.json", None).body;
    let header = jsonwebtoken::decode_header(token).unwrap();
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"].as_str() == header.kid.as_deref())
        .unwrap();
    let key =
        jsonwebtoken::DecodingKey::from_ec_components(jwk["x"].as_str().unwrap(), jwk["y"].as_str().unwrap())
            .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&["castellan-join"]);
    jsonwebtoken::decode::<Value>(token, &key, &validation).unwrap();

    // Rotation makes the successor in the token too; after a restart the
    // keys are found there again.
    let r = server.post_admin("/api/v1/ca/authorities", &json!({"kind": "x509"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["prepared"]["id"].as_str().unwrap().to_owned();
    let r = server.post_admin(&format!("/api/v1/ca/authorities/{id}/activate"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    server.stop();
    let server = Server::serve_with_env(&config, &dir, &env);
    verify_chain(&issue(&server, &cluster));
    let listed = server.get_admin("/api/v1/ca/authorities").body;
    assert_eq!(listed["authorities"][0]["id"], id.as_str());
    assert!(
        files(&dir)
            .iter()
            .all(|p| !std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY")))
    );
    // A wrong PIN: the gateway does not start, and says why.
    server.stop();
    std::fs::write(tmp.path().join("pin"), "0000").unwrap();
    let out = support::castellan()
        .args(["serve", "--config"])
        .arg(&config)
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PIN") && !stderr.contains("0000"), "{stderr}");
}

/// Issue 16, item 5: Castellan's CA made under an external root whose key
/// is in the token (imported, as an operator would), its own key made there.
#[test]
fn an_upstream_key_in_the_token_signs_castellans_ca_once() {
    let tmp = tempfile::tempdir().unwrap();
    let conf = support::softhsm_token(tmp.path());
    // The corporate root, its key imported into the token.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Corp Root");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let corp = params.self_signed(&key).unwrap();
    std::fs::write(tmp.path().join("corp.pem"), corp.pem()).unwrap();
    let pkcs8 = tmp.path().join("corp-key.pem");
    std::fs::write(&pkcs8, key.serialize_pem()).unwrap();
    let out = std::process::Command::new("softhsm2-util")
        .args(["--import"])
        .arg(&pkcs8)
        .args([
            "--token",
            "castellan",
            "--label",
            "corp-ca",
            "--id",
            "0c0a",
            "--pin",
            "1234",
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_file(&pkcs8).unwrap();

    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
             [ca]\nkey_manager = \"pkcs11\"\nupstream_cert_file = \"corp.pem\"\nupstream_key_label = \"corp-ca\"\n\
             [ca.pkcs11]\nmodule = \"{}\"\ntoken_label = \"castellan\"\npin_file = \"pin\"\n",
            support::SOFTHSM
        ),
    )
    .unwrap();
    let dir = tmp.path().join("data");
    let server = Server::serve_with_env(&config, &dir, &[("SOFTHSM2_CONF", conf.as_path())]);
    let cluster = Cluster::new("https://k8s.corp.example");
    server.add_trust_source("corp", &cluster);
    let r = issue(&server, &cluster);
    assert_eq!(
        support::pem_certs(r.body["bundle_pem"].as_str().unwrap()),
        vec![corp.der().to_vec()],
        "the bundle is the corporate root"
    );
    let mut chain = support::pem_certs(r.body["chain_pem"].as_str().unwrap());
    chain.push(corp.der().to_vec());
    let parsed: Vec<_> = chain
        .iter()
        .map(|d| x509_parser::parse_x509_certificate(d).unwrap().1)
        .collect();
    assert_eq!(parsed.len(), 3, "leaf, Castellan's CA, the corporate root");
    for pair in parsed.windows(2) {
        pair[0].verify_signature(Some(pair[1].public_key())).unwrap();
    }
    assert!(
        files(&dir)
            .iter()
            .all(|p| !std::fs::read_to_string(p).is_ok_and(|t| t.contains("PRIVATE KEY")))
    );
}
