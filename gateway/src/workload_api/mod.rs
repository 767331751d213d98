//! The SPIFFE Workload API on a Unix socket: a thin adapter over the
//! engine. It gathers what the kernel reports about the socket's peer (pid,
//! uid, gid, executable), never anything the caller sends, and hands it to
//! the engine as host evidence; the engine attests, matches entries,
//! decides, mints, records and audits. This module renders the answers and
//! keeps streams open: X.509-SVIDs are re-minted at half-life and when the
//! caller's entries change, and bundles are pushed when a federated trust
//! domain's bundle changes.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use castellan_proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use castellan_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse, WitsvidRequest, WitsvidResponse,
    X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest, X509svidResponse,
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::WorkloadApiConfig;
use crate::engine::workload::HostEvidence;
use crate::engine::{Engine, EngineError};
use crate::federation::Federation;
use crate::model::{Attestation, Entry};
use crate::spiffe_id::SpiffeId;
use crate::util::now_unix;

mod peer;
mod sds;

/// The header every Workload API call must carry.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// How long a stream waits before trying again when the engine is at
/// capacity: streams outlive overload, they are not ended by it.
const OVERLOAD_RETRY: Duration = Duration::from_secs(1);

/// Bundles keyed by trust domain SPIFFE ID (`spiffe://name`), as both the
/// X.509 and the JWT messages carry them.
type BundleMap = HashMap<String, Vec<u8>>;

/// The gRPC service (cheap to clone: it holds handles).
#[derive(Clone)]
pub struct WorkloadApi {
    engine: Arc<Engine>,
    federation: Arc<Federation>,
    config: Arc<WorkloadApiConfig>,
    exe_hashes: Arc<ExeHashes>,
    /// Federated trust domains still waiting for their first refresh.
    starting: watch::Receiver<usize>,
}

/// When a stream looks again for SVIDs due at `due` (Unix seconds): just
/// after that second begins, so every stream of an identity wakes together
/// and finds the renewed SVIDs; at least a second from now.
fn wake_at(due: i64) -> tokio::time::Instant {
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    let wait_ms = due.saturating_mul(1000).saturating_add(50).saturating_sub(now_ms);
    tokio::time::Instant::now() + Duration::from_millis(wait_ms.max(1000) as u64)
}

/// What a stream does with an engine error: a busy server is no reason to
/// end it, so it waits and tells the caller to try again (false); any other
/// error is sent and ends it (true).
async fn stream_ends<T>(e: EngineError, tx: &mpsc::Sender<Result<T, Status>>) -> bool {
    if matches!(e, EngineError::Overloaded) {
        tokio::time::sleep(OVERLOAD_RETRY).await;
        return false;
    }
    let _ = tx.send(Err(status(e))).await;
    true
}

/// The gRPC status for an engine refusal.
fn status(e: EngineError) -> Status {
    match e {
        EngineError::NotRegistered => Status::permission_denied(e.to_string()),
        EngineError::AttestationFailed(_)
        | EngineError::HostEvidenceOnly(_)
        | EngineError::UnknownMethod(_)
        | EngineError::NoTrustSource(_) => Status::permission_denied(format!("caller {}", e.detail())),
        EngineError::Overloaded | EngineError::Store(_) => Status::unavailable(e.detail()),
        other => Status::internal(other.detail()),
    }
}

/// Runs an engine call as a request of its own: a refusal is audited under
/// a fresh request id, and its status names it.
async fn traced<T>(call: impl std::future::Future<Output = Result<T, EngineError>>) -> Result<T, Status> {
    let id = crate::engine::new_request_id();
    crate::engine::as_request(id.clone(), call)
        .await
        .map_err(|e| naming(status(e), &id))
}

/// `status` with the request id its refusal was audited under, which
/// `castellan explain --refusal` takes.
fn naming(status: Status, request_id: &str) -> Status {
    Status::new(
        status.code(),
        format!("{} (request id {request_id})", status.message()),
    )
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "the `workload.spiffe.io: true` header is required",
        )),
    }
}

