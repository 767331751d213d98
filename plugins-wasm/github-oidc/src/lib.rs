//! `github_oidc`: attests a GitHub Actions job by the OIDC token GitHub
//! gives it (`ACTIONS_ID_TOKEN_REQUEST_URL` with the audience the trust
//! source accepts).
//!
//! The host checks the signature against the trust source's JWKS (chosen
//! by `kid`); the SDK checks issuer, audience and lifetime. The job's
//! repository, ref, environment and workflow become selectors
//! (`github:<claim>:<value>`) and claims for policy, which decides per
//! repository and environment. A token is good for one issuance: its `jti`
//! is remembered until it expires.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;

use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};

/// Claims that must be present, then claims taken when present.
const REQUIRED: &[&str] = &[
    "repository",
    "repository_owner",
    "ref",
    "workflow_ref",
    "event_name",
];
const OPTIONAL: &[&str] = &["environment", "job_workflow_ref", "runner_environment"];

pub struct GithubOidc;

impl Attestor for GithubOidc {
    type Config = JwtTrustSources;

    fn attest(evidence: &str, config: JwtTrustSources, context: &Context) -> Result<Attestation, Error> {
        let jwt = config.verify_bound(evidence, context)?;
        let repository = jwt.claim_selector("repository")?;
        let mut a = Attestation::new(format!("repo/{repository}"));
        for name in REQUIRED {
            let v = jwt.claim_selector(name)?;
            a = a.selector("github", name, &v).claim(name, v.as_str());
        }
        for name in OPTIONAL {
            if let Some(v) = jwt.optional_selector(name)? {
                a = a.selector("github", name, &v).claim(name, v.as_str());
            }
        }
        a = a.claim("key_bound", jwt.key_bound);
        Ok(a.single_use(&jwt.replay_id(), jwt.usable_until()))
    }
}

attestor!(GithubOidc);
