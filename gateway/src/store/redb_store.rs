//! The embedded redb store. One writer thread owns every write transaction
//! and commits in groups: whatever writes queued up while the previous commit
//! was syncing go into the next transaction, so many issuances share one
//! fsync and each caller still hears back only after its data is durable.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::{
    AuditEvent, AuditRecord, CertificateRecord, Effects, IdempotentResponse, OutboxItem, Page, RequestUpdate,
    Store, StoreError, genesis_hash,
};
use crate::approvals::{ApprovalError, Request, State};
use crate::auth::TokenRecord;
use crate::broker::{AgentToken, Revocation, RevocationFilter};
use crate::trust::TrustSource;

const CERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const TRUST_SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("trust_sources");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("ephemeral_requests");
/// Ids of pending requests, so sweeps and approver listings do not scan
/// every request ever made. Kept in step by `Tables::put_request`.
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("ephemeral_pending");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const AGENT_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_tokens");
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("registration_entries");
const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Single-use evidence already spent: key -> Unix seconds until it matters.
const SPENT: TableDefinition<&str, i64> = TableDefinition::new("spent_evidence");

/// Most writes folded into one transaction.
const MAX_GROUP: usize = 512;

type Ack = oneshot::Sender<Result<bool, StoreError>>;
type UpdateReply = oneshot::Sender<Result<Result<Request, ApprovalError>, StoreError>>;

enum Op {
    Issue(CertificateRecord, AuditEvent, Ack),
    Audit(AuditEvent, Ack),
    PutTrustSource(TrustSource, AuditEvent, Ack),
    DeleteTrustSource(String, AuditEvent, Ack),
    PutToken(TokenRecord, AuditEvent, Ack),
    CreateRequest(Box<Request>, Effects, Ack),
    UpdateRequest(String, RequestUpdate, UpdateReply),
    Outbox(u64, Option<OutboxItem>, Ack),
    Idempotency(String, IdempotentResponse, Ack),
    PurgeIdempotency(i64, Ack),
    PurgeSpent(i64, Ack),
    PutAgentToken(Box<AgentToken>, Effects, Ack),
    PutEntry(Box<crate::workload_api::Entry>, AuditEvent, Ack),
    DeleteEntry(String, AuditEvent, Ack),
    Spend(String, i64, i64, Ack),
    Revoke(
        RevocationFilter,
        String,
        oneshot::Sender<Result<Vec<Revocation>, StoreError>>,
    ),
}

/// Sends an op's answer once the group's commit outcome is known.
type Finish = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// redb-backed [`Store`].
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<Op>,
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) the database file and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        // Create the tables so readers never meet a missing one.
        let txn = db.begin_write().map_err(backend)?;
        {
            txn.open_table(CERTS).map_err(backend)?;
            txn.open_table(AUDIT).map_err(backend)?;
            txn.open_table(TRUST_SOURCES).map_err(backend)?;
            txn.open_table(TOKENS).map_err(backend)?;
            txn.open_table(REQUESTS).map_err(backend)?;
            txn.open_table(PENDING).map_err(backend)?;
            txn.open_table(OUTBOX).map_err(backend)?;
            txn.open_table(IDEMPOTENCY).map_err(backend)?;
            txn.open_table(AGENT_TOKENS).map_err(backend)?;
            txn.open_table(ENTRIES).map_err(backend)?;
            txn.open_table(SPENT).map_err(backend)?;
            txn.open_table(REVOCATIONS).map_err(backend)?;
        }
        txn.commit().map_err(backend)?;
        let (head_seq, head_hash) = {
            let read = db.begin_read().map_err(backend)?;
            let audit = read.open_table(AUDIT).map_err(backend)?;
            match audit.last().map_err(backend)? {
                Some((k, v)) => {
                    let rec: AuditRecord = serde_json::from_slice(v.value()).map_err(backend)?;
                    (k.value(), rec.hash)
                }
                None => (0, genesis_hash()),
            }
        };
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("castellan-store-writer".into())
            .spawn(move || {
                Writer {
                    db: writer_db,
                    head_seq,
                    head_hash,
                }
                .run(rx)
            })
            .map_err(backend)?;
        Ok(Self { db, writer: tx })
    }

    async fn submit(&self, op: impl FnOnce(Ack) -> Op) -> Result<bool, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send(op(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(backend)?
    }
}

