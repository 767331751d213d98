//! Verified evidence, remembered where that is safe. A projected
//! service-account token is presented many times during its life; verifying
//! it again each time (a sandbox call and a signature check) proves nothing
//! new. So the attestation of the same token is reused until the token's
//! expiry, keyed by a hash of the whole token, and:
//!
//! - only for methods listed in [`CACHED_METHODS`]: bearer tokens whose
//!   module reports their expiry (`expires_at`) and key binding
//!   (`key_bound`), and the Workload API's host evidence (for a minute);
//!   never for single-use evidence or evidence that answers a challenge;
//! - a token bound to a key (its audience names the key's hash) is reused
//!   only for that same key;
//! - everything is dropped when the trust sources change (a rotation, a
//!   revocation, the end of a rotation's overlap) or the method's module
//!   does (a new bundle): each entry holds the snapshots it was verified
//!   with, and a lookup under others misses and empties the cache.
//!
//! Refused evidence is never remembered: it is verified again each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::attest::Module;
use crate::model::Attestation;
use crate::trust::Snapshot;

/// Methods whose attestations may be reused: bearer tokens that report
/// their expiry, and `unix`, whose evidence the host gathers from the kernel
/// for every call (the same evidence, byte for byte, is the same process
/// with the same attributes).
pub const CACHED_METHODS: &[&str] = &["k8s_sat", "unix"];

/// How long an attestation is reused at most, whatever the token says.
const MAX_REUSE_SECONDS: i64 = 3600;

/// How long an attestation of host evidence is reused.
const HOST_REUSE_SECONDS: i64 = 60;

/// What one lookup is made under. `M` is the attestor module (a stand-in
/// in unit tests).
pub(super) struct Under<'a, M = Module> {
    pub method: &'a str,
    pub evidence: &'a str,
    /// The hash of the key the caller wants certified.
    pub key_sha256: Option<&'a str>,
    pub trust: &'a Arc<Snapshot>,
    pub module: &'a Arc<M>,
    pub now: i64,
}

struct Entry {
    attestation: Attestation,
    until: i64,
    /// Set when the token is bound to this key.
    bound_to: Option<String>,
}

struct State<M> {
    trust: Option<Arc<Snapshot>>,
    modules: HashMap<String, Arc<M>>,
    entries: HashMap<[u8; 32], Entry>,
}

impl<M> Default for State<M> {
    fn default() -> Self {
        Self {
            trust: None,
            modules: HashMap::new(),
            entries: HashMap::new(),
        }
    }
}

/// The cache; `capacity` 0 turns it off.
pub(super) struct EvidenceCache<M = Module> {
    capacity: usize,
    state: Mutex<State<M>>,
}

fn key_of(method: &str, evidence: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(evidence.as_bytes());
    h.finalize().into()
}

impl<M> EvidenceCache<M> {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether evidence for `method` may be looked up at all.
    pub(super) fn applies(&self, method: &str) -> bool {
        self.capacity > 0 && CACHED_METHODS.contains(&method)
    }

    /// Forgets everything verified under other snapshots than `u`'s.
    fn align(state: &mut State<M>, u: &Under<'_, M>) {
        let same_trust = state.trust.as_ref().is_some_and(|t| Arc::ptr_eq(t, u.trust));
        let same_module = state
            .modules
            .get(u.method)
            .is_none_or(|m| Arc::ptr_eq(m, u.module));
        if !same_trust || !same_module {
            state.entries.clear();
            state.modules.clear();
            state.trust = Some(u.trust.clone());
        }
        state
            .modules
            .entry(u.method.to_owned())
            .or_insert_with(|| u.module.clone());
    }

    /// The attestation remembered for this evidence, if still good.
    pub(super) fn get(&self, u: &Under<'_, M>) -> Option<Attestation> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::align(&mut state, u);
        let key = key_of(u.method, u.evidence);
        let entry = state.entries.get(&key)?;
        let key_ok = entry.bound_to.as_deref().is_none_or(|k| Some(k) == u.key_sha256);
        if u.now >= entry.until || !key_ok {
            return None;
        }
        Some(entry.attestation.clone())
    }

