//! The engine: every credential, whatever surface asked for it, goes
//! through here, and only here, in one order:
//!
//! ```text
//! admit ─▶ snapshot ─▶ attest ─▶ decide ─▶ [approve] ─▶ sign ─▶ record ─▶ respond
//!         (policies    (WASM)    (Rego,     (people)   (signer) (store)
//!          + modules)            logged)
//! ```
//!
//! - **admit**: one back-pressure limit ([`Admission`]) shared by all flows.
//! - **snapshot**: the policies and attestor modules are taken once per
//!   request, so a bundle swap never mixes two bundles in one decision.
//! - **attest**: the method's module verifies the evidence. Methods whose
//!   evidence the host gathers (`unix`) are accepted only from the Workload
//!   API adapter; every other surface is refused before any module runs.
//! - **decide**: the flow's Rego package over a typed, versioned input;
//!   decisions are logged when decision logs are on.
//! - **approve**, **sign**, **record**: pending requests wait for votes; the
//!   signer mints; the credential and its audit entry are durable before the
//!   answer leaves. Every refusal is audited here, whatever the surface.
//!
//! Flows: attested issuance ([`issuance`]), just-in-time requests
//! ([`ephemeral`]), agent identities and token exchange ([`broker`]),
//! Workload API SVIDs ([`workload`]) and join tokens ([`join_token`]).
//! Surfaces (HTTP, the Workload API socket) parse, authenticate, call one
//! of these and render; they never assemble stages themselves.

mod admission;
mod authorities;
pub mod broker;
mod csr;
pub mod ephemeral;
mod errors;
mod evidence_cache;
pub mod explain;
pub mod issuance;
pub mod join_token;
mod refusals;
pub mod upstream;
pub mod workload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde_json::json;
use tokio::sync::Notify;

pub use admission::{Admission, Admitted};
pub use csr::{VerifiedCsr, verify_csr};
pub use errors::{AttestationFailure, EngineError};

use crate::attest::challenge::{ChallengeError, Challenges};
use crate::attest::replay::ReplayCache;
use crate::attest::{AttestError, Attestors, HOST_EVIDENCE_METHODS};
use crate::auth::OidcIssuers;
use crate::config::IssuanceConfig;
use crate::entries::Entries;
use crate::model::{Actor, Attestation, AuditEvent, AuditKind};
use crate::policy::{Loaded, Policies};
use crate::signer::{IssuedCertificate, Signer, Template};
use crate::spiffe_id::SpiffeId;
use crate::store::Store;
use crate::trust::Registry;

/// Where a request came from. It decides which evidence is acceptable (host
/// evidence only from the Workload API) and how a refusal is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `POST /api/v1/workloads/attested-issuance`.
    AttestedIssuance,
    /// `/api/v1/ephemeral`.
    Ephemeral,
    /// `POST /api/v1/broker/agent-identities`.
    Broker,
    /// `POST /oauth2/token` (RFC 8693).
    TokenExchange,
    /// The SPIFFE Workload API socket.
    WorkloadApi,
    /// `POST /api/v1/join-tokens`.
    JoinToken,
}

impl Surface {
    pub fn as_str(self) -> &'static str {
        match self {
            Surface::AttestedIssuance => "attested-issuance",
            Surface::Ephemeral => "ephemeral",
            Surface::Broker => "broker",
            Surface::TokenExchange => "token-exchange",
            Surface::WorkloadApi => "workload_api",
            Surface::JoinToken => "join-token",
        }
    }

    /// Whether this surface gathers evidence itself, from the kernel.
    fn gathers_host_evidence(self) -> bool {
        self == Surface::WorkloadApi
    }

    /// The audit kind of a refusal on this surface.
    fn refusal_kind(self) -> AuditKind {
        match self {
            Surface::AttestedIssuance => AuditKind::IssuanceRefused,
            Surface::Ephemeral => AuditKind::EphemeralRefused,
            Surface::Broker | Surface::TokenExchange => AuditKind::BrokerRefused,
            Surface::WorkloadApi => AuditKind::WorkloadRefused,
            Surface::JoinToken => AuditKind::JoinTokenRefused,
        }
    }
}

/// A refusal as the audit log records it.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub surface: Surface,
    /// What was attempted on the surface (`create`, `vote`, `fetch_x509_svid`…).
    pub operation: &'static str,
    pub actor: Actor,
    /// The attestation method named, when there was one.
    pub method: Option<String>,
    /// The caller's selectors, when attestation got that far.
    pub selectors: Option<Vec<String>>,
    /// Why no entry gave the caller an identity (Workload API).
    pub explanation: Option<serde_json::Value>,
}

