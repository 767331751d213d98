//! Endorsement key certificates: does an EK certificate certify the EK whose
//! public area the client sent, and does it chain to a manufacturer root the
//! operator configured?
//!
//! EK certificates are not TLS certificates. They often have an empty or
//! placeholder subject with the TPM's identity in a critical
//! subjectAltName directoryName, a subjectDirectoryAttributes extension with
//! the TPM specification, and either no EKU or the TCG EK EKU
//! (2.23.133.8.1). The chain check below uses webpki, which accepts all of
//! these; its one concession is the EKU, which must be the TCG one when
//! present and may be absent. Key usage and the subject are not checked:
//! the binding that matters is the EK key itself, which `check_ek_matches`
//! compares bit for bit.

use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::public_key::PublicKey as SpkiKey;

use crate::errors::{Error, Result};
use crate::wire::{self, PublicKey};

/// tcg-kp-EKCertificate (2.23.133.8.1), DER-encoded OID value.
pub const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];

/// The DER certificate at the start of `bytes`, without the padding that NV
/// indices often have after it.
pub fn trim_der(bytes: &[u8]) -> Result<&[u8]> {
    let bad = |detail: &str| Error::Certificate(detail.to_owned());
    let (&tag, rest) = bytes.split_first().ok_or_else(|| bad("empty"))?;
    if tag != 0x30 {
        return Err(bad("does not start with a DER SEQUENCE"));
    }
    let (&first, rest) = rest.split_first().ok_or_else(|| bad("truncated length"))?;
    let (len, header) = match first {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (
            usize::from(*rest.first().ok_or_else(|| bad("truncated length"))?),
            3,
        ),
        0x82 => {
            let [hi, lo] = rest
                .get(..2)
                .and_then(|s| <[u8; 2]>::try_from(s).ok())
                .ok_or_else(|| bad("truncated length"))?;
            (usize::from(u16::from_be_bytes([hi, lo])), 4)
        }
        _ => return Err(bad("unsupported DER length")),
    };
    bytes.get(..header + len).ok_or_else(|| bad("truncated"))
}

/// Checks that the certificate `cert_der` certifies the key of `ek`.
pub fn check_ek_matches(cert_der: &[u8], ek: &wire::Public) -> Result<()> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| Error::Certificate(e.to_string()))?;
    let spki = cert
        .public_key()
        .parsed()
        .map_err(|e| Error::Certificate(format!("subject public key: {e}")))?;
    let matches = match (&spki, &ek.key) {
        (
            SpkiKey::RSA(cert_key),
            PublicKey::Rsa {
                exponent, modulus, ..
            },
        ) => {
            strip(cert_key.modulus) == strip(modulus)
                && strip(cert_key.exponent) == strip(&exponent.to_be_bytes())
        }
        (SpkiKey::EC(point), PublicKey::Ecc { x, y, .. }) => {
            // An uncompressed point: 0x04 || x || y, each the field size.
            let data = point.data();
            let half = data.len().saturating_sub(1) / 2;
            data.first() == Some(&0x04)
                && data.len() == 1 + 2 * half
                && strip(&data[1..1 + half]) == strip(x)
                && strip(&data[1 + half..]) == strip(y)
        }
        _ => false,
    };
    if matches { Ok(()) } else { Err(Error::EkMismatch) }
}

/// Verifies that `cert_der` chains through `intermediates` to one of
/// `roots` (all DER) at `now`.
pub fn verify_ek_chain(
    cert_der: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: UnixTime,
) -> Result<()> {
    let cert = CertificateDer::from(cert_der);
    let end_entity = webpki::EndEntityCert::try_from(&cert).map_err(|e| Error::Certificate(e.to_string()))?;
    let root_ders: Vec<CertificateDer<'_>> =
        roots.iter().map(|r| CertificateDer::from(r.as_slice())).collect();
    let anchors = root_ders
        .iter()
        .map(|der| {
            webpki::anchor_from_trusted_cert(der)
                .map_err(|e| Error::Certificate(format!("manufacturer root: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    end_entity
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| Error::UntrustedEk(e.to_string()))
}

fn strip(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}
