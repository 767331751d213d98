//! The AI-agent identity broker: agents attested by their runtime get
//! short-lived JWT-SVIDs (and X.509-SVIDs when they send a CSR) that are
//! scoped by policy, bound to a key they hold (`cnf.jkt`), and name who they
//! act for (`act`, the RFC 8693 actor chain: the person, then parent agents).
//!
//! This module owns delegation verification, attenuation, minting and the
//! token registry behind revocation and introspection. Policy decides; the
//! host enforces attenuation after it, whatever the policy returned.

mod attenuate;

use std::collections::HashSet;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use attenuate::{Bounds, attenuate};

use crate::approvals::{Approvals, IssuedCert};
use crate::attest::Attestation;
use crate::auth::OidcIssuers;
use crate::issuance::{IssuanceError, Pipeline, verify_csr};
use crate::policy::EphemeralOutcome;
use crate::signer::{Template, jwk_thumbprint};
use crate::store::{AuditEvent, CertificateRecord, Effects, StoreError};
use crate::trust::KeySet;
use crate::util::{now_unix, rfc3339, sha256_hex};

/// The deepest chain the host accepts, whatever policy says.
pub const HARD_MAX_DEPTH: usize = 8;

/// One link of a delegation chain, oldest (the person) first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// `person` or `agent`.
    pub kind: String,
    /// The person's name claim, or the parent agent's SPIFFE ID.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

/// A task the identity is scoped to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    pub id: String,
    #[serde(default)]
    pub purpose: String,
}

/// An issued agent token, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentToken {
    pub jti: String,
    pub agent_id: String,
    pub spiffe_id: String,
    #[serde(default)]
    pub parent_jti: Option<String>,
    #[serde(default)]
    pub task_id: Option<String>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    pub chain: Vec<Link>,
    #[serde(default)]
    pub revoked_at: Option<String>,
}

/// What to revoke. Exactly one field is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RevocationFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

impl RevocationFilter {
    /// Whether exactly one selector is given.
    pub fn is_valid(&self) -> bool {
        [
            self.agent_id.is_some(),
            self.task_id.is_some(),
            self.jti.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
            == 1
    }

    pub fn matches(&self, t: &AgentToken) -> bool {
        self.agent_id.as_ref().is_some_and(|a| *a == t.agent_id)
            || self
                .task_id
                .as_ref()
                .is_some_and(|id| t.task_id.as_ref() == Some(id))
            || self.jti.as_ref().is_some_and(|j| *j == t.jti)
    }
}

/// An entry of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub seq: u64,
    pub jti: String,
    pub agent_id: String,
    /// When the token would have expired anyway: entries can be dropped after.
    pub exp: i64,
    pub revoked_at: String,
}

/// Why the broker refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A stage of the shared pipeline refused (attestation, policy, CSR…).
    #[error(transparent)]
    Issuance(#[from] IssuanceError),
    /// The delegation token did not verify, is revoked, expired, or too deep.
    #[error("delegation refused: {0}")]
    Delegation(String),
    /// Escalation to approval failed.
    #[error(transparent)]
    Approval(#[from] crate::approvals::EphemeralError),
}

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure on the broker path");
        BrokerError::Issuance(IssuanceError::Unavailable(
            "the identity could not be recorded; nothing was issued".into(),
        ))
    }
}

/// A request for an agent identity.
#[derive(Debug, Clone, Default)]
pub struct AgentRequest {
    /// `None` lets the policy name the agent from its attestation.
    pub agent_id: Option<String>,
    pub method: String,
    pub evidence: String,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub ttl_seconds: Option<u64>,
    pub public_key_jwk: Option<Value>,
    pub csr: Option<String>,
    pub subject_token: Option<String>,
    pub task: Option<Task>,
}

