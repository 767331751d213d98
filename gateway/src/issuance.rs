//! The attested-issuance pipeline: evidence → attest (WASM) → decide (Rego)
//! → sign → record. Surfaces call [`Pipeline::issue_attested`]; it fails
//! closed: any error in any stage means nothing is signed, or nothing signed
//! leaves the process.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use time::Duration;
use tokio::sync::Semaphore;
use x509_parser::prelude::FromDer;

use crate::attest::{AttestError, Attestation, Attestors};
use crate::config::IssuanceConfig;
use crate::policy::{Policies, PolicyError};
use crate::signer::{IssuedCertificate, Signer, Template};
use crate::spiffe_id::SpiffeId;
use crate::store::{AuditEvent, CertificateRecord, Store, StoreError};
use crate::trust::Registry;
use crate::util::{rfc3339, sha256_hex};

/// Input document version given to policies.
pub const POLICY_INPUT_VERSION: u32 = 1;

/// Longest CSR accepted, in PEM characters.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// Why an issuance was refused. Each maps to one problem type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssuanceError {
    /// The request is malformed (missing fields, out-of-range values).
    #[error("{0}")]
    BadRequest(String),
    /// The CSR does not parse, its signature does not verify, or its key is
    /// not acceptable.
    #[error("{0}")]
    BadCsr(String),
    /// No attestor handles the method.
    #[error("unknown attestation method `{0}`")]
    UnknownMethod(String),
    /// The method has no trust source configured.
    #[error("{0}")]
    NoTrustSource(String),
    /// The evidence did not prove anything.
    #[error("{0}")]
    AttestationFailed(String),
    /// Policy said no.
    #[error("policy denied the request: {}", .0.join("; "))]
    PolicyDenied(Vec<String>),
    /// A stage failed (module trap, policy error, signer error).
    #[error("{0}")]
    Internal(String),
    /// The store could not durably record the issuance.
    #[error("{0}")]
    Unavailable(String),
}

/// An attested issuance request, as parsed by a surface.
#[derive(Debug, Clone)]
pub struct AttestedRequest {
    pub method: String,
    pub evidence: String,
    pub csr_pem: String,
    pub ttl_seconds: Option<u64>,
}

/// What the caller gets back.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub spiffe_id: String,
    pub certificate_pem: String,
    pub chain_pem: String,
    pub bundle_pem: String,
    pub serial: String,
    pub not_after: String,
    pub attestation: AttestationSummary,
}

/// The attestation as shown to the caller: no claims, which may be sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct AttestationSummary {
    pub method: String,
    pub subject: String,
    pub selectors: Vec<String>,
}

impl From<Attestation> for AttestationSummary {
    fn from(a: Attestation) -> Self {
        Self {
            method: a.method,
            subject: a.subject,
            selectors: a.selectors,
        }
    }
}

/// Everything the pipeline needs; shared by all surfaces.
pub struct Pipeline {
    pub trust_domain: String,
    pub attestors: Arc<Attestors>,
    pub trust: Arc<Registry>,
    pub policies: Arc<Policies>,
    pub signer: Arc<dyn Signer>,
    pub store: Arc<dyn Store>,
    pub limits: IssuanceConfig,
    /// The externally reachable base URL (`iss` of JWT-SVIDs, discovery).
    pub public_url: std::sync::OnceLock<String>,
    /// Bounds CPU work in flight (attest + decide + sign) to what the
    /// blocking pool and the instance pool can take.
    permits: Semaphore,
    /// Single-use evidence already seen.
    replay: crate::attest::replay::ReplayCache,
    /// Nonces issued to clients of challenge-based methods.
    pub challenges: crate::attest::challenge::Challenges,
}

/// A verified CSR: its public key and nothing else from it is used.
pub struct VerifiedCsr {
    pub spki_der: Vec<u8>,
}

