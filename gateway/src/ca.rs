//! The certificate authority's material on disk (ECDSA P-256), generated on
//! first start and reused afterwards. By default the root signs SVIDs
//! itself, as a SPIRE server's self-signed authority does, so an SVID's
//! chain is the leaf alone and the bundle holds its issuer. With
//! `[ca] intermediate = true` an intermediate CA under the root signs, and
//! chains carry it. Only the signer loads the keys; nothing else in the
//! server reads these files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use time::{Duration, OffsetDateTime};

use crate::util::write_private_file;

/// Lifetime of a generated root CA.
pub(crate) const ROOT_LIFETIME: Duration = Duration::days(3650);
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

/// PEM texts of the CA. The signer signs with the "intermediate" key: the
/// intermediate CA's, or in a one-tier CA the root's own (then the
/// intermediate certificate is the root and no chain carries it).
pub struct CaMaterial {
    pub root_cert_pem: String,
    /// The root's key: it signs subordinate CAs (and, in one tier, SVIDs).
    /// `None` when Castellan's CA sits under an upstream authority, whose
    /// key Castellan used once, to make it.
    pub root_key_pem: Option<String>,
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

impl CaMaterial {
    /// Whether the root signs SVIDs itself.
    pub fn one_tier(&self) -> bool {
        self.intermediate_cert_pem == self.root_cert_pem
    }
}

/// Loads the CA from `dir`, creating it on first use: one tier (the root
/// signs) unless `intermediate`. A CA that already has an intermediate keeps
/// it; asking for an intermediate under an existing one-tier root adds one.
pub fn load_or_create(dir: &Path, trust_domain: &str, intermediate: bool) -> Result<CaMaterial, CaError> {
    let p = paths(dir);
    if p.int_key.exists() {
        return load(dir, &p, trust_domain);
    }
    if p.root_key.exists() {
        let root = load(dir, &p, trust_domain)?;
        if !intermediate {
            return Ok(root);
        }
        let root_key = KeyPair::from_pem(&root.intermediate_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&root.root_cert_pem, root_key)?;
        let (int_cert, int_key) = new_intermediate(trust_domain, &issuer, INTERMEDIATE_LIFETIME)?;
        write_private_file(&p.int_key, int_key.serialize_pem().as_bytes()).map_err(|source| CaError::Io {
            path: p.int_key.clone(),
            source,
        })?;
        std::fs::write(&p.int_cert, int_cert.pem()).map_err(|source| CaError::Io {
            path: p.int_cert.clone(),
            source,
        })?;
        return load(dir, &p, trust_domain);
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;

    let (root, root_cert, root_key) = new_root(trust_domain, ROOT_LIFETIME)?;
    let root_issuer = Issuer::new(root, &root_key);
    let int = intermediate
        .then(|| new_intermediate(trust_domain, &root_issuer, INTERMEDIATE_LIFETIME))
        .transpose()?;

    // Keys first, certificates last: a crash in between leaves no
    // certificate without its key.
    write_private_file(&p.root_key, root_key.serialize_pem().as_bytes()).map_err(io(&p.root_key))?;
    if let Some((_, int_key)) = &int {
        write_private_file(&p.int_key, int_key.serialize_pem().as_bytes()).map_err(io(&p.int_key))?;
    }
    std::fs::write(&p.root_cert, root_cert.pem()).map_err(io(&p.root_cert))?;
    if let Some((int_cert, _)) = &int {
        std::fs::write(&p.int_cert, int_cert.pem()).map_err(io(&p.int_cert))?;
    }
    let (intermediate_cert_pem, intermediate_key_pem) = match &int {
        Some((cert, key)) => (cert.pem(), key.serialize_pem()),
        None => (root_cert.pem(), root_key.serialize_pem()),
    };
    Ok(CaMaterial {
        root_cert_pem: root_cert.pem(),
        root_key_pem: Some(root_key.serialize_pem()),
        intermediate_cert_pem,
        intermediate_key_pem,
        jwt_key_pem: load_or_create_jwt_key(dir)?,
        created: true,
        dir: dir.to_owned(),
    })
}

/// A P-256 key from PEM: PKCS#8, or SEC1 (`EC PRIVATE KEY`, what `openssl
/// ecparam -genkey` writes), which is wrapped as PKCS#8.
fn key_from_pem(pem: &str) -> Result<KeyPair, String> {
    if let Ok(key) = KeyPair::from_pem(pem) {
        return Ok(key);
    }
    match rustls_pemfile::private_key(&mut pem.as_bytes()) {
        Ok(Some(rustls_pki_types::PrivateKeyDer::Sec1(sec1))) => {
            use crate::util::der_tlv;
            // PrivateKeyInfo: version 0, id-ecPublicKey with prime256v1, the SEC1 key.
            const ALGORITHM: &[u8] = &[
                0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86,
                0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
            ];
            let info = der_tlv(
                0x30,
                &[
                    &[0x02, 0x01, 0x00][..],
                    ALGORITHM,
                    &der_tlv(0x04, sec1.secret_sec1_der()),
                ]
                .concat(),
            );
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(info);
            KeyPair::try_from(&der).map_err(|e| format!("only P-256 keys are supported: {e}"))
        }
        Ok(_) => Err("not a P-256 private key in PKCS#8 or SEC1 PEM".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Whether a CA was made in `dir`.
pub fn exists(dir: &Path) -> bool {
    let p = paths(dir);
    p.int_key.exists() || p.root_key.exists()
}

/// An upstream authority Castellan's CA is made under: its certificate
/// chain (its own certificate first, up to the root relying parties trust)
/// and its key (PEM).
pub struct Upstream {
    pub chain_pem: String,
    pub key_pem: String,
}

/// Like [`load_or_create`], but a CA made here sits under `upstream`: its
/// certificate is signed by the upstream key, chains carry it and the
/// upstream's intermediates, and the bundle is the upstream's root. The
/// upstream key is used only now; a CA that exists is loaded as it is.
pub fn load_or_create_under(
    dir: &Path,
    trust_domain: &str,
    upstream: &Upstream,
) -> Result<CaMaterial, CaError> {
    let p = paths(dir);
    if p.int_key.exists() || p.root_key.exists() {
        return load_or_create(dir, trust_domain, false);
    }
    let bad = |message: String| CaError::Invalid {
        path: dir.join("(ca.upstream)"),
        message,
    };
    let upstream_key =
        key_from_pem(&upstream.key_pem).map_err(|e| bad(format!("the upstream key is not usable: {e}")))?;
    let checked = check_upstream(
        &upstream.chain_pem,
        &rcgen::PublicKeyData::subject_public_key_info(&upstream_key),
    )
    .map_err(bad)?;
    let (chain, anchor, upstream_until) = (&checked.chain, &checked.anchor, checked.until);
    let issuer = Issuer::from_ca_cert_pem(&checked.chain[0], upstream_key)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = new_under_upstream(trust_domain, &issuer, upstream_until, INTERMEDIATE_LIFETIME, &key)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_private_file(&p.int_key, key.serialize_pem().as_bytes()).map_err(io(&p.int_key))?;
    // Chains carry Castellan's CA and the upstream's intermediates; the
    // bundle is the upstream's root.
    let intermediates = format!("{}{}", cert.pem(), chain[..chain.len() - 1].concat());
    std::fs::write(&p.root_cert, anchor).map_err(io(&p.root_cert))?;
    std::fs::write(&p.int_cert, &intermediates).map_err(io(&p.int_cert))?;
    let mut material = load(dir, &p, trust_domain)?;
    material.created = true;
    Ok(material)
}

/// An upstream authority's chain, checked against its key.
pub(crate) struct CheckedUpstream {
    /// Its certificates, its own first, up to the root.
    pub chain: Vec<String>,
    /// The root relying parties trust.
    pub anchor: String,
    /// When its own certificate expires.
    pub until: OffsetDateTime,
}

/// Checks that `chain_pem` starts with a CA certificate whose key is `spki`.
pub(crate) fn check_upstream(chain_pem: &str, spki: &[u8]) -> Result<CheckedUpstream, String> {
    let chain: Vec<String> = crate::util::pem_blocks(chain_pem, "CERTIFICATE");
    let (Some(first), Some(anchor)) = (chain.first(), chain.last()) else {
        return Err("the upstream certificate file holds no certificate".into());
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(first.as_bytes()).map_err(|e| e.to_string())?;
    let cert = parsed.parse_x509().map_err(|e| e.to_string())?;
    if cert.public_key().raw != spki {
        return Err(
            "the upstream key is not the key of the upstream certificate (the first in its file)".into(),
        );
    }
    if !cert.is_ca() {
        return Err("the upstream certificate is not a CA".into());
    }
    let until = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| e.to_string())?;
    let anchor = anchor.clone();
    Ok(CheckedUpstream { chain, anchor, until })
}

/// Castellan's CA under an upstream authority (`issuer`, valid until
/// `upstream_until`): path length 1 (it signs SVIDs, and subordinate CAs
/// below it), living `lifetime` within the upstream's life.
pub(crate) fn new_under_upstream<S: rcgen::SigningKey, K: rcgen::SigningKey>(
    trust_domain: &str,
    issuer: &Issuer<'_, S>,
    upstream_until: OffsetDateTime,
    lifetime: Duration,
    key: &K,
) -> Result<rcgen::Certificate, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut params = ca_params(trust_domain, "Castellan CA", &format!("spiffe://{trust_domain}"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.not_before = now - Duration::minutes(1);
    params.not_after = (now + lifetime).min(upstream_until);
    params.use_authority_key_identifier_extension = true;
    Ok(params.signed_by(key, issuer)?)
}

/// A self-signed root CA (path length 1: it signs SVIDs, intermediates
/// and subordinate CAs) living `lifetime`, with its new key and the
/// parameters it was made from.
pub(crate) fn new_root(
    trust_domain: &str,
    lifetime: Duration,
) -> Result<(CertificateParams, rcgen::Certificate, KeyPair), CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let (params, cert) = new_root_with(trust_domain, lifetime, &key)?;
    Ok((params, cert, key))
}

/// Like [`new_root`], with a key made elsewhere (in an HSM).
pub(crate) fn new_root_with<K: rcgen::SigningKey>(
    trust_domain: &str,
    lifetime: Duration,
    key: &K,
) -> Result<(CertificateParams, rcgen::Certificate), CaError> {
    let now = OffsetDateTime::now_utc();
    let mut root = ca_params(
        trust_domain,
        "Castellan Root CA",
        &format!("spiffe://{trust_domain}"),
    )?;
    root.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root.not_before = now - Duration::minutes(1);
    root.not_after = now + lifetime;
    let cert = root.self_signed(key)?;
    Ok((root, cert))
}

/// An intermediate CA (path length 0) signed by `root`, with its new key,
/// living `lifetime` (within the root's).
pub(crate) fn new_intermediate<S: rcgen::SigningKey>(
    trust_domain: &str,
    root: &Issuer<'_, S>,
    lifetime: Duration,
) -> Result<(rcgen::Certificate, KeyPair), CaError> {
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = new_intermediate_with(trust_domain, root, lifetime, &int_key)?;
    Ok((cert, int_key))
}

/// Like [`new_intermediate`], with a key made elsewhere (in an HSM).
pub(crate) fn new_intermediate_with<S: rcgen::SigningKey, K: rcgen::SigningKey>(
    trust_domain: &str,
    root: &Issuer<'_, S>,
    lifetime: Duration,
    int_key: &K,
) -> Result<rcgen::Certificate, CaError> {
    let now = OffsetDateTime::now_utc();
    let mut int = ca_params(
        trust_domain,
        "Castellan Intermediate CA",
        &format!("spiffe://{trust_domain}"),
    )?;
    int.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    int.not_before = now - Duration::minutes(1);
    int.not_after = now + lifetime;
    int.use_authority_key_identifier_extension = true;
    Ok(int.signed_by(int_key, root)?)
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
    // One tier when there is no intermediate: the root's key signs.
    let (cert_path, key_path) = if p.int_key.exists() {
        (&p.int_cert, &p.int_key)
    } else {
        (&p.root_cert, &p.root_key)
    };
    let intermediate_cert_pem = read(cert_path)?;
    let intermediate_key_pem = read(key_path)?;
    KeyPair::from_pem(&intermediate_key_pem).map_err(|e| CaError::Invalid {
        path: key_path.clone(),
        message: format!("not a usable private key: {e}"),
    })?;
    // Under an upstream authority the root is someone else's: Castellan's
    // own CA names the trust domain.
    let found = trust_domain_of(&root_cert_pem)
        .or_else(|_| trust_domain_of(&intermediate_cert_pem))
        .map_err(|message| CaError::Invalid {
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
    let root_key_pem = p.root_key.exists().then(|| read(&p.root_key)).transpose()?;
    Ok(CaMaterial {
        root_cert_pem,
        root_key_pem,
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
    fn one_tier_by_default_and_an_intermediate_added_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let root = load_or_create(&ca_dir, "example.org", false).unwrap();
        assert!(root.one_tier());
        assert!(!ca_dir.join("intermediate.key").exists());
        assert!(load_or_create(&ca_dir, "example.org", false).unwrap().one_tier());
        // Asked for later: an intermediate under the same root, kept from
        // then on whatever the setting.
        let two = load_or_create(&ca_dir, "example.org", true).unwrap();
        assert!(!two.one_tier());
        assert_eq!(two.root_cert_pem, root.root_cert_pem);
        let again = load_or_create(&ca_dir, "example.org", false).unwrap();
        assert_eq!(again.intermediate_cert_pem, two.intermediate_cert_pem);
        let (_, int) = x509_parser::pem::parse_x509_pem(two.intermediate_cert_pem.as_bytes()).unwrap();
        let (_, rootp) = x509_parser::pem::parse_x509_pem(root.root_cert_pem.as_bytes()).unwrap();
        let (int, rootc) = (int.parse_x509().unwrap(), rootp.parse_x509().unwrap());
        int.verify_signature(Some(rootc.public_key())).unwrap();
    }

    #[test]
    fn created_once_then_reused_and_bound_to_trust_domain() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let first = load_or_create(&ca_dir, "example.org", true).unwrap();
        assert!(first.created);
        let again = load_or_create(&ca_dir, "example.org", true).unwrap();
        assert!(!again.created);
        assert_eq!(first.root_cert_pem, again.root_cert_pem);
        assert_eq!(first.intermediate_key_pem, again.intermediate_key_pem);
        let err = load_or_create(&ca_dir, "other.org", true).unwrap_err();
        assert!(matches!(err, CaError::TrustDomainMismatch { .. }), "{err}");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ca_dir.join("intermediate.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
