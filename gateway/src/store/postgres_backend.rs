//! PostgreSQL-backed [`Backend`], for several gateways sharing one database.
//!
//! Every record is its JSON document (kept as bytes, exactly as written:
//! JSONB would refuse a `\u0000` an attacker put in a refused request, and
//! that refusal must still be audited) under its key, as in redb, with the
//! few columns purges and indexes need beside it. Spent-evidence keys are
//! bytes too: they may hold NUL, which PostgreSQL text cannot. Writes keep the store's
//! single-writer semantics across gateways: each write transaction first
//! takes one transaction-scoped advisory lock, so sequence numbers, the
//! audit chain and request transitions see every earlier commit, whichever
//! gateway made it. Like redb's, the writer folds the work queued meanwhile
//! into one transaction (group commit), and each caller hears back only
//! after the commit. Connections that fail are dropped and made again on
//! the next use, so the store recovers by itself when the database returns.
//!
//! The `postgres` client blocks: it runs on the writer thread and in
//! `spawn_blocking`, never on the async runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, GenericClient};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, oneshot};

use super::group::{self, Job};
use super::pg_tls::{self, MakeRustls};
use super::{
    AgentToken, AuditRecord, Backend, CertificateRecord, ChallengeRecord, Entry, IdempotentResponse,
    OutboxItem, Page, Request, Revocation, RevocationFilter, StoreError, StoredBundle, TokenRecord,
    TrustSource, Txn, Work, topic,
};

/// The schema version this Castellan writes. A database with a newer one was
/// migrated by a newer Castellan: this one refuses to start against it.
pub const SCHEMA_VERSION: i32 = 2;

/// Migrations, in order: `MIGRATIONS[i]` takes the schema to version `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE certificates (seq BIGINT PRIMARY KEY, doc BYTEA NOT NULL);
CREATE TABLE audit (seq BIGINT PRIMARY KEY, hash TEXT NOT NULL, doc BYTEA NOT NULL);
CREATE TABLE trust_sources (id TEXT PRIMARY KEY, doc BYTEA NOT NULL);
CREATE TABLE api_tokens (token_sha256 TEXT PRIMARY KEY, doc BYTEA NOT NULL);
CREATE TABLE requests (
    id TEXT PRIMARY KEY,
    open BOOLEAN NOT NULL,
    terminal BOOLEAN NOT NULL,
    expires_at BIGINT NOT NULL,
    doc BYTEA NOT NULL
);
CREATE INDEX requests_open ON requests (id) WHERE open;
CREATE TABLE outbox (seq BIGINT PRIMARY KEY, doc BYTEA NOT NULL);
CREATE TABLE idempotency (key TEXT PRIMARY KEY, created_at BIGINT NOT NULL, doc BYTEA NOT NULL);
CREATE TABLE agent_tokens (jti TEXT PRIMARY KEY, parent_jti TEXT, exp BIGINT NOT NULL, doc BYTEA NOT NULL);
CREATE INDEX agent_tokens_parent ON agent_tokens (parent_jti) WHERE parent_jti IS NOT NULL;
CREATE TABLE revocations (seq BIGINT PRIMARY KEY, exp BIGINT NOT NULL, doc BYTEA NOT NULL);
CREATE TABLE entries (id TEXT PRIMARY KEY, doc BYTEA NOT NULL);
CREATE TABLE spent_evidence (key BYTEA PRIMARY KEY, until BIGINT NOT NULL);
"#,
    r#"
CREATE TABLE castellan_changes (topic TEXT PRIMARY KEY, version BIGINT NOT NULL);
CREATE TABLE challenges (id TEXT PRIMARY KEY, client TEXT, expires_at BIGINT NOT NULL, doc BYTEA NOT NULL);
CREATE INDEX challenges_client ON challenges (client) WHERE client IS NOT NULL;
CREATE TABLE bundles (name TEXT PRIMARY KEY, doc BYTEA NOT NULL);
"#,
];

/// The advisory lock every write transaction takes first (and the schema
/// migration too): one writer at a time across every gateway.
const WRITE_LOCK: i64 = 0x4361_7374_656c_6c61; // "Castella"

/// The session advisory lock the leader holds: the gateway holding it runs
/// the duties that must run once across all gateways.
const LEADER_LOCK: i64 = 0x4361_7374_4c65_6164; // "CastLead"

/// The channel changes are announced on (`NOTIFY castellan, '<topic>'`).
const CHANNEL: &str = "castellan";

/// How often the listener re-reads the change counters (what a notification
/// lost with a dropped connection would have said) and tries for the lead.
const POLL: Duration = Duration::from_secs(1);

fn backend(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::backend(e)
}

fn doc<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Decode { what, source })
}

