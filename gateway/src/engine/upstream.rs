//! Castellan as an upstream authority: an admin sends a CSR for another CA
//! (a SPIRE server's UpstreamAuthority, a team's own CA) and Castellan's
//! root signs it as a subordinate. Policy (`castellan.ca`) decides whether
//! and for how long; the host adds what no policy can widen: path length 0,
//! names limited to this trust domain's SPIFFE IDs (no DNS name or IP
//! address), the root's life. Every outcome is audited.

use serde_json::json;

use super::{Engine, EngineError};
use crate::model::{Actor, AuditEvent, AuditKind, Principal};
use crate::policy::{CaAsk, CaInput, INPUT_VERSION};

/// A signed subordinate CA, as the admin receives it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Subordinate {
    pub certificate_pem: String,
    /// Castellan's trust anchors, which the subordinate chains to.
    pub bundle_pem: String,
    pub serial: String,
    pub not_after: String,
}

impl Engine {
    /// Signs `csr_pem` as a subordinate CA named `name`, if policy allows.
    pub async fn sign_subordinate_ca(
        self: &std::sync::Arc<Self>,
        admin: &Principal,
        csr_pem: String,
        name: String,
        ttl_seconds: Option<u64>,
    ) -> Result<Subordinate, EngineError> {
        let engine = self.clone();
        let requester = admin.id.clone();
        let shown_name = super::printable(&name);
        let result = self
            .blocking(move || {
                let csr = super::csr::verify_csr(&csr_pem)?;
                let input = CaInput {
                    version: INPUT_VERSION,
                    trust_domain: &engine.trust_domain,
                    requester: &requester,
                    request: CaAsk {
                        name: &name,
                        ttl_seconds,
                        public_key_sha256: crate::util::sha256_hex(&csr.spki_der),
                    },
                };
                let decision = engine
                    .policies
                    .snapshot()
                    .decide_ca(&input)
                    .map_err(EngineError::Policy)?;
                if !decision.allow {
                    return Err(EngineError::PolicyDenied(super::reasons_or_default(
                        decision.reasons,
                    )));
                }
                let ttl = decision
                    .ttl_seconds
                    .filter(|t| *t > 0)
                    .ok_or_else(|| EngineError::InvalidDecision("allow without ttl_seconds".into()))?;
                let ttl = engine.authority_ttl(time::Duration::seconds(ttl.min(i64::MAX as u64) as i64))?;
                let cert = engine
                    .signer
                    .sign_subordinate_ca(&csr.spki_der, &name, ttl)
                    .map_err(|e| match e {
                        crate::signer::SignerError::Template(m) => EngineError::BadRequest(m),
                        e => EngineError::from(e),
                    })?;
                Ok((cert, crate::util::sha256_hex(&csr.spki_der)))
            })
            .await;
        match result {
            Ok((cert, key_sha256)) => {
                let not_after = crate::util::rfc3339(cert.not_after);
                self.audit(AuditEvent::new(
                    AuditKind::CaSubordinateIssued,
                    Actor::from(admin),
                    json!({ "name": shown_name, "serial": cert.serial, "not_after": not_after, "public_key_sha256": key_sha256 }),
                ))
                .await;
                Ok(Subordinate {
                    certificate_pem: cert.pem,
                    bundle_pem: self.authorities().bundle_pem().to_owned(),
                    serial: cert.serial,
                    not_after,
                })
            }
            Err(e) => {
                let event = AuditEvent::new(
                    AuditKind::CaSubordinateRefused,
                    Actor::from(admin),
                    json!({ "name": shown_name, "status": e.status(), "problem": e.slug(), "detail": e.detail() }),
                );
                self.audit_refused(event, e.slug()).await;
                Err(e)
            }
        }
    }
}