impl Refusal {
    pub fn new(surface: Surface, operation: &'static str, actor: Actor) -> Self {
        Self {
            surface,
            operation,
            actor,
            method: None,
            selectors: None,
            explanation: None,
        }
    }

    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(printable(method));
        self
    }
}

/// What the engine is built from.
pub struct Parts {
    pub trust_domain: String,
    pub attestors: Arc<Attestors>,
    pub trust: Arc<Registry>,
    pub policies: Arc<Policies>,
    pub signer: Arc<dyn Signer>,
    pub store: Store,
    pub limits: IssuanceConfig,
    pub entries: Arc<Entries>,
    pub oidc: Arc<OidcIssuers>,
    /// Requests doing CPU work at once (see [`Admission`]).
    pub max_in_flight: usize,
    /// When automatic rotation acts (none: only by hand).
    pub rotation: Option<crate::signer::authorities::Schedule>,
}

/// The engine shared by every surface.
pub struct Engine {
    pub trust_domain: String,
    pub attestors: Arc<Attestors>,
    pub trust: Arc<Registry>,
    pub policies: Arc<Policies>,
    pub signer: Arc<dyn Signer>,
    pub store: Store,
    pub limits: IssuanceConfig,
    /// Workload API registration entries.
    pub entries: Arc<Entries>,
    /// The externally reachable base URL (`iss` of JWT-SVIDs, discovery).
    pub public_url: OnceLock<String>,
    /// Nonces issued to clients of challenge-based methods.
    pub challenges: Challenges,
    admission: Admission,
    /// Single-use evidence already seen (the store keeps it across restarts).
    replay: ReplayCache,
    /// Verified bearer tokens, reused until they expire.
    evidence: evidence_cache::EvidenceCache,
    /// How many refusals are written to the audit log one by one.
    refusals: refusals::RefusalBudget,
    /// Workload API SVIDs shared by the callers of one entry.
    svids: workload::SvidCache,
    decisions: workload::WorkloadDecisions,
    /// Delegation verification and the revoked-token set.
    delegations: broker::Delegations,
    /// Waiters per ephemeral request id, woken on every transition.
    watchers: Mutex<HashMap<String, Arc<Notify>>>,
    /// The generation of the authorities last published.
    authority_generation: tokio::sync::watch::Sender<u64>,
    rotation: Option<crate::signer::authorities::Schedule>,
}

impl Engine {
    /// Builds the engine; loads the revoked-token set from the store.
    pub async fn new(parts: Parts) -> Result<Arc<Self>, EngineError> {
        let authorities = parts.signer.authorities();
        let delegations = broker::Delegations::load(&parts.store, parts.oidc, &authorities.jwks()).await?;
        // Waiting requests hold no CPU: let many queue behind the permits
        // before answering `overloaded`.
        let max_waiting = parts.max_in_flight.max(1) * 64;
        Ok(Arc::new(Self {
            trust_domain: parts.trust_domain,
            attestors: parts.attestors,
            trust: parts.trust,
            policies: parts.policies,
            signer: parts.signer,
            store: parts.store.clone(),
            evidence: evidence_cache::EvidenceCache::new(parts.limits.evidence_cache_entries),
            limits: parts.limits,
            entries: parts.entries,
            public_url: OnceLock::new(),
            challenges: Challenges::new(parts.store.clone()),
            admission: Admission::new(parts.max_in_flight, max_waiting),
            replay: ReplayCache::default(),
            refusals: refusals::RefusalBudget::default(),
            svids: workload::SvidCache::default(),
            decisions: workload::WorkloadDecisions::default(),
            delegations,
            watchers: Mutex::new(HashMap::new()),
            authority_generation: tokio::sync::watch::Sender::new(authorities.generation),
            rotation: parts.rotation,
        }))
    }

    /// The `iss` of every JWT-SVID and of discovery.
    pub fn issuer(&self) -> String {
        self.public_url
            .get()
            .cloned()
            .unwrap_or_else(|| format!("spiffe://{}", self.trust_domain))
    }

