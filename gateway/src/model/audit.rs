//! Audit events: what happened (a typed kind), who caused it (a typed
//! actor), and details safe to keep. Records are hash-chained by the store's
//! shared layer; this module only defines how one record hashes.
//!
//! Kinds and actors serialise to the dotted and prefixed strings the audit
//! log has always used, and any string reads back to the same string, so a
//! stored chain still verifies after the types grow.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

macro_rules! audit_kinds {
    ($($(#[$doc:meta])* $variant:ident => $text:literal,)*) => {
        /// What happened.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum AuditKind {
            $($(#[$doc])* $variant,)*
            /// A kind this build does not know (written by a newer one).
            Other(String),
        }

        impl AuditKind {
            pub fn as_str(&self) -> &str {
                match self {
                    $(AuditKind::$variant => $text,)*
                    AuditKind::Other(s) => s,
                }
            }

            pub fn parse(s: &str) -> Self {
                match s {
                    $($text => AuditKind::$variant,)*
                    other => AuditKind::Other(other.to_owned()),
                }
            }
        }
    };
}

audit_kinds! {
    /// An attested X.509-SVID was issued over HTTP.
    IssuanceIssued => "issuance.issued",
    /// A subordinate CA was signed (Castellan as an upstream authority).
    CaSubordinateIssued => "ca.subordinate_issued",
    /// A subordinate CA request was refused.
    CaSubordinateRefused => "ca.subordinate_refused",
    /// A signing authority was prepared, activated, tainted or revoked.
    CaRotated => "ca.rotated",
    /// A rotation step was refused.
    CaRotationRefused => "ca.rotation_refused",
    /// A signed checkpoint of the audit log (its size and head).
    AuditCheckpoint => "audit.checkpoint",
    /// An attested issuance was refused.
    IssuanceRefused => "issuance.refused",
    /// A just-in-time request was recorded pending.
    EphemeralCreated => "ephemeral.created",
    /// An approver approved.
    EphemeralApproval => "ephemeral.approval",
    /// An approver denied.
    EphemeralDenial => "ephemeral.denial",
    /// A request reached its quorum.
    EphemeralApproved => "ephemeral.approved",
    /// A request reached its deny threshold.
    EphemeralDenied => "ephemeral.denied",
    /// A just-in-time certificate was minted.
    EphemeralIssued => "ephemeral.issued",
    /// A break-glass certificate was minted without approval.
    EphemeralBreakGlass => "ephemeral.break_glass",
    /// The requester cancelled.
    EphemeralCancelled => "ephemeral.cancelled",
    /// A pending request timed out.
    EphemeralExpired => "ephemeral.expired",
    /// A just-in-time operation was refused.
    EphemeralRefused => "ephemeral.refused",
    /// An agent identity was minted.
    BrokerIssued => "broker.issued",
    /// An agent identity waits for approvers.
    BrokerEscalated => "broker.escalated",
    /// A broker or token-exchange request was refused.
    BrokerRefused => "broker.refused",
    /// Agent tokens were revoked.
    BrokerRevoked => "broker.revoked",
    /// The Workload API minted an X.509-SVID.
    WorkloadX509Issued => "workload_api.x509_issued",
    /// The Workload API minted JWT-SVIDs.
    WorkloadJwtIssued => "workload_api.jwt_issued",
    /// The Workload API refused a caller.
    WorkloadRefused => "workload_api.refused",
    /// A join token was created.
    JoinTokenCreated => "join_token.created",
    /// A join-token request was refused.
    JoinTokenRefused => "join_token.refused",
    /// An API token was created.
    TokenCreated => "token.created",
    /// An API token was revoked.
    TokenRevoked => "token.revoked",
    /// Authentication or authorisation failed.
    AuthRefused => "auth.refused",
    /// Refusals past the refusal budget, counted rather than written.
    RefusalsSuppressed => "audit.refusals_suppressed",
    /// A trust source was created.
    TrustSourceCreated => "trust_source.created",
    /// A trust source was deleted.
    TrustSourceDeleted => "trust_source.deleted",
    /// A trust source's keys or settings changed.
    TrustSourceRotated => "trust_source.rotated",
    /// A trust source was revoked.
    TrustSourceRevoked => "trust_source.revoked",
    /// A registration entry was created.
    EntryCreated => "entry.created",
    /// A registration entry was deleted.
    EntryDeleted => "entry.deleted",
    /// A policy bundle became active.
    BundleActivated => "bundle.activated",
    /// A policy bundle was refused.
    BundleRefused => "bundle.refused",
    /// A webhook gave up on a notification.
    WebhookUndeliverable => "webhook.undeliverable",
}

impl fmt::Display for AuditKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for AuditKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for AuditKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

/// Who caused an audited event.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Actor {
    /// A person or API token, by name (`user:<name>`): the admin token's
    /// name is `admin`, an OIDC login's is its verified name claim.
    User(String),
    /// A caller that presented evidence not yet verified (`evidence:<method>`).
    Evidence(String),
    /// A caller whose evidence verified (`workload:<method>:<subject>`).
    Workload { method: String, subject: String },
    /// An AI agent (`agent:<agent_id>`).
    Agent(String),
    /// A bundle source polled by the server (`watch:<url>`).
    Watch(String),
    /// Castellan itself: expiry, recovery, housekeeping.
    Castellan,
    /// A caller that presented no credentials.
    Anonymous,
    /// A form this build does not know.
    Other(String),
}

impl Actor {
    /// Parses the stored form; any string reads back to itself.
    pub fn parse(s: &str) -> Self {
        if s == "castellan" {
            return Actor::Castellan;
        }
        if s == "anonymous" {
            return Actor::Anonymous;
        }
        let Some((prefix, rest)) = s.split_once(':') else {
            return Actor::Other(s.to_owned());
        };
        match prefix {
            "user" => Actor::User(rest.to_owned()),
            "evidence" => Actor::Evidence(rest.to_owned()),
            "agent" => Actor::Agent(rest.to_owned()),
            "watch" => Actor::Watch(rest.to_owned()),
            "workload" => match rest.split_once(':') {
                Some((method, subject)) if !method.is_empty() => Actor::Workload {
                    method: method.to_owned(),
                    subject: subject.to_owned(),
                },
                _ => Actor::Other(s.to_owned()),
            },
            _ => Actor::Other(s.to_owned()),
        }
    }

    /// A verified workload, from its attestation.
    pub fn workload(method: &str, subject: &str) -> Self {
        Actor::Workload {
            method: method.to_owned(),
            subject: subject.to_owned(),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::User(n) => write!(f, "user:{n}"),
            Actor::Evidence(m) => write!(f, "evidence:{m}"),
            Actor::Workload { method, subject } => write!(f, "workload:{method}:{subject}"),
            Actor::Agent(a) => write!(f, "agent:{a}"),
            Actor::Watch(w) => write!(f, "watch:{w}"),
            Actor::Castellan => f.write_str("castellan"),
            Actor::Anonymous => f.write_str("anonymous"),
            Actor::Other(s) => f.write_str(s),
        }
    }
}

impl Serialize for Actor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Actor {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self::parse(&String::deserialize(d)?))
    }
}

