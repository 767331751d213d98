//! `x509pop`: attests a host by an X.509 certificate it already has and a
//! signature, with that certificate's key, over a server challenge.
//!
//! The client asks `POST /api/v1/attestation/challenges {"method":
//! "x509pop"}` for a nonce, then sends `{"challenge_id", "certificates":
//! [base64 DER, leaf first], "algorithm", "signature": base64}` where the
//! signature covers the UTF-8 text
//!
//! ```text
//! castellan-x509pop-v1\n<nonce>\n<key_sha256>\n
//! ```
//!
//! `<key_sha256>` is the hex SHA-256 of the DER SubjectPublicKeyInfo of the
//! key being certified (empty when the request certifies no key), which
//! binds the proof to that key. The host takes the challenge before this
//! module runs, so an answer is never accepted twice. The chain must reach
//! a root in the trust source's `certificates` for client authentication.
//! Selectors (`x509pop:<name>:<value>`): `cn`, `dns`, `uri`, `fingerprint`
//! (hex SHA-256 of the leaf) and `ca` (the trust source's name).

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use castellan_attestor_sdk::base64::Engine as _;
use castellan_attestor_sdk::base64::engine::general_purpose::STANDARD;
use castellan_attestor_sdk::{
    Attestation, Attestor, Context, Error, TrustSources, attestor, host, serde_json,
};
use serde::Deserialize;

/// Most DNS and URI names a certificate may carry. Each becomes a selector
/// and the DNS names a claim; beyond this the answer would pass the host's
/// limits (256 selectors, 64 KiB of claims). Such a certificate is refused:
/// dropping names could hide one a policy denies.
const MAX_NAMES: usize = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    challenge_id: String,
    certificates: Vec<String>,
    algorithm: String,
    signature: String,
}

pub struct X509Pop;

/// The text the client signs.
pub fn signed_message(nonce: &str, key_sha256: Option<&str>) -> String {
    format!(
        "castellan-x509pop-v1\n{nonce}\n{}\n",
        key_sha256.unwrap_or_default()
    )
}

fn fit(v: &str) -> bool {
    !v.is_empty() && v.len() <= 256 && !v.chars().any(char::is_control)
}

impl Attestor for X509Pop {
    type Config = TrustSources;

    fn attest(evidence: &str, config: TrustSources, context: &Context) -> Result<Attestation, Error> {
        let e: Evidence = castellan_attestor_sdk::json_evidence(evidence)?;
        let challenge = context
            .challenge
            .as_ref()
            .filter(|c| c.id == e.challenge_id)
            .ok_or_else(|| Error::rejected("the evidence answers no live challenge"))?;
        if e.certificates.is_empty() || e.certificates.len() > 8 {
            return Err(Error::malformed("give 1 to 8 certificates, leaf first"));
        }
        let chain = e
            .certificates
            .iter()
            .map(|c| STANDARD.decode(c.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| Error::malformed("a certificate is not base64"))?;
        let signature = STANDARD
            .decode(e.signature.trim())
            .map_err(|_| Error::malformed("signature is not base64"))?;
        let message = signed_message(&challenge.nonce, context.key_sha256.as_deref());
        let mut last = Error::NoTrustSource("no x509pop trust source has certificates".into());
        for source in &config.trust_sources {
            let Some(cert_set) = source.cert_set.as_deref() else {
                continue;
            };
            let leaf = match host::verify_chain(cert_set, &chain, "client-auth") {
                Ok(leaf) => leaf,
                Err(err) => {
                    last = err;
                    continue;
                }
            };
            host::verify_signature(&e.algorithm, &leaf.public_key, message.as_bytes(), &signature)?;
            if leaf.dns_names.len() + leaf.uris.len() > MAX_NAMES {
                return Err(Error::rejected(format!(
                    "the certificate has more than {MAX_NAMES} DNS and URI names"
                )));
            }
            let subject = if fit(&leaf.common_name) {
                format!("cn/{}", leaf.common_name)
            } else {
                format!("fingerprint/{}", leaf.fingerprint)
            };
            let mut a = Attestation::new(subject)
                .selector("x509pop", "fingerprint", &leaf.fingerprint)
                .selector("x509pop", "ca", &source.name)
                .claim("fingerprint", leaf.fingerprint.as_str())
                .claim("trust_source", source.name.as_str())
                .claim("key_bound", context.key_sha256.is_some());
            if fit(&leaf.common_name) {
                a = a
                    .selector("x509pop", "cn", &leaf.common_name)
                    .claim("common_name", leaf.common_name.as_str());
            }
            let dns: Vec<&String> = leaf.dns_names.iter().filter(|d| fit(d)).collect();
            for d in &dns {
                a = a.selector("x509pop", "dns", d);
            }
            for u in leaf.uris.iter().filter(|u| fit(u)) {
                a = a.selector("x509pop", "uri", u);
            }
            return Ok(a.claim("dns_names", serde_json::to_value(&dns).unwrap_or_default()));
        }
        Err(last)
    }
}

attestor!(X509Pop);
