//! [`PeerVerifier`] against certificates made here: a trust domain CA, leaves
//! with one, no and two URI SANs, and a CA nobody trusts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use spiffe::{TrustDomain, X509BundleSet};

use super::*;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
}

/// A self-signed CA for example.org named `name`.
fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    let der = params.self_signed(&key).unwrap().der().clone();
    Ca {
        issuer: Issuer::new(params, key),
        der,
    }
}

fn leaf(ca: &Ca, uris: &[&str]) -> CertificateDer<'static> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().unwrap()))
        .collect();
    params.signed_by(&key, &ca.issuer).unwrap().der().clone()
}

/// A verifier trusting `ca` for example.org and accepting only `allowed`.
fn verifier(ca: &Ca, allowed: &str) -> PeerVerifier<X509BundleSet> {
    let td = TrustDomain::new("example.org").unwrap();
    let mut bundles = X509BundleSet::new();
    bundles.add_bundle(X509Bundle::parse_from_der(td, ca.der.as_ref()).unwrap());
    let provider = rustls::crypto::ring::default_provider();
    PeerVerifier::new(bundles, SpiffeId::new(allowed).unwrap(), &provider)
}

fn check(v: &PeerVerifier<X509BundleSet>, leaf: &CertificateDer<'_>) -> Result<SpiffeId, Refusal> {
    v.check(leaf, &[], UnixTime::now(), webpki::KeyUsage::client_auth())
}

#[test]
fn the_allowed_id_on_a_good_chain_passes() {
    let ca = ca("example.org CA");
    let v = verifier(&ca, "spiffe://example.org/client");
    let peer = check(&v, &leaf(&ca, &["spiffe://example.org/client"])).unwrap();
    assert_eq!(peer.to_string(), "spiffe://example.org/client");
    assert!(
        v.verify_client_cert(&leaf(&ca, &["spiffe://example.org/client"]), &[], UnixTime::now())
            .is_ok()
    );
}

#[test]
fn another_id_on_a_good_chain_is_not_authorized_and_the_alert_says_access_denied() {
    let ca = ca("example.org CA");
    let v = verifier(&ca, "spiffe://example.org/client");
    let intruder = leaf(&ca, &["spiffe://example.org/intruder"]);
    let refusal = check(&v, &intruder).unwrap_err();
    assert!(matches!(refusal, Refusal::NotAuthorized { .. }), "{refusal}");
    assert_eq!(
        refusal.to_string(),
        "spiffe://example.org/intruder is not spiffe://example.org/client, the only SPIFFE ID accepted"
    );
    // A parent path, or the same path elsewhere, is not the ID either.
    for other in ["spiffe://example.org/client/sub", "spiffe://example.org/clien"] {
        let r = check(&v, &leaf(&ca, &[other])).unwrap_err();
        assert!(matches!(r, Refusal::NotAuthorized { .. }), "{other}: {r}");
    }
    let err = v.verify_client_cert(&intruder, &[], UnixTime::now()).unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    );
    let err = v
        .verify_server_cert(
            &intruder,
            &[],
            &ServerName::try_from("client.example.org").unwrap(),
            &[],
            UnixTime::now(),
        )
        .unwrap_err();
    assert_eq!(
        err,
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    );
}

#[test]
fn a_leaf_without_a_uri_san_or_with_two_is_not_an_svid() {
    let ca = ca("example.org CA");
    let v = verifier(&ca, "spiffe://example.org/client");
    for uris in [
        &[][..],
        &["spiffe://example.org/client", "spiffe://example.org/other"][..],
        &["spiffe://example.org/client", "https://client.example.org/"][..],
        &["https://client.example.org/"][..],
    ] {
        let r = check(&v, &leaf(&ca, uris)).unwrap_err();
        assert!(matches!(r, Refusal::NotAnSvid(_)), "{uris:?}: {r}");
        assert_eq!(
            v.verify_client_cert(&leaf(&ca, uris), &[], UnixTime::now())
                .unwrap_err(),
            rustls::Error::InvalidCertificate(CertificateError::BadEncoding)
        );
    }
}

#[test]
fn a_chain_to_another_ca_is_refused_even_with_the_allowed_id() {
    let trusted = ca("example.org CA");
    let v = verifier(&trusted, "spiffe://example.org/client");
    let forged = leaf(&ca("somebody else's CA"), &["spiffe://example.org/client"]);
    let r = check(&v, &forged).unwrap_err();
    assert!(
        matches!(
            r,
            Refusal::Chain {
                source: webpki::Error::UnknownIssuer,
                ..
            }
        ),
        "{r}"
    );
    assert_eq!(
        v.verify_client_cert(&forged, &[], UnixTime::now()).unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
    // A CA that copies the trusted one's name but not its key.
    let forged = leaf(&ca("example.org CA"), &["spiffe://example.org/client"]);
    assert_eq!(
        v.verify_client_cert(&forged, &[], UnixTime::now()).unwrap_err(),
        rustls::Error::InvalidCertificate(CertificateError::BadSignature)
    );
}

#[test]
fn a_peer_from_a_trust_domain_without_a_bundle_is_refused() {
    let ca = ca("example.org CA");
    let v = verifier(&ca, "spiffe://example.org/client");
    let r = check(&v, &leaf(&ca, &["spiffe://evil.example/client"])).unwrap_err();
    assert_eq!(r.to_string(), "no X.509 bundle for trust domain evil.example");
}