/// Everything needed to mint, fixed at decision time (and, for escalated
/// requests, stored with the pending request so approvers vote on it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentGrant {
    pub agent_id: String,
    pub spiffe_id: String,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    pub ttl_seconds: u64,
    /// RFC 7638 thumbprint of the key the token is bound to.
    #[serde(default)]
    pub jkt: Option<String>,
    /// DER SubjectPublicKeyInfo (base64) when an X.509-SVID is wanted too.
    #[serde(default)]
    pub csr_public_key: Option<String>,
    pub chain: Vec<Link>,
    #[serde(default)]
    pub parent_jti: Option<String>,
    /// Unix time the parent token expires, which caps this one at minting.
    #[serde(default)]
    pub parent_exp: Option<i64>,
    #[serde(default)]
    pub task: Option<Task>,
    pub requested_scopes: Vec<String>,
}

/// What the agent gets.
#[derive(Debug, Clone, Serialize)]
pub struct Granted {
    pub spiffe_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_svid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle_pem: Option<String>,
    pub scopes: Vec<String>,
    pub expires_at: String,
    pub expires_in: u64,
    pub delegation_chain: Vec<Link>,
    pub jti: String,
}

/// The outcome of a broker request.
pub enum Outcome {
    Issued(Box<Granted>),
    /// Escalated to approvers: the pending ephemeral request.
    Pending(Box<crate::approvals::Request>),
}

/// A verified delegation.
#[derive(Debug, Clone, Default)]
struct Delegation {
    chain: Vec<Link>,
    parent: Option<AgentToken>,
}

/// The broker shared by every surface.
pub struct Broker {
    pipeline: Arc<Pipeline>,
    approvals: Arc<Approvals>,
    oidc: Arc<OidcIssuers>,
    /// Castellan's own JWT keys, to verify parent agents' tokens.
    own_keys: KeySet,
    /// Revoked, unexpired jtis: checked on every verification.
    revoked: ArcSwap<HashSet<String>>,
}

/// The `iss` of every JWT-SVID and of discovery.
pub fn issuer(pipeline: &Pipeline) -> String {
    pipeline
        .public_url
        .get()
        .cloned()
        .unwrap_or_else(|| format!("spiffe://{}", pipeline.trust_domain))
}

impl Broker {
    pub async fn new(
        pipeline: Arc<Pipeline>,
        approvals: Arc<Approvals>,
        oidc: Arc<OidcIssuers>,
    ) -> Result<Arc<Self>, BrokerError> {
        let own_keys = KeySet::from_jwks(&pipeline.signer.jwks())
            .map_err(|e| IssuanceError::Internal(format!("own JWT keys: {e}")))?;
        let mut revoked = HashSet::new();
        let mut cursor = None;
        loop {
            let page = pipeline.store.revocations(1000, cursor.as_deref()).await?;
            revoked.extend(
                page.items
                    .into_iter()
                    .filter(|r| r.exp > now_unix())
                    .map(|r| r.jti),
            );
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        Ok(Arc::new(Self {
            pipeline,
            approvals,
            oidc,
            own_keys,
            revoked: ArcSwap::from_pointee(revoked),
        }))
    }

    /// Whether a jti is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.revoked.load().contains(jti)
    }

    /// Verifies one of Castellan's own agent JWT-SVIDs: signature, expiry,
    /// revocation. Returns its claims and registry record.
    pub async fn verify_own(&self, token: &str) -> Result<(Value, AgentToken), String> {
        let (_, payload) = self.own_keys.verify_compact(token)?;
        let claims: Value = serde_json::from_str(&payload).map_err(|_| "payload is not JSON")?;
        if claims.get("iss").and_then(Value::as_str) != Some(issuer(&self.pipeline).as_str()) {
            return Err("not issued by this Castellan".into());
        }
        let exp = claims.get("exp").and_then(Value::as_i64).ok_or("no `exp`")?;
        if now_unix() >= exp {
            return Err("token expired".into());
        }
        let jti = claims.get("jti").and_then(Value::as_str).ok_or("no `jti`")?;
        if self.is_revoked(jti) {
            return Err("token revoked".into());
        }
        let record = self
            .pipeline
            .store
            .agent_token(jti)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("token unknown to this Castellan")?;
        if record.revoked_at.is_some() {
            return Err("token revoked".into());
        }
        Ok((claims, record))
    }

