//! Policy documents: the typed, versioned input each flow gives its Rego
//! package, and the decision each package returns. `policies/README.md`
//! describes both; [`INPUT_VERSION`] is the `version` every input carries.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AgentToken, Attestation, Link, Task};

/// The `version` of every policy input document.
pub const INPUT_VERSION: u32 = 1;

/// The issuance decision document (version 1), see `policies/README.md`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IssuanceDecision {
    pub allow: bool,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// The ephemeral decision document (version 1), see `policies/README.md`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EphemeralDecision {
    /// `deny`, `issue` (now) or `approve` (wait for approvers).
    pub outcome: EphemeralOutcome,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub approval: Option<ApprovalRule>,
    #[serde(default)]
    pub emergency: Option<EmergencyRule>,
}

/// The broker decision document (version 1), see `policies/README.md`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerDecision {
    /// `deny`, `issue` or `approve`.
    pub outcome: EphemeralOutcome,
    #[serde(default)]
    pub reasons: Vec<String>,
    #[serde(default)]
    pub agent_id: Option<String>,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Scopes policy allows for this request; the host intersects them with
    /// the request and the parent's.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The longest lifetime policy allows.
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub approval: Option<ApprovalRule>,
    /// Lets a JWT-SVID be minted without a key to bind it to (a bearer
    /// token). Default false: without a key the request is refused.
    #[serde(default)]
    pub bearer: bool,
}

/// What the ephemeral policy decided.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EphemeralOutcome {
    Deny,
    Issue,
    Approve,
}

/// Who must approve, from the policy.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRule {
    pub required_approvals: u32,
    #[serde(default)]
    pub approver_groups: Vec<String>,
    #[serde(default)]
    pub approver_principals: Vec<String>,
    #[serde(default = "one")]
    pub deny_threshold: u32,
    #[serde(default = "fifteen_minutes")]
    pub pending_ttl_seconds: u64,
}

/// Whether break-glass may skip approval, and for how long at most.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EmergencyRule {
    pub allowed: bool,
    #[serde(default = "five_minutes")]
    pub max_ttl_seconds: u64,
}

fn one() -> u32 {
    1
}

fn fifteen_minutes() -> u64 {
    900
}

fn five_minutes() -> u64 {
    300
}

/// The Workload API decision document (version 1): whether the caller gets
/// the entry's SVID.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
pub struct WorkloadDecision {
    pub allow: bool,
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// Input of `castellan.issuance`: attested issuance.
#[derive(Debug, Serialize)]
pub struct IssuanceInput<'a> {
    pub version: u32,
    pub trust_domain: &'a str,
    pub attestation: &'a Attestation,
    pub request: IssuanceAsk,
}

/// What an attested issuance asks for.
#[derive(Debug, Serialize)]
pub struct IssuanceAsk {
    pub ttl_seconds: Option<u64>,
    pub dns_names: Vec<String>,
}

/// Input of `castellan.ephemeral`: a just-in-time request.
#[derive(Debug, Serialize)]
pub struct EphemeralInput<'a> {
    pub version: u32,
    pub trust_domain: &'a str,
    pub requester: RequesterDoc,
    /// Set when the requester authenticated with evidence.
    pub attestation: Option<&'a Attestation>,
    pub request: EphemeralAsk,
}

/// The requester as policies see it.
#[derive(Debug, Serialize)]
pub struct RequesterDoc {
    /// `token`, `oidc`, `admin` or `evidence`.
    pub kind: String,
    pub id: String,
    pub name: String,
    /// `admin`, `approver`, `requester`.
    pub role: String,
    pub groups: Vec<String>,
}

/// What a just-in-time request asks for.
#[derive(Debug, Serialize)]
pub struct EphemeralAsk {
    pub spiffe_id: Option<String>,
    pub dns_names: Vec<String>,
    pub ttl_seconds: Option<u64>,
    pub justification: String,
    pub ticket: Option<String>,
    pub emergency: bool,
    /// Any other field of the request body.
    pub extra: Value,
}

/// Input of `castellan.broker`: an agent identity.
#[derive(Debug, Serialize)]
pub struct BrokerInput<'a> {
    pub version: u32,
    pub trust_domain: &'a str,
    pub attestation: &'a Attestation,
    pub request: BrokerAsk,
    pub delegation: DelegationDoc,
}

/// What an agent asks for.
#[derive(Debug, Serialize)]
pub struct BrokerAsk {
    pub agent_id: Option<String>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub ttl_seconds: Option<u64>,
    pub task: Option<Task>,
    /// Whether the token will be bound to a key the agent holds.
    pub key_bound: bool,
    /// Whether an X.509-SVID is asked for too.
    pub x509: bool,
}

/// The verified delegation behind an agent request.
#[derive(Debug, Serialize)]
pub struct DelegationDoc {
    /// Oldest (the person) first.
    pub chain: Vec<Link>,
    /// Parent agents in the chain.
    pub depth: usize,
    pub parent: Option<ParentDoc>,
}

/// The parent agent of a delegation, as policies see it.
#[derive(Debug, Serialize)]
pub struct ParentDoc {
    pub agent_id: String,
    pub spiffe_id: String,
    pub scopes: Vec<String>,
    pub expires_at: i64,
}

impl From<&AgentToken> for ParentDoc {
    fn from(p: &AgentToken) -> Self {
        Self {
            agent_id: p.agent_id.clone(),
            spiffe_id: p.spiffe_id.clone(),
            scopes: p.scopes.clone(),
            expires_at: p.exp,
        }
    }
}

/// Input of `castellan.workload_api`: one entry a Workload API caller matches.
#[derive(Debug, Serialize)]
pub struct WorkloadInput<'a> {
    pub version: u32,
    pub trust_domain: &'a str,
    pub attestation: &'a Attestation,
    pub entry: EntryDoc<'a>,
}

/// The entry as policies see it.
#[derive(Debug, Serialize)]
pub struct EntryDoc<'a> {
    pub id: &'a str,
    pub spiffe_id: &'a str,
    pub selectors: &'a [String],
}

/// Input of `castellan.ca`: an admin asks Castellan to sign a subordinate CA.
#[derive(Debug, Serialize)]
pub struct CaInput<'a> {
    pub version: u32,
    pub trust_domain: &'a str,
    /// Who asks (`user:<name>`, or `admin`).
    pub requester: &'a str,
    pub request: CaAsk<'a>,
}

/// What a subordinate CA request asks for.
#[derive(Debug, Serialize)]
pub struct CaAsk<'a> {
    pub name: &'a str,
    pub ttl_seconds: Option<u64>,
    /// SHA-256 (hex) of the CSR's SubjectPublicKeyInfo.
    pub public_key_sha256: String,
}

/// The subordinate CA decision document (version 1), see `policies/README.md`.
/// The host adds what the policy cannot widen: path length 0, names limited
/// to the trust domain's SPIFFE IDs, the root's life.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CaDecision {
    pub allow: bool,
    #[serde(default)]
    pub ttl_seconds: Option<u64>,
    #[serde(default)]
    pub reasons: Vec<String>,
}
