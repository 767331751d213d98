//! Join tokens: one-time tokens an admin creates to bootstrap a host
//! (`POST /api/v1/join-tokens`). Each is a JWT signed by Castellan's JWT
//! key, so the `join_token` module verifies it through a built-in trust
//! source like any other token, and the engine spends its `jti` at first
//! use (durably: a restart does not make it usable again).

use crate::trust::TrustSource;

pub use crate::signer::{JOIN_TOKEN_AUDIENCE as AUDIENCE, join_token_issuer as issuer};

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

/// A join token as created.
#[derive(Debug, Clone, serde::Serialize)]
pub struct JoinToken {
    pub token: String,
    pub name: String,
    pub jti: String,
    pub expires_at: i64,
}

impl super::Engine {
    /// Creates a one-time join token for host `name`, valid `ttl_seconds`
    /// (60 s to 7 days), audited as `join_token.created`; a refusal as
    /// `join_token.refused`.
    pub async fn join_token(
        &self,
        admin: &crate::model::Principal,
        name: &str,
        ttl_seconds: u64,
    ) -> Result<JoinToken, super::EngineError> {
        use crate::model::{Actor, AuditEvent, AuditKind};
        let refusal = || super::Refusal::new(super::Surface::JoinToken, "create", Actor::from(admin));
        let result = async {
            let valid = !name.is_empty()
                && name.len() <= 128
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !valid || !(60..=7 * 86_400).contains(&ttl_seconds) {
                return Err(super::EngineError::BadRequest(
                    "name must be 1-128 of [A-Za-z0-9-_.] and ttl_seconds between 60 and 604800".into(),
                ));
            }
            let now = crate::util::now_unix();
            let jti = uuid::Uuid::new_v4().to_string();
            let expires_at = self.jwt_exp(now, ttl_seconds as i64)?;
            let claims = crate::signer::JoinTokenClaims {
                iss: issuer(&self.trust_domain),
                aud: vec![AUDIENCE.to_owned()],
                sub: name.to_owned(),
                jti: jti.clone(),
                iat: now,
                exp: expires_at,
            };
            let token = self.signer.sign_join_token(&claims)?;
            // Audited durably before the token leaves.
            let event = AuditEvent::new(
                AuditKind::JoinTokenCreated,
                Actor::from(admin),
                serde_json::json!({ "name": name, "jti": jti, "expires_at": expires_at }),
            );
            self.store.audit(event).await?;
            crate::metrics::get().issued("join_token", "");
            Ok(JoinToken {
                token,
                name: name.to_owned(),
                jti,
                expires_at,
            })
        }
        .await;
        self.audited(refusal, result).await
    }
}
