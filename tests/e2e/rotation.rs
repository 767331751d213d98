//! Rotation of the signing authorities (issue 16), through the real binary:
//! `castellan ca …` against a running server, watched by a stock SPIFFE
//! client on a live Workload API stream.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use spiffe::{TrustDomain, WorkloadApiClient, X509Context};
use support::{Server, my_uid};

/// `castellan ca ARGS --json` against `server`; the answer, or the error line.
fn ca(server: &Server, args: &[&str]) -> Result<Value, String> {
    let out = support::castellan()
        .arg("ca")
        .args(args)
        .args(["--json", "--addr", &server.base, "--token", &server.admin_token])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn entry(server: &Server, spiffe_id: &str) {
    let r = server.post_admin(
        "/api/v1/entries",
        &json!({"spiffe_id": spiffe_id, "selectors": [format!("unix:uid:{}", my_uid())], "x509_svid_ttl": 3600}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
}

async fn client(server: &Server) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix:{}", server.dir.join("workload.sock").display()))
        .await
        .unwrap()
}

/// The trust domain's bundle in a context, as DER certificates.
fn bundle(ctx: &X509Context) -> Vec<Vec<u8>> {
    let td = TrustDomain::new("example.org").unwrap();
    ctx.bundle_set()
        .get(&td)
        .unwrap()
        .authorities()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect()
}

/// The DER of the certificate that issued the context's leaf, among
/// `candidates` (the trust anchors seen so far).
fn issuer_of(ctx: &X509Context, candidates: &[Vec<u8>]) -> Option<Vec<u8>> {
    let chain = ctx.svids()[0].cert_chain();
    let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_bytes()).unwrap();
    candidates
        .iter()
        .find(|c| {
            let (_, ca) = x509_parser::parse_x509_certificate(c).unwrap();
            leaf.verify_signature(Some(ca.public_key())).is_ok()
        })
        .cloned()
}

fn pem_der(pem: &str) -> Vec<u8> {
    support::pem_certs(pem).remove(0)
}

async fn next(
    stream: &mut (impl futures::Stream<Item = Result<X509Context, spiffe::WorkloadApiError>> + Unpin),
) -> X509Context {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("pushed within 10 s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn a_live_stream_sees_the_new_authority_in_its_bundle_before_any_svid_it_signed() {
    let server = Server::dev();
    entry(&server, "spiffe://example.org/rotating");
    let c = client(&server).await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let first = next(&mut stream).await;
    let old_bundle = bundle(&first);
    assert_eq!(old_bundle.len(), 1);
    let old = ca(&server, &["list"]).unwrap()["authorities"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Prepared: in the bundle at once, the SVID unchanged.
    let prepared = ca(&server, &["prepare"]).unwrap();
    let new = prepared["prepared"]["id"].as_str().unwrap().to_owned();
    let new_root = pem_der(prepared["prepared"]["certificate_pem"].as_str().unwrap());
    let published = next(&mut stream).await;
    let seen = bundle(&published);
    assert_eq!(seen.len(), 2, "the prepared authority is published");
    assert!(seen.contains(&new_root));
    assert_eq!(
        published.svids()[0].cert_chain()[0],
        first.svids()[0].cert_chain()[0],
        "nothing re-minted by preparing"
    );
    assert_eq!(issuer_of(&published, &seen), Some(old_bundle[0].clone()));
    let spiffe_bundle = server.get("/.well-known/spiffe-bundle", None);
    assert_eq!(
        spiffe_bundle.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "x509-svid")
            .count(),
        2,
        "the federation endpoint publishes it too"
    );

    // Activated: the next SVID is the new authority's, and its bundle was
    // seen before.
    ca(&server, &["activate", &new]).unwrap();
    let minted = next(&mut stream).await;
    assert_eq!(issuer_of(&minted, &seen), Some(new_root.clone()));
    assert!(bundle(&minted).contains(&new_root));

    // The old authority signed SVIDs that are still valid: not revocable
    // until its holders were told to re-mint.
    let refused = ca(&server, &["revoke", &old]).unwrap_err();
    assert!(
        refused.contains("rotation-refused") && refused.contains("taint"),
        "{refused}"
    );
    let refused = ca(&server, &["taint", &new]).unwrap_err();
    assert!(refused.contains("rotation-refused"), "{refused}");
    ca(&server, &["taint", &old]).unwrap();
    let revoked = ca(&server, &["revoke", &old]).unwrap();
    let states: Vec<(&str, &str)> = revoked["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "x509")
        .map(|a| (a["id"].as_str().unwrap(), a["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [(new.as_str(), "active"), (old.as_str(), "revoked")]);
    let after = next(&mut stream).await;
    assert_eq!(bundle(&after), vec![new_root.clone()], "gone from the bundle");
    assert_eq!(issuer_of(&after, std::slice::from_ref(&new_root)), Some(new_root));
    let bundle_file = std::fs::read_to_string(server.dir.join("ca/bundle.pem")).unwrap();
    assert_eq!(support::pem_certs(&bundle_file), bundle(&after));

    let audit = server.audit();
    let rotated: Vec<&str> = audit
        .iter()
        .filter(|e| e["kind"] == "ca.rotated")
        .map(|e| e["detail"]["rotation"]["op"].as_str().unwrap())
        .collect();
    assert_eq!(rotated, ["prepare", "activate", "taint", "revoke"]);
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["kind"] == "ca.rotation_refused")
            .count(),
        2,
        "refusals are audited"
    );
    // Admin only.
    let r = server.post("/api/v1/ca/authorities", &json!({"kind": "x509"}), None);
    assert_eq!(r.status, 401, "{}", r.body);
}

#[tokio::test]
async fn jwt_keys_rotate_with_old_tokens_valid_until_revoked() {
    let server = Server::dev();
    entry(&server, "spiffe://example.org/jwt");
    let c = client(&server).await;
    let mut bundles = c.stream_jwt_bundles().await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let keys = |set: &spiffe::JwtBundleSet| set.get(&td).unwrap().jwt_authorities().count();
    let first = tokio::time::timeout(Duration::from_secs(10), bundles.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(keys(&first), 1);
    let before = c.fetch_jwt_svid(&["api"], None).await.unwrap().token().to_owned();

    let prepared = ca(&server, &["prepare", "--jwt"]).unwrap();
    let kid = prepared["prepared"]["id"].as_str().unwrap().to_owned();
    let pushed = tokio::time::timeout(Duration::from_secs(10), bundles.next())
        .await
        .expect("the JWT bundle stream is pushed")
        .unwrap()
        .unwrap();
    assert_eq!(keys(&pushed), 2);
    assert!(pushed.get(&td).unwrap().find_jwt_authority(&kid).is_some());
    let jwks = server.get("/.well-known/jwks.json", None);
    assert_eq!(jwks.body["keys"].as_array().unwrap().len(), 2);

    ca(&server, &["activate", &kid]).unwrap();
    let after = c.fetch_jwt_svid(&["api"], None).await.unwrap().token().to_owned();
    assert_eq!(
        jsonwebtoken::decode_header(&after).unwrap().kid.as_deref(),
        Some(kid.as_str())
    );
    assert_ne!(
        jsonwebtoken::decode_header(&before).unwrap().kid,
        Some(kid.clone())
    );
    // Both validate while both are published.
    c.validate_jwt_token("api", &before).await.unwrap();
    c.validate_jwt_token("api", &after).await.unwrap();
    let old = jsonwebtoken::decode_header(&before).unwrap().kid.unwrap();
    ca(&server, &["taint", &old]).unwrap();
    ca(&server, &["revoke", &old]).unwrap();
    assert!(
        c.validate_jwt_token("api", &before).await.is_err(),
        "its key is gone"
    );
    c.validate_jwt_token("api", &after).await.unwrap();
    let jwks = server.get("/.well-known/jwks.json", None);
    assert_eq!(jwks.body["keys"][0]["kid"], kid.as_str());
    assert_eq!(jwks.body["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn authorities_rotate_by_themselves_at_the_configured_fractions_of_their_life() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "[issuance]\nmin_ttl_seconds = 5\n\
         [ca]\nx509_authority_ttl_seconds = 60\nprepare_at = 0.2\nactivate_at = 0.45\n",
    )
    .unwrap();
    let dir = tmp.path().join("data");
    let server = Server::dev_in(&dir, &["--config", config.to_str().unwrap()]);
    // A first, short-lived authority by hand; the rest by itself.
    let prepared = ca(&server, &["prepare"]).unwrap();
    let first = prepared["prepared"]["id"].as_str().unwrap().to_owned();
    ca(&server, &["activate", &first]).unwrap();
    entry(&server, "spiffe://example.org/auto");
    let c = client(&server).await;
    let mut stream = c.stream_x509_contexts().await.unwrap();
    let start = next(&mut stream).await;
    let seen_first = bundle(&start);

    // Prepared after 12 s (within the 10 s housekeeping tick), active
    // after 27 s: the bundle grows before the SVID changes issuer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut bundle_grew_at = None;
    let mut seen = seen_first.clone();
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no automatic rotation within 60 s"
        );
        let ctx = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let now_bundle = bundle(&ctx);
        if now_bundle.len() > seen.len() && bundle_grew_at.is_none() {
            bundle_grew_at = Some(tokio::time::Instant::now());
        }
        for b in &now_bundle {
            if !seen.contains(b) {
                seen.push(b.clone());
            }
        }
        let issuer = issuer_of(&ctx, &seen).expect("signed by a published authority");
        if !seen_first.contains(&issuer) {
            assert!(bundle_grew_at.is_some(), "the new authority was published first");
            break;
        }
    }
    let listed = ca(&server, &["list"]).unwrap();
    let active = &listed["authorities"][0];
    assert_eq!(active["state"], "active");
    assert_ne!(active["id"], first.as_str());
    let audit = server.audit();
    assert!(
        audit
            .iter()
            .any(|e| e["kind"] == "ca.rotated" && e["actor"] == "castellan"),
        "automatic steps are audited as Castellan's"
    );
}
