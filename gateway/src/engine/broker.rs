//! Agent identities: the broker endpoint and RFC 8693 token exchange.
//! Agents attested by their runtime get short-lived JWT-SVIDs (and
//! X.509-SVIDs when they send a CSR) scoped by policy, bound to a key they
//! hold (`cnf.jkt`), naming who they act for (`act`). Delegation is
//! verified here; attenuation (`broker::attenuate`) is enforced after the
//! policy, whatever it returned; escalations wait in the approval flow and
//! are minted by it.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Serialize;
use serde_json::{Value, json};

use super::{Engine, EngineError, Refusal, Surface, reasons_or_default, verify_csr};
use crate::approvals::IssuedCert;
use crate::auth::{OidcIssuers, Purpose};
use crate::broker::dpop::{self, Proof};
use crate::broker::{Bounds, HARD_MAX_DEPTH, act_claim, attenuate, public_jwk_thumbprint};
use crate::model::policy::{BrokerAsk, BrokerInput, DelegationDoc, INPUT_VERSION, ParentDoc};
use crate::model::{
    Actor, AgentGrant, AgentToken, Attestation, AuditEvent, AuditKind, CertificateRecord, Link, Request,
    Revocation, RevocationFilter, Source, Task,
};
use crate::policy::EphemeralOutcome;
use crate::signer::{AgentClaims, Confirmation, JwtAlg, JwtSvidClaims, TaskClaim, Template};
use crate::store::{Effects, Store};
use crate::trust::KeySet;
use crate::util::{now_unix, rfc3339, sha256_hex};

/// The `iss` of a JWT, before anything is verified (to pick a verifier).
fn unverified_issuer(token: &str) -> Option<String> {
    token
        .split('.')
        .nth(1)
        .and_then(|p| URL_SAFE_NO_PAD.decode(p).ok())
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .and_then(|c| c.get("iss").and_then(Value::as_str).map(str::to_owned))
}

/// A request for an agent identity, as parsed by a surface.
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
    /// The request's `DPoP` header: proves the parent's key when delegating
    /// with a parent agent's token; on token exchange, the key the new
    /// token is bound to.
    pub dpop: Option<String>,
    /// The path the request was sent to (the proof's `htu`).
    pub endpoint: &'static str,
}

/// What the agent gets. Its JWT-SVID is a secret: it is returned to the
/// agent once and never stored.
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
    /// Escalated to approvers: the pending request.
    Pending(Box<Request>),
}

/// A verified delegation.
#[derive(Debug, Clone, Default)]
struct Delegation {
    chain: Vec<Link>,
    parent: Option<AgentToken>,
}

/// What verifies delegations: the OIDC issuers people log in with,
/// Castellan's own JWT keys (for parent agents' tokens) and the revoked,
/// unexpired token ids, checked on every verification.
pub(super) struct Delegations {
    oidc: Arc<OidcIssuers>,
    /// Castellan's own JWT keys (swapped when they rotate).
    own_keys: ArcSwap<KeySet>,
    /// Revoked token ids and their expiry: forgotten once expired, when no
    /// verifier would accept the token anyway.
    revoked: ArcSwap<HashMap<String, i64>>,
    /// Parent tokens whose signature verified, by SHA-256 of the token, with
    /// the keys they verified under: a parent delegates many times with one
    /// token. Only the signature is remembered; issuer, expiry, revocation
    /// and the registry are checked on every use.
    signed: std::sync::Mutex<SignedTokens>,
}

/// Verified signatures of parent tokens (see [`Delegations::signed`]).
#[derive(Default)]
struct SignedTokens {
    keys: Option<Arc<KeySet>>,
    payloads: HashMap<[u8; 32], Arc<Value>>,
}

/// Parent tokens remembered at once, at most.
const MAX_SIGNED_TOKENS: usize = 16_384;

