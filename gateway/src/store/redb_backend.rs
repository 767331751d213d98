//! The embedded redb backend. One writer thread owns every write
//! transaction and commits in groups: whatever work queued up while the
//! previous commit was syncing goes into the next transaction, so many
//! issuances share one fsync and each caller still hears back only after its
//! data is durable.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

use super::group::{self, Job};
use super::{
    AuditRecord, Backend, CertificateRecord, ChallengeRecord, IdempotentResponse, OutboxItem, Page,
    StoreError, StoredBundle, Txn, Work,
};
use crate::model::{AgentToken, Entry, Request, Revocation, RevocationFilter, TokenRecord, TrustSource};

const CERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
const TRUST_SOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("trust_sources");
const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_tokens");
const REQUESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("ephemeral_requests");
/// The index of open (pending or approved) requests the shared layer keeps
/// in step with request states. The table keeps its first name.
const PENDING: TableDefinition<&str, ()> = TableDefinition::new("ephemeral_pending");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const AGENT_TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("agent_tokens");
const ENTRIES: TableDefinition<&str, &[u8]> = TableDefinition::new("registration_entries");
const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
const IDEMPOTENCY: TableDefinition<&str, &[u8]> = TableDefinition::new("idempotency");
/// Single-use evidence already spent: key -> Unix seconds until it matters.
const SPENT: TableDefinition<&str, i64> = TableDefinition::new("spent_evidence");
/// The audit chain's head, `<seq> <hash>`, kept beside the log so that an
/// append reads a few bytes rather than decoding the last record.
const AUDIT_HEAD: TableDefinition<&str, &str> = TableDefinition::new("audit_head");
/// The revocation cascade's index: `<parent jti>\0<child jti>`.
const AGENT_CHILDREN: TableDefinition<&str, ()> = TableDefinition::new("agent_token_children");
const HEAD_KEY: &str = "head";
const CHALLENGES: TableDefinition<&str, &[u8]> = TableDefinition::new("challenges");
/// The per-client index of challenges: `<client>\0<id>` -> expiry.
const CHALLENGE_CLIENTS: TableDefinition<&str, i64> = TableDefinition::new("challenge_clients");
const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("bundles");

/// redb-backed [`Backend`].
pub struct RedbBackend {
    db: Arc<Database>,
    writer: mpsc::Sender<Job>,
}

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Decode { what, source })
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

impl RedbBackend {
    /// Opens (or creates) the database file and starts the writer thread.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            source: Box::new(e),
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
            txn.open_table(AUDIT_HEAD).map_err(backend)?;
            txn.open_table(CHALLENGES).map_err(backend)?;
            txn.open_table(CHALLENGE_CLIENTS).map_err(backend)?;
            txn.open_table(BUNDLES).map_err(backend)?;
            // A store written before the children index had it: build it.
            let mut children = txn.open_table(AGENT_CHILDREN).map_err(backend)?;
            if children.is_empty().map_err(backend)? {
                let tokens = txn.open_table(AGENT_TOKENS).map_err(backend)?;
                for row in tokens.iter().map_err(backend)? {
                    let (_, v) = row.map_err(backend)?;
                    let token: AgentToken = decode("agent token", v.value())?;
                    if let Some(parent) = &token.parent_jti {
                        children
                            .insert(child_key(parent, &token.jti).as_str(), ())
                            .map_err(backend)?;
                    }
                }
            }
        }
        txn.commit().map_err(backend)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("castellan-store-writer".into())
            .spawn(move || run_writer(&writer_db, rx))
            .map_err(backend)?;
        Ok(Self { db, writer: tx })
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

fn run_writer(db: &Database, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let (work, replies) = group::gather(first, &rx);
        let outcome = (|| -> Result<(), StoreError> {
            let txn = db.begin_write().map_err(backend)?;
            group::run(work, &mut Tables::open(&txn)?)?;
            txn.commit().map_err(backend)
        })();
        group::reply(replies, &outcome);
    }
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
    audit_head: redb::Table<'txn, &'static str, &'static str>,
    children: redb::Table<'txn, &'static str, ()>,
    challenges: redb::Table<'txn, &'static str, &'static [u8]>,
    challenge_clients: redb::Table<'txn, &'static str, i64>,
    bundles: redb::Table<'txn, &'static str, &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, StoreError> {
        Ok(Self {
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
            audit_head: txn.open_table(AUDIT_HEAD).map_err(backend)?,
            children: txn.open_table(AGENT_CHILDREN).map_err(backend)?,
            challenges: txn.open_table(CHALLENGES).map_err(backend)?,
            challenge_clients: txn.open_table(CHALLENGE_CLIENTS).map_err(backend)?,
            bundles: txn.open_table(BUNDLES).map_err(backend)?,
        })
    }

    fn all_agent_tokens(&self) -> Result<Vec<AgentToken>, StoreError> {
        let mut out = Vec::new();
        for row in self.agent_tokens.iter().map_err(backend)? {
            let (_, v) = row.map_err(backend)?;
            out.push(decode("agent token", v.value())?);
        }
        Ok(out)
    }
}

