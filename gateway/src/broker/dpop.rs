//! RFC 9449 DPoP proofs: how a caller shows it holds the private half of a
//! key, for one HTTP request. Agents use them to collect an approved
//! identity (the key they asked with) and to delegate with a parent's
//! JWT-SVID (the key its `cnf.jkt` names).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use super::public_jwk_thumbprint;
use crate::trust::KeySet;

/// A proof is accepted this long after its `iat`.
pub const MAX_AGE_SECONDS: i64 = 300;
/// Clock skew tolerated on `iat` in the future.
const FUTURE_SKEW_SECONDS: i64 = 60;

/// What the proof must be bound to.
#[derive(Debug, Clone, Copy)]
pub struct Expected<'a> {
    /// The request's method (`htm`).
    pub method: &'a str,
    /// The request's URL without query or fragment (`htu`).
    pub url: &'a str,
    /// The token the proof accompanies, whose hash `ath` must carry.
    pub token: Option<&'a str>,
}

/// A verified proof.
#[derive(Debug, Clone)]
pub struct Proof {
    /// RFC 7638 thumbprint of the proof's key.
    pub jkt: String,
    /// The proof's public key.
    pub jwk: Value,
    /// Its `jti`, for replay detection.
    pub jti: String,
    /// Its `iat`.
    pub iat: i64,
}

/// Checks a compact DPoP proof: `typ`, an embedded public key that verifies
/// the signature, `htm`, `htu`, `iat` freshness and `ath`. Replay of `jti`
/// is the caller's to check. The error text is safe to show the caller.
pub fn verify(proof: &str, expected: Expected<'_>, now: i64) -> Result<Proof, String> {
    let header: Value = proof
        .split('.')
        .next()
        .and_then(|h| URL_SAFE_NO_PAD.decode(h).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or("the DPoP proof is not a JWS")?;
    if header.get("typ").and_then(Value::as_str) != Some("dpop+jwt") {
        return Err("the DPoP proof's `typ` must be `dpop+jwt`".into());
    }
    let jwk = header
        .get("jwk")
        .filter(|j| j.is_object())
        .ok_or("the DPoP proof has no `jwk` header")?
        .clone();
    let jkt = public_jwk_thumbprint(&jwk).map_err(|e| format!("the DPoP proof's key: {e}"))?;
    let mut keyed = jwk.clone();
    keyed["kid"] = "dpop".into();
    let keys =
        KeySet::from_jwks(&json!({ "keys": [keyed] })).map_err(|e| format!("the DPoP proof's key: {e}"))?;
    let (_, payload) = keys
        .verify_compact_single(proof)
        .map_err(|e| format!("the DPoP proof: {e}"))?;
    let claims: Value = serde_json::from_str(&payload).map_err(|_| "the DPoP proof's payload is not JSON")?;
    let text = |k: &str| claims.get(k).and_then(Value::as_str);
    let jti = text("jti")
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or("the DPoP proof has no `jti`")?;
    if text("htm") != Some(expected.method) {
        return Err(format!("the DPoP proof's `htm` must be {}", expected.method));
    }
    if text("htu").map(without_query) != Some(without_query(expected.url)) {
        return Err(format!("the DPoP proof's `htu` must be {}", expected.url));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or("the DPoP proof has no `iat`")?;
    if iat > now + FUTURE_SKEW_SECONDS || iat + MAX_AGE_SECONDS < now {
        return Err("the DPoP proof is not fresh (`iat`)".into());
    }
    if let Some(token) = expected.token {
        let ath = URL_SAFE_NO_PAD.encode(sha2::Digest::finalize(
            <sha2::Sha256 as sha2::Digest>::new_with_prefix(token.as_bytes()),
        ));
        if text("ath") != Some(ath.as_str()) {
            return Err("the DPoP proof's `ath` is not the hash of the token it accompanies".into());
        }
    }
    Ok(Proof {
        jkt,
        jwk,
        jti: jti.to_owned(),
        iat,
    })
}

/// `htu` is compared without query and fragment (RFC 9449 §4.3).
fn without_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Holder {
        key: rcgen::KeyPair,
        jwk: Value,
    }

    fn holder() -> Holder {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..65])});
        Holder { key, jwk }
    }

    impl Holder {
        fn prove(&self, typ: &str, claims: Value) -> String {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
            header.typ = Some(typ.into());
            header.jwk = Some(serde_json::from_value(self.jwk.clone()).unwrap());
            let signing =
                jsonwebtoken::EncodingKey::from_ec_pem(self.key.serialize_pem().as_bytes()).unwrap();
            jsonwebtoken::encode(&header, &claims, &signing).unwrap()
        }
    }

    const URL: &str = "https://castellan.example/api/v1/ephemeral/r1/collect";

    #[test]
    fn a_proof_binds_key_method_url_time_and_token() {
        let h = holder();
        let ath = URL_SAFE_NO_PAD.encode(sha2::Digest::finalize(
            <sha2::Sha256 as sha2::Digest>::new_with_prefix(b"tok"),
        ));
        let good = json!({"jti": "j1", "htm": "POST", "htu": format!("{URL}?x=1"), "iat": 1000, "ath": ath});
        let expect = Expected {
            method: "POST",
            url: URL,
            token: Some("tok"),
        };
        let p = verify(&h.prove("dpop+jwt", good.clone()), expect, 1010).unwrap();
        assert_eq!(p.jkt, crate::signer::jwk_thumbprint(&h.jwk));
        assert_eq!(p.jti, "j1");
        let refused =
            |claims: Value, typ: &str, now: i64| verify(&h.prove(typ, claims), expect, now).unwrap_err();
        assert!(refused(good.clone(), "JWT", 1010).contains("typ"));
        let mut c = good.clone();
        c["htm"] = "GET".into();
        assert!(refused(c, "dpop+jwt", 1010).contains("htm"));
        let mut c = good.clone();
        c["htu"] = "https://evil.example/api/v1/ephemeral/r1/collect".into();
        assert!(refused(c, "dpop+jwt", 1010).contains("htu"));
        assert!(refused(good.clone(), "dpop+jwt", 1000 + MAX_AGE_SECONDS + 1).contains("fresh"));
        let mut c = good.clone();
        c["ath"] = "AAAA".into();
        assert!(refused(c, "dpop+jwt", 1010).contains("ath"));
        // Another key's signature under this key's header does not verify.
        let other = holder();
        let forged = {
            let mut parts: Vec<String> = other
                .prove("dpop+jwt", good)
                .split('.')
                .map(str::to_owned)
                .collect();
            parts[0] = h
                .prove("dpop+jwt", json!({}))
                .split('.')
                .next()
                .unwrap()
                .to_owned();
            parts.join(".")
        };
        assert!(verify(&forged, expect, 1010).is_err());
    }
}
