//! The ephemeral pipeline: authenticate the requester (token or evidence) →
//! decide (Rego `castellan.ephemeral`) → issue now, or record a pending
//! request → votes → on quorum, sign exactly once → record → wake waiters.
//! Every transition goes through [`Store::update_request`], which serialises
//! them, so racing approvals cannot mint twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{ApprovalError, Decision, IssuedCert, Request, Requester, Rule, State, VoteOutcome};
use crate::attest::Attestation;
use crate::auth::Principal;
use crate::issuance::{IssuanceError, Pipeline, verify_csr};
use crate::policy::EphemeralOutcome;
use crate::signer::Template;
use crate::store::{AuditEvent, CertificateRecord, Effects, Notification, StoreError};
use crate::util::{now_unix, rfc3339, sha256_hex};

/// Longest justification kept, in characters.
const MAX_JUSTIFICATION: usize = 1024;

/// Why an ephemeral operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EphemeralError {
    /// A stage of the shared pipeline refused (CSR, attestation, policy…).
    #[error(transparent)]
    Issuance(#[from] IssuanceError),
    /// The approval rules refused.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// No credentials came with the request.
    #[error("authenticate with an API token or with `method` and `evidence`")]
    Unauthenticated,
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
}

impl From<StoreError> for EphemeralError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure on the ephemeral path");
        EphemeralError::Issuance(IssuanceError::Unavailable(
            "the request could not be recorded; nothing was issued".into(),
        ))
    }
}

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

/// The ephemeral service shared by every surface.
pub struct Approvals {
    pipeline: Arc<Pipeline>,
    /// Waiters per request id, woken on every transition.
    watchers: Mutex<HashMap<String, Arc<Notify>>>,
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, EphemeralError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EphemeralError::Issuance(IssuanceError::Internal(format!("task failed: {e}"))))
}

