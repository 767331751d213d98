//! People authenticated by an OIDC ID token from a configured issuer (e.g.
//! approvers signing in through the company IdP). The signature is checked
//! against the issuer's JWKS with the same key sets trust sources use; then
//! issuer, audience and lifetime. Such a principal has the approver role
//! and the groups its token names.

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use super::{Principal, Role, valid_name};
use crate::trust::KeySet;

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat`.
const LEEWAY: i64 = 60;

/// An OIDC issuer as configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcIssuerConfig {
    /// A name for logs.
    pub name: String,
    /// The `iss` its ID tokens carry.
    pub issuer: String,
    /// Accepted `aud` values (the client id Castellan is registered as).
    pub audiences: Vec<String>,
    /// The issuer's public keys, inline.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// Or a file holding them.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Claim with the person's name. Default: `email`.
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// Claim with the person's groups. Default: `groups`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
}

fn default_name_claim() -> String {
    "email".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

struct Issuer {
    config: OidcIssuerConfig,
    keys: KeySet,
}

/// Why an `[[oidc_issuers]]` entry was refused at start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OidcConfigError {
    /// A required setting is missing.
    #[error("oidc issuer `{name}`: {missing} required")]
    Missing { name: String, missing: &'static str },
    /// The JWKS file could not be read.
    #[error("oidc issuer `{name}` jwks_file {path}")]
    Read {
        name: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The JWKS is not JSON.
    #[error("oidc issuer `{name}` jwks_file")]
    Json {
        name: String,
        #[source]
        source: serde_json::Error,
    },
    /// The JWKS holds keys Castellan will not use.
    #[error("oidc issuer `{name}`")]
    Keys {
        name: String,
        #[source]
        source: crate::trust::TrustError,
    },
}

/// The configured issuers.
#[derive(Default)]
pub struct OidcIssuers {
    issuers: Vec<Issuer>,
}

impl OidcIssuers {
    /// Validates the issuers and loads their keys.
    pub fn new(configs: &[OidcIssuerConfig]) -> Result<Self, OidcConfigError> {
        let mut issuers = Vec::new();
        for c in configs {
            let name = || c.name.clone();
            if c.issuer.is_empty() || c.audiences.is_empty() {
                return Err(OidcConfigError::Missing {
                    name: name(),
                    missing: "issuer and audiences are",
                });
            }
            let jwks = match (&c.jwks, &c.jwks_file) {
                (Some(j), _) => j.clone(),
                (None, Some(p)) => {
                    let text = std::fs::read_to_string(p).map_err(|source| OidcConfigError::Read {
                        name: name(),
                        path: p.display().to_string(),
                        source,
                    })?;
                    serde_json::from_str(&text)
                        .map_err(|source| OidcConfigError::Json { name: name(), source })?
                }
                (None, None) => {
                    return Err(OidcConfigError::Missing {
                        name: name(),
                        missing: "jwks or jwks_file is",
                    });
                }
            };
            let keys =
                KeySet::from_jwks(&jwks).map_err(|source| OidcConfigError::Keys { name: name(), source })?;
            issuers.push(Issuer {
                config: c.clone(),
                keys,
            });
        }
        Ok(Self { issuers })
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The person behind a compact ID token, or why not. The error text is
    /// safe to log; it never contains the token.
    pub fn authenticate(&self, token: &str, now: i64) -> Result<Principal, String> {
        let payload = token.split('.').nth(1).ok_or("not a JWT")?;
        let unverified: Value = URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or("payload is not JSON")?;
        let iss = unverified.get("iss").and_then(Value::as_str).ok_or("no `iss`")?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .ok_or("issuer is not configured")?;
        let (_, payload) = issuer.keys.verify_compact(token)?;
        let claims: Value = serde_json::from_str(&payload).map_err(|_| "payload is not JSON")?;
        if claims.get("iss").and_then(Value::as_str) != Some(issuer.config.issuer.as_str()) {
            return Err("issuer mismatch".into());
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => issuer.config.audiences.contains(a),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .any(|a| issuer.config.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err("audience not accepted".into());
        }
        let time = |k: &str| claims.get(k).and_then(Value::as_i64);
        let exp = time("exp").ok_or("no `exp`")?;
        if now > exp + LEEWAY {
            return Err("token expired".into());
        }
        if time("nbf").is_some_and(|nbf| now + LEEWAY < nbf)
            || time("iat").is_some_and(|iat| now + LEEWAY < iat)
        {
            return Err("token not valid yet".into());
        }
        let name = claims
            .get(&issuer.config.name_claim)
            .or_else(|| claims.get("sub"))
            .and_then(Value::as_str)
            .filter(|n| valid_name(n))
            .ok_or("no usable name claim")?
            .to_owned();
        let groups = claims
            .get(&issuer.config.groups_claim)
            .and_then(Value::as_array)
            .map(|g| {
                g.iter()
                    .filter_map(Value::as_str)
                    .filter(|g| valid_name(g))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Principal {
            id: format!("user:{name}"),
            name,
            role: Role::Approver,
            groups,
            kind: crate::model::PrincipalKind::Oidc,
        })
    }
}
