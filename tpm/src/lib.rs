//! TPM 2.0 attestation for Castellan.
//!
//! The verifier side — parsing TPM structures ([`wire`]), wrapping a secret
//! to an EK for an AK ([`credential`]), checking a quote ([`quote`]) and an
//! EK certificate ([`ek`]) — is pure Rust and never touches a TPM. The TPM
//! side ([`client`], feature `client`) uses tss-esapi and libtss2; the
//! gateway does not need it.
//!
//! The protocol: the client sends its EK certificate (or EK public area) and
//! its AK public area; the verifier answers with [`make_credential`] for the
//! AK's Name and a nonce; the client activates the credential (which only
//! works in the TPM that holds the EK, with that AK loaded) and quotes PCRs
//! over the nonce; the verifier checks the activated secret,
//! [`verify_quote`], the EK certificate chain and the PCR policy.

pub mod credential;
pub mod ek;
pub mod errors;
pub mod quote;
pub mod wire;

#[cfg(feature = "client")]
pub mod client;

#[cfg(feature = "testing")]
#[allow(clippy::unwrap_used, clippy::expect_used)] // test support: a failed set-up step stops the test
pub mod testing;

pub use credential::{Credential, make_credential};
pub use errors::{Error, Result};
pub use quote::{QuoteInfo, verify_quote};
