//! The errors of this crate: [`Error`] for a workload that cannot get ready
//! (no Workload API, no SVID), [`Refusal`] for a peer certificate it will not
//! accept. Messages name what to fix; they never carry key material.

use std::time::Duration;

use spiffe::{SpiffeId, TrustDomain};

/// Why a workload could not get ready to talk.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `SPIFFE_ENDPOINT_SOCKET` is not set, so there is no Workload API to ask.
    #[error(
        "SPIFFE_ENDPOINT_SOCKET is not set; point it at the Workload API, e.g. unix:/path/to/workload.sock"
    )]
    NoEndpoint,

    /// No X.509-SVID arrived within the wait; `reason` is what the Workload
    /// API said when asked once more (e.g. permission denied: the caller
    /// matches no registration entry).
    #[error("no X.509-SVID from the Workload API at {endpoint} within {} s: {reason}", waited.as_secs())]
    NoSvid {
        endpoint: String,
        waited: Duration,
        reason: String,
    },

    /// The Workload API source failed otherwise (bad address, closed source).
    #[error("Workload API at {endpoint}: {source}")]
    Source {
        endpoint: String,
        #[source]
        source: spiffe::X509SourceError,
    },

    /// The source holds no usable SVID any more (withdrawn or expired).
    #[error("no usable X.509-SVID: {0}")]
    Svid(#[from] spiffe::X509SourceError),

    /// rustls refused the configuration (e.g. TLS 1.3 missing from the provider).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
}

/// Why a peer's certificate was refused. Each one fails the handshake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The leaf does not carry exactly one URI SAN holding a SPIFFE ID.
    #[error("the certificate is not an X.509-SVID: {0}")]
    NotAnSvid(#[source] spiffe::cert::error::CertificateError),

    /// The Workload API gave no X.509 bundle for the peer's trust domain.
    #[error("no X.509 bundle for trust domain {0}")]
    NoBundle(TrustDomain),

    /// The bundle could not be read from the source.
    #[error("the X.509 bundles are unavailable: {0}")]
    Bundles(String),

    /// The chain does not lead to the trust domain's bundle, or is not valid now.
    #[error("{peer} does not chain to the {} bundle: {source}", peer.trust_domain())]
    Chain {
        peer: SpiffeId,
        #[source]
        source: webpki::Error,
    },

    /// The chain is good but the ID is not the one this workload accepts.
    #[error("{peer} is not {allowed}, the only SPIFFE ID accepted")]
    NotAuthorized { peer: SpiffeId, allowed: SpiffeId },
}
