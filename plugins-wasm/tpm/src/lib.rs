//! `tpm`: attests a machine by its TPM 2.0.
//!
//! The client first asks `POST /api/v1/attestation/challenges` with
//! `{"method": "tpm", "ek_certificate", "ek_public", "ak_public"}` (base64
//! DER and TPM2B_PUBLIC). The host checks that the certificate certifies
//! that EK and answers with a nonce and a credential (MakeCredential to the
//! EK for the AK's Name). The client activates the credential in its TPM
//! (only the TPM holding the EK, with that AK loaded, can) and quotes PCRs
//! over the nonce. The evidence is `{"challenge_id", "activated_secret",
//! "attest", "signature", "pcrs": {"<index>": "<hex sha256 value>"}}`.
//!
//! This module checks: the EK certificate chains to the trust source's
//! `certificates` (the TPM manufacturers' roots) or, for a TPM without one
//! (the challenge then carries only the EK public area), the trust source
//! enrolls the EK's hash in `settings.enrolled_ek_sha256`; the activated secret is
//! the one the host wrapped; the quote is signed by that AK over that
//! nonce and covers exactly the PCR values given; and the PCR values match
//! the trust source's `settings.pcr_policy` (`{"<index>": "<hex>"}`) if it
//! has one. The host took the challenge before this module ran, so a
//! nonce is answered once. When the request certifies a key, the quote's
//! qualifying data must be SHA-256(nonce || SHA-256 of the key's DER
//! SubjectPublicKeyInfo): the quote is bound to that key. Selectors
//! (`tpm:<name>:<value>`): `ek_sha256` (of the EK public area), `pcr`
//! (`<index>:<hex>`), `ca` (the trust source), `ek_trust` (`certificate` or
//! `enrolled`: how that source vouched for the EK).

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use castellan_attestor_sdk::base64::Engine as _;
use castellan_attestor_sdk::base64::engine::general_purpose::STANDARD;
use castellan_attestor_sdk::serde_json::Value;
use castellan_attestor_sdk::{
    Attestation, Attestor, Context, Error, TrustSources, attestor, host, serde_json,
};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    challenge_id: String,
    activated_secret: String,
    attest: String,
    signature: String,
    pcrs: BTreeMap<String, String>,
}

pub struct Tpm;

fn b64(s: &str, what: &str) -> Result<Vec<u8>, Error> {
    STANDARD
        .decode(s.trim())
        .map_err(|_| Error::malformed(format!("`{what}` is not base64")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn context_str<'a>(challenge: &'a castellan_attestor_sdk::Challenge, key: &str) -> Result<&'a str, Error> {
    challenge
        .extra
        .get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| Error::rejected("the challenge is not a TPM challenge"))
}

impl Attestor for Tpm {
    type Config = TrustSources;