impl From<&super::Principal> for Actor {
    /// The person: `user:<name>` or, for an unlinked OIDC login,
    /// `oidc:<issuer>:<sub>`.
    fn from(p: &super::Principal) -> Self {
        Actor::parse(&p.id)
    }
}

/// An audit event before it is chained.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditEvent {
    pub kind: AuditKind,
    pub actor: Actor,
    /// Details safe to keep: never evidence, tokens or keys.
    pub detail: Value,
}

impl AuditEvent {
    pub fn new(kind: AuditKind, actor: Actor, detail: Value) -> Self {
        Self { kind, actor, detail }
    }
}

/// An audit entry as stored: the event, its place and its chain hashes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: String,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous entry (`sha256:` + 64 zeros for the first).
    pub prev_hash: String,
    /// `sha256:` over this entry's canonical JSON without `hash`.
    pub hash: String,
}

impl AuditRecord {
    /// Computes the hash this record must carry.
    pub fn compute_hash(&self) -> String {
        let body = serde_json::json!({
            "seq": self.seq,
            "at": self.at,
            "kind": self.event.kind,
            "actor": self.event.actor,
            "detail": self.event.detail,
            "prev_hash": self.prev_hash,
        });
        // serde_json without `preserve_order` sorts object keys, which makes
        // this serialisation canonical for our purposes.
        format!("sha256:{}", crate::util::sha256_hex(body.to_string().as_bytes()))
    }
}

/// The hash that precedes the first audit entry.
pub fn genesis_hash() -> String {
    format!("sha256:{}", "0".repeat(64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_actor_string_reads_back_to_itself() {
        for s in [
            "user:alice@example.com",
            "evidence:k8s_sat",
            "workload:k8s_sat:ns/default/sa/demo",
            "workload:unix:uid:1000",
            "agent:planner",
            "watch:https://b.example/bundle.tar.gz",
            "castellan",
            "anonymous",
            "admin",
            "workload:",
            "something:else",
        ] {
            assert_eq!(Actor::parse(s).to_string(), s);
        }
        assert_eq!(
            Actor::parse("workload:k8s_sat:ns/a/sa/b"),
            Actor::workload("k8s_sat", "ns/a/sa/b")
        );
    }

    #[test]
    fn every_kind_reads_back_to_itself() {
        for s in ["issuance.issued", "workload_api.x509_issued", "future.kind"] {
            assert_eq!(AuditKind::parse(s).as_str(), s);
        }
        assert_eq!(
            AuditKind::parse("ephemeral.break_glass"),
            AuditKind::EphemeralBreakGlass
        );
    }
}
