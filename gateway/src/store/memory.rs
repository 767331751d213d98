//! An in-memory backend for tests: the same contract as redb, nothing on
//! disk. A unit of work runs on a copy of the data that replaces the
//! original only if the work succeeds, so a failed transaction writes
//! nothing, as in a database.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    AuditRecord, Backend, CertificateRecord, ChallengeRecord, IdempotentResponse, OutboxItem, Page,
    StoreError, StoredBundle, Txn, Work,
};
use crate::model::{AgentToken, Entry, Request, Revocation, RevocationFilter, TokenRecord, TrustSource};

/// Everything the backend holds.
#[derive(Clone, Default)]
struct Data {
    certificates: BTreeMap<u64, CertificateRecord>,
    audit: BTreeMap<u64, AuditRecord>,
    trust_sources: BTreeMap<String, TrustSource>,
    tokens: BTreeMap<String, TokenRecord>,
    requests: BTreeMap<String, Request>,
    pending: BTreeSet<String>,
    outbox: BTreeMap<u64, OutboxItem>,
    idempotent: BTreeMap<String, IdempotentResponse>,
    agent_tokens: BTreeMap<String, AgentToken>,
    revocations: BTreeMap<u64, Revocation>,
    entries: BTreeMap<String, Entry>,
    spent: BTreeMap<String, i64>,
    challenges: BTreeMap<String, ChallengeRecord>,
    bundles: BTreeMap<String, StoredBundle>,
}

/// In-memory [`Backend`].
#[derive(Default)]
pub struct MemoryBackend {
    data: Mutex<Data>,
}

impl MemoryBackend {
    fn with<T>(&self, f: impl FnOnce(&Data) -> T) -> T {
        f(&self.data.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

fn page<T: Clone>(map: &BTreeMap<u64, T>, limit: usize, after: u64) -> Page<T> {
    let mut rows = map.range(after.saturating_add(1)..);
    let items: Vec<(u64, T)> = rows.by_ref().take(limit).map(|(k, v)| (*k, v.clone())).collect();
    let more = rows.next().is_some();
    Page {
        next_cursor: if more {
            items.last().map(|(k, _)| k.to_string())
        } else {
            None
        },
        items: items.into_iter().map(|(_, v)| v).collect(),
    }
}

fn last<T>(map: &BTreeMap<u64, T>) -> u64 {
    map.keys().next_back().copied().unwrap_or(0)
}

impl Txn for Data {
    fn last_certificate_seq(&mut self) -> Result<u64, StoreError> {
        Ok(last(&self.certificates))
    }

    fn put_certificate(&mut self, seq: u64, cert: &CertificateRecord) -> Result<(), StoreError> {
        self.certificates.insert(seq, cert.clone());
        Ok(())
    }

    fn audit_head(&mut self) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.audit.values().next_back().map(|r| (r.seq, r.hash.clone())))
    }

    fn put_audit(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        self.audit.insert(record.seq, record.clone());
        Ok(())
    }

    fn put_trust_source(&mut self, source: &TrustSource) -> Result<(), StoreError> {
        self.trust_sources.insert(source.id.clone(), source.clone());
        Ok(())
    }

    fn delete_trust_source(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.trust_sources.remove(id).is_some())
    }

    fn put_token(&mut self, record: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(record.token_sha256.clone(), record.clone());
        Ok(())
    }

    fn request(&mut self, id: &str) -> Result<Option<Request>, StoreError> {
        Ok(self.requests.get(id).cloned())
    }

    fn put_request(&mut self, request: &Request, open: bool) -> Result<(), StoreError> {
        self.requests.insert(request.id.clone(), request.clone());
        if open {
            self.pending.insert(request.id.clone());
        } else {
            self.pending.remove(&request.id);
        }
        Ok(())
    }

    fn open_request_ids(&mut self) -> Result<Vec<String>, StoreError> {
        Ok(self.pending.iter().cloned().collect())
    }

    fn last_outbox_seq(&mut self) -> Result<u64, StoreError> {
        Ok(last(&self.outbox))
    }

