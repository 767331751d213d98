//! The store: certificate inventory, trust sources, and a hash-chained,
//! append-only audit log. [`Store`] is the seam for other backends; redb is
//! the embedded default. A write that acknowledges an issuance is durable
//! before the call returns.

mod redb_store;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::approvals::{ApprovalError, Request, State};
use crate::auth::TokenRecord;
use crate::broker::{AgentToken, Revocation, RevocationFilter};
use crate::trust::TrustSource;

pub use redb_store::RedbStore;

/// What a request transition writes beside the request itself, in the same
/// transaction: audit events, notifications for the webhook outbox, and
/// certificates for the inventory.
#[derive(Debug, Default)]
pub struct Effects {
    pub audit: Vec<AuditEvent>,
    pub notify: Vec<Notification>,
    pub certificates: Vec<CertificateRecord>,
    /// Agent JWT-SVIDs issued by this change, for revocation and introspection.
    pub agent_tokens: Vec<AgentToken>,
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
    pub body: String,
    pub content_type: String,
    pub created_at: i64,
}

/// A transition applied to a stored request inside the writer.
pub type RequestUpdate = Box<dyn FnOnce(&mut Request) -> Result<Effects, ApprovalError> + Send>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or is in use by another process.
    #[error("cannot open the store at {path}: {message}")]
    Open { path: String, message: String },
    /// A read or write failed in the backend.
    #[error("store backend: {0}")]
    Backend(String),
    /// The writer has stopped (the server is shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// The audit chain does not verify at the given sequence number.
    #[error("audit chain broken at entry {0}")]
    ChainBroken(u64),
}

/// One issued certificate in the inventory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CertificateRecord {
    /// Serial number, lowercase hex.
    pub serial: String,
    pub spiffe_id: String,
    pub not_before: String,
    pub not_after: String,
    /// Which surface issued it, e.g. `attested-issuance`.
    pub source: String,
    /// Attestation method and subject that earned it.
    pub method: String,
    pub subject: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo, hex.
    pub public_key_sha256: String,
    pub issued_at: String,
}

/// An audit event before it is chained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    /// What happened, e.g. `issuance.issued`, `issuance.refused`.
    pub kind: String,
    /// Who asked: `admin`, `evidence:<method>`, or `anonymous`.
    pub actor: String,
    /// Details safe to keep: never evidence, tokens or keys.
    pub detail: Value,
}

/// An audit entry as stored: the event, its place and its chain hashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous entry (`sha256:` + 64 zeros for the first).
    pub prev_hash: String,
    /// `sha256:` over this entry's canonical JSON without `hash`.
    pub hash: String,
}

impl AuditRecord {
    /// Computes the hash this record must carry.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "at": self.at,
            "kind": self.event.kind,
            "actor": self.event.actor,
            "detail": self.event.detail,
            "prev_hash": self.prev_hash,
        });
        // serde_json without `preserve_order` sorts object keys, which makes
        // this serialisation canonical for our purposes.
        format!("sha256:{}", crate::util::sha256_hex(body.to_string().as_bytes()))
    }
}

/// The hash that precedes the first audit entry.
pub fn genesis_hash() -> String {
    format!("sha256:{}", "0".repeat(64))
}

/// A page of results and the cursor for the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// What every backend provides.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records an issued certificate and its audit event in one durable write.
    async fn record_issuance(&self, cert: CertificateRecord, event: AuditEvent) -> Result<(), StoreError>;

    /// Appends an audit event durably.
    async fn audit(&self, event: AuditEvent) -> Result<(), StoreError>;

    /// Lists certificates in issuance order, `limit` at a time.
    async fn list_certificates(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<CertificateRecord>, StoreError>;

    /// Number of certificates in the inventory.
    async fn count_certificates(&self) -> Result<u64, StoreError>;

    /// Lists audit entries after `cursor`.
    async fn list_audit(&self, limit: usize, cursor: Option<&str>) -> Result<Page<AuditRecord>, StoreError>;

    /// Persists a trust source together with its audit event.
    async fn put_trust_source(&self, source: TrustSource, event: AuditEvent) -> Result<(), StoreError>;

    /// Deletes a trust source together with its audit event.
    async fn delete_trust_source(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError>;

    /// All persisted trust sources.
    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError>;

    /// Re-hashes the whole audit log; returns the number of entries checked.
    async fn verify_audit_chain(&self) -> Result<u64, StoreError>;

    /// Persists a new API token record with its audit event.
    async fn put_token(&self, record: TokenRecord, event: AuditEvent) -> Result<(), StoreError>;

    /// All API token records.
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// Stores a new ephemeral request and its effects in one transaction.
    async fn create_request(&self, request: Request, effects: Effects) -> Result<(), StoreError>;

    /// One request.
    async fn get_request(&self, id: &str) -> Result<Option<Request>, StoreError>;

    /// Requests, optionally only in one state, oldest first.
    async fn list_requests(&self, state: Option<State>) -> Result<Vec<Request>, StoreError>;

    /// Applies `update` to the stored request atomically: concurrent updates
    /// are serialised, and a refused update writes nothing. The inner result
    /// is the domain outcome; the outer one the store's.
    async fn update_request(
        &self,
        id: &str,
        update: RequestUpdate,
    ) -> Result<Result<Request, ApprovalError>, StoreError>;

    /// Outbox items, oldest first.
    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;

    /// Replaces an outbox item's delivery state, or removes it when `None`.
    async fn outbox_update(&self, seq: u64, item: Option<OutboxItem>) -> Result<(), StoreError>;

    /// A stored idempotent response.
    async fn idempotency_get(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError>;

    /// Persists a registration entry with its audit event.
    async fn put_entry(&self, entry: crate::workload_api::Entry, event: AuditEvent)
    -> Result<(), StoreError>;

    /// Deletes a registration entry with its audit event.
    async fn delete_entry(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError>;

    /// All registration entries.
    async fn entries(&self) -> Result<Vec<crate::workload_api::Entry>, StoreError>;

    /// Marks single-use evidence `key` spent until `until`; false when it
    /// already was (and still matters at `now`). Survives restarts.
    async fn spend(&self, key: &str, until: i64, now: i64) -> Result<bool, StoreError>;

    /// Forgets spent evidence that stopped mattering before `now`.
    async fn spent_purge(&self, now: i64) -> Result<(), StoreError>;

    /// Records an issued agent token and its effects in one transaction.
    async fn put_agent_token(&self, token: AgentToken, effects: Effects) -> Result<(), StoreError>;

    /// One agent token record.
    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError>;

    /// Revokes every live token matching `filter` and all their descendants;
    /// returns the revocations made (already-revoked tokens are skipped).
    async fn revoke(&self, filter: RevocationFilter, actor: String) -> Result<Vec<Revocation>, StoreError>;

    /// The revocation feed after `cursor`.
    async fn revocations(&self, limit: usize, cursor: Option<&str>) -> Result<Page<Revocation>, StoreError>;

    /// Forgets idempotent responses created before `before` (Unix seconds).
    async fn idempotency_purge(&self, before: i64) -> Result<(), StoreError>;

    /// Stores an idempotent response.
    async fn idempotency_put(&self, key: &str, response: IdempotentResponse) -> Result<(), StoreError>;
}
