//! `aws_iid`: attests an EC2 instance by its instance identity document.
//!
//! Evidence: `{"document": "<the document's JSON text>", "signature":
//! "<base64>"}` from `/latest/dynamic/instance-identity/{document,
//! signature}` (RSA-SHA256), or `{"pkcs7": "<base64 DER>"}` from
//! `…/rsa2048` (a PKCS#7 SignedData carrying the document). Either is
//! verified in the host against the trust source's `certificates`: the AWS
//! public certificate of the region. The DSA-signed `pkcs7` variant is not
//! supported (no DSA in the host's crypto).
//!
//! Settings: `max_age_seconds` (default 3600) refuses documents whose
//! `pendingTime` (the instance's launch) is older, and each document is
//! good for one issuance until then: an instance bootstraps once, as a
//! SPIRE agent does with this method. Selectors (`aws:<name>:<value>`):
//! `account`, `region`, `instance_id`, `image_id`, `instance_type`, `az`.

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

const DEFAULT_MAX_AGE: i64 = 3600;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Evidence {
    #[serde(default)]
    document: Option<String>,
    #[serde(default)]
    signature: Option<String>,
    #[serde(default)]
    pkcs7: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    account_id: String,
    region: String,
    instance_id: String,
    image_id: String,
    pending_time: String,
    #[serde(default)]
    instance_type: Option<String>,
    #[serde(default)]
    availability_zone: Option<String>,
}

pub struct AwsIid;

fn b64(s: &str, what: &str) -> Result<Vec<u8>, Error> {
    let clean: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(clean)
        .map_err(|_| Error::malformed(format!("{what} is not base64")))
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SSZ`.
fn parse_time(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return None;
    }
    let n = |r: core::ops::Range<usize>| t.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

fn usable(v: &str, what: &str) -> Result<(), Error> {
    if v.is_empty() || v.len() > 128 || v.chars().any(|c| c.is_control() || c == ':') {
        return Err(Error::rejected(format!("`{what}` is not a usable value")));
    }
    Ok(())
}

impl Attestor for AwsIid {
    type Config = TrustSources;

    fn attest(evidence: &str, config: TrustSources, _context: &Context) -> Result<Attestation, Error> {
        let e: Evidence = castellan_attestor_sdk::json_evidence(evidence)?;
        let sources: Vec<_> = config
            .trust_sources
            .iter()
            .filter_map(|s| s.cert_set.as_deref().map(|c| (s, c)))
            .collect();
        if sources.is_empty() {
            return Err(Error::NoTrustSource(
                "no aws_iid trust source has certificates".into(),
            ));
        }
        // Verify with each source's certificates until one vouches for it.
        let (doc_bytes, source) = {
            let mut last = Error::rejected("no trust source verifies the document");
            let mut found = None;
            for (source, cert_set) in &sources {
                let result = match (&e.pkcs7, &e.document, &e.signature) {
                    (Some(p7), doc, None) => {
                        let der = b64(p7, "pkcs7")?;
                        host::verify_pkcs7(cert_set, &der).and_then(|content| match doc {
                            Some(d) if d.as_bytes() != content.as_slice() => {
                                Err(Error::rejected("document does not match the PKCS#7 content"))
                            }
                            _ => Ok(content),
                        })
                    }
                    (None, Some(doc), Some(sig)) => {
                        let sig = b64(sig, "signature")?;
                        host::verify_with_certificates(cert_set, "rsa-pkcs1-sha256", doc.as_bytes(), &sig)
                            .map(|()| doc.as_bytes().to_vec())
                    }
                    _ => {
                        return Err(Error::malformed("give `document` with `signature`, or `pkcs7`"));
                    }
                };
                match result {
                    Ok(doc) => {
                        found = Some((doc, *source));
                        break;
                    }
                    Err(err) => last = err,
                }
            }
            found.ok_or(last)?
        };
        let doc: Document = serde_json::from_slice(&doc_bytes)
            .map_err(|_| Error::malformed("document is not an instance identity document"))?;
        for (v, what) in [
            (&doc.account_id, "accountId"),
            (&doc.region, "region"),
            (&doc.instance_id, "instanceId"),
            (&doc.image_id, "imageId"),
        ] {
            usable(v, what)?;
        }
        let pending = parse_time(&doc.pending_time)
            .ok_or_else(|| Error::malformed("pendingTime is not a UTC timestamp"))?;
        let max_age = source
            .settings
            .get("max_age_seconds")
            .and_then(|v| v.as_i64())
            .unwrap_or(DEFAULT_MAX_AGE);
        let now = host::now();
        if now - pending > max_age {
            return Err(Error::rejected(format!(
                "the document is older than {max_age} s (pendingTime {})",
                doc.pending_time
            )));
        }
        if pending > now + 300 {
            return Err(Error::rejected("pendingTime is in the future"));
        }
        // The document is what is used once, however it is wrapped: PKCS#7
        // has unsigned parts (signer id, algorithm sets) that can change
        // without breaking the signature.
        let digest = host::sha256(&doc_bytes);
        let id: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let mut a = Attestation::new(format!("account/{}/instance/{}", doc.account_id, doc.instance_id))
            .selector("aws", "account", &doc.account_id)
            .selector("aws", "region", &doc.region)
            .selector("aws", "instance_id", &doc.instance_id)
            .selector("aws", "image_id", &doc.image_id)
            .claim("account", doc.account_id.as_str())
            .claim("region", doc.region.as_str())
            .claim("instance_id", doc.instance_id.as_str())
            .claim("image_id", doc.image_id.as_str())
            .claim("pending_time", doc.pending_time.as_str())
            .claim("trust_source", source.name.as_str());
        if let Some(t) = doc
            .instance_type
            .as_deref()
            .filter(|t| usable(t, "instanceType").is_ok())
        {
            a = a.selector("aws", "instance_type", t).claim("instance_type", t);
        }
        if let Some(z) = doc
            .availability_zone
            .as_deref()
            .filter(|z| usable(z, "availabilityZone").is_ok())
        {
            a = a.selector("aws", "az", z).claim("availability_zone", z);
        }
        Ok(a.single_use(&format!("doc:{id}"), pending + max_age))
    }
}

attestor!(AwsIid);

#[cfg(test)]
mod tests {
    use super::parse_time;

    #[test]
    fn parses_aws_timestamps() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_time("2016-11-19T16:32:11Z"), Some(1_479_573_131));
        assert_eq!(parse_time("2024-02-29T23:59:59Z"), Some(1_709_251_199));
        for bad in [
            "",
            "2016-11-19 16:32:11Z",
            "2016-13-19T16:32:11Z",
            "2016-11-19T16:32:11+01:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
