use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use serde_json::Value;

use super::*;

fn ec_jwk(kid: &str) -> (rcgen::KeyPair, Value) {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let raw = kp.public_key_raw();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid, "use": "sig", "alg": "ES256",
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
    });
    (kp, jwk)
}

fn sign(kp: &rcgen::KeyPair, header: jsonwebtoken::Header, claims: &Value) -> String {
    let key = jsonwebtoken::EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn header(kid: &str) -> jsonwebtoken::Header {
    let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    h
}

#[test]
fn verifies_a_genuine_es256_token() {
    let (kp, jwk) = ec_jwk("k1");
    let set = KeySet::from_jwks(&serde_json::json!({"keys": [jwk]})).unwrap();
    let token = sign(&kp, header("k1"), &serde_json::json!({"sub": "x"}));
    let (h, payload) = set.verify_compact(&token).unwrap();
    assert_eq!(h["kid"], "k1");
    assert_eq!(serde_json::from_str::<Value>(&payload).unwrap()["sub"], "x");
}

#[test]
fn refuses_a_signature_spelled_another_way() {
    // An ES256 signature is 64 bytes, 86 base64url characters: the last
    // one carries 4 unused bits. Setting them leaves the bytes alone but
    // changes the text, which replay protection keys on, so it must fail.
    let (kp, jwk) = ec_jwk("k1");
    let set = KeySet::from_jwks(&serde_json::json!({"keys": [jwk]})).unwrap();
    let token = sign(&kp, header("k1"), &serde_json::json!({"sub": "x"}));
    let (signed, sig) = token.rsplit_once('.').unwrap();
    assert_eq!(sig.len(), 86);
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = alphabet.iter().position(|c| *c == sig.as_bytes()[85]).unwrap();
    let respelled = alphabet[(last & !0b1111) | (!last & 0b1111)] as char;
    let variant = format!("{signed}.{}{respelled}", &sig[..85]);
    assert_ne!(variant, token);
    assert!(set.verify_compact(&variant).is_err());
    assert!(set.verify_compact(&token).is_ok());
}

#[test]
fn refuses_forgeries_and_weak_algorithms() {
    let (kp, jwk) = ec_jwk("k1");
    let (other, _) = ec_jwk("k1");
    let set = KeySet::from_jwks(&serde_json::json!({"keys": [jwk.clone()]})).unwrap();
    let forged = sign(&other, header("k1"), &serde_json::json!({"sub": "x"}));
    assert_eq!(
        set.verify_compact(&forged).unwrap_err(),
        "signature does not verify"
    );
    let unknown = sign(&kp, header("k2"), &serde_json::json!({}));
    assert!(
        set.verify_compact(&unknown)
            .unwrap_err()
            .contains("no key with kid")
    );

    let enc = |v: Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        enc(serde_json::json!({"alg": "none", "kid": "k1"})),
        enc(serde_json::json!({}))
    );
    assert!(set.verify_compact(&none).unwrap_err().contains("not accepted"));

    // HS256 with the public JWK as the shared secret: the classic key confusion.
    let mut hs = jsonwebtoken::Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let secret = jsonwebtoken::EncodingKey::from_secret(jwk.to_string().as_bytes());
    let hs_token = jsonwebtoken::encode(&hs, &serde_json::json!({}), &secret).unwrap();
    assert!(
        set.verify_compact(&hs_token)
            .unwrap_err()
            .contains("not accepted")
    );
}

#[test]
fn refuses_private_symmetric_and_unlabelled_keys() {
    let (_, mut jwk) = ec_jwk("k1");
    jwk["d"] = "c2VjcmV0".into();
    let e = KeySet::from_jwks(&serde_json::json!({"keys": [jwk]}))
        .err()
        .unwrap();
    assert!(e.to_string().contains("private"), "{e}");
    let oct = serde_json::json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]});
    assert!(KeySet::from_jwks(&oct).is_err());
    let (_, mut nokid) = ec_jwk("k1");
    nokid.as_object_mut().unwrap().remove("kid");
    assert!(KeySet::from_jwks(&serde_json::json!({"keys": [nokid]})).is_err());
    assert!(KeySet::from_jwks(&serde_json::json!({"keys": []})).is_err());
    assert!(KeySet::from_jwks(&serde_json::json!([])).is_err());
}
