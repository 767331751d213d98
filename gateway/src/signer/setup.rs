//! Opening the in-process signer as `[ca]` says, for `castellan serve` and
//! `castellan signer` alike: the keyring if there is one, or a CA made on
//! first start (in a PKCS#11 token, under an upstream authority, or on
//! disk).

use std::path::Path;

use super::config::CaConfig;
use super::keys::CaKey;
use super::pkcs11::Token;
use super::{InProcessSigner, Lifetimes, SignerError, keyring_exists};

/// The signer over `ca_dir`, and whether its CA was made now.
pub fn open_or_create(
    ca_dir: &Path,
    trust_domain: &str,
    ca: &CaConfig,
) -> Result<(InProcessSigner, bool), SignerError> {
    let token = match (ca.key_manager.as_str(), &ca.pkcs11) {
        ("pkcs11", Some(config)) => Some(Token::open(config)?),
        ("pkcs11", None) => {
            return Err(SignerError::Key(
                "key_manager = \"pkcs11\" needs [ca.pkcs11] module, token_label and pin_file".into(),
            ));
        }
        _ => None,
    };
    let lifetimes = Lifetimes::of(ca);
    if keyring_exists(ca_dir) {
        let signer = InProcessSigner::open(ca_dir, trust_domain, token)?;
        return Ok((signer.with_lifetimes(lifetimes), false));
    }
    let ca_err = |e: crate::ca::CaError| SignerError::Key(e.to_string());
    let read = |p: &Path, what: &str| {
        std::fs::read_to_string(p).map_err(|e| SignerError::Key(format!("ca.{what} {}: {e}", p.display())))
    };
    let material = match (&ca.upstream_cert_file, &ca.upstream_key_file, token) {
        // Made before rotation existed: taken in as it is.
        (_, _, _) if crate::ca::exists(ca_dir) => {
            crate::ca::load_or_create(ca_dir, trust_domain, false).map_err(ca_err)?
        }
        (Some(cert), Some(key), _) => {
            let upstream = crate::ca::Upstream {
                chain_pem: read(cert, "upstream_cert_file")?,
                key_pem: read(key, "upstream_key_file")?,
            };
            crate::ca::load_or_create_under(ca_dir, trust_domain, &upstream)
                .map_err(|e| SignerError::Key(format!("cannot make the CA under [ca] upstream: {e}")))?
        }
        // The upstream's key in the token, by label: used once, never read.
        (Some(cert), None, Some(token)) if ca.upstream_key_label.is_some() => {
            let label = ca.upstream_key_label.as_deref().unwrap_or_default();
            let chain = read(cert, "upstream_cert_file")?;
            let point = first_certificate_point(&chain)?;
            // A key imported alone has no public object: its certificate
            // says what its public key is (and signing proves it).
            let upstream = CaKey::Token(token.find_private(label, &point)?);
            let signer = InProcessSigner::create_in_token(
                ca_dir,
                trust_domain,
                token,
                false,
                Some((&chain, upstream)),
                lifetimes,
            )?;
            return Ok((signer.with_lifetimes(lifetimes), true));
        }
        (None, None, Some(token)) => {
            let signer = InProcessSigner::create_in_token(
                ca_dir,
                trust_domain,
                token,
                ca.intermediate,
                None,
                lifetimes,
            )?;
            return Ok((signer.with_lifetimes(lifetimes), true));
        }
        (None, None, None) => {
            crate::ca::load_or_create(ca_dir, trust_domain, ca.intermediate).map_err(ca_err)?
        }
        _ => {
            return Err(SignerError::Key(
                "ca.upstream_cert_file goes with ca.upstream_key_file, or with ca.upstream_key_label \
                 (its key in the [ca.pkcs11] token)"
                    .into(),
            ));
        }
    };
    let signer = InProcessSigner::new(&material, trust_domain)?;
    Ok((signer.with_lifetimes(lifetimes), material.created))
}

/// The public point of the first certificate in `chain_pem` (P-256).
fn first_certificate_point(chain_pem: &str) -> Result<Vec<u8>, SignerError> {
    let bad = |m: String| SignerError::Key(format!("ca.upstream_cert_file: {m}"));
    let (_, pem) = x509_parser::pem::parse_x509_pem(chain_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let cert = pem.parse_x509().map_err(|e| bad(e.to_string()))?;
    let point = cert.public_key().subject_public_key.data.to_vec();
    if point.len() != 65 || point[0] != 0x04 {
        return Err(bad("the upstream key must be P-256".into()));
    }
    Ok(point)
}
