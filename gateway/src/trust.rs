//! Trust sources: the issuers and keys that attestor modules verify evidence
//! against. This module owns their validation, the key sets built from their
//! JWKS, and the host side of the `verify-jws` capability. It never decides
//! who gets an identity.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest number of keys one JWKS may hold.
const MAX_KEYS: usize = 64;

/// Largest number of EKs one `tpm` trust source may enroll.
pub const MAX_ENROLLED_EKS: usize = 10_000;

/// Why a trust source was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustError {
    /// A required field is empty or missing.
    #[error("`{0}` is required")]
    Missing(&'static str),
    /// The method has no attestor that uses trust sources of this kind.
    #[error("method `{0}` is not supported for trust sources")]
    UnknownMethod(String),
    /// The JWKS is unusable; the text says which key and why.
    #[error("jwks: {0}")]
    Jwks(String),
    /// Another trust source already has this name.
    #[error("a trust source named `{0}` already exists")]
    Duplicate(String),
    /// `jwks_file` could not be read.
    #[error("jwks_file {path}: {message}")]
    JwksFile { path: String, message: String },
    /// The certificates are unusable.
    #[error("certificates: {0}")]
    Certificates(String),
    /// The settings are unusable.
    #[error("settings: {0}")]
    Settings(String),
}

/// A trust source as declared in the config file or posted to the API.
/// JWT methods give `issuer`, `audiences` and `jwks`; X.509 methods give
/// `certificates`; either may add method-specific `settings`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSourceSpec {
    /// Unique, human-chosen name, e.g. `prod-cluster`.
    pub name: String,
    /// Attestation method, e.g. `k8s_sat`.
    pub method: String,
    /// The `iss` the evidence must carry (JWT methods).
    #[serde(default)]
    pub issuer: String,
    /// Audiences accepted; the evidence's `aud` must contain one (JWT methods).
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Public keys as a JWKS object (`{"keys": [...]}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<Value>,
    /// Config files only: a path to read the JWKS from instead.
    #[serde(default, skip_serializing)]
    pub jwks_file: Option<PathBuf>,
    /// PEM certificates: roots a chain must reach, or signing certificates
    /// (X.509 methods: `aws_iid`, `x509pop`, `tpm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<String>,
    /// Config files only: a path to read `certificates` from instead.
    #[serde(default, skip_serializing)]
    pub certificates_file: Option<PathBuf>,
    /// Method-specific settings, passed to the module as they are (an
    /// object), e.g. `{"max_age_seconds": 300}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Value>,
    /// Fetch the JWKS from this URL instead (`https://`, or `http://` on a
    /// loopback address), and refresh it every `jwks_refresh_seconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Refresh period of `jwks_url`. Default: 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_seconds: Option<u64>,
}

/// A stored or declared trust source.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TrustSource {
    pub id: String,
    pub name: String,
    pub method: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// `{"keys": [...]}`, or null for a source without JWT keys.
    #[serde(default)]
    pub jwks: Value,
    /// PEM certificates, if the source has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<String>,
    /// Method-specific settings (an object), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Value>,
    /// Where the JWKS is fetched from, when it is not given inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_refresh_seconds: Option<u64>,
    /// The keys and certificates a rotation replaced, still trusted until
    /// `until` so that evidence signed before the rotation keeps working.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<PreviousKeys>,
    /// Set once revoked: the source verifies nothing any more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
    /// `api`, `config` or `dev`: only `api` ones can be deleted over the API.
    pub origin: String,
    pub created_at: String,
}

/// Keys kept through a rotation's overlap.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct PreviousKeys {
    #[serde(default)]
    pub jwks: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<String>,
    /// Unix seconds.
    pub until: i64,
}

impl TrustSource {
    /// Whether the source carries JWT verification keys.
    pub fn has_jwks(&self) -> bool {
        self.jwks.get("keys").is_some()
    }
}