fn undoc<T: DeserializeOwned>(what: &'static str, bytes: Vec<u8>) -> Result<T, StoreError> {
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Sequence numbers are `u64` in the model and `BIGINT` in the database.
fn seq(n: u64) -> Result<i64, StoreError> {
    i64::try_from(n).map_err(|_| StoreError::Backend("sequence number out of range".into()))
}

/// Connections made on demand and kept for reuse; one that failed is
/// dropped rather than returned.
struct Pool {
    config: postgres::Config,
    tls: Option<MakeRustls>,
    idle: Mutex<Vec<Client>>,
    max_idle: usize,
}

impl Pool {
    fn connect(&self) -> Result<Client, StoreError> {
        pg_tls::connect(&self.config, self.tls.as_ref()).map_err(backend)
    }

    /// Runs `f` with a connection, keeping the connection only if `f`
    /// succeeded (a failed one may be broken).
    ///
    /// A pooled connection may have died unnoticed (a database restart or
    /// failover): if `f` fails on one, it runs once more on a new
    /// connection. Reads only, so running twice changes nothing.
    fn with<T>(&self, f: impl Fn(&mut Client) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let pooled = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let (client, out) = match pooled.filter(|c| !c.is_closed()) {
            Some(mut c) => match f(&mut c) {
                Ok(out) => (c, out),
                Err(_) => {
                    let mut fresh = self.connect()?;
                    let out = f(&mut fresh)?;
                    (fresh, out)
                }
            },
            None => {
                let mut fresh = self.connect()?;
                let out = f(&mut fresh)?;
                (fresh, out)
            }
        };
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < self.max_idle {
            idle.push(client);
        }
        Ok(out)
    }
}

/// What the listener thread shares with the backend.
struct Feed {
    changes: broadcast::Sender<String>,
    leader: AtomicBool,
    stop: AtomicBool,
}

/// PostgreSQL-backed [`Backend`].
pub struct PostgresBackend {
    pool: Arc<Pool>,
    writer: mpsc::Sender<Job>,
    feed: Arc<Feed>,
    /// Reads in flight at once, at most `max_connections`.
    reads: Arc<tokio::sync::Semaphore>,
    /// The last readiness check (when, and whether it answered): checks
    /// within a second share it, so `/readyz` cannot be turned into load.
    last_ping: Mutex<Option<(Instant, bool)>>,
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.feed.stop.store(true, Ordering::Relaxed);
    }
}

impl PostgresBackend {
    /// Connects with `config`, brings the schema up to date (refusing a
    /// newer one) and starts the writer thread. `max_connections` bounds the
    /// connections kept for reads (the writer has its own).
    pub fn open(config: postgres::Config, max_connections: usize) -> Result<Self, StoreError> {
        Self::open_with(config, None, max_connections)
    }

