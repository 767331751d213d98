//! Trust sources: the issuers and keys that attestor modules verify evidence
//! against. This module owns the registry that serves them (one immutable
//! snapshot per request, swapped on change) and keeps URL-fetched JWKS
//! fresh; `spec` validates sources as declared, `keys` and `certs` hold the
//! key and certificate sets and the host side of the `verify-jws` and X.509
//! capabilities. It never decides who gets an identity.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde_json::Value;

pub use self::keys::{KeySet, fetch_jwks};
pub use self::spec::{MAX_ENROLLED_EKS, TrustSourceSpec, check_settings};
pub use crate::model::{PreviousKeys, TrustSource};

pub mod certs;
mod keys;
mod spec;

/// Why a trust source was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum TrustError {
    /// A required field is empty or missing.
    #[error("`{0}` is required")]
    Missing(&'static str),
    /// The method has no attestor that uses trust sources of this kind.
    #[error("method `{0}` is not supported for trust sources")]
    UnknownMethod(String),
    /// The JWKS is unusable; the text says which key and why.
    #[error("jwks: {0}")]
    Jwks(String),
    /// The name cannot be part of a SPIFFE ID.
    #[error(
        "name `{0}` must be 1-64 letters, digits, `-`, `_` or `.`: it prefixes the identities the source proves"
    )]
    Name(String),
    /// Another trust source already has this name.
    #[error("a trust source named `{0}` already exists")]
    Duplicate(String),
    /// `jwks_file` could not be read.
    #[error("jwks_file {path}: {message}")]
    JwksFile { path: String, message: String },
    /// The certificates are unusable.
    #[error("certificates: {0}")]
    Certificates(String),
    /// The settings are unusable.
    #[error("settings: {0}")]
    Settings(String),
}

/// What attestors see of the trust sources at one instant.
#[derive(Default)]
pub struct Snapshot {
    /// Sources by method, in creation order.
    pub by_method: HashMap<String, Vec<Arc<TrustSource>>>,
    /// Key sets by name (`ts:<id>`), as the `verify-jws` capability names them.
    pub key_sets: HashMap<String, Arc<KeySet>>,
    /// Certificate sets by the same names, for the X.509 capabilities.
    pub cert_sets: HashMap<String, Arc<certs::CertSet>>,
}

impl Snapshot {
    /// The JSON `config` an attestor module receives for `method`.
    pub fn module_config(&self, method: &str) -> Value {
        let sources: Vec<Value> = self
            .by_method
            .get(method)
            .map(|v| {
                v.iter()
                    .map(|s| {
                        let mut c = serde_json::json!({
                            "name": s.name,
                            "issuer": s.issuer,
                            "audiences": s.audiences,
                            "key_set": key_set_name(&s.id),
                        });
                        if s.certificates.is_some() {
                            c["cert_set"] = key_set_name(&s.id).into();
                        }
                        if let Some(settings) = &s.settings {
                            c["settings"] = settings.clone();
                        }
                        c
                    })
                    .collect()
            })
            .unwrap_or_default();
        serde_json::json!({ "trust_sources": sources })
    }

    /// Whether any trust source serves `method`.
    pub fn has_method(&self, method: &str) -> bool {
        self.by_method.get(method).is_some_and(|v| !v.is_empty())
    }
}

fn key_set_name(id: &str) -> String {
    format!("ts:{id}")
}

/// All trust sources, swapped atomically as a whole when one changes.
pub struct Registry {
    sources: ArcSwap<Vec<Arc<TrustSource>>>,
    snapshot: ArcSwap<Snapshot>,
    /// When the snapshot must be rebuilt because a rotation overlap ends.
    rebuild_at: std::sync::atomic::AtomicI64,
    /// Serialises writers so two concurrent changes cannot lose one another;
    /// readers never take it.
    writes: std::sync::Mutex<()>,
}

impl Registry {
    /// Builds a registry; every source's JWKS must parse.
    pub fn new(sources: Vec<TrustSource>) -> Result<Self, TrustError> {
        let sources: Vec<Arc<TrustSource>> = sources.into_iter().map(Arc::new).collect();
        let (snapshot, rebuild_at) = build_snapshot(&sources)?;
        Ok(Self {
            sources: ArcSwap::from_pointee(sources),
            snapshot: ArcSwap::from_pointee(snapshot),
            rebuild_at: std::sync::atomic::AtomicI64::new(rebuild_at),
            writes: std::sync::Mutex::new(()),
        })
    }

