//! What an attestor module proved about a caller.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What an attestor module proved about a caller.
#[derive(Debug, Clone, Serialize)]
pub struct Attestation {
    pub method: String,
    pub subject: String,
    pub selectors: Vec<String>,
    /// Verified claims, a JSON object.
    pub claims: Value,
    /// Set when the evidence is good for one use: the engine refuses a
    /// second attestation with the same id.
    #[serde(skip)]
    pub single_use: Option<SingleUse>,
}

/// The one-use mark a module put on its evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleUse {
    pub id: String,
    /// Unix seconds until which a second use is refused.
    pub until: i64,
}

/// The attestation as shown to callers and kept on records: no claims, which
/// may be sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestationSummary {
    pub method: String,
    pub subject: String,
    pub selectors: Vec<String>,
}

impl From<Attestation> for AttestationSummary {
    fn from(a: Attestation) -> Self {
        Self {
            method: a.method,
            subject: a.subject,
            selectors: a.selectors,
        }
    }
}

impl From<&Attestation> for AttestationSummary {
    fn from(a: &Attestation) -> Self {
        Self {
            method: a.method.clone(),
            subject: a.subject.clone(),
            selectors: a.selectors.clone(),
        }
    }
}
