//! Builders for TPM structures, so unit tests make their own fixtures.

use super::*;

/// The attributes of an AK from the TCG template: fixedTPM, fixedParent,
/// sensitiveDataOrigin, userWithAuth, restricted, sign.
pub const AK_ATTRIBUTES: u32 = attributes::FIXED_TPM
    | attributes::FIXED_PARENT
    | attributes::SENSITIVE_DATA_ORIGIN
    | (1 << 6)
    | attributes::RESTRICTED
    | attributes::SIGN;

/// A TPM2B_PUBLIC for an RSA key.
pub fn rsa_public(
    attributes: u32,
    symmetric: Option<(u16, u16, u16)>,
    scheme: Option<(u16, u16)>,
    modulus: &[u8],
) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&ALG_RSA.to_be_bytes());
    t.extend_from_slice(&ALG_SHA256.to_be_bytes());
    t.extend_from_slice(&attributes.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    push_symmetric(&mut t, symmetric);
    push_scheme(&mut t, scheme);
    t.extend_from_slice(&((modulus.len() * 8) as u16).to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.extend_from_slice(&tpm2b(modulus).unwrap());
    tpm2b(&t).unwrap()
}

/// A TPM2B_PUBLIC for a P-256 key with the given uncompressed point.
pub fn ecc_public(attributes: u32, scheme: Option<(u16, u16)>, point: &[u8]) -> Vec<u8> {
    ecc_public_with(attributes, None, scheme, point)
}

/// A TPM2B_PUBLIC for a P-256 EK (AES-128-CFB symmetric, as template L-2)
/// with the given uncompressed point.
pub fn ecc_ek_public(attributes: u32, point: &[u8]) -> Vec<u8> {
    ecc_public_with(attributes, Some((ALG_AES, 128, ALG_CFB)), None, point)
}

fn ecc_public_with(
    attributes: u32,
    symmetric: Option<(u16, u16, u16)>,
    scheme: Option<(u16, u16)>,
    point: &[u8],
) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&ALG_ECC.to_be_bytes());
    t.extend_from_slice(&ALG_SHA256.to_be_bytes());
    t.extend_from_slice(&attributes.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    push_symmetric(&mut t, symmetric);
    push_scheme(&mut t, scheme);
    t.extend_from_slice(&ECC_NIST_P256.to_be_bytes());
    push_scheme(&mut t, None);
    t.extend_from_slice(&tpm2b(&point[1..33]).unwrap());
    t.extend_from_slice(&tpm2b(&point[33..65]).unwrap());
    tpm2b(&t).unwrap()
}

/// A TPMS_ATTEST quote over SHA-256 PCRs selected by `bitmap`.
pub fn quote_attest(nonce: &[u8], bitmap: &[u8], pcr_digest: &[u8]) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&TPM_GENERATED_VALUE.to_be_bytes());
    a.extend_from_slice(&ST_ATTEST_QUOTE.to_be_bytes());
    a.extend_from_slice(&tpm2b(&[0x00, 0x0b, 1, 2, 3]).unwrap());
    a.extend_from_slice(&tpm2b(nonce).unwrap());
    a.extend_from_slice(&1234u64.to_be_bytes());
    a.extend_from_slice(&5u32.to_be_bytes());
    a.extend_from_slice(&6u32.to_be_bytes());
    a.push(1);
    a.extend_from_slice(&0x2019_1023u64.to_be_bytes());
    a.extend_from_slice(&1u32.to_be_bytes());
    a.extend_from_slice(&ALG_SHA256.to_be_bytes());
    a.push(bitmap.len() as u8);
    a.extend_from_slice(bitmap);
    a.extend_from_slice(&tpm2b(pcr_digest).unwrap());
    a
}

/// A TPMT_SIGNATURE for ECDSA-SHA256 from a fixed-size r || s.
pub fn ecdsa_signature(rs: &[u8]) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&ALG_ECDSA.to_be_bytes());
    s.extend_from_slice(&ALG_SHA256.to_be_bytes());
    s.extend_from_slice(&tpm2b(&rs[..32]).unwrap());
    s.extend_from_slice(&tpm2b(&rs[32..]).unwrap());
    s
}

fn push_symmetric(t: &mut Vec<u8>, symmetric: Option<(u16, u16, u16)>) {
    match symmetric {
        None => t.extend_from_slice(&ALG_NULL.to_be_bytes()),
        Some((alg, bits, mode)) => {
            for v in [alg, bits, mode] {
                t.extend_from_slice(&v.to_be_bytes());
            }
        }
    }
}

fn push_scheme(t: &mut Vec<u8>, scheme: Option<(u16, u16)>) {
    match scheme {
        None => t.extend_from_slice(&ALG_NULL.to_be_bytes()),
        Some((alg, hash)) => {
            t.extend_from_slice(&alg.to_be_bytes());
            t.extend_from_slice(&hash.to_be_bytes());
        }
    }
}
