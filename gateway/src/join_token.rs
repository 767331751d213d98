//! Join tokens: one-time tokens an admin creates to bootstrap a host
//! (`POST /api/v1/join-tokens`). Each is a JWT signed by Castellan's JWT
//! key, so the `join_token` module verifies it through a built-in trust
//! source like any other token, and the pipeline spends its `jti` at first
//! use (durably: a restart does not make it usable again).

use crate::trust::TrustSource;

/// The audience every join token carries.
pub const AUDIENCE: &str = "castellan-join";

/// The issuer of join tokens in `trust_domain`.
pub fn issuer(trust_domain: &str) -> String {
    format!("castellan:join-token:{trust_domain}")
}

/// The built-in trust source that verifies join tokens (never persisted;
/// rebuilt from the signer's public keys at each start).
pub fn trust_source(trust_domain: &str, jwks: serde_json::Value) -> TrustSource {
    TrustSource {
        id: "castellan-join-tokens".into(),
        name: "castellan-join-tokens".into(),
        method: "join_token".into(),
        issuer: issuer(trust_domain),
        audiences: vec![AUDIENCE.into()],
        jwks,
        certificates: None,
        settings: None,
        jwks_url: None,
        jwks_refresh_seconds: None,
        previous: None,
        revoked_at: None,
        origin: "builtin".into(),
        created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
    }
}
