//! The rules every backend keeps alike, written once over [`Txn`]: audit
//! chaining, the webhook outbox, the pending index, single-use marks and
//! the revocation cascade.

use std::collections::BTreeSet;

use super::{AuditEvent, AuditRecord, Effects, Notification, OutboxItem, StoreError, Txn};
use crate::model::{AgentToken, Request, Revocation, RevocationFilter, State, genesis_hash};
use crate::util::rfc3339;

/// Appends `event` after the chain's head: its `prev_hash` is the head's
/// hash, its own hash covers it, so removing, changing or reordering any
/// entry breaks every hash after it.
pub(super) fn append_audit(t: &mut dyn Txn, event: AuditEvent) -> Result<AuditRecord, StoreError> {
    let (seq, prev_hash) = match t.audit_head()? {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, genesis_hash()),
    };
    let mut record = AuditRecord {
        seq,
        at: rfc3339(time::OffsetDateTime::now_utc()),
        event,
        prev_hash,
        hash: String::new(),
    };
    record.hash = record.compute_hash();
    t.put_audit(&record)?;
    Ok(record)
}

/// Queues a notification for the webhooks, in the transaction of the change
/// that caused it, so a change is never notified without having happened
/// nor happens without being notified.
pub(super) fn queue_notification(t: &mut dyn Txn, notification: Notification) -> Result<u64, StoreError> {
    let seq = t.last_outbox_seq()? + 1;
    let item = OutboxItem {
        seq,
        id: uuid::Uuid::new_v4().to_string(),
        notification,
        created_at: rfc3339(time::OffsetDateTime::now_utc()),
        done: Vec::new(),
        attempts: Default::default(),
        next_attempt_at: 0,
    };
    t.put_outbox(&item)?;
    Ok(seq)
}

/// Writes what a change brings with it: certificates, agent tokens, audit
/// events and notifications.
pub(super) fn apply_effects(t: &mut dyn Txn, effects: Effects) -> Result<(), StoreError> {
    for cert in &effects.certificates {
        let seq = t.last_certificate_seq()? + 1;
        t.put_certificate(seq, cert)?;
    }
    for token in &effects.agent_tokens {
        t.put_agent_token(token)?;
    }
    for event in effects.audit {
        append_audit(t, event)?;
    }
    for notification in effects.notify {
        queue_notification(t, notification)?;
    }
    Ok(())
}

/// Stores a request and keeps the pending index in step with its state.
pub(super) fn put_request(t: &mut dyn Txn, request: &Request) -> Result<(), StoreError> {
    t.put_request(request, matches!(request.state, State::Pending | State::Approved))?;
    t.changed(&format!("{}:{}", super::topic::REQUESTS, request.id))
}

/// The longest lineage walked; deeper is a corrupted store.
const MAX_LINEAGE: usize = 64;

/// The first revoked token from `parent_jti` up its delegation lineage, if
/// any. A parent the registry does not know counts as revoked.
pub(super) fn lineage_revoked(
    t: &mut dyn Txn,
    parent_jti: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let mut next = parent_jti.map(str::to_owned);
    let mut steps = 0;
    while let Some(jti) = next {
        steps += 1;
        match t.agent_token(&jti)? {
            Some(token) if token.revoked_at.is_none() && steps <= MAX_LINEAGE => next = token.parent_jti,
            _ => return Ok(Some(jti)),
        }
    }
    Ok(None)
}

/// Cancels open agent requests a revocation touches: those for the revoked
/// agent or task, and those delegating from a revoked token (directly or
/// up the lineage). Returns their ids.
pub(super) fn cancel_revoked_requests(
    t: &mut dyn Txn,
    filter: &RevocationFilter,
) -> Result<Vec<String>, StoreError> {
    let mut cancelled = Vec::new();
    for id in t.open_request_ids()? {
        let Some(mut request) = t.request(&id)? else {
            continue;
        };
        let Some(grant) = &request.agent else {
            continue;
        };
        let named = filter.agent_id.as_ref().is_some_and(|a| *a == grant.agent_id)
            || filter
                .task_id
                .as_ref()
                .is_some_and(|task| grant.task.as_ref().is_some_and(|g| g.id == *task));
        let parent = grant.parent_jti.clone();
        if !named && lineage_revoked(t, parent.as_deref())?.is_none() {
            continue;
        }
        request.state = State::Cancelled;
        request.decided_at = Some(rfc3339(time::OffsetDateTime::now_utc()));
        put_request(t, &request)?;
        cancelled.push(id);
    }
    Ok(cancelled)
}

/// Spends single-use evidence: true the first time, false while an earlier
/// spend still matters at `now`.
pub(super) fn spend(t: &mut dyn Txn, key: &str, until: i64, now: i64) -> Result<bool, StoreError> {
    let live = t.spent_until(key)?.is_some_and(|u| u >= now);
    if !live {
        t.put_spent(key, until)?;
    }
    Ok(!live)
}

/// Marks live tokens matching `filter` revoked and, transitively, every
/// live token whose parent was revoked. Returns feed entries for those not
/// yet expired (relying parties reject expired ones anyway).
pub(super) fn revoke_cascade(
    t: &mut dyn Txn,
    filter: &RevocationFilter,
    now: i64,
) -> Result<Vec<Revocation>, StoreError> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut to_revoke: Vec<AgentToken> = Vec::new();
    let mut frontier: Vec<AgentToken> = t
        .agent_tokens_matching(filter)?
        .into_iter()
        .filter(|tok| filter.matches(tok))
        .collect();
    // Breadth first down the delegation tree; `seen` guards against a cycle
    // a corrupted store could hold.
    while let Some(token) = frontier.pop() {
        if !seen.insert(token.jti.clone()) {
            continue;
        }
        frontier.extend(t.agent_token_children(&token.jti)?);
        if token.revoked_at.is_none() {
            to_revoke.push(token);
        }
    }
    let at = rfc3339(time::OffsetDateTime::now_utc());
    let mut seq = t.last_revocation_seq()?;
    let mut out = Vec::new();
    to_revoke.sort_by(|a, b| a.iat.cmp(&b.iat).then_with(|| a.jti.cmp(&b.jti)));
    for mut token in to_revoke {
        token.revoked_at = Some(at.clone());
        t.put_agent_token(&token)?;
        if token.exp <= now {
            continue;
        }
        seq += 1;
        let revocation = Revocation {
            seq,
            jti: token.jti.clone(),
            agent_id: token.agent_id.clone(),
            exp: token.exp,
            revoked_at: at.clone(),
        };
        t.put_revocation(&revocation)?;
        out.push(revocation);
    }
    Ok(out)
}