    fn put_outbox(&mut self, item: &OutboxItem) -> Result<(), StoreError> {
        self.outbox.insert(item.seq, item.clone());
        Ok(())
    }

    fn delete_outbox(&mut self, seq: u64) -> Result<(), StoreError> {
        self.outbox.remove(&seq);
        Ok(())
    }

    fn put_idempotent(&mut self, key: &str, response: &IdempotentResponse) -> Result<(), StoreError> {
        self.idempotent.insert(key.to_owned(), response.clone());
        Ok(())
    }

    fn purge_idempotent(&mut self, before: i64) -> Result<(), StoreError> {
        self.idempotent.retain(|_, r| r.created_at >= before);
        Ok(())
    }

    fn agent_token(&mut self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        Ok(self.agent_tokens.get(jti).cloned())
    }

    fn put_agent_token(&mut self, token: &AgentToken) -> Result<(), StoreError> {
        self.agent_tokens.insert(token.jti.clone(), token.clone());
        Ok(())
    }

    fn agent_tokens_matching(&mut self, filter: &RevocationFilter) -> Result<Vec<AgentToken>, StoreError> {
        Ok(self
            .agent_tokens
            .values()
            .filter(|t| filter.matches(t))
            .cloned()
            .collect())
    }

    fn agent_tokens_all(&mut self) -> Result<Vec<AgentToken>, StoreError> {
        Ok(self.agent_tokens.values().cloned().collect())
    }

    fn agent_token_children(&mut self, parent_jti: &str) -> Result<Vec<AgentToken>, StoreError> {
        Ok(self
            .agent_tokens
            .values()
            .filter(|t| t.parent_jti.as_deref() == Some(parent_jti))
            .cloned()
            .collect())
    }

    fn last_revocation_seq(&mut self) -> Result<u64, StoreError> {
        Ok(last(&self.revocations))
    }

    fn put_revocation(&mut self, revocation: &Revocation) -> Result<(), StoreError> {
        self.revocations.insert(revocation.seq, revocation.clone());
        Ok(())
    }

    fn put_entry(&mut self, entry: &Entry) -> Result<(), StoreError> {
        self.entries.insert(entry.id.clone(), entry.clone());
        Ok(())
    }

    fn delete_entry(&mut self, id: &str) -> Result<bool, StoreError> {
        Ok(self.entries.remove(id).is_some())
    }

    fn spent_until(&mut self, key: &str) -> Result<Option<i64>, StoreError> {
        Ok(self.spent.get(key).copied())
    }

    fn put_spent(&mut self, key: &str, until: i64) -> Result<(), StoreError> {
        self.spent.insert(key.to_owned(), until);
        Ok(())
    }

    fn purge_spent(&mut self, now: i64) -> Result<(), StoreError> {
        self.spent.retain(|_, until| *until >= now);
        Ok(())
    }

    fn purge_agent_tokens(&mut self, before: i64) -> Result<(), StoreError> {
        self.agent_tokens.retain(|_, t| t.exp >= before);
        Ok(())
    }

    fn purge_requests(&mut self, before: i64) -> Result<(), StoreError> {
        self.requests
            .retain(|_, r| !r.state.is_terminal() || r.expires_at >= before);
        Ok(())
    }

    fn purge_revocations(&mut self, before: i64) -> Result<(), StoreError> {
        self.revocations.retain(|_, r| r.exp >= before);
        Ok(())
    }

    fn idempotent(&mut self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        Ok(self.idempotent.get(key).cloned())
    }

    fn delete_idempotent(&mut self, key: &str) -> Result<(), StoreError> {
        self.idempotent.remove(key);
        Ok(())
    }

    fn put_challenge(&mut self, challenge: &ChallengeRecord) -> Result<(), StoreError> {
        self.challenges.insert(challenge.id.clone(), challenge.clone());
        Ok(())
    }

    fn take_challenge(&mut self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        Ok(self.challenges.remove(id))
    }