    /// Like [`PostgresBackend::open`], over TLS when `tls` is set.
    pub fn open_with(
        config: postgres::Config,
        tls: Option<MakeRustls>,
        max_connections: usize,
    ) -> Result<Self, StoreError> {
        let pool = Arc::new(Pool {
            config,
            tls,
            idle: Mutex::new(Vec::new()),
            max_idle: max_connections.max(1),
        });
        let open_err = |source: StoreError| StoreError::Open {
            path: "postgres".into(),
            source: Box::new(source),
        };
        // The blocking client runs its own little runtime: keep it off any
        // async context the caller may be in.
        let connecting = pool.clone();
        let (client, listening) = std::thread::scope(|s| {
            s.spawn(move || {
                let mut client = connecting.connect().map_err(open_err)?;
                migrate(&mut client)?;
                // Listening before the caller reads anything: no change made
                // after its first reads goes unheard.
                let listening = start_listening(&connecting).map_err(backend)?;
                Ok::<_, StoreError>((client, listening))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(StoreError::Backend(
                    "the store's connecting thread panicked".into(),
                ))
            })
        })?;
        let (tx, rx) = mpsc::channel();
        let writer_pool = pool.clone();
        std::thread::Builder::new()
            .name("castellan-store-writer".into())
            .spawn(move || run_writer(&writer_pool, client, rx))
            .map_err(backend)?;
        let feed = Arc::new(Feed {
            changes: broadcast::channel(1024).0,
            leader: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let (listener_feed, listener_pool) = (feed.clone(), pool.clone());
        std::thread::Builder::new()
            .name("castellan-store-listener".into())
            .spawn(move || run_listener(&listener_pool, &listener_feed, Some(listening)))
            .map_err(backend)?;
        Ok(Self {
            reads: Arc::new(tokio::sync::Semaphore::new(pool.max_idle)),
            pool,
            writer: tx,
            feed,
            last_ping: Mutex::new(None),
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let _permit = self.reads.acquire().await.map_err(|_| StoreError::Closed)?;
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .map_err(backend)?
    }
}

/// Applies the migrations this database lacks, under the write lock so two
/// gateways starting at once do not race.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .map_err(backend)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS castellan_schema (version INTEGER NOT NULL)")
        .map_err(backend)?;
    let current: i32 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM castellan_schema", &[])
        .map_err(backend)?
        .get(0);
    if current > SCHEMA_VERSION {
        return Err(StoreError::Open {
            path: "postgres".into(),
            source: format!(
                "the database's schema is version {current}, newer than this Castellan knows \
                 ({SCHEMA_VERSION}); run a Castellan at least as new as the one that migrated it"
            )
            .into(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.batch_execute(sql).map_err(backend)?;
        let version = i as i32 + 1;
        tx.execute("INSERT INTO castellan_schema (version) VALUES ($1)", &[&version])
            .map_err(backend)?;
    }
    tx.commit().map_err(backend)
}

/// Listens for what other gateways change and holds the lead when no other
/// gateway does. Every second it also re-reads the change counters, so a
/// notification lost with a dropped connection is made up within a second,
/// and after reconnecting it announces [`topic::ALL`]. Losing the
/// connection loses the lead (PostgreSQL releases a session's locks).
fn run_listener(pool: &Pool, feed: &Feed, mut first: Option<Listening>) {
    while !feed.stop.load(Ordering::Relaxed) {
        let (mut client, mut seen) = match first.take() {
            Some(l) => l,
            None => match start_listening(pool) {
                Ok(l) => {
                    // Whatever changed while disconnected went unheard.
                    let _ = feed.changes.send(topic::ALL.to_owned());
                    l
                }
                Err(e) => {
                    tracing::debug!(error = %e, "store listener cannot connect; retrying");
                    std::thread::sleep(POLL);
                    continue;
                }
            },
        };
        if let Err(e) = listen(&mut client, feed, &mut seen) {
            tracing::warn!(error = %e, "store listener lost its connection; reconnecting");
        }
        if feed.leader.swap(false, Ordering::Relaxed) {
            tracing::info!("this gateway no longer leads housekeeping");
        }
    }
}

/// A listening connection and the change counters as it first read them.
type Listening = (Client, HashMap<String, i64>);

fn start_listening(pool: &Pool) -> Result<Listening, postgres::Error> {
    let mut client = pg_tls::connect(&pool.config, pool.tls.as_ref())?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    let mut seen = HashMap::new();
    read_counters(&mut client, &mut seen, |_| {})?;
    Ok((client, seen))
}

/// Reads the change counters into `seen`, calling `changed` for each that
/// moved since.
fn read_counters(
    client: &mut Client,
    seen: &mut HashMap<String, i64>,
    mut changed: impl FnMut(String),
) -> Result<(), postgres::Error> {
    for row in client.query("SELECT topic, version FROM castellan_changes", &[])? {
        let (name, version): (String, i64) = (row.get(0), row.get(1));
        if seen.get(&name) != Some(&version) {
            seen.insert(name.clone(), version);
            changed(name);
        }
    }
    Ok(())
}

/// One connection's life: notifications as they come, counters and the
/// lead every [`POLL`].
fn listen(client: &mut Client, feed: &Feed, seen: &mut HashMap<String, i64>) -> Result<(), postgres::Error> {
    while !feed.stop.load(Ordering::Relaxed) {
        if !feed.leader.load(Ordering::Relaxed) {
            let won: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&LEADER_LOCK])?
                .get(0);
            if won {
                tracing::info!("this gateway leads housekeeping");
                feed.leader.store(true, Ordering::Relaxed);
            }
        }
        let deadline = Instant::now() + POLL;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let mut notifications = client.notifications();
            match notifications.timeout_iter(left).next()? {
                Some(n) => {
                    let _ = feed.changes.send(n.payload().to_owned());
                }
                None => break,
            }
        }
        read_counters(client, seen, |name| {
            let _ = feed.changes.send(name);
        })?;
    }
    Ok(())
}

/// The writer's connection and the statements prepared on it (they live
/// as long as the connection).
struct WriterConn {
    client: Client,
    statements: HashMap<&'static str, postgres::Statement>,
}

fn run_writer(pool: &Pool, first: Client, rx: mpsc::Receiver<Job>) {
    let mut conn = Some(WriterConn {
        client: first,
        statements: HashMap::new(),
    });
    while let Ok(job) = rx.recv() {
        let (work, replies) = group::gather(job, &rx);
        let mut current = match conn.take().filter(|c| !c.client.is_closed()) {
            Some(c) => Ok(c),
            None => pool.connect().map(|client| WriterConn {
                client,
                statements: HashMap::new(),
            }),
        };
        let outcome = match &mut current {
            Ok(c) => commit_group(c, work),
            Err(e) => Err(StoreError::Backend(
                format!("the database is unreachable: {e}").into(),
            )),
        };
        // After a failed transaction the connection may be dying (the
        // server ended the session and the client has not noticed yet):
        // make a new one for the next group.
        conn = match outcome {
            Ok(()) => current.ok().filter(|c| !c.client.is_closed()),
            Err(_) => None,
        };
        group::reply(replies, &outcome);
    }
}

/// Runs a group's work in one transaction under the write lock.
fn commit_group(conn: &mut WriterConn, work: Vec<Work>) -> Result<(), StoreError> {
    let mut tx = conn.client.transaction().map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .map_err(backend)?;
    let mut txn = PgTxn {
        tx: &mut tx,
        statements: &mut conn.statements,
        certificates: Vec::new(),
        audit: Vec::new(),
        last_certificate: None,
        audit_head: None,
    };
    group::run(work, &mut txn)?;
    txn.flush()?;
    tx.commit().map_err(backend)
}

/// One write transaction, as the store's rules see it. Statements are
/// prepared once per connection. The hot appends (certificates and audit
/// records) are gathered and written in one statement each at the end;
/// nothing in the transaction reads them back but their heads, which are
/// read once and then kept here (the write lock keeps them ours).
struct PgTxn<'t, 'c> {
    tx: &'t mut postgres::Transaction<'c>,
    statements: &'t mut HashMap<&'static str, postgres::Statement>,
    certificates: Vec<(i64, Vec<u8>)>,
    audit: Vec<(i64, String, Vec<u8>)>,
    last_certificate: Option<u64>,
    audit_head: Option<Option<(u64, String)>>,
}

fn get_doc<T: DeserializeOwned>(
    c: &mut impl GenericClient,
    sql: &str,
    key: &str,
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    match c.query_opt(sql, &[&key]).map_err(backend)? {
        Some(row) => Ok(Some(undoc(what, row.get(0))?)),
        None => Ok(None),
    }
}

fn all_docs<T: DeserializeOwned>(
    c: &mut impl GenericClient,
    sql: &str,
    what: &'static str,
) -> Result<Vec<T>, StoreError> {
    c.query(sql, &[])
        .map_err(backend)?
        .into_iter()
        .map(|row| undoc(what, row.get(0)))
        .collect()
}

fn page<T: DeserializeOwned>(
    c: &mut impl GenericClient,
    table: &str,
    what: &'static str,
    limit: usize,
    after: u64,
) -> Result<Page<T>, StoreError> {
    let rows = c
        .query(
            &format!("SELECT seq, doc FROM {table} WHERE seq > $1 ORDER BY seq LIMIT $2"),
            &[&seq(after)?, &(limit as i64 + 1)],
        )
        .map_err(backend)?;
    let more = rows.len() > limit;
    let mut items = Vec::with_capacity(rows.len().min(limit));
    let mut last = None;
    for row in rows.into_iter().take(limit) {
        last = Some(row.get::<_, i64>(0));
        items.push(undoc(what, row.get(1))?);
    }
    Ok(Page {
        items,
        next_cursor: if more { last.map(|l| l.to_string()) } else { None },
    })
}

type Params<'a> = &'a [&'a (dyn postgres::types::ToSql + Sync)];

impl PgTxn<'_, '_> {
    fn statement(&mut self, sql: &'static str) -> Result<postgres::Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(sql).map_err(backend)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn exec(&mut self, sql: &'static str, params: Params<'_>) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        self.tx.execute(&s, params).map_err(backend)
    }

    fn rows(&mut self, sql: &'static str, params: Params<'_>) -> Result<Vec<postgres::Row>, StoreError> {
        let s = self.statement(sql)?;
        self.tx.query(&s, params).map_err(backend)
    }

    fn row(&mut self, sql: &'static str, params: Params<'_>) -> Result<Option<postgres::Row>, StoreError> {
        let s = self.statement(sql)?;
        self.tx.query_opt(&s, params).map_err(backend)
    }

    fn doc_opt<T: DeserializeOwned>(
        &mut self,
        sql: &'static str,
        key: &str,
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        match self.row(sql, &[&key])? {
            Some(row) => Ok(Some(undoc(what, row.get(0))?)),
            None => Ok(None),
        }
    }

    fn docs<T: DeserializeOwned>(
        &mut self,
        sql: &'static str,
        params: Params<'_>,
        what: &'static str,
    ) -> Result<Vec<T>, StoreError> {
        self.rows(sql, params)?
            .into_iter()
            .map(|row| undoc(what, row.get(0)))
            .collect()
    }

    fn max_seq(&mut self, sql: &'static str) -> Result<u64, StoreError> {
        let n: i64 = self.row(sql, &[])?.map_or(0, |r| r.get(0));
        Ok(n as u64)
    }

    /// Writes the gathered appends.
    fn flush(&mut self) -> Result<(), StoreError> {
        if !self.certificates.is_empty() {
            let (seqs, docs): (Vec<i64>, Vec<Vec<u8>>) =
                std::mem::take(&mut self.certificates).into_iter().unzip();
            self.exec(
                "INSERT INTO certificates (seq, doc) SELECT * FROM UNNEST($1::BIGINT[], $2::BYTEA[])",
                &[&seqs, &docs],
            )?;
        }
        if !self.audit.is_empty() {
            let mut seqs = Vec::with_capacity(self.audit.len());
            let mut hashes = Vec::with_capacity(self.audit.len());
            let mut docs = Vec::with_capacity(self.audit.len());
            for (n, h, d) in std::mem::take(&mut self.audit) {
                seqs.push(n);
                hashes.push(h);
                docs.push(d);
            }
            self.exec(
                "INSERT INTO audit (seq, hash, doc) SELECT * FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::BYTEA[])",
                &[&seqs, &hashes, &docs],
            )?;
        }
        Ok(())
    }
}

impl Txn for PgTxn<'_, '_> {
    fn last_certificate_seq(&mut self) -> Result<u64, StoreError> {
        if let Some(n) = self.last_certificate {
            return Ok(n);
        }
        let n = self.max_seq("SELECT COALESCE(MAX(seq), 0) FROM certificates")?;
        self.last_certificate = Some(n);
        Ok(n)
    }

    fn put_certificate(&mut self, n: u64, cert: &CertificateRecord) -> Result<(), StoreError> {
        let d = doc("certificate", cert)?;
        self.certificates.push((seq(n)?, d));
        self.last_certificate = Some(n);
        Ok(())
    }

    fn audit_head(&mut self) -> Result<Option<(u64, String)>, StoreError> {
        if let Some(head) = &self.audit_head {
            return Ok(head.clone());
        }
        let head = self
            .row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?
            .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)));
        self.audit_head = Some(head.clone());
        Ok(head)
    }

    fn put_audit(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        let d = doc("audit record", record)?;
        self.audit.push((seq(record.seq)?, record.hash.clone(), d));
        self.audit_head = Some(Some((record.seq, record.hash.clone())));
        Ok(())
    }

    fn put_trust_source(&mut self, source: &TrustSource) -> Result<(), StoreError> {
        let d = doc("trust source", source)?;
        self.exec(
            "INSERT INTO trust_sources (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET doc = $2",
            &[&source.id, &d],
        )?;
        Ok(())
    }

    fn delete_trust_source(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM trust_sources WHERE id = $1", &[&id])? > 0)
    }

    fn put_token(&mut self, record: &TokenRecord) -> Result<(), StoreError> {
        let d = doc("API token", record)?;
        self.exec(
            "INSERT INTO api_tokens (token_sha256, doc) VALUES ($1, $2) \
             ON CONFLICT (token_sha256) DO UPDATE SET doc = $2",
            &[&record.token_sha256, &d],
        )?;
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<Request>, StoreError> {
        self.doc_opt("SELECT doc FROM requests WHERE id = $1", id, "request")
    }

    fn put_request(&mut self, request: &Request, open: bool) -> Result<(), StoreError> {
        let d = doc("request", request)?;
        self.exec(
            "INSERT INTO requests (id, open, terminal, expires_at, doc) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET open = $2, terminal = $3, expires_at = $4, doc = $5",
            &[
                &request.id,
                &open,
                &request.state.is_terminal(),
                &request.expires_at,
                &d,
            ],
        )?;
        Ok(())
    }

    fn open_request_ids(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self
            .rows("SELECT id FROM requests WHERE open ORDER BY id", &[])?
            .into_iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn last_outbox_seq(&mut self) -> Result<u64, StoreError> {
        self.max_seq("SELECT COALESCE(MAX(seq), 0) FROM outbox")
    }

    fn put_outbox(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        let d = doc("outbox item", item)?;
        self.exec(
            "INSERT INTO outbox (seq, doc) VALUES ($1, $2) ON CONFLICT (seq) DO UPDATE SET doc = $2",
            &[&seq(item.seq)?, &d],
        )?;
        Ok(())
    }

    fn delete_outbox(&mut self, n: u64) -> Result<(), StoreError> {
        self.exec("DELETE FROM outbox WHERE seq = $1", &[&seq(n)?])?;
        Ok(())
    }

    fn put_idempotent(&mut self, key: &str, response: &IdempotentResponse) -> Result<(), StoreError> {
        let d = doc("idempotent response", response)?;
        self.exec(
            "INSERT INTO idempotency (key, created_at, doc) VALUES ($1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET created_at = $2, doc = $3",
            &[&key, &response.created_at, &d],
        )?;
        Ok(())
    }

    fn purge_idempotent(&mut self, before: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM idempotency WHERE created_at < $1", &[&before])?;
        Ok(())
    }

    fn agent_token(&mut self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        self.doc_opt("SELECT doc FROM agent_tokens WHERE jti = $1", jti, "agent token")
    }

    fn put_agent_token(&mut self, token: &AgentToken) -> Result<(), StoreError> {
        let d = doc("agent token", token)?;
        self.exec(
            "INSERT INTO agent_tokens (jti, parent_jti, exp, doc) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (jti) DO UPDATE SET parent_jti = $2, exp = $3, doc = $4",
            &[&token.jti, &token.parent_jti, &token.exp, &d],
        )?;
        Ok(())
    }

    fn agent_tokens_matching(&mut self, filter: &RevocationFilter) -> Result<Vec<AgentToken>, StoreError> {
        if let Some(jti) = &filter.jti {
            return Ok(self.agent_token(jti)?.into_iter().collect());
        }
        let all: Vec<AgentToken> = self.docs("SELECT doc FROM agent_tokens", &[], "agent token")?;
        Ok(all.into_iter().filter(|t| filter.matches(t)).collect())
    }

    fn agent_tokens_all(&mut self) -> Result<Vec<AgentToken>, StoreError> {
        self.docs("SELECT doc FROM agent_tokens", &[], "agent token")
    }

    fn agent_token_children(&mut self, parent_jti: &str) -> Result<Vec<AgentToken>, StoreError> {
        self.docs(
            "SELECT doc FROM agent_tokens WHERE parent_jti = $1 ORDER BY jti",
            &[&parent_jti],
            "agent token",
        )
    }

    fn last_revocation_seq(&mut self) -> Result<u64, StoreError> {
        self.max_seq("SELECT COALESCE(MAX(seq), 0) FROM revocations")
    }

    fn put_revocation(&mut self, revocation: &Revocation) -> Result<(), StoreError> {
        let d = doc("revocation", revocation)?;
        self.exec(
            "INSERT INTO revocations (seq, exp, doc) VALUES ($1, $2, $3)",
            &[&seq(revocation.seq)?, &revocation.exp, &d],
        )?;
        Ok(())
    }

    fn put_entry(&mut self, entry: &Entry) -> Result<(), StoreError> {
        let d = doc("entry", entry)?;
        self.exec(
            "INSERT INTO entries (id, doc) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET doc = $2",
            &[&entry.id, &d],
        )?;
        Ok(())
    }

    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.exec("DELETE FROM entries WHERE id = $1", &[&id])? > 0)
    }

    fn spent_until(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self
            .row(
                "SELECT until FROM spent_evidence WHERE key = $1",
                &[&key.as_bytes()],
            )?
            .map(|r| r.get(0)))
    }

