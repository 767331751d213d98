//! Where the signer's keys are: files in the CA directory (`disk`, the
//! default) or a PKCS#11 token (`pkcs11`). A keyring names each key: a file
//! name relative to the CA directory, or `pkcs11:<label>`. One keyring may
//! hold both (a CA made on disk, rotated into an HSM).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::KeyPair;

use super::SignerError;
use super::pkcs11::{KEY_PREFIX, Token, TokenKey};

/// A P-256 signing key, wherever it is.
#[derive(Debug)]
pub enum CaKey {
    Disk(Box<KeyPair>),
    Token(TokenKey),
}

impl rcgen::PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaKey::Disk(k) => k.der_bytes(),
            CaKey::Token(k) => k.der_bytes(),
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaKey::Disk(k) => k.algorithm(),
            CaKey::Token(k) => k.algorithm(),
        }
    }
}

impl rcgen::SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaKey::Disk(k) => k.sign(msg),
            CaKey::Token(k) => k.sign(msg),
        }
    }
}

impl CaKey {
    /// The public JWK of the key (P-256), with `kid` set.
    pub fn jwk(&self, kid: &str) -> serde_json::Value {
        super::p256_jwk_of_point(rcgen::PublicKeyData::der_bytes(self), kid)
    }

    /// An ES256 JWS over `claims` with this key, its header carrying `kid`
    /// and `typ: JWT`.
    pub fn sign_jwt(&self, claims: &impl serde::Serialize, kid: &str) -> Result<String, SignerError> {
        match self {
            CaKey::Disk(k) => {
                let key = jsonwebtoken::EncodingKey::from_ec_der(&k.serialize_der());
                super::encode_jwt(claims, jsonwebtoken::Algorithm::ES256, &key, kid)
            }
            CaKey::Token(k) => {
                use base64::Engine as _;
                let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
                let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
                let body = serde_json::to_vec(claims).map_err(|e| SignerError::Template(e.to_string()))?;
                let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(&body));
                let signature = k.sign_raw(input.as_bytes())?;
                Ok(format!("{input}.{}", b64(&signature)))
            }
        }
    }
}

/// Where new keys go and existing ones are found.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
    token: Option<Arc<Token>>,
}

impl KeyStore {
    pub fn new(dir: &Path, token: Option<Arc<Token>>) -> Self {
        Self {
            dir: dir.to_owned(),
            token,
        }
    }

    /// The key a keyring names.
    pub fn load(&self, key: &str) -> Result<CaKey, SignerError> {
        if let Some(label) = key.strip_prefix(KEY_PREFIX) {
            let token = self.token.as_ref().ok_or_else(|| {
                SignerError::Key(format!(
                    "key `{key}` is in a PKCS#11 token: set [ca] key_manager = \"pkcs11\" and [ca.pkcs11]"
                ))
            })?;
            return Ok(CaKey::Token(token.find(label)?));
        }
        let pem = std::fs::read_to_string(self.dir.join(key))
            .map_err(|e| SignerError::Key(format!("{key}: {e}")))?;
        KeyPair::from_pem(&pem)
            .map(|k| CaKey::Disk(Box::new(k)))
            .map_err(|e| SignerError::Key(format!("{key}: {e}")))
    }

    /// A new P-256 key, in the token when there is one, else in a file
    /// (mode 0600) under `authorities/`; `name` is unique to it. Returns the
    /// key and what the keyring calls it.
    pub fn generate(&self, name: &str) -> Result<(CaKey, String), SignerError> {
        if let Some(token) = &self.token {
            let label = format!("castellan-{name}");
            return Ok((
                CaKey::Token(token.generate(&label)?),
                format!("{KEY_PREFIX}{label}"),
            ));
        }
        let dir = self.dir.join("authorities");
        std::fs::create_dir_all(&dir).map_err(|e| SignerError::Key(format!("{}: {e}", dir.display())))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let rel = format!("authorities/{name}.key");
        crate::util::write_private_file(&self.dir.join(&rel), key.serialize_pem().as_bytes())
            .map_err(|e| SignerError::Key(format!("{rel}: {e}")))?;
        Ok((CaKey::Disk(Box::new(key)), rel))
    }

    /// Deletes a key no authority needs any more.
    pub fn delete(&self, key: &str) {
        let result = match (key.strip_prefix(KEY_PREFIX), &self.token) {
            (Some(label), Some(token)) => token.destroy(label),
            (Some(_), None) => Err(SignerError::Key("no token configured".into())),
            (None, _) => {
                std::fs::remove_file(self.dir.join(key)).map_err(|e| SignerError::Key(e.to_string()))
            }
        };
        if let Err(e) = result {
            tracing::warn!(key, error = %e, "could not delete a revoked authority's key");
        }
    }
}

/// A fresh random name for a key.
pub fn fresh_name(kind: &str) -> String {
    format!("{kind}-{}", hex::encode(crate::util::random_bytes::<8>()))
}