    /// Admission: waits for a permit or refuses with `overloaded`.
    pub async fn admit(&self) -> Result<Admitted<'_>, EngineError> {
        self.admission.admit().await
    }

    /// Runs a request's CPU stages (attest, decide, sign) on the blocking
    /// pool under an admission permit. The permit covers CPU work only: a
    /// request waiting for its record to become durable holds none, so many
    /// share one group commit while the CPU stays bounded.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let _admitted = self.admit().await?;
        tokio::task::spawn_blocking(f).await.map_err(EngineError::Task)?
    }

    /// The attest stage. Blocking. Tells the module the public key the
    /// caller wants certified (`context.key_sha256`) so that evidence able
    /// to carry it is bound to it, resolves the server challenge the
    /// evidence names, and spends single-use evidence (in memory and
    /// durably) before the attestation counts.
    fn attest(
        &self,
        surface: Surface,
        snapshot: &Loaded,
        method: &str,
        evidence: &str,
        key_spki: Option<&[u8]>,
    ) -> Result<Attestation, EngineError> {
        let _timer = crate::metrics::StageTimer::start("attest");
        // Flows check this first; checked again here, where modules run.
        check_method(surface, method)?;
        let host_evidence = HOST_EVIDENCE_METHODS.contains(&method);
        let Some(module) = snapshot.modules.get(method) else {
            return Err(EngineError::UnknownMethod(printable(method)));
        };
        let mut context = json!({ "trust_domain": self.trust_domain });
        let key_sha256 = key_spki.map(crate::util::sha256_hex);
        if let Some(k) = &key_sha256 {
            context["key_sha256"] = k.clone().into();
        }
        // Host-gathered evidence never answers a challenge.
        let challenge = if host_evidence {
            None
        } else {
            crate::attest::challenge::challenge_id(evidence)
        };
        let trust = self.trust.snapshot();
        let cacheable = challenge.is_none() && self.evidence.applies(method);
        let under = evidence_cache::Under {
            method,
            evidence,
            key_sha256: key_sha256.as_deref(),
            trust: &trust,
            module,
            now: crate::util::now_unix(),
        };
        if cacheable {
            let cached = self.evidence.get(&under);
            crate::metrics::get().evidence_cache(cached.is_some());
            if let Some(attestation) = cached {
                return Ok(attestation);
            }
        }
        if let Some(id) = challenge {
            let taken = block_on(self.challenges.take(&id, method, crate::util::now_unix()))?;
            let challenge = taken.map_err(|e| match e {
                ChallengeError::Unavailable(m) => {
                    EngineError::Store(crate::store::StoreError::Backend(m.into()))
                }
                e => EngineError::AttestationFailed(e.into()),
            })?;
            context["challenge"] = challenge;
        }
        let attestation = self
            .attestors
            .attest_in(&snapshot.modules, method, evidence, trust.clone(), &context)
            .map_err(|e| {
                let e = attest_error(e);
                if let EngineError::Attestor(other) = &e {
                    tracing::warn!(method, error = %other, "attestor failed");
                }
                e
            })?;
        if let Some(once) = &attestation.single_use {
            self.spend(method, once)?;
        }
        if cacheable {
            self.evidence.put(&under, &attestation);
        }
        Ok(attestation)
    }

    /// Spends single-use evidence. The memory answers repeats cheaply; the
    /// store makes the spend survive a restart. Both must agree it is the
    /// first use. Blocking (called from the blocking pool).
    fn spend(&self, method: &str, once: &crate::model::SingleUse) -> Result<(), EngineError> {
        let now = crate::util::now_unix();
        self.replay
            .first_use(method, &once.id, once.until, now)
            .map_err(|e| EngineError::AttestationFailed(e.into()))?;
        let key = format!("{method}\u{0}{}", once.id);
        if !block_on(self.store.spend(&key, once.until, now))?? {
            return Err(EngineError::AttestationFailed(AttestationFailure::Spent));
        }
        Ok(())
    }

    /// Checks a policy's SPIFFE ID and lifetime against the server's limits;
    /// returns the ID and the lifetime after the operator's hard cap.
    pub fn check_identity(
        &self,
        spiffe_id: Option<String>,
        ttl: Option<u64>,
    ) -> Result<(SpiffeId, u64), EngineError> {
        let invalid = EngineError::InvalidDecision;
        let spiffe_id = spiffe_id.ok_or_else(|| invalid("allow without spiffe_id".into()))?;
        let spiffe_id = SpiffeId::parse(&spiffe_id).map_err(|e| invalid(format!("spiffe_id: {e}")))?;
        if spiffe_id.trust_domain() != self.trust_domain {
            return Err(invalid(format!(
                "spiffe_id `{spiffe_id}` is outside the trust domain {}",
                self.trust_domain
            )));
        }
        if spiffe_id.path().is_empty() {
            return Err(invalid(format!(
                "spiffe_id `{spiffe_id}` names the trust domain, not a workload"
            )));
        }
        let ttl = ttl.ok_or_else(|| invalid("allow without ttl_seconds".into()))?;
        if ttl < self.limits.min_ttl_seconds {
            return Err(invalid(format!("ttl_seconds {ttl} is below the minimum")));
        }
        // The operator's hard cap holds whatever the policy says.
        Ok((spiffe_id, ttl.min(self.limits.max_ttl_seconds)))
    }

    /// A requested lifetime below the server's minimum is a bad request.
    fn check_requested_ttl(&self, ttl: Option<u64>) -> Result<(), EngineError> {
        match ttl {
            Some(t) if t < self.limits.min_ttl_seconds => Err(EngineError::BadRequest(format!(
                "ttl_seconds must be at least {}",
                self.limits.min_ttl_seconds
            ))),
            _ => Ok(()),
        }
    }

    /// The sign stage for X.509-SVIDs. Blocking.
    /// The lifetime is capped at what is left of the CA's; when that is
    /// below the minimum lifetime, nothing is signed (`ca-unavailable`).
    fn sign_x509(&self, template: &Template) -> Result<IssuedCertificate, EngineError> {
        let ttl = self.authority_ttl(template.ttl)?;
        let capped;
        let template = if ttl < template.ttl {
            capped = Template {
                ttl,
                ..template.clone()
            };
            &capped
        } else {
            template
        };
        let _timer = crate::metrics::StageTimer::start("sign");
        Ok(self.signer.sign_x509_svid(template)?)
    }

    /// `ttl`, within what is left of the CA's life; refused when that is
    /// below the minimum lifetime or the CA is not valid yet.
    fn authority_ttl(&self, ttl: time::Duration) -> Result<time::Duration, EngineError> {
        let (from, until) = self.authorities().x509_validity();
        let at = |t| time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        let (from, until) = (at(from), at(until));
        let now = time::OffsetDateTime::now_utc();
        let left = until - now;
        let min = time::Duration::seconds(self.limits.min_ttl_seconds.max(1) as i64);
        if now < from || left < min {
            let why = if now < from || left <= time::Duration::ZERO {
                crate::signer::authority_problem(from, until, now)
            } else {
                format!(
                    "the CA expires at {}, sooner than the shortest credential it may sign ({} s); rotate the CA",
                    crate::util::rfc3339(until),
                    min.whole_seconds()
                )
            };
            tracing::error!(%why, "refusing to sign");
            return Err(EngineError::CaUnavailable(why));
        }
        Ok(ttl.min(left))
    }

    /// A signed certificate as the requester receives it: the leaf, its
    /// chain and the trust anchors.
    fn delivered(&self, cert: IssuedCertificate) -> crate::model::IssuedCert {
        crate::model::IssuedCert {
            chain_pem: format!("{}{}", cert.pem, cert.chain_pem),
            certificate_pem: cert.pem,
            bundle_pem: self.authorities().bundle_pem().to_owned(),
            serial: cert.serial,
            not_after: crate::util::rfc3339(cert.not_after),
        }
    }

    /// Appends an audit event; a failure is logged, never hidden from the
    /// operator, but does not change an answer already decided.
    pub async fn audit(&self, event: AuditEvent) {
        let kind = event.kind.clone();
        if let Err(e) = self.store.audit(event).await {
            tracing::error!(error = %e, %kind, "could not write audit event");
        }
    }

    /// Audits a refusal. Every flow calls this on every error, and surfaces
    /// call it for requests refused before they reach a flow (malformed or
    /// oversized bodies), so each refusal is recorded exactly once. The
    /// record carries the request's id ([`request_id`]), which
    /// `castellan explain --refusal` finds it by; the id is returned.
    pub async fn audit_refusal(&self, refusal: Refusal, error: &EngineError) -> String {
        let request_id = request_id().unwrap_or_else(new_request_id);
        let mut detail = json!({
            "request_id": request_id,
            "surface": refusal.surface.as_str(),
            "operation": refusal.operation,
            "status": error.status(),
            "problem": error.slug(),
            "detail": error.detail(),
        });
        if let Some(m) = refusal.method {
            detail["method"] = m.into();
        }
        if let Some(s) = refusal.selectors {
            detail["selectors"] = s.into();
        }
        if let Some(r) = error.reasons() {
            detail["reasons"] = r.into();
        }
        if let Some(x) = refusal.explanation {
            detail["explanation"] = x;
        }
        let event = AuditEvent::new(refusal.surface.refusal_kind(), refusal.actor, detail);
        self.audit_refused(event, error.slug()).await;
        request_id
    }

    /// Writes a refusal record within the refusal budget; past it, the
    /// refusal is counted for the next `audit.refusals_suppressed` summary.
    pub async fn audit_refused(&self, event: AuditEvent, problem: &str) {
        let kind = event.kind.as_str();
        let flow = kind.strip_suffix(".refused").unwrap_or(kind).to_owned();
        // A method no module serves is the caller's word: not a label.
        let method = match event.detail["method"].as_str() {
            Some(m) if self.policies.snapshot().modules.contains_key(m) => m.to_owned(),
            Some(_) => "unknown".to_owned(),
            None => String::new(),
        };
        crate::metrics::get()
            .refused
            .get_or_create(&crate::metrics::Refused {
                flow,
                method,
                reason: problem.to_owned(),
            })
            .inc();
        if self.refusals.admit(event.kind.as_str(), problem) {
            self.audit(event).await;
        } else {
            tracing::debug!(kind = %event.kind.as_str(), problem, "refusal counted, not written (refusal budget)");
        }
    }

    /// Writes the summary of refusals suppressed since the last one.
    pub(super) async fn summarise_suppressed_refusals(&self) {
        if let Some((since, counts)) = self.refusals.take_summary() {
            let counts: Vec<serde_json::Value> = counts
                .into_iter()
                .map(|((kind, problem), n)| json!({"kind": kind, "problem": problem, "count": n}))
                .collect();
            let event = AuditEvent::new(
                AuditKind::RefusalsSuppressed,
                Actor::Castellan,
                json!({ "since": since, "refusals": counts }),
            );
            self.audit(event).await;
        }
    }

    /// Audits `result`'s error, if any, and passes it on. The refusal
    /// record is built only on error: a request that succeeds pays nothing.
    async fn audited<T>(
        &self,
        refusal: impl FnOnce() -> Refusal,
        result: Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        if let Err(e) = &result {
            self.audit_refusal(refusal(), e).await;
        }
        result
    }
}