/// Checks a source's method `settings` where the host reads them: an
/// object; `key_binding` (the SDK's JWT verification); the EKs a `tpm`
/// source enrolls. Returns whether it enrolls any, which makes it a source
/// that vouches for something even without keys or certificates.
pub fn check_settings(method: &str, settings: &Value) -> Result<bool, TrustError> {
    if !settings.is_object() {
        return Err(TrustError::Settings("must be a JSON object".into()));
    }
    match settings.get("key_binding") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == "optional" || s == "required" => {}
        Some(_) => {
            return Err(TrustError::Settings(
                "key_binding must be \"optional\" or \"required\"".into(),
            ));
        }
    }
    check_enrolled_eks(method, settings)
}

/// Checks `settings.enrolled_ek_sha256`, the EKs a `tpm` source trusts
/// without a manufacturer's certificate: 1 to [`MAX_ENROLLED_EKS`] hex
/// SHA-256 digests of EK public areas. Whether the source has any.
fn check_enrolled_eks(method: &str, settings: &Value) -> Result<bool, TrustError> {
    let Some(list) = settings.get("enrolled_ek_sha256") else {
        return Ok(false);
    };
    if method != "tpm" {
        return Err(TrustError::Settings(
            "enrolled_ek_sha256 is for the tpm method".into(),
        ));
    }
    let bad = || {
        TrustError::Settings(format!(
            "enrolled_ek_sha256 must be an array of 1 to {MAX_ENROLLED_EKS} hex SHA-256 digests \
             (64 characters each, as `castellan tpm ek` prints them)"
        ))
    };
    let list = list.as_array().ok_or_else(bad)?;
    if list.is_empty() || list.len() > MAX_ENROLLED_EKS {
        return Err(bad());
    }
    for digest in list {
        let ok = digest
            .as_str()
            .is_some_and(|d| d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(bad());
        }
    }
    Ok(true)
}

impl TrustSourceSpec {
    /// Validates the spec, including every key of the JWKS.
    pub fn check(&self) -> Result<(), TrustError> {
        if self.name.trim().is_empty() {
            return Err(TrustError::Missing("name"));
        }
        // Bundles can bring new methods: only the name's shape is checked
        // here; the server checks that a module serves it.
        let valid = !self.method.is_empty()
            && self.method.len() <= 64
            && self
                .method
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !valid {
            return Err(TrustError::UnknownMethod(self.method.clone()));
        }
        let enrolled = match &self.settings {
            Some(settings) => check_settings(&self.method, settings)?,
            None => false,
        };
        if let Some(url) = &self.jwks_url {
            check_jwks_url(url)?;
            if self.jwks.is_some() || self.jwks_file.is_some() {
                return Err(TrustError::Jwks(
                    "give `jwks`, `jwks_file` or `jwks_url`, not several".into(),
                ));
            }
        }
        if self
            .jwks_refresh_seconds
            .is_some_and(|r| !(10..=86_400).contains(&r))
        {
            return Err(TrustError::Jwks(
                "jwks_refresh_seconds must be between 10 and 86400".into(),
            ));
        }
        let jwt = self.jwks.is_some() || self.jwks_file.is_some() || self.jwks_url.is_some();
        let x509 = self.certificates.is_some() || self.certificates_file.is_some();
        if !jwt && !x509 && !enrolled {
            return Err(TrustError::Missing(
                "jwks (JWT methods), certificates (X.509 methods) or settings.enrolled_ek_sha256 (tpm)",
            ));
        }
        if let Some(pem) = &self.certificates {
            certs::CertSet::from_pem(pem).map_err(TrustError::Certificates)?;
        }
        if !jwt {
            return Ok(());
        }
        if self.issuer.trim().is_empty() {
            return Err(TrustError::Missing("issuer"));
        }
        if self.audiences.is_empty() || self.audiences.iter().any(|a| a.is_empty()) {
            return Err(TrustError::Missing("audiences"));
        }
        match &self.jwks {
            Some(jwks) => KeySet::from_jwks(jwks).map(drop),
            None => Ok(()),
        }
    }

