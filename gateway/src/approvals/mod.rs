//! Approvals: the rules of just-in-time requests that wait for people.
//!
//! This module owns a request's state machine (`pending` → `approved` →
//! `issued`; `pending` → `denied` | `expired` | `cancelled`), the binding
//! that ties every vote to exactly what was approved, and the rules of
//! voting (no self-approval, one vote per approver, eligibility from
//! policy). The request itself is the model's ([`Request`]). It never signs
//! and never stores: the engine's ephemeral flow applies these rules inside
//! one store transition, which happens exactly once per request because the
//! store serialises transitions.

use serde_json::{Value, json};

use crate::model::Principal;
pub use crate::model::{IssuedCert, Request, Requester, Rule, State, Vote, VoteDecision};

/// Why a vote or cancellation was refused. Each maps to one problem type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApprovalError {
    /// No request with that id.
    #[error("no ephemeral request with that id")]
    NotFound,
    /// The request expired before the vote.
    #[error("the request expired; ask the requester to submit a new one")]
    Expired,
    /// The request is no longer pending.
    #[error("the request is {0} and takes no more votes")]
    NotPending(&'static str),
    /// The requester tried to approve their own request.
    #[error("the requester cannot approve or deny their own request")]
    SelfApproval,
    /// The voter is not among those the policy named.
    #[error("{0} is not an eligible approver for this request")]
    NotEligible(String),
    /// The vote was cast for something other than what the request asks.
    #[error(
        "the binding does not match the request; review the request again and vote on its current binding"
    )]
    BindingMismatch,
    /// Only the requester may cancel.
    #[error("only the requester can cancel a request")]
    NotRequester,
}

/// How long an agent has to collect an approved identity.
pub const COLLECT_WINDOW_SECONDS: i64 = 600;

/// What a successful vote did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteOutcome {
    /// Recorded; the request stays pending.
    Recorded,
    /// The voter had already voted: nothing changed.
    Repeat,
    /// This vote reached the quorum: the request is now `approved`.
    Approved,
    /// This vote reached the deny threshold: the request is now `denied`.
    Denied,
}

/// The binding: `sha256:<hex>` over the canonical JSON of what is approved.
/// serde_json sorts object keys, so equal requests hash equally.
pub fn binding(
    spiffe_id: &str,
    public_key_b64: &str,
    ttl_seconds: u64,
    dns_names: &[String],
    justification: &str,
) -> String {
    binding_with(
        spiffe_id,
        public_key_b64,
        ttl_seconds,
        dns_names,
        justification,
        None,
    )
}

/// The binding with more of what is approved (an agent's scopes, audience
/// and delegation chain) under `grant`.
pub fn binding_with(
    spiffe_id: &str,
    public_key_b64: &str,
    ttl_seconds: u64,
    dns_names: &[String],
    justification: &str,
    grant: Option<&Value>,
) -> String {
    let mut canonical = json!({
        "subject": spiffe_id,
        "public_key": public_key_b64,
        "ttl_seconds": ttl_seconds,
        "dns_names": dns_names,
        "justification": justification,
    });
    if let Some(g) = grant {
        canonical["grant"] = g.clone();
    }
    format!(
        "sha256:{}",
        crate::util::sha256_hex(canonical.to_string().as_bytes())
    )
}

impl Request {
    /// Whether `principal` may vote on this request (ignoring self-approval).
    pub fn is_eligible(&self, principal: &Principal) -> bool {
        if !principal.role.can_approve() {
            return false;
        }
        self.rule
            .approver_principals
            .iter()
            .any(|p| principal.answers_to(p))
            || principal
                .groups
                .iter()
                .any(|g| self.rule.approver_groups.contains(g))
    }

    /// Whether `who` is the requester or anyone the request speaks for (its
    /// delegation chain): self-approval, by any of the person's names.
    pub fn is_own(&self, who: &Principal) -> bool {
        who.is_any_of(std::slice::from_ref(&self.requester.id)) || who.is_any_of(&self.requester.persons)
    }

    /// Moves a request past its deadline to `expired`: a pending one, or an
    /// approved agent request its agent did not collect in time. Returns
    /// whether it changed.
    pub fn expire_if_due(&mut self, now: i64) -> bool {
        let waiting = self.state == State::Pending || (self.state == State::Approved && self.agent.is_some());
        if waiting && now >= self.expires_at {
            self.state = State::Expired;
            self.decided_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
            return true;
        }
        false
    }