    fn put_spent(&mut self, key: &str, until: i64) -> Result<(), StoreError> {
        self.exec(
            "INSERT INTO spent_evidence (key, until) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET until = $2",
            &[&key.as_bytes(), &until],
        )?;
        Ok(())
    }

    fn purge_spent(&mut self, now: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM spent_evidence WHERE until < $1", &[&now])?;
        Ok(())
    }

    fn purge_agent_tokens(&mut self, before: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM agent_tokens WHERE exp < $1", &[&before])?;
        Ok(())
    }

    fn purge_requests(&mut self, before: i64) -> Result<(), StoreError> {
        self.exec(
            "DELETE FROM requests WHERE terminal AND expires_at < $1",
            &[&before],
        )?;
        Ok(())
    }

    fn purge_revocations(&mut self, before: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM revocations WHERE exp < $1", &[&before])?;
        Ok(())
    }

    fn changed(&mut self, name: &str) -> Result<(), StoreError> {
        // Delivered at commit, once per distinct payload per transaction.
        self.exec("SELECT pg_notify($1, $2)", &[&CHANNEL, &name])?;
        let family = name.split(':').next().unwrap_or(name);
        self.exec(
            "INSERT INTO castellan_changes (topic, version) VALUES ($1, 1) \
             ON CONFLICT (topic) DO UPDATE SET version = castellan_changes.version + 1",
            &[&family],
        )?;
        Ok(())
    }