    /// Turns the spec into a trust source, reading `jwks_file` if needed.
    pub fn into_source(self, origin: &str) -> Result<TrustSource, TrustError> {
        self.check()?;
        let jwks = match (self.jwks, &self.jwks_file) {
            (Some(j), _) => j,
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| TrustError::JwksFile {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                let v: Value = serde_json::from_str(&text).map_err(|e| TrustError::JwksFile {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
                KeySet::from_jwks(&v)?;
                v
            }
            (None, None) => Value::Null,
        };
        let certificates = match (self.certificates, &self.certificates_file) {
            (Some(pem), _) => Some(pem),
            (None, Some(path)) => {
                let pem = std::fs::read_to_string(path).map_err(|e| {
                    TrustError::Certificates(format!("certificates_file {}: {e}", path.display()))
                })?;
                certs::CertSet::from_pem(&pem).map_err(TrustError::Certificates)?;
                Some(pem)
            }
            (None, None) => None,
        };
        Ok(TrustSource {
            id: uuid::Uuid::new_v4().to_string(),
            name: self.name,
            method: self.method,
            issuer: self.issuer,
            audiences: self.audiences,
            jwks,
            certificates,
            settings: self.settings,
            jwks_url: self.jwks_url,
            jwks_refresh_seconds: self.jwks_refresh_seconds,
            previous: None,
            revoked_at: None,
            origin: origin.to_owned(),
            created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        })
    }
}

/// A JWKS URL must be https, or http to a loopback address.
fn check_jwks_url(url: &str) -> Result<(), TrustError> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let loopback = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split('/').next())
        .map(|authority| {
            let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
            host == "localhost"
                || host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
        .unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(TrustError::Jwks(
            "jwks_url must be https:// (or http:// on a loopback address)".into(),
        ))
    }
}

/// One verification key from a JWKS.
struct Key {
    kid: String,
    family: KeyFamily,
    /// The JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
}

/// The verification keys of one trust source, parsed once when the source
/// is loaded so that the issuance path only looks keys up.
pub struct KeySet {
    keys: Vec<Key>,
}

/// Algorithms a JWS may use. `none` and HMAC are never accepted: a public
/// key must not double as a shared secret.
fn parse_alg(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

fn alg_family(alg: Algorithm) -> Option<KeyFamily> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(KeyFamily::Rsa),
        Algorithm::ES256 => Some(KeyFamily::EcP256),
        Algorithm::ES384 => Some(KeyFamily::EcP384),
        _ => None,
    }
}