    /// Whether this evidence is remembered (whatever key it is presented
    /// with, and without checking the snapshots): a hint that attesting it
    /// will be cheap, never a verdict.
    pub(super) fn probably_has(&self, method: &str, evidence: &str, now: i64) -> bool {
        if !self.applies(method) {
            return false;
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state
            .entries
            .get(&key_of(method, evidence))
            .is_some_and(|e| now < e.until)
    }

    /// Remembers a fresh attestation, if it can be reused safely.
    pub(super) fn put(&self, u: &Under<'_, M>, attestation: &Attestation) {
        if attestation.single_use.is_some() {
            return;
        }
        let (until, bound_to) = if crate::attest::HOST_EVIDENCE_METHODS.contains(&u.method) {
            (u.now + HOST_REUSE_SECONDS, None)
        } else {
            let until = match attestation.claims.get("expires_at").and_then(|v| v.as_i64()) {
                Some(exp) => exp.min(u.now + MAX_REUSE_SECONDS),
                None => return,
            };
            let bound_to = match attestation.claims.get("key_bound").and_then(|v| v.as_bool()) {
                Some(true) => match u.key_sha256 {
                    Some(k) => Some(k.to_owned()),
                    None => return,
                },
                Some(false) => None,
                // A module that does not say whether the token binds a key.
                None => return,
            };
            (until, bound_to)
        };
        if until <= u.now {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        Self::align(&mut state, u);
        if state.entries.len() >= self.capacity {
            state.entries.retain(|_, e| e.until > u.now);
            if state.entries.len() >= self.capacity {
                state.entries.clear();
            }
        }
        state.entries.insert(
            key_of(u.method, u.evidence),
            Entry {
                attestation: attestation.clone(),
                until,
                bound_to,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attestation(claims: serde_json::Value) -> Attestation {
        Attestation {
            method: "k8s_sat".into(),
            subject: "ns/a/sa/b".into(),
            selectors: vec!["k8s:ns:a".into()],
            claims,
            single_use: None,
        }
    }

    struct World {
        trust: Arc<Snapshot>,
        module: Arc<()>,
    }

    impl World {
        fn new() -> Self {
            Self {
                trust: Arc::new(Snapshot::default()),
                module: Arc::new(()),
            }
        }

        fn under<'a>(&'a self, evidence: &'a str, key: Option<&'a str>, now: i64) -> Under<'a, ()> {
            Under {
                method: "k8s_sat",
                evidence,
                key_sha256: key,
                trust: &self.trust,
                module: &self.module,
                now,
            }
        }
    }

    #[test]
    fn a_token_is_reused_until_it_expires_and_only_as_presented() {
        let c = EvidenceCache::<()>::new(16);
        let w = World::new();
        c.put(
            &w.under("tok", None, 100),
            &attestation(json!({"expires_at": 200, "key_bound": false})),
        );
        assert!(c.get(&w.under("tok", Some("any-key"), 150)).is_some());
        assert!(c.get(&w.under("tok", None, 200)).is_none(), "expired");
        assert!(c.get(&w.under("tok2", None, 150)).is_none(), "another token");
    }

    #[test]
    fn a_key_bound_token_is_reused_only_for_its_key() {
        let c = EvidenceCache::<()>::new(16);
        let w = World::new();
        c.put(
            &w.under("tok", Some("k1"), 100),
            &attestation(json!({"expires_at": 200, "key_bound": true})),
        );
        assert!(c.get(&w.under("tok", Some("k1"), 150)).is_some());
        assert!(c.get(&w.under("tok", Some("k2"), 150)).is_none());
        assert!(c.get(&w.under("tok", None, 150)).is_none());
    }

    #[test]
    fn what_cannot_be_reused_safely_is_not_remembered() {
        let c = EvidenceCache::<()>::new(16);
        let w = World::new();
        let no_expiry = attestation(json!({"key_bound": false}));
        let silent_on_binding = attestation(json!({"expires_at": 200}));
        let mut single_use = attestation(json!({"expires_at": 200, "key_bound": false}));
        single_use.single_use = Some(crate::model::SingleUse {
            id: "x".into(),
            until: 200,
        });
        for (ev, a) in [("a", no_expiry), ("b", silent_on_binding), ("c", single_use)] {
            c.put(&w.under(ev, None, 100), &a);
            assert!(c.get(&w.under(ev, None, 150)).is_none(), "{ev}");
        }
        assert!(
            !EvidenceCache::<()>::new(0).applies("k8s_sat"),
            "capacity 0 turns it off"
        );
        assert!(!c.applies("join_token"));
    }

    #[test]
    fn new_trust_sources_or_a_new_module_forget_everything() {
        let c = EvidenceCache::<()>::new(16);
        let w = World::new();
        let a = attestation(json!({"expires_at": 200, "key_bound": false}));
        c.put(&w.under("tok", None, 100), &a);
        let rotated = World {
            trust: Arc::new(Snapshot::default()),
            module: w.module.clone(),
        };
        assert!(c.get(&rotated.under("tok", None, 150)).is_none());
        assert!(
            c.get(&w.under("tok", None, 150)).is_none(),
            "forgotten, not set aside"
        );
        c.put(&w.under("tok", None, 100), &a);
        let rebundled = World {
            trust: w.trust.clone(),
            module: Arc::new(()),
        };
        assert!(c.get(&rebundled.under("tok", None, 150)).is_none());
    }
}