impl Pipeline {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust_domain: String,
        attestors: Arc<Attestors>,
        trust: Arc<Registry>,
        policies: Arc<Policies>,
        signer: Arc<dyn Signer>,
        store: Arc<dyn Store>,
        limits: IssuanceConfig,
        max_in_flight: usize,
    ) -> Self {
        Self {
            trust_domain,
            attestors,
            trust,
            policies,
            signer,
            store,
            limits,
            public_url: std::sync::OnceLock::new(),
            permits: Semaphore::new(max_in_flight.max(1)),
            replay: Default::default(),
            challenges: Default::default(),
        }
    }

    /// Runs the whole pipeline for one attested issuance.
    pub async fn issue_attested(self: &Arc<Self>, req: AttestedRequest) -> Result<Issued, IssuanceError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| IssuanceError::Unavailable("shutting down".into()))?;
        let this = self.clone();
        let (attestation, cert, spiffe_id, spki_sha) =
            tokio::task::spawn_blocking(move || this.attest_decide_sign(&req))
                .await
                .map_err(|e| IssuanceError::Internal(format!("issuance task failed: {e}")))??;

        let record = CertificateRecord {
            serial: cert.serial.clone(),
            spiffe_id: spiffe_id.clone(),
            not_before: rfc3339(cert.not_before),
            not_after: rfc3339(cert.not_after),
            source: "attested-issuance".into(),
            method: attestation.method.clone(),
            subject: attestation.subject.clone(),
            public_key_sha256: spki_sha,
            issued_at: rfc3339(time::OffsetDateTime::now_utc()),
        };
        let event = AuditEvent {
            kind: "issuance.issued".into(),
            actor: format!("evidence:{}", attestation.method),
            detail: serde_json::json!({
                "surface": "attested-issuance",
                "serial": record.serial,
                "spiffe_id": record.spiffe_id,
                "subject": record.subject,
                "selectors": attestation.selectors,
                "not_after": record.not_after,
                "policy_revision": self.policies.revision(),
            }),
        };
        // Durable before the answer leaves: a certificate nobody recorded is
        // never handed out.
        self.store
            .record_issuance(record, event)
            .await
            .map_err(|e: StoreError| {
                tracing::error!(error = %e, "could not record issuance; certificate withheld");
                IssuanceError::Unavailable("the issuance could not be recorded; nothing was issued".into())
            })?;

        Ok(Issued {
            spiffe_id,
            chain_pem: format!("{}{}", cert.pem, self.signer.intermediates_pem()),
            certificate_pem: cert.pem,
            bundle_pem: self.signer.bundle_pem().to_owned(),
            serial: cert.serial,
            not_after: rfc3339(cert.not_after),
            attestation: attestation.into(),
        })
    }

    /// Runs the attestor for `method` over `evidence` with the modules of
    /// `snapshot`. Blocking.
    pub fn attest(
        &self,
        snapshot: &crate::policy::Loaded,
        method: &str,
        evidence: &str,
    ) -> Result<Attestation, IssuanceError> {
        self.attest_bound(snapshot, method, evidence, None)
    }

    /// Attests, telling the module the public key the caller wants
    /// certified (`context.key_sha256`, hex SHA-256 of its DER
    /// SubjectPublicKeyInfo) so that evidence able to carry it is bound to
    /// it, and resolving the server challenge the evidence names
    /// (`context.challenge`).
    pub fn attest_bound(
        &self,
        snapshot: &crate::policy::Loaded,
        method: &str,
        evidence: &str,
        key_spki: Option<&[u8]>,
    ) -> Result<Attestation, IssuanceError> {
        if !snapshot.modules.contains_key(method) {
            return Err(IssuanceError::UnknownMethod(printable(method)));
        }
        let mut context = serde_json::json!({ "trust_domain": self.trust_domain });
        if let Some(spki) = key_spki {
            context["key_sha256"] = crate::util::sha256_hex(spki).into();
        }
        // Host-gathered evidence (the Workload API's) never answers a
        // challenge: skip parsing it on that path.
        let challenge = if crate::attest::HOST_EVIDENCE_METHODS.contains(&method) {
            None
        } else {
            crate::attest::challenge::challenge_id(evidence)
        };
        if let Some(id) = challenge {
            let challenge = self
                .challenges
                .take(&id, method, crate::util::now_unix())
                .map_err(|e| IssuanceError::AttestationFailed(format!("attestation failed: {e}")))?;
            context["challenge"] = challenge;
        }
        let attestation = self
            .attestors
            .attest_in(
                &snapshot.modules,
                method,
                evidence,
                self.trust.snapshot(),
                &context,
            )
            .map_err(|e| match e {
                AttestError::UnknownMethod(m) => IssuanceError::UnknownMethod(m),
                AttestError::NoTrustSource(m) => IssuanceError::NoTrustSource(m),
                AttestError::Malformed(_) | AttestError::Rejected(_) => {
                    IssuanceError::AttestationFailed(format!("attestation failed: {e}"))
                }
                AttestError::Config(_) | AttestError::Module(_) | AttestError::Load { .. } => {
                    tracing::warn!(method, error = %e, "attestor failed");
                    IssuanceError::Internal(format!("attestation could not be completed: {e}"))
                }
            })?;
        if let Some(once) = &attestation.single_use {
            let now = crate::util::now_unix();
            // The memory answers repeats cheaply; the store makes the spend
            // survive a restart. Both must agree it is the first use.
            self.replay
                .first_use(method, &once.id, once.until, now)
                .map_err(|e| IssuanceError::AttestationFailed(format!("attestation failed: {e}")))?;
            let handle = tokio::runtime::Handle::try_current()
                .map_err(|_| IssuanceError::Internal("single-use evidence needs the runtime".into()))?;
            let key = format!("{method}\u{0}{}", once.id);
            let first = handle
                .block_on(self.store.spend(&key, once.until, now))
                .map_err(|e| IssuanceError::Internal(format!("could not record single-use evidence: {e}")))?;
            if !first {
                return Err(IssuanceError::AttestationFailed(
                    "attestation failed: this evidence was already used".into(),
                ));
            }
        }
        Ok(attestation)
    }

    /// Checks a policy's SPIFFE ID and lifetime against the server's limits;
    /// returns the ID and the lifetime after the operator's hard cap.
    pub fn check_identity(
        &self,
        spiffe_id: Option<String>,
        ttl: Option<u64>,
    ) -> Result<(SpiffeId, u64), IssuanceError> {
        let invalid =
            |m: String| IssuanceError::Internal(format!("the policy returned an invalid decision: {m}"));
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

    fn attest_decide_sign(
        &self,
        req: &AttestedRequest,
    ) -> Result<(Attestation, IssuedCertificate, String, String), IssuanceError> {
        if let Some(ttl) = req.ttl_seconds
            && ttl < self.limits.min_ttl_seconds
        {
            return Err(IssuanceError::BadRequest(format!(
                "ttl_seconds must be at least {}",
                self.limits.min_ttl_seconds
            )));
        }
        let csr = verify_csr(&req.csr_pem)?;
        // One snapshot for the whole request: it never mixes two bundles.
        let snapshot = self.policies.snapshot();
        let attestation = self.attest_bound(&snapshot, &req.method, &req.evidence, Some(&csr.spki_der))?;

        let input = serde_json::json!({
            "version": POLICY_INPUT_VERSION,
            "trust_domain": self.trust_domain,
            "attestation": attestation,
            "request": {
                "ttl_seconds": req.ttl_seconds,
                "dns_names": Value::Array(vec![]),
            },
        });
        let decision = snapshot.decide_issuance(&input).map_err(|e: PolicyError| {
            tracing::error!(error = %e, "policy evaluation failed");
            IssuanceError::Internal(format!("the policy could not decide: {e}"))
        })?;
        if !decision.allow {
            let reasons = if decision.reasons.is_empty() {
                vec!["no reason given".to_owned()]
            } else {
                decision.reasons
            };
            return Err(IssuanceError::PolicyDenied(reasons));
        }
        let (spiffe_id, ttl) = self.check_identity(decision.spiffe_id, decision.ttl_seconds)?;

        let template = Template {
            spiffe_id: spiffe_id.clone(),
            public_key_der: csr.spki_der.clone(),
            ttl: Duration::seconds(ttl as i64),
            dns_names: decision.dns_names,
            extensions: Vec::new(),
        };
        let cert = self.signer.sign_x509_svid(&template).map_err(|e| {
            tracing::error!(error = %e, "signer failed");
            IssuanceError::Internal("the signer could not issue the certificate".into())
        })?;
        Ok((
            attestation,
            cert,
            spiffe_id.to_string(),
            sha256_hex(&csr.spki_der),
        ))
    }
}

