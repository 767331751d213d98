//! Replay protection for evidence meant for one use. Modules are stateless
//! (a fresh instance per call), so the host remembers what was used: a
//! token's `jti` or signature, a join token, a TPM nonce. An id is refused
//! a second time until the moment the module said it stops mattering
//! (usually the token's expiry).
//!
//! The memory is in-process: a restart forgets it. Evidence that must stay
//! spent across restarts (join tokens, challenge nonces) is also recorded
//! in the store by the feature that issues it.

use std::collections::HashMap;
use std::sync::Mutex;

/// Marks remembered at once, at most. When full of unexpired marks, new
/// single-use evidence is refused rather than accepted unchecked.
const CAPACITY: usize = 1 << 18;
/// A mark is kept at most this long, whatever the evidence claims.
const MAX_HOLD_SECONDS: i64 = 7 * 86_400;

/// Why a single-use mark was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The evidence was used before.
    #[error("this evidence was already used")]
    Replayed,
    /// Too many marks are live to remember another.
    #[error("too much single-use evidence is in flight; try again later")]
    Full,
}

/// Used evidence ids, per method, with the time each may be forgotten.
#[derive(Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<String, i64>>,
}

impl ReplayCache {
    /// Records the first use of `id` for `method`; a second use before
    /// `until` is refused.
    pub fn first_use(&self, method: &str, id: &str, until: i64, now: i64) -> Result<(), ReplayError> {
        if until < now {
            // Already past its life: the module should have refused it, and
            // there is nothing to remember.
            return Err(ReplayError::Replayed);
        }
        let key = format!("{method}\u{0}{id}");
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.get(&key).is_some_and(|t| *t >= now) {
            return Err(ReplayError::Replayed);
        }
        if seen.len() >= CAPACITY {
            seen.retain(|_, t| *t >= now);
            if seen.len() >= CAPACITY {
                return Err(ReplayError::Full);
            }
        }
        seen.insert(key, until.min(now + MAX_HOLD_SECONDS));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_use_is_refused_until_the_mark_expires() {
        let cache = ReplayCache::default();
        cache.first_use("github_oidc", "jti:1", 100, 10).unwrap();
        assert_eq!(
            cache.first_use("github_oidc", "jti:1", 100, 50),
            Err(ReplayError::Replayed)
        );
        // Another method's id space is separate.
        cache.first_use("gcp_iit", "jti:1", 100, 50).unwrap();
        // After `until`, the id no longer matters (the evidence itself has expired).
        cache.first_use("github_oidc", "jti:1", 300, 101).unwrap();
        assert_eq!(
            cache.first_use("github_oidc", "jti:2", 5, 10),
            Err(ReplayError::Replayed)
        );
    }
}
