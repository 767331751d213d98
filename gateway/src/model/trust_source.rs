//! Trust sources: where the keys and certificates that verify evidence come
//! from. The registry that serves them lives in `trust`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
