//! The SPIFFE Workload API on a Unix socket. A caller is attested from what
//! the kernel reports about the socket's peer (pid, uid, gid, executable),
//! never from anything it sends: that evidence goes through the `unix`
//! attestor module, its selectors are matched against registration entries,
//! and each matching entry passes the `castellan.workload_api` policy before
//! its SVID is minted. Streams stay open: X.509-SVIDs are re-minted at
//! half-life and when the caller's entries change, and bundles are pushed
//! when a federated trust domain's bundle changes.

mod entries;

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

pub use entries::{Entries, Entry, EntrySpec};

use crate::attest::Attestation;
use crate::config::WorkloadApiConfig;
use crate::federation::Federation;
use crate::issuance::Pipeline;
use crate::signer::Template;
use crate::spiffe_id::SpiffeId;
use crate::util::now_unix;

/// The header every Workload API call must carry.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Bundles keyed by trust domain SPIFFE ID (`spiffe://name`), as both the
/// X.509 and the JWT messages carry them.
type BundleMap = HashMap<String, Vec<u8>>;

/// The gRPC service (cheap to clone: it holds handles).
#[derive(Clone)]
pub struct WorkloadApi {
    pipeline: Arc<Pipeline>,
    entries: Arc<Entries>,
    federation: Arc<Federation>,
    config: Arc<WorkloadApiConfig>,
    exe_hashes: Arc<ExeHashes>,
    /// Federated trust domains still waiting for their first refresh.
    starting: watch::Receiver<usize>,
    /// Bounds the attestation, policy and minting work in flight: a thousand
    /// streams rotating at once queue here rather than each taking a
    /// blocking thread (and its memory).
    work: Arc<tokio::sync::Semaphore>,
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

/// Device, inode, size, mtime seconds and nanoseconds.
type FileVersion = (u64, u64, u64, i64, i64);

impl ExeHashes {
    fn of(&self, pid: i32) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        // `/proc/PID/exe` opens the very file the process runs, even if its
        // path was replaced since.
        let path = format!("/proc/{pid}/exe");
        let mut file = std::fs::File::open(&path).ok()?;
        let m = file.metadata().ok()?;
        let key = (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec());
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
}

impl WorkloadApi {
    pub fn new(
        pipeline: Arc<Pipeline>,
        entries: Arc<Entries>,
        federation: Arc<Federation>,
        config: WorkloadApiConfig,
    ) -> Self {
        let starting = federation.first_refresh_done();
        Self {
            pipeline,
            entries,
            federation,
            config: Arc::new(config),
            exe_hashes: Arc::default(),
            starting,
            work: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
            )),
        }
    }

    /// Runs `f` on the blocking pool once a work permit is free.
    async fn blocking<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
        let _permit = self
            .work
            .acquire()
            .await
            .map_err(|_| Status::unavailable("shutting down"))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| Status::internal(e.to_string()))
    }

    /// Serves on a bound socket until the process ends.
    pub async fn serve(self, listener: tokio::net::UnixListener) -> anyhow::Result<()> {
        tonic::transport::Server::builder()
            .add_service(SpiffeWorkloadApiServer::new(self))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await?;
        Ok(())
    }

    /// Every call starts here: the header, then readiness. Until each
    /// federated trust domain has had its first refresh, answers would lack
    /// bundles the workload is owed, so the caller is told to retry.
    fn admit<T>(&self, req: &Request<T>) -> Result<(), Status> {
        check_header(req)?;
        if *self.starting.borrow() > 0 {
            return Err(Status::unavailable(
                "Castellan is starting (federated bundles are loading); retry shortly",
            ));
        }
        Ok(())
    }

    /// Attests the caller from the socket's peer credentials.
    async fn attest<T>(&self, req: &Request<T>) -> Result<Attestation, Status> {
        let info = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("the caller's credentials are unknown"))?;
        let p = self.pipeline.clone();
        let hashes = self.config.exe_sha256.then(|| self.exe_hashes.clone());
        self.blocking(move || {
            let evidence = unix_evidence(info.pid(), info.uid(), info.gid(), hashes.as_deref()).to_string();
            let snapshot = p.policies.snapshot();
            p.attest(&snapshot, "unix", &evidence)
        })
        .await?
        .map_err(|e| Status::permission_denied(format!("caller attestation failed: {e}")))
    }

    /// The entries the caller matches and policy allows.
    async fn entitled(&self, attestation: &Attestation) -> Result<Vec<Arc<Entry>>, Status> {
        let candidates = self.entries.matching(&attestation.selectors);
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let p = self.pipeline.clone();
        let a = attestation.clone();
        self.blocking(move || {
            let snapshot = p.policies.snapshot();
            let mut allowed = Vec::new();
            for entry in candidates {
                let input = json!({
                    "version": 1, "trust_domain": p.trust_domain, "attestation": a,
                    "entry": {"id": entry.id, "spiffe_id": entry.spiffe_id, "selectors": entry.selectors},
                });
                match snapshot.eval(crate::policy::WORKLOAD_RULE, &input) {
                    Ok(v) if v["allow"] == true => allowed.push(entry),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, entry = %entry.id, "workload_api policy failed; SVID withheld"),
                }
            }
            allowed
        })
        .await
    }

    /// Entitled entries, or PermissionDenied when there are none.
    async fn entitled_or_denied(&self, attestation: &Attestation) -> Result<Vec<Arc<Entry>>, Status> {
        let entries = self.entitled(attestation).await?;
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity is registered for this caller",
            ));
        }
        Ok(entries)
    }

    fn own_key(&self) -> String {
        format!("spiffe://{}", self.pipeline.trust_domain)
    }

    /// DER of the trust bundle (concatenated certificates).
    fn bundle_der(&self) -> Vec<u8> {
        pem_to_der(self.pipeline.signer.bundle_pem())
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
        let mut own = self.pipeline.signer.jwks();
        if let Some(keys) = own["keys"].as_array_mut() {
            for k in keys {
                k["use"] = "jwt-svid".into();
            }
        }
        map.insert(self.own_key(), own.to_string().into_bytes());
        map
    }

    /// Mints an X.509-SVID with a fresh key for each entry.
    async fn mint(&self, entries: &[Arc<Entry>]) -> Result<Minted, Status> {
        let p = self.pipeline.clone();
        let list = entries.to_vec();
        let bundle = self.bundle_der();
        let (svids, soonest) = self
            .blocking(move || {
                let mut svids = Vec::new();
                let mut soonest = i64::MAX;
                let mut hints = std::collections::HashSet::new();
                for e in list {
                    // Hints are unique within a response: the first entry keeps it.
                    let hint = if e.hint.is_empty() || hints.insert(e.hint.clone()) {
                        e.hint.clone()
                    } else {
                        String::new()
                    };
                    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    let template = Template {
                        spiffe_id: SpiffeId::parse(&e.spiffe_id)
                            .map_err(|e| Status::internal(e.to_string()))?,
                        public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
                        ttl: time::Duration::seconds(e.x509_svid_ttl as i64),
                        dns_names: e.dns_names.clone(),
                        extensions: vec![],
                    };
                    let cert = p
                        .signer
                        .sign_x509_svid(&template)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    soonest = soonest.min(cert.not_after.unix_timestamp());
                    let mut chain = cert.der.clone();
                    chain.extend(pem_to_der(p.signer.intermediates_pem()));
                    svids.push(X509svid {
                        spiffe_id: e.spiffe_id.clone(),
                        x509_svid: chain,
                        x509_svid_key: key.serialize_der(),
                        bundle: bundle.clone(),
                        hint,
                    });
                }
                Ok::<_, Status>((svids, soonest))
            })
            .await??;
        let half = ((soonest - now_unix()).max(2) / 2) as u64;
        Ok(Minted {
            entries: entries.iter().map(|e| e.as_ref().clone()).collect(),
            svids,
            rotate_at: tokio::time::Instant::now() + Duration::from_secs(half),
        })
    }

    /// Runs one X.509-SVID stream: sends a response whenever the SVIDs are
    /// re-minted or the bundles they come with change.
    async fn x509_stream(self, attestation: Attestation, tx: mpsc::Sender<Result<X509svidResponse, Status>>) {
        let mut entries_changed = self.entries.subscribe();
        let mut bundles_changed = self.federation.subscribe();
        let mut minted: Option<Minted> = None;
        let mut sent_bundles: Option<BundleMap> = None;
        loop {
            let entries = match self.entitled(&attestation).await {
                Ok(e) if e.is_empty() => {
                    let _ = tx
                        .send(Err(Status::permission_denied(
                            "the caller's identities were removed",
                        )))
                        .await;
                    return;
                }
                Ok(e) => e,
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            let current: Vec<Entry> = entries.iter().map(|e| e.as_ref().clone()).collect();
            let stale = minted
                .as_ref()
                .is_none_or(|m| m.entries != current || tokio::time::Instant::now() >= m.rotate_at);
            if stale {
                match self.mint(&entries).await {
                    Ok(m) => minted = Some(m),
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
            let federated = self.federated(&entries, |b| b.x509_der());
            if stale || sent_bundles.as_ref() != Some(&federated) {
                let svids = minted.as_ref().map(|m| m.svids.clone()).unwrap_or_default();
                let resp = X509svidResponse {
                    svids,
                    crl: vec![],
                    federated_bundles: federated.clone(),
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                sent_bundles = Some(federated);
            }
            let rotate_at = minted
                .as_ref()
                .map(|m| m.rotate_at)
                .unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = tokio::time::sleep_until(rotate_at) => {}
                r = entries_changed.changed() => if r.is_err() { return },
                r = bundles_changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }

    /// Runs a bundle stream: sends `render(entries)` when it changes; ends
    /// with PermissionDenied when the caller loses its last entry.
    async fn bundle_stream<T: Send + 'static>(
        self,
        attestation: Attestation,
        tx: mpsc::Sender<Result<T, Status>>,
        render: impl Fn(&Self, &[Arc<Entry>]) -> BundleMap,
        wrap: impl Fn(BundleMap) -> T,
    ) {
        let mut entries_changed = self.entries.subscribe();
        let mut bundles_changed = self.federation.subscribe();
        let mut sent: Option<BundleMap> = None;
        loop {
            let bundles = match self.entitled_or_denied(&attestation).await {
                Ok(entries) => render(&self, &entries),
                Err(s) => {
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            if sent.as_ref() != Some(&bundles) {
                if tx.send(Ok(wrap(bundles.clone()))).await.is_err() {
                    return;
                }
                sent = Some(bundles);
            }
            tokio::select! {
                r = entries_changed.changed() => if r.is_err() { return },
                r = bundles_changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
        }
    }

    /// Keys that verify JWT-SVIDs of `trust_domain`: Castellan's own, or a
    /// federated domain's.
    fn jwt_keys_for(&self, trust_domain: &str) -> Result<crate::trust::KeySet, Status> {
        if trust_domain == self.pipeline.trust_domain {
            return crate::trust::KeySet::from_jwks(&self.pipeline.signer.jwks())
                .map_err(|e| Status::internal(e.to_string()));
        }
        self.federation
            .get(trust_domain)
            .and_then(|b| b.jwt_keys())
            .ok_or_else(|| Status::invalid_argument(format!("no JWT bundle for trust domain {trust_domain}")))
    }
}

fn pem_to_der(pem_text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = pem_text.as_bytes();
    while let Ok((r, pem)) = x509_parser::pem::parse_x509_pem(rest) {
        out.extend_from_slice(&pem.contents);
        rest = r;
        if rest.iter().all(|b| b.is_ascii_whitespace()) {
            break;
        }
    }
    out
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
        let attestation = self.attest(&req).await?;
        // Refuse at once rather than on the stream: the caller sees the
        // status as the RPC's.
        self.entitled_or_denied(&attestation).await?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(self.clone().x509_stream(attestation, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&req)?;
        let attestation = self.attest(&req).await?;
        self.entitled_or_denied(&attestation).await?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(self.clone().bundle_stream(
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
        let attestation = self.attest(&req).await?;
        let mut entries = self.entitled(&attestation).await?;
        let body = req.into_inner();
        if !body.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == body.spiffe_id);
        }
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity is registered for this caller",
            ));
        }
        let (p, alg) = (self.pipeline.clone(), self.config.jwt_svid_algorithm.clone());
        // RSA signing takes milliseconds: keep it off the async workers.
        let svids = self
            .blocking(move || {
                let now = now_unix();
                let mut svids = Vec::new();
                for e in entries {
                    let claims = json!({ "sub": e.spiffe_id, "aud": body.audience, "iat": now, "exp": now + e.jwt_svid_ttl as i64 });
                    let svid = p
                        .signer
                        .sign_jwt_svid(&claims, &alg)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    svids.push(Jwtsvid {
                        spiffe_id: e.spiffe_id.clone(),
                        svid,
                        hint: e.hint.clone(),
                    });
                }
                Ok::<_, Status>(svids)
            })
            .await??;
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&req)?;
        let attestation = self.attest(&req).await?;
        self.entitled_or_denied(&attestation).await?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(self.clone().bundle_stream(
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
pub fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}