/// The revoked, unexpired token ids in the store's revocation feed.
async fn revoked_set(store: &Store) -> Result<HashMap<String, i64>, EngineError> {
    let mut revoked = HashMap::new();
    let mut cursor = None;
    loop {
        let page = store.revocations(1000, cursor.as_deref()).await?;
        revoked.extend(
            page.items
                .into_iter()
                .filter(|r| r.exp > now_unix())
                .map(|r| (r.jti, r.exp)),
        );
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(revoked)
}

impl Delegations {
    /// Verifies delegations with these keys from now on (the JWT keys
    /// rotated); keys that do not load leave the old ones in place.
    pub(super) fn set_own_keys(&self, jwks: &Value) {
        match KeySet::from_jwks(jwks) {
            Ok(keys) => self.own_keys.store(Arc::new(keys)),
            Err(e) => tracing::error!(error = %e, "delegations: the new JWT keys do not load"),
        }
    }

    /// Loads the revoked set from the store's revocation feed.
    pub(super) async fn load(
        store: &Store,
        oidc: Arc<OidcIssuers>,
        jwks: &Value,
    ) -> Result<Self, EngineError> {
        let own_keys =
            KeySet::from_jwks(jwks).map_err(|_| EngineError::Internal("own JWT keys do not load"))?;
        let revoked = revoked_set(store).await?;
        Ok(Self {
            oidc,
            own_keys: ArcSwap::from_pointee(own_keys),
            revoked: ArcSwap::from_pointee(revoked),
            signed: std::sync::Mutex::default(),
        })
    }

    /// The claims of one of Castellan's own tokens whose signature verifies
    /// with the current keys: remembered, or checked now.
    fn signed_claims(&self, token: &str) -> Result<Arc<Value>, String> {
        use sha2::Digest as _;
        let keys = self.own_keys.load_full();
        let digest: [u8; 32] = sha2::Sha256::digest(token.as_bytes()).into();
        {
            let mut cache = self.signed.lock().unwrap_or_else(|p| p.into_inner());
            if !cache.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, &keys)) {
                // The keys rotated: what verified under the old ones is forgotten.
                *cache = SignedTokens {
                    keys: Some(keys.clone()),
                    payloads: HashMap::new(),
                };
            }
            if let Some(claims) = cache.payloads.get(&digest) {
                return Ok(claims.clone());
            }
        }
        let (_, payload) = keys.verify_compact(token)?;
        let claims: Arc<Value> = Arc::new(serde_json::from_str(&payload).map_err(|_| "payload is not JSON")?);
        let mut cache = self.signed.lock().unwrap_or_else(|p| p.into_inner());
        if cache.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, &keys)) {
            if cache.payloads.len() >= MAX_SIGNED_TOKENS {
                cache.payloads.clear();
            }
            cache.payloads.insert(digest, claims.clone());
        }
        Ok(claims)
    }
}

/// What the blocking stages of a broker request produce.
struct Decided {
    attestation: Attestation,
    grant: AgentGrant,
    outcome: EphemeralOutcome,
    approval: Option<crate::policy::ApprovalRule>,
    reasons: Vec<String>,
}

impl Engine {
    /// Re-reads the revoked set: another gateway revoked tokens.
    pub async fn reload_revocations(&self) -> Result<(), EngineError> {
        let revoked = revoked_set(&self.store).await?;
        self.delegations.revoked.store(Arc::new(revoked));
        Ok(())
    }

    /// Whether an agent token id is revoked.
    pub fn is_revoked(&self, jti: &str) -> bool {
        self.delegations.revoked.load().contains_key(jti)
    }