    /// Applies one vote. The caller persists the result atomically.
    pub fn vote(
        &mut self,
        voter: &Principal,
        decision: VoteDecision,
        reason: &str,
        binding: &str,
        now: i64,
    ) -> Result<VoteOutcome, ApprovalError> {
        if self.expire_if_due(now) || self.state == State::Expired {
            return Err(ApprovalError::Expired);
        }
        if self.state != State::Pending {
            return Err(ApprovalError::NotPending(self.state.as_str()));
        }
        if self.is_own(voter) {
            return Err(ApprovalError::SelfApproval);
        }
        if !self.is_eligible(voter) {
            return Err(ApprovalError::NotEligible(voter.name.clone()));
        }
        if binding != self.binding {
            return Err(ApprovalError::BindingMismatch);
        }
        if self
            .votes
            .iter()
            .any(|v| voter.is_any_of(std::slice::from_ref(&v.approver)) || voter.is_any_of(&v.persons))
        {
            return Ok(VoteOutcome::Repeat);
        }
        self.votes.push(Vote {
            approver: voter.id.clone(),
            persons: voter.persons.clone(),
            decision,
            reason: reason.chars().take(1024).collect(),
            at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        });
        let count = |d: VoteDecision| self.votes.iter().filter(|v| v.decision == d).count() as u32;
        if count(VoteDecision::Deny) >= self.rule.deny_threshold.max(1) {
            self.state = State::Denied;
            self.decided_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
            return Ok(VoteOutcome::Denied);
        }
        if count(VoteDecision::Approve) >= self.rule.required_approvals.max(1) {
            self.state = State::Approved;
            if self.agent.is_some() {
                // The agent collects its identity with a proof of its key.
                self.expires_at = now + COLLECT_WINDOW_SECONDS;
            }
            self.decided_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
            return Ok(VoteOutcome::Approved);
        }
        Ok(VoteOutcome::Recorded)
    }

    /// Cancels a pending request on behalf of `who`.
    pub fn cancel(&mut self, who: &Principal, now: i64) -> Result<(), ApprovalError> {
        if who.id != self.requester.id {
            return Err(ApprovalError::NotRequester);
        }
        if self.expire_if_due(now) || self.state == State::Expired {
            return Err(ApprovalError::Expired);
        }
        if self.state != State::Pending {
            return Err(ApprovalError::NotPending(self.state.as_str()));
        }
        self.state = State::Cancelled;
        self.decided_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
        Ok(())
    }

    /// Approver ids that approved, in vote order.
    pub fn approvers(&self) -> Vec<String> {
        self.votes
            .iter()
            .filter(|v| v.decision == VoteDecision::Approve)
            .map(|v| v.approver.clone())
            .collect()
    }

    /// The key the credential will be bound to, as approvers compare it with
    /// the requester's: `jkt:` and the RFC 7638 thumbprint for an agent's
    /// key, else `sha256:` and the hex SHA-256 of its SubjectPublicKeyInfo.
    pub fn key_fingerprint(&self) -> String {
        use base64::Engine as _;
        if let Some(jkt) = self.agent.as_ref().and_then(|g| g.jkt.as_ref()) {
            return format!("jkt:{jkt}");
        }
        match base64::engine::general_purpose::STANDARD.decode(&self.public_key) {
            Ok(der) => format!("sha256:{}", crate::util::sha256_hex(&der)),
            Err(_) => String::new(),
        }
    }

    /// The view callers get: everything but the raw public key.
    pub fn view(&self) -> Value {
        let mut v = json!({
            "request_id": self.id,
            "state": self.state,
            "requester": self.requester,
            "spiffe_id": self.spiffe_id,
            "dns_names": self.dns_names,
            "ttl_seconds": self.ttl_seconds,
            "justification": self.justification,
            "ticket": self.ticket,
            "emergency": self.emergency,
            "post_review": self.post_review,
            "binding": self.binding,
            "key_fingerprint": self.key_fingerprint(),
            "required_approvals": self.rule.required_approvals,
            "approver_groups": self.rule.approver_groups,
            "approvals": self.votes,
            "created_at": self.created_at,
            "expires_at": crate::util::rfc3339_unix(self.expires_at),
            "decided_at": self.decided_at,
        });
        if let (Some(obj), Some(g)) = (v.as_object_mut(), &self.agent) {
            obj.insert(
                "agent".into(),
                json!({
                    "agent_id": g.agent_id, "scopes": g.scopes, "audience": g.audience,
                    "delegation_chain": g.chain, "task": g.task,
                }),
            );
        }
        if let (Some(obj), Some(a)) = (v.as_object_mut(), &self.attestation) {
            obj.insert("attestation".into(), serde_json::to_value(a).unwrap_or_default());
        }
        if let Some(cert) = &self.issued
            && let (Some(obj), Ok(Value::Object(c))) = (v.as_object_mut(), serde_json::to_value(cert))
        {
            obj.extend(c);
        }
        v
    }
}

/// The private X.509 extension carrying approval evidence. Until Castellan has
/// its own enterprise number this sits under the documentation arc of RFC 5612
/// (1.3.6.1.4.1.32473); relying parties match it by this constant.
pub const APPROVAL_EXTENSION_OID: &[u64] = &[1, 3, 6, 1, 4, 1, 32473, 6420, 1];

/// DER of the extension value: a UTF8String holding
/// `{"request_id", "binding", "approvers": [..]}` as JSON.
pub fn approval_extension(req: &Request) -> Vec<u8> {
    let text = json!({
        "request_id": req.id,
        "binding": req.binding,
        "approvers": req.approvers(),
        "emergency": req.emergency,
    })
    .to_string();
    let mut der = vec![0x0c];
    let len = text.len();
    if len < 0x80 {
        der.push(len as u8);
    } else {
        let bytes: Vec<u8> = len.to_be_bytes().into_iter().skip_while(|b| *b == 0).collect();
        der.push(0x80 | bytes.len() as u8);
        der.extend(bytes);
    }
    der.extend(text.as_bytes());
    der
}

#[cfg(test)]
mod tests;
