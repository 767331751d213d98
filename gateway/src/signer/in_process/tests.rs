//! The in-process signer: purpose, and the life of its authorities.

use super::*;

fn signer(intermediate: bool) -> (tempfile::TempDir, InProcessSigner) {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::ca::load_or_create(&dir.path().join("ca"), "example.org", intermediate).unwrap();
    let signer = InProcessSigner::new(&ca, "example.org").unwrap();
    (dir, signer)
}

fn template(id: &str) -> Template {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    Template {
        spiffe_id: SpiffeId::parse(id).unwrap(),
        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
        ttl: Duration::minutes(5),
        dns_names: vec![],
        extensions: vec![],
    }
}

fn claims(sub: &str) -> JwtSvidClaims {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    JwtSvidClaims {
        sub: SpiffeId::parse(sub).unwrap(),
        aud: vec!["a".into()],
        iat: now,
        exp: now + 300,
        iss: None,
        jti: None,
        agent: None,
    }
}

fn certs(pem: &str) -> usize {
    crate::util::pem_blocks(pem, "CERTIFICATE").len()
}

/// Whether `leaf` (PEM) was signed by the key of `issuer` (PEM).
fn signed_by(leaf: &str, issuer: &str) -> bool {
    let (_, l) = x509_parser::pem::parse_x509_pem(leaf.as_bytes()).unwrap();
    let (_, i) = x509_parser::pem::parse_x509_pem(issuer.as_bytes()).unwrap();
    let (l, i) = (l.parse_x509().unwrap(), i.parse_x509().unwrap());
    l.verify_signature(Some(i.public_key())).is_ok()
}

#[test]
fn jwts_carry_the_thumbprint_kid_and_verify_with_the_published_key() {
    let (_dir, signer) = signer(true);
    let token = signer
        .sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::ES256)
        .unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    let jwks = signer.authorities().jwks();
    assert_eq!(header.kid.as_deref(), jwks["keys"][0]["kid"].as_str());
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    let keys = crate::trust::KeySet::from_jwks(&jwks).unwrap();
    keys.verify_compact(&token).unwrap();
    assert!(jwks["keys"][0].get("d").is_none(), "public only");
    // Purpose: nothing outside the trust domain, in any shape.
    assert!(matches!(
        signer.sign_jwt_svid(&claims("spiffe://evil.org/a"), JwtAlg::ES256),
        Err(SignerError::ForeignIdentity(_))
    ));
    assert!(matches!(
        signer.sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::RS256),
        Err(SignerError::NoKey(JwtAlg::RS256))
    ));
    // Nothing outlives its key.
    let mut forever = claims("spiffe://example.org/a");
    forever.exp = 4_000_000_000;
    assert!(matches!(
        signer.sign_jwt_svid(&forever, JwtAlg::ES256),
        Err(SignerError::Template(_))
    ));
    assert!(signer.sign_x509_svid(&template("spiffe://example.org/w")).is_ok());
    assert!(matches!(
        signer.sign_x509_svid(&template("spiffe://evil.org/w")),
        Err(SignerError::ForeignIdentity(_))
    ));
}

#[test]
fn a_prepared_authority_is_published_first_signs_once_active_and_is_revoked_only_when_safe() {
    let (dir, signer) = signer(false);
    let first = signer.authorities().active(Kind::X509).unwrap().id.clone();
    assert_eq!(certs(signer.authorities().bundle_pem()), 1);

    let after = signer
        .rotate(&Rotation::Prepare {
            kind: Kind::X509,
            root: false,
        })
        .unwrap();
    let next = after
        .authorities
        .iter()
        .find(|a| a.state == State::Prepared)
        .unwrap()
        .clone();
    assert_eq!(certs(after.bundle_pem()), 2, "published before it signs");
    let leaf = signer
        .sign_x509_svid(&template("spiffe://example.org/w"))
        .unwrap();
    assert_eq!(leaf.authority, first, "the active authority still signs");

    signer
        .rotate(&Rotation::Activate { id: next.id.clone() })
        .unwrap();
    let leaf = signer
        .sign_x509_svid(&template("spiffe://example.org/w"))
        .unwrap();
    assert_eq!(leaf.authority, next.id);
    assert!(leaf.chain_pem.is_empty(), "one tier: the leaf alone");
    assert!(signed_by(&leaf.pem, &next.anchor_pem));
    assert_eq!(signer.authorities().get(&first).unwrap().state, State::Retired);

    // What the old authority signed is still valid: not yet.
    assert!(matches!(
        signer.rotate(&Rotation::Revoke { id: first.clone() }),
        Err(SignerError::AuthorityInUse { .. })
    ));
    assert!(matches!(
        signer.rotate(&Rotation::Taint { id: next.id.clone() }),
        Err(SignerError::Rotation(_))
    ));
    let tainted = signer.rotate(&Rotation::Taint { id: first.clone() }).unwrap();
    assert!(tainted.must_remint(&first) && !tainted.must_remint(&next.id));
    let revoked = signer.rotate(&Rotation::Revoke { id: first.clone() }).unwrap();
    assert_eq!(certs(revoked.bundle_pem()), 1, "gone from the bundle");
    assert!(revoked.generation > tainted.generation);
    let ca = dir.path().join("ca");
    assert!(!ca.join("root.key").exists(), "its key is deleted");
    assert!(matches!(
        signer.rotate(&Rotation::Activate { id: first.clone() }),
        Err(SignerError::Rotation(_))
    ));
    assert!(matches!(
        signer.rotate(&Rotation::Revoke { id: "nope".into() }),
        Err(SignerError::UnknownAuthority(_))
    ));

    // The keyring on disk is what the signer had.
    let reopened = InProcessSigner::open(&ca, "example.org", None).unwrap();
    assert_eq!(reopened.authorities().active(Kind::X509).unwrap().id, next.id);
    assert_eq!(reopened.authorities().bundle_pem(), revoked.bundle_pem());
    let leaf = reopened
        .sign_x509_svid(&template("spiffe://example.org/w"))
        .unwrap();
    assert_eq!(leaf.authority, next.id);
}