/// SHA-256 of executables, keyed by what identifies a file version, so a
/// binary is hashed once rather than on every call.
#[derive(Default)]
struct ExeHashes(std::sync::Mutex<HashMap<FileVersion, String>>);

/// Device, inode, size, mtime and ctime (seconds and nanoseconds): a file
/// rewritten in place keeps its inode, and a reset mtime still moves ctime.
type FileVersion = (u64, u64, u64, i64, i64, i64, i64);

impl ExeHashes {
    fn of(&self, pid: i32) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        // `/proc/PID/exe` opens the very file the process runs, even if its
        // path was replaced since.
        let path = format!("/proc/{pid}/exe");
        let mut file = std::fs::File::open(&path).ok()?;
        let m = file.metadata().ok()?;
        let key = (
            m.dev(),
            m.ino(),
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
        );
        if let Some(h) = self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Some(h.clone());
        }
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher).ok()?;
        let hex = hex::encode(hasher.finalize());
        let mut cache = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() > 4096 {
            cache.clear();
        }
        cache.insert(key, hex.clone());
        Some(hex)
    }
}

/// The evidence for the `unix` module, gathered by the host from the kernel.
fn unix_evidence(pid: Option<i32>, uid: u32, gid: u32, hashes: Option<&ExeHashes>) -> Value {
    let name_of = |file: &str, id: u32| {
        std::fs::read_to_string(file).ok().and_then(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let _ = f.next();
                (f.next()?.parse::<u32>().ok()? == id).then(|| name.to_owned())
            })
        })
    };
    let mut e = json!({ "pid": pid.unwrap_or(0), "uid": uid, "gid": gid });
    if let Some(u) = name_of("/etc/passwd", uid) {
        e["user"] = u.into();
    }
    if let Some(g) = name_of("/etc/group", gid) {
        e["group"] = g.into();
    }
    if let Some(pid) = pid {
        if let Ok(p) = std::fs::read_link(format!("/proc/{pid}/exe")) {
            e["path"] = p.display().to_string().into();
        }
        if let Some(h) = hashes.and_then(|h| h.of(pid)) {
            e["sha256"] = h.into();
        }
    }
    e
}

/// The SVIDs of one X.509 response, kept so that a bundle change re-sends
/// them rather than minting new keys.
struct Minted {
    entries: Vec<Entry>,
    svids: Vec<X509svid>,
    /// When to mint again: half of the shortest lifetime.
    rotate_at: tokio::time::Instant,
    /// The authorities that signed them.
    authorities: Vec<String>,
}

impl Minted {
    /// Whether an authority that signed these no longer signs (another was
    /// activated, or it was tainted): they are minted again now.
    fn superseded(&self, authorities: &crate::signer::Authorities) -> bool {
        let active = authorities
            .active(crate::signer::Kind::X509)
            .map(|a| a.id.as_str());
        self.authorities
            .iter()
            .any(|id| Some(id.as_str()) != active || authorities.must_remint(id))
    }
}

impl WorkloadApi {
    pub fn new(engine: Arc<Engine>, federation: Arc<Federation>, config: WorkloadApiConfig) -> Self {
        let starting = federation.first_refresh_done();
        Self {
            engine,
            federation,
            config: Arc::new(config),
            exe_hashes: Arc::default(),
            starting,
        }
    }

