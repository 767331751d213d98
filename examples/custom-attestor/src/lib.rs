//! `ci_job`: attests a CI job by the OIDC token its CI system gives it.
//!
//! The token is a JWT whose issuer is configured as a trust source for the
//! `ci_job` method. The module checks it through the host (signature by
//! `kid`, issuer, audience, lifetime: `JwtTrustSources::verify`), then
//! requires `repository` and `ref` claims, and says: subject
//! `repo/<repository>`, selectors `ci:repo:<repository>`, `ci:ref:<ref>`.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;

use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};

pub struct CiJob;

impl Attestor for CiJob {
    type Config = JwtTrustSources;

    fn attest(evidence: &str, config: JwtTrustSources, _context: &Context) -> Result<Attestation, Error> {
        let jwt = config.verify(evidence)?;
        let repository = jwt.claim_str("repository")?;
        let git_ref = jwt.claim_str("ref")?;
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 200
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        };
        if !valid(&repository) || !valid(&git_ref) || repository.contains("..") {
            return Err(Error::rejected(
                "repository or ref has characters that cannot be part of an identity",
            ));
        }
        Ok(Attestation::new(format!("repo/{repository}"))
            .selector("ci", "repo", &repository)
            .selector("ci", "ref", &git_ref)
            .claim("repository", repository.as_str())
            .claim("ref", git_ref.as_str()))
    }
}

attestor!(CiJob);
