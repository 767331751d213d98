//! Certificate sets: the roots or signing certificates a trust source
//! holds for methods whose evidence is signed with X.509 keys (an AWS
//! instance identity document, an x509pop client certificate, a TPM's EK
//! certificate). Modules name a set; these functions verify against it in
//! the host, so no key material enters the sandbox.

use cms::cert::x509::der::{Decode as _, Encode as _};
use rustls_pki_types::{CertificateDer, UnixTime};

/// The TCG EK certificate purpose (2.23.133.8.1), DER contents of the OID.
const TCG_KP_EK_CERTIFICATE: &[u8] = &[0x67, 0x81, 0x05, 0x08, 0x01];
/// A set holds at most this many certificates.
const MAX_CERTS: usize = 64;
/// A chain handed to `verify_chain` has at most this many certificates.
const MAX_CHAIN: usize = 8;

/// What a verified chain's leaf says.
#[derive(Debug, Clone)]
pub struct VerifiedLeaf {
    pub public_key: Vec<u8>,
    pub common_name: String,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub fingerprint: String,
}

/// Parsed certificates of one trust source.
#[derive(Debug)]
pub struct CertSet {
    certs: Vec<CertificateDer<'static>>,
}

impl CertSet {
    /// Parses a PEM text of one or more certificates.
    pub fn from_pem(pem_text: &str) -> Result<Self, String> {
        let certs = rustls_pemfile::certs(&mut pem_text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("certificates are not PEM: {e}"))?;
        if certs.is_empty() || certs.len() > MAX_CERTS {
            return Err(format!("must hold between 1 and {MAX_CERTS} certificates"));
        }
        for (i, c) in certs.iter().enumerate() {
            x509_parser::parse_x509_certificate(c).map_err(|e| format!("certificate {i}: {e}"))?;
        }
        Ok(Self { certs })
    }

    /// Adds the certificates of `other` (rotation overlap).
    pub fn extend(&mut self, other: CertSet) {
        self.certs.extend(other.certs);
    }

    /// Verifies a signature with any certificate's key.
    pub fn verify_signature(&self, algorithm: &str, message: &[u8], signature: &[u8]) -> Result<(), String> {
        let mut last = String::from("no certificate");
        for c in &self.certs {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(c) else {
                continue;
            };
            match verify_signature(algorithm, cert.public_key().raw, message, signature) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
        }
        Err(format!(
            "no certificate of the trust source verifies the signature ({last})"
        ))
    }

    /// Verifies `chain` (leaf first) to a certificate of the set; returns
    /// what the leaf says.
    pub fn verify_chain(&self, chain: &[Vec<u8>], usage: &str) -> Result<VerifiedLeaf, String> {
        if chain.is_empty() || chain.len() > MAX_CHAIN {
            return Err(format!("a chain has between 1 and {MAX_CHAIN} certificates"));
        }
        let usage = match usage {
            "client-auth" => webpki::KeyUsage::client_auth(),
            "server-auth" => webpki::KeyUsage::server_auth(),
            "tpm-ek" => webpki::KeyUsage::required_if_present(TCG_KP_EK_CERTIFICATE),
            other => {
                return Err(format!(
                    "usage `{}` is not client-auth, server-auth or tpm-ek",
                    other.chars().take(32).collect::<String>()
                ));
            }
        };
        let anchors = self
            .certs
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect::<Vec<_>>();
        let leaf = CertificateDer::from(chain[0].as_slice());
        let intermediates: Vec<CertificateDer<'_>> = chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.as_slice()))
            .collect();
        let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| format!("leaf certificate: {e}"))?;
        ee.verify_for_usage(
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .all,
            &anchors,
            &intermediates,
            UnixTime::now(),
            usage,
            None,
            None,
        )
        .map_err(|e| format!("certificate chain does not verify to the trust source: {e}"))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| e.to_string())?;
        let mut leaf = VerifiedLeaf {
            public_key: cert.public_key().raw.to_vec(),
            common_name: cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .unwrap_or_default()
                .to_owned(),
            dns_names: Vec::new(),
            uris: Vec::new(),
            fingerprint: crate::util::sha256_hex(&chain[0]),
        };
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    x509_parser::extensions::GeneralName::DNSName(d) => leaf.dns_names.push((*d).to_owned()),
                    x509_parser::extensions::GeneralName::URI(u) => leaf.uris.push((*u).to_owned()),
                    _ => {}
                }
            }
        }
        Ok(leaf)
    }

    /// Verifies a CMS SignedData signed with RSA-SHA256 by a certificate of
    /// the set (with or without signed attributes); returns the content.
    pub fn verify_pkcs7(&self, der: &[u8]) -> Result<Vec<u8>, String> {
        use cms::cert::x509::der::asn1::OctetStringRef;
        const SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
        const SHA256: &str = "2.16.840.1.101.3.4.2.1";
        const MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
        const RSA: &[&str] = &["1.2.840.113549.1.1.1", "1.2.840.113549.1.1.11"];
        let bad = |m: &str| format!("PKCS#7: {m}");
        let ci = cms::content_info::ContentInfo::from_der(der).map_err(|e| bad(&e.to_string()))?;
        if ci.content_type.to_string() != SIGNED_DATA {
            return Err(bad("not SignedData"));
        }
        let sd: cms::signed_data::SignedData = ci.content.decode_as().map_err(|e| bad(&e.to_string()))?;
        let content = sd
            .encap_content_info
            .econtent
            .as_ref()
            .ok_or_else(|| bad("no encapsulated content"))?
            .decode_as::<OctetStringRef<'_>>()
            .map_err(|e| bad(&e.to_string()))?
            .as_bytes()
            .to_vec();
        use sha2::Digest as _;
        let digest = sha2::Sha256::digest(&content);
        let mut last = bad("no signer");
        for si in sd.signer_infos.0.iter() {
            if si.digest_alg.oid.to_string() != SHA256
                || !RSA.contains(&si.signature_algorithm.oid.to_string().as_str())
            {
                last = bad("only RSA with SHA-256 is supported");
                continue;
            }
            let signed = match &si.signed_attrs {
                None => content.clone(),
                Some(attrs) => {
                    let md = attrs
                        .iter()
                        .find(|a| a.oid.to_string() == MESSAGE_DIGEST)
                        .and_then(|a| a.values.iter().next())
                        .and_then(|v| v.decode_as::<OctetStringRef<'_>>().ok())
                        .ok_or_else(|| bad("signed attributes have no message digest"))?;
                    if md.as_bytes() != digest.as_slice() {
                        last = bad("message digest does not match the content");
                        continue;
                    }
                    // The signature covers the attributes as a SET OF, not
                    // with the [0] tag they carry inside SignerInfo.
                    attrs.to_der().map_err(|e| bad(&e.to_string()))?
                }
            };
            match self.verify_signature("rsa-pkcs1-sha256", &signed, si.signature.as_bytes()) {
                Ok(()) => return Ok(content),
                Err(e) => last = bad(&e),
            }
        }
        Err(last)
    }
}