impl KeySet {
    /// Parses a JWKS. Every key must be a public RSA (≥ 2048 bits) or EC
    /// P-256/P-384 key with a unique `kid`; private or symmetric key material
    /// is refused outright so it is never stored.
    pub fn from_jwks(jwks: &Value) -> Result<Self, TrustError> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| TrustError::Jwks("must be an object with a `keys` array".into()))?;
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(TrustError::Jwks(format!(
                "must hold between 1 and {MAX_KEYS} keys"
            )));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let obj = k
                .as_object()
                .ok_or_else(|| TrustError::Jwks(format!("key {i} is not an object")))?;
            let field = |name: &str| obj.get(name).and_then(Value::as_str);
            let kid = field("kid")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| TrustError::Jwks(format!("key {i} has no `kid`")))?
                .to_owned();
            if out.iter().any(|o: &Key| o.kid == kid) {
                return Err(TrustError::Jwks(format!("`kid` {kid} appears twice")));
            }
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                if obj.contains_key(private) {
                    return Err(TrustError::Jwks(format!(
                        "key {kid} contains private or symmetric key material (`{private}`); give public keys only"
                    )));
                }
            }
            if matches!(field("use"), Some(u) if u != "sig") {
                return Err(TrustError::Jwks(format!(
                    "key {kid} is not a signing key (`use`)"
                )));
            }
            let alg = match field("alg") {
                None => None,
                Some(a) => Some(parse_alg(a).ok_or_else(|| {
                    TrustError::Jwks(format!(
                        "key {kid}: algorithm `{a}` is not accepted (asymmetric only)"
                    ))
                })?),
            };
            let bad = |m: &str| TrustError::Jwks(format!("key {kid}: {m}"));
            let (family, key) = match field("kty") {
                Some("RSA") => {
                    let n = field("n").ok_or_else(|| bad("RSA key without `n`"))?;
                    let e = field("e").ok_or_else(|| bad("RSA key without `e`"))?;
                    let n_bytes = URL_SAFE_NO_PAD
                        .decode(n)
                        .map_err(|_| bad("`n` is not base64url"))?;
                    let bits = n_bytes.iter().skip_while(|b| **b == 0).count() * 8;
                    if bits < 2048 {
                        return Err(bad("RSA keys must be at least 2048 bits"));
                    }
                    let key = DecodingKey::from_rsa_components(n, e).map_err(|e| bad(&e.to_string()))?;
                    (KeyFamily::Rsa, key)
                }
                Some("EC") => {
                    let (family, len) = match field("crv") {
                        Some("P-256") => (KeyFamily::EcP256, 32),
                        Some("P-384") => (KeyFamily::EcP384, 48),
                        _ => return Err(bad("EC keys must use crv P-256 or P-384")),
                    };
                    let x = field("x").ok_or_else(|| bad("EC key without `x`"))?;
                    let y = field("y").ok_or_else(|| bad("EC key without `y`"))?;
                    let xb = URL_SAFE_NO_PAD
                        .decode(x)
                        .map_err(|_| bad("`x` is not base64url"))?;
                    let yb = URL_SAFE_NO_PAD
                        .decode(y)
                        .map_err(|_| bad("`y` is not base64url"))?;
                    if xb.len() != len || yb.len() != len {
                        return Err(bad("EC coordinates have the wrong length"));
                    }
                    let key = DecodingKey::from_ec_components(x, y).map_err(|e| bad(&e.to_string()))?;
                    (family, key)
                }
                Some(other) => {
                    return Err(bad(&format!(
                        "key type `{other}` is not accepted (RSA or EC only)"
                    )));
                }
                None => return Err(bad("no `kty`")),
            };
            if let Some(a) = alg
                && alg_family(a) != Some(family)
            {
                return Err(bad("`alg` does not fit the key type"));
            }
            out.push(Key {
                kid,
                family,
                alg,
                key,
            });
        }
        Ok(Self { keys: out })
    }

    /// Verifies a compact JWS and returns its decoded header and payload.
    /// The error text is safe to show the caller.
    pub fn verify_compact(&self, compact: &str) -> Result<(Value, String), String> {
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS".into());
        };
        let header_bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| "header is not base64url")?;
        let header: Value = serde_json::from_slice(&header_bytes).map_err(|_| "header is not JSON")?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or("header has no `alg`")?;
        let alg = parse_alg(alg_name).ok_or_else(|| {
            format!(
                "algorithm `{}` is not accepted (asymmetric algorithms only)",
                printable(alg_name)
            )
        })?;
        if header.get("crit").is_some() {
            return Err("`crit` header parameters are not supported".into());
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or("header has no `kid`")?;
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| format!("no key with kid `{}` in the trust source", printable(kid)))?;
        if alg_family(alg) != Some(key.family) || key.alg.is_some_and(|a| a != alg) {
            return Err(format!("algorithm {alg_name} does not fit key `{}`", key.kid));
        }
        let signing_input = &compact[..h.len() + 1 + p.len()];
        let ok = jsonwebtoken::crypto::verify(s, signing_input.as_bytes(), &key.key, alg)
            .map_err(|_| "signature is malformed")?;
        if !ok {
            return Err("signature does not verify".into());
        }
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "payload is not base64url")?;
        let payload = String::from_utf8(payload).map_err(|_| "payload is not UTF-8")?;
        Ok((header, payload))
    }
}

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

/// What attestors see of the trust sources at one instant.
#[derive(Default)]
pub struct Snapshot {
    /// Sources by method, in creation order.
    pub by_method: HashMap<String, Vec<Arc<TrustSource>>>,
    /// Key sets by name (`ts:<id>`), as the `verify-jws` capability names them.
    pub key_sets: HashMap<String, Arc<KeySet>>,
    /// Certificate sets by the same names, for the X.509 capabilities.
    pub cert_sets: HashMap<String, Arc<certs::CertSet>>,
}

