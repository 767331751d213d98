//! SPIFFE federation: foreign bundles from a file and from SPIFFE bundle
//! endpoints (`https_spiffe`, `https_web`), handed to workloads whose
//! entries federate, and Castellan's own bundle endpoint.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use spiffe::{TrustDomain, WorkloadApiClient};
use support::{Server, my_uid};

/// A client, once the server is ready: until each federated trust domain
/// has had its first refresh the Workload API answers Unavailable.
async fn client(dir: &Path) -> WorkloadApiClient {
    let c = WorkloadApiClient::connect_to(format!("unix:{}", dir.join("workload.sock").display()))
        .await
        .unwrap();
    for _ in 0..120 {
        match c.fetch_x509_bundles().await {
            Err(e) if format!("{e:?}").contains("Unavailable") => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            _ => break,
        }
    }
    c
}

fn register(server: &Server, spiffe_id: &str, federates_with: &[&str]) {
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": spiffe_id, "selectors": [format!("unix:uid:{}", my_uid())], "federates_with": federates_with}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

/// A bundle with only its X.509 authorities (as a first, partial copy).
fn x509_only(bundle: &Value) -> Value {
    let mut b = bundle.clone();
    b["keys"]
        .as_array_mut()
        .unwrap()
        .retain(|k| k["use"] == "x509-svid");
    b
}

fn td(name: &str) -> TrustDomain {
    TrustDomain::new(name).unwrap()
}

#[tokio::test]
async fn the_own_bundle_endpoint_serves_a_spiffe_bundle() {
    let server = Server::dev();
    let r = server.get("/.well-known/spiffe-bundle", None);
    assert_eq!(r.status, 200);
    let keys = r.body["keys"].as_array().unwrap();
    assert!(r.body["spiffe_sequence"].as_u64().unwrap() > 0);
    assert_eq!(r.body["spiffe_refresh_hint"], 300);
    let x509: Vec<_> = keys.iter().filter(|k| k["use"] == "x509-svid").collect();
    let jwt: Vec<_> = keys.iter().filter(|k| k["use"] == "jwt-svid").collect();
    assert_eq!((x509.len(), jwt.len()), (1, 1));
    assert!(jwt[0]["kid"].is_string());
    // The x5c certificate is the root on disk.
    let root = std::fs::read_to_string(server.dir.join("ca/root.crt")).unwrap();
    use base64::Engine as _;
    let der = base64::engine::general_purpose::STANDARD
        .decode(x509[0]["x5c"][0].as_str().unwrap())
        .unwrap();
    assert_eq!(der, support::pem_certs(&root)[0]);
    // The stock crate reads both kinds of authority.
    let x = spiffe::X509Bundle::parse_from_der(td("example.org"), &der).unwrap();
    assert_eq!(x.authorities().len(), 1);
    let jwks = json!({ "keys": jwt }).to_string();
    let j = spiffe::JwtBundle::from_jwt_authorities(td("example.org"), jwks.as_bytes()).unwrap();
    assert!(j.find_jwt_authority(jwt[0]["kid"].as_str().unwrap()).is_some());
}

#[tokio::test]
async fn a_federated_bundle_from_a_file_appears_and_follows_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    // The partner: another Castellan in trust domain partner.test.
    let partner = Server::dev_in(&tmp.path().join("partner"), &["--trust-domain", "partner.test"]);
    let partner_bundle = partner.get("/.well-known/spiffe-bundle", None).body;
    register(&partner, "spiffe://partner.test/billing", &[]);

    // Home federates with partner.test; at first the file holds only the
    // partner's X.509 authority.
    let file = tmp.path().join("partner-bundle.json");
    std::fs::write(&file, x509_only(&partner_bundle).to_string()).unwrap();
    let home_dir = tmp.path().join("home");
    let home = Server::dev_in(
        &home_dir,
        &["--federate", &format!("partner.test={}", file.display())],
    );
    register(&home, "spiffe://example.org/frontend", &["partner.test"]);
    let c = client(&home_dir).await;

    let ctx = c.fetch_x509_context().await.unwrap();
    let set = ctx.bundle_set();
    assert!(set.get(&td("example.org")).is_some());
    let partner_x509 = set
        .get(&td("partner.test"))
        .expect("the federated bundle appears in the X.509 context");
    let partner_root = std::fs::read_to_string(tmp.path().join("partner/ca/root.crt")).unwrap();
    assert_eq!(
        partner_x509.authorities()[0].as_bytes(),
        support::pem_certs(&partner_root)[0].as_slice()
    );
    let bundles = c.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td("partner.test")).is_some());

    // No JWT authority for the partner yet: its JWT-SVIDs do not validate.
    let partner_jwt = client(&tmp.path().join("partner"))
        .await
        .fetch_jwt_svid(&["frontend"], None)
        .await
        .unwrap();
    let token = partner_jwt.token().to_string();
    assert!(c.validate_jwt_token("frontend", &token).await.is_err());
    let mut jwt_stream = c.stream_jwt_bundles().await.unwrap();
    let first = jwt_stream.next().await.unwrap().unwrap();
    assert!(first.get(&td("partner.test")).is_none());

    // The file gains the JWT key: the open stream is pushed the new bundle.
    std::fs::write(&file, partner_bundle.to_string()).unwrap();
    let next = tokio::time::timeout(Duration::from_secs(15), jwt_stream.next())
        .await
        .expect("pushed when the file changes")
        .unwrap()
        .unwrap();
    assert!(next.get(&td("partner.test")).is_some());
    let validated = c.validate_jwt_token("frontend", &token).await.unwrap();
    assert_eq!(validated.spiffe_id().to_string(), "spiffe://partner.test/billing");

    // A caller whose entry does not federate gets no foreign bundle.
    let other_dir = tmp.path().join("other");
    let other = Server::dev_in(
        &other_dir,
        &["--federate", &format!("partner.test={}", file.display())],
    );
    register(&other, "spiffe://example.org/loner", &[]);
    let bundles = client(&other_dir).await.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&td("partner.test")).is_none());

    // A broken file changes nothing.
    std::fs::write(
        &file,
        "{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"AAAA\"]}]}",
    )
    .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = home.get_admin("/api/v1/federation").body;
    let s = &status["items"][0];
    assert_eq!(s["trust_domain"], "partner.test");
    assert!(
        s["last_error"].as_str().unwrap().contains("not a certificate"),
        "{status}"
    );
    assert!(c.validate_jwt_token("frontend", &token).await.is_ok());
}

