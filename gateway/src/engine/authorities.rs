//! The engine's side of authority rotation: the admin operations (audited,
//! told to every gateway through the store), automatic rotation, and
//! publishing each new snapshot to what depends on it: Workload API streams
//! (through [`Engine::authority_changes`]), the join-token trust source,
//! and the keys delegations are verified with. The signer owns the
//! authorities; this only asks it and passes on what it answers.

use std::sync::Arc;

use serde_json::json;

use super::{Engine, EngineError};
use crate::model::{Actor, AuditEvent, AuditKind};
use crate::signer::authorities::{Schedule, due};
use crate::signer::{Authorities, Kind, Rotation};

impl Engine {
    /// The authorities as the signer has them now.
    pub fn authorities(&self) -> Arc<Authorities> {
        self.signer.authorities()
    }

    /// A receiver that changes whenever the published authorities do.
    pub fn authority_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.authority_generation.subscribe()
    }

    /// The latest a JWT signed now for `ttl` seconds may expire: within the
    /// active JWT key's life. Refused when that key has less than the
    /// minimum lifetime left.
    pub fn jwt_exp(&self, now: i64, ttl: i64) -> Result<i64, EngineError> {
        let authorities = self.authorities();
        let Some(key) = authorities.active(Kind::Jwt) else {
            return Err(EngineError::CaUnavailable("no JWT key is active".into()));
        };
        let exp = (now + ttl).min(key.not_after);
        if exp - now < (self.limits.min_ttl_seconds.max(1) as i64).min(ttl) {
            return Err(EngineError::CaUnavailable(format!(
                "the JWT key {} expires at {}: rotate it",
                key.id,
                crate::util::rfc3339_unix(key.not_after)
            )));
        }
        Ok(exp)
    }

    /// Applies a rotation step an administrator (or automatic rotation)
    /// asked for; audited either way, and every gateway is told.
    pub async fn rotate(&self, rotation: Rotation, actor: Actor) -> Result<Arc<Authorities>, EngineError> {
        let result = self.rotate_inner(&rotation).await;
        let detail = serde_json::to_value(&rotation).unwrap_or_default();
        match &result {
            Ok(after) => {
                let event = AuditEvent::new(
                    AuditKind::CaRotated,
                    actor,
                    json!({ "rotation": detail, "generation": after.generation, "authorities": summary(after) }),
                );
                // The change is made: a failure to record it is logged, and
                // other gateways still pick it up within their poll.
                if let Err(e) = self.store.record_rotation(event).await {
                    tracing::error!(error = %e, "a rotation could not be recorded");
                }
                tracing::info!(
                    op = rotation.name(),
                    generation = after.generation,
                    "authorities rotated"
                );
            }
            Err(e) => {
                self.audit(AuditEvent::new(
                    AuditKind::CaRotationRefused,
                    actor,
                    json!({ "rotation": detail, "status": e.status(), "problem": e.slug(), "detail": e.detail() }),
                ))
                .await;
            }
        }
        result
    }

    async fn rotate_inner(&self, rotation: &Rotation) -> Result<Arc<Authorities>, EngineError> {
        // Gateways with signers of their own would each rotate alone.
        if self.store.shared() && !self.signer.shared() {
            return Err(EngineError::RotationRefused(
                "these gateways share a database but each has its own signer: rotate with a shared signer \
                 ([signer] endpoint), so that every gateway signs with the same authorities"
                    .into(),
            ));
        }
        let signer = self.signer.clone();
        let rotation = rotation.clone();
        let after = tokio::task::spawn_blocking(move || signer.rotate(&rotation))
            .await
            .map_err(EngineError::Task)??;
        self.publish_authorities(after.clone());
        Ok(after)
    }

    /// Re-reads the authorities from the signer (another gateway rotated,
    /// or a periodic check) and publishes what changed.
    pub async fn refresh_authorities(&self) -> Result<(), EngineError> {
        let signer = self.signer.clone();
        let now = tokio::task::spawn_blocking(move || signer.refresh())
            .await
            .map_err(EngineError::Task)??;
        self.publish_authorities(now);
        Ok(())
    }

    /// Tells what depends on the authorities about a new snapshot.
    pub fn publish_authorities(&self, authorities: Arc<Authorities>) {
        let generation = authorities.generation;
        if *self.authority_generation.borrow() == generation {
            return;
        }
        let jwks = authorities.jwks();
        if let Err(e) = self
            .trust
            .insert(super::join_token::trust_source(&self.trust_domain, jwks.clone()))
        {
            tracing::error!(error = %e, "join tokens: the new JWT keys do not load");
        }
        self.delegations.set_own_keys(&jwks);
        self.authority_generation.send_replace(generation);
    }

    /// One step of automatic rotation, if one is due (on the leader).
    pub async fn auto_rotate(&self, schedule: Schedule) {
        if self.store.shared() && !self.signer.shared() {
            return;
        }
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for step in due(&self.authorities(), schedule, now) {
            if let Err(e) = self.rotate(step.clone(), Actor::Castellan).await {
                tracing::warn!(op = step.name(), error = %e, "automatic rotation step refused");
            }
        }
    }
}

/// The authorities in an audit record: id, kind, state.
fn summary(a: &Authorities) -> serde_json::Value {
    a.authorities
        .iter()
        .map(|a| json!({ "id": a.id, "kind": a.kind, "state": a.state, "tainted": a.tainted }))
        .collect()
}

impl Engine {
    /// Signs the audit log's head now (a checkpoint entry, appended to the
    /// log itself); the checkpoint's detail. Nothing to sign in an empty log.
    pub async fn audit_checkpoint(&self, actor: Actor) -> Result<serde_json::Value, EngineError> {
        let Some((size, head)) = self.store.audit_head().await? else {
            return Err(EngineError::BadRequest("the audit log is empty".into()));
        };
        let claims = crate::signer::AuditCheckpointClaims {
            iss: crate::signer::audit_issuer(&self.trust_domain),
            size,
            head,
            iat: crate::util::now_unix(),
        };
        let signer = self.signer.clone();
        let signed = claims.clone();
        let jws = tokio::task::spawn_blocking(move || signer.sign_audit_checkpoint(&signed))
            .await
            .map_err(EngineError::Task)??;
        let detail = crate::audit::checkpoint_detail(&claims, &jws);
        self.store
            .audit(AuditEvent::new(AuditKind::AuditCheckpoint, actor, detail.clone()))
            .await?;
        Ok(detail)
    }
}
