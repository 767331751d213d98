//! `gcp_iit`: attests a Google Compute Engine instance by its instance
//! identity token (the metadata server's `identity?audience=…&format=full`).
//!
//! The host checks the signature against the trust source's JWKS (Google's
//! certificates as a JWKS); the SDK checks issuer, audience and lifetime.
//! `format=full` is required: the `google.compute_engine` claim gives the
//! project id, zone, instance id and name, which become selectors
//! (`gcp:<name>:<value>`) and claims. A token is good for one issuance.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};

use castellan_attestor_sdk::serde_json::Value;
use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};

const FIELDS: &[&str] = &["project_id", "zone", "instance_id", "instance_name"];

pub struct GcpIit;

/// A field of `google.compute_engine` as a selector value (ids may be
/// numbers or strings).
fn field(ce: &Value, name: &str) -> Result<String, Error> {
    let v = match ce.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(Error::rejected(format!(
                "google.compute_engine has no `{name}` (request the token with format=full)"
            )));
        }
    };
    if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
        return Err(Error::rejected(format!("`{name}` is not a usable value")));
    }
    Ok(v)
}

impl Attestor for GcpIit {
    type Config = JwtTrustSources;

    fn attest(evidence: &str, config: JwtTrustSources, context: &Context) -> Result<Attestation, Error> {
        let jwt = config.verify_bound(evidence, context)?;
        let ce = jwt
            .claims
            .get("google")
            .and_then(|g| g.get("compute_engine"))
            .ok_or_else(|| {
                Error::rejected("no google.compute_engine claim (request the token with format=full)")
            })?;
        let project = field(ce, "project_id")?;
        let instance = field(ce, "instance_id")?;
        let mut a = Attestation::new(format!("project/{project}/instance/{instance}"));
        for name in FIELDS {
            let v = field(ce, name)?;
            a = a.selector("gcp", name, &v).claim(name, v.as_str());
        }
        if let Some(sa) = jwt.optional_selector("email")? {
            a = a
                .selector("gcp", "service_account", &sa)
                .claim("service_account", sa.as_str());
        }
        a = a.claim("key_bound", jwt.key_bound);
        Ok(a.single_use(&jwt.replay_id(), jwt.usable_until()))
    }
}

attestor!(GcpIit);
