//! People authenticated by an OIDC ID token from a configured issuer (e.g.
//! approvers signing in through the company IdP). The signature is checked
//! against the issuer's JWKS with the same key sets trust sources use; then
//! issuer, audience and lifetime. Such a principal has the approver role
//! and the groups its token names.
//!
//! An ID token serves one purpose, told apart by its audience: a *login*
//! (`audiences`) authenticates an approver; a *delegation*
//! (`delegation_audiences`) is handed to an agent to act for the person.
//! The two lists may not overlap unless the operator sets
//! `delegation_tokens_log_in = true`, so a token given to an agent cannot
//! vote.

use std::path::PathBuf;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde_json::Value;

use super::valid_name;
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
    /// `aud` values accepted for approver logins (the client id Castellan
    /// is registered as).
    pub audiences: Vec<String>,
    /// `aud` values accepted when a person delegates to an agent. Empty:
    /// this issuer's tokens cannot delegate.
    #[serde(default)]
    pub delegation_audiences: Vec<String>,
    /// Lets one audience serve both purposes, so that an agent holding a
    /// delegation token can also log in as its person. Default: false.
    #[serde(default)]
    pub delegation_tokens_log_in: bool,
    /// The issuer's public keys, inline.
    #[serde(default)]
    pub jwks: Option<Value>,
    /// Or a file holding them.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Claim with the person's display name. Default: `email`, used only
    /// when `email_verified` is true; otherwise `sub`.
    #[serde(default = "default_name_claim")]
    pub name_claim: String,
    /// Claim with the person's groups. Default: `groups`.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The approver console signs people in with this issuer through the
    /// authorization-code flow with PKCE when set: the client id Castellan
    /// is registered as (it must be one of `audiences`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// A file holding the client secret, for a confidential client (PKCE
    /// is used either way). Never logged.
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// The authorization and token endpoints; discovered from
    /// `ISSUER/.well-known/openid-configuration` when not set.
    #[serde(default)]
    pub authorization_endpoint: Option<String>,
    #[serde(default)]
    pub token_endpoint: Option<String>,
    /// Scopes asked for. Default: `openid email profile`.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Extra roots for the token endpoint and discovery (the public web
    /// roots are built in).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(str::to_owned).to_vec()
}

/// How the console signs people in with an issuer (authorization code +
/// PKCE), from its `[[oidc_issuers]]` entry.
#[derive(Debug, Clone)]
pub struct LoginClient {
    pub name: String,
    pub issuer: String,
    pub client_id: String,
    pub client_secret: Option<String>,
    pub authorization_endpoint: Option<String>,
    pub token_endpoint: Option<String>,
    pub scopes: Vec<String>,
    pub ca_file: Option<PathBuf>,
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
    /// Read from `client_secret_file` at start.
    client_secret: Option<String>,
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
    /// Two entries share a name.
    #[error("oidc issuer `{name}` is configured twice")]
    Duplicate { name: String },
    /// One audience would serve logins and delegation.
    #[error(
        "oidc issuer `{name}`: audience `{audience}` is in both `audiences` and `delegation_audiences`, \
         so an agent holding a person's delegation token could vote as that person; use distinct \
         audiences, or set `delegation_tokens_log_in = true` to accept that"
    )]
    SharedAudience { name: String, audience: String },
    /// The JWKS holds keys Castellan will not use.
    #[error("oidc issuer `{name}`")]
    Keys {
        name: String,
        #[source]
        source: crate::trust::TrustError,
    },
}

/// What an ID token is presented for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// An approver signing in.
    Login,
    /// A person delegating to an agent.
    Delegation,
}

/// A person an ID token verified.
#[derive(Debug, Clone)]
pub struct OidcIdentity {
    /// The `[[oidc_issuers]]` entry's name.
    pub issuer_name: String,
    /// The token's `iss`.
    pub iss: String,
    /// The token's `sub`.
    pub subject: String,
    /// The display name: the name claim (an email only when verified), or
    /// `sub`.
    pub name: String,
    pub groups: Vec<String>,
}

