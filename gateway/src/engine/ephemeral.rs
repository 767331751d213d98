//! Just-in-time (ephemeral) requests: authenticate the requester (token
//! or evidence) → decide (Rego `castellan.ephemeral`) → issue now, or record
//! a pending request → votes → on quorum, sign exactly once → record → wake
//! waiters. Every transition goes through [`Store::update_request`], which
//! serialises them, so racing approvals cannot mint twice. The rules of a
//! vote are the request's own (`approvals`).
//!
//! [`Store::update_request`]: crate::store::Store::update_request

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Engine, EngineError, Refusal, Surface, reasons_or_default, verify_csr};
use crate::approvals::{ApprovalError, VoteOutcome};
use crate::model::policy::{EphemeralAsk, EphemeralInput, INPUT_VERSION, RequesterDoc};
use crate::model::{
    Actor, AgentGrant, Attestation, AuditKind, IssuedCert, Principal, Request, Requester, Rule, Source,
    State, VoteDecision,
};
use crate::policy::{ApprovalRule, EphemeralDecision, EphemeralOutcome};
use crate::signer::Template;
use crate::store::{AuditEvent, CertificateRecord, Effects, Notification, StoreError};
use crate::util::{now_unix, rfc3339, sha256_hex};

/// Longest justification kept, in characters.
const MAX_JUSTIFICATION: usize = 1024;

/// A new ephemeral request as parsed by a surface.
#[derive(Debug, Clone)]
pub struct NewRequest {
    pub csr_pem: String,
    pub ttl_seconds: Option<u64>,
    pub justification: String,
    pub ticket: Option<String>,
    pub emergency: bool,
    pub spiffe_id: Option<String>,
    pub dns_names: Vec<String>,
    /// `(method, evidence)` when the requester authenticates by evidence.
    pub evidence: Option<(String, String)>,
    /// Anything else in the body, passed to policy as `request.extra`.
    pub extra: Value,
}

/// What creating a request produced.
pub enum Created {
    /// Issued at once (policy said `issue`, or an allowed break-glass).
    Issued(Request),
    /// Waiting for approvers.
    Pending(Request),
}

/// What the blocking stages of `create` decided.
struct Decided {
    requester: Requester,
    attestation: Option<Attestation>,
    spki: Vec<u8>,
    decision: EphemeralDecision,
    policy_revision: String,
}

fn event(kind: AuditKind, actor: Actor, r: &Request, extra: Value) -> AuditEvent {
    let mut detail = json!({
        "request_id": r.id,
        "state": r.state,
        "spiffe_id": r.spiffe_id,
        "binding": r.binding,
        "requester": r.requester.id,
        "policy_revision": r.policy_revision,
        "attestation": r.attestation,
    });
    if let (Some(d), Value::Object(e)) = (detail.as_object_mut(), extra) {
        d.extend(e);
    }
    AuditEvent { kind, actor, detail }
}

fn notification(event: &str, r: &Request) -> Notification {
    let mut payload = r.view();
    // Webhook receivers learn what happened, not the certificate itself.
    if let Some(o) = payload.as_object_mut() {
        for k in ["certificate_pem", "chain_pem", "bundle_pem"] {
            o.remove(k);
        }
    }
    Notification {
        event: event.into(),
        payload: json!({ "event": event, "request": payload }),
    }
}

/// Checks what a request says about itself, before any work.
fn check_new(new: &NewRequest) -> Result<String, EngineError> {
    let justification = new.justification.trim().to_owned();
    if justification.is_empty() {
        return Err(EngineError::BadRequest("`justification` is required".into()));
    }
    if justification.chars().count() > MAX_JUSTIFICATION {
        return Err(EngineError::BadRequest(format!(
            "`justification` is longer than {MAX_JUSTIFICATION} characters"
        )));
    }
    if new.ticket.as_ref().is_some_and(|t| t.len() > 256) {
        return Err(EngineError::BadRequest(
            "`ticket` is longer than 256 characters".into(),
        ));
    }
    if let Some(bad) = new.dns_names.iter().find(|d| !crate::util::valid_dns_name(d)) {
        return Err(EngineError::BadRequest(format!(
            "`dns_names`: `{}` is not a DNS name (letters, digits and hyphens in dot-separated labels; no wildcards)",
            super::printable(bad)
        )));
    }
    Ok(justification)
}

