//! The certificate authority's material on disk: a root and an intermediate
//! CA (ECDSA P-256), generated on first start and reused afterwards. Only the
//! signer loads the keys; nothing else in the server reads these files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use crate::util::write_private_file;

/// Lifetime of a generated root CA.
const ROOT_LIFETIME: Duration = Duration::days(3650);
/// Lifetime of a generated intermediate CA.
const INTERMEDIATE_LIFETIME: Duration = Duration::days(365);

/// Why CA material could not be created or loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A certificate or key on disk is not usable.
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// The existing CA belongs to another trust domain.
    #[error("the CA in {dir} is for trust domain `{found}`, not `{wanted}`; use another data directory")]
    TrustDomainMismatch {
        dir: PathBuf,
        found: String,
        wanted: String,
    },
    /// Generating or signing failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// PEM texts of the CA; the intermediate's key is what the signer signs with.
pub struct CaMaterial {
    pub root_cert_pem: String,
    pub intermediate_cert_pem: String,
    pub intermediate_key_pem: String,
    /// The JWT-SVID signing key (ES256), purpose-bound: it never signs certificates.
    pub jwt_key_pem: String,
    /// Whether this start created the CA.
    pub created: bool,
    pub dir: PathBuf,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("dir", &self.dir)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

struct Paths {
    root_cert: PathBuf,
    root_key: PathBuf,
    int_cert: PathBuf,
    int_key: PathBuf,
}

fn paths(dir: &Path) -> Paths {
    Paths {
        root_cert: dir.join("root.crt"),
        root_key: dir.join("root.key"),
        int_cert: dir.join("intermediate.crt"),
        int_key: dir.join("intermediate.key"),
    }
}

/// Loads the CA from `dir`, creating it on first use.
pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<CaMaterial, CaError> {
    let p = paths(dir);
    if p.int_key.exists() {
        return load(dir, &p, trust_domain);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let now = OffsetDateTime::now_utc();
    let td_uri = format!("spiffe://{trust_domain}");

    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut root = ca_params(trust_domain, "Castellan Root CA", &td_uri)?;
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.not_before = now - Duration::minutes(1);
    root.not_after = now + ROOT_LIFETIME;
    let root_cert = root.self_signed(&root_key)?;

    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut int = ca_params(trust_domain, "Castellan Intermediate CA", &td_uri)?;
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.not_before = now - Duration::minutes(1);
    int.not_after = now + INTERMEDIATE_LIFETIME;
    int.use_authority_key_identifier_extension = true;
    let root_issuer = Issuer::new(root, &root_key);
    let int_cert = int.signed_by(&int_key, &root_issuer)?;

    // Keys first, certificates last: a crash in between leaves no
    // certificate without its key.
    write_private_file(&p.root_key, root_key.serialize_pem().as_bytes()).map_err(io(&p.root_key))?;
    write_private_file(&p.int_key, int_key.serialize_pem().as_bytes()).map_err(io(&p.int_key))?;
    std::fs::write(&p.root_cert, root_cert.pem()).map_err(io(&p.root_cert))?;
    std::fs::write(&p.int_cert, int_cert.pem()).map_err(io(&p.int_cert))?;
    Ok(CaMaterial {
        root_cert_pem: root_cert.pem(),
        intermediate_cert_pem: int_cert.pem(),
        intermediate_key_pem: int_key.serialize_pem(),
        jwt_key_pem: load_or_create_jwt_key(dir)?,
        created: true,
        dir: dir.to_owned(),
    })
}

fn ca_params(trust_domain: &str, cn: &str, td_uri: &str) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Castellan");
    dn.push(DnType::OrganizationalUnitName, trust_domain);
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    // A signing certificate may carry the trust domain's own SPIFFE ID.
    params.subject_alt_names = vec![SanType::URI(td_uri.try_into()?)];
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn load(dir: &Path, p: &Paths, trust_domain: &str) -> Result<CaMaterial, CaError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CaError::Io {
            path: path.to_owned(),
            source,
        })
    };
    let root_cert_pem = read(&p.root_cert)?;
    let intermediate_cert_pem = read(&p.int_cert)?;
    let intermediate_key_pem = read(&p.int_key)?;
    KeyPair::from_pem(&intermediate_key_pem).map_err(|e| CaError::Invalid {
        path: p.int_key.clone(),
        message: format!("not a usable private key: {e}"),
    })?;
    let found = trust_domain_of(&root_cert_pem).map_err(|message| CaError::Invalid {
        path: p.root_cert.clone(),
        message,
    })?;
    if found != trust_domain {
        return Err(CaError::TrustDomainMismatch {
            dir: dir.to_owned(),
            found,
            wanted: trust_domain.to_owned(),
        });
    }
    Ok(CaMaterial {
        root_cert_pem,
        intermediate_cert_pem,
        intermediate_key_pem,
        jwt_key_pem: load_or_create_jwt_key(dir)?,
        created: false,
        dir: dir.to_owned(),
    })
}

