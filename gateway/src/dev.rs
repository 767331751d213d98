//! Dev-only parts, used by `castellan dev` and nothing else: a Kubernetes
//! trust source named `dev-cluster` whose signing key lives in the data
//! directory, and a minter for its service-account tokens. `castellan serve`
//! never loads any of this.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<Self> {
        let path = key_path(data_dir);
        let key = if path.exists() {
            let pem = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
            KeyPair::from_pem(&pem).with_context(|| format!("{} is not a private key", path.display()))?
        } else {
            let dir = path.parent().context("key path has a parent")?;
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            write_private_file(&path, key.serialize_pem().as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            key
        };
        Ok(Self::from_key(key))
    }

    /// Loads the key of an existing dev data directory (for `dev token`).
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = key_path(data_dir);
        let pem = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no dev cluster key at {}; start `castellan dev --data-dir {}` first",
                path.display(),
                data_dir.display()
            )
        })?;
        Ok(Self::from_key(KeyPair::from_pem(&pem).with_context(|| {
            format!("{} is not a private key", path.display())
        })?))
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
    ) -> anyhow::Result<String> {
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
    ) -> anyhow::Result<String> {
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

/// The public JWK of a P-256 key.
pub fn p256_jwk(key: &KeyPair, kid: &str) -> Value {
    let raw = key.public_key_raw();
    json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
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
) -> anyhow::Result<String> {
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
