//! The store: certificate inventory, requests, agent tokens, trust sources,
//! entries, the webhook outbox and a hash-chained, append-only audit log.
//!
//! Two layers. A [`Backend`] only stores: it speaks the model, runs a unit
//! of work in one durable write transaction ([`Txn`]) and answers reads.
//! [`Store`], above it, owns the rules every backend must keep alike: audit
//! chaining, the outbox, single-use marks, the pending index, the
//! revocation cascade and cursors. A new backend implements storage only
//! and passes the same conformance suite (`conformance.rs`).
//!
//! The store imports the model and nothing of the flows above it.

mod conformance;
mod group;
mod memory;
mod pg_test_cluster;
mod pg_tls;
mod postgres_backend;
mod redb_backend;
mod rules;

use std::sync::{Arc, Mutex};

use serde_json::json;

pub use self::memory::MemoryBackend;
pub use self::pg_tls::MakeRustls;
pub use self::postgres_backend::{PostgresBackend, SCHEMA_VERSION};
pub use self::redb_backend::RedbBackend;
use crate::model::{
    Actor, AgentToken, AuditKind, Entry, Request, Revocation, RevocationFilter, State, TokenRecord,
    TrustSource,
};
pub use crate::model::{
    AuditEvent, AuditRecord, CertificateRecord, ChallengeRecord, IdempotentResponse, Notification,
    OutboxItem, StoredBundle,
};

/// What other gateways sharing the store hear changed: a topic, or a topic
/// and a key (`requests:<id>`), or [`topic::ALL`] when they may have missed
/// something (a dropped connection) and should re-read everything.
pub mod topic {
    pub const ENTRIES: &str = "entries";
    pub const TRUST_SOURCES: &str = "trust_sources";
    pub const TOKENS: &str = "tokens";
    pub const BUNDLES: &str = "bundles";
    pub const REVOCATIONS: &str = "revocations";
    /// The signer's authorities (rotation).
    pub const AUTHORITIES: &str = "authorities";
    /// Followed by `:<request id>`.
    pub const REQUESTS: &str = "requests";
    pub const ALL: &str = "*";
}

/// Whether a challenge found room in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeRoom {
    Stored,
    /// The table holds as many live challenges as it may.
    Full,
    /// The client holds as many live challenges as it may.
    ClientFull,
}

/// What an `Idempotency-Key` claim found.
#[derive(Debug, Clone, PartialEq)]
pub enum IdempotencyClaim {
    /// The key is now this caller's until it stores the response or lets go.
    Claimed,
    /// Another request holds the key (on any gateway).
    InFlight,
    /// The key was already answered.
    Answered(IdempotentResponse),
}

/// The `status` of a claim's placeholder: a request holds the key.
pub const IDEMPOTENCY_IN_FLIGHT: u16 = 0;

/// What a change writes beside its main record, in the same transaction:
/// audit events, notifications for the webhook outbox, certificates for the
/// inventory and agent tokens for the registry.
#[derive(Debug, Default)]
pub struct Effects {
    pub audit: Vec<AuditEvent>,
    pub notify: Vec<Notification>,
    pub certificates: Vec<CertificateRecord>,
    /// Agent JWT-SVIDs issued by this change, for revocation and introspection.
    pub agent_tokens: Vec<AgentToken>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened or is in use by another process.
    #[error("cannot open the store at {path}")]
    Open {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A read or write failed in the backend.
    #[error("store backend")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A stored value does not decode.
    #[error("stored {what} does not decode")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A cursor that this store never handed out.
    #[error("invalid cursor")]
    Cursor,
    /// The writer has stopped (the server is shutting down).
    #[error("the store is shutting down")]
    Closed,
    /// The audit chain does not verify at the given sequence number.
    #[error("audit chain broken at entry {0}")]
    ChainBroken(u64),
}

impl StoreError {
    /// Wraps any backend error, keeping it as the source.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

/// A page of results and the cursor for the next one.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// One unit of work in a write transaction.
pub type Work = Box<dyn FnOnce(&mut dyn Txn) -> Result<(), StoreError> + Send>;

/// One write transaction, as a backend offers it. A unit of work reads and
/// decides before its first write, so a refusal writes nothing; an error
/// fails the whole transaction. Sequence numbers start at 1.
pub trait Txn {
    fn last_certificate_seq(&mut self) -> Result<u64, StoreError>;
    fn put_certificate(&mut self, seq: u64, cert: &CertificateRecord) -> Result<(), StoreError>;

