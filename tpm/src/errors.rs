//! The errors of this crate: malformed TPM structures, failed checks, and
//! (with `client`) failures talking to the TPM.

/// What went wrong while parsing or checking TPM attestation evidence.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A structure ended before a field it must contain.
    #[error("{what} is truncated")]
    Truncated {
        /// The field that was cut short.
        what: &'static str,
    },
    /// A structure was followed by bytes that belong to nothing.
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes {
        /// The structure that was followed by extra bytes.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// An algorithm identifier that this verifier does not implement.
    #[error("unsupported {what} algorithm 0x{alg:04x}")]
    UnsupportedAlgorithm {
        /// Which field carried the identifier.
        what: &'static str,
        /// The TPM_ALG_ID found.
        alg: u16,
    },
    /// A feature of the evidence that is valid TPM but not handled here.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// The attestation structure does not start with TPM_GENERATED_VALUE.
    #[error("attestation magic is 0x{0:08x}, not TPM_GENERATED_VALUE")]
    BadMagic(u32),
    /// The attestation structure is not a quote.
    #[error("attestation type is 0x{0:04x}, not TPM_ST_ATTEST_QUOTE")]
    NotAQuote(u16),
    /// A key or value has a size the structure does not allow.
    #[error("invalid {what}: {detail}")]
    Invalid {
        /// The field or key that is wrong.
        what: &'static str,
        /// Why it is wrong.
        detail: String,
    },
    /// The attestation key is not a restricted, TPM-resident signing key, so
    /// a quote signed with it proves nothing about the TPM.
    #[error("attestation key attributes 0x{0:08x} lack fixedTPM, fixedParent, restricted or sign")]
    WeakAttestationKey(u32),
    /// The signature over the quote does not verify with the attestation key.
    #[error("quote signature does not verify with the attestation key")]
    BadSignature,
    /// The quote's extraData is not the nonce that was issued.
    #[error("quote was not made over the issued nonce")]
    NonceMismatch,
    /// A PCR that the quote covers has no value in the evidence.
    #[error("PCR {0} is quoted but its value is missing")]
    PcrMissing(u32),
    /// The evidence carries a PCR value that the quote does not cover.
    #[error("PCR {0} has a value but is not covered by the quote")]
    PcrNotQuoted(u32),
    /// The digest of the PCR values differs from the quote's pcrDigest.
    #[error("PCR values do not match the quoted PCR digest")]
    PcrDigestMismatch,
    /// The EK certificate could not be parsed.
    #[error("EK certificate: {0}")]
    Certificate(String),
    /// The EK certificate does not chain to a configured manufacturer root.
    #[error("EK certificate does not chain to a trusted manufacturer root: {0}")]
    UntrustedEk(String),
    /// The EK certificate certifies a different key than the EK public area.
    #[error("EK certificate's key differs from the EK public area")]
    EkMismatch,
    /// A cryptographic primitive failed (for example, RSA encryption).
    #[error("crypto failure: {0}")]
    Crypto(String),
    /// The TPM or the TSS stack reported an error.
    #[cfg(feature = "client")]
    #[error("TPM: {0}")]
    Tpm(#[from] tss_esapi::Error),
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
