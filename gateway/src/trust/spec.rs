//! Trust sources as declared (config file or API): what each method needs,
//! checked before a source is accepted.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{KeySet, TrustError, TrustSource, certs};

/// Largest number of EKs one `tpm` trust source may enroll.
pub const MAX_ENROLLED_EKS: usize = 10_000;

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
        // By default a source's name prefixes the identities it proves
        // (data.castellan.source_prefixes), so it must be a path segment.
        if self.name.len() > 64 || !crate::spiffe_id::valid_path_segment(&self.name) {
            return Err(TrustError::Name(self.name.chars().take(64).collect()));
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
