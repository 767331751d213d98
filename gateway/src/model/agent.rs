//! Agent identities: delegation chains, tasks, the grant fixed at decision
//! time, and the token registry behind revocation and introspection.

use serde::{Deserialize, Serialize};

/// One link of a delegation chain, oldest (the person) first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// `person` or `agent`.
    pub kind: String,
    /// The person's name claim, or the parent agent's SPIFFE ID.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// A task the identity is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub id: String,
    #[serde(default)]
    pub purpose: String,
}

/// An issued agent token, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentToken {
    pub jti: String,
    pub agent_id: String,
    pub spiffe_id: String,
    #[serde(default)]
    pub parent_jti: Option<String>,
    #[serde(default)]
    pub task_id: Option<String>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub chain: Vec<Link>,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// What to revoke. Exactly one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RevocationFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

impl RevocationFilter {
    /// Whether exactly one selector is given.
    pub fn is_valid(&self) -> bool {
        [
            self.agent_id.is_some(),
            self.task_id.is_some(),
            self.jti.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
            == 1
    }

    pub fn matches(&self, t: &AgentToken) -> bool {
        self.agent_id.as_ref().is_some_and(|a| *a == t.agent_id)
            || self
                .task_id
                .as_ref()
                .is_some_and(|id| t.task_id.as_ref() == Some(id))
            || self.jti.as_ref().is_some_and(|j| *j == t.jti)
    }
}

/// An entry of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub seq: u64,
    pub jti: String,
    pub agent_id: String,
    /// When the token would have expired anyway: entries can be dropped after.
    pub exp: i64,
    pub revoked_at: String,
}

/// Everything needed to mint, fixed at decision time (and, for escalated
/// requests, stored with the pending request so approvers vote on it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentGrant {
    pub agent_id: String,
    pub spiffe_id: String,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub ttl_seconds: u64,
    /// RFC 7638 thumbprint of the key the token is bound to.
    #[serde(default)]
    pub jkt: Option<String>,
    /// DER SubjectPublicKeyInfo (base64) when an X.509-SVID is wanted too.
    #[serde(default)]
    pub csr_public_key: Option<String>,
    pub chain: Vec<Link>,
    #[serde(default)]
    pub parent_jti: Option<String>,
    /// Unix time the parent token expires, which caps this one at minting.
    #[serde(default)]
    pub parent_exp: Option<i64>,
    #[serde(default)]
    pub task: Option<Task>,
    pub requested_scopes: Vec<String>,
}