    /// Verifies one of Castellan's own agent JWT-SVIDs: signature, issuer,
    /// expiry, revocation. Returns its claims and registry record.
    pub async fn verify_own(&self, token: &str) -> Result<(Value, AgentToken), String> {
        let claims = self.delegations.signed_claims(token)?;
        if claims.get("iss").and_then(Value::as_str) != Some(self.issuer().as_str()) {
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
            .store
            .agent_token(jti)
            .await
            .map_err(|_| "the token registry is unavailable")?
            .ok_or("token unknown to this Castellan")?;
        if record.revoked_at.is_some() {
            return Err("token revoked".into());
        }
        Ok((claims.as_ref().clone(), record))
    }

    /// Verifies a delegation's subject token: a person's ID token from a
    /// configured OIDC issuer, or a parent agent's Castellan JWT-SVID.
    async fn verify_delegation(&self, token: &str, proof: Option<&Proof>) -> Result<Delegation, EngineError> {
        let refuse = EngineError::Delegation;
        let iss = unverified_issuer(token)
            .ok_or_else(|| refuse("subject_token is not a JWT with an `iss`".into()))?;
        if iss == self.issuer() {
            let (claims, parent) = self
                .verify_own(token)
                .await
                .map_err(|m| refuse(format!("parent agent token: {m}")))?;
            // A parent token is a key-bound credential meant for this
            // Castellan: whoever delegates with it proves they hold its key.
            let audience_ok = match claims.get("aud") {
                Some(Value::String(a)) => *a == iss,
                Some(Value::Array(a)) => a.iter().any(|a| a.as_str() == Some(iss.as_str())),
                _ => false,
            };
            if !audience_ok {
                return Err(refuse(format!(
                    "parent agent token: its audience does not include this Castellan ({iss}); \
                     ask for the parent's identity with that audience to delegate with it"
                )));
            }
            let jkt = claims
                .pointer("/cnf/jkt")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    refuse("parent agent token: a bearer token (no `cnf`) cannot delegate".into())
                })?;
            match proof {
                Some(p) if p.jkt == jkt => {}
                Some(_) => {
                    return Err(refuse(
                        "parent agent token: the DPoP proof is not signed by the key the token is bound to"
                            .into(),
                    ));
                }
                None => {
                    return Err(refuse(
                        "parent agent token: send a DPoP proof (RFC 9449) signed by its key in the `DPoP` header".into(),
                    ));
                }
            }
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
            .delegations
            .oidc
            .verify(token, Purpose::Delegation, now_unix())
            .map_err(|m| refuse(format!("person's ID token: {m}")))?;
        Ok(Delegation {
            chain: vec![Link {
                kind: "person".into(),
                sub: person.subject,
                iss: Some(iss),
            }],
            parent: None,
        })
    }

    /// Verifies a request's DPoP proof for `endpoint`, and that its `jti`
    /// is new on every gateway sharing the store. `token` is the token the
    /// proof accompanies (its `ath`).
    pub(super) async fn check_dpop(
        &self,
        proof: &str,
        endpoint: &str,
        token: Option<&str>,
    ) -> Result<Proof, EngineError> {
        let now = now_unix();
        let url = format!("{}{endpoint}", self.issuer());
        let expected = dpop::Expected {
            method: "POST",
            url: &url,
            token,
        };
        let proof = dpop::verify(proof, expected, now).map_err(EngineError::Dpop)?;
        let replayed = || EngineError::Dpop("the DPoP proof was already used (`jti`)".into());
        let until = proof.iat + dpop::MAX_AGE_SECONDS;
        self.replay
            .first_use("dpop", &proof.jti, until, now)
            .map_err(|_| replayed())?;
        if !self
            .store
            .spend(&format!("dpop\u{0}{}", proof.jti), until, now)
            .await?
        {
            return Err(replayed());
        }
        Ok(proof)
    }

    /// The person ids of everyone a delegation chain names (`oidc:<issuer>:<sub>`):
    /// none of them may vote on the request.
    pub(super) fn chain_persons(&self, chain: &[Link]) -> Vec<String> {
        chain
            .iter()
            .filter(|l| l.kind == "person")
            .filter_map(|l| {
                let name = self.delegations.oidc.name_of(l.iss.as_deref()?)?;
                Some(crate::model::oidc_person(name, &l.sub))
            })
            .collect()
    }

    /// Runs the broker flow for one request from `surface` (the broker
    /// endpoint or token exchange). A refusal is audited as `broker.refused`.
    pub async fn agent_identity(
        self: &Arc<Self>,
        surface: Surface,
        req: AgentRequest,
    ) -> Result<Outcome, EngineError> {
        let (method, agent_id) = (req.method.clone(), req.agent_id.clone());
        let result = self.agent_identity_inner(surface, req).await;
        let refusal = || {
            let actor = match &agent_id {
                Some(id) => Actor::Agent(super::printable(id)),
                None => Actor::Evidence(super::printable(&method)),
            };
            Refusal::new(surface, "agent-identity", actor).method(&method)
        };
        self.audited(refusal, result).await
    }