/// How long after its approval a request still approved is issued by the
/// housekeeping leader rather than the gateway that approved it.
const FINISH_AFTER_SECONDS: i64 = 30;

/// Whether `r` was decided before `t` (Unix seconds); an unreadable time
/// counts as long ago.
fn decided_before(r: &Request, t: i64) -> bool {
    r.decided_at
        .as_deref()
        .and_then(|d| time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc3339).ok())
        .is_none_or(|d| d.unix_timestamp() < t)
}

/// How long a decided request is kept after its deadline.
pub const REQUEST_RETENTION_SECONDS: i64 = 30 * 86_400;

/// How often the leader signs the audit log's head (when it moved).
const CHECKPOINT_SECONDS: u64 = 3600;

impl Engine {
    /// Applies one transition to a stored request (see
    /// [`crate::store::Store::update_request`]).
    async fn transition(
        &self,
        id: &str,
        update: impl FnOnce(&mut Request) -> Result<Effects, ApprovalError> + Send + 'static,
    ) -> Result<Result<Request, ApprovalError>, StoreError> {
        Ok(self
            .store
            .update_request(id, update)
            .await?
            .unwrap_or(Err(ApprovalError::NotFound)))
    }

    fn watcher(&self, id: &str) -> Arc<Notify> {
        let mut w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        w.entry(id.to_owned()).or_default().clone()
    }

