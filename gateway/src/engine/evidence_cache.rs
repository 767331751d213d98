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

/// What one lookup is made under.
pub(super) struct Under<'a> {
    pub method: &'a str,
    pub evidence: &'a str,
    /// The hash of the key the caller wants certified.
    pub key_sha256: Option<&'a str>,
    pub trust: &'a Arc<Snapshot>,
    pub module: &'a Arc<Module>,
    pub now: i64,
}

struct Entry {
    attestation: Attestation,
    until: i64,
    /// Set when the token is bound to this key.
    bound_to: Option<String>,
}

#[derive(Default)]
struct State {
    trust: Option<Arc<Snapshot>>,
    modules: HashMap<String, Arc<Module>>,
    entries: HashMap<[u8; 32], Entry>,
}

/// The cache; `capacity` 0 turns it off.
pub(super) struct EvidenceCache {
    capacity: usize,
    state: Mutex<State>,
}

fn key_of(method: &str, evidence: &str) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(method.as_bytes());
    h.update([0]);
    h.update(evidence.as_bytes());
    h.finalize().into()
}

impl EvidenceCache {
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
    fn align(state: &mut State, u: &Under<'_>) {
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
    pub(super) fn get(&self, u: &Under<'_>) -> Option<Attestation> {
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
    pub(super) fn put(&self, u: &Under<'_>, attestation: &Attestation) {
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
