//! The SPIFFE Workload API on a Unix socket. A caller is attested from what
//! the kernel reports about the socket's peer (pid, uid, gid, executable),
//! never from anything it sends: that evidence goes through the `unix`
//! attestor module, its selectors are matched against registration entries,
//! and each matching entry passes the `castellan.workload_api` policy before
//! its SVID is minted. X.509-SVID streams stay open and push a fresh response
//! at half-life and whenever the entries change.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use castellan_proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use castellan_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::attest::Attestation;
use crate::issuance::Pipeline;
use crate::signer::Template;
use crate::spiffe_id::SpiffeId;
use crate::util::now_unix;

/// The header every Workload API call must carry.
const SECURITY_HEADER: &str = "workload.spiffe.io";

/// A registration entry: who (selectors, all of which must match) gets which
/// identity, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime, seconds.
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_svid_ttl: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub federates_with: Vec<String>,
    pub created_at: String,
}

/// A new entry as posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    #[serde(default = "default_x509_ttl")]
    pub x509_svid_ttl: u64,
    #[serde(default = "default_jwt_ttl")]
    pub jwt_svid_ttl: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub federates_with: Vec<String>,
}

fn default_x509_ttl() -> u64 {
    3600
}

fn default_jwt_ttl() -> u64 {
    300
}

impl EntrySpec {
    /// Validates and turns the spec into an entry in `trust_domain`.
    pub fn into_entry(self, trust_domain: &str) -> Result<Entry, String> {
        let id = SpiffeId::parse(&self.spiffe_id).map_err(|e| format!("spiffe_id: {e}"))?;
        if id.trust_domain() != trust_domain || id.path().is_empty() {
            return Err(format!("spiffe_id must be a workload ID in {trust_domain}"));
        }
        if self.selectors.is_empty() {
            return Err("at least one selector is required".into());
        }
        if let Some(s) = self
            .selectors
            .iter()
            .find(|s| s.splitn(3, ':').count() != 3 || s.len() > 1024)
        {
            return Err(format!(
                "selector `{}` is not type:key:value",
                s.chars().take(64).collect::<String>()
            ));
        }
        // Short lifetimes are allowed: the stream rotates at half-life.
        if !(10..=86_400).contains(&self.x509_svid_ttl) || !(10..=86_400).contains(&self.jwt_svid_ttl) {
            return Err("x509_svid_ttl and jwt_svid_ttl must be between 10 and 86400 seconds".into());
        }
        Ok(Entry {
            id: uuid::Uuid::new_v4().to_string(),
            spiffe_id: id.to_string(),
            selectors: self.selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names,
            hint: self.hint,
            federates_with: self.federates_with,
            created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        })
    }
}

/// The entries, swapped whole; a watch tells open streams they changed.
pub struct Entries {
    list: ArcSwap<Vec<Arc<Entry>>>,
    version: watch::Sender<u64>,
    writes: std::sync::Mutex<()>,
}

impl Entries {
    pub fn new(entries: Vec<Entry>) -> Self {
        Self {
            list: ArcSwap::from_pointee(entries.into_iter().map(Arc::new).collect()),
            version: watch::channel(0).0,
            writes: std::sync::Mutex::new(()),
        }
    }

    pub fn list(&self) -> Vec<Arc<Entry>> {
        self.list.load().as_ref().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.list.load().iter().find(|e| e.id == id).cloned()
    }

    pub fn insert(&self, entry: Entry) {
        let _g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.list();
        next.push(Arc::new(entry));
        self.list.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    pub fn remove(&self, id: &str) {
        let _g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let next: Vec<_> = self.list().into_iter().filter(|e| e.id != id).collect();
        self.list.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    /// Entries whose selectors are all among `selectors`.
    fn matching(&self, selectors: &[String]) -> Vec<Arc<Entry>> {
        self.list
            .load()
            .iter()
            .filter(|e| e.selectors.iter().all(|s| selectors.contains(s)))
            .cloned()
            .collect()
    }
}

/// The gRPC service (cheap to clone: it holds handles).
#[derive(Clone)]
pub struct WorkloadApi {
    pipeline: Arc<Pipeline>,
    entries: Arc<Entries>,
}

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(
            "the `workload.spiffe.io: true` header is required",
        )),
    }
}

/// The evidence for the `unix` module, gathered by the host from the kernel.
fn unix_evidence(pid: Option<i32>, uid: u32, gid: u32) -> Value {
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
    if let Some(pid) = pid
        && let Ok(p) = std::fs::read_link(format!("/proc/{pid}/exe"))
    {
        e["path"] = p.display().to_string().into();
    }
    e
}

impl WorkloadApi {
    /// Attests the caller from the socket's peer credentials.
    async fn attest<T>(&self, req: &Request<T>) -> Result<Attestation, Status> {
        let info = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("the caller's credentials are unknown"))?;
        let evidence = unix_evidence(info.pid(), info.uid(), info.gid()).to_string();
        let p = self.pipeline.clone();
        tokio::task::spawn_blocking(move || {
            let snapshot = p.policies.snapshot();
            p.attest(&snapshot, "unix", &evidence)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::permission_denied(format!("caller attestation failed: {e}")))
    }