    async fn agent_identity_inner(
        self: &Arc<Self>,
        surface: Surface,
        req: AgentRequest,
    ) -> Result<Outcome, EngineError> {
        super::check_method(surface, &req.method)?;
        check_agent_request(&req)?;
        self.check_requested_ttl(req.ttl_seconds)?;
        // A proof over this request accompanies a parent agent's token (and
        // carries its hash), or, on token exchange, names the key to bind.
        let parent_token = req
            .subject_token
            .as_deref()
            .filter(|t| unverified_issuer(t).as_deref() == Some(self.issuer().as_str()));
        let proof = match &req.dpop {
            Some(p) => Some(self.check_dpop(p, req.endpoint, parent_token).await?),
            None => None,
        };
        let jkt = match (&req.public_key_jwk, &proof) {
            (Some(jwk), _) => Some(public_jwk_thumbprint(jwk).map_err(EngineError::BadRequest)?),
            (None, Some(p)) if surface == Surface::TokenExchange => Some(p.jkt.clone()),
            (None, _) => None,
        };
        let csr_spki = match &req.csr {
            None => None,
            Some(pem) => Some(verify_csr(pem)?.spki_der),
        };
        let delegation = match &req.subject_token {
            Some(t) => self.verify_delegation(t, proof.as_ref()).await?,
            None => Delegation::default(),
        };
        let depth = delegation.chain.iter().filter(|l| l.kind == "agent").count();
        if depth >= HARD_MAX_DEPTH {
            return Err(EngineError::Delegation(format!(
                "the delegation chain is deeper than {HARD_MAX_DEPTH}"
            )));
        }
        let decided = {
            let engine = self.clone();
            self.blocking(move || engine.broker_decide(surface, &req, jkt, csr_spki, delegation, depth))
                .await?
        };
        let Decided {
            attestation,
            grant,
            outcome,
            approval,
            reasons,
        } = decided;
        if outcome == EphemeralOutcome::Approve {
            let approval = approval
                .ok_or_else(|| EngineError::InvalidDecision("`approve` without `approval`".into()))?;
            let justification = grant
                .task
                .as_ref()
                .map(|t| format!("task {}: {}", t.id, t.purpose))
                .unwrap_or_else(|| format!("agent {} asks for {}", grant.agent_id, grant.scopes.join(" ")));
            let request = self
                .create_agent_request(attestation, grant, approval, justification)
                .await?;
            return Ok(Outcome::Pending(Box::new(request)));
        }
        let (granted, token, cert) = {
            let (engine, g) = (self.clone(), grant.clone());
            self.blocking(move || engine.mint_agent(&g)).await?
        };
        let mut event = issued_event(&grant, &token, &reasons);
        event.detail["policy_revision"] = self.policies.revision().into();
        event.detail["attestation"] = json!(crate::model::AttestationSummary::from(&attestation));
        let effects = Effects {
            audit: vec![event],
            certificates: cert.into_iter().collect(),
            ..Effects::default()
        };
        if let Some(jti) = self.store.put_agent_token(token, effects).await? {
            return Err(EngineError::Delegation(format!(
                "token {jti} in the delegation chain was revoked"
            )));
        }
        crate::metrics::get().issued("broker", &attestation.method);
        Ok(Outcome::Issued(Box::new(granted)))
    }