    /// The current snapshot; cheap, lock-free (rebuilt once when a
    /// rotation's overlap has ended).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        if crate::util::now_unix() >= self.rebuild_at.load(std::sync::atomic::Ordering::Relaxed) {
            let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = self.replace(self.list()) {
                tracing::error!(error = %e, "trust sources could not be rebuilt");
            }
        }
        self.snapshot.load_full()
    }

    /// Changes one source with `change` (which may refuse); returns the
    /// changed source. Callers persist it after.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut TrustSource) -> Result<(), TrustError>,
    ) -> Result<Option<TrustSource>, TrustError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.list();
        let Some(slot) = next.iter_mut().find(|s| s.id == id) else {
            return Ok(None);
        };
        let mut changed = slot.as_ref().clone();
        change(&mut changed)?;
        *slot = Arc::new(changed.clone());
        self.replace(next)?;
        Ok(Some(changed))
    }

    /// Every trust source, in creation order.
    pub fn list(&self) -> Vec<Arc<TrustSource>> {
        self.sources.load().as_ref().clone()
    }

    /// Finds a source by id.
    pub fn get(&self, id: &str) -> Option<Arc<TrustSource>> {
        self.sources.load().iter().find(|s| s.id == id).cloned()
    }

    /// Checks that `source` could be added (unique name, usable keys).
    pub fn check_insert(&self, source: &TrustSource) -> Result<(), TrustError> {
        if self
            .sources
            .load()
            .iter()
            .any(|s| s.name == source.name && s.id != source.id)
        {
            return Err(TrustError::Duplicate(source.name.clone()));
        }
        if let Some(pem) = &source.certificates {
            certs::CertSet::from_pem(pem).map_err(TrustError::Certificates)?;
        }
        if source.has_jwks() {
            KeySet::from_jwks(&source.jwks)?;
        }
        Ok(())
    }

    /// Adds a source. Callers persist it first, then insert; if the store
    /// already told this gateway of it (another gateway's change feed can
    /// be that quick), it is replaced, not added twice.
    pub fn insert(&self, source: TrustSource) -> Result<(), TrustError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        self.check_insert(&source)?;
        let mut next: Vec<_> = self.list().into_iter().filter(|s| s.id != source.id).collect();
        next.push(Arc::new(source));
        self.replace(next)
    }

    /// Replaces the sources kept in the store (origin `api`) with
    /// `stored`, as another gateway left them; the others (configuration,
    /// built in) stay. A source fetching its keys from a `jwks_url` keeps
    /// the keys this gateway fetched, while the URL is unchanged.
    pub fn replace_stored(&self, stored: Vec<TrustSource>) -> Result<(), TrustError> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.list();
        let mut next: Vec<Arc<TrustSource>> = current.iter().filter(|s| s.origin != "api").cloned().collect();
        for mut source in stored {
            if let Some(mine) = current.iter().find(|c| c.id == source.id)
                && source.jwks_url.is_some()
                && mine.jwks_url == source.jwks_url
                && mine.has_jwks()
            {
                source.jwks = mine.jwks.clone();
            }
            next.push(Arc::new(source));
        }
        self.replace(next)
    }

    /// Removes a source by id; returns it if it was there.
    pub fn remove(&self, id: &str) -> Option<Arc<TrustSource>> {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.list();
        let removed = current.iter().find(|s| s.id == id).cloned()?;
        let next: Vec<_> = current.into_iter().filter(|s| s.id != id).collect();
        // Removing cannot make a snapshot invalid.
        let _ = self.replace(next);
        Some(removed)
    }

    fn replace(&self, next: Vec<Arc<TrustSource>>) -> Result<(), TrustError> {
        let (snapshot, rebuild_at) = build_snapshot(&next)?;
        self.sources.store(Arc::new(next));
        self.snapshot.store(Arc::new(snapshot));
        self.rebuild_at
            .store(rebuild_at, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// The snapshot of `sources` now, and when it must be rebuilt (the end of
/// the earliest rotation overlap still running).
fn build_snapshot(sources: &[Arc<TrustSource>]) -> Result<(Snapshot, i64), TrustError> {
    let now = crate::util::now_unix();
    let mut rebuild_at = i64::MAX;
    let mut snap = Snapshot::default();
    for s in sources {
        // A revoked source verifies nothing; modules do not see it.
        if s.revoked_at.is_some() {
            continue;
        }
        let previous = s.previous.as_ref().filter(|p| p.until > now);
        if let Some(p) = previous {
            rebuild_at = rebuild_at.min(p.until);
        }
        let mut jwks = s.jwks.clone();
        if let (Some(p), Some(keys)) = (previous, jwks.get_mut("keys").and_then(Value::as_array_mut)) {
            // Old keys stay during the overlap, unless a new key took the kid.
            for old in p.jwks.get("keys").and_then(Value::as_array).into_iter().flatten() {
                if !keys.iter().any(|k| k.get("kid") == old.get("kid")) {
                    keys.push(old.clone());
                }
            }
        }
        if jwks.get("keys").is_some() {
            let keys = KeySet::from_jwks(&jwks)?;
            snap.key_sets.insert(key_set_name(&s.id), Arc::new(keys));
        }
        if let Some(pem) = &s.certificates {
            let mut set = certs::CertSet::from_pem(pem).map_err(TrustError::Certificates)?;
            if let Some(old) = previous.and_then(|p| p.certificates.as_deref()) {
                set.extend(certs::CertSet::from_pem(old).map_err(TrustError::Certificates)?);
            }
            snap.cert_sets.insert(key_set_name(&s.id), Arc::new(set));
        }
        snap.by_method
            .entry(s.method.clone())
            .or_default()
            .push(s.clone());
    }
    Ok((snap, rebuild_at))
}

/// Keeps the JWKS of every source with a `jwks_url` fresh. A failed fetch
/// keeps the keys in use.
pub async fn refresh_jwks_urls(registry: Arc<Registry>) {
    let mut due: HashMap<String, i64> = HashMap::new();
    loop {
        let now = crate::util::now_unix();
        for s in registry.list() {
            let (Some(url), None) = (&s.jwks_url, &s.revoked_at) else {
                continue;
            };
            let period = s.jwks_refresh_seconds.unwrap_or(300) as i64;
            let next = *due
                .entry(s.id.clone())
                .or_insert(if s.has_jwks() { now + period } else { now });
            if now < next {
                continue;
            }
            due.insert(s.id.clone(), now + period);
            match fetch_jwks(url).await {
                Ok(jwks) if jwks != s.jwks => {
                    let result = registry.update(&s.id, |t| {
                        t.jwks = jwks;
                        Ok(())
                    });
                    match result {
                        Ok(_) => tracing::info!(source = %s.name, "trust source JWKS refreshed from its URL"),
                        Err(e) => tracing::warn!(source = %s.name, error = %e, "refreshed JWKS refused"),
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(source = %s.name, error = %e, "JWKS refresh failed; keeping the keys in use")
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests;
