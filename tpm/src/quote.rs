//! Quote verification: the signature over TPMS_ATTEST with the attestation
//! key, the nonce, and the PCR values against the quoted PCR digest.
//!
//! This does not decide whether the AK belongs to a genuine TPM: that is the
//! job of credential activation against a certified EK (see `credential` and
//! `ek`). It does refuse AKs that are not restricted, TPM-bound signing keys,
//! because an unrestricted key can sign a forged TPMS_ATTEST that starts with
//! TPM_GENERATED_VALUE.

use std::collections::BTreeMap;

use ring::signature::{self as sig, UnparsedPublicKey};

use crate::errors::{Error, Result};
use crate::wire::{self, Attest, PublicKey, Signature, attributes};

/// What a verified quote says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuoteInfo {
    /// The parsed TPMS_ATTEST.
    pub attest: Attest,
    /// The PCR bank that was quoted (a TPM_ALG_ID).
    pub pcr_bank: u16,
}

/// Verifies a quote made by `ak` over `nonce` and the PCR values `pcrs`
/// (index → value in the quoted bank). Every quoted PCR must have a value,
/// and every value must be quoted, so nothing unsigned reaches a policy.
pub fn verify_quote(
    ak: &wire::Public,
    attest: &[u8],
    signature: &[u8],
    nonce: &[u8],
    pcrs: &BTreeMap<u32, Vec<u8>>,
) -> Result<QuoteInfo> {
    let required = attributes::FIXED_TPM
        | attributes::FIXED_PARENT
        | attributes::SENSITIVE_DATA_ORIGIN
        | attributes::RESTRICTED
        | attributes::SIGN;
    if !ak.has_attributes(required) || ak.has_attributes(attributes::DECRYPT) {
        return Err(Error::WeakAttestationKey(ak.attributes));
    }
    let signature = Signature::parse(signature)?;
    verify_signature(ak, attest, &signature)?;

    let parsed = Attest::parse_quote(attest)?;
    // Compared in full: a prefix or a different length is a different nonce.
    if !same_bytes(&parsed.extra_data, nonce) {
        return Err(Error::NonceMismatch);
    }
    let [(pcr_bank, selected)] = parsed.pcr_selection.as_slice() else {
        return Err(Error::Unsupported("a quote over other than exactly one PCR bank"));
    };
    let expected_len = wire::digest_algorithm(*pcr_bank)?.output_len();
    let mut values = Vec::with_capacity(selected.len());
    for pcr in selected {
        let value = pcrs.get(pcr).ok_or(Error::PcrMissing(*pcr))?;
        if value.len() != expected_len {
            return Err(Error::Invalid {
                what: "PCR value",
                detail: format!("PCR {pcr} has {} bytes, the bank {expected_len}", value.len()),
            });
        }
        values.push(value.as_slice());
    }
    if let Some(extra) = pcrs.keys().find(|pcr| !selected.contains(pcr)) {
        return Err(Error::PcrNotQuoted(*extra));
    }
    // The TPM hashes the PCRs with the signing scheme's hash.
    let digest = wire::pcr_digest(signature.hash(), values)?;
    if !same_bytes(&digest, &parsed.pcr_digest) {
        return Err(Error::PcrDigestMismatch);
    }
    let pcr_bank = *pcr_bank;
    Ok(QuoteInfo {
        attest: parsed,
        pcr_bank,
    })
}

/// Checks `signature` over `message` with the public key of `key`.
pub fn verify_signature(key: &wire::Public, message: &[u8], signature: &Signature) -> Result<()> {
    if signature.hash() != wire::ALG_SHA256 {
        return Err(Error::UnsupportedAlgorithm {
            what: "signature hash",
            alg: signature.hash(),
        });
    }
    // A key with a fixed scheme can only have signed with that scheme.
    if let Some((scheme, _)) = key.scheme {
        let used = match signature {
            Signature::Rsa { scheme, .. } => *scheme,
            Signature::Ecdsa { .. } => wire::ALG_ECDSA,
        };
        if scheme != used {
            return Err(Error::BadSignature);
        }
    }
    match (&key.key, signature) {
        (
            PublicKey::Rsa {
                exponent, modulus, ..
            },
            Signature::Rsa { scheme, sig, .. },
        ) => {
            let params: &sig::RsaParameters = match *scheme {
                wire::ALG_RSASSA => &sig::RSA_PKCS1_2048_8192_SHA256,
                _ => &sig::RSA_PSS_2048_8192_SHA256,
            };
            let n = strip_leading_zeros(modulus);
            let e = exponent.to_be_bytes();
            sig::RsaPublicKeyComponents {
                n,
                e: strip_leading_zeros(&e),
            }
            .verify(params, message, sig)
            .map_err(|_| Error::BadSignature)
        }
        (PublicKey::Ecc { curve, x, y, .. }, Signature::Ecdsa { r, s, .. }) => {
            if *curve != wire::ECC_NIST_P256 {
                return Err(Error::UnsupportedAlgorithm {
                    what: "ECC curve",
                    alg: *curve,
                });
            }
            let mut point = vec![0x04];
            point.extend_from_slice(&left_pad::<32>(x, "unique.ecc.x")?);
            point.extend_from_slice(&left_pad::<32>(y, "unique.ecc.y")?);
            let mut rs = left_pad::<32>(r, "signatureR")?.to_vec();
            rs.extend_from_slice(&left_pad::<32>(s, "signatureS")?);
            UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, point)
                .verify(message, &rs)
                .map_err(|_| Error::BadSignature)
        }
        _ => Err(Error::BadSignature),
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A big-endian integer left-padded to `N` bytes.
fn left_pad<const N: usize>(bytes: &[u8], what: &'static str) -> Result<[u8; N]> {
    let bytes = strip_leading_zeros(bytes);
    let mut out = [0; N];
    let start = N.checked_sub(bytes.len()).ok_or(Error::Invalid {
        what,
        detail: format!("{} bytes, at most {N} allowed", bytes.len()),
    })?;
    out[start..].copy_from_slice(bytes);
    Ok(out)
}

/// Comparison without an early exit, so a nonce or digest cannot be
/// guessed byte by byte from timing.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;