    /// Verifies a delegation's subject token: a person's ID token from a
    /// configured OIDC issuer, or a parent agent's Castellan JWT-SVID.
    async fn verify_delegation(&self, token: &str) -> Result<Delegation, BrokerError> {
        let refuse = |m: String| BrokerError::Delegation(m);
        let iss = token
            .split('.')
            .nth(1)
            .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|c| c.get("iss").and_then(Value::as_str).map(str::to_owned))
            .ok_or_else(|| refuse("subject_token is not a JWT with an `iss`".into()))?;
        if iss == issuer(&self.pipeline) {
            let (_, parent) = self
                .verify_own(token)
                .await
                .map_err(|m| refuse(format!("parent agent token: {m}")))?;
            let mut chain = parent.chain.clone();
            chain.push(Link {
                kind: "agent".into(),
                sub: parent.spiffe_id.clone(),
                iss: None,
            });
            return Ok(Delegation {
                chain,
                parent: Some(parent),
            });
        }
        let person = self
            .oidc
            .authenticate(token, now_unix())
            .map_err(|m| refuse(format!("person's ID token: {m}")))?;
        Ok(Delegation {
            chain: vec![Link {
                kind: "person".into(),
                sub: person.name,
                iss: Some(iss),
            }],
            parent: None,
        })
    }

    /// Runs the broker pipeline for one request.
    pub async fn request(&self, req: AgentRequest) -> Result<Outcome, BrokerError> {
        if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty() || a.len() > 256) {
            return Err(IssuanceError::BadRequest(
                "`audience` must name at least one non-empty audience".into(),
            )
            .into());
        }
        if req.scopes.is_empty() || req.scopes.len() > 64 {
            return Err(IssuanceError::BadRequest("`scopes` must hold 1 to 64 scopes".into()).into());
        }
        if let Some(ttl) = req.ttl_seconds
            && ttl < self.pipeline.limits.min_ttl_seconds
        {
            return Err(IssuanceError::BadRequest(format!(
                "ttl_seconds must be at least {}",
                self.pipeline.limits.min_ttl_seconds
            ))
            .into());
        }
        let jkt = match &req.public_key_jwk {
            None => None,
            Some(jwk) => Some(public_jwk_thumbprint(jwk).map_err(IssuanceError::BadRequest)?),
        };
        let csr_spki = match &req.csr {
            None => None,
            Some(pem) => Some(verify_csr(pem)?.spki_der),
        };
        let csr_public_key = csr_spki.as_deref().map(|spki| STANDARD.encode(spki));
        let delegation = match &req.subject_token {
            Some(t) => self.verify_delegation(t).await?,
            None => Delegation::default(),
        };
        let depth = delegation.chain.iter().filter(|l| l.kind == "agent").count();
        if depth >= HARD_MAX_DEPTH {
            return Err(BrokerError::Delegation(format!(
                "the delegation chain is deeper than {HARD_MAX_DEPTH}"
            )));
        }

        let p = self.pipeline.clone();
        let snapshot = p.policies.snapshot();
        let (method, evidence, snap) = (req.method.clone(), req.evidence.clone(), snapshot.clone());
        // Evidence bound to a key can only be bound to the CSR's: a JWK
        // alone is not certified as X.509, so it binds nothing here.
        let attestation: Attestation = tokio::task::spawn_blocking(move || {
            p.attest_bound(&snap, &method, &evidence, csr_spki.as_deref())
        })
        .await
        .map_err(|e| IssuanceError::Internal(format!("task failed: {e}")))??;

        let now = now_unix();
        let parent_remaining = delegation.parent.as_ref().map(|p| (p.exp - now).max(0) as u64);
        let input = json!({
            "version": crate::issuance::POLICY_INPUT_VERSION,
            "trust_domain": self.pipeline.trust_domain,
            "attestation": attestation,
            "request": {
                "agent_id": req.agent_id,
                "scopes": req.scopes,
                "audience": req.audience,
                "ttl_seconds": req.ttl_seconds,
                "task": req.task,
                "key_bound": jkt.is_some(),
                "x509": csr_public_key.is_some(),
            },
            "delegation": {
                "chain": delegation.chain,
                "depth": depth,
                "parent": delegation.parent.as_ref().map(|p| json!({
                    "agent_id": p.agent_id, "spiffe_id": p.spiffe_id, "scopes": p.scopes, "expires_at": p.exp,
                })),
            },
        });
        let decision = tokio::task::spawn_blocking(move || snapshot.decide_broker(&input))
            .await
            .map_err(|e| IssuanceError::Internal(format!("task failed: {e}")))?
            .map_err(|e| {
                tracing::error!(error = %e, "broker policy failed");
                IssuanceError::Internal(format!("the policy could not decide: {e}"))
            })?;
        if decision.outcome == EphemeralOutcome::Deny {
            let reasons = if decision.reasons.is_empty() {
                vec!["no reason given".into()]
            } else {
                decision.reasons
            };
            return Err(IssuanceError::PolicyDenied(reasons).into());
        }
        let (spiffe_id, policy_ttl) = self
            .pipeline
            .check_identity(decision.spiffe_id.clone(), decision.ttl_seconds)?;
        let agent_id = decision
            .agent_id
            .clone()
            .or(req.agent_id.clone())
            .ok_or_else(|| {
                IssuanceError::Internal("the policy returned an invalid decision: no agent_id".into())
            })?;
        let (scopes, ttl) = attenuate(&Bounds {
            requested_scopes: &req.scopes,
            policy_scopes: &decision.scopes,
            parent_scopes: delegation.parent.as_ref().map(|p| p.scopes.as_slice()),
            requested_ttl: req.ttl_seconds.unwrap_or(u64::MAX),
            policy_max_ttl: policy_ttl,
            parent_remaining,
            server_max_ttl: self.pipeline.limits.max_ttl_seconds,
        });
        if scopes.is_empty() {
            return Err(IssuanceError::PolicyDenied(vec![
                "none of the requested scopes may be granted".into(),
            ])
            .into());
        }
        if ttl < self.pipeline.limits.min_ttl_seconds.min(60) {
            return Err(BrokerError::Delegation(
                "the parent's token expires too soon to delegate".into(),
            ));
        }
        let grant = AgentGrant {
            agent_id,
            spiffe_id: spiffe_id.to_string(),
            scopes,
            audience: req.audience.clone(),
            ttl_seconds: ttl,
            jkt,
            csr_public_key,
            chain: delegation.chain.clone(),
            parent_jti: delegation.parent.as_ref().map(|p| p.jti.clone()),
            parent_exp: delegation.parent.as_ref().map(|p| p.exp),
            task: req.task.clone(),
            requested_scopes: req.scopes.clone(),
        };
        if decision.outcome == EphemeralOutcome::Approve {
            let approval = decision.approval.clone().ok_or_else(|| {
                IssuanceError::Internal(
                    "the policy returned an invalid decision: `approve` without `approval`".into(),
                )
            })?;
            let justification = req
                .task
                .as_ref()
                .map(|t| format!("task {}: {}", t.id, t.purpose))
                .unwrap_or_else(|| format!("agent {} asks for {}", grant.agent_id, grant.scopes.join(" ")));
            let request = self
                .approvals
                .create_agent_request(attestation, grant, approval, justification)
                .await?;
            return Ok(Outcome::Pending(Box::new(request)));
        }
        let (granted, token, cert) = mint(&self.pipeline, &grant)?;
        let effects = Effects {
            audit: vec![issued_event(&grant, &token, &decision.reasons)],
            certificates: cert.into_iter().collect(),
            ..Effects::default()
        };
        self.pipeline.store.put_agent_token(token, effects).await?;
        Ok(Outcome::Issued(Box::new(granted)))
    }

    /// Revokes and updates the in-memory set at once.
    pub async fn revoke(
        &self,
        filter: RevocationFilter,
        actor: String,
    ) -> Result<Vec<Revocation>, BrokerError> {
        let revoked = self.pipeline.store.revoke(filter, actor).await?;
        let mut next = self.revoked.load().as_ref().clone();
        next.extend(revoked.iter().map(|r| r.jti.clone()));
        self.revoked.store(Arc::new(next));
        Ok(revoked)
    }

    /// RFC 7662 introspection of a Castellan agent token.
    pub async fn introspect(&self, token: &str) -> Value {
        match self.verify_own(token).await {
            Ok((claims, record)) => {
                let mut v = json!({
                    "active": true,
                    "token_type": "Bearer",
                    "client_id": record.agent_id,
                    "scope": record.scopes.join(" "),
                });
                if let (Some(out), Some(c)) = (v.as_object_mut(), claims.as_object()) {
                    for k in ["iss", "sub", "aud", "exp", "iat", "jti", "act", "cnf", "task"] {
                        if let Some(x) = c.get(k) {
                            out.insert(k.into(), x.clone());
                        }
                    }
                }
                v
            }
            Err(_) => json!({ "active": false }),
        }
    }

    /// Escalated grants are minted when approved; see `approvals`.
    pub fn approvals(&self) -> &Arc<Approvals> {
        &self.approvals
    }
}

