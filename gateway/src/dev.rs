//! Dev-only parts, used by `castellan dev` and nothing else: a Kubernetes
//! trust source named `dev-cluster` whose signing key lives in the data
//! directory, and a minter for its service-account tokens. `castellan serve`
//! never loads any of this.

use std::path::{Path, PathBuf};

use rcgen::KeyPair;
use serde_json::{Value, json};

use crate::trust::TrustSource;
use crate::util::{now_unix, write_private_file};

/// Name of the dev trust source.
pub const DEV_CLUSTER: &str = "dev-cluster";
/// Issuer of dev tokens.
pub const DEV_ISSUER: &str = "https://dev-cluster.castellan.invalid";
/// Audience of dev tokens (and the one the dev trust source accepts).
pub const DEV_AUDIENCE: &str = "castellan";

/// Why the dev cluster's key or a token could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DevError {
    /// The key file could not be read or written.
    #[error("{path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No dev data directory holds a key.
    #[error("no dev cluster key at {path}; start `castellan dev --data-dir {data_dir}` first")]
    NoKey { path: String, data_dir: String },
    /// The key file holds no usable key.
    #[error("{path} is not a private key")]
    Key {
        path: String,
        #[source]
        source: rcgen::Error,
    },
    /// Generating a key failed.
    #[error("key generation")]
    Generate(#[from] rcgen::Error),
    /// Signing a token failed.
    #[error("token signing")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DevError + '_ {
    move |source| DevError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The dev cluster's token signing key (ES256).
pub struct DevCluster {
    key: KeyPair,
    kid: String,
}

fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("dev").join("k8s-signing.key")
}

impl DevCluster {
    /// Loads the dev signing key from the data directory, creating it once.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, DevError> {
        let path = key_path(data_dir);
        let key = if path.exists() {
            let pem = std::fs::read_to_string(&path).map_err(io(&path))?;
            parse_key(&path, &pem)?
        } else {
            let dir = data_dir.join("dev");
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            write_private_file(&path, key.serialize_pem().as_bytes()).map_err(io(&path))?;
            key
        };
        Ok(Self::from_key(key))
    }

    /// Loads the key of an existing dev data directory (for `dev token`).
    pub fn load(data_dir: &Path) -> Result<Self, DevError> {
        let path = key_path(data_dir);
        let pem = std::fs::read_to_string(&path).map_err(|_| DevError::NoKey {
            path: path.display().to_string(),
            data_dir: data_dir.display().to_string(),
        })?;
        Ok(Self::from_key(parse_key(&path, &pem)?))
    }

    fn from_key(key: KeyPair) -> Self {
        let kid = crate::util::sha256_hex(key.public_key_raw())[..16].to_owned();
        Self { key, kid }
    }

    /// The public JWKS of the dev cluster.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [p256_jwk(&self.key, &self.kid)] })
    }

    /// The in-memory trust source for `castellan dev`.
    pub fn trust_source(&self) -> TrustSource {
        TrustSource {
            id: DEV_CLUSTER.into(),
            name: DEV_CLUSTER.into(),
            method: "k8s_sat".into(),
            issuer: DEV_ISSUER.into(),
            audiences: vec![DEV_AUDIENCE.into()],
            jwks: self.jwks(),
            certificates: None,
            settings: None,
            jwks_url: None,
            jwks_refresh_seconds: None,
            previous: None,
            revoked_at: None,
            origin: "dev".into(),
            created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        }
    }

    /// Mints a projected service-account token.
    pub fn mint_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        ttl_seconds: i64,
    ) -> Result<String, DevError> {
        self.mint_token_for(DEV_AUDIENCE, namespace, service_account, pod, ttl_seconds)
    }

    /// Like [`Self::mint_token`], for `audience` (as `kubectl create token
    /// --audience` asks for one).
    pub fn mint_token_for(
        &self,
        audience: &str,
        namespace: &str,
        service_account: &str,
        pod: Option<&str>,
        ttl_seconds: i64,
    ) -> Result<String, DevError> {
        mint_projected_token(
            &self.key,
            &self.kid,
            DEV_ISSUER,
            audience,
            namespace,
            service_account,
            pod,
            ttl_seconds,
        )
    }
}

pub use crate::signer::p256_jwk;

fn parse_key(path: &Path, pem: &str) -> Result<KeyPair, DevError> {
    KeyPair::from_pem(pem).map_err(|source| DevError::Key {
        path: path.display().to_string(),
        source,
    })
}

/// Signs a token in the shape the kubelet projects into pods.
#[allow(clippy::too_many_arguments)]
pub fn mint_projected_token(
    key: &KeyPair,
    kid: &str,
    issuer: &str,
    audience: &str,
    namespace: &str,
    service_account: &str,
    pod: Option<&str>,
    ttl_seconds: i64,
) -> Result<String, DevError> {
    let now = now_unix();
    let pod_name = pod.map(str::to_owned).unwrap_or_else(|| {
        format!(
            "{service_account}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..5]
        )
    });
    let claims = json!({
        "iss": issuer,
        "aud": [audience],
        "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        "iat": now, "nbf": now, "exp": now + ttl_seconds,
        "jti": uuid::Uuid::new_v4().to_string(),
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": uuid::Uuid::new_v4().to_string()},
            "pod": {"name": pod_name, "uid": uuid::Uuid::new_v4().to_string()},
        },
    });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    let encoding = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
    Ok(jsonwebtoken::encode(&header, &claims, &encoding)?)
}
