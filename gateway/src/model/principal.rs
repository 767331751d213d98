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
///
/// `id` names the *person*: `user:<name>` for the admin token, an API token,
/// or an OIDC login linked to an API token; `oidc:<issuer>:<sub>` for an
/// OIDC login linked to none (its own namespace per issuer, which can never
/// equal an API token's). Votes, quorum and self-approval compare persons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    /// A display name: the token's name, or an OIDC login's verified email
    /// (or name claim, or `sub`).
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub kind: PrincipalKind,
    /// Every other identifier of the same person (a linked token's
    /// `user:<name>`, a linked login's `oidc:<issuer>:<sub>`).
    pub persons: Vec<String>,
}

impl Principal {
    /// Whether any of `ids` names this person.
    pub fn is_any_of(&self, ids: &[String]) -> bool {
        ids.iter().any(|i| *i == self.id || self.persons.contains(i))
    }

    /// Whether a policy's `approver_principals` entry names this person:
    /// its id, another identifier of the same person, or the bare name of
    /// a `user:<name>` person. An unlinked OIDC login never answers to a
    /// bare name, so it can never pass for an API token's holder.
    pub fn answers_to(&self, entry: &str) -> bool {
        entry == self.id
            || self.persons.iter().any(|p| p == entry)
            || self.id.strip_prefix("user:") == Some(entry)
    }

    /// This person and every other identifier of them.
    pub fn all_ids(&self) -> Vec<String> {
        let mut ids = vec![self.id.clone()];
        ids.extend(self.persons.iter().filter(|p| **p != self.id).cloned());
        ids
    }
}

/// The person id of an OIDC identity not linked to any API token.
pub fn oidc_person(issuer: &str, subject: &str) -> String {
    format!("oidc:{issuer}:{subject}")
}

/// The OIDC identity an API token's holder also signs in with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcLink {
    /// The `[[oidc_issuers]]` entry's `name`.
    pub issuer: String,
    /// The person's `sub` at that issuer.
    pub subject: String,
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
    /// The holder's OIDC identity: a login through it is the same person.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oidc: Option<OidcLink>,
    /// Unix seconds after which the token no longer authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// When it was revoked; a revoked token never authenticates again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<String>,
}

impl TokenRecord {
    /// Whether the token still authenticates at `now` (Unix seconds).
    pub fn is_live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| now < e)
    }

    /// The person it names, and every other identifier of them.
    pub fn person(&self) -> (String, Vec<String>) {
        let persons = self
            .oidc
            .iter()
            .map(|l| oidc_person(&l.issuer, &l.subject))
            .collect();
        (format!("user:{}", self.name), persons)
    }

    /// What listings show: everything but the hash.
    pub fn view(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id, "name": self.name, "role": self.role, "groups": self.groups,
            "created_at": self.created_at, "oidc": self.oidc,
            "expires_at": self.expires_at.map(crate::util::rfc3339_unix),
            "revoked_at": self.revoked_at,
        })
    }
}