    /// Serves on a bound socket until the process ends.
    pub async fn serve(self, listener: tokio::net::UnixListener) -> Result<(), tonic::transport::Error> {
        use tokio_stream::StreamExt as _;
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
            .map(|conn| conn.map(peer::Peer::accept));
        let sds = sds::Sds::new(self.clone()).into_service();
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(self))
            .add_service(sds)
            .serve_with_incoming(incoming)
            .await
    }

    /// Every call starts here: the header, then readiness.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        check_header(req)?;
        self.ready()
    }

    /// Until each federated trust domain has had its first refresh,
    /// answers would lack bundles the workload is owed, so the caller is
    /// told to retry.
    fn ready(&self) -> Result<(), Status> {
        if *self.starting.borrow() > 0 {
            return Err(Status::unavailable(
                "Castellan is starting (federated bundles are loading); retry shortly",
            ));
        }
        Ok(())
    }

    /// Attests the caller from the socket's peer credentials.
    async fn attest<T>(&self, operation: &'static str, req: &Request<T>) -> Result<Attestation, Status> {
        let peer = req
            .extensions()
            .get::<peer::PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("the caller's credentials are unknown"))?;
        let info = peer
            .uds
            .peer_cred
            .ok_or_else(|| Status::permission_denied("the caller's credentials are unknown"))?;
        let hashes = self.config.exe_sha256.then(|| self.exe_hashes.clone());
        // Reading /proc and hashing an executable is blocking file work. The
        // process must be the one that connected, before and after.
        let evidence = tokio::task::spawn_blocking(move || {
            let pid = info.pid()?;
            if !peer.still_connected_process(pid) {
                return None;
            }
            let evidence = unix_evidence(Some(pid), info.uid(), info.gid(), hashes.as_deref());
            peer.still_connected_process(pid).then_some(evidence)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let Some(evidence) = evidence else {
            let refused = EngineError::Forbidden(
                "the calling process is not the one that connected (it exec'd another program or exited); \
                 connect again"
                    .into(),
            );
            let refusal = crate::engine::Refusal::new(
                crate::engine::Surface::WorkloadApi,
                operation,
                crate::model::Actor::Evidence("unix".into()),
            );
            self.engine.audit_refusal(refusal, &refused).await;
            return Err(Status::permission_denied(refused.detail()));
        };
        traced(
            self.engine
                .workload_caller(operation, HostEvidence::from_kernel(evidence)),
        )
        .await
    }

    /// Entitled entries, or PermissionDenied (audited) when there are none.
    async fn entitled_or_denied(
        &self,
        operation: &'static str,
        attestation: &Attestation,
    ) -> Result<Vec<Arc<Entry>>, Status> {
        traced(self.engine.workload_entitled_or_refused(operation, attestation)).await
    }

    fn own_key(&self) -> String {
        format!("spiffe://{}", self.engine.trust_domain)
    }

    /// DER of the trust bundle (concatenated certificates).
    fn bundle_der(&self) -> Vec<u8> {
        crate::util::pem_to_der(self.engine.authorities().bundle_pem())
    }

    /// The foreign trust domains these entries federate with, that have a
    /// bundle, as `f` renders it.
    fn federated(
        &self,
        entries: &[Arc<Entry>],
        f: impl Fn(&crate::federation::TrustBundle) -> Vec<u8>,
    ) -> BundleMap {
        let names: BTreeSet<&String> = entries.iter().flat_map(|e| &e.federates_with).collect();
        names
            .into_iter()
            .filter_map(|td| self.federation.get(td).map(|b| (format!("spiffe://{td}"), f(&b))))
            .collect()
    }

    /// The X.509 bundles a caller with these entries gets: its own trust
    /// domain's and those its entries federate with.
    fn x509_bundles(&self, entries: &[Arc<Entry>]) -> BundleMap {
        let mut map = self.federated(entries, |b| b.x509_der());
        map.retain(|_, der| !der.is_empty());
        map.insert(self.own_key(), self.bundle_der());
        map
    }

    fn jwt_bundles(&self, entries: &[Arc<Entry>]) -> BundleMap {
        let mut map = self.federated(entries, |b| b.jwt_jwks().to_string().into_bytes());
        map.retain(|_, jwks| !jwks.starts_with(br#"{"keys":[]"#));
        let mut own = self.engine.authorities().jwks();
        if let Some(keys) = own["keys"].as_array_mut() {
            for k in keys {
                k["use"] = "jwt-svid".into();
            }
        }
        map.insert(self.own_key(), own.to_string().into_bytes());
        map
    }

    /// The X.509-SVIDs of these entries, through the engine: shared by every
    /// caller of an entry, minted (recorded and audited) only when due.
    async fn mint(&self, attestation: &Attestation, entries: &[Arc<Entry>]) -> Result<Minted, EngineError> {
        let minted = self.engine.workload_x509(attestation, entries).await?;
        let bundle = self.bundle_der();
        let mut hints = std::collections::HashSet::new();
        let mut authorities = Vec::new();
        let mut rotate = i64::MAX;
        let mut svids = Vec::with_capacity(minted.len());
        for m in minted {
            // Hints are unique within a response: the first entry keeps it.
            let hint = if m.entry.hint.is_empty() || hints.insert(m.entry.hint.clone()) {
                m.entry.hint.clone()
            } else {
                String::new()
            };
            rotate = rotate.min(m.rotate_at);
            authorities.push(m.authority.clone());
            let mut chain = m.certificate_der;
            chain.extend_from_slice(&crate::util::pem_to_der(&m.chain_pem));
            svids.push(X509svid {
                spiffe_id: m.entry.spiffe_id.clone(),
                x509_svid: chain,
                x509_svid_key: m.key_der,
                bundle: bundle.clone(),
                hint,
            });
        }
        // Wake when the first of them is due for renewal (the shared cache
        // renews at half-life).
        Ok(Minted {
            entries: entries.iter().map(|e| e.as_ref().clone()).collect(),
            svids,
            rotate_at: wake_at(rotate),
            authorities,
        })
    }

    /// Runs one X.509-SVID stream: sends a response whenever the SVIDs are
    /// re-minted or the bundles they come with change.
    async fn x509_stream(self, attestation: Attestation, tx: mpsc::Sender<Result<X509svidResponse, Status>>) {
        let open = crate::metrics::OpenStream::open();
        let mut entries_changed = self.engine.entries.subscribe();
        let mut bundles_changed = self.federation.subscribe();
        let mut authorities_changed = self.engine.authority_changes();
        let mut minted: Option<Minted> = None;
        let mut sent_bundles: Option<(Vec<u8>, BundleMap)> = None;
        loop {
            let entries = match self.engine.workload_entitled(&attestation).await {
                Ok(e) if e.is_empty() => {
                    let id = self
                        .engine
                        .workload_refused("fetch_x509_svid", &attestation, &EngineError::NotRegistered)
                        .await;
                    let removed = Status::permission_denied("the caller's identities were removed");
                    let _ = tx.send(Err(naming(removed, &id))).await;
                    return;
                }
                Ok(e) => e,
                Err(e) => {
                    if stream_ends(e, &tx).await {
                        return;
                    }
                    continue;
                }
            };
            let current: Vec<Entry> = entries.iter().map(|e| e.as_ref().clone()).collect();
            let authorities = self.engine.authorities();
            let mut stale = minted.as_ref().is_none_or(|m| {
                m.entries != current
                    || tokio::time::Instant::now() >= m.rotate_at
                    || m.superseded(&authorities)
            });
            if stale {
                match self.mint(&attestation, &entries).await {
                    // The same SVIDs again (another caller already renewed
                    // them, or nothing was due): nothing new to send.
                    Ok(m) if minted.as_ref().is_some_and(|old| old.svids == m.svids) => {
                        stale = false;
                        minted = Some(m);
                    }
                    Ok(m) => minted = Some(m),
                    Err(e) => {
                        if stream_ends(e, &tx).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            // A prepared or revoked authority changes the own bundle each
            // SVID comes with: sent at once, before anything it signs.
            let own = self.bundle_der();
            let federated = self.federated(&entries, |b| b.x509_der());
            let bundles = (own, federated);
            if stale || sent_bundles.as_ref() != Some(&bundles) {
                let mut svids = minted.as_ref().map(|m| m.svids.clone()).unwrap_or_default();
                for svid in &mut svids {
                    svid.bundle.clone_from(&bundles.0);
                }
                let federated = bundles.1.clone();
                let resp = X509svidResponse {
                    svids,
                    crl: vec![],
                    federated_bundles: federated.clone(),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                open.pushed();
                sent_bundles = Some(bundles);
            }
            let rotate_at = minted
                .as_ref()
                .map(|m| m.rotate_at)
                .unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = tokio::time::sleep_until(rotate_at) => {}
                r = entries_changed.changed() => if r.is_err() { return },
                r = bundles_changed.changed() => if r.is_err() { return },
                r = authorities_changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }

    /// Runs a bundle stream: sends `render(entries)` when it changes; ends
    /// with PermissionDenied when the caller loses its last entry.
    async fn bundle_stream<T: Send + 'static>(
        self,
        operation: &'static str,
        attestation: Attestation,
        tx: mpsc::Sender<Result<T, Status>>,
        render: impl Fn(&Self, &[Arc<Entry>]) -> BundleMap,
        wrap: impl Fn(BundleMap) -> T,
    ) {
        let open = crate::metrics::OpenStream::open();
        let mut entries_changed = self.engine.entries.subscribe();
        let mut bundles_changed = self.federation.subscribe();
        let mut authorities_changed = self.engine.authority_changes();
        let mut sent: Option<BundleMap> = None;
        loop {
            let bundles = match self
                .engine
                .workload_entitled_or_refused(operation, &attestation)
                .await
            {
                Ok(entries) => render(&self, &entries),
                Err(e) => {
                    if stream_ends(e, &tx).await {
                        return;
                    }
                    continue;
                }
            };
            if sent.as_ref() != Some(&bundles) {
                if tx.send(Ok(wrap(bundles.clone()))).await.is_err() {
                    return;
                }
                open.pushed();
                sent = Some(bundles);
            }
            tokio::select! {
                r = entries_changed.changed() => if r.is_err() { return },
                r = bundles_changed.changed() => if r.is_err() { return },
                r = authorities_changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }

    /// Keys that verify JWT-SVIDs of `trust_domain`: Castellan's own, or a
    /// federated domain's.
    fn jwt_keys_for(&self, trust_domain: &str) -> Result<crate::trust::KeySet, Status> {
        if trust_domain == self.engine.trust_domain {
            return crate::trust::KeySet::from_jwks(&self.engine.authorities().jwks())
                .map_err(|e| Status::internal(e.to_string()));
        }
        self.federation
            .get(trust_domain)
            .and_then(|b| b.jwt_keys())
            .ok_or_else(|| Status::invalid_argument(format!("no JWT bundle for trust domain {trust_domain}")))
    }
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = Stream<X509svidResponse>;
    type FetchX509BundlesStream = Stream<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<JwtBundlesResponse>;
    type FetchWITSVIDStream = Stream<WitsvidResponse>;
    type FetchWITBundlesStream = Stream<WitBundlesResponse>;

    async fn fetch_witsvid(
        &self,
        _: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        Err(Status::unimplemented("the WIT-SVID profile is not supported"))
    }

    async fn fetch_wit_bundles(
        &self,
        _: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        Err(Status::unimplemented("the WIT-SVID profile is not supported"))
    }

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.admit(&req)?;
        let attestation = self.attest("fetch_x509_svid", &req).await?;
        // Refuse at once rather than on the stream: the caller sees the
        // status as the RPC's.
        self.entitled_or_denied("fetch_x509_svid", &attestation).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.clone().x509_stream(attestation, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&req)?;
        let attestation = self.attest("fetch_x509_bundles", &req).await?;
        self.entitled_or_denied("fetch_x509_bundles", &attestation)
            .await?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(self.clone().bundle_stream(
            "fetch_x509_bundles",
            attestation,
            tx,
            |api, entries| api.x509_bundles(entries),
            |bundles| X509BundlesResponse { crl: vec![], bundles },
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_jwtsvid(&self, req: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        self.admit(&req)?;
        if req.get_ref().audience.is_empty() || req.get_ref().audience.iter().any(|a| a.is_empty()) {
            return Err(Status::invalid_argument("audience is required"));
        }
        let attestation = self.attest("fetch_jwt_svid", &req).await?;
        let mut entries = self
            .engine
            .workload_entitled(&attestation)
            .await
            .map_err(status)?;
        let body = req.into_inner();
        if !body.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == body.spiffe_id);
        }
        if entries.is_empty() {
            let refused = EngineError::NotRegistered;
            let id = self
                .engine
                .workload_refused("fetch_jwt_svid", &attestation, &refused)
                .await;
            return Err(naming(status(refused), &id));
        }
        let minted = self
            .engine
            .workload_jwt(&attestation, entries, body.audience, self.config.jwt_alg())
            .await
            .map_err(status)?;
        let svids = minted
            .into_iter()
            .map(|m| Jwtsvid {
                spiffe_id: m.entry.spiffe_id.clone(),
                svid: m.token,
                hint: m.entry.hint.clone(),
            })
            .collect();
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&req)?;
        let attestation = self.attest("fetch_jwt_bundles", &req).await?;
        self.entitled_or_denied("fetch_jwt_bundles", &attestation).await?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(self.clone().bundle_stream(
            "fetch_jwt_bundles",
            attestation,
            tx,
            |api, entries| api.jwt_bundles(entries),
            |bundles| JwtBundlesResponse { bundles },
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.admit(&req)?;
        let body = req.into_inner();
        if body.audience.is_empty() || body.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid are required"));
        }
        // The issuer's trust domain picks the keys; the claim is only
        // trusted once they verify it.
        let unverified_sub = unverified_claims(&body.svid)
            .and_then(|c| c["sub"].as_str().map(str::to_owned))
            .ok_or_else(|| Status::invalid_argument("invalid JWT-SVID: no `sub`"))?;
        let unverified_id = SpiffeId::parse(&unverified_sub)
            .map_err(|_| Status::invalid_argument("`sub` is not a SPIFFE ID"))?;
        let keys = self.jwt_keys_for(unverified_id.trust_domain())?;
        let (_, payload) = keys
            .verify_compact(&body.svid)
            .map_err(|e| Status::invalid_argument(format!("invalid JWT-SVID: {e}")))?;
        let claims: Value = serde_json::from_str(&payload)
            .map_err(|_| Status::invalid_argument("invalid JWT-SVID payload"))?;
        let aud_ok = match &claims["aud"] {
            Value::String(a) => *a == body.audience,
            Value::Array(a) => a.iter().any(|x| x.as_str() == Some(body.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(Status::invalid_argument("the JWT-SVID is not for this audience"));
        }
        if claims["exp"].as_i64().is_none_or(|exp| exp <= now_unix()) {
            return Err(Status::invalid_argument("the JWT-SVID has expired"));
        }
        let spiffe_id = claims["sub"]
            .as_str()
            .and_then(|s| SpiffeId::parse(s).ok())
            .ok_or_else(|| Status::invalid_argument("`sub` is not a SPIFFE ID"))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: spiffe_id.to_string(),
            claims: Some(to_struct(&claims)),
        }))
    }
}

/// The payload of a compact JWS, not yet verified: only to pick keys.
fn unverified_claims(compact: &str) -> Option<Value> {
    use base64::Engine as _;
    let payload = compact.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn to_value(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(to_value).collect(),
        }),
        Value::Object(_) => Kind::StructValue(to_struct(v)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn to_struct(v: &Value) -> prost_types::Struct {
    prost_types::Struct {
        fields: v
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), to_value(v))).collect())
            .unwrap_or_default(),
    }
}

/// Binds the Workload API socket (any local process may connect; what it
/// gets depends on what the kernel says it is).
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}