struct Writer {
    db: Arc<Database>,
    head_seq: u64,
    head_hash: String,
}

/// Every table, open in one write transaction.
struct Tables<'txn> {
    certs: redb::Table<'txn, u64, &'static [u8]>,
    audit: redb::Table<'txn, u64, &'static [u8]>,
    sources: redb::Table<'txn, &'static str, &'static [u8]>,
    tokens: redb::Table<'txn, &'static str, &'static [u8]>,
    requests: redb::Table<'txn, &'static str, &'static [u8]>,
    pending: redb::Table<'txn, &'static str, ()>,
    outbox: redb::Table<'txn, u64, &'static [u8]>,
    idempotency: redb::Table<'txn, &'static str, &'static [u8]>,
    agent_tokens: redb::Table<'txn, &'static str, &'static [u8]>,
    entries: redb::Table<'txn, &'static str, &'static [u8]>,
    revocations: redb::Table<'txn, u64, &'static [u8]>,
    spent: redb::Table<'txn, &'static str, i64>,
}

impl Tables<'_> {
    fn put_agent_token(&mut self, token: &AgentToken) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(token).map_err(backend)?;
        self.agent_tokens
            .insert(token.jti.as_str(), bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    /// Marks matching live tokens and, transitively, every token whose parent
    /// was revoked. One scan per generation: chains are short (policy caps
    /// their depth).
    fn revoke(&mut self, filter: &RevocationFilter) -> Result<Vec<Revocation>, StoreError> {
        let now = crate::util::now_unix();
        let mut all: Vec<AgentToken> = Vec::new();
        for entry in self.agent_tokens.iter().map_err(backend)? {
            let (_, v) = entry.map_err(backend)?;
            all.push(serde_json::from_slice(v.value()).map_err(backend)?);
        }
        let mut revoked_now: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|t| t.revoked_at.is_none() && filter.matches(t))
            .map(|t| t.jti.clone())
            .collect();
        loop {
            let children: Vec<String> = all
                .iter()
                .filter(|t| t.revoked_at.is_none() && !revoked_now.contains(&t.jti))
                .filter(|t| t.parent_jti.as_ref().is_some_and(|p| revoked_now.contains(p)))
                .map(|t| t.jti.clone())
                .collect();
            if children.is_empty() {
                break;
            }
            revoked_now.extend(children);
        }
        let at = crate::util::rfc3339(time::OffsetDateTime::now_utc());
        let mut out = Vec::new();
        let mut seq = self
            .revocations
            .last()
            .map_err(backend)?
            .map(|(k, _)| k.value())
            .unwrap_or(0);
        for mut t in all.into_iter().filter(|t| revoked_now.contains(&t.jti)) {
            t.revoked_at = Some(at.clone());
            self.put_agent_token(&t)?;
            // Expired tokens need no feed entry: relying parties reject them anyway.
            if t.exp <= now {
                continue;
            }
            seq += 1;
            let r = Revocation {
                seq,
                jti: t.jti.clone(),
                agent_id: t.agent_id.clone(),
                exp: t.exp,
                revoked_at: at.clone(),
            };
            let bytes = serde_json::to_vec(&r).map_err(backend)?;
            self.revocations.insert(seq, bytes.as_slice()).map_err(backend)?;
            out.push(r);
        }
        Ok(out)
    }

    fn insert_cert(&mut self, cert: &CertificateRecord) -> Result<(), StoreError> {
        let next = self
            .certs
            .last()
            .map_err(backend)?
            .map(|(k, _)| k.value())
            .unwrap_or(0)
            + 1;
        let bytes = serde_json::to_vec(cert).map_err(backend)?;
        self.certs.insert(next, bytes.as_slice()).map_err(backend)?;
        Ok(())
    }

    fn put_request(&mut self, request: &Request) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(request).map_err(backend)?;
        self.requests
            .insert(request.id.as_str(), bytes.as_slice())
            .map_err(backend)?;
        if request.state == State::Pending {
            self.pending.insert(request.id.as_str(), ()).map_err(backend)?;
        } else {
            self.pending.remove(request.id.as_str()).map_err(backend)?;
        }
        Ok(())
    }
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            self.commit_group(batch);
        }
    }

    /// Applies a group in one transaction, in arrival order, so each op sees
    /// the writes of those before it. If the commit fails, every caller in
    /// the group hears the error and the audit head is not advanced.
    fn commit_group(&mut self, batch: Vec<Op>) {
        let (seq0, hash0) = (self.head_seq, self.head_hash.clone());
        let mut finishers: Vec<Finish> = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), StoreError> {
            let txn = self.db.begin_write().map_err(backend)?;
            {
                let mut t = Tables {
                    certs: txn.open_table(CERTS).map_err(backend)?,
                    audit: txn.open_table(AUDIT).map_err(backend)?,
                    sources: txn.open_table(TRUST_SOURCES).map_err(backend)?,
                    tokens: txn.open_table(TOKENS).map_err(backend)?,
                    requests: txn.open_table(REQUESTS).map_err(backend)?,
                    pending: txn.open_table(PENDING).map_err(backend)?,
                    outbox: txn.open_table(OUTBOX).map_err(backend)?,
                    idempotency: txn.open_table(IDEMPOTENCY).map_err(backend)?,
                    agent_tokens: txn.open_table(AGENT_TOKENS).map_err(backend)?,
                    entries: txn.open_table(ENTRIES).map_err(backend)?,
                    revocations: txn.open_table(REVOCATIONS).map_err(backend)?,
                    spent: txn.open_table(SPENT).map_err(backend)?,
                };
                for op in batch {
                    finishers.push(self.apply(&mut t, op)?);
                }
            }
            txn.commit().map_err(backend)
        })();
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "store commit failed; {} writes refused", finishers.len());
            self.head_seq = seq0;
            self.head_hash = hash0;
        }
        // Ops queued after a failure inside the closure never got a finisher;
        // their senders drop and callers see `Closed`.
        for finish in finishers {
            finish(outcome.as_ref().map(|_| ()));
        }
    }

    fn ack(reply: Ack, result: bool) -> Finish {
        Box::new(move |outcome| {
            let _ = reply.send(
                outcome
                    .map(|_| result)
                    .map_err(|e| StoreError::Backend(e.to_string())),
            );
        })
    }

    /// Writes one op into the open transaction and returns how to answer it.
    fn apply(&mut self, t: &mut Tables<'_>, op: Op) -> Result<Finish, StoreError> {
        Ok(match op {
            Op::Issue(cert, event, reply) => {
                t.insert_cert(&cert)?;
                self.append(t, event)?;
                Self::ack(reply, true)
            }
            Op::Audit(event, reply) => {
                self.append(t, event)?;
                Self::ack(reply, true)
            }
            Op::PutTrustSource(source, event, reply) => {
                let bytes = serde_json::to_vec(&source).map_err(backend)?;
                t.sources
                    .insert(source.id.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                self.append(t, event)?;
                Self::ack(reply, true)
            }
            Op::DeleteTrustSource(id, event, reply) => {
                let existed = t.sources.remove(id.as_str()).map_err(backend)?.is_some();
                self.append(t, event)?;
                Self::ack(reply, existed)
            }
            Op::PutToken(record, event, reply) => {
                let bytes = serde_json::to_vec(&record).map_err(backend)?;
                t.tokens
                    .insert(record.token_sha256.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                self.append(t, event)?;
                Self::ack(reply, true)
            }
            Op::CreateRequest(request, effects, reply) => {
                t.put_request(&request)?;
                self.effects(t, effects)?;
                Self::ack(reply, true)
            }
            Op::UpdateRequest(id, update, reply) => {
                let current = match t.requests.get(id.as_str()).map_err(backend)? {
                    Some(v) => Some(serde_json::from_slice::<Request>(v.value()).map_err(backend)?),
                    None => None,
                };
                let Some(mut request) = current else {
                    return Ok(Box::new(move |_| {
                        let _ = reply.send(Ok(Err(ApprovalError::NotFound)));
                    }));
                };
                match update(&mut request) {
                    Err(refusal) => Box::new(move |_| {
                        let _ = reply.send(Ok(Err(refusal)));
                    }),
                    Ok(effects) => {
                        t.put_request(&request)?;
                        self.effects(t, effects)?;
                        Box::new(move |outcome| {
                            let _ = reply.send(
                                outcome
                                    .map(|_| Ok(request))
                                    .map_err(|e| StoreError::Backend(e.to_string())),
                            );
                        })
                    }
                }
            }
            Op::Outbox(seq, item, reply) => {
                match item {
                    Some(item) => {
                        let bytes = serde_json::to_vec(&item).map_err(backend)?;
                        t.outbox.insert(seq, bytes.as_slice()).map_err(backend)?;
                    }
                    None => {
                        t.outbox.remove(seq).map_err(backend)?;
                    }
                }
                Self::ack(reply, true)
            }
            Op::PutEntry(entry, event, reply) => {
                let bytes = serde_json::to_vec(&entry).map_err(backend)?;
                t.entries
                    .insert(entry.id.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                self.append(t, event)?;
                Self::ack(reply, true)
            }
            Op::DeleteEntry(id, event, reply) => {
                let existed = t.entries.remove(id.as_str()).map_err(backend)?.is_some();
                self.append(t, event)?;
                Self::ack(reply, existed)
            }
            Op::Spend(key, until, now, reply) => {
                let live = t
                    .spent
                    .get(key.as_str())
                    .map_err(backend)?
                    .is_some_and(|v| v.value() >= now);
                if !live {
                    t.spent.insert(key.as_str(), until).map_err(backend)?;
                }
                Self::ack(reply, !live)
            }
            Op::PutAgentToken(token, effects, reply) => {
                t.put_agent_token(&token)?;
                self.effects(t, effects)?;
                Self::ack(reply, true)
            }
            Op::Revoke(filter, actor, reply) => {
                let revoked = t.revoke(&filter)?;
                if !revoked.is_empty() {
                    let event = AuditEvent {
                        kind: "broker.revoked".into(),
                        actor,
                        detail: serde_json::json!({
                            "filter": filter,
                            "jtis": revoked.iter().map(|r| r.jti.clone()).collect::<Vec<_>>(),
                        }),
                    };
                    self.append(t, event)?;
                }
                Box::new(move |outcome| {
                    let _ = reply.send(
                        outcome
                            .map(|_| revoked)
                            .map_err(|e| StoreError::Backend(e.to_string())),
                    );
                })
            }
            Op::PurgeIdempotency(before, reply) => {
                t.idempotency
                    .retain(|_, v| {
                        serde_json::from_slice::<IdempotentResponse>(v)
                            .map(|r| r.created_at >= before)
                            .unwrap_or(false)
                    })
                    .map_err(backend)?;
                Self::ack(reply, true)
            }
            Op::PurgeSpent(now, reply) => {
                t.spent.retain(|_, until| until >= now).map_err(backend)?;
                Self::ack(reply, true)
            }
            Op::Idempotency(key, response, reply) => {
                let bytes = serde_json::to_vec(&response).map_err(backend)?;
                t.idempotency
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(backend)?;
                Self::ack(reply, true)
            }
        })
    }

    fn effects(&mut self, t: &mut Tables<'_>, effects: Effects) -> Result<(), StoreError> {
        for cert in &effects.certificates {
            t.insert_cert(cert)?;
        }
        for token in &effects.agent_tokens {
            t.put_agent_token(token)?;
        }
        for event in effects.audit {
            self.append(t, event)?;
        }
        for notification in effects.notify {
            let seq = t
                .outbox
                .last()
                .map_err(backend)?
                .map(|(k, _)| k.value())
                .unwrap_or(0)
                + 1;
            let item = OutboxItem {
                seq,
                id: uuid::Uuid::new_v4().to_string(),
                notification,
                created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
                done: Vec::new(),
                attempts: Default::default(),
                next_attempt_at: 0,
            };
            let bytes = serde_json::to_vec(&item).map_err(backend)?;
            t.outbox.insert(seq, bytes.as_slice()).map_err(backend)?;
        }
        Ok(())
    }

    fn append(&mut self, t: &mut Tables<'_>, event: AuditEvent) -> Result<(), StoreError> {
        let record = self.chain(event);
        let bytes = serde_json::to_vec(&record).map_err(backend)?;
        t.audit.insert(record.seq, bytes.as_slice()).map_err(backend)?;
        Ok(())
    }

    fn chain(&mut self, event: AuditEvent) -> AuditRecord {
        let mut record = AuditRecord {
            seq: self.head_seq + 1,
            at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
            event,
            prev_hash: self.head_hash.clone(),
            hash: String::new(),
        };
        record.hash = record.compute_hash();
        self.head_seq = record.seq;
        self.head_hash = record.hash.clone();
        record
    }
}

fn all_values<T: serde::de::DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<T>, StoreError> {
    let read = db.begin_read().map_err(backend)?;
    let t = read.open_table(table).map_err(backend)?;
    let mut out = Vec::new();
    for entry in t.iter().map_err(backend)? {
        let (_, v) = entry.map_err(backend)?;
        out.push(serde_json::from_slice(v.value()).map_err(backend)?);
    }
    Ok(out)
}

fn parse_cursor(cursor: Option<&str>) -> Result<u64, StoreError> {
    match cursor {
        None => Ok(0),
        Some(c) => c
            .parse()
            .map_err(|_| StoreError::Backend("invalid cursor".into())),
    }
}

fn page<T: serde::de::DeserializeOwned>(
    db: &Database,
    table: TableDefinition<u64, &[u8]>,
    limit: usize,
    after: u64,
) -> Result<Page<T>, StoreError> {
    let read = db.begin_read().map_err(backend)?;
    let t = read.open_table(table).map_err(backend)?;
    let mut items = Vec::with_capacity(limit.min(1000));
    let mut last = None;
    let mut more = false;
    for entry in t.range(after.saturating_add(1)..).map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(serde_json::from_slice(v.value()).map_err(backend)?);
        last = Some(k.value());
    }
    Ok(Page {
        items,
        next_cursor: if more { last.map(|l| l.to_string()) } else { None },
    })
}

#[async_trait::async_trait]
impl Store for RedbStore {
    async fn record_issuance(&self, cert: CertificateRecord, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(|r| Op::Issue(cert, event, r)).await.map(drop)
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(|r| Op::Audit(event, r)).await.map(drop)
    }

    async fn list_certificates(
        &self,
        limit: usize,
        cursor: Option<&str>,
    ) -> Result<Page<CertificateRecord>, StoreError> {
        let after = parse_cursor(cursor)?;
        self.read(move |db| page(db, CERTS, limit, after)).await
    }

    async fn count_certificates(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(backend)?;
            read.open_table(CERTS).map_err(backend)?.len().map_err(backend)
        })
        .await
    }

    async fn list_audit(&self, limit: usize, cursor: Option<&str>) -> Result<Page<AuditRecord>, StoreError> {
        let after = parse_cursor(cursor)?;
        self.read(move |db| page(db, AUDIT, limit, after)).await
    }

    async fn put_trust_source(&self, source: TrustSource, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(|r| Op::PutTrustSource(source, event, r))
            .await
            .map(drop)
    }

    async fn delete_trust_source(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError> {
        self.submit(|r| Op::DeleteTrustSource(id.to_owned(), event, r))
            .await
    }

    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        let mut out: Vec<TrustSource> = self.read(|db| all_values(db, TRUST_SOURCES)).await?;
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    async fn verify_audit_chain(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(backend)?;
            let t = read.open_table(AUDIT).map_err(backend)?;
            let mut prev = genesis_hash();
            let mut n = 0;
            for entry in t.iter().map_err(backend)? {
                let (k, v) = entry.map_err(backend)?;
                let rec: AuditRecord = serde_json::from_slice(v.value()).map_err(backend)?;
                if rec.seq != k.value() || rec.prev_hash != prev || rec.compute_hash() != rec.hash {
                    return Err(StoreError::ChainBroken(k.value()));
                }
                prev = rec.hash;
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    async fn put_token(&self, record: TokenRecord, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(|r| Op::PutToken(record, event, r)).await.map(drop)
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|db| all_values(db, TOKENS)).await
    }

    async fn create_request(&self, request: Request, effects: Effects) -> Result<(), StoreError> {
        self.submit(|r| Op::CreateRequest(Box::new(request), effects, r))
            .await
            .map(drop)
    }

    async fn get_request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        let id = id.to_owned();
        self.read(move |db| {
            let read = db.begin_read().map_err(backend)?;
            let t = read.open_table(REQUESTS).map_err(backend)?;
            match t.get(id.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(backend)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list_requests(&self, state: Option<State>) -> Result<Vec<Request>, StoreError> {
        let mut all: Vec<Request> = if state == Some(State::Pending) {
            self.read(|db| {
                let read = db.begin_read().map_err(backend)?;
                let pending = read.open_table(PENDING).map_err(backend)?;
                let requests = read.open_table(REQUESTS).map_err(backend)?;
                let mut out = Vec::new();
                for entry in pending.iter().map_err(backend)? {
                    let (id, _) = entry.map_err(backend)?;
                    if let Some(v) = requests.get(id.value()).map_err(backend)? {
                        out.push(serde_json::from_slice(v.value()).map_err(backend)?);
                    }
                }
                Ok(out)
            })
            .await?
        } else {
            self.read(|db| all_values(db, REQUESTS)).await?
        };
        if let Some(state) = state {
            all.retain(|r| r.state == state);
        }
        all.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(all)
    }

    async fn update_request(
        &self,
        id: &str,
        update: RequestUpdate,
    ) -> Result<Result<Request, ApprovalError>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Op::UpdateRequest(id.to_owned(), update, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.read(move |db| page(db, OUTBOX, limit, 0).map(|p| p.items))
            .await
    }

    async fn outbox_update(&self, seq: u64, item: Option<OutboxItem>) -> Result<(), StoreError> {
        self.submit(|r| Op::Outbox(seq, item, r)).await.map(drop)
    }

    async fn idempotency_get(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        let key = key.to_owned();
        self.read(move |db| {
            let read = db.begin_read().map_err(backend)?;
            let t = read.open_table(IDEMPOTENCY).map_err(backend)?;
            match t.get(key.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(backend)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn put_entry(
        &self,
        entry: crate::workload_api::Entry,
        event: AuditEvent,
    ) -> Result<(), StoreError> {
        self.submit(|r| Op::PutEntry(Box::new(entry), event, r))
            .await
            .map(drop)
    }

    async fn delete_entry(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError> {
        self.submit(|r| Op::DeleteEntry(id.to_owned(), event, r)).await
    }

    async fn entries(&self) -> Result<Vec<crate::workload_api::Entry>, StoreError> {
        let mut out: Vec<crate::workload_api::Entry> = self.read(|db| all_values(db, ENTRIES)).await?;
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    async fn spend(&self, key: &str, until: i64, now: i64) -> Result<bool, StoreError> {
        self.submit(|r| Op::Spend(key.to_owned(), until, now, r)).await
    }

    async fn spent_purge(&self, now: i64) -> Result<(), StoreError> {
        self.submit(|r| Op::PurgeSpent(now, r)).await.map(drop)
    }

    async fn put_agent_token(&self, token: AgentToken, effects: Effects) -> Result<(), StoreError> {
        self.submit(|r| Op::PutAgentToken(Box::new(token), effects, r))
            .await
            .map(drop)
    }

    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        let jti = jti.to_owned();
        self.read(move |db| {
            let read = db.begin_read().map_err(backend)?;
            let t = read.open_table(AGENT_TOKENS).map_err(backend)?;
            match t.get(jti.as_str()).map_err(backend)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(backend)?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn revoke(&self, filter: RevocationFilter, actor: String) -> Result<Vec<Revocation>, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer
            .send(Op::Revoke(filter, actor, tx))
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn revocations(&self, limit: usize, cursor: Option<&str>) -> Result<Page<Revocation>, StoreError> {
        let after = parse_cursor(cursor)?;
        self.read(move |db| page(db, REVOCATIONS, limit, after)).await
    }

    async fn idempotency_purge(&self, before: i64) -> Result<(), StoreError> {
        self.submit(|r| Op::PurgeIdempotency(before, r)).await.map(drop)
    }

    async fn idempotency_put(&self, key: &str, response: IdempotentResponse) -> Result<(), StoreError> {
        self.submit(|r| Op::Idempotency(key.to_owned(), response, r))
            .await
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: &str) -> AuditEvent {
        AuditEvent {
            kind: kind.into(),
            actor: "test".into(),
            detail: serde_json::json!({"n": 1}),
        }
    }

    fn cert(serial: &str) -> CertificateRecord {
        CertificateRecord {
            serial: serial.into(),
            spiffe_id: "spiffe://example.org/a".into(),
            not_before: "2026-01-01T00:00:00Z".into(),
            not_after: "2026-01-01T01:00:00Z".into(),
            source: "test".into(),
            method: "k8s_sat".into(),
            subject: "ns/a/sa/b".into(),
            public_key_sha256: "00".into(),
            issued_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn concurrent_writes_chain_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("castellan.redb");
        {
            let store = Arc::new(RedbStore::open(&path).unwrap());
            let mut tasks = Vec::new();
            for i in 0..50 {
                let s = store.clone();
                tasks.push(tokio::spawn(async move {
                    s.record_issuance(cert(&format!("{i:02x}")), event("issuance.issued"))
                        .await
                }));
            }
            for t in tasks {
                t.await.unwrap().unwrap();
            }
            store.audit(event("issuance.refused")).await.unwrap();
            assert_eq!(store.verify_audit_chain().await.unwrap(), 51);
        }
        // The writer thread still holds the database until its channel closes.
        let store = loop {
            match RedbStore::open(&path) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        assert_eq!(store.count_certificates().await.unwrap(), 50);
        store.audit(event("after.reopen")).await.unwrap();
        assert_eq!(store.verify_audit_chain().await.unwrap(), 52);

        let first = store.list_certificates(20, None).await.unwrap();
        assert_eq!(first.items.len(), 20);
        let cursor = first.next_cursor.unwrap();
        let second = store.list_certificates(40, Some(&cursor)).await.unwrap();
        assert_eq!(second.items.len(), 30);
        assert!(second.next_cursor.is_none());
    }

    #[tokio::test]
    async fn idempotency_keys_are_forgotten_after_their_day() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        let saved = |created_at| IdempotentResponse {
            body_sha256: "h".into(),
            status: 201,
            body: "{}".into(),
            content_type: "application/json".into(),
            created_at,
        };
        store.idempotency_put("old", saved(100)).await.unwrap();
        store.idempotency_put("new", saved(10_000)).await.unwrap();
        store.idempotency_purge(5_000).await.unwrap();
        assert!(store.idempotency_get("old").await.unwrap().is_none());
        assert_eq!(store.idempotency_get("new").await.unwrap(), Some(saved(10_000)));
    }

    #[tokio::test]
    async fn spent_evidence_is_forgotten_once_it_stops_mattering() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        assert!(store.spend("m\0old", 100, 50).await.unwrap());
        assert!(store.spend("m\0new", 10_000, 50).await.unwrap());
        store.spent_purge(5_000).await.unwrap();
        let read = store.db.begin_read().unwrap();
        let t = read.open_table(SPENT).unwrap();
        assert!(t.get("m\0old").unwrap().is_none());
        assert_eq!(t.get("m\0new").unwrap().map(|v| v.value()), Some(10_000));
        drop((t, read));
        // Still spent while it matters.
        assert!(!store.spend("m\0new", 10_000, 6_000).await.unwrap());
    }
}
