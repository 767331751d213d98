//! CSRs: the one place a requester's public key enters. Only the key of a
//! CSR whose self-signature verifies is used; nothing else in it is.

use x509_parser::prelude::FromDer;

use super::EngineError;

/// Longest CSR accepted, in PEM characters.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// A verified CSR: its public key and nothing else from it is used.
pub struct VerifiedCsr {
    pub spki_der: Vec<u8>,
}

/// Parses a PEM CSR, verifies its self-signature and checks its key.
pub fn verify_csr(pem_text: &str) -> Result<VerifiedCsr, EngineError> {
    let bad = |m: &str| EngineError::BadCsr(format!("csr: {m}"));
    if pem_text.len() > MAX_CSR_BYTES {
        return Err(bad("too large"));
    }
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|_| bad("not PEM"))?;
    if pem.label != "CERTIFICATE REQUEST" && pem.label != "NEW CERTIFICATE REQUEST" {
        return Err(bad("PEM block is not a CERTIFICATE REQUEST"));
    }
    let (rest, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
        .map_err(|_| bad("not a PKCS#10 certification request"))?;
    if !rest.is_empty() {
        return Err(bad("trailing data after the request"));
    }
    csr.verify_signature()
        .map_err(|_| bad("signature does not verify with the request's own key"))?;
    let spki = &csr.certification_request_info.subject_pki;
    check_public_key(spki).map_err(|m| bad(&m))?;
    Ok(VerifiedCsr {
        spki_der: spki.raw.to_vec(),
    })
}

/// Accepts EC P-256/P-384, Ed25519 and RSA of 2048 to 8192 bits.
fn check_public_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), String> {
    use x509_parser::public_key::PublicKey;
    match spki
        .parsed()
        .map_err(|_| "public key does not parse".to_owned())?
    {
        PublicKey::EC(point) => match point.key_size() {
            256 | 384 => Ok(()),
            n => Err(format!("EC keys must be P-256 or P-384, not {n} bits")),
        },
        PublicKey::RSA(rsa) => match rsa.key_size() {
            2048..=8192 => Ok(()),
            n => Err(format!("RSA keys must be 2048 to 8192 bits, not {n}")),
        },
        PublicKey::Unknown(_) if spki.algorithm.algorithm.to_id_string() == "1.3.101.112" => Ok(()),
        _ => Err("key type not accepted (EC P-256/P-384, Ed25519 or RSA)".into()),
    }
}