/// Fetches a `serve`-mode server's bundle with its own root.
async fn fetch_bundle(server: &Server) -> Value {
    let url = format!("{}/.well-known/spiffe-bundle", server.base);
    let (endpoint, path) =
        castellan::client::Endpoint::parse_url(&url, Some(&server.dir.join("ca/root.crt"))).unwrap();
    let mut conn = endpoint.connect().await.unwrap();
    let (status, body) = conn.send(hyper::Method::GET, &path, None, None).await.unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice(&body).unwrap()
}

fn serve_in(root: &Path, name: &str, trust_domain: &str) -> Server {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("castellan.toml");
    std::fs::write(
        &config,
        format!("data_dir = \"data\"\ntrust_domain = \"{trust_domain}\"\n\n[http]\naddr = \"127.0.0.1:0\"\n"),
    )
    .unwrap();
    Server::serve(&config, &dir.join("data"))
}

#[tokio::test]
async fn bundles_are_fetched_from_spiffe_bundle_endpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let spiffe_peer = serve_in(tmp.path(), "spiffe-peer", "partner.test");
    let web_peer = serve_in(tmp.path(), "web-peer", "web.test");
    let spiffe_bundle = fetch_bundle(&spiffe_peer).await;
    // Bootstrap with the X.509 authority only: the JWT key can then only
    // have come from the endpoint.
    let bootstrap = tmp.path().join("bootstrap.json");
    std::fs::write(&bootstrap, x509_only(&spiffe_bundle).to_string()).unwrap();

    let config = tmp.path().join("home.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[federation.trust_domains]]
trust_domain = "partner.test"
endpoint_url = "{spiffe}/.well-known/spiffe-bundle"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://partner.test/castellan/server"
bundle_file = "{bootstrap}"

[[federation.trust_domains]]
trust_domain = "web.test"
endpoint_url = "{web}/.well-known/spiffe-bundle"
profile = "https_web"
ca_file = "{web_root}"

# The partner's endpoint, but expecting another server identity.
[[federation.trust_domains]]
trust_domain = "impostor.test"
endpoint_url = "{spiffe}/.well-known/spiffe-bundle"
profile = "https_spiffe"
endpoint_spiffe_id = "spiffe://impostor.test/castellan/server"
bundle_file = "{bootstrap}"
"#,
            spiffe = spiffe_peer.base,
            web = web_peer.base,
            bootstrap = bootstrap.display(),
            web_root = web_peer.dir.join("ca/root.crt").display(),
        ),
    )
    .unwrap();
    let home_dir = tmp.path().join("home");
    let home = Server::dev_in(&home_dir, &["--config", config.to_str().unwrap()]);
    register(
        &home,
        "spiffe://example.org/frontend",
        &["partner.test", "web.test", "impostor.test"],
    );
    let c = client(&home_dir).await;

    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    let partner = jwt_bundles
        .get(&td("partner.test"))
        .expect("the JWT key came from the https_spiffe endpoint");
    let kid = spiffe_bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "jwt-svid")
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(partner.find_jwt_authority(&kid).is_some());
    assert!(jwt_bundles.get(&td("web.test")).is_some(), "https_web");
    assert!(
        jwt_bundles.get(&td("impostor.test")).is_none(),
        "a server with the wrong SPIFFE ID is not trusted"
    );
    let x509 = c.fetch_x509_context().await.unwrap();
    assert!(x509.bundle_set().get(&td("web.test")).is_some());

    let status = home.get_admin("/api/v1/federation").body;
    let by_td = |name: &str| {
        status["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["trust_domain"] == name)
            .unwrap()
            .clone()
    };
    assert!(by_td("partner.test")["sequence"].as_u64().unwrap() > 0);
    assert!(by_td("partner.test")["last_error"].is_null());
    let impostor = by_td("impostor.test");
    assert!(
        impostor["last_error"]
            .as_str()
            .unwrap()
            .contains("expected spiffe://impostor.test/castellan/server"),
        "{impostor}"
    );
}