    fn count_challenges(&mut self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        let live = self.challenges.values().filter(|c| c.expires_at >= now);
        let (mut all, mut mine) = (0, 0);
        for c in live {
            all += 1;
            if client.is_some() && c.client.as_deref() == client {
                mine += 1;
            }
        }
        Ok((all, mine))
    }

    fn purge_challenges(&mut self, now: i64) -> Result<(), StoreError> {
        self.challenges.retain(|_, c| c.expires_at >= now);
        Ok(())
    }

    fn put_bundle(&mut self, bundle: &StoredBundle) -> Result<(), StoreError> {
        self.bundles.insert(bundle.name.clone(), bundle.clone());
        Ok(())
    }

    fn trust_sources(&mut self) -> Result<Vec<TrustSource>, StoreError> {
        Ok(self.trust_sources.values().cloned().collect())
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.tokens.values().cloned().collect())
    }
}

#[async_trait::async_trait]
impl Backend for MemoryBackend {
    async fn write(&self, work: Work) -> Result<(), StoreError> {
        let mut data = self.data.lock().unwrap_or_else(|p| p.into_inner());
        let mut draft = data.clone();
        work(&mut draft)?;
        *data = draft;
        Ok(())
    }

    async fn certificates(&self, limit: usize, after: u64) -> Result<Page<CertificateRecord>, StoreError> {
        Ok(self.with(|d| page(&d.certificates, limit, after)))
    }

    async fn count_certificates(&self) -> Result<u64, StoreError> {
        Ok(self.with(|d| d.certificates.len() as u64))
    }

    async fn audit_records(&self, limit: usize, after: u64) -> Result<Page<AuditRecord>, StoreError> {
        Ok(self.with(|d| page(&d.audit, limit, after)))
    }

    async fn trust_sources(&self) -> Result<Vec<TrustSource>, StoreError> {
        Ok(self.with(|d| d.trust_sources.values().cloned().collect()))
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(self.with(|d| d.tokens.values().cloned().collect()))
    }

    async fn request(&self, id: &str) -> Result<Option<Request>, StoreError> {
        Ok(self.with(|d| d.requests.get(id).cloned()))
    }

    async fn requests(&self, open_only: bool) -> Result<Vec<Request>, StoreError> {
        Ok(self.with(|d| {
            if open_only {
                d.pending
                    .iter()
                    .filter_map(|id| d.requests.get(id).cloned())
                    .collect()
            } else {
                d.requests.values().cloned().collect()
            }
        }))
    }

    async fn outbox(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self.with(|d| d.outbox.values().take(limit).cloned().collect()))
    }

    async fn idempotent(&self, key: &str) -> Result<Option<IdempotentResponse>, StoreError> {
        Ok(self.with(|d| d.idempotent.get(key).cloned()))
    }

    async fn entries(&self) -> Result<Vec<Entry>, StoreError> {
        Ok(self.with(|d| d.entries.values().cloned().collect()))
    }

    async fn agent_token(&self, jti: &str) -> Result<Option<AgentToken>, StoreError> {
        Ok(self.with(|d| d.agent_tokens.get(jti).cloned()))
    }

    async fn revocations(&self, limit: usize, after: u64) -> Result<Page<Revocation>, StoreError> {
        Ok(self.with(|d| page(&d.revocations, limit, after)))
    }

    async fn bundles(&self) -> Result<Vec<StoredBundle>, StoreError> {
        Ok(self.with(|d| d.bundles.values().cloned().collect()))
    }

    async fn challenge(&self, id: &str) -> Result<Option<ChallengeRecord>, StoreError> {
        Ok(self.with(|d| d.challenges.get(id).cloned()))
    }

    async fn challenge_counts(&self, client: Option<&str>, now: i64) -> Result<(u64, u64), StoreError> {
        Ok(self.with(|d| {
            let live: Vec<_> = d.challenges.values().filter(|c| c.expires_at >= now).collect();
            let mine = live
                .iter()
                .filter(|c| client.is_some() && c.client.as_deref() == client)
                .count();
            (live.len() as u64, mine as u64)
        }))
    }
}
