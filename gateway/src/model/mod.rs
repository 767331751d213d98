//! The model: the types every stage, the engine and the stores share.
//!
//! This module sits at the bottom of the gateway's import graph. It imports
//! nothing from the gateway but [`crate::util`] and [`crate::spiffe_id`], and
//! holds data and the rules that belong to the data itself (serialisation,
//! hashing an audit record). Domain behaviour lives with its stage: the
//! approval state machine in `approvals`, attenuation in `broker`, the
//! revocation cascade and audit chaining in `store`'s shared layer.

pub mod agent;
pub mod attestation;
pub mod audit;
pub mod entry;
pub mod policy;
pub mod principal;
pub mod records;
pub mod request;
pub mod trust_source;

/// The URI prefix of every RFC 9457 problem type Castellan answers with
/// (`urn:castellan:problem:<slug>`): the HTTP surface writes it, clients
/// read it.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:castellan:problem:";

pub use agent::{AgentGrant, AgentToken, Link, Revocation, RevocationFilter, Task};
pub use attestation::{Attestation, AttestationSummary, SingleUse};
pub use audit::{Actor, AuditEvent, AuditKind, AuditRecord, genesis_hash};
pub use entry::Entry;
pub use principal::{OidcLink, Principal, PrincipalKind, Role, TokenRecord, oidc_person};
pub use records::{
    CertificateRecord, ChallengeRecord, IdempotentResponse, Notification, OutboxItem, Source, StoredBundle,
};
pub use request::{IssuedCert, Request, Requester, Rule, State, Vote, VoteDecision};
pub use trust_source::{PreviousKeys, TrustSource};