    fn attest(evidence: &str, config: TrustSources, context: &Context) -> Result<Attestation, Error> {
        let e: Evidence = castellan_attestor_sdk::json_evidence(evidence)?;
        let challenge = context
            .challenge
            .as_ref()
            .filter(|c| c.id == e.challenge_id)
            .ok_or_else(|| Error::rejected("the evidence answers no live challenge"))?;
        // The credential: only the TPM with the certified EK could unwrap it.
        let secret = b64(&e.activated_secret, "activated_secret")?;
        if hex(&host::sha256(&secret)) != context_str(challenge, "secret_sha256")? {
            return Err(Error::rejected(
                "the activated secret is not the one issued: this TPM does not hold the certified EK",
            ));
        }
        // Absent when the client had no EK certificate: then only an
        // enrolling trust source can vouch for the EK.
        let ek_cert = match challenge.extra.get("ek_certificate").and_then(Value::as_str) {
            Some(text) => Some(b64(text, "ek_certificate")?),
            None => None,
        };
        let ak_public = b64(context_str(challenge, "ak_public")?, "ak_public")?;
        let ek_sha256 = context_str(challenge, "ek_public_sha256")?;
        // Bound to the key being certified: the quote's qualifying data is
        // SHA-256(nonce || SHA-256(SubjectPublicKeyInfo)) when the request
        // certifies a key, the bare nonce otherwise.
        let mut nonce = b64(&challenge.nonce, "nonce")?;
        if let Some(key) = context.key_sha256.as_deref() {
            let key = unhex(key).ok_or_else(|| Error::Config("key_sha256 is not hex".into()))?;
            nonce.extend_from_slice(&key);
            nonce = host::sha256(&nonce);
        }
        if e.pcrs.is_empty() || e.pcrs.len() > 24 {
            return Err(Error::malformed("give the values of 1 to 24 quoted PCRs"));
        }
        let mut pcrs = Vec::new();
        for (index, value) in &e.pcrs {
            let i: u32 = index
                .parse()
                .ok()
                .filter(|i| *i < 24)
                .ok_or_else(|| Error::malformed("PCR indices are 0 to 23"))?;
            let v = unhex(value).ok_or_else(|| Error::malformed("PCR values are hex"))?;
            pcrs.push((i, v));
        }
        let attest = b64(&e.attest, "attest")?;
        let signature = b64(&e.signature, "signature")?;
        host::verify_tpm_quote(&ak_public, &attest, &signature, &nonce, &pcrs)?;

        let mut last = Error::NoTrustSource("no tpm trust source has certificates or enrolled EKs".into());
        for source in &config.trust_sources {
            let vouched = match (&ek_cert, source.cert_set.as_deref()) {
                (Some(cert), Some(cert_set)) => {
                    match host::verify_chain(cert_set, core::slice::from_ref(cert), "tpm-ek") {
                        Ok(_) => Some("certificate"),
                        Err(err) => {
                            last = err;
                            None
                        }
                    }
                }
                _ => None,
            };
            let vouched = vouched.or_else(|| enrolls(source, ek_sha256).then_some("enrolled"));
            let Some(vouched) = vouched else {
                if ek_cert.is_none() {
                    last = Error::rejected(
                        "the TPM sent no EK certificate and no tpm trust source enrolls its EK",
                    );
                }
                continue;
            };
            if let Some(policy) = source.settings.get("pcr_policy").and_then(Value::as_object) {
                for (index, want) in policy {
                    let got = index
                        .parse::<u32>()
                        .ok()
                        .and_then(|i| pcrs.iter().find(|(n, _)| *n == i))
                        .map(|(_, v)| hex(v));
                    let want = want.as_str().unwrap_or_default().to_ascii_lowercase();
                    if got.as_deref() != Some(want.as_str()) {
                        return Err(Error::rejected(format!(
                            "PCR {index} does not match the trust source's pcr_policy"
                        )));
                    }
                }
            }
            let mut a = Attestation::new(format!("ek/{ek_sha256}"))
                .selector("tpm", "ek_sha256", ek_sha256)
                .selector("tpm", "ca", &source.name)
                .selector("tpm", "ek_trust", vouched)
                .claim("ek_sha256", ek_sha256)
                .claim("ek_trust", vouched)
                .claim("trust_source", source.name.as_str());
            let mut values = serde_json::Map::new();
            for (i, v) in &pcrs {
                a = a.selector("tpm", "pcr", &format!("{i}:{}", hex(v)));
                values.insert(format!("{i}"), Value::String(hex(v)));
            }
            return Ok(a.claim("pcrs", Value::Object(values)));
        }
        Err(last)
    }
}

/// Whether `source` lists the EK (its public area's SHA-256, hex) in
/// `settings.enrolled_ek_sha256`: trusted without a manufacturer's
/// certificate because an operator recorded it from the machine.
fn enrolls(source: &castellan_attestor_sdk::TrustSourceConfig, ek_sha256: &str) -> bool {
    source
        .settings
        .get("enrolled_ek_sha256")
        .and_then(Value::as_array)
        .is_some_and(|list| {
            list.iter()
                .filter_map(Value::as_str)
                .any(|d| d.eq_ignore_ascii_case(ek_sha256))
        })
}

attestor!(Tpm);
