//! Attested issuance: evidence and a CSR in, an X.509-SVID out, with no
//! person involved. The evidence is the only credential.

use std::sync::Arc;

use serde::Serialize;
use time::Duration;

use super::{Engine, EngineError, Refusal, Surface, reasons_or_default, verify_csr};
use crate::model::policy::{INPUT_VERSION, IssuanceAsk, IssuanceInput};
use crate::model::{
    Actor, Attestation, AttestationSummary, AuditEvent, AuditKind, CertificateRecord, Source,
};
use crate::signer::{IssuedCertificate, Template};
use crate::util::{rfc3339, sha256_hex};

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

/// What the blocking stages produce for the record stage.
struct Signed {
    attestation: Attestation,
    cert: IssuedCertificate,
    spiffe_id: String,
    spki_sha256: String,
    policy_revision: String,
}

impl Engine {
    /// Runs the whole pipeline for one attested issuance. A refusal is
    /// audited as `issuance.refused`.
    pub async fn issue_attested(self: &Arc<Self>, req: AttestedRequest) -> Result<Issued, EngineError> {
        let method = req.method.clone();
        let result = self.issue_attested_inner(req).await;
        let refusal = || {
            Refusal::new(
                Surface::AttestedIssuance,
                "issue",
                Actor::Evidence(super::printable(&method)),
            )
            .method(&method)
        };
        self.audited(refusal, result).await
    }

    async fn issue_attested_inner(self: &Arc<Self>, req: AttestedRequest) -> Result<Issued, EngineError> {
        super::check_method(Surface::AttestedIssuance, &req.method)?;
        // Evidence verified before leaves a CSR check, a remembered decision
        // and a signature: cheaper than handing the request to the blocking
        // pool and back, so it runs here, under an admission permit all the
        // same. Anything else (a sandbox call, a policy evaluation) goes to
        // the blocking pool.
        let signed = if self
            .evidence
            .probably_has(&req.method, &req.evidence, crate::util::now_unix())
        {
            let _admitted = self.admit().await?;
            self.attest_decide_sign(&req)?
        } else {
            let engine = self.clone();
            self.blocking(move || engine.attest_decide_sign(&req)).await?
        };
        let Signed {
            attestation,
            cert,
            spiffe_id,
            spki_sha256,
            policy_revision,
        } = signed;
        let record = CertificateRecord {
            serial: cert.serial.clone(),
            spiffe_id: spiffe_id.clone(),
            not_before: rfc3339(cert.not_before),
            not_after: rfc3339(cert.not_after),
            source: Source::AttestedIssuance,
            method: attestation.method.clone(),
            subject: attestation.subject.clone(),
            public_key_sha256: spki_sha256,
            issued_at: rfc3339(time::OffsetDateTime::now_utc()),
            selectors: attestation.selectors.clone(),
        };
        let event = AuditEvent::new(
            AuditKind::IssuanceIssued,
            Actor::workload(&attestation.method, &attestation.subject),
            serde_json::json!({
                "surface": Surface::AttestedIssuance.as_str(),
                "serial": record.serial,
                "spiffe_id": record.spiffe_id,
                "subject": record.subject,
                "selectors": attestation.selectors,
                "not_after": record.not_after,
                "policy_revision": policy_revision,
            }),
        );
        // Durable before the answer leaves: a certificate nobody recorded is
        // never handed out.
        self.store.record_issuance(record, event).await?;
        crate::metrics::get().issued("issuance", &attestation.method);
        Ok(Issued {
            spiffe_id,
            chain_pem: format!("{}{}", cert.pem, cert.chain_pem),
            certificate_pem: cert.pem,
            bundle_pem: self.authorities().bundle_pem().to_owned(),
            serial: cert.serial,
            not_after: rfc3339(cert.not_after),
            attestation: attestation.into(),
        })
    }

    /// Attest, decide and sign: the CPU-bound stages, on one snapshot.
    fn attest_decide_sign(&self, req: &AttestedRequest) -> Result<Signed, EngineError> {
        self.check_requested_ttl(req.ttl_seconds)?;
        let csr = verify_csr(&req.csr_pem)?;
        // One snapshot for the whole request: it never mixes two bundles.
        let snapshot = self.policies.snapshot();
        let attestation = self.attest(
            Surface::AttestedIssuance,
            &snapshot,
            &req.method,
            &req.evidence,
            Some(&csr.spki_der),
        )?;
        let input = IssuanceInput {
            version: INPUT_VERSION,
            trust_domain: &self.trust_domain,
            attestation: &attestation,
            request: IssuanceAsk {
                ttl_seconds: req.ttl_seconds,
                dns_names: Vec::new(),
            },
        };
        let decision = snapshot.decide_issuance(&input).map_err(|e| {
            tracing::error!(error = %e, "policy evaluation failed");
            EngineError::Policy(e)
        })?;
        if !decision.allow {
            return Err(EngineError::PolicyDenied(reasons_or_default(decision.reasons)));
        }
        let (spiffe_id, ttl) = self.check_identity(decision.spiffe_id, decision.ttl_seconds)?;
        let template = Template {
            spiffe_id: spiffe_id.clone(),
            public_key_der: csr.spki_der.clone(),
            ttl: Duration::seconds(ttl as i64),
            dns_names: decision.dns_names,
            extensions: Vec::new(),
        };
        let cert = self.sign_x509(&template)?;
        Ok(Signed {
            attestation,
            cert,
            spiffe_id: spiffe_id.to_string(),
            spki_sha256: sha256_hex(&csr.spki_der),
            policy_revision: snapshot.revision(),
        })
    }
}