#[tokio::test]
async fn the_workload_api_is_unavailable_until_federated_bundles_load() {
    let tmp = tempfile::tempdir().unwrap();
    // An endpoint that accepts connections and never answers.
    let stall = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = stall.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        for c in stall.incoming().take(4) {
            conns.push(c);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let config = tmp.path().join("home.toml");
    std::fs::write(
        &config,
        format!(
            "[[federation.trust_domains]]\ntrust_domain = \"slow.test\"\nendpoint_url = \"https://{addr}/bundle\"\nprofile = \"https_web\"\n"
        ),
    )
    .unwrap();
    let dir = tmp.path().join("home");
    let home = Server::dev_in(&dir, &["--config", config.to_str().unwrap()]);
    register(&home, "spiffe://example.org/patient", &[]);
    let c = WorkloadApiClient::connect_to(format!("unix:{}", dir.join("workload.sock").display()))
        .await
        .unwrap();
    let err = c.fetch_x509_svid().await.unwrap_err();
    assert!(format!("{err:?}").contains("Unavailable"), "{err:?}");
    // Once the first fetch gives up (10 s), the API serves without it.
    let ok = async {
        loop {
            if c.fetch_x509_svid().await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ok)
        .await
        .expect("available after the first refresh attempt");
    drop(held);
}