tokio::task_local! {
    /// The id of the request being served, set by the surface that took it.
    static REQUEST_ID: String;
}

/// Runs `f` as request `id`: a refusal it leads to is recorded under it.
pub async fn as_request<F: std::future::Future>(id: String, f: F) -> F::Output {
    REQUEST_ID.scope(id, f).await
}

/// The id of the request being served, if a surface named one.
pub fn request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// A fresh request id.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Waits for `f` from a blocking stage (on the blocking pool, inside the
/// runtime).
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, EngineError> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| EngineError::Internal("a blocking stage ran outside the runtime"))?;
    Ok(handle.block_on(f))
}

/// Refuses a method whose evidence only the host gathers on a surface
/// where the caller supplies the evidence. Flows call this before any
/// other work (delegation, attestation, policy), so a caller claiming to be
/// a local process is refused the same way everywhere.
fn check_method(surface: Surface, method: &str) -> Result<(), EngineError> {
    if HOST_EVIDENCE_METHODS.contains(&method) && !surface.gathers_host_evidence() {
        return Err(EngineError::HostEvidenceOnly(printable(method)));
    }
    Ok(())
}

/// What an attestor's error means for the request.
fn attest_error(e: AttestError) -> EngineError {
    match e {
        AttestError::UnknownMethod(m) => EngineError::UnknownMethod(m),
        AttestError::NoTrustSource(m) => EngineError::NoTrustSource(m),
        AttestError::Malformed(_) | AttestError::Rejected(_) => {
            EngineError::AttestationFailed(AttestationFailure::Evidence(e))
        }
        other => EngineError::Attestor(other),
    }
}

/// At most 64 printable characters of a caller-supplied name.
pub fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

/// Reasons, or one that says none was given.
fn reasons_or_default(reasons: Vec<String>) -> Vec<String> {
    if reasons.is_empty() {
        vec!["no reason given".to_owned()]
    } else {
        reasons
    }
}

#[cfg(test)]
mod tests;