/// Every value of a table open in a write transaction.
fn table_values<T: DeserializeOwned>(
    table: &redb::Table<'_, &'static str, &'static [u8]>,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    for row in table.iter().map_err(backend)? {
        let (_, v) = row.map_err(backend)?;
        out.push(decode(what, v.value())?);
    }
    Ok(out)
}

/// The per-client index key of challenge `id`.
fn client_key(client: &str, id: &str) -> String {
    format!("{client}\0{id}")
}

/// The children index key of `child` under `parent`.
fn child_key(parent: &str, child: &str) -> String {
    format!("{parent}\0{child}")
}

fn last_key<V: redb::Value + 'static>(t: &redb::Table<'_, u64, V>) -> Result<u64, StoreError> {
    Ok(t.last().map_err(backend)?.map(|(k, _)| k.value()).unwrap_or(0))
}

impl Txn for Tables<'_> {
    fn last_certificate_seq(&mut self) -> Result<u64, StoreError> {
        last_key(&self.certs)
    }

    fn put_certificate(&mut self, seq: u64, cert: &CertificateRecord) -> Result<(), StoreError> {
        let bytes = encode("certificate", cert)?;
        self.certs.insert(seq, bytes.as_slice()).map_err(backend)?;
        Ok(())
    }

    fn audit_head(&mut self) -> Result<Option<(u64, String)>, StoreError> {
        let cached = self.audit_head.get(HEAD_KEY).map_err(backend)?.and_then(|v| {
            let (seq, hash) = v.value().split_once(' ')?;
            Some((seq.parse().ok()?, hash.to_owned()))
        });
        let last_seq = last_key(&self.audit)?;
        match cached {
            Some((seq, hash)) if seq == last_seq => Ok(Some((seq, hash))),
            // A database written before the head was kept: read the record.
            _ => match self.audit.last().map_err(backend)? {
                Some((_, v)) => {
                    let record: AuditRecord = decode("audit record", v.value())?;
                    Ok(Some((record.seq, record.hash)))
                }
                None => Ok(None),
            },
        }
    }

    fn put_audit(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        let bytes = encode("audit record", record)?;
        self.audit.insert(record.seq, bytes.as_slice()).map_err(backend)?;
        let head = format!("{} {}", record.seq, record.hash);
        self.audit_head.insert(HEAD_KEY, head.as_str()).map_err(backend)?;
        Ok(())
    }

    fn put_trust_source(&mut self, source: &TrustSource) -> Result<(), StoreError> {
        let bytes = encode("trust source", source)?;
        self.sources
            .insert(source.id.as_str(), bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn delete_trust_source(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.sources.remove(id).map_err(backend)?.is_some())
    }

    fn put_token(&mut self, record: &TokenRecord) -> Result<(), StoreError> {
        let bytes = encode("API token", record)?;
        self.tokens
            .insert(record.token_sha256.as_str(), bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<Request>, StoreError> {
        match self.requests.get(id).map_err(backend)? {
            Some(v) => Ok(Some(decode("request", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_request(&mut self, request: &Request, open: bool) -> Result<(), StoreError> {
        let bytes = encode("request", request)?;
        self.requests
            .insert(request.id.as_str(), bytes.as_slice())
            .map_err(backend)?;
        if open {
            self.pending.insert(request.id.as_str(), ()).map_err(backend)?;
        } else {
            self.pending.remove(request.id.as_str()).map_err(backend)?;
        }
        Ok(())
    }

    fn open_request_ids(&mut self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for row in self.pending.iter().map_err(backend)? {
            let (id, _) = row.map_err(backend)?;
            out.push(id.value().to_owned());
        }
        Ok(out)
    }

    fn last_outbox_seq(&mut self) -> Result<u64, StoreError> {
        last_key(&self.outbox)
    }

    fn put_outbox(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        let bytes = encode("outbox item", item)?;
        self.outbox.insert(item.seq, bytes.as_slice()).map_err(backend)?;
        Ok(())
    }

    fn delete_outbox(&mut self, seq: u64) -> Result<(), StoreError> {
        self.outbox.remove(seq).map_err(backend)?;
        Ok(())
    }

    fn put_idempotent(&mut self, key: &str, response: &IdempotentResponse) -> Result<(), StoreError> {
        let bytes = encode("idempotent response", response)?;
        self.idempotency.insert(key, bytes.as_slice()).map_err(backend)?;
        Ok(())
    }

    fn purge_idempotent(&mut self, before: i64) -> Result<(), StoreError> {
        self.idempotency
            .retain(|_, v| {
                serde_json::from_slice::<IdempotentResponse>(v)
                    .map(|r| r.created_at >= before)
                    .unwrap_or(false)
            })
            .map_err(backend)
    }

    fn agent_token(&mut self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        match self.agent_tokens.get(jti).map_err(backend)? {
            Some(v) => Ok(Some(decode("agent token", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_agent_token(&mut self, token: &AgentToken) -> Result<(), StoreError> {
        let bytes = encode("agent token", token)?;
        self.agent_tokens
            .insert(token.jti.as_str(), bytes.as_slice())
            .map_err(backend)?;
        if let Some(parent) = &token.parent_jti {
            self.children
                .insert(child_key(parent, &token.jti).as_str(), ())
                .map_err(backend)?;
        }
        Ok(())
    }

    fn agent_tokens_matching(&mut self, filter: &RevocationFilter) -> Result<Vec<AgentToken>, StoreError> {
        if let Some(jti) = &filter.jti {
            return Ok(self.agent_token(jti)?.into_iter().collect());
        }
        Ok(self
            .all_agent_tokens()?
            .into_iter()
            .filter(|t| filter.matches(t))
            .collect())
    }

    fn agent_tokens_all(&mut self) -> Result<Vec<AgentToken>, StoreError> {
        self.all_agent_tokens()
    }

    fn agent_token_children(&mut self, parent_jti: &str) -> Result<Vec<AgentToken>, StoreError> {
        let (from, to) = (format!("{parent_jti}\0"), format!("{parent_jti}\u{1}"));
        let mut jtis = Vec::new();
        for row in self.children.range(from.as_str()..to.as_str()).map_err(backend)? {
            let (k, _) = row.map_err(backend)?;
            if let Some((_, child)) = k.value().split_once('\0') {
                jtis.push(child.to_owned());
            }
        }
        let mut out = Vec::new();
        for jti in jtis {
            out.extend(self.agent_token(&jti)?);
        }
        Ok(out)
    }

    fn last_revocation_seq(&mut self) -> Result<u64, StoreError> {
        last_key(&self.revocations)
    }

    fn put_revocation(&mut self, revocation: &Revocation) -> Result<(), StoreError> {
        let bytes = encode("revocation", revocation)?;
        self.revocations
            .insert(revocation.seq, bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn put_entry(&mut self, entry: &Entry) -> Result<(), StoreError> {
        let bytes = encode("entry", entry)?;
        self.entries
            .insert(entry.id.as_str(), bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.entries.remove(id).map_err(backend)?.is_some())
    }

    fn spent_until(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.spent.get(key).map_err(backend)?.map(|v| v.value()))
    }

    fn put_spent(&mut self, key: &str, until: i64) -> Result<(), StoreError> {
        self.spent.insert(key, until).map_err(backend)?;
        Ok(())
    }

    fn purge_spent(&mut self, now: i64) -> Result<(), StoreError> {
        self.spent.retain(|_, until| until >= now).map_err(backend)
    }

    fn purge_agent_tokens(&mut self, before: i64) -> Result<(), StoreError> {
        let keep = |v: &[u8]| decode::<AgentToken>("agent token", v).map_or(true, |t| t.exp >= before);
        self.agent_tokens.retain(|_, v| keep(v)).map_err(backend)?;
        let mut gone = Vec::new();
        for row in self.children.iter().map_err(backend)? {
            let (k, _) = row.map_err(backend)?;
            let key = k.value().to_owned();
            if let Some((_, child)) = key.split_once('\0')
                && self.agent_tokens.get(child).map_err(backend)?.is_none()
            {
                gone.push(key);
            }
        }
        for key in gone {
            self.children.remove(key.as_str()).map_err(backend)?;
        }
        Ok(())
    }

    fn purge_requests(&mut self, before: i64) -> Result<(), StoreError> {
        let keep = |v: &[u8]| {
            decode::<Request>("request", v).map_or(true, |r| !r.state.is_terminal() || r.expires_at >= before)
        };
        self.requests.retain(|_, v| keep(v)).map_err(backend)
    }

    fn purge_revocations(&mut self, before: i64) -> Result<(), StoreError> {
        let keep = |v: &[u8]| decode::<Revocation>("revocation", v).map_or(true, |r| r.exp >= before);
        self.revocations.retain(|_, v| keep(v)).map_err(backend)
    }

    fn idempotent(&mut self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        match self.idempotency.get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode("idempotent response", v.value())?)),
            None => Ok(None),
        }
    }

    fn delete_idempotent(&mut self, key: &str) -> Result<(), StoreError> {
        self.idempotency.remove(key).map_err(backend)?;
        Ok(())
    }

    fn put_challenge(&mut self, challenge: &ChallengeRecord) -> Result<(), StoreError> {
        let bytes = encode("challenge", challenge)?;
        self.challenges
            .insert(challenge.id.as_str(), bytes.as_slice())
            .map_err(backend)?;
        if let Some(client) = &challenge.client {
            self.challenge_clients
                .insert(client_key(client, &challenge.id).as_str(), challenge.expires_at)
                .map_err(backend)?;
        }
        Ok(())
    }

    fn take_challenge(&mut self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        let Some(bytes) = self
            .challenges
            .remove(id)
            .map_err(backend)?
            .map(|v| v.value().to_vec())
        else {
            return Ok(None);
        };
        let challenge: ChallengeRecord = decode("challenge", &bytes)?;
        if let Some(client) = &challenge.client {
            self.challenge_clients
                .remove(client_key(client, id).as_str())
                .map_err(backend)?;
        }
        Ok(Some(challenge))
    }

    fn count_challenges(&mut self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        // Expired ones count until purged: the caller purges when full.
        let all = self.challenges.len().map_err(backend)?;
        let mut mine = 0;
        if let Some(client) = client {
            let (from, to) = (format!("{client}\0"), format!("{client}\u{1}"));
            for row in self
                .challenge_clients
                .range(from.as_str()..to.as_str())
                .map_err(backend)?
            {
                let (_, until) = row.map_err(backend)?;
                if until.value() >= now {
                    mine += 1;
                }
            }
        }
        Ok((all, mine))
    }

    fn purge_challenges(&mut self, now: i64) -> Result<(), StoreError> {
        let keep = |v: &[u8]| decode::<ChallengeRecord>("challenge", v).is_ok_and(|c| c.expires_at >= now);
        self.challenges.retain(|_, v| keep(v)).map_err(backend)?;
        self.challenge_clients
            .retain(|_, until| until >= now)
            .map_err(backend)
    }

    fn put_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError> {
        let bytes = encode("bundle", bundle)?;
        self.bundles
            .insert(bundle.name.as_str(), bytes.as_slice())
            .map_err(backend)?;
        Ok(())
    }

    fn trust_sources(&mut self) -> Result<Vec<TrustSource>, StoreError> {
        table_values(&self.sources, "trust source")
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
        table_values(&self.tokens, "API token")
    }
}

fn all_values<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    let read = db.begin_read().map_err(backend)?;
    let t = read.open_table(table).map_err(backend)?;
    let mut out = Vec::new();
    for row in t.iter().map_err(backend)? {
        let (_, v) = row.map_err(backend)?;
        out.push(decode(what, v.value())?);
    }
    Ok(out)
}

fn get_value<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    let read = db.begin_read().map_err(backend)?;
    let t = read.open_table(table).map_err(backend)?;
    match t.get(key).map_err(backend)? {
        Some(v) => Ok(Some(decode(what, v.value())?)),
        None => Ok(None),
    }
}

fn page<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<u64, &[u8]>,
    what: &'static str,
    limit: usize,
    after: u64,
) -> Result<Page<T>, StoreError> {
    let read = db.begin_read().map_err(backend)?;
    let t = read.open_table(table).map_err(backend)?;
    let mut items = Vec::with_capacity(limit.min(1000));
    let mut last = None;
    let mut more = false;
    for row in t.range(after.saturating_add(1)..).map_err(backend)? {
        let (k, v) = row.map_err(backend)?;
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(decode(what, v.value())?);
        last = Some(k.value());
    }
    Ok(Page {
        items,
        next_cursor: if more { last.map(|l| l.to_string()) } else { None },
    })
}

#[async_trait::async_trait]
impl Backend for RedbBackend {
    async fn write(&self, work: Work) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send((work, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn certificates(&self, limit: usize, after: u64) -> Result<Page<CertificateRecord>, StoreError> {
        self.read(move |db| page(db, CERTS, "certificate", limit, after))
            .await
    }

    async fn count_certificates(&self) -> Result<u64, StoreError> {
        self.read(|db| {
            let read = db.begin_read().map_err(backend)?;
            read.open_table(CERTS).map_err(backend)?.len().map_err(backend)
        })
        .await
    }

    async fn audit_records(&self, limit: usize, after: u64) -> Result<Page<AuditRecord>, StoreError> {
        self.read(move |db| page(db, AUDIT, "audit record", limit, after))
            .await
    }

    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        self.read(|db| all_values(db, TRUST_SOURCES, "trust source"))
            .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|db| all_values(db, TOKENS, "API token")).await
    }

    async fn request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        let id = id.to_owned();
        self.read(move |db| get_value(db, REQUESTS, &id, "request")).await
    }

    async fn requests(&self, open_only: bool) -> Result<Vec<Request>, StoreError> {
        if !open_only {
            return self.read(|db| all_values(db, REQUESTS, "request")).await;
        }
        self.read(|db| {
            let read = db.begin_read().map_err(backend)?;
            let pending = read.open_table(PENDING).map_err(backend)?;
            let requests = read.open_table(REQUESTS).map_err(backend)?;
            let mut out = Vec::new();
            for row in pending.iter().map_err(backend)? {
                let (id, _) = row.map_err(backend)?;
                if let Some(v) = requests.get(id.value()).map_err(backend)? {
                    out.push(decode("request", v.value())?);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.read(move |db| page(db, OUTBOX, "outbox item", limit, 0).map(|p| p.items))
            .await
    }

    async fn idempotent(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        let key = key.to_owned();
        self.read(move |db| get_value(db, IDEMPOTENCY, &key, "idempotent response"))
            .await
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.read(|db| all_values(db, ENTRIES, "entry")).await
    }

    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        let jti = jti.to_owned();
        self.read(move |db| get_value(db, AGENT_TOKENS, &jti, "agent token"))
            .await
    }

    async fn revocations(&self, limit: usize, after: u64) -> Result<Page<Revocation>, StoreError> {
        self.read(move |db| page(db, REVOCATIONS, "revocation", limit, after))
            .await
    }

    async fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        self.read(|db| all_values(db, BUNDLES, "bundle")).await
    }

    async fn challenge(&self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |db| get_value(db, CHALLENGES, &id, "challenge"))
            .await
    }

    async fn challenge_counts(&self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        let client = client.map(str::to_owned);
        self.read(move |db| {
            // From the per-client index: challenges without a client are
            // not counted here (the write transaction counts them).
            let read = db.begin_read().map_err(backend)?;
            let clients = read.open_table(CHALLENGE_CLIENTS).map_err(backend)?;
            let prefix = client.map(|c| format!("{c}\0"));
            let (mut all, mut mine) = (0, 0);
            for row in clients.iter().map_err(backend)? {
                let (key, until) = row.map_err(backend)?;
                if until.value() >= now {
                    all += 1;
                    if prefix.as_deref().is_some_and(|p| key.value().starts_with(p)) {
                        mine += 1;
                    }
                }
            }
            Ok((all, mine))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn a_store_without_a_kept_head_continues_its_chain_from_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let backend = Arc::new(RedbBackend::open(&dir.path().join("s.redb")).unwrap());
        let store = Store::new(backend.clone());
        crate::store::conformance::record_some(&store, 2).await;
        // As a database written before the head was kept beside the log.
        let txn = backend.db.begin_write().unwrap();
        txn.open_table(AUDIT_HEAD).unwrap().remove(HEAD_KEY).unwrap();
        txn.commit().unwrap();
        crate::store::conformance::record_some(&store, 1).await;
        assert_eq!(store.verify_audit_chain().await.unwrap(), 3);
    }

    #[tokio::test]
    async fn the_store_survives_a_reopen_and_its_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("castellan.redb");
        {
            let store = Store::redb(&path).unwrap();
            crate::store::conformance::record_some(&store, 5).await;
            assert_eq!(store.verify_audit_chain().await.unwrap(), 5);
        }
        // The writer thread still holds the database until its channel closes.
        let store = loop {
            match Store::redb(&path) {
                Ok(s) => break s,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        assert_eq!(store.count_certificates().await.unwrap(), 5);
        crate::store::conformance::record_some(&store, 1).await;
        assert_eq!(store.verify_audit_chain().await.unwrap(), 6);
    }
}
