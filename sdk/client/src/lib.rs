//! Castellan's client SDK.
//!
//! - [`Agent`]: asks the broker for an identity bound to a key it generated
//!   and keeps (the private key never leaves the process), renews it before
//!   it expires, and authorises outgoing HTTP calls with the JWT-SVID plus a
//!   DPoP proof (RFC 9449) signed by that key for each request.
//! - [`Verifier`]: what a tool server runs: checks the JWT-SVID offline
//!   against the JWKS from discovery, its audience and expiry, the DPoP proof
//!   (key thumbprint, method, URL, token hash, freshness, replay), the
//!   revocation feed, and exposes scopes and the delegation chain.

mod agent;
mod verifier;

pub use agent::{Agent, AgentConfig, Identity};
pub use verifier::{Verified, Verifier, VerifyError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(String),
    /// Castellan refused; the problem's type slug and detail.
    #[error("{status} {problem}: {detail}")]
    Refused {
        status: u16,
        problem: String,
        detail: String,
    },
    /// The request went to approvers; follow it by id.
    #[error("approval required: request {0}")]
    Pending(String),
    /// Key generation or signing failed.
    #[error("crypto: {0}")]
    Crypto(String),
}

/// RFC 7638 thumbprint of an EC P-256 public JWK.
pub(crate) fn thumbprint(jwk: &serde_json::Value) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let f = |k: &str| jwk[k].as_str().unwrap_or_default();
    let canonical = format!(
        r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
        f("crv"),
        f("x"),
        f("y")
    );
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()))
}

/// base64url(SHA-256(token)): DPoP's `ath`.
pub(crate) fn token_hash(token: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