    /// The sequence number and hash of the newest audit record, if any.
    fn audit_head(&mut self) -> Result<Option<(u64, String)>, StoreError>;
    fn put_audit(&mut self, record: &AuditRecord) -> Result<(), StoreError>;

    fn put_trust_source(&mut self, source: &TrustSource) -> Result<(), StoreError>;
    fn delete_trust_source(&mut self, id: &str) -> Result<bool, StoreError>;

    fn put_token(&mut self, record: &TokenRecord) -> Result<(), StoreError>;

    fn request(&mut self, id: &str) -> Result<Option<Request>, StoreError>;
    /// Stores a request; `open` keeps it in (or out of) the index of open
    /// (pending or approved) requests.
    fn put_request(&mut self, request: &Request, open: bool) -> Result<(), StoreError>;
    /// The ids of open requests.
    fn open_request_ids(&mut self) -> Result<Vec<String>, StoreError>;

    fn last_outbox_seq(&mut self) -> Result<u64, StoreError>;
    fn put_outbox(&mut self, item: &OutboxItem) -> Result<(), StoreError>;
    fn delete_outbox(&mut self, seq: u64) -> Result<(), StoreError>;

    fn put_idempotent(&mut self, key: &str, response: &IdempotentResponse) -> Result<(), StoreError>;
    /// Forgets responses created before `before` (Unix seconds).
    fn purge_idempotent(&mut self, before: i64) -> Result<(), StoreError>;

    fn agent_token(&mut self, jti: &str) -> Result<Option<AgentToken>, StoreError>;
    fn put_agent_token(&mut self, token: &AgentToken) -> Result<(), StoreError>;
    /// Tokens whose `agent_id`, `task_id` or `jti` is the filter's one.
    fn agent_tokens_matching(&mut self, filter: &RevocationFilter) -> Result<Vec<AgentToken>, StoreError>;
    /// Every token kept (they are purged once expired).
    fn agent_tokens_all(&mut self) -> Result<Vec<AgentToken>, StoreError>;
    /// Tokens minted with `parent_jti` as their parent.
    fn agent_token_children(&mut self, parent_jti: &str) -> Result<Vec<AgentToken>, StoreError>;

    fn last_revocation_seq(&mut self) -> Result<u64, StoreError>;
    fn put_revocation(&mut self, revocation: &Revocation) -> Result<(), StoreError>;

    fn put_entry(&mut self, entry: &Entry) -> Result<(), StoreError>;
    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError>;

    /// Until when spent evidence `key` matters, if it was spent.
    fn spent_until(&mut self, key: &str) -> Result<Option<i64>, StoreError>;
    fn put_spent(&mut self, key: &str, until: i64) -> Result<(), StoreError>;
    /// Forgets marks that stopped mattering before `now`.
    fn purge_spent(&mut self, now: i64) -> Result<(), StoreError>;
    /// Forgets agent tokens that expired before `before`.
    fn purge_agent_tokens(&mut self, before: i64) -> Result<(), StoreError>;
    /// Forgets decided requests whose deadline passed before `before`.
    fn purge_requests(&mut self, before: i64) -> Result<(), StoreError>;
    /// Forgets revocations of tokens that expired before `before`.
    fn purge_revocations(&mut self, before: i64) -> Result<(), StoreError>;