/// The audit record of an issued agent identity.
pub fn issued_event(grant: &AgentGrant, token: &AgentToken, reasons: &[String]) -> AuditEvent {
    AuditEvent {
        kind: "broker.issued".into(),
        actor: format!("agent:{}", grant.agent_id),
        detail: json!({
            "agent_id": grant.agent_id,
            "spiffe_id": grant.spiffe_id,
            "jti": token.jti,
            "delegated_subject": grant.chain.first().map(|l| l.sub.clone()),
            "chain": grant.chain,
            "scopes_requested": grant.requested_scopes,
            "scopes_granted": grant.scopes,
            "ttl_seconds": token.exp - token.iat,
            "task": grant.task,
            "reasons": reasons,
        }),
    }
}

/// The thumbprint of a public JWK the agent holds the private half of.
fn public_jwk_thumbprint(jwk: &Value) -> Result<String, String> {
    let obj = jwk.as_object().ok_or("`public_key_jwk` must be a JWK object")?;
    if ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return Err("`public_key_jwk` must be a public key: it holds private key material".into());
    }
    // Reuse the trust-source JWK checks (type, curve, size).
    let mut with_kid = jwk.clone();
    with_kid["kid"] = "x".into();
    KeySet::from_jwks(&json!({ "keys": [with_kid] })).map_err(|e| format!("`public_key_jwk`: {e}"))?;
    Ok(jwk_thumbprint(jwk))
}