/// Loads the JWT signing key, creating it (mode 0600) on first use. It is a
/// separate key from the CA's: a JWT key that leaked could not mint
/// certificates, and the reverse.
fn load_or_create_jwt_key(dir: &Path) -> Result<String, CaError> {
    let path = dir.join("jwt-signing.key");
    if path.exists() {
        let pem = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
            path: path.clone(),
            source,
        })?;
        KeyPair::from_pem(&pem).map_err(|e| CaError::Invalid {
            path: path.clone(),
            message: format!("not a usable private key: {e}"),
        })?;
        return Ok(pem);
    }
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    write_private_file(&path, key.serialize_pem().as_bytes())
        .map_err(|source| CaError::Io { path, source })?;
    Ok(key.serialize_pem())
}

/// Loads the RSA key for RS256 JWT-SVIDs (PKCS#8 PEM, 2048 bits, mode 0600),
/// creating it on first use. Only servers configured for RS256 create one.
pub fn load_or_create_rsa_jwt_key(dir: &Path) -> Result<String, CaError> {
    use rsa::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
    let path = dir.join("jwt-signing-rsa.key");
    if path.exists() {
        let pem = std::fs::read_to_string(&path).map_err(|source| CaError::Io {
            path: path.clone(),
            source,
        })?;
        rsa::RsaPrivateKey::from_pkcs8_pem(&pem).map_err(|e| CaError::Invalid {
            path: path.clone(),
            message: format!("not an RSA PKCS#8 private key: {e}"),
        })?;
        return Ok(pem);
    }
    let invalid = |message: String| CaError::Invalid {
        path: path.clone(),
        message,
    };
    let key = rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).map_err(|e| invalid(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .map_err(|e| invalid(e.to_string()))?;
    write_private_file(&path, pem.as_bytes()).map_err(|source| CaError::Io {
        path: path.clone(),
        source,
    })?;
    Ok(pem.to_string())
}

/// Reads the trust domain from a CA certificate's `spiffe://` URI SAN.
fn trust_domain_of(pem_text: &str) -> Result<String, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|e| e.to_string())?;
    let cert = pem.parse_x509().map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no subjectAltName")?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix("spiffe://").map(str::to_owned),
            _ => None,
        })
        .ok_or_else(|| "no spiffe:// URI SAN".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused_and_bound_to_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = load_or_create(&ca_dir, "example.org").unwrap();
        assert!(first.created);
        let again = load_or_create(&ca_dir, "example.org").unwrap();
        assert!(!again.created);
        assert_eq!(first.root_cert_pem, again.root_cert_pem);
        assert_eq!(first.intermediate_key_pem, again.intermediate_key_pem);
        let err = load_or_create(&ca_dir, "other.org").unwrap_err();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca_dir.join("intermediate.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
