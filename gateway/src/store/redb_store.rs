//! The embedded redb store. One writer thread owns every write transaction
//! and commits in groups: whatever writes queued up while the previous commit
//! was syncing go into the next transaction, so many issuances share one
//! fsync and each caller still hears back only after its data is durable.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use super::{AuditEvent, AuditRecord, CertificateRecord, Page, Store, StoreError, genesis_hash};
use crate::trust::TrustSource;

const CERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const TRUST_SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("trust_sources");

/// Most writes folded into one transaction.
const MAX_GROUP: usize = 512;

enum Op {
    Issue(CertificateRecord, AuditEvent),
    Audit(AuditEvent),
    PutTrustSource(TrustSource, AuditEvent),
    DeleteTrustSource(String, AuditEvent),
}

type Reply = oneshot::Sender<Result<bool, StoreError>>;

/// redb-backed [`Store`].
pub struct RedbStore {
    db: Arc<Database>,
    writer: mpsc::Sender<(Op, Reply)>,
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

    async fn submit(&self, op: Op) -> Result<bool, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send((op, tx)).map_err(|_| StoreError::Closed)?;
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

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<(Op, Reply)>) {
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

    /// Applies a group in one transaction. If the commit fails, every caller
    /// in the group hears the error and the audit head is not advanced.
    fn commit_group(&mut self, batch: Vec<(Op, Reply)>) {
        let (seq0, hash0) = (self.head_seq, self.head_hash.clone());
        let mut results = Vec::with_capacity(batch.len());
        let outcome = (|| -> Result<(), StoreError> {
            let txn = self.db.begin_write().map_err(backend)?;
            {
                let mut certs = txn.open_table(CERTS).map_err(backend)?;
                let mut audit = txn.open_table(AUDIT).map_err(backend)?;
                let mut sources = txn.open_table(TRUST_SOURCES).map_err(backend)?;
                let mut next_cert = certs
                    .last()
                    .map_err(backend)?
                    .map(|(k, _)| k.value())
                    .unwrap_or(0);
                for (op, _) in &batch {
                    let (event, result) = match op {
                        Op::Issue(cert, event) => {
                            next_cert += 1;
                            let bytes = serde_json::to_vec(cert).map_err(backend)?;
                            certs.insert(next_cert, bytes.as_slice()).map_err(backend)?;
                            (event, true)
                        }
                        Op::Audit(event) => (event, true),
                        Op::PutTrustSource(source, event) => {
                            let bytes = serde_json::to_vec(source).map_err(backend)?;
                            sources
                                .insert(source.id.as_str(), bytes.as_slice())
                                .map_err(backend)?;
                            (event, true)
                        }
                        Op::DeleteTrustSource(id, event) => {
                            let existed = sources.remove(id.as_str()).map_err(backend)?.is_some();
                            (event, existed)
                        }
                    };
                    let record = self.chain(event.clone());
                    let bytes = serde_json::to_vec(&record).map_err(backend)?;
                    audit.insert(record.seq, bytes.as_slice()).map_err(backend)?;
                    results.push(result);
                }
            }
            txn.commit().map_err(backend)
        })();
        match outcome {
            Ok(()) => {
                for ((_, reply), result) in batch.into_iter().zip(results) {
                    let _ = reply.send(Ok(result));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; {} writes refused", batch.len());
                self.head_seq = seq0;
                self.head_hash = hash0;
                for (_, reply) in batch {
                    let _ = reply.send(Err(StoreError::Backend(e.to_string())));
                }
            }
        }
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
        self.submit(Op::Issue(cert, event)).await.map(drop)
    }

    async fn audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.submit(Op::Audit(event)).await.map(drop)
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
        self.submit(Op::PutTrustSource(source, event)).await.map(drop)
    }

    async fn delete_trust_source(&self, id: &str, event: AuditEvent) -> Result<bool, StoreError> {
        self.submit(Op::DeleteTrustSource(id.to_owned(), event)).await
    }

    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(backend)?;
            let t = read.open_table(TRUST_SOURCES).map_err(backend)?;
            let mut out: Vec<TrustSource> = Vec::new();
            for entry in t.iter().map_err(backend)? {
                let (_, v) = entry.map_err(backend)?;
                out.push(serde_json::from_slice(v.value()).map_err(backend)?);
            }
            out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
            Ok(out)
        })
        .await
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
}
