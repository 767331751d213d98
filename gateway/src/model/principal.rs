//! Who a caller is once authenticated, and API tokens as stored.

use serde::{Deserialize, Serialize};

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything, including managing tokens and trust sources.
    Admin,
    /// Vote on requests the policy makes them eligible for; request too.
    Approver,
    /// Ask for ephemeral credentials.
    Requester,
}

impl Role {
    /// Whether this role may vote on requests at all (policy narrows it).
    pub fn can_approve(self) -> bool {
        matches!(self, Role::Admin | Role::Approver)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Approver => "approver",
            Role::Requester => "requester",
        }
    }
}

/// How a principal authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrincipalKind {
    /// The bootstrap admin token.
    Admin,
    /// An API token.
    Token,
    /// An OIDC ID token.
    Oidc,
}

impl PrincipalKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PrincipalKind::Admin => "admin",
            PrincipalKind::Token => "token",
            PrincipalKind::Oidc => "oidc",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `user:<name>` for people and API tokens.
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub kind: PrincipalKind,
}

/// An API token as stored: never the token, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub created_at: String,
    /// Lowercase hex SHA-256 of the token.
    pub token_sha256: String,
}
