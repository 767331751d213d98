//! What the store keeps beside requests and tokens: the certificate
//! inventory, the webhook outbox and idempotent responses.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which flow issued a credential. Serialised as the inventory's `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `POST /api/v1/workloads/attested-issuance`.
    #[serde(rename = "attested-issuance")]
    AttestedIssuance,
    /// A just-in-time request.
    Ephemeral,
    /// The agent broker (and token exchange).
    Broker,
    /// The SPIFFE Workload API.
    WorkloadApi,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::AttestedIssuance => "attested-issuance",
            Source::Ephemeral => "ephemeral",
            Source::Broker => "broker",
            Source::WorkloadApi => "workload_api",
        }
    }
}

/// One issued certificate in the inventory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateRecord {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub spiffe_id: String,
    pub not_before: String,
    pub not_after: String,
    /// Which flow issued it.
    pub source: Source,
    /// Attestation method (or requester kind) and subject that earned it.
    pub method: String,
    pub subject: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex.
    pub public_key_sha256: String,
    pub issued_at: String,
    /// The caller's selectors, where attestation produced them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
}

/// An event for webhooks, queued durably with the change that caused it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    /// `ephemeral.created`, `ephemeral.decided`, `ephemeral.issued`, `ephemeral.expired`.
    pub event: String,
    pub payload: Value,
}

/// A queued notification and its delivery state per webhook.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutboxItem {
    pub seq: u64,
    pub id: String,
    pub notification: Notification,
    pub created_at: String,
    /// Webhook names this item was delivered to (or gave up on).
    #[serde(default)]
    pub done: Vec<String>,
    /// Attempts so far, by webhook name.
    #[serde(default)]
    pub attempts: std::collections::BTreeMap<String, u32>,
    /// Unix seconds before which no retry is made.
    #[serde(default)]
    pub next_attempt_at: i64,
}

/// A stored answer to an `Idempotency-Key`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IdempotentResponse {
    pub body_sha256: String,
    pub status: u16,
    /// The response body; for one that held a secret, only the ids it named.
    pub body: String,
    pub content_type: String,
    pub created_at: i64,
    /// The response held a secret (`Cache-Control: no-store`): it is never
    /// stored, so a replay is refused instead.
    #[serde(default)]
    pub secret: bool,
}

/// A server challenge waiting for its evidence. It lives in the store so
/// that the gateway the evidence reaches can take it, whichever issued it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChallengeRecord {
    pub id: String,
    pub method: String,
    /// Who asked (an IPv4 address, or an IPv6 /64), for the per-client limit.
    #[serde(default)]
    pub client: Option<String>,
    pub expires_at: i64,
    /// What the module sees under `context.challenge` (may hold secrets the
    /// client must not see, such as a TPM credential's secret).
    pub context: serde_json::Value,
}

/// A policy bundle pushed through the API, kept so that every gateway, and
/// this one after a restart, activates the same bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredBundle {
    pub name: String,
    /// The `.tar.gz` as pushed, base64.
    pub tar_gz: String,
    /// SHA-256 of the `.tar.gz`, hex: tells a gateway whether it has it.
    pub sha256: String,
    pub stored_at: i64,
}
