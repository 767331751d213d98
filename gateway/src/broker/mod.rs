//! The AI-agent identity broker's domain: delegation chains and their
//! depth, attenuation, the `act` claim and the keys agents bind tokens to.
//! The flow that uses them (attest, decide, attenuate, mint, record) is the
//! engine's (`engine::broker`). Policy decides; the host enforces
//! attenuation after it, whatever the policy returned.

mod attenuate;
pub mod dpop;

use serde_json::{Value, json};

pub use crate::model::{AgentGrant, AgentToken, Link, Revocation, RevocationFilter, Task};
pub use attenuate::{Bounds, attenuate};

use crate::signer::{ActClaim, jwk_thumbprint};
use crate::trust::KeySet;

/// The deepest chain the host accepts, whatever policy says.
pub const HARD_MAX_DEPTH: usize = 8;

/// The thumbprint of a public JWK the agent holds the private half of.
pub fn public_jwk_thumbprint(jwk: &Value) -> Result<String, String> {
    let obj = jwk.as_object().ok_or("`public_key_jwk` must be a JWK object")?;
    if ["d", "p", "q", "dp", "dq", "qi", "k"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return Err("`public_key_jwk` must be a public key: it holds private key material".into());
    }
    // Reuse the trust-source JWK checks (type, curve, size).
    let mut with_kid = jwk.clone();
    with_kid["kid"] = "x".into();
    KeySet::from_jwks(&json!({ "keys": [with_kid] })).map_err(|e| format!("`public_key_jwk`: {e}"))?;
    Ok(jwk_thumbprint(jwk))
}

/// The RFC 8693 `act` claim (§4.1): the current actor outermost (the
/// parent agent that delegated, or the person when no agent did), each
/// prior actor nested inside the one after it, the person innermost.
/// `chain` is oldest first.
pub fn act_claim(chain: &[Link]) -> Option<ActClaim> {
    chain.iter().fold(None, |inner, link| {
        Some(ActClaim {
            sub: link.sub.clone(),
            iss: link.iss.clone(),
            act: inner.map(Box::new),
        })
    })
}