fn event(kind: &str, actor: &str, r: &Request, extra: Value) -> AuditEvent {
    let mut detail = json!({
        "request_id": r.id,
        "state": r.state,
        "spiffe_id": r.spiffe_id,
        "binding": r.binding,
        "requester": r.requester.id,
    });
    if let (Some(d), Value::Object(e)) = (detail.as_object_mut(), extra) {
        d.extend(e);
    }
    AuditEvent {
        kind: kind.into(),
        actor: actor.into(),
        detail,
    }
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

impl Approvals {
    pub fn new(pipeline: Arc<Pipeline>) -> Arc<Self> {
        Arc::new(Self {
            pipeline,
            watchers: Mutex::new(HashMap::new()),
        })
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

    /// Creates a request: decides, then issues at once or records it pending.
    pub async fn create(
        &self,
        caller: Option<Principal>,
        new: NewRequest,
    ) -> Result<Created, EphemeralError> {
        let p = self.pipeline.clone();
        let justification = new.justification.trim().to_owned();
        if justification.is_empty() {
            return Err(IssuanceError::BadRequest("`justification` is required".into()).into());
        }
        if justification.chars().count() > MAX_JUSTIFICATION {
            return Err(IssuanceError::BadRequest(format!(
                "`justification` is longer than {MAX_JUSTIFICATION} characters"
            ))
            .into());
        }
        if new.ticket.as_ref().is_some_and(|t| t.len() > 256) {
            return Err(IssuanceError::BadRequest("`ticket` is longer than 256 characters".into()).into());
        }
        if let Some(ttl) = new.ttl_seconds
            && ttl < p.limits.min_ttl_seconds
        {
            return Err(IssuanceError::BadRequest(format!(
                "ttl_seconds must be at least {}",
                p.limits.min_ttl_seconds
            ))
            .into());
        }

        // Authenticate, verify the CSR and decide, off the async threads.
        let (requester, attestation, spki, decision) = {
            let new = new.clone();
            let justification = justification.clone();
            blocking(move || -> Result<_, EphemeralError> {
                let csr = verify_csr(&new.csr_pem)?;
                let snapshot = p.policies.snapshot();
                let (requester, role, groups, attestation): (
                    Requester,
                    String,
                    Vec<String>,
                    Option<Attestation>,
                ) = match (&new.evidence, &caller) {
                    (Some((method, evidence)), _) => {
                        let a = p.attest_bound(&snapshot, method, evidence, Some(&csr.spki_der))?;
                        let requester = Requester {
                            id: format!("workload:{}:{}", a.method, a.subject),
                            name: a.subject.clone(),
                            kind: "evidence".into(),
                        };
                        (requester, "requester".into(), Vec::new(), Some(a))
                    }
                    (None, Some(c)) => (
                        Requester {
                            id: c.id.clone(),
                            name: c.name.clone(),
                            kind: c.kind.into(),
                        },
                        serde_json::to_value(c.role)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        c.groups.clone(),
                        None,
                    ),
                    (None, None) => return Err(EphemeralError::Unauthenticated),
                };
                let input = json!({
                    "version": crate::issuance::POLICY_INPUT_VERSION,
                    "trust_domain": p.trust_domain,
                    "requester": {
                        "kind": requester.kind, "id": requester.id, "name": requester.name,
                        "role": role, "groups": groups,
                    },
                    "attestation": attestation,
                    "request": {
                        "spiffe_id": new.spiffe_id,
                        "dns_names": new.dns_names,
                        "ttl_seconds": new.ttl_seconds,
                        "justification": justification,
                        "ticket": new.ticket,
                        "emergency": new.emergency,
                        "extra": new.extra,
                    },
                });
                let decision = snapshot.decide_ephemeral(&input).map_err(|e| {
                    tracing::error!(error = %e, "ephemeral policy failed");
                    IssuanceError::Internal(format!("the policy could not decide: {e}"))
                })?;
                Ok((requester, attestation, csr.spki_der, decision))
            })
            .await??
        };

        if decision.outcome == EphemeralOutcome::Deny {
            let reasons = if decision.reasons.is_empty() {
                vec!["no reason given".to_owned()]
            } else {
                decision.reasons
            };
            return Err(IssuanceError::PolicyDenied(reasons).into());
        }
        let (spiffe_id, mut ttl) = self
            .pipeline
            .check_identity(decision.spiffe_id.clone(), decision.ttl_seconds)?;
        let issue_now = match (new.emergency, decision.outcome) {
            (true, _) => {
                let rule = decision.emergency.clone().filter(|e| e.allowed).ok_or_else(|| {
                    IssuanceError::PolicyDenied(vec!["break-glass is not allowed for this request".into()])
                })?;
                // Break-glass gets the shortest lifetime the policy allows.
                ttl = ttl
                    .min(rule.max_ttl_seconds)
                    .max(self.pipeline.limits.min_ttl_seconds);
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
                return Err(IssuanceError::Internal(
                    "the policy returned an invalid decision: `approve` without `approval`".into(),
                )
                .into());
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
        let binding = super::binding(&spiffe_id, &public_key, ttl, &decision.dns_names, &justification);
        let mut request = Request {
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
            policy_revision: self.pipeline.policies.revision(),
            attestation: attestation.map(Into::into),
            agent: None,
        };
        let actor = request.requester.id.clone();

        if issue_now {
            request.state = State::Approved;
            let (cert, record) = self.sign(&request).await?;
            request.state = State::Issued;
            request.decided_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
            request.issued = Some(cert);
            let kind = if request.emergency {
                "ephemeral.break_glass"
            } else {
                "ephemeral.issued"
            };
            let mut notify = vec![notification("ephemeral.issued", &request)];
            if request.emergency {
                notify.insert(0, notification("ephemeral.break_glass", &request));
            }
            let effects = Effects {
                audit: vec![event(
                    kind,
                    &actor,
                    &request,
                    json!({ "serial": record.serial, "post_review": request.post_review }),
                )],
                notify,
                certificates: vec![record],
                ..Effects::default()
            };
            self.pipeline
                .store
                .create_request(request.clone(), effects)
                .await?;
            return Ok(Created::Issued(request));
        }
        let effects = Effects {
            audit: vec![event(
                "ephemeral.created",
                &actor,
                &request,
                json!({ "required_approvals": request.rule.required_approvals }),
            )],
            notify: vec![notification("ephemeral.created", &request)],
            certificates: vec![],
            ..Effects::default()
        };
        self.pipeline
            .store
            .create_request(request.clone(), effects)
            .await?;
        Ok(Created::Pending(request))
    }

    /// Signs the request's certificate with the approval evidence in it.
    async fn sign(&self, r: &Request) -> Result<(IssuedCert, CertificateRecord), EphemeralError> {
        let p = self.pipeline.clone();
        let r = r.clone();
        blocking(move || -> Result<_, EphemeralError> {
            let spiffe_id = crate::spiffe_id::SpiffeId::parse(&r.spiffe_id)
                .map_err(|e| IssuanceError::Internal(format!("stored spiffe_id: {e}")))?;
            let spki = STANDARD
                .decode(&r.public_key)
                .map_err(|e| IssuanceError::Internal(format!("stored key: {e}")))?;
            let template = Template {
                spiffe_id,
                public_key_der: spki.clone(),
                ttl: time::Duration::seconds(r.ttl_seconds as i64),
                dns_names: r.dns_names.clone(),
                extensions: vec![(
                    super::APPROVAL_EXTENSION_OID.to_vec(),
                    super::approval_extension(&r),
                )],
            };
            let cert = p.signer.sign_x509_svid(&template).map_err(|e| {
                tracing::error!(error = %e, "signer failed");
                IssuanceError::Internal("the signer could not issue the certificate".into())
            })?;
            let record = CertificateRecord {
                serial: cert.serial.clone(),
                spiffe_id: r.spiffe_id.clone(),
                not_before: rfc3339(cert.not_before),
                not_after: rfc3339(cert.not_after),
                source: "ephemeral".into(),
                method: r.requester.kind.clone(),
                subject: r.requester.name.clone(),
                public_key_sha256: sha256_hex(&spki),
                issued_at: rfc3339(time::OffsetDateTime::now_utc()),
            };
            let issued = IssuedCert {
                chain_pem: format!("{}{}", cert.pem, p.signer.intermediates_pem()),
                certificate_pem: cert.pem,
                bundle_pem: p.signer.bundle_pem().to_owned(),
                serial: cert.serial,
                not_after: rfc3339(cert.not_after),
                jwt_svid: None,
            };
            Ok((issued, record))
        })
        .await?
    }

    /// Casts a vote; on the vote that reaches the quorum, issues.
    pub async fn vote(
        &self,
        voter: &Principal,
        id: &str,
        decision: Decision,
        reason: &str,
        binding: &str,
    ) -> Result<Request, EphemeralError> {
        let outcome = Arc::new(Mutex::new(VoteOutcome::Repeat));
        let (v, o, reason_s, binding_s) = (
            voter.clone(),
            outcome.clone(),
            reason.to_owned(),
            binding.to_owned(),
        );
        let updated = self
            .pipeline
            .store
            .update_request(
                id,
                Box::new(move |r: &mut Request| {
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
                        Decision::Approve => "ephemeral.approval",
                        Decision::Deny => "ephemeral.denial",
                    };
                    effects
                        .audit
                        .push(event(kind, &v.id, r, json!({ "reason": reason_s })));
                    if out == VoteOutcome::Approved {
                        effects.audit.push(event(
                            "ephemeral.approved",
                            &v.id,
                            r,
                            json!({ "approvers": r.approvers() }),
                        ));
                    }
                    if out == VoteOutcome::Denied {
                        effects.audit.push(event("ephemeral.denied", &v.id, r, json!({})));
                    }
                    Ok(effects)
                }),
            )
            .await?;
        let outcome = *outcome.lock().unwrap_or_else(|p| p.into_inner());
        let request = match updated {
            Ok(r) => r,
            // A repeat vote changes nothing: answer with the request as it is.
            Err(ApprovalError::NotPending("unchanged")) => {
                return self
                    .get(id)
                    .await?
                    .ok_or(EphemeralError::Approval(ApprovalError::NotFound));
            }
            Err(ApprovalError::Expired) => {
                self.expire(id).await;
                return Err(ApprovalError::Expired.into());
            }
            Err(e) => return Err(e.into()),
        };
        let request = if outcome == VoteOutcome::Approved {
            self.issue_approved(request).await?
        } else {
            request
        };
        self.wake(id);
        Ok(request)
    }

    /// Records an agent identity the broker's policy escalated to approvers.
    pub async fn create_agent_request(
        &self,
        attestation: Attestation,
        grant: crate::broker::AgentGrant,
        approval: crate::policy::ApprovalRule,
        justification: String,
    ) -> Result<Request, EphemeralError> {
        let public_key = grant
            .jkt
            .clone()
            .or_else(|| grant.csr_public_key.clone())
            .unwrap_or_default();
        let bound = json!({
            "agent_id": grant.agent_id, "scopes": grant.scopes, "audience": grant.audience,
            "chain": grant.chain, "task": grant.task, "parent_jti": grant.parent_jti,
        });
        let binding = super::binding_with(
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
                id: format!("workload:{}:{}", attestation.method, attestation.subject),
                name: attestation.subject.clone(),
                kind: "evidence".into(),
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
            policy_revision: self.pipeline.policies.revision(),
            attestation: Some(attestation.into()),
            agent: Some(grant),
        };
        let actor = request.requester.id.clone();
        let effects = Effects {
            audit: vec![event(
                "broker.escalated",
                &actor,
                &request,
                json!({ "required_approvals": request.rule.required_approvals }),
            )],
            notify: vec![notification("ephemeral.created", &request)],
            ..Effects::default()
        };
        self.pipeline
            .store
            .create_request(request.clone(), effects)
            .await?;
        Ok(request)
    }

    /// Mints an approved agent identity (JWT-SVID, and X.509-SVID if asked).
    async fn issue_approved_agent(
        &self,
        request: Request,
        grant: crate::broker::AgentGrant,
    ) -> Result<Request, EphemeralError> {
        let p = self.pipeline.clone();
        let g = grant.clone();
        let minted = blocking(move || crate::broker::mint(&p, &g)).await?;
        let (granted, token, cert) = minted.map_err(|e| match e {
            crate::broker::BrokerError::Issuance(i) => EphemeralError::Issuance(i),
            other => EphemeralError::Forbidden(other.to_string()),
        })?;
        let issued = crate::broker::granted_as_issued(&granted);
        let approvers = request.approvers();
        self.record_issued(&request.id, issued, move |r| {
            let mut audit = crate::broker::issued_event(&grant, &token, &[]);
            if let Some(d) = audit.detail.as_object_mut() {
                d.insert("request_id".into(), json!(r.id));
                d.insert("approvers".into(), json!(approvers));
            }
            Effects {
                audit: vec![audit],
                certificates: cert.into_iter().collect(),
                agent_tokens: vec![token],
                ..Effects::default()
            }
        })
        .await
    }

    /// Moves an `approved` request to `issued` with what was minted for it,
    /// in one store transition; refused unless it is still `approved`.
    /// `record` supplies the audit, inventory and registry writes.
    async fn record_issued(
        &self,
        id: &str,
        issued: IssuedCert,
        record: impl FnOnce(&Request) -> Effects + Send + 'static,
    ) -> Result<Request, EphemeralError> {
        let updated = self
            .pipeline
            .store
            .update_request(
                id,
                Box::new(move |r: &mut Request| {
                    if r.state != State::Approved {
                        return Err(ApprovalError::NotPending(r.state.as_str()));
                    }
                    r.state = State::Issued;
                    r.issued = Some(issued);
                    let mut effects = record(r);
                    effects.notify.push(notification("ephemeral.issued", r));
                    Ok(effects)
                }),
            )
            .await??;
        Ok(updated)
    }

    /// Signs an `approved` request and moves it to `issued`. Only the caller
    /// whose vote made it `approved` (or recovery) gets here, and the store
    /// refuses the move unless the request is still `approved`.
    pub async fn issue_approved(&self, request: Request) -> Result<Request, EphemeralError> {
        if let Some(grant) = request.agent.clone() {
            return self.issue_approved_agent(request, grant).await;
        }
        let (cert, record) = self.sign(&request).await?;
        let approvers = request.approvers();
        let serial = record.serial.clone();
        self.record_issued(&request.id, cert, move |r| Effects {
            audit: vec![event(
                "ephemeral.issued",
                "castellan",
                r,
                json!({ "serial": serial, "approvers": approvers }),
            )],
            certificates: vec![record],
            ..Effects::default()
        })
        .await
    }

    /// Cancels a pending request for its requester.
    pub async fn cancel(&self, who: &Principal, id: &str) -> Result<Request, EphemeralError> {
        let who2 = who.clone();
        let updated = self
            .pipeline
            .store
            .update_request(
                id,
                Box::new(move |r: &mut Request| {
                    r.cancel(&who2, now_unix())?;
                    Ok(Effects {
                        audit: vec![event("ephemeral.cancelled", &who2.id, r, json!({}))],
                        notify: vec![notification("ephemeral.decided", r)],
                        certificates: vec![],
                        ..Effects::default()
                    })
                }),
            )
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
            .pipeline
            .store
            .update_request(
                id,
                Box::new(|r: &mut Request| {
                    if !r.expire_if_due(now_unix()) {
                        return Err(ApprovalError::NotPending(r.state.as_str()));
                    }
                    Ok(Effects {
                        audit: vec![event("ephemeral.expired", "castellan", r, json!({}))],
                        notify: vec![notification("ephemeral.expired", r)],
                        certificates: vec![],
                        ..Effects::default()
                    })
                }),
            )
            .await;
        if let Ok(Ok(_)) = result {
            self.wake(id);
        }
    }

    /// One request.
    pub async fn get(&self, id: &str) -> Result<Option<Request>, EphemeralError> {
        Ok(self.pipeline.store.get_request(id).await?)
    }

    /// Waits up to `wait` for the request to leave `from` (passing through the
    /// brief `approved` state), then returns it as it is.
    pub async fn wait(
        &self,
        id: &str,
        from: State,
        wait: Duration,
    ) -> Result<Option<Request>, EphemeralError> {
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.watcher(id);
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(r) = self.get(id).await? else {
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
    pub async fn list(&self, who: &Principal, state: Option<State>) -> Result<Vec<Request>, EphemeralError> {
        let all = self.pipeline.store.list_requests(state).await?;
        Ok(all
            .into_iter()
            .filter(|r| {
                who.role == crate::auth::Role::Admin
                    || r.requester.id == who.id
                    || (r.state == State::Pending && r.is_eligible(who) && r.requester.name != who.name)
            })
            .collect())
    }

    /// Background duties: expire overdue requests, forget old idempotency
    /// keys, and finish any request left `approved` by a crash between
    /// approval and signing.
    pub async fn run_housekeeping(self: Arc<Self>) {
        if let Ok(approved) = self.pipeline.store.list_requests(Some(State::Approved)).await {
            for r in approved {
                let id = r.id.clone();
                match self.issue_approved(r).await {
                    Ok(_) => tracing::info!(request_id = %id, "issued a request left approved"),
                    Err(e) => {
                        tracing::error!(request_id = %id, error = %e, "could not issue an approved request")
                    }
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            // Idempotency keys are remembered for a day; forget older ones hourly.
            if ticks % 3600 == 1
                && let Err(e) = self
                    .pipeline
                    .store
                    .idempotency_purge(now_unix() - 24 * 3600)
                    .await
            {
                tracing::warn!(error = %e, "could not purge old idempotency keys");
            }
            // Spent single-use evidence only matters until it expires.
            if ticks % 3600 == 2
                && let Err(e) = self.pipeline.store.spent_purge(now_unix()).await
            {
                tracing::warn!(error = %e, "could not purge expired single-use evidence");
            }
            let Ok(pending) = self.pipeline.store.list_requests(Some(State::Pending)).await else {
                continue;
            };
            let now = now_unix();
            for r in pending.into_iter().filter(|r| now >= r.expires_at) {
                self.expire(&r.id).await;
            }
        }
    }
}