    /// Attests, decides and attenuates: the grant, fixed before anything
    /// is minted or escalated. Blocking.
    fn broker_decide(
        &self,
        surface: Surface,
        req: &AgentRequest,
        jkt: Option<String>,
        csr_spki: Option<Vec<u8>>,
        delegation: Delegation,
        depth: usize,
    ) -> Result<Decided, EngineError> {
        let csr_public_key = csr_spki.as_deref().map(|spki| STANDARD.encode(spki));
        let snapshot = self.policies.snapshot();
        // Evidence bound to a key can only be bound to the CSR's: a JWK
        // alone is not certified as X.509, so it binds nothing here.
        let attestation = self.attest(
            surface,
            &snapshot,
            &req.method,
            &req.evidence,
            csr_spki.as_deref(),
        )?;
        let now = now_unix();
        let parent_remaining = delegation.parent.as_ref().map(|p| (p.exp - now).max(0) as u64);
        let input = BrokerInput {
            version: INPUT_VERSION,
            trust_domain: &self.trust_domain,
            attestation: &attestation,
            request: BrokerAsk {
                agent_id: req.agent_id.clone(),
                scopes: req.scopes.clone(),
                audience: req.audience.clone(),
                ttl_seconds: req.ttl_seconds,
                task: req.task.clone(),
                key_bound: jkt.is_some(),
                x509: csr_public_key.is_some(),
            },
            delegation: DelegationDoc {
                chain: delegation.chain.clone(),
                depth,
                parent: delegation.parent.as_ref().map(ParentDoc::from),
            },
        };
        let decision = snapshot.decide_broker(&input).map_err(|e| {
            tracing::error!(error = %e, "broker policy failed");
            EngineError::Policy(e)
        })?;
        if decision.outcome == EphemeralOutcome::Deny {
            return Err(EngineError::PolicyDenied(reasons_or_default(decision.reasons)));
        }
        // A JWT-SVID is bound to a key the agent holds unless policy says
        // bearer is fine; an escalated one is delivered only to that key.
        if jkt.is_none() && (!decision.bearer || decision.outcome == EphemeralOutcome::Approve) {
            return Err(EngineError::KeyRequired);
        }
        let (spiffe_id, policy_ttl) =
            self.check_identity(decision.spiffe_id.clone(), decision.ttl_seconds)?;
        let agent_id = decision
            .agent_id
            .clone()
            .or(req.agent_id.clone())
            .ok_or_else(|| EngineError::InvalidDecision("no agent_id".into()))?;
        let (scopes, ttl) = attenuate(&Bounds {
            requested_scopes: &req.scopes,
            policy_scopes: &decision.scopes,
            parent_scopes: delegation.parent.as_ref().map(|p| p.scopes.as_slice()),
            requested_ttl: req.ttl_seconds.unwrap_or(u64::MAX),
            policy_max_ttl: policy_ttl,
            parent_remaining,
            server_max_ttl: self.limits.max_ttl_seconds,
        });
        if scopes.is_empty() {
            return Err(EngineError::PolicyDenied(vec![
                "none of the requested scopes may be granted".into(),
            ]));
        }
        if ttl < self.limits.min_ttl_seconds.min(60) {
            return Err(EngineError::Delegation(
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
            chain: delegation.chain,
            parent_jti: delegation.parent.as_ref().map(|p| p.jti.clone()),
            parent_exp: delegation.parent.as_ref().map(|p| p.exp),
            task: req.task.clone(),
            requested_scopes: req.scopes.clone(),
        };
        Ok(Decided {
            attestation,
            grant,
            outcome: decision.outcome,
            approval: decision.approval,
            reasons: decision.reasons,
        })
    }

    /// Mints the JWT-SVID (and X.509-SVID) for a grant. The lifetime is
    /// capped again by the parent's expiry, as of now. Blocking.
    pub(super) fn mint_agent(
        &self,
        grant: &AgentGrant,
    ) -> Result<(Granted, AgentToken, Option<CertificateRecord>), EngineError> {
        let now = now_unix();
        let mut ttl = grant.ttl_seconds as i64;
        if let Some(parent_exp) = grant.parent_exp {
            ttl = ttl.min(parent_exp - now);
        }
        if ttl <= 0 {
            return Err(EngineError::Delegation("the parent's token has expired".into()));
        }
        let jti = uuid::Uuid::new_v4().to_string();
        let exp = self.jwt_exp(now, ttl)?;
        let claims = JwtSvidClaims {
            sub: crate::spiffe_id::SpiffeId::parse(&grant.spiffe_id)
                .map_err(|_| EngineError::Corrupt("spiffe_id"))?,
            aud: grant.audience.clone(),
            iat: now,
            exp,
            iss: Some(self.issuer()),
            jti: Some(jti.clone()),
            agent: Some(AgentClaims {
                scope: grant.scopes.join(" "),
                agent_id: grant.agent_id.clone(),
                cnf: grant.jkt.clone().map(|jkt| Confirmation { jkt }),
                act: act_claim(&grant.chain),
                task: grant.task.as_ref().map(|t| TaskClaim {
                    id: t.id.clone(),
                    purpose: t.purpose.clone(),
                }),
            }),
        };
        let jwt = self.signer.sign_jwt_svid(&claims, JwtAlg::ES256)?;
        let (cert, record) = match &grant.csr_public_key {
            None => (None, None),
            Some(spki_b64) => {
                let (cert, record) = self.mint_agent_x509(grant, spki_b64, ttl)?;
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
            expires_at: crate::util::rfc3339_unix(exp),
            expires_in: ttl as u64,
            delegation_chain: grant.chain.clone(),
            jti,
        };
        Ok((granted, token, record))
    }

    /// The agent's X.509-SVID, for the key of its CSR.
    fn mint_agent_x509(
        &self,
        grant: &AgentGrant,
        spki_b64: &str,
        ttl: i64,
    ) -> Result<(IssuedCert, CertificateRecord), EngineError> {
        let spki = STANDARD
            .decode(spki_b64)
            .map_err(|_| EngineError::Corrupt("public key"))?;
        let spiffe_id = crate::spiffe_id::SpiffeId::parse(&grant.spiffe_id)
            .map_err(|_| EngineError::Corrupt("spiffe_id"))?;
        let issued = self.sign_x509(&Template {
            spiffe_id,
            public_key_der: spki.clone(),
            ttl: time::Duration::seconds(ttl),
            dns_names: vec![],
            extensions: vec![],
        })?;
        let record = CertificateRecord {
            serial: issued.serial.clone(),
            spiffe_id: grant.spiffe_id.clone(),
            not_before: rfc3339(issued.not_before),
            not_after: rfc3339(issued.not_after),
            source: Source::Broker,
            method: "agent".into(),
            subject: grant.agent_id.clone(),
            public_key_sha256: sha256_hex(&spki),
            issued_at: rfc3339(time::OffsetDateTime::now_utc()),
            selectors: vec![],
        };
        Ok((self.delivered(issued), record))
    }

    /// Revokes agent tokens (and their descendants) and updates the
    /// in-memory set at once.
    pub async fn revoke_agents(
        &self,
        filter: RevocationFilter,
        actor: Actor,
    ) -> Result<Vec<Revocation>, EngineError> {
        let revoked = self.store.revoke(filter, actor).await?;
        let mut next = self.delegations.revoked.load().as_ref().clone();
        next.extend(revoked.iter().map(|r| (r.jti.clone(), r.exp)));
        self.delegations.revoked.store(Arc::new(next));
        Ok(revoked)
    }

    /// Forgets revoked token ids that have expired.
    pub(super) fn forget_expired_revocations(&self, now: i64) {
        let current = self.delegations.revoked.load();
        if current.values().any(|exp| *exp <= now) {
            let kept = current
                .iter()
                .filter(|(_, exp)| **exp > now)
                .map(|(j, e)| (j.clone(), *e))
                .collect();
            self.delegations.revoked.store(Arc::new(kept));
        }
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
}

/// What an agent request says about itself, checked before any work.
fn check_agent_request(req: &AgentRequest) -> Result<(), EngineError> {
    if req.audience.is_empty() || req.audience.iter().any(|a| a.is_empty() || a.len() > 256) {
        return Err(EngineError::BadRequest(
            "`audience` must name at least one non-empty audience".into(),
        ));
    }
    if req.scopes.is_empty() || req.scopes.len() > 64 {
        return Err(EngineError::BadRequest(
            "`scopes` must hold 1 to 64 scopes".into(),
        ));
    }
    Ok(())
}

/// The audit record of an issued agent identity.
pub(super) fn issued_event(grant: &AgentGrant, token: &AgentToken, reasons: &[String]) -> AuditEvent {
    AuditEvent::new(
        AuditKind::BrokerIssued,
        Actor::Agent(grant.agent_id.clone()),
        json!({
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
    )
}

/// What an approved agent request records as issued.
pub(super) fn granted_as_issued(g: &Granted) -> IssuedCert {
    IssuedCert {
        certificate_pem: g.certificate_pem.clone().unwrap_or_default(),
        chain_pem: g.chain_pem.clone().unwrap_or_default(),
        bundle_pem: g.bundle_pem.clone().unwrap_or_default(),
        serial: String::new(),
        not_after: g.expires_at.clone(),
    }
}
