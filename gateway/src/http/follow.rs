//! Keeps this gateway's in-memory view in step with a store other gateways
//! write too: API tokens, trust sources, entries, pushed bundles, the
//! revoked-token set and waiters on requests. The store announces what
//! changed (PostgreSQL `LISTEN/NOTIFY`, with the change counters re-read
//! every second in case a notification was lost); each topic is re-read
//! whole. A store only this process writes announces nothing, and this
//! task ends at once.

use std::collections::BTreeSet;
use std::time::Duration;

use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::AppState;
use crate::store::topic;

/// How soon a topic that failed to re-read is tried again.
const RETRY: Duration = Duration::from_secs(1);

pub async fn follow_store(state: AppState) {
    let Some(mut changes) = state.engine.store.changes() else {
        return;
    };
    // What is still to re-read (a failed read is retried). First all of
    // it: what changed between the first reads at start and this
    // subscription was announced to nobody.
    let mut due: BTreeSet<String> = BTreeSet::from([topic::ALL.to_owned()]);
    due = apply(&state, std::mem::take(&mut due)).await;
    loop {
        // With reads to retry, wait at most [`RETRY`] for news.
        let next = if due.is_empty() {
            Some(changes.recv().await)
        } else {
            tokio::time::timeout(RETRY, changes.recv()).await.ok()
        };
        match next {
            None => {}
            Some(Ok(t)) => {
                due.insert(t);
            }
            Some(Err(RecvError::Lagged(_))) => {
                due.insert(topic::ALL.to_owned());
            }
            Some(Err(RecvError::Closed)) => return,
        }
        loop {
            match changes.try_recv() {
                Ok(t) => {
                    due.insert(t);
                }
                Err(TryRecvError::Lagged(_)) => {
                    due.insert(topic::ALL.to_owned());
                }
                Err(_) => break,
            }
        }
        due = apply(&state, std::mem::take(&mut due)).await;
    }
}

/// Re-reads what `topics` name; returns the topics whose read failed.
async fn apply(state: &AppState, topics: BTreeSet<String>) -> BTreeSet<String> {
    let all = topics.contains(topic::ALL);
    let mut failed = BTreeSet::new();
    let engine = &state.engine;
    for family in [
        topic::TOKENS,
        topic::TRUST_SOURCES,
        topic::ENTRIES,
        topic::BUNDLES,
        topic::REVOCATIONS,
        topic::AUTHORITIES,
    ] {
        if !all && !topics.contains(family) {
            continue;
        }
        let result: Result<(), String> = match family {
            topic::TOKENS => engine
                .store
                .tokens()
                .await
                .map(|t| state.auth.load_tokens(t))
                .map_err(|e| e.to_string()),
            topic::TRUST_SOURCES => match engine.store.trust_sources().await {
                Ok(s) => engine.trust.replace_stored(s).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            topic::ENTRIES => engine
                .store
                .entries()
                .await
                .map(|e| engine.entries.replace_all(e))
                .map_err(|e| e.to_string()),
            topic::BUNDLES => super::bundles::activate_stored(state)
                .await
                .map_err(|e| e.to_string()),
            topic::AUTHORITIES => engine.refresh_authorities().await.map_err(|e| e.to_string()),
            _ => engine.reload_revocations().await.map_err(|e| e.to_string()),
        };
        match result {
            Ok(()) => tracing::debug!(topic = family, "re-read after another gateway's change"),
            Err(e) => {
                tracing::warn!(topic = family, error = %e, "could not re-read; retrying");
                failed.insert(family.to_owned());
            }
        }
    }
    if all || topics.contains(topic::REQUESTS) {
        engine.requests_changed();
    } else {
        let prefix = format!("{}:", topic::REQUESTS);
        for t in &topics {
            if let Some(id) = t.strip_prefix(&prefix) {
                engine.request_changed(id);
            }
        }
    }
    failed
}