    fn wake(&self, id: &str) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get(id) {
            n.notify_waiters();
        }
    }

    /// Wakes whoever waits on request `id` here: another gateway changed it.
    pub fn request_changed(&self, id: &str) {
        self.wake(id);
    }

    /// Wakes every waiter here: requests may have changed unseen.
    pub fn requests_changed(&self) {
        let w = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        for n in w.values() {
            n.notify_waiters();
        }
    }

    /// Creates a request: decides, then issues at once or records it
    /// pending. A refusal is audited as `ephemeral.refused`.
    pub async fn ephemeral_create(
        self: &Arc<Self>,
        caller: Option<Principal>,
        new: NewRequest,
    ) -> Result<Created, EngineError> {
        let actor = match (&new.evidence, &caller) {
            (Some((m, _)), _) => Actor::Evidence(super::printable(m)),
            (None, Some(c)) => Actor::from(c),
            (None, None) => Actor::Anonymous,
        };
        let method = new.evidence.as_ref().map(|(m, _)| m.clone());
        let result = self.ephemeral_create_inner(caller, new).await;
        let refusal = || {
            let r = Refusal::new(Surface::Ephemeral, "create", actor);
            match &method {
                Some(m) => r.method(m),
                None => r,
            }
        };
        self.audited(refusal, result).await
    }

    async fn ephemeral_create_inner(
        self: &Arc<Self>,
        caller: Option<Principal>,
        new: NewRequest,
    ) -> Result<Created, EngineError> {
        if let Some((method, _)) = &new.evidence {
            super::check_method(Surface::Ephemeral, method)?;
        }
        let justification = check_new(&new)?;
        self.check_requested_ttl(new.ttl_seconds)?;
        let decided = {
            let (engine, new, justification) = (self.clone(), new.clone(), justification.clone());
            self.blocking(move || engine.ephemeral_decide(caller, &new, justification))
                .await?
        };
        let Decided {
            requester,
            attestation,
            spki,
            decision,
            policy_revision,
        } = decided;
        if decision.outcome == EphemeralOutcome::Deny {
            return Err(EngineError::PolicyDenied(reasons_or_default(decision.reasons)));
        }
        // A name that cannot be part of an identity is refused as the
        // request's fault, not the policy's.
        if let Some(id) = &decision.spiffe_id
            && crate::spiffe_id::SpiffeId::parse(id).is_err()
        {
            return Err(EngineError::InvalidIdentity(format!(
                "`{}` is not a valid SPIFFE ID: the requester's name `{}` cannot be part of one \
                 (only letters, digits, `-`, `_` and `.`); an OIDC login can be linked to an API token with such a name",
                super::printable(id),
                super::printable(&requester.name)
            )));
        }
        if let Some(bad) = decision
            .dns_names
            .iter()
            .find(|d| !crate::util::valid_dns_name(d))
        {
            return Err(EngineError::InvalidIdentity(format!(
                "`{}` is not a valid DNS name",
                super::printable(bad)
            )));
        }
        let (spiffe_id, mut ttl) = self.check_identity(decision.spiffe_id.clone(), decision.ttl_seconds)?;
        let issue_now = match (new.emergency, decision.outcome) {
            (true, _) => {
                let rule = decision.emergency.clone().filter(|e| e.allowed).ok_or_else(|| {
                    EngineError::PolicyDenied(vec!["break-glass is not allowed for this request".into()])
                })?;
                // Break-glass gets the shortest lifetime the policy allows.
                ttl = ttl.min(rule.max_ttl_seconds).max(self.limits.min_ttl_seconds);
                true
            }
            (false, EphemeralOutcome::Issue) => true,
            (false, _) => false,
        };
        let rule = match (&decision.approval, issue_now) {
            (Some(a), _) => Rule::from(a.clone()),
            (None, true) => Rule {
                required_approvals: 0,
                approver_groups: vec![],
                approver_principals: vec![],
                deny_threshold: 1,
            },
            (None, false) => {
                return Err(EngineError::InvalidDecision(
                    "`approve` without `approval`".into(),
                ));
            }
        };
        let pending_ttl = decision
            .approval
            .as_ref()
            .map(|a| a.pending_ttl_seconds)
            .unwrap_or(900)
            .clamp(1, 7 * 86_400);
        let public_key = STANDARD.encode(&spki);
        let spiffe_id = spiffe_id.to_string();
        let binding =
            crate::approvals::binding(&spiffe_id, &public_key, ttl, &decision.dns_names, &justification);
        let request = Request {
            id: uuid::Uuid::new_v4().to_string(),
            state: State::Pending,
            requester,
            spiffe_id,
            dns_names: decision.dns_names,
            ttl_seconds: ttl,
            justification,
            ticket: new.ticket,
            emergency: new.emergency,
            post_review: new.emergency,
            public_key,
            binding,
            rule,
            votes: Vec::new(),
            created_at: rfc3339(time::OffsetDateTime::now_utc()),
            expires_at: now_unix() + pending_ttl as i64,
            decided_at: None,
            issued: None,
            policy_revision,
            attestation: attestation.map(Into::into),
            agent: None,
        };
        if issue_now {
            return self.issue_at_once(request).await.map(Created::Issued);
        }
        self.record_pending(request, AuditKind::EphemeralCreated)
            .await
            .map(Created::Pending)
    }

    /// Records a new pending request, audited as `kind`, and queues the
    /// `ephemeral.created` notification for approvers.
    async fn record_pending(&self, request: Request, kind: AuditKind) -> Result<Request, EngineError> {
        let effects = Effects {
            audit: vec![event(
                kind,
                Actor::parse(&request.requester.id),
                &request,
                json!({ "required_approvals": request.rule.required_approvals }),
            )],
            notify: vec![notification("ephemeral.created", &request)],
            ..Effects::default()
        };
        self.store.create_request(request.clone(), effects).await?;
        Ok(request)
    }

    /// Authenticates the requester (evidence, or the caller's token),
    /// verifies the CSR and decides. Blocking.
    fn ephemeral_decide(
        &self,
        caller: Option<Principal>,
        new: &NewRequest,
        justification: String,
    ) -> Result<Decided, EngineError> {
        let csr = verify_csr(&new.csr_pem)?;
        let snapshot = self.policies.snapshot();
        let (requester, role, groups, attestation) = match (&new.evidence, &caller) {
            (Some((method, evidence)), _) => {
                let a = self.attest(
                    Surface::Ephemeral,
                    &snapshot,
                    method,
                    evidence,
                    Some(&csr.spki_der),
                )?;
                let requester = Requester {
                    id: Actor::workload(&a.method, &a.subject).to_string(),
                    name: a.subject.clone(),
                    kind: "evidence".into(),
                    persons: Vec::new(),
                };
                (requester, "requester".to_owned(), Vec::new(), Some(a))
            }
            (None, Some(c)) => (
                Requester {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    kind: c.kind.as_str().into(),
                    persons: c.persons.clone(),
                },
                c.role.as_str().to_owned(),
                c.groups.clone(),
                None,
            ),
            (None, None) => return Err(EngineError::Unauthenticated),
        };
        let input = EphemeralInput {
            version: INPUT_VERSION,
            trust_domain: &self.trust_domain,
            requester: RequesterDoc {
                kind: requester.kind.clone(),
                id: requester.id.clone(),
                name: requester.name.clone(),
                role,
                groups,
            },
            attestation: attestation.as_ref(),
            request: EphemeralAsk {
                spiffe_id: new.spiffe_id.clone(),
                dns_names: new.dns_names.clone(),
                ttl_seconds: new.ttl_seconds,
                justification,
                ticket: new.ticket.clone(),
                emergency: new.emergency,
                extra: new.extra.clone(),
            },
        };
        let decision = snapshot.decide_ephemeral(&input).map_err(|e| {
            tracing::error!(error = %e, "ephemeral policy failed");
            EngineError::Policy(e)
        })?;
        Ok(Decided {
            requester,
            attestation,
            spki: csr.spki_der,
            decision,
            policy_revision: snapshot.revision(),
        })
    }

    /// Signs and records a request the policy let through without approval
    /// (or an allowed break-glass), in one transaction.
    async fn issue_at_once(self: &Arc<Self>, mut request: Request) -> Result<Request, EngineError> {
        request.state = State::Approved;
        let (cert, record) = self.sign_request(&request).await?;
        request.state = State::Issued;
        request.decided_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
        request.issued = Some(cert);
        let kind = if request.emergency {
            AuditKind::EphemeralBreakGlass
        } else {
            AuditKind::EphemeralIssued
        };
        let mut notify = vec![notification("ephemeral.issued", &request)];
        if request.emergency {
            notify.insert(0, notification("ephemeral.break_glass", &request));
        }
        let effects = Effects {
            audit: vec![event(
                kind,
                Actor::parse(&request.requester.id),
                &request,
                json!({ "serial": record.serial, "post_review": request.post_review }),
            )],
            notify,
            certificates: vec![record],
            ..Effects::default()
        };
        self.store.create_request(request.clone(), effects).await?;
        crate::metrics::get().issued("ephemeral", "");
        Ok(request)
    }

    /// Signs the request's certificate with the approval evidence in it.
    async fn sign_request(
        self: &Arc<Self>,
        r: &Request,
    ) -> Result<(IssuedCert, CertificateRecord), EngineError> {
        let (engine, r) = (self.clone(), r.clone());
        self.blocking(move || {
            let spiffe_id = crate::spiffe_id::SpiffeId::parse(&r.spiffe_id)
                .map_err(|_| EngineError::Corrupt("spiffe_id"))?;
            let spki = STANDARD
                .decode(&r.public_key)
                .map_err(|_| EngineError::Corrupt("public key"))?;
            let template = Template {
                spiffe_id,
                public_key_der: spki.clone(),
                ttl: time::Duration::seconds(r.ttl_seconds as i64),
                dns_names: r.dns_names.clone(),
                extensions: vec![(
                    crate::approvals::APPROVAL_EXTENSION_OID.to_vec(),
                    crate::approvals::approval_extension(&r),
                )],
            };
            let cert = engine.sign_x509(&template)?;
            let record = CertificateRecord {
                serial: cert.serial.clone(),
                spiffe_id: r.spiffe_id.clone(),
                not_before: rfc3339(cert.not_before),
                not_after: rfc3339(cert.not_after),
                source: Source::Ephemeral,
                method: r.requester.kind.clone(),
                subject: r.requester.name.clone(),
                public_key_sha256: sha256_hex(&spki),
                issued_at: rfc3339(time::OffsetDateTime::now_utc()),
                selectors: r
                    .attestation
                    .as_ref()
                    .map(|a| a.selectors.clone())
                    .unwrap_or_default(),
            };
            Ok((engine.delivered(cert), record))
        })
        .await
    }

    /// Casts a vote; on the vote that reaches the quorum, issues. A
    /// refusal is audited as `ephemeral.refused`.
    pub async fn ephemeral_vote(
        self: &Arc<Self>,
        voter: &Principal,
        id: &str,
        decision: VoteDecision,
        reason: &str,
        binding: &str,
    ) -> Result<Request, EngineError> {
        let refusal = || Refusal::new(Surface::Ephemeral, "vote", Actor::from(voter));
        let result = self
            .ephemeral_vote_inner(voter, id, decision, reason, binding)
            .await;
        self.audited(refusal, result).await
    }

    async fn ephemeral_vote_inner(
        self: &Arc<Self>,
        voter: &Principal,
        id: &str,
        decision: VoteDecision,
        reason: &str,
        binding: &str,
    ) -> Result<Request, EngineError> {
        let outcome = Arc::new(Mutex::new(VoteOutcome::Repeat));
        let (v, o, reason_s, binding_s) = (
            voter.clone(),
            outcome.clone(),
            reason.to_owned(),
            binding.to_owned(),
        );
        let updated = self
            .transition(id, move |r: &mut Request| {
                let now = now_unix();
                // An expired request refuses the vote and writes nothing
                // here; `expire` records the expiry right after.
                let out = r.vote(&v, decision, &reason_s, &binding_s, now)?;
                *o.lock().unwrap_or_else(|p| p.into_inner()) = out;
                let mut effects = Effects::default();
                match out {
                    VoteOutcome::Repeat => return Err(ApprovalError::NotPending("unchanged")),
                    VoteOutcome::Recorded => {}
                    VoteOutcome::Approved | VoteOutcome::Denied => {
                        effects.notify.push(notification("ephemeral.decided", r))
                    }
                }
                let kind = match decision {
                    VoteDecision::Approve => AuditKind::EphemeralApproval,
                    VoteDecision::Deny => AuditKind::EphemeralDenial,
                };
                effects
                    .audit
                    .push(event(kind, Actor::from(&v), r, json!({ "reason": reason_s })));
                if out == VoteOutcome::Approved {
                    effects.audit.push(event(
                        AuditKind::EphemeralApproved,
                        Actor::from(&v),
                        r,
                        json!({ "approvers": r.approvers() }),
                    ));
                }
                if out == VoteOutcome::Denied {
                    effects
                        .audit
                        .push(event(AuditKind::EphemeralDenied, Actor::from(&v), r, json!({})));
                }
                Ok(effects)
            })
            .await?;
        let outcome = *outcome.lock().unwrap_or_else(|p| p.into_inner());
        let request = match updated {
            Ok(r) => r,
            // A repeat vote changes nothing: answer with the request as it is.
            Err(ApprovalError::NotPending("unchanged")) => {
                return self
                    .ephemeral_get(id)
                    .await?
                    .ok_or(EngineError::Approval(ApprovalError::NotFound));
            }
            Err(ApprovalError::Expired) => {
                self.expire(id).await;
                return Err(ApprovalError::Expired.into());
            }
            Err(e) => return Err(e.into()),
        };
        let request = if outcome == VoteOutcome::Approved {
            if let Ok(created) = time::OffsetDateTime::parse(
                &request.created_at,
                &time::format_description::well_known::Rfc3339,
            ) {
                let waited = time::OffsetDateTime::now_utc() - created;
                crate::metrics::get().stage("approve_wait", waited.as_seconds_f64().max(0.0));
            }
            self.issue_approved(request).await?
        } else {
            request
        };
        self.wake(id);
        Ok(request)
    }

    /// Records an agent identity the broker's policy escalated to approvers.
    pub(super) async fn create_agent_request(
        &self,
        attestation: Attestation,
        grant: AgentGrant,
        approval: ApprovalRule,
        justification: String,
    ) -> Result<Request, EngineError> {
        let public_key = grant
            .jkt
            .clone()
            .or_else(|| grant.csr_public_key.clone())
            .unwrap_or_default();
        let bound = json!({
            "agent_id": grant.agent_id, "scopes": grant.scopes, "audience": grant.audience,
            "chain": grant.chain, "task": grant.task, "parent_jti": grant.parent_jti,
        });
        let binding = crate::approvals::binding_with(
            &grant.spiffe_id,
            &public_key,
            grant.ttl_seconds,
            &[],
            &justification,
            Some(&bound),
        );
        let request = Request {
            id: uuid::Uuid::new_v4().to_string(),
            state: State::Pending,
            requester: Requester {
                id: Actor::workload(&attestation.method, &attestation.subject).to_string(),
                name: attestation.subject.clone(),
                kind: "evidence".into(),
                // Everyone the agent acts for: none of them may approve.
                persons: self.chain_persons(&grant.chain),
            },
            spiffe_id: grant.spiffe_id.clone(),
            dns_names: vec![],
            ttl_seconds: grant.ttl_seconds,
            justification,
            ticket: None,
            emergency: false,
            post_review: false,
            public_key,
            binding,
            rule: Rule::from(approval.clone()),
            votes: Vec::new(),
            created_at: rfc3339(time::OffsetDateTime::now_utc()),
            expires_at: now_unix() + approval.pending_ttl_seconds.clamp(1, 7 * 86_400) as i64,
            decided_at: None,
            issued: None,
            policy_revision: self.policies.revision(),
            attestation: Some(attestation.into()),
            agent: Some(grant),
        };
        self.record_pending(request, AuditKind::BrokerEscalated).await
    }

    /// Delivers an approved agent identity to the agent that asked for it:
    /// the one holding the key it asked with, shown by a DPoP proof over
    /// this request (`proof`). Mints the JWT-SVID (and X.509-SVID if asked)
    /// and moves the request to `issued` in one transaction that re-checks
    /// the delegation lineage's revocation. The token is never stored. A
    /// refusal is audited as `broker.refused`.
    pub async fn agent_collect(
        self: &Arc<Self>,
        id: &str,
        proof: Option<&str>,
    ) -> Result<super::broker::Granted, EngineError> {
        let refusal = || Refusal::new(Surface::Broker, "collect", Actor::Anonymous);
        let result = self.agent_collect_inner(id, proof).await;
        self.audited(refusal, result).await
    }

    async fn agent_collect_inner(
        self: &Arc<Self>,
        id: &str,
        proof: Option<&str>,
    ) -> Result<super::broker::Granted, EngineError> {
        let mut request = self
            .ephemeral_get(id)
            .await?
            .filter(|r| r.agent.is_some())
            .ok_or(EngineError::Approval(ApprovalError::NotFound))?;
        let proof = proof.ok_or_else(|| {
            EngineError::Dpop("send a DPoP proof (RFC 9449) signed by the key the request asked with".into())
        })?;
        let proof = self
            .check_dpop(proof, &format!("/api/v1/ephemeral/{id}/collect"), None)
            .await?;
        let grant = request
            .agent
            .clone()
            .ok_or(EngineError::Internal("agent request"))?;
        if grant.jkt.as_deref() != Some(proof.jkt.as_str()) {
            return Err(EngineError::Dpop(
                "the DPoP proof is not signed by the key the request asked with".into(),
            ));
        }
        if request.expire_if_due(now_unix()) {
            self.expire(id).await;
            return Err(ApprovalError::Expired.into());
        }
        if request.state != State::Approved {
            return Err(ApprovalError::NotPending(request.state.as_str()).into());
        }
        let (engine, g) = (self.clone(), grant.clone());
        let (granted, token, cert) = self.blocking(move || engine.mint_agent(&g)).await?;
        let issued = super::broker::granted_as_issued(&granted);
        let approvers = request.approvers();
        let updated = self
            .store
            .update_request_in_lineage(id, move |r: &mut Request, revoked| {
                if let Some(jti) = revoked {
                    return Err(EngineError::Delegation(format!(
                        "token {jti} in the delegation chain was revoked"
                    )));
                }
                if r.state != State::Approved {
                    return Err(ApprovalError::NotPending(r.state.as_str()).into());
                }
                r.state = State::Issued;
                r.issued = Some(issued);
                let mut audit = super::broker::issued_event(&grant, &token, &[]);
                if let Some(d) = audit.detail.as_object_mut() {
                    d.insert("request_id".into(), json!(r.id));
                    d.insert("approvers".into(), json!(approvers));
                    d.insert("policy_revision".into(), json!(r.policy_revision));
                    d.insert("attestation".into(), json!(r.attestation));
                }
                Ok(Effects {
                    audit: vec![audit],
                    notify: vec![notification("ephemeral.issued", r)],
                    certificates: cert.into_iter().collect(),
                    agent_tokens: vec![token],
                })
            })
            .await?
            .unwrap_or(Err(EngineError::Approval(ApprovalError::NotFound)))?;
        crate::metrics::get().issued("ephemeral", "");
        self.wake(&updated.id);
        Ok(granted)
    }

    /// Moves an `approved` request to `issued` with what was minted for it,
    /// in one store transition; refused unless it is still `approved`.
    /// `record` supplies the audit, inventory and registry writes.
    async fn record_issued(
        &self,
        id: &str,
        issued: IssuedCert,
        record: impl FnOnce(&Request) -> Effects + Send + 'static,
    ) -> Result<Request, EngineError> {
        let updated = self
            .transition(id, move |r: &mut Request| {
                if r.state != State::Approved {
                    return Err(ApprovalError::NotPending(r.state.as_str()));
                }
                r.state = State::Issued;
                r.issued = Some(issued);
                let mut effects = record(r);
                effects.notify.push(notification("ephemeral.issued", r));
                Ok(effects)
            })
            .await??;
        Ok(updated)
    }

    /// Signs an `approved` request and moves it to `issued`. Only the caller
    /// whose vote made it `approved` (or recovery) gets here, and the store
    /// refuses the move unless the request is still `approved`. An agent
    /// request stays `approved` until its agent collects it.
    async fn issue_approved(self: &Arc<Self>, request: Request) -> Result<Request, EngineError> {
        if request.agent.is_some() {
            return Ok(request);
        }
        let (cert, record) = self.sign_request(&request).await?;
        let approvers = request.approvers();
        let serial = record.serial.clone();
        let issued = self
            .record_issued(&request.id, cert, move |r| Effects {
                audit: vec![event(
                    AuditKind::EphemeralIssued,
                    Actor::Castellan,
                    r,
                    json!({ "serial": serial, "approvers": approvers }),
                )],
                certificates: vec![record],
                ..Effects::default()
            })
            .await;
        if issued.is_ok() {
            crate::metrics::get().issued("ephemeral", "");
        }
        issued
    }

    /// Cancels a pending request for its requester. A refusal is audited
    /// as `ephemeral.refused`.
    pub async fn ephemeral_cancel(&self, who: &Principal, id: &str) -> Result<Request, EngineError> {
        let refusal = || Refusal::new(Surface::Ephemeral, "cancel", Actor::from(who));
        let result = self.ephemeral_cancel_inner(who, id).await;
        self.audited(refusal, result).await
    }

    async fn ephemeral_cancel_inner(&self, who: &Principal, id: &str) -> Result<Request, EngineError> {
        let who2 = who.clone();
        let updated = self
            .transition(id, move |r: &mut Request| {
                r.cancel(&who2, now_unix())?;
                Ok(Effects {
                    audit: vec![event(
                        AuditKind::EphemeralCancelled,
                        Actor::from(&who2),
                        r,
                        json!({}),
                    )],
                    notify: vec![notification("ephemeral.decided", r)],
                    certificates: vec![],
                    ..Effects::default()
                })
            })
            .await?;
        match updated {
            Ok(r) => {
                self.wake(id);
                Ok(r)
            }
            Err(ApprovalError::Expired) => {
                self.expire(id).await;
                Err(ApprovalError::Expired.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Moves a request past its deadline to `expired` (idempotent).
    async fn expire(&self, id: &str) {
        let result = self
            .transition(id, |r: &mut Request| {
                if !r.expire_if_due(now_unix()) {
                    return Err(ApprovalError::NotPending(r.state.as_str()));
                }
                Ok(Effects {
                    audit: vec![event(AuditKind::EphemeralExpired, Actor::Castellan, r, json!({}))],
                    notify: vec![notification("ephemeral.expired", r)],
                    certificates: vec![],
                    ..Effects::default()
                })
            })
            .await;
        if let Ok(Ok(_)) = result {
            self.wake(id);
        }
    }

    /// One request.
    pub async fn ephemeral_get(&self, id: &str) -> Result<Option<Request>, EngineError> {
        Ok(self.store.get_request(id).await?)
    }

    /// Waits up to `wait` for the request to leave `from` (passing through the
    /// brief `approved` state), then returns it as it is.
    pub async fn ephemeral_wait(
        &self,
        id: &str,
        from: State,
        wait: Duration,
    ) -> Result<Option<Request>, EngineError> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.watcher(id);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(r) = self.ephemeral_get(id).await? else {
                return Ok(None);
            };
            if r.state != from && r.state != State::Approved {
                return Ok(Some(r));
            }
            if r.state == State::Pending && now_unix() >= r.expires_at {
                self.expire(id).await;
                continue;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(deadline) => return Ok(Some(r)),
            }
        }
    }

    /// Requests `who` may act on or follow: their own, and (for approvers)
    /// pending ones they are eligible to vote on. Admins see all.
    pub async fn ephemeral_list(
        &self,
        who: &Principal,
        state: Option<State>,
    ) -> Result<Vec<Request>, EngineError> {
        let all = self.store.list_requests(state).await?;
        Ok(all
            .into_iter()
            .filter(|r| {
                who.role == crate::auth::Role::Admin
                    || who.is_any_of(std::slice::from_ref(&r.requester.id))
                    || (r.state == State::Pending && r.is_eligible(who) && !r.is_own(who))
            })
            .collect())
    }

    /// Background duties. Those of this gateway's memory run here always;
    /// those of the shared store (purges, expiring overdue requests,
    /// finishing requests left approved) run only on the leader, so that
    /// gateways sharing a store do them once.
    pub async fn run_housekeeping(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            let now = now_unix();
            if ticks.is_multiple_of(super::refusals::SUMMARY_SECONDS) {
                self.summarise_suppressed_refusals().await;
            }
            // In-memory state shrinks with what it tracks.
            if ticks % 60 == 3 {
                self.forget_expired_revocations(now);
                let entries = self.entries.clone();
                self.svids.prune(&|id| entries.get(id).is_some(), now);
                self.watchers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|_, n| Arc::strong_count(n) > 1);
            }
            // A shared signer may have rotated for another gateway: its
            // notice reaches this one through the store, this is the net.
            if ticks % 10 == 7
                && self.signer.shared()
                && let Err(e) = self.refresh_authorities().await
            {
                tracing::warn!(error = %e, "could not re-read the signer's authorities");
            }
            if self.store.is_leader() {
                self.shared_housekeeping(ticks, now).await;
                if ticks % 10 == 9
                    && let Some(schedule) = self.rotation
                {
                    self.auto_rotate(schedule).await;
                }
                // The audit log's head is signed hourly (if it moved).
                if ticks % CHECKPOINT_SECONDS == 11 {
                    self.checkpoint_if_moved().await;
                }
            }
        }
    }

    /// Appends a signed checkpoint unless the log's last entry is one.
    async fn checkpoint_if_moved(&self) {
        if let Ok(Some(kind)) = self.store.audit_tail_kind().await
            && kind == crate::audit::CHECKPOINT
        {
            return;
        }
        if let Err(e) = self.audit_checkpoint(crate::model::Actor::Castellan).await {
            tracing::warn!(error = %e, "the audit log's head could not be signed");
        }
    }

    /// The store's duties, run by one gateway.
    async fn shared_housekeeping(self: &Arc<Self>, ticks: u64, now: i64) {
        // Idempotency keys are remembered for a day; forget older ones hourly.
        if ticks % 3600 == 1
            && let Err(e) = self.store.idempotency_purge(now - 24 * 3600).await
        {
            tracing::warn!(error = %e, "could not purge old idempotency keys");
        }
        // Expired agent tokens and revocations, and decided requests a
        // month past their deadline, are forgotten hourly.
        if ticks % 3600 == 4
            && let Err(e) = self.store.purge_expired(now, REQUEST_RETENTION_SECONDS).await
        {
            tracing::warn!(error = %e, "could not purge expired records");
        }
        // Spent single-use evidence only matters until it expires.
        if ticks % 3600 == 2
            && let Err(e) = self.store.spent_purge(now).await
        {
            tracing::warn!(error = %e, "could not purge expired single-use evidence");
        }
        if ticks % 60 == 5
            && let Err(e) = self.store.purge_challenges(now).await
        {
            tracing::warn!(error = %e, "could not purge expired challenges");
        }
        // A request left approved (its gateway died, or the signer failed
        // between approval and signing) is issued here, once its approval
        // is old enough that no gateway is still signing it.
        if ticks % 10 == 1
            && let Ok(approved) = self.store.list_requests(Some(State::Approved)).await
        {
            for r in approved
                .into_iter()
                .filter(|r| r.agent.is_none() && decided_before(r, now - FINISH_AFTER_SECONDS))
            {
                let id = r.id.clone();
                match self.issue_approved(r).await {
                    Ok(_) => tracing::info!(request_id = %id, "issued a request left approved"),
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "could not issue an approved request")
                    }
                }
            }
        }
        for state in [State::Pending, State::Approved] {
            let Ok(open) = self.store.list_requests(Some(state)).await else {
                continue;
            };
            for mut r in open {
                if r.expire_if_due(now) {
                    self.expire(&r.id).await;
                }
            }
        }
    }
}
