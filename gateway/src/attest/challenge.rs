//! Server challenges for methods whose proof must be fresh: the client asks
//! for a nonce, signs (or quotes) it, and sends the evidence with the
//! challenge's id. A challenge is taken at the first attestation that
//! names it, whatever the outcome, so a nonce is never accepted twice; it
//! expires unused after a few minutes. Challenges live in memory: after a
//! restart the client asks for a new one.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

/// How long a challenge may wait for its evidence.
pub const CHALLENGE_TTL_SECONDS: i64 = 300;
/// Challenges pending at once, at most: beyond it new ones are refused.
const MAX_PENDING: usize = 16_384;

/// Why a challenge could not be issued or taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChallengeError {
    /// Too many challenges are pending.
    #[error("too many challenges are pending; try again shortly")]
    Full,
    /// The id names no live challenge (never issued, used, or expired).
    #[error("unknown, used or expired challenge")]
    Unknown,
    /// The challenge was issued for another method.
    #[error("the challenge was issued for another method")]
    WrongMethod,
}

struct Pending {
    method: String,
    expires_at: i64,
    /// What the module sees under `context.challenge`.
    context: Value,
}

/// Pending challenges by id.
#[derive(Default)]
pub struct Challenges {
    pending: Mutex<HashMap<String, Pending>>,
}

/// A challenge as the client receives it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub challenge_id: String,
    /// 32 random bytes, base64.
    pub nonce: String,
    pub expires_at: i64,
    /// Method-specific material for the client (e.g. a TPM credential blob).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Challenges {
    /// Issues a challenge for `method`. `private` joins the module's view
    /// (never the client's); `public` joins the client's.
    pub fn issue(
        &self,
        method: &str,
        private: serde_json::Map<String, Value>,
        public: serde_json::Map<String, Value>,
        now: i64,
    ) -> Result<Issued, ChallengeError> {
        let id = uuid::Uuid::new_v4().to_string();
        let nonce = STANDARD.encode(crate::util::random_bytes::<32>());
        let expires_at = now + CHALLENGE_TTL_SECONDS;
        let mut context = json!({ "id": id, "nonce": nonce, "expires_at": expires_at });
        for (k, v) in private {
            context[k] = v;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, p| p.expires_at >= now);
            if pending.len() >= MAX_PENDING {
                return Err(ChallengeError::Full);
            }
        }
        pending.insert(
            id.clone(),
            Pending {
                method: method.to_owned(),
                expires_at,
                context,
            },
        );
        Ok(Issued {
            challenge_id: id,
            nonce,
            expires_at,
            extra: public,
        })
    }

    /// Takes the challenge `id` for `method`: it can never be taken again.
    pub fn take(&self, id: &str, method: &str, now: i64) -> Result<Value, ChallengeError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let p = pending.remove(id).ok_or(ChallengeError::Unknown)?;
        if p.expires_at < now {
            return Err(ChallengeError::Unknown);
        }
        if p.method != method {
            return Err(ChallengeError::WrongMethod);
        }
        Ok(p.context)
    }
}

/// The `challenge_id` of JSON evidence, if it names one.
pub fn challenge_id(evidence: &str) -> Option<String> {
    if !evidence.trim_start().starts_with('{') {
        return None;
    }
    let v: Value = serde_json::from_str(evidence).ok()?;
    v.get("challenge_id")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_challenge_is_taken_once_for_its_method_before_it_expires() {
        let c = Challenges::default();
        let empty = serde_json::Map::new;
        let a = c.issue("x509pop", empty(), empty(), 100).unwrap();
        assert_eq!(
            c.take(&a.challenge_id, "tpm", 101),
            Err(ChallengeError::WrongMethod)
        );
        // A wrong-method attempt consumed it too: no second try.
        assert_eq!(
            c.take(&a.challenge_id, "x509pop", 101),
            Err(ChallengeError::Unknown)
        );
        let b = c.issue("x509pop", empty(), empty(), 100).unwrap();
        let ctx = c.take(&b.challenge_id, "x509pop", 150).unwrap();
        assert_eq!(ctx["nonce"], b.nonce.as_str());
        assert_eq!(
            c.take(&b.challenge_id, "x509pop", 150),
            Err(ChallengeError::Unknown)
        );
        let late = c.issue("x509pop", empty(), empty(), 100).unwrap();
        assert_eq!(
            c.take(&late.challenge_id, "x509pop", 100 + CHALLENGE_TTL_SECONDS + 1),
            Err(ChallengeError::Unknown)
        );
        assert_eq!(challenge_id(r#"{"challenge_id": "x"}"#).as_deref(), Some("x"));
        assert_eq!(challenge_id("eyJ.a.b"), None);
    }
}