/// Verifies `signature` over `message` with a DER SubjectPublicKeyInfo.
pub fn verify_signature(
    algorithm: &str,
    spki_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), String> {
    let alg: &dyn rustls_pki_types::SignatureVerificationAlgorithm = match algorithm {
        "rsa-pkcs1-sha256" => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
        "rsa-pss-sha256" => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        "ecdsa-p256-sha256" => webpki::ring::ECDSA_P256_SHA256,
        "ecdsa-p384-sha384" => webpki::ring::ECDSA_P384_SHA384,
        other => {
            return Err(format!(
                "algorithm `{}` is not supported",
                other.chars().take(32).collect::<String>()
            ));
        }
    };
    use x509_parser::prelude::FromDer as _;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|_| "the public key is not a DER SubjectPublicKeyInfo".to_owned())?;
    alg.verify_signature(&spki.subject_public_key.data, message, signature)
        .map_err(|_| "signature does not verify".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn chains_verify_to_the_set_and_nowhere_else() {
        let (root, root_key) = ca();
        let issuer = rcgen::Issuer::from_ca_cert_der(root.der(), &root_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["host.example".into()]).unwrap();
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = p.signed_by(&leaf_key, &issuer).unwrap();
        let set = CertSet::from_pem(&root.pem()).unwrap();
        let spki = set
            .verify_chain(&[leaf.der().to_vec()], "client-auth")
            .unwrap()
            .public_key;
        // The returned key verifies what the leaf key signs.
        let msg = b"nonce";
        let sig = rcgen::SigningKey::sign(&leaf_key, msg).unwrap();
        verify_signature("ecdsa-p256-sha256", &spki, msg, &sig).unwrap();
        assert!(verify_signature("ecdsa-p256-sha256", &spki, b"other", &sig).is_err());
        // Server-auth usage does not fit a client certificate.
        assert!(set.verify_chain(&[leaf.der().to_vec()], "server-auth").is_err());
        // Another root does not vouch for it.
        let (other, _) = ca();
        let set2 = CertSet::from_pem(&other.pem()).unwrap();
        assert!(set2.verify_chain(&[leaf.der().to_vec()], "client-auth").is_err());
        assert!(set.verify_chain(&[b"junk".to_vec()], "client-auth").is_err());
    }

    #[test]
    fn pkcs7_garbage_is_an_error() {
        let (root, _) = ca();
        let set = CertSet::from_pem(&root.pem()).unwrap();
        for junk in [&b""[..], b"\x30\x03\x02\x01\x01", &[0xff; 64]] {
            assert!(set.verify_pkcs7(junk).is_err());
        }
    }
}
