//! Why the engine refused. Every variant means no credential; each maps to
//! one stable problem type (`slug`) that every surface renders alike.

use crate::approvals::ApprovalError;

/// Why a flow was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The request is malformed (missing fields, out-of-range values).
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the configured limit.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The CSR does not parse, its signature does not verify, or its key is
    /// not acceptable.
    #[error("{0}")]
    BadCsr(String),
    /// No attestor handles the method.
    #[error("unknown attestation method `{0}`")]
    UnknownMethod(String),
    /// The caller named a method whose evidence only the server gathers
    /// (from the kernel, on the Workload API socket): accepting it from a
    /// caller would let anyone claim to be any process.
    #[error(
        "method `{0}` is only available on the Workload API, where the server gathers its evidence itself; it is never accepted from a caller"
    )]
    HostEvidenceOnly(String),
    /// The method has no trust source configured.
    #[error("{0}")]
    NoTrustSource(String),
    /// The evidence did not prove anything.
    #[error("attestation failed")]
    AttestationFailed(#[source] AttestationFailure),
    /// Policy said no.
    #[error("policy denied the request: {}", .0.join("; "))]
    PolicyDenied(Vec<String>),
    /// The Workload API caller matches no entry the policy allows.
    #[error("no identity is registered for this caller")]
    NotRegistered,
    /// A delegation token did not verify, is revoked, expired, or too deep.
    #[error("delegation refused: {0}")]
    Delegation(String),
    /// A DPoP proof is missing, does not verify, or was used before.
    #[error("{0}")]
    Dpop(String),
    /// A JWT-SVID would be a bearer token: no key was given to bind it to
    /// and policy does not allow bearer tokens (or the request needs
    /// approval, whose result is delivered only to the key's holder).
    #[error(
        "send `public_key_jwk` (or, on token exchange, a DPoP proof): identities are bound to a key the agent holds"
    )]
    KeyRequired,
    /// A name the request carries cannot become a valid identity.
    #[error("{0}")]
    InvalidIdentity(String),
    /// The approval rules refused a vote, a cancellation or a lookup.
    #[error(transparent)]
    Approval(#[from] ApprovalError),
    /// No credentials came with a request that needs them.
    #[error("authenticate with an API token or with `method` and `evidence`")]
    Unauthenticated,
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Every admission permit is taken and the queue is full.
    #[error("Castellan is at capacity; retry in a moment")]
    Overloaded,
    /// The CA cannot sign a credential of the minimum lifetime now
    /// (expired, expiring, or not yet valid).
    #[error("{0}")]
    CaUnavailable(String),
    /// A rotation step was refused (the reason says what to do instead).
    #[error("{0}")]
    RotationRefused(String),
    /// What was asked about does not exist.
    #[error("{0}")]
    NotFound(String),
    /// No signing authority has that id.
    #[error("no authority `{0}`")]
    UnknownAuthority(String),
    /// The separate signer could not be reached.
    #[error("{0}")]
    SignerUnavailable(String),
    /// The policy could not be evaluated.
    #[error("the policy could not decide")]
    Policy(#[source] crate::policy::PolicyError),
    /// The policy returned a decision the host will not act on.
    #[error("the policy returned an invalid decision: {0}")]
    InvalidDecision(String),
    /// The attestor module failed (trap, deadline, bad configuration).
    #[error("attestation could not be completed")]
    Attestor(#[source] crate::attest::AttestError),
    /// The signer failed.
    #[error("the signer could not issue the credential")]
    Signer(#[source] crate::signer::SignerError),
    /// The store could not durably record the outcome.
    #[error("the request could not be recorded; nothing was issued")]
    Store(#[source] crate::store::StoreError),
    /// A blocking task of the engine died.
    #[error("the request could not be completed")]
    Task(#[source] tokio::task::JoinError),
    /// An invariant of the engine did not hold.
    #[error("the request could not be completed: {0}")]
    Internal(&'static str),
    /// Data the engine stored earlier no longer decodes.
    #[error("stored {0} is invalid")]
    Corrupt(&'static str),
}

/// Why evidence was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationFailure {
    /// The module refused the evidence (signature, audience, expiry…).
    #[error(transparent)]
    Evidence(crate::attest::AttestError),
    /// The evidence answers no challenge this server has open.
    #[error(transparent)]
    Challenge(#[from] crate::attest::challenge::ChallengeError),
    /// Single-use evidence seen before (in memory).
    #[error(transparent)]
    Replay(#[from] crate::attest::replay::ReplayError),
    /// Single-use evidence spent before (recorded in the store).
    #[error("this evidence was already used")]
    Spent,
}

impl From<crate::store::StoreError> for EngineError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store failure; nothing was issued");
        EngineError::Store(e)
    }
}

impl From<crate::signer::SignerError> for EngineError {
    fn from(e: crate::signer::SignerError) -> Self {
        use crate::signer::SignerError as S;
        match e {
            S::AuthorityUnusable(m) => EngineError::CaUnavailable(m),
            S::Rotation(m) => EngineError::RotationRefused(m),
            e @ S::AuthorityInUse { .. } => EngineError::RotationRefused(e.to_string()),
            S::UnknownAuthority(id) => EngineError::UnknownAuthority(id),
            S::Purpose(m) => EngineError::Forbidden(format!("the signer refused: {m}")),
            S::Unavailable(m) => {
                tracing::error!(error = %m, "the signer is unavailable");
                EngineError::SignerUnavailable(format!("the signer is unavailable: {m}"))
            }
            e => {
                tracing::error!(error = %e, "signer failed");
                EngineError::Signer(e)
            }
        }
    }
}

impl EngineError {
    /// The stable problem type, `urn:castellan:problem:<slug>`.
    pub fn slug(&self) -> &'static str {
        match self {
            EngineError::BadRequest(_) => "malformed-request",
            EngineError::TooLarge { .. } => "payload-too-large",
            EngineError::BadCsr(_) => "invalid-csr",
            EngineError::UnknownMethod(_) | EngineError::HostEvidenceOnly(_) => "unknown-method",
            EngineError::NoTrustSource(_) => "no-trust-source",
            EngineError::AttestationFailed(_) => "attestation-failed",
            EngineError::PolicyDenied(_) => "policy-denied",
            EngineError::NotRegistered => "not-registered",
            EngineError::Delegation(_) => "delegation-refused",
            EngineError::Dpop(_) => "invalid-dpop-proof",
            EngineError::KeyRequired => "key-required",
            EngineError::InvalidIdentity(_) => "invalid-identity",
            EngineError::Approval(a) => match a {
                ApprovalError::NotFound => "not-found",
                ApprovalError::Expired => "request-expired",
                ApprovalError::NotPending(_) => "request-not-pending",
                ApprovalError::SelfApproval => "self-approval",
                ApprovalError::NotEligible(_) => "not-eligible",
                ApprovalError::BindingMismatch => "binding-mismatch",
                ApprovalError::NotRequester => "not-requester",
            },
            EngineError::Unauthenticated => "unauthorized",
            EngineError::Forbidden(_) => "forbidden",
            EngineError::Overloaded => "overloaded",
            EngineError::Store(_) => "unavailable",
            EngineError::CaUnavailable(_) => "ca-unavailable",
            EngineError::RotationRefused(_) => "rotation-refused",
            EngineError::UnknownAuthority(_) | EngineError::NotFound(_) => "not-found",
            EngineError::SignerUnavailable(_) => "signer-unavailable",
            EngineError::Policy(_)
            | EngineError::InvalidDecision(_)
            | EngineError::Attestor(_)
            | EngineError::Signer(_)
            | EngineError::Task(_)
            | EngineError::Internal(_)
            | EngineError::Corrupt(_) => "issuance-failed",
        }
    }

    /// The HTTP status of the problem (gRPC surfaces map it to a code).
    pub fn status(&self) -> u16 {
        match self {
            EngineError::BadRequest(_) | EngineError::BadCsr(_) | EngineError::KeyRequired => 400,
            EngineError::TooLarge { .. } => 413,
            EngineError::UnknownMethod(_)
            | EngineError::HostEvidenceOnly(_)
            | EngineError::NoTrustSource(_)
            | EngineError::InvalidIdentity(_) => 422,
            EngineError::Unauthenticated | EngineError::Dpop(_) => 401,
            EngineError::AttestationFailed(_)
            | EngineError::PolicyDenied(_)
            | EngineError::NotRegistered
            | EngineError::Delegation(_)
            | EngineError::Forbidden(_) => 403,
            EngineError::Approval(a) => match a {
                ApprovalError::NotFound => 404,
                ApprovalError::Expired => 410,
                ApprovalError::NotPending(_) | ApprovalError::BindingMismatch => 409,
                _ => 403,
            },
            EngineError::RotationRefused(_) => 409,
            EngineError::UnknownAuthority(_) | EngineError::NotFound(_) => 404,
            EngineError::Overloaded
            | EngineError::Store(_)
            | EngineError::CaUnavailable(_)
            | EngineError::SignerUnavailable(_) => 503,
            _ => 500,
        }
    }

    /// What the caller is told: the message and its causes, which never
    /// carry secrets (evidence, keys and tokens are never put in errors).
    pub fn detail(&self) -> String {
        use std::error::Error as _;
        let mut text = self.to_string();
        // Refused evidence and internal failures name their cause, so the
        // caller (or operator) can act on it. Store failures do not: their
        // causes are the server's business.
        if self.status() == 500 || matches!(self, EngineError::AttestationFailed(_)) {
            let mut source = self.source();
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            if self.status() == 500 {
                text.push_str("; nothing was issued");
            }
        }
        text
    }

    /// Policy reasons, for `policy-denied`.
    pub fn reasons(&self) -> Option<&[String]> {
        match self {
            EngineError::PolicyDenied(r) => Some(r),
            _ => None,
        }
    }
}