impl Snapshot {
    /// The JSON `config` an attestor module receives for `method`.
    pub fn module_config(&self, method: &str) -> Value {
        let sources: Vec<Value> = self
            .by_method
            .get(method)
            .map(|v| {
                v.iter()
                    .map(|s| {
                        let mut c = serde_json::json!({
                            "name": s.name,
                            "issuer": s.issuer,
                            "audiences": s.audiences,
                            "key_set": key_set_name(&s.id),
                        });
                        if s.certificates.is_some() {
                            c["cert_set"] = key_set_name(&s.id).into();
                        }
                        if let Some(settings) = &s.settings {
                            c["settings"] = settings.clone();
                        }
                        c
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "trust_sources": sources })
    }

    /// Whether any trust source serves `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.by_method.get(method).is_some_and(|v| !v.is_empty())
    }
}

fn key_set_name(id: &str) -> String {
    format!("ts:{id}")
}

/// All trust sources, swapped atomically as a whole when one changes.
pub struct Registry {
    sources: ArcSwap<Vec<Arc<TrustSource>>>,
    snapshot: ArcSwap<Snapshot>,
    /// When the snapshot must be rebuilt because a rotation overlap ends.
    rebuild_at: std::sync::atomic::AtomicI64,
    /// Serialises writers so two concurrent changes cannot lose one another;
    /// readers never take it.
    writes: std::sync::Mutex<()>,
}

impl Registry {
    /// Builds a registry; every source's JWKS must parse.
    pub fn new(sources: Vec<TrustSource>) -> Result<Self, TrustError> {
        let sources: Vec<Arc<TrustSource>> = sources.into_iter().map(Arc::new).collect();
        let (snapshot, rebuild_at) = build_snapshot(&sources)?;
        Ok(Self {
            sources: ArcSwap::from_pointee(sources),
            snapshot: ArcSwap::from_pointee(snapshot),
            rebuild_at: std::sync::atomic::AtomicI64::new(rebuild_at),
            writes: std::sync::Mutex::new(()),
        })
    }

