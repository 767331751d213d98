//! Just-in-time (ephemeral) requests as stored: who asked, what will be
//! signed, the binding approvers vote on, the votes, and what was issued.
//! The state machine that moves a request lives in `approvals`.

use serde::{Deserialize, Serialize};

/// The states of an ephemeral request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Approved,
    Issued,
    Denied,
    Expired,
    Cancelled,
}

impl State {
    /// Whether no transition leaves this state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Issued | State::Denied | State::Expired | State::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Issued => "issued",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => State::Pending,
            "approved" => State::Approved,
            "issued" => State::Issued,
            "denied" => State::Denied,
            "expired" => State::Expired,
            "cancelled" => State::Cancelled,
            _ => return None,
        })
    }
}

/// Who asked, as recorded on the request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requester {
    /// `user:<name>` for API tokens and people, `workload:<method>:<subject>`
    /// for evidence.
    pub id: String,
    pub name: String,
    /// `token`, `oidc` or `evidence`.
    pub kind: String,
    /// Every other person this request speaks for: the requester's other
    /// identifiers and everyone in its delegation chain. None of them may
    /// vote on it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persons: Vec<String>,
}

/// One approver's vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    /// The voter's person id.
    pub approver: String,
    /// The voter's other identifiers when it voted: a vote through either
    /// counts once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub persons: Vec<String>,
    pub decision: VoteDecision,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub at: String,
}

/// A vote's direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VoteDecision {
    Approve,
    Deny,
}

/// Who may approve and how many must, from the policy decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub required_approvals: u32,
    #[serde(default)]
    pub approver_groups: Vec<String>,
    #[serde(default)]
    pub approver_principals: Vec<String>,
    /// Denials that end the request.
    pub deny_threshold: u32,
}

impl From<super::policy::ApprovalRule> for Rule {
    /// At least one approval, and at least one denial, are ever needed.
    fn from(a: super::policy::ApprovalRule) -> Self {
        Self {
            required_approvals: a.required_approvals.max(1),
            approver_groups: a.approver_groups,
            approver_principals: a.approver_principals,
            deny_threshold: a.deny_threshold.max(1),
        }
    }
}

/// The certificate an issued request produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCert {
    pub certificate_pem: String,
    pub chain_pem: String,
    pub bundle_pem: String,
    pub serial: String,
    pub not_after: String,
}

/// An ephemeral request as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    pub state: State,
    pub requester: Requester,
    pub spiffe_id: String,
    pub dns_names: Vec<String>,
    pub ttl_seconds: u64,
    pub justification: String,
    #[serde(default)]
    pub ticket: Option<String>,
    pub emergency: bool,
    /// Break-glass issuances are flagged for review after the fact.
    pub post_review: bool,
    /// DER SubjectPublicKeyInfo (base64) the certificate will be bound to.
    pub public_key: String,
    pub binding: String,
    pub rule: Rule,
    pub votes: Vec<Vote>,
    pub created_at: String,
    /// Unix seconds after which a pending request expires.
    pub expires_at: i64,
    #[serde(default)]
    pub decided_at: Option<String>,
    #[serde(default)]
    pub issued: Option<IssuedCert>,
    pub policy_revision: String,
    /// What the attestor proved, for requesters that sent evidence.
    #[serde(default)]
    pub attestation: Option<super::AttestationSummary>,
    /// For an agent identity escalated by the broker: what will be minted.
    #[serde(default)]
    pub agent: Option<super::AgentGrant>,
}
