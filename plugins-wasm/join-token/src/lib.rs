//! `join_token`: attests a host by a one-time token an admin created for it
//! (`POST /api/v1/join-tokens`). The token is a JWT signed by Castellan's
//! own key and verified through the built-in `castellan-join-tokens` trust
//! source; its `sub` names the host. It is good for one use: the `jti` is
//! spent at the first attestation (durably, across restarts).

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;

use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};

pub struct JoinToken;

impl Attestor for JoinToken {
    type Config = JwtTrustSources;

    fn attest(evidence: &str, config: JwtTrustSources, _context: &Context) -> Result<Attestation, Error> {
        let jwt = config.verify(evidence)?;
        let name = jwt.claim_selector("sub")?;
        let jti = jwt.claim_selector("jti")?;
        Ok(Attestation::new(format!("host/{name}"))
            .selector("join_token", "name", &name)
            .claim("name", name.as_str())
            .claim("jti", jti.as_str())
            .single_use(&format!("jti:{jti}"), jwt.usable_until()))
    }
}

attestor!(JoinToken);
