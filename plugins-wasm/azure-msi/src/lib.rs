//! `azure_msi`: attests an Azure resource by an access token for its
//! managed identity (IMDS `metadata/identity/oauth2/token?resource=…`).
//!
//! The host checks the signature against the trust source's JWKS (the
//! tenant's signing keys); the SDK checks issuer (`https://sts.windows.net/
//! <tenant>/`), audience (the resource) and lifetime. Selectors
//! (`azure:<name>:<value>`): `tenant` (`tid`), `principal_id` (`oid`), and
//! `subscription` and `resource_group` from `xms_mirid`, the resource id of
//! the identity. A token is good for one issuance: fetch a fresh one.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};

use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};

pub struct AzureMsi;

/// The value after `/{key}/` in an Azure resource id (keys compare without
/// case, as Azure's do).
fn resource_part(resource_id: &str, key: &str) -> Option<String> {
    let mut parts = resource_id.split('/');
    while let Some(p) = parts.next() {
        if p.eq_ignore_ascii_case(key) {
            return parts.next().filter(|v| !v.is_empty()).map(ToString::to_string);
        }
    }
    None
}

impl Attestor for AzureMsi {
    type Config = JwtTrustSources;

    fn attest(evidence: &str, config: JwtTrustSources, _context: &Context) -> Result<Attestation, Error> {
        let jwt = config.verify(evidence)?;
        let tenant = jwt.claim_selector("tid")?;
        let principal = jwt.claim_selector("oid")?;
        let mirid = jwt.claim_selector("xms_mirid")?;
        let subscription = resource_part(&mirid, "subscriptions")
            .ok_or_else(|| Error::rejected("xms_mirid names no subscription"))?;
        let resource_group = resource_part(&mirid, "resourcegroups")
            .ok_or_else(|| Error::rejected("xms_mirid names no resource group"))?;
        Ok(Attestation::new(format!("tenant/{tenant}/principal/{principal}"))
            .selector("azure", "tenant", &tenant)
            .selector("azure", "principal_id", &principal)
            .selector("azure", "subscription", &subscription)
            .selector("azure", "resource_group", &resource_group)
            .claim("tenant", tenant.as_str())
            .claim("principal_id", principal.as_str())
            .claim("subscription", subscription.as_str())
            .claim("resource_group", resource_group.as_str())
            .claim("resource_id", mirid.as_str())
            .single_use(&jwt.replay_id(), jwt.usable_until()))
    }
}

attestor!(AzureMsi);

#[cfg(test)]
mod tests {
    use super::resource_part;

    #[test]
    fn resource_ids_are_read_without_case() {
        let id = "/subscriptions/s-1/resourceGroups/rg-a/providers/Microsoft.Compute/virtualMachines/vm";
        assert_eq!(resource_part(id, "subscriptions").as_deref(), Some("s-1"));
        assert_eq!(resource_part(id, "resourcegroups").as_deref(), Some("rg-a"));
        assert_eq!(resource_part("/subscriptions/", "subscriptions"), None);
    }
}