    fn idempotent(&mut self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        self.doc_opt(
            "SELECT doc FROM idempotency WHERE key = $1",
            key,
            "idempotent response",
        )
    }

    fn delete_idempotent(&mut self, key: &str) -> Result<(), StoreError> {
        self.exec("DELETE FROM idempotency WHERE key = $1", &[&key])?;
        Ok(())
    }

    fn put_challenge(&mut self, challenge: &ChallengeRecord) -> Result<(), StoreError> {
        let d = doc("challenge", challenge)?;
        self.exec(
            "INSERT INTO challenges (id, client, expires_at, doc) VALUES ($1, $2, $3, $4)",
            &[&challenge.id, &challenge.client, &challenge.expires_at, &d],
        )?;
        Ok(())
    }

    fn take_challenge(&mut self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        self.doc_opt(
            "DELETE FROM challenges WHERE id = $1 RETURNING doc",
            id,
            "challenge",
        )
    }

    fn count_challenges(&mut self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        let row = self.row(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE client = $1) FROM challenges WHERE expires_at >= $2",
            &[&client, &now],
        )?;
        Ok(row.map_or((0, 0), |r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64)))
    }

    fn purge_challenges(&mut self, now: i64) -> Result<(), StoreError> {
        self.exec("DELETE FROM challenges WHERE expires_at < $1", &[&now])?;
        Ok(())
    }

    fn trust_sources(&mut self) -> Result<Vec<TrustSource>, StoreError> {
        self.docs("SELECT doc FROM trust_sources ORDER BY id", &[], "trust source")
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
        self.docs(
            "SELECT doc FROM api_tokens ORDER BY token_sha256",
            &[],
            "API token",
        )
    }

    fn put_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError> {
        let d = doc("bundle", bundle)?;
        self.exec(
            "INSERT INTO bundles (name, doc) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET doc = $2",
            &[&bundle.name, &d],
        )?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for PostgresBackend {
    async fn write(&self, work: Work) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.writer.send((work, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn certificates(&self, limit: usize, after: u64) -> Result<Page<CertificateRecord>, StoreError> {
        self.read(move |c| page(c, "certificates", "certificate", limit, after))
            .await
    }

    async fn count_certificates(&self) -> Result<u64, StoreError> {
        self.read(|c| {
            let n: i64 = c
                .query_one("SELECT COUNT(*) FROM certificates", &[])
                .map_err(backend)?
                .get(0);
            Ok(n as u64)
        })
        .await
    }

    async fn audit_records(&self, limit: usize, after: u64) -> Result<Page<AuditRecord>, StoreError> {
        self.read(move |c| page(c, "audit", "audit record", limit, after))
            .await
    }

    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        self.read(|c| all_docs(c, "SELECT doc FROM trust_sources ORDER BY id", "trust source"))
            .await
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|c| all_docs(c, "SELECT doc FROM api_tokens ORDER BY token_sha256", "API token"))
            .await
    }

    async fn request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| get_doc(c, "SELECT doc FROM requests WHERE id = $1", &id, "request"))
            .await
    }

    async fn requests(&self, open_only: bool) -> Result<Vec<Request>, StoreError> {
        let sql = if open_only {
            "SELECT doc FROM requests WHERE open ORDER BY id"
        } else {
            "SELECT doc FROM requests ORDER BY id"
        };
        self.read(move |c| all_docs(c, sql, "request")).await
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        self.read(move |c| page(c, "outbox", "outbox item", limit, 0).map(|p| p.items))
            .await
    }

    async fn idempotent(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        let key = key.to_owned();
        self.read(move |c| {
            get_doc(
                c,
                "SELECT doc FROM idempotency WHERE key = $1",
                &key,
                "idempotent response",
            )
        })
        .await
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.read(|c| all_docs(c, "SELECT doc FROM entries ORDER BY id", "entry"))
            .await
    }

    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        let jti = jti.to_owned();
        self.read(move |c| {
            get_doc(
                c,
                "SELECT doc FROM agent_tokens WHERE jti = $1",
                &jti,
                "agent token",
            )
        })
        .await
    }

    async fn revocations(&self, limit: usize, after: u64) -> Result<Page<Revocation>, StoreError> {
        self.read(move |c| page(c, "revocations", "revocation", limit, after))
            .await
    }

    async fn challenge(&self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| get_doc(c, "SELECT doc FROM challenges WHERE id = $1", &id, "challenge"))
            .await
    }

    async fn challenge_counts(&self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        let client = client.map(str::to_owned);
        self.read(move |c| {
            let row = c
                .query_one(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE client = $1) FROM challenges WHERE expires_at >= $2",
                    &[&client, &now],
                )
                .map_err(backend)?;
            Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
        })
        .await
    }

    async fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        self.read(|c| all_docs(c, "SELECT doc FROM bundles ORDER BY name", "bundle"))
            .await
    }

    fn changes(&self) -> Option<broadcast::Receiver<String>> {
        Some(self.feed.changes.subscribe())
    }

    fn is_leader(&self) -> bool {
        self.feed.leader.load(Ordering::Relaxed)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let recent = *self.last_ping.lock().unwrap_or_else(|p| p.into_inner());
        let answered = match recent {
            Some((at, answered)) if at.elapsed() < Duration::from_secs(1) => answered,
            _ => {
                let answered = self
                    .read(|c| c.simple_query("SELECT 1").map(drop).map_err(backend))
                    .await
                    .is_ok();
                *self.last_ping.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), answered));
                answered
            }
        };
        if answered {
            Ok(())
        } else {
            Err(StoreError::Backend("the database did not answer".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use postgres::NoTls;

    use super::*;
    use crate::model::{Actor, AuditEvent, AuditKind};
    use crate::store::{Store, pg_test_cluster};

    /// A refusal that quotes attacker input with NUL in it is still audited,
    /// byte for byte (JSONB or TEXT would refuse it).
    #[tokio::test]
    async fn documents_keep_what_jsonb_would_refuse() {
        let store = Store::postgres(pg_test_cluster::database(), 2).unwrap();
        let data = json!({ "subject": "evil\u{0}\u{0}name", "emoji": "🛡" });
        store
            .audit(AuditEvent::new(
                AuditKind::IssuanceIssued,
                Actor::Castellan,
                data.clone(),
            ))
            .await
            .unwrap();
        let page = store.list_audit(10, None).await.unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(page.items[0].event.detail, data);
        store.verify_audit_chain().await.unwrap();
    }

    /// Connections the database dropped (a restart, a failover) are made
    /// again: at most the writes in flight fail, and later ones succeed.
    #[tokio::test]
    async fn dropped_connections_are_made_again() {
        let config = pg_test_cluster::database();
        let store = Store::postgres(config.clone(), 2).unwrap();
        let event = || AuditEvent::new(AuditKind::IssuanceIssued, Actor::Castellan, json!({}));
        store.audit(event()).await.unwrap();
        store.list_audit(10, None).await.unwrap();
        // Every other session on this database is ended, as a restart would.
        tokio::task::spawn_blocking(move || {
            let mut admin = config.connect(NoTls).unwrap();
            admin
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .unwrap();
        })
        .await
        .unwrap();
        let _ = store.audit(event()).await;
        let _ = store.list_audit(10, None).await;
        store.audit(event()).await.expect("the writer reconnected");
        let page = store.list_audit(10, None).await.expect("reads reconnected");
        assert!(page.items.len() >= 2);
        store.verify_audit_chain().await.unwrap();
    }

    /// What one gateway writes is announced to the others, and exactly one
    /// gateway leads; when it goes, another takes the lead.
    #[tokio::test]
    async fn changes_reach_other_gateways_and_one_leads() {
        let config = pg_test_cluster::database();
        let a = Store::postgres(config.clone(), 2).unwrap();
        let b = Store::postgres(config, 2).unwrap();
        let mut heard = b.changes().expect("a shared store announces changes");
        let bundle = crate::model::StoredBundle {
            name: "team".into(),
            tar_gz: String::new(),
            sha256: "00".into(),
            stored_at: 1,
        };
        let event = AuditEvent::new(AuditKind::BundleActivated, Actor::Castellan, json!({}));
        a.put_bundle(bundle, event).await.unwrap();
        let topic = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match heard.recv().await {
                    Ok(t) if t == crate::store::topic::BUNDLES => return t,
                    _ => continue,
                }
            }
        })
        .await
        .expect("the change was announced");
        assert_eq!(topic, "bundles");

        let leaders = || [a.is_leader(), b.is_leader()];
        let deadline = Instant::now() + Duration::from_secs(5);
        while leaders() == [false, false] && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(leaders().iter().filter(|l| **l).count(), 1, "one leader");
        let (gone, stays) = if a.is_leader() { (a, b) } else { (b, a) };
        drop(gone);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stays.is_leader() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(stays.is_leader(), "the lead passed on");
    }

    /// Over TLS, the server's certificate must chain to the given roots and
    /// name the host: the right CA and name connect (and the session is
    /// encrypted), another CA or another name does not.
    #[test]
    fn tls_connects_only_to_a_verified_server() {
        let base = pg_test_cluster::database();
        let at = |host: &str| {
            let mut c = postgres::Config::new();
            c.host(host)
                .hostaddr(std::net::IpAddr::from([127, 0, 0, 1]))
                .port(base.get_ports()[0])
                .user(base.get_user().unwrap())
                .dbname(base.get_dbname().unwrap());
            c
        };
        let config = at("localhost");
        let tls = |roots: &std::path::Path| {
            Some(crate::store::MakeRustls(
                crate::tls::private_client_config(roots).unwrap(),
            ))
        };
        let backend = PostgresBackend::open_with(config.clone(), tls(&pg_test_cluster::tls_ca()), 1).unwrap();
        let encrypted: bool = backend
            .pool
            .with(|c| {
                c.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
                    .map_err(StoreError::backend)
            })
            .unwrap()
            .get(0);
        assert!(encrypted, "the session is TLS");
        drop(backend);

        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other-ca.pem");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        std::fs::write(&other, ca.self_signed(&key).unwrap().pem()).unwrap();
        let err = PostgresBackend::open_with(config.clone(), tls(&other), 1)
            .err()
            .expect("another CA is refused");
        assert!(
            crate::util::error_chain(&err).contains("certificate"),
            "{}",
            crate::util::error_chain(&err)
        );

        // The certificate names `localhost`, not 127.0.0.1.
        let err = PostgresBackend::open_with(at("127.0.0.1"), tls(&pg_test_cluster::tls_ca()), 1)
            .err()
            .expect("another name is refused");
        assert!(
            crate::util::error_chain(&err).contains("certificate"),
            "{}",
            crate::util::error_chain(&err)
        );
    }

    /// A database migrated by a newer Castellan is refused at start, saying
    /// so; the current one opens again (migrations are idempotent).
    #[test]
    fn a_newer_schema_is_refused() {
        let config = pg_test_cluster::database();
        drop(PostgresBackend::open(config.clone(), 1).unwrap());
        drop(PostgresBackend::open(config.clone(), 1).unwrap());
        let mut c = config.connect(NoTls).unwrap();
        c.execute(
            "INSERT INTO castellan_schema (version) VALUES ($1)",
            &[&(SCHEMA_VERSION + 1)],
        )
        .unwrap();
        let err = PostgresBackend::open(config, 1).err().expect("refused");
        let text = crate::util::error_chain(&err);
        assert!(text.contains("newer than this Castellan knows"), "{text}");
    }
}