impl OidcIdentity {
    /// The person id of this identity when no API token is linked to it.
    pub fn person(&self) -> String {
        crate::model::oidc_person(&self.issuer_name, &self.subject)
    }
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
            if !valid_name(&c.name) || c.name.contains(':') {
                return Err(OidcConfigError::Missing {
                    name: name(),
                    missing: "a name of letters, digits, `-`, `_` or `.` is",
                });
            }
            if configs.iter().filter(|o| o.name == c.name).count() > 1 {
                return Err(OidcConfigError::Duplicate { name: name() });
            }
            if !c.delegation_tokens_log_in
                && let Some(shared) = c.audiences.iter().find(|a| c.delegation_audiences.contains(a))
            {
                return Err(OidcConfigError::SharedAudience {
                    name: name(),
                    audience: shared.clone(),
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
            if let Some(id) = &c.client_id
                && (id.is_empty() || !c.audiences.contains(id))
            {
                return Err(OidcConfigError::Missing {
                    name: name(),
                    missing: "`client_id` among `audiences` (the console's ID tokens are issued to it) is",
                });
            }
            let client_secret = match &c.client_secret_file {
                Some(p) => Some(
                    std::fs::read_to_string(p)
                        .map_err(|source| OidcConfigError::Read {
                            name: name(),
                            path: p.display().to_string(),
                            source,
                        })?
                        .trim()
                        .to_owned(),
                ),
                None => None,
            };
            issuers.push(Issuer {
                config: c.clone(),
                keys,
                client_secret,
            });
        }
        Ok(Self { issuers })
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The name of the entry whose `issuer` is `iss` (the one `verify` uses).
    pub fn name_of(&self, iss: &str) -> Option<&str> {
        self.issuers
            .iter()
            .find(|i| i.config.issuer == iss)
            .map(|i| i.config.name.as_str())
    }

    /// The issuers the console can sign people in with, by name.
    pub fn login_clients(&self) -> Vec<LoginClient> {
        self.issuers
            .iter()
            .filter_map(|i| {
                let c = &i.config;
                Some(LoginClient {
                    name: c.name.clone(),
                    issuer: c.issuer.clone(),
                    client_id: c.client_id.clone()?,
                    client_secret: i.client_secret.clone(),
                    authorization_endpoint: c.authorization_endpoint.clone(),
                    token_endpoint: c.token_endpoint.clone(),
                    scopes: c.scopes.clone(),
                    ca_file: c.ca_file.clone(),
                })
            })
            .collect()
    }

    /// The `[[oidc_issuers]]` names, for validating token links.
    pub fn has_issuer(&self, name: &str) -> bool {
        self.issuers.iter().any(|i| i.config.name == name)
    }

    /// The person behind a compact ID token presented for `purpose`, or
    /// why not. The error text is safe to log; it never contains the token.
    pub fn verify(&self, token: &str, purpose: Purpose, now: i64) -> Result<OidcIdentity, String> {
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
        let accepted = match purpose {
            Purpose::Login => &issuer.config.audiences,
            Purpose::Delegation => &issuer.config.delegation_audiences,
        };
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => accepted.contains(a),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .any(|a| accepted.iter().any(|x| x == a)),
            _ => false,
        };
        if !aud_ok {
            return Err(match purpose {
                Purpose::Login => "audience not accepted for approver logins".into(),
                Purpose::Delegation => "audience not accepted for delegation".into(),
            });
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
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| valid_subject(s))
            .ok_or("no usable `sub`")?
            .to_owned();
        let verified_email = matches!(claims.get("email_verified"), Some(Value::Bool(true)))
            || claims.get("email_verified").and_then(Value::as_str) == Some("true");
        let claimed = claims
            .get(&issuer.config.name_claim)
            .and_then(Value::as_str)
            .filter(|n| valid_name(n))
            .filter(|_| issuer.config.name_claim != "email" || verified_email);
        let name = claimed.unwrap_or(&subject).to_owned();
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
        Ok(OidcIdentity {
            issuer_name: issuer.config.name.clone(),
            iss: iss.to_owned(),
            subject,
            name,
            groups,
        })
    }
}

/// A `sub` Castellan keeps: 1 to 255 bytes (OIDC Core §2) of printable
/// ASCII, so it is safe in logs and person ids.
fn valid_subject(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic())
}