    /// The current snapshot; cheap, lock-free (rebuilt once when a
    /// rotation's overlap has ended).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        if crate::util::now_unix() >= self.rebuild_at.load(std::sync::atomic::Ordering::Relaxed) {
            let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = self.replace(self.list()) {
                tracing::error!(error = %e, "trust sources could not be rebuilt");
            }
        }
        self.snapshot.load_full()
    }

    /// Changes one source with `change` (which may refuse); returns the
    /// changed source. Callers persist it after.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut TrustSource) -> Result<(), TrustError>,
    ) -> Result<Option<TrustSource>, TrustError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.list();
        let Some(slot) = next.iter_mut().find(|s| s.id == id) else {
            return Ok(None);
        };
        let mut changed = slot.as_ref().clone();
        change(&mut changed)?;
        *slot = Arc::new(changed.clone());
        self.replace(next)?;
        Ok(Some(changed))
    }

    /// Every trust source, in creation order.
    pub fn list(&self) -> Vec<Arc<TrustSource>> {
        self.sources.load().as_ref().clone()
    }

    /// Finds a source by id.
    pub fn get(&self, id: &str) -> Option<Arc<TrustSource>> {
        self.sources.load().iter().find(|s| s.id == id).cloned()
    }

    /// Checks that `source` could be added (unique name, usable keys).
    pub fn check_insert(&self, source: &TrustSource) -> Result<(), TrustError> {
        if self.sources.load().iter().any(|s| s.name == source.name) {
            return Err(TrustError::Duplicate(source.name.clone()));
        }
        if let Some(pem) = &source.certificates {
            certs::CertSet::from_pem(pem).map_err(TrustError::Certificates)?;
        }
        if source.has_jwks() {
            KeySet::from_jwks(&source.jwks)?;
        }
        Ok(())
    }

    /// Adds a source. Callers persist it first, then insert.
    pub fn insert(&self, source: TrustSource) -> Result<(), TrustError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.check_insert(&source)?;
        let mut next = self.list();
        next.push(Arc::new(source));
        self.replace(next)
    }

    /// Removes a source by id; returns it if it was there.
    pub fn remove(&self, id: &str) -> Option<Arc<TrustSource>> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.list();
        let removed = current.iter().find(|s| s.id == id).cloned()?;
        let next: Vec<_> = current.into_iter().filter(|s| s.id != id).collect();
        // Removing cannot make a snapshot invalid.
        let _ = self.replace(next);
        Some(removed)
    }

    fn replace(&self, next: Vec<Arc<TrustSource>>) -> Result<(), TrustError> {
        let (snapshot, rebuild_at) = build_snapshot(&next)?;
        self.sources.store(Arc::new(next));
        self.snapshot.store(Arc::new(snapshot));
        self.rebuild_at
            .store(rebuild_at, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The snapshot of `sources` now, and when it must be rebuilt (the end of
/// the earliest rotation overlap still running).
fn build_snapshot(sources: &[Arc<TrustSource>]) -> Result<(Snapshot, i64), TrustError> {
    let now = crate::util::now_unix();
    let mut rebuild_at = i64::MAX;
    let mut snap = Snapshot::default();
    for s in sources {
        // A revoked source verifies nothing; modules do not see it.
        if s.revoked_at.is_some() {
            continue;
        }
        let previous = s.previous.as_ref().filter(|p| p.until > now);
        if let Some(p) = previous {
            rebuild_at = rebuild_at.min(p.until);
        }
        let mut jwks = s.jwks.clone();
        if let (Some(p), Some(keys)) = (previous, jwks.get_mut("keys").and_then(Value::as_array_mut)) {
            // Old keys stay during the overlap, unless a new key took the kid.
            for old in p.jwks.get("keys").and_then(Value::as_array).into_iter().flatten() {
                if !keys.iter().any(|k| k.get("kid") == old.get("kid")) {
                    keys.push(old.clone());
                }
            }
        }
        if jwks.get("keys").is_some() {
            let keys = KeySet::from_jwks(&jwks)?;
            snap.key_sets.insert(key_set_name(&s.id), Arc::new(keys));
        }
        if let Some(pem) = &s.certificates {
            let mut set = certs::CertSet::from_pem(pem).map_err(TrustError::Certificates)?;
            if let Some(old) = previous.and_then(|p| p.certificates.as_deref()) {
                set.extend(certs::CertSet::from_pem(old).map_err(TrustError::Certificates)?);
            }
            snap.cert_sets.insert(key_set_name(&s.id), Arc::new(set));
        }
        snap.by_method
            .entry(s.method.clone())
            .or_default()
            .push(s.clone());
    }
    Ok((snap, rebuild_at))
}

/// Fetches a JWKS document (10 s budget) and checks its keys.
pub async fn fetch_jwks(url: &str) -> Result<Value, TrustError> {
    let err = |m: String| TrustError::Jwks(format!("{url}: {m}"));
    let tls = crate::tls::web_client_config(None).map_err(|e| err(e.to_string()))?;
    let (endpoint, path) =
        crate::client::Endpoint::parse_url_with(url, Some(tls)).map_err(|e| err(format!("{e:#}")))?;
    let fetch = async {
        let mut conn = endpoint.connect().await?;
        conn.send(hyper::Method::GET, &path, None, None).await
    };
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(format!("{e:#}")))?;
    if !status.is_success() {
        return Err(err(format!("answered {status}")));
    }
    if body.len() > 1 << 20 {
        return Err(err("larger than 1 MiB".into()));
    }
    let jwks: Value = serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))?;
    KeySet::from_jwks(&jwks)?;
    Ok(jwks)
}

/// Keeps the JWKS of every source with a `jwks_url` fresh. A failed fetch
/// keeps the keys in use.
pub async fn refresh_jwks_urls(registry: Arc<Registry>) {
    let mut due: HashMap<String, i64> = HashMap::new();
    loop {
        let now = crate::util::now_unix();
        for s in registry.list() {
            let (Some(url), None) = (&s.jwks_url, &s.revoked_at) else {
                continue;
            };
            let period = s.jwks_refresh_seconds.unwrap_or(300) as i64;
            let next = *due
                .entry(s.id.clone())
                .or_insert(if s.has_jwks() { now + period } else { now });
            if now < next {
                continue;
            }
            due.insert(s.id.clone(), now + period);
            match fetch_jwks(url).await {
                Ok(jwks) if jwks != s.jwks => {
                    let result = registry.update(&s.id, |t| {
                        t.jwks = jwks;
                        Ok(())
                    });
                    match result {
                        Ok(_) => tracing::info!(source = %s.name, "trust source JWKS refreshed from its URL"),
                        Err(e) => tracing::warn!(source = %s.name, error = %e, "refreshed JWKS refused"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(source = %s.name, error = %e, "JWKS refresh failed; keeping the keys in use")
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

pub mod certs;

#[cfg(test)]
mod tests;
