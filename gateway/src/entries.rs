//! Registration entries: which callers (by selectors, all of which must
//! match) get which SPIFFE ID, for how long, and with which federated trust
//! domains' bundles.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch;

pub use crate::model::Entry;
use crate::spiffe_id::{SpiffeId, validate_trust_domain};

/// A new entry as posted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    #[serde(default = "default_x509_ttl")]
    pub x509_svid_ttl: u64,
    #[serde(default = "default_jwt_ttl")]
    pub jwt_svid_ttl: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub federates_with: Vec<String>,
}

fn default_x509_ttl() -> u64 {
    3600
}

fn default_jwt_ttl() -> u64 {
    300
}

impl EntrySpec {
    /// Validates and turns the spec into an entry in `trust_domain`.
    pub fn into_entry(self, trust_domain: &str) -> Result<Entry, String> {
        let id = SpiffeId::parse(&self.spiffe_id).map_err(|e| format!("spiffe_id: {e}"))?;
        if id.trust_domain() != trust_domain || id.path().is_empty() {
            return Err(format!("spiffe_id must be a workload ID in {trust_domain}"));
        }
        if self.selectors.is_empty() {
            return Err("at least one selector is required".into());
        }
        if let Some(s) = self
            .selectors
            .iter()
            .find(|s| s.splitn(3, ':').count() != 3 || s.len() > 1024)
        {
            return Err(format!(
                "selector `{}` is not type:key:value",
                s.chars().take(64).collect::<String>()
            ));
        }
        // Trust domains are stored by name; `spiffe://name` is accepted too.
        let mut federates_with = Vec::new();
        for td in self.federates_with {
            let name = td
                .strip_prefix("spiffe://")
                .unwrap_or(&td)
                .trim_end_matches('/')
                .to_owned();
            validate_trust_domain(&name).map_err(|e| format!("federates_with `{td}`: {e}"))?;
            if name == trust_domain {
                return Err(format!("federates_with `{td}` is this trust domain"));
            }
            if !federates_with.contains(&name) {
                federates_with.push(name);
            }
        }
        // Short lifetimes are allowed: the stream rotates at half-life.
        // As short as SPIRE allows in practice (its test fixtures use 5 s):
        // renewal is at half-life, in whole seconds, so 2 s is the floor.
        if !(2..=86_400).contains(&self.x509_svid_ttl) || !(2..=86_400).contains(&self.jwt_svid_ttl) {
            return Err("x509_svid_ttl and jwt_svid_ttl must be between 2 and 86400 seconds".into());
        }
        Ok(Entry {
            id: uuid::Uuid::new_v4().to_string(),
            spiffe_id: id.to_string(),
            selectors: self.selectors,
            x509_svid_ttl: self.x509_svid_ttl,
            jwt_svid_ttl: self.jwt_svid_ttl,
            dns_names: self.dns_names,
            hint: self.hint,
            federates_with,
            created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        })
    }
}

/// The entries, swapped whole; a watch tells open streams they changed.
pub struct Entries {
    list: ArcSwap<Vec<Arc<Entry>>>,
    version: watch::Sender<u64>,
    writes: std::sync::Mutex<()>,
}

impl Entries {
    pub fn new(entries: Vec<Entry>) -> Self {
        Self {
            list: ArcSwap::from_pointee(entries.into_iter().map(Arc::new).collect()),
            version: watch::channel(0).0,
            writes: std::sync::Mutex::new(()),
        }
    }

    pub fn list(&self) -> Vec<Arc<Entry>> {
        self.list.load().as_ref().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Entry>> {
        self.list.load().iter().find(|e| e.id == id).cloned()
    }

    /// Adds an entry (replacing one with its id: the store's change feed
    /// may have brought it already).
    pub fn insert(&self, entry: Entry) {
        let _g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next: Vec<_> = self.list().into_iter().filter(|e| e.id != entry.id).collect();
        next.push(Arc::new(entry));
        self.list.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    pub fn remove(&self, id: &str) {
        let _g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let next: Vec<_> = self.list().into_iter().filter(|e| e.id != id).collect();
        self.list.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
    }

    /// Replaces every entry with `entries` (as the store holds them after
    /// another gateway's change); open streams hear of it only if something
    /// differs.
    pub fn replace_all(&self, entries: Vec<Entry>) {
        let _g = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.list.load();
        let same = current.len() == entries.len()
            && entries
                .iter()
                .all(|e| current.iter().any(|c| c.id == e.id && **c == *e));
        if same {
            return;
        }
        self.list
            .store(Arc::new(entries.into_iter().map(Arc::new).collect()));
        self.version.send_modify(|v| *v += 1);
    }

    /// Changes whenever an entry is added or removed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Entries whose selectors are all among `selectors`.
    pub(super) fn matching(&self, selectors: &[String]) -> Vec<Arc<Entry>> {
        self.list
            .load()
            .iter()
            .filter(|e| e.selectors.iter().all(|s| selectors.contains(s)))
            .cloned()
            .collect()
    }
}