    /// Tells the other gateways sharing this store that `topic` changed,
    /// once this transaction commits. Backends that serve one process keep
    /// nothing to tell.
    fn changed(&mut self, topic: &str) -> Result<(), StoreError> {
        let _ = topic;
        Ok(())
    }

    fn idempotent(&mut self, key: &str) -> Result<Option<IdempotentResponse>, StoreError>;
    fn delete_idempotent(&mut self, key: &str) -> Result<(), StoreError>;

    fn put_challenge(&mut self, challenge: &ChallengeRecord) -> Result<(), StoreError>;
    /// Removes and returns the challenge `id`, live or expired.
    fn take_challenge(&mut self, id: &str) -> Result<Option<ChallengeRecord>, StoreError>;
    /// Challenges live at `now`: in all, and those of `client`.
    fn count_challenges(&mut self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError>;
    /// Forgets challenges that expired before `now`.
    fn purge_challenges(&mut self, now: i64) -> Result<(), StoreError>;

    fn put_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError>;

    /// Every stored trust source (for checks that span gateways).
    fn trust_sources(&mut self) -> Result<Vec<TrustSource>, StoreError>;
    /// Every stored API token record.
    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError>;
}

/// Storage, and nothing else. Implementations: [`RedbBackend`] (the
/// embedded default) and [`MemoryBackend`] (tests).
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Runs `work` in a write transaction and returns once it is durable
    /// (or refused as a whole). Backends may commit several callers' work
    /// in one transaction; each still hears back only after the commit.
    async fn write(&self, work: Work) -> Result<(), StoreError>;

    /// Certificates with sequence numbers after `after`, in order.
    async fn certificates(&self, limit: usize, after: u64) -> Result<Page<CertificateRecord>, StoreError>;
    async fn count_certificates(&self) -> Result<u64, StoreError>;
    /// Audit records after `after`, in order.
    async fn audit_records(&self, limit: usize, after: u64) -> Result<Page<AuditRecord>, StoreError>;
    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError>;
    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    async fn request(&self, id: &str) -> Result<Option<Request>, StoreError>;
    /// Every request, or only those in the pending index.
    /// All requests, or only the open (pending or approved) ones.
    async fn requests(&self, open_only: bool) -> Result<Vec<Request>, StoreError>;
    /// The oldest `limit` outbox items.
    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;
    async fn idempotent(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError>;
    async fn entries(&self) -> Result<Vec<Entry>, StoreError>;
    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError>;
    /// Revocations with sequence numbers after `after`, in order.
    async fn revocations(&self, limit: usize, after: u64) -> Result<Page<Revocation>, StoreError>;
    async fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError>;
    /// A pending challenge, read without the write lock.
    async fn challenge(&self, id: &str) -> Result<Option<ChallengeRecord>, StoreError>;
    /// Live challenges at `now`, in all and of `client`, read without the
    /// write lock. May count fewer than there are (never more): the write
    /// transaction counts again.
    async fn challenge_counts(&self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError>;

    /// What other gateways changed (see [`topic`]); `None` for a backend
    /// that only this process writes.
    fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        None
    }

    /// Whether this gateway runs the duties that must run once across all
    /// gateways sharing the store (purges, webhook delivery, retries).
    fn is_leader(&self) -> bool {
        true
    }

    /// Whether the store answers now (a database round trip, for
    /// readiness checks).
    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The store every stage uses: a backend plus the rules above it.
#[derive(Clone)]
pub struct Store {
    backend: Arc<dyn Backend>,
    /// Told how long each write transaction took to become durable.
    commits: Option<CommitObserver>,
}

/// What is told each write transaction's time to commit.
pub type CommitObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store(..)")
    }
}

fn parse_cursor(cursor: Option<&str>) -> Result<u64, StoreError> {
    match cursor {
        None => Ok(0),
        Some(c) => c.parse().map_err(|_| StoreError::Cursor),
    }
}

impl Store {
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            commits: None,
        }
    }