/// The RFC 8693 `act` claim: the person outermost, then parent agents nested.
fn act_claim(chain: &[Link]) -> Option<Value> {
    chain.iter().rev().fold(None, |inner, link| {
        let mut v = json!({ "sub": link.sub });
        if let Some(iss) = &link.iss {
            v["iss"] = iss.clone().into();
        }
        if let Some(i) = inner {
            v["act"] = i;
        }
        Some(v)
    })
}

/// Mints the JWT-SVID (and X.509-SVID) for a grant. The lifetime is capped
/// again by the parent's expiry, as of now.
pub fn mint(
    pipeline: &Pipeline,
    grant: &AgentGrant,
) -> Result<(Granted, AgentToken, Option<CertificateRecord>), BrokerError> {
    let now = now_unix();
    let mut ttl = grant.ttl_seconds as i64;
    if let Some(parent_exp) = grant.parent_exp {
        ttl = ttl.min(parent_exp - now);
    }
    if ttl <= 0 {
        return Err(BrokerError::Delegation("the parent's token has expired".into()));
    }
    let jti = uuid::Uuid::new_v4().to_string();
    let exp = now + ttl;
    let mut claims = json!({
        "iss": issuer(pipeline),
        "sub": grant.spiffe_id,
        "aud": grant.audience,
        "iat": now,
        "exp": exp,
        "jti": jti,
        "scope": grant.scopes.join(" "),
        "agent_id": grant.agent_id,
    });
    if let Some(jkt) = &grant.jkt {
        claims["cnf"] = json!({ "jkt": jkt });
    }
    if let Some(act) = act_claim(&grant.chain) {
        claims["act"] = act;
    }
    if let Some(task) = &grant.task {
        claims["task"] = json!({ "id": task.id, "purpose": task.purpose });
    }
    let jwt = pipeline.signer.sign_jwt(&claims).map_err(|e| {
        tracing::error!(error = %e, "JWT signing failed");
        IssuanceError::Internal("the signer could not issue the token".into())
    })?;
    let (cert, record) = match &grant.csr_public_key {
        None => (None, None),
        Some(spki_b64) => {
            let spki = STANDARD
                .decode(spki_b64)
                .map_err(|e| IssuanceError::Internal(format!("stored key: {e}")))?;
            let spiffe_id = crate::spiffe_id::SpiffeId::parse(&grant.spiffe_id)
                .map_err(|e| IssuanceError::Internal(format!("spiffe_id: {e}")))?;
            let issued = pipeline
                .signer
                .sign_x509_svid(&Template {
                    spiffe_id,
                    public_key_der: spki.clone(),
                    ttl: time::Duration::seconds(ttl),
                    dns_names: vec![],
                    extensions: vec![],
                })
                .map_err(|e| {
                    tracing::error!(error = %e, "signer failed");
                    IssuanceError::Internal("the signer could not issue the certificate".into())
                })?;
            let record = CertificateRecord {
                serial: issued.serial.clone(),
                spiffe_id: grant.spiffe_id.clone(),
                not_before: rfc3339(issued.not_before),
                not_after: rfc3339(issued.not_after),
                source: "broker".into(),
                method: "agent".into(),
                subject: grant.agent_id.clone(),
                public_key_sha256: sha256_hex(&spki),
                issued_at: rfc3339(time::OffsetDateTime::now_utc()),
            };
            let cert = IssuedCert {
                chain_pem: format!("{}{}", issued.pem, pipeline.signer.intermediates_pem()),
                certificate_pem: issued.pem,
                bundle_pem: pipeline.signer.bundle_pem().to_owned(),
                serial: issued.serial,
                not_after: rfc3339(issued.not_after),
                jwt_svid: None,
            };
            (Some(cert), Some(record))
        }
    };
    let token = AgentToken {
        jti: jti.clone(),
        agent_id: grant.agent_id.clone(),
        spiffe_id: grant.spiffe_id.clone(),
        parent_jti: grant.parent_jti.clone(),
        task_id: grant.task.as_ref().map(|t| t.id.clone()),
        scopes: grant.scopes.clone(),
        audience: grant.audience.clone(),
        iat: now,
        exp,
        chain: grant.chain.clone(),
        revoked_at: None,
    };
    let granted = Granted {
        spiffe_id: grant.spiffe_id.clone(),
        jwt_svid: Some(jwt),
        certificate_pem: cert.as_ref().map(|c| c.certificate_pem.clone()),
        chain_pem: cert.as_ref().map(|c| c.chain_pem.clone()),
        bundle_pem: cert.as_ref().map(|c| c.bundle_pem.clone()),
        scopes: grant.scopes.clone(),
        expires_at: rfc3339(
            time::OffsetDateTime::from_unix_timestamp(exp).unwrap_or(time::OffsetDateTime::UNIX_EPOCH),
        ),
        expires_in: ttl as u64,
        delegation_chain: grant.chain.clone(),
        jti,
    };
    Ok((granted, token, record))
}

/// Used when a pending agent request is approved.
pub fn granted_as_issued(g: &Granted) -> IssuedCert {
    IssuedCert {
        certificate_pem: g.certificate_pem.clone().unwrap_or_default(),
        chain_pem: g.chain_pem.clone().unwrap_or_default(),
        bundle_pem: g.bundle_pem.clone().unwrap_or_default(),
        serial: String::new(),
        not_after: g.expires_at.clone(),
        jwt_svid: g.jwt_svid.clone(),
    }
}

#[cfg(test)]
mod tests;
