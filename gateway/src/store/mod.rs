//! The store: certificate inventory, trust sources, and a hash-chained,
//! append-only audit log. [`Store`] is the seam for other backends; redb is
//! the embedded default. A write that acknowledges an issuance is durable
//! before the call returns.

mod redb_store;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::trust::TrustSource;

pub use redb_store::RedbStore;

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
}