    /// Tells `observe` each write transaction's time to commit (metrics).
    pub fn observe_commits(mut self, observe: CommitObserver) -> Self {
        self.commits = Some(observe);
        self
    }

    /// The embedded redb store at `path`.
    pub fn redb(path: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(RedbBackend::open(path)?)))
    }

    /// A PostgreSQL store, shared by every gateway that uses the database.
    pub fn postgres(config: postgres::Config, max_connections: usize) -> Result<Self, StoreError> {
        Self::postgres_with(config, None, max_connections)
    }

    /// A PostgreSQL store reached over TLS when `tls` is set.
    pub fn postgres_with(
        config: postgres::Config,
        tls: Option<MakeRustls>,
        max_connections: usize,
    ) -> Result<Self, StoreError> {
        Ok(Self::new(Arc::new(PostgresBackend::open_with(
            config,
            tls,
            max_connections,
        )?)))
    }

    /// An in-memory store (tests).
    pub fn memory() -> Self {
        Self::new(Arc::new(MemoryBackend::default()))
    }

    /// Runs `f` in one write transaction and returns what it returned once
    /// the transaction is durable.
    pub async fn transact<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Txn) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let slot = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let start = std::time::Instant::now();
        self.backend
            .write(Box::new(move |txn| {
                let value = f(txn)?;
                *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(value);
                Ok(())
            }))
            .await?;
        if let Some(observe) = &self.commits {
            observe(start.elapsed());
        }
        let value = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        value.ok_or(StoreError::Closed)
    }

    /// Records an issued certificate and its audit event in one durable write.
    pub async fn record_issuance(
        &self,
        cert: CertificateRecord,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        self.record(Effects {
            audit: vec![event],
            certificates: vec![cert],
            ..Effects::default()
        })
        .await
    }

    /// Writes `effects` in one durable write.
    pub async fn record(&self, effects: Effects) -> Result<(), StoreError> {
        self.transact(move |t| rules::apply_effects(t, effects)).await
    }

    /// Appends an audit event durably.
    pub async fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| rules::append_audit(t, event).map(drop))
            .await
    }

    /// Lists certificates in issuance order, `limit` at a time.
    pub async fn list_certificates(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<CertificateRecord>, StoreError> {
        self.backend.certificates(limit, parse_cursor(cursor)?).await
    }

    /// Number of certificates in the inventory.
    pub async fn count_certificates(&self) -> Result<u64, StoreError> {
        self.backend.count_certificates().await
    }

    /// Lists audit entries after `cursor`.
    pub async fn list_audit(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<AuditRecord>, StoreError> {
        self.backend.audit_records(limit, parse_cursor(cursor)?).await
    }

    /// The audit log's last entry: its sequence number and hash.
    pub async fn audit_head(&self) -> Result<Option<(u64, String)>, StoreError> {
        self.transact(|t| t.audit_head()).await
    }

    /// The kind of the audit log's last entry, if any.
    pub async fn audit_tail_kind(&self) -> Result<Option<String>, StoreError> {
        let Some((seq, _)) = self.audit_head().await? else {
            return Ok(None);
        };
        let page = self.backend.audit_records(1, seq - 1).await?;
        Ok(page.items.first().map(|r| r.event.kind.as_str().to_owned()))
    }

    /// The refusal recorded for request `request_id`, searched among the
    /// last `within` audit entries, newest first.
    pub async fn find_refusal(
        &self,
        request_id: &str,
        within: u64,
    ) -> Result<Option<AuditRecord>, StoreError> {
        let Some((head, _)) = self.audit_head().await? else {
            return Ok(None);
        };
        let mut after = head.saturating_sub(within);
        let mut found = None;
        loop {
            let page = self.backend.audit_records(1000, after).await?;
            for r in &page.items {
                if r.event.kind.as_str().ends_with("refused") && r.event.detail["request_id"] == request_id {
                    found = Some(r.clone());
                }
            }
            match page.items.last() {
                Some(last) if page.next_cursor.is_some() => after = last.seq,
                _ => return Ok(found),
            }
        }
    }

    /// Re-hashes the whole audit log; returns the number of entries checked.
    pub async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        let mut prev = crate::model::genesis_hash();
        let mut expected_seq = 1;
        let mut after = 0;
        loop {
            let page = self.backend.audit_records(1000, after).await?;
            for rec in &page.items {
                if rec.seq != expected_seq || rec.prev_hash != prev || rec.compute_hash() != rec.hash {
                    return Err(StoreError::ChainBroken(rec.seq));
                }
                prev = rec.hash.clone();
                expected_seq += 1;
                after = rec.seq;
            }
            if page.next_cursor.is_none() {
                return Ok(expected_seq - 1);
            }
        }
    }

    /// Persists a trust source together with its audit event.
    pub async fn put_trust_source(&self, source: TrustSource, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.put_trust_source(&source)?;
            t.changed(topic::TRUST_SOURCES)?;
            rules::append_audit(t, event).map(drop)
        })
        .await
    }

    /// Deletes a trust source together with its audit event.
    pub async fn delete_trust_source(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.transact(move |t| {
            let existed = t.delete_trust_source(&id)?;
            t.changed(topic::TRUST_SOURCES)?;
            rules::append_audit(t, event)?;
            Ok(existed)
        })
        .await
    }

    /// All persisted trust sources, oldest first.
    pub async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        let mut out = self.backend.trust_sources().await?;
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    /// Stores a new trust source with its audit event, unless a stored one
    /// (made through any gateway) already has its name: then `false`, and
    /// nothing is written.
    pub async fn create_trust_source(
        &self,
        source: TrustSource,
        event: AuditEvent,
    ) -> Result<bool, StoreError> {
        self.transact(move |t| {
            if t.trust_sources()?
                .iter()
                .any(|s| s.name == source.name && s.id != source.id)
            {
                return Ok(false);
            }
            t.put_trust_source(&source)?;
            t.changed(topic::TRUST_SOURCES)?;
            rules::append_audit(t, event)?;
            Ok(true)
        })
        .await
    }

    /// Stores a new API token record with its audit event, unless a live
    /// stored token (made through any gateway) already has its name: then
    /// `false`, and nothing is written.
    pub async fn create_token(
        &self,
        record: TokenRecord,
        event: AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        self.transact(move |t| {
            if t.tokens()?
                .iter()
                .any(|r| r.name == record.name && r.is_live(now))
            {
                return Ok(false);
            }
            t.put_token(&record)?;
            t.changed(topic::TOKENS)?;
            rules::append_audit(t, event)?;
            Ok(true)
        })
        .await
    }

    /// Persists a new API token record with its audit event.
    pub async fn put_token(&self, record: TokenRecord, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.put_token(&record)?;
            t.changed(topic::TOKENS)?;
            rules::append_audit(t, event).map(drop)
        })
        .await
    }

    /// All API token records.
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.backend.tokens().await
    }

    /// Stores a new request and its effects in one transaction.
    pub async fn create_request(&self, request: Request, effects: Effects) -> Result<(), StoreError> {
        self.transact(move |t| {
            rules::put_request(t, &request)?;
            rules::apply_effects(t, effects)
        })
        .await
    }

    /// One request.
    pub async fn get_request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        self.backend.request(id).await
    }

    /// Requests, optionally only in one state, oldest first. Pending ones
    /// come from the pending index rather than a scan.
    pub async fn list_requests(&self, state: Option<State>) -> Result<Vec<Request>, StoreError> {
        let open = matches!(state, Some(State::Pending | State::Approved));
        let mut all = self.backend.requests(open).await?;
        if let Some(state) = state {
            all.retain(|r| r.state == state);
        }
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(all)
    }

    /// Applies `update` to the stored request atomically: concurrent updates
    /// are serialised, and a refused update writes nothing. `None` when no
    /// request has that id; otherwise the domain outcome.
    pub async fn update_request<E: Send + 'static>(
        &self,
        id: &str,
        update: impl FnOnce(&mut Request) -> Result<Effects, E> + Send + 'static,
    ) -> Result<Option<Result<Request, E>>, StoreError> {
        self.update_request_in_lineage(id, move |r, _| update(r)).await
    }

    /// Like [`Store::update_request`], and tells `update`, read in the same
    /// transaction, the first revoked token in the delegation lineage of the
    /// request's agent grant (its parent, the parent's parent, ...), if any.
    pub async fn update_request_in_lineage<E: Send + 'static>(
        &self,
        id: &str,
        update: impl FnOnce(&mut Request, Option<String>) -> Result<Effects, E> + Send + 'static,
    ) -> Result<Option<Result<Request, E>>, StoreError> {
        let id = id.to_owned();
        self.transact(move |t| {
            let Some(mut request) = t.request(&id)? else {
                return Ok(None);
            };
            let parent = request.agent.as_ref().and_then(|g| g.parent_jti.clone());
            let revoked = rules::lineage_revoked(t, parent.as_deref())?;
            match update(&mut request, revoked) {
                Err(refused) => Ok(Some(Err(refused))),
                Ok(effects) => {
                    rules::put_request(t, &request)?;
                    rules::apply_effects(t, effects)?;
                    Ok(Some(Ok(request)))
                }
            }
        })
        .await
    }

    /// Outbox items, oldest first.
    pub async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.backend.outbox(limit).await
    }

    /// Replaces an outbox item's delivery state, or removes it when `None`.
    pub async fn outbox_update(&self, seq: u64, item: Option<OutboxItem>) -> Result<(), StoreError> {
        self.transact(move |t| match item {
            Some(item) => t.put_outbox(&item),
            None => t.delete_outbox(seq),
        })
        .await
    }

    /// Removes delivered outbox items, in one transaction.
    pub async fn outbox_remove(&self, seqs: Vec<u64>) -> Result<(), StoreError> {
        self.transact(move |t| seqs.iter().try_for_each(|seq| t.delete_outbox(*seq)))
            .await
    }

    /// A stored idempotent response.
    pub async fn idempotency_get(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        self.backend.idempotent(key).await
    }

    /// Stores an idempotent response.
    pub async fn idempotency_put(&self, key: &str, response: IdempotentResponse) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.transact(move |t| t.put_idempotent(&key, &response)).await
    }

    /// Forgets idempotent responses created before `before` (Unix seconds).
    pub async fn idempotency_purge(&self, before: i64) -> Result<(), StoreError> {
        self.transact(move |t| t.purge_idempotent(before)).await
    }

    /// Persists a registration entry with its audit event.
    pub async fn put_entry(&self, entry: Entry, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.put_entry(&entry)?;
            t.changed(topic::ENTRIES)?;
            rules::append_audit(t, event).map(drop)
        })
        .await
    }

    /// Deletes a registration entry with its audit event.
    pub async fn delete_entry(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.transact(move |t| {
            let existed = t.delete_entry(&id)?;
            t.changed(topic::ENTRIES)?;
            rules::append_audit(t, event)?;
            Ok(existed)
        })
        .await
    }

    /// All registration entries, oldest first.
    pub async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        let mut out = self.backend.entries().await?;
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    /// Marks single-use evidence `key` spent until `until`; false when it
    /// already was (and still matters at `now`). Survives restarts.
    pub async fn spend(&self, key: &str, until: i64, now: i64) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.transact(move |t| rules::spend(t, &key, until, now)).await
    }

    /// Retention: forgets what no longer matters. Agent tokens and their
    /// revocations once the token expired (relying parties refuse it then);
    /// decided requests `request_retention` seconds after their deadline.
    pub async fn purge_expired(&self, now: i64, request_retention: i64) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.purge_agent_tokens(now)?;
            t.purge_revocations(now)?;
            t.purge_requests(now - request_retention)
        })
        .await
    }

    /// Forgets spent evidence that stopped mattering before `now`.
    pub async fn spent_purge(&self, now: i64) -> Result<(), StoreError> {
        self.transact(move |t| t.purge_spent(now)).await
    }

    /// Records an issued agent token and its effects in one transaction,
    /// unless a token in its delegation lineage is revoked by then: returns
    /// that token's id and writes nothing.
    pub async fn put_agent_token(
        &self,
        token: AgentToken,
        effects: Effects,
    ) -> Result<Option<String>, StoreError> {
        self.transact(move |t| {
            if let Some(revoked) = rules::lineage_revoked(t, token.parent_jti.as_deref())? {
                return Ok(Some(revoked));
            }
            t.put_agent_token(&token)?;
            rules::apply_effects(t, effects)?;
            Ok(None)
        })
        .await
    }

    /// Agent tokens, newest first: `agent_id`'s, or everyone's; at most
    /// `limit`, and whether more were left out.
    pub async fn agent_tokens(
        &self,
        agent_id: Option<String>,
        limit: usize,
    ) -> Result<(Vec<AgentToken>, bool), StoreError> {
        self.transact(move |t| {
            let mut tokens = match agent_id {
                Some(agent_id) => t.agent_tokens_matching(&RevocationFilter {
                    agent_id: Some(agent_id),
                    ..RevocationFilter::default()
                })?,
                None => t.agent_tokens_all()?,
            };
            tokens.sort_by(|a, b| b.iat.cmp(&a.iat).then_with(|| a.jti.cmp(&b.jti)));
            let more = tokens.len() > limit;
            tokens.truncate(limit);
            Ok((tokens, more))
        })
        .await
    }

    /// One agent token record.
    pub async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        self.backend.agent_token(jti).await
    }

    /// Revokes every live token matching `filter` and all their descendants;
    /// returns the revocations made (already-revoked tokens are skipped).
    /// Audited as `broker.revoked` when anything was revoked.
    pub async fn revoke(
        &self,
        filter: RevocationFilter,
        actor: Actor,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.transact(move |t| {
            let revoked = rules::revoke_cascade(t, &filter, crate::util::now_unix())?;
            let cancelled = rules::cancel_revoked_requests(t, &filter)?;
            if !revoked.is_empty() || !cancelled.is_empty() {
                t.changed(topic::REVOCATIONS)?;
                let event = AuditEvent::new(
                    AuditKind::BrokerRevoked,
                    actor,
                    json!({
                        "filter": filter,
                        "jtis": revoked.iter().map(|r| r.jti.clone()).collect::<Vec<_>>(),
                        "cancelled_requests": cancelled,
                    }),
                );
                rules::append_audit(t, event)?;
            }
            Ok(revoked)
        })
        .await
    }

    /// Whether this gateway runs the once-for-all duties (see
    /// [`Backend::is_leader`]).
    pub fn is_leader(&self) -> bool {
        self.backend.is_leader()
    }

    /// Whether several gateways share this store.
    pub fn shared(&self) -> bool {
        self.backend.changes().is_some()
    }

    /// Records a change to the signer's authorities, telling every gateway.
    pub async fn record_rotation(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.changed(topic::AUTHORITIES)?;
            rules::append_audit(t, event).map(drop)
        })
        .await
    }

    /// Whether the store answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.backend.ping().await
    }

    /// What other gateways changed, if any can (see [`topic`]).
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<String>> {
        self.backend.changes()
    }

    /// Claims `key` for a request about to run, unless it was answered
    /// less than `keep` seconds ago or another request holds it. A claim
    /// older than `lease` seconds (its gateway died) is taken over.
    pub async fn idempotency_claim(
        &self,
        key: &str,
        body_sha256: &str,
        now: i64,
        (lease, keep): (i64, i64),
    ) -> Result<IdempotencyClaim, StoreError> {
        let (key, body_sha256) = (key.to_owned(), body_sha256.to_owned());
        self.transact(move |t| {
            match t.idempotent(&key)? {
                Some(r) if r.status != IDEMPOTENCY_IN_FLIGHT && now - r.created_at < keep => {
                    return Ok(IdempotencyClaim::Answered(r));
                }
                Some(r) if r.status == IDEMPOTENCY_IN_FLIGHT && now - r.created_at < lease => {
                    return Ok(IdempotencyClaim::InFlight);
                }
                _ => {}
            }
            let placeholder = IdempotentResponse {
                body_sha256,
                status: IDEMPOTENCY_IN_FLIGHT,
                body: String::new(),
                content_type: String::new(),
                created_at: now,
                secret: false,
            };
            t.put_idempotent(&key, &placeholder)?;
            Ok(IdempotencyClaim::Claimed)
        })
        .await
    }

    /// Lets go of a claimed key whose request changed nothing.
    pub async fn idempotency_release(&self, key: &str) -> Result<(), StoreError> {
        let key = key.to_owned();
        self.transact(move |t| t.delete_idempotent(&key)).await
    }

    /// Stores a challenge if the table and the client have room for it.
    pub async fn put_challenge(
        &self,
        challenge: ChallengeRecord,
        max_live: u64,
        max_per_client: u64,
        now: i64,
    ) -> Result<ChallengeRoom, StoreError> {
        // A flood past the limits is refused on a read: only a challenge
        // that may fit takes the write lock every gateway shares.
        let (live, mine) = self
            .backend
            .challenge_counts(challenge.client.as_deref(), now)
            .await?;
        if challenge.client.is_some() && mine >= max_per_client {
            return Ok(ChallengeRoom::ClientFull);
        }
        if live >= max_live {
            return Ok(ChallengeRoom::Full);
        }
        self.transact(move |t| {
            let client = challenge.client.as_deref();
            let (mut live, mut mine) = t.count_challenges(client, now)?;
            if live >= max_live {
                t.purge_challenges(now)?;
                (live, mine) = t.count_challenges(client, now)?;
            }
            if client.is_some() && mine >= max_per_client {
                return Ok(ChallengeRoom::ClientFull);
            }
            if live >= max_live {
                return Ok(ChallengeRoom::Full);
            }
            t.put_challenge(&challenge)?;
            Ok(ChallengeRoom::Stored)
        })
        .await
    }

    /// Takes the challenge `id` if it is live at `now`: it can never be
    /// taken again. An id the store does not hold, or holds expired, is
    /// answered on a read, without the write lock (evidence naming made-up
    /// ids costs no write); the purge forgets expired ones.
    pub async fn take_challenge(&self, id: &str, now: i64) -> Result<Option<ChallengeRecord>, StoreError> {
        if self
            .backend
            .challenge(id)
            .await?
            .is_none_or(|c| c.expires_at < now)
        {
            return Ok(None);
        }
        let id = id.to_owned();
        self.transact(move |t| t.take_challenge(&id)).await
    }

    /// Forgets challenges that expired before `now`.
    pub async fn purge_challenges(&self, now: i64) -> Result<(), StoreError> {
        self.transact(move |t| t.purge_challenges(now)).await
    }

    /// Keeps a pushed bundle, with its audit event, for every gateway.
    pub async fn put_bundle(&self, bundle: StoredBundle, event: AuditEvent) -> Result<(), StoreError> {
        self.transact(move |t| {
            t.put_bundle(&bundle)?;
            t.changed(topic::BUNDLES)?;
            rules::append_audit(t, event).map(drop)
        })
        .await
    }

    /// Every bundle pushed through the API, by name.
    pub async fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        let mut out = self.backend.bundles().await?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The revocation feed after `cursor`.
    pub async fn revocations(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<Revocation>, StoreError> {
        self.backend.revocations(limit, parse_cursor(cursor)?).await
    }
}