/// Parses a PEM CSR, verifies its self-signature and checks its key.
pub fn verify_csr(pem_text: &str) -> Result<VerifiedCsr, IssuanceError> {
    let bad = |m: &str| IssuanceError::BadCsr(format!("csr: {m}"));
    if pem_text.len() > MAX_CSR_BYTES {
        return Err(bad("too large"));
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|_| bad("not PEM"))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad("PEM block is not a CERTIFICATE REQUEST"));
    }
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
        .map_err(|_| bad("not a PKCS#10 certification request"))?;
    if !rest.is_empty() {
        return Err(bad("trailing data after the request"));
    }
    csr.verify_signature()
        .map_err(|_| bad("signature does not verify with the request's own key"))?;
    let spki = &csr.certification_request_info.subject_pki;
    check_public_key(spki).map_err(|m| bad(&m))?;
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

/// Accepts EC P-256/P-384, Ed25519 and RSA of 2048 to 8192 bits.
fn check_public_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    use x509_parser::public_key::PublicKey;
    match spki
        .parsed()
        .map_err(|_| "public key does not parse".to_owned())?
    {
        PublicKey::EC(point) => match point.key_size() {
            256 | 384 => Ok(()),
            n => Err(format!("EC keys must be P-256 or P-384, not {n} bits")),
        },
        PublicKey::RSA(rsa) => match rsa.key_size() {
            2048..=8192 => Ok(()),
            n => Err(format!("RSA keys must be 2048 to 8192 bits, not {n}")),
        },
        PublicKey::Unknown(_) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        _ => Err("key type not accepted (EC P-256/P-384, Ed25519 or RSA)".into()),
    }
}

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}