    /// The entries the caller matches and policy allows.
    async fn entitled(&self, attestation: &Attestation) -> Result<Vec<Arc<Entry>>, Status> {
        let candidates = self.entries.matching(&attestation.selectors);
        let p = self.pipeline.clone();
        let a = attestation.clone();
        tokio::task::spawn_blocking(move || {
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
        .map_err(|e| Status::internal(e.to_string()))
    }

    /// DER of the trust bundle (concatenated certificates).
    fn bundle_der(&self) -> Vec<u8> {
        pem_to_der(self.pipeline.signer.bundle_pem())
    }

    /// Mints X.509-SVIDs for `entries`; returns the response and the soonest expiry.
    async fn x509_response(&self, entries: &[Arc<Entry>]) -> Result<(X509svidResponse, i64), Status> {
        let p = self.pipeline.clone();
        let entries = entries.to_vec();
        let bundle = self.bundle_der();
        tokio::task::spawn_blocking(move || {
            let mut svids = Vec::new();
            let mut soonest = i64::MAX;
            let mut hints = std::collections::HashSet::new();
            for e in entries {
                // Hints are unique within a response: the first entry keeps it.
                let hint = if e.hint.is_empty() || hints.insert(e.hint.clone()) {
                    e.hint.clone()
                } else {
                    String::new()
                };
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                    .map_err(|e| Status::internal(e.to_string()))?;
                let template = Template {
                    spiffe_id: SpiffeId::parse(&e.spiffe_id).map_err(|e| Status::internal(e.to_string()))?,
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
            Ok((
                X509svidResponse {
                    svids,
                    crl: vec![],
                    federated_bundles: HashMap::new(),
                },
                soonest,
            ))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
    }

    fn jwt_bundles(&self) -> HashMap<String, Vec<u8>> {
        let mut jwks = self.pipeline.signer.jwks();
        if let Some(keys) = jwks["keys"].as_array_mut() {
            for k in keys {
                k["use"] = "jwt-svid".into();
            }
        }
        [(
            format!("spiffe://{}", self.pipeline.trust_domain),
            jwks.to_string().into_bytes(),
        )]
        .into_iter()
        .collect()
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

    async fn fetch_x509svid(
        &self,
        req: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&req)?;
        let attestation = self.attest(&req).await?;
        let entries = self.entitled(&attestation).await?;
        if entries.is_empty() {
            return Err(Status::permission_denied(
                "no identity is registered for this caller",
            ));
        }
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        let mut changed = self.entries.version.subscribe();
        tokio::spawn(async move {
            loop {
                let entries = match this.entitled(&attestation).await {
                    Ok(e) => e,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                if entries.is_empty() {
                    let _ = tx
                        .send(Err(Status::permission_denied(
                            "the caller's identities were removed",
                        )))
                        .await;
                    return;
                }
                let (resp, soonest) = match this.x509_response(&entries).await {
                    Ok(r) => r,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                };
                if tx.send(Ok(resp)).await.is_err() {
                    return;
                }
                // Rotate at half-life, or at once when the entries change.
                let half = ((soonest - now_unix()).max(2) / 2) as u64;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(half)) => {}
                    r = changed.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        req: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&req)?;
        let (tx, rx) = mpsc::channel(1);
        let bundles = [(
            format!("spiffe://{}", self.pipeline.trust_domain),
            self.bundle_der(),
        )]
        .into_iter()
        .collect();
        tokio::spawn(async move {
            if tx
                .send(Ok(X509BundlesResponse { crl: vec![], bundles }))
                .await
                .is_ok()
            {
                // Keep the stream open: a CA rotation will be pushed here.
                tx.closed().await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_jwtsvid(&self, req: Request<JwtsvidRequest>) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&req)?;
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
        let now = now_unix();
        let mut svids = Vec::new();
        for e in entries {
            let claims = json!({ "sub": e.spiffe_id, "aud": body.audience, "iat": now, "exp": now + e.jwt_svid_ttl as i64 });
            let svid = self
                .pipeline
                .signer
                .sign_jwt(&claims)
                .map_err(|e| Status::internal(e.to_string()))?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.clone(),
                svid,
                hint: e.hint.clone(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        req: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&req)?;
        let (tx, rx) = mpsc::channel(1);
        let bundles = self.jwt_bundles();
        tokio::spawn(async move {
            if tx.send(Ok(JwtBundlesResponse { bundles })).await.is_ok() {
                tx.closed().await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&req)?;
        let body = req.into_inner();
        if body.audience.is_empty() || body.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid are required"));
        }
        let keys = crate::trust::KeySet::from_jwks(&self.pipeline.signer.jwks())
            .map_err(|e| Status::internal(e.to_string()))?;
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

/// Serves the Workload API on a bound socket until the process ends.
pub async fn serve(
    pipeline: Arc<Pipeline>,
    entries: Arc<Entries>,
    listener: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    let svc = WorkloadApi { pipeline, entries };
    tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(svc))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
