//! OPA's bundle signature scheme: `.signatures.json` holds
//! `{"signatures": ["<JWT>"]}` whose payload lists every file with its
//! SHA-256 (`{"files": [{"name", "hash", "algorithm": "SHA-256"}], "keyid"?, "scope"?}`).
//! Verification requires the signed list and the bundle's files to match
//! exactly.

use std::collections::BTreeMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Value, json};

use super::{Bundle, BundleError, SIGNATURES_FILE, file_hash};

/// Algorithms bundles may be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    Es256,
    Rs256,
    EdDsa,
}

impl SigningAlg {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ES256" => Some(Self::Es256),
            "RS256" => Some(Self::Rs256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    fn jwt(self) -> Algorithm {
        match self {
            Self::Es256 => Algorithm::ES256,
            Self::Rs256 => Algorithm::RS256,
            Self::EdDsa => Algorithm::EdDSA,
        }
    }
}

/// What a verified signature said.
#[derive(Debug, Clone)]
pub struct VerifiedSignature {
    pub alg: String,
    pub keyid: Option<String>,
    pub files: usize,
}

/// Signs the bundle in place: computes every file's hash and adds
/// `.signatures.json`.
pub fn sign(
    bundle: &mut Bundle,
    private_key_pem: &str,
    alg: SigningAlg,
    keyid: Option<&str>,
) -> Result<(), BundleError> {
    bundle.files.remove(SIGNATURES_FILE);
    let mut files = Vec::new();
    for (name, bytes) in &bundle.files {
        files.push(json!({ "name": name, "hash": file_hash(name, bytes)?, "algorithm": "SHA-256" }));
    }
    let mut claims = json!({ "files": files });
    if let Some(k) = keyid {
        claims["keyid"] = k.into();
    }
    let key = match alg {
        SigningAlg::Es256 => EncodingKey::from_ec_pem(private_key_pem.as_bytes()),
        SigningAlg::Rs256 => EncodingKey::from_rsa_pem(private_key_pem.as_bytes()),
        SigningAlg::EdDsa => EncodingKey::from_ed_pem(private_key_pem.as_bytes()),
    }
    .map_err(|e| BundleError::Signature(format!("signing key: {e}")))?;
    let mut header = Header::new(alg.jwt());
    header.kid = keyid.map(str::to_owned);
    let jwt = jsonwebtoken::encode(&header, &claims, &key)
        .map_err(|e| BundleError::Signature(format!("signing failed: {e}")))?;
    let doc = serde_json::to_vec(&json!({ "signatures": [jwt] }))
        .map_err(|e| BundleError::Signature(e.to_string()))?;
    bundle.files.insert(SIGNATURES_FILE.into(), doc);
    Ok(())
}

/// Verifies `.signatures.json` with a public key (PEM SubjectPublicKeyInfo)
/// and that the signed file list matches the bundle exactly.
pub fn verify(bundle: &Bundle, public_key_pem: &str) -> Result<VerifiedSignature, BundleError> {
    let doc = bundle
        .files
        .get(SIGNATURES_FILE)
        .ok_or_else(|| BundleError::Signature("the bundle is not signed (no .signatures.json)".into()))?;
    let doc: Value =
        serde_json::from_slice(doc).map_err(|e| BundleError::Signature(format!(".signatures.json: {e}")))?;
    let sigs = doc["signatures"]
        .as_array()
        .ok_or_else(|| BundleError::Signature("no `signatures` array".into()))?;
    if sigs.len() != 1 {
        return Err(BundleError::Signature(format!(
            "exactly one signature is supported, found {}",
            sigs.len()
        )));
    }
    let jwt = sigs[0]
        .as_str()
        .ok_or_else(|| BundleError::Signature("the signature is not a string".into()))?;
    let header =
        jsonwebtoken::decode_header(jwt).map_err(|e| BundleError::Signature(format!("header: {e}")))?;
    let (alg, key) = match header.alg {
        Algorithm::ES256 => ("ES256", DecodingKey::from_ec_pem(public_key_pem.as_bytes())),
        Algorithm::RS256 => ("RS256", DecodingKey::from_rsa_pem(public_key_pem.as_bytes())),
        Algorithm::EdDSA => ("EdDSA", DecodingKey::from_ed_pem(public_key_pem.as_bytes())),
        other => {
            return Err(BundleError::Signature(format!(
                "algorithm {other:?} is not accepted (ES256, RS256, EdDSA)"
            )));
        }
    };
    let key = key.map_err(|e| BundleError::Signature(format!("verification key does not fit {alg}: {e}")))?;
    let mut v = Validation::new(header.alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_aud = false;
    let claims = jsonwebtoken::decode::<Value>(jwt, &key, &v)
        .map_err(|e| BundleError::Signature(format!("does not verify with the given key ({e})")))?
        .claims;
    let listed: BTreeMap<String, String> = claims["files"]
        .as_array()
        .ok_or_else(|| BundleError::Signature("the payload has no `files`".into()))?
        .iter()
        .map(|f| {
            if f["algorithm"].as_str().unwrap_or("SHA-256") != "SHA-256" {
                return Err(BundleError::Signature(
                    "only SHA-256 file hashes are accepted".into(),
                ));
            }
            match (f["name"].as_str(), f["hash"].as_str()) {
                (Some(n), Some(h)) => Ok((n.trim_start_matches('/').to_owned(), h.to_owned())),
                _ => Err(BundleError::Signature(
                    "a `files` entry lacks `name` or `hash`".into(),
                )),
            }
        })
        .collect::<Result<_, _>>()?;
    for (name, bytes) in bundle.files.iter().filter(|(n, _)| *n != SIGNATURES_FILE) {
        let want = listed
            .get(name)
            .ok_or_else(|| BundleError::Integrity(format!("`{name}` is not covered by the signature")))?;
        if *want != file_hash(name, bytes)? {
            return Err(BundleError::Integrity(format!(
                "`{name}` does not match its signed hash"
            )));
        }
    }
    if let Some(missing) = listed.keys().find(|n| !bundle.files.contains_key(*n)) {
        return Err(BundleError::Integrity(format!(
            "signed file `{missing}` is missing from the bundle"
        )));
    }
    Ok(VerifiedSignature {
        alg: alg.into(),
        keyid: claims["keyid"].as_str().map(str::to_owned),
        files: listed.len(),
    })
}