#[test]
fn under_a_root_intermediates_rotate_below_it_and_a_new_root_is_published_first() {
    let (_dir, signer) = signer(true);
    let before = signer.authorities();
    let root = before.bundle_pem().to_owned();
    let prepared = signer
        .rotate(&Rotation::Prepare {
            kind: Kind::X509,
            root: false,
        })
        .unwrap();
    assert_eq!(
        prepared.bundle_pem(),
        root,
        "the same root: the bundle does not change"
    );
    let int = prepared
        .authorities
        .iter()
        .find(|a| a.state == State::Prepared)
        .unwrap()
        .clone();
    assert!(signed_by(&int.cert_pem, &root));
    signer.rotate(&Rotation::Activate { id: int.id.clone() }).unwrap();
    let leaf = signer
        .sign_x509_svid(&template("spiffe://example.org/w"))
        .unwrap();
    assert_eq!(leaf.chain_pem, int.cert_pem);
    assert!(signed_by(&leaf.pem, &int.cert_pem));

    let with_root = signer
        .rotate(&Rotation::Prepare {
            kind: Kind::X509,
            root: true,
        })
        .unwrap();
    assert_eq!(
        certs(with_root.bundle_pem()),
        2,
        "the new root is published first"
    );
    let next = with_root
        .authorities
        .iter()
        .find(|a| a.state == State::Prepared)
        .unwrap()
        .clone();
    assert_ne!(next.anchor_pem, root);
    signer
        .rotate(&Rotation::Activate { id: next.id.clone() })
        .unwrap();
    let leaf = signer
        .sign_x509_svid(&template("spiffe://example.org/w"))
        .unwrap();
    assert!(signed_by(&leaf.pem, &next.cert_pem) && signed_by(&next.cert_pem, &next.anchor_pem));
    // Subordinate CAs come from the new root.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let sub = signer
        .sign_subordinate_ca(
            &rcgen::PublicKeyData::subject_public_key_info(&key),
            "team",
            Duration::days(1),
        )
        .unwrap();
    assert!(signed_by(&sub.pem, &next.anchor_pem));
}

#[test]
fn jwt_keys_rotate_with_both_published_across_the_switch() {
    let (_dir, signer) = signer(false);
    let old = signer.authorities().active(Kind::Jwt).unwrap().id.clone();
    let prepared = signer
        .rotate(&Rotation::Prepare {
            kind: Kind::Jwt,
            root: false,
        })
        .unwrap();
    assert_eq!(prepared.jwks()["keys"].as_array().unwrap().len(), 2);
    let before = signer
        .sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::ES256)
        .unwrap();
    let new = prepared
        .authorities
        .iter()
        .find(|a| a.kind == Kind::Jwt && a.state == State::Prepared)
        .unwrap()
        .id
        .clone();
    let active = signer.rotate(&Rotation::Activate { id: new.clone() }).unwrap();
    let after = signer
        .sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::ES256)
        .unwrap();
    assert_eq!(jsonwebtoken::decode_header(&before).unwrap().kid, Some(old));
    assert_eq!(jsonwebtoken::decode_header(&after).unwrap().kid, Some(new));
    let keys = crate::trust::KeySet::from_jwks(&active.jwks()).unwrap();
    keys.verify_compact(&before).unwrap();
    keys.verify_compact(&after).unwrap();
}
