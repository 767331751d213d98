//! TLS client configurations for talking to other servers: Web PKI (with an
//! optional private root), and SPIFFE authentication, where the server must
//! present an X.509-SVID for one exact SPIFFE ID that chains to a given
//! bundle. Host names play no part in the SPIFFE case: the SPIFFE ID in the
//! certificate's URI SAN is the identity.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file of extra roots could not be read.
    #[error("{path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A root certificate is not PEM or not usable.
    #[error("{path}: {problem}")]
    Root { path: String, problem: String },
    /// The bundle to trust is empty.
    #[error("the bundle holds no X.509 authority")]
    NoAuthority,
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Config(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Web PKI roots, plus the certificates of `extra_roots` (PEM) if given.
pub fn web_client_config(extra_roots: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    add_roots(&mut roots, extra_roots)?;
    client_config(roots)
}

/// Only the certificates of `path` (PEM) as roots.
pub fn private_client_config(path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    add_roots(&mut roots, Some(path))?;
    if roots.is_empty() {
        return Err(TlsError::Root {
            path: path.display().to_string(),
            problem: "holds no certificate".into(),
        });
    }
    client_config(roots)
}

fn client_config(roots: rustls::RootCertStore) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

fn add_roots(roots: &mut rustls::RootCertStore, extra_roots: Option<&Path>) -> Result<(), TlsError> {
    if let Some(path) = extra_roots {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsError::Read {
            path: shown.clone(),
            source,
        })?;
        let bad = |problem: String| TlsError::Root {
            path: shown.clone(),
            problem,
        };
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| bad(format!("not PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| bad(format!("a certificate is not usable as a root: {e}")))?;
        }
    }
    Ok(())
}

/// Trusts only a server whose X.509-SVID chains to `authorities` (DER) and
/// names exactly `spiffe_id`.
pub fn spiffe_client_config(
    authorities: Vec<Vec<u8>>,
    spiffe_id: String,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    if authorities.is_empty() {
        return Err(TlsError::NoAuthority);
    }
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        authorities: authorities.into_iter().map(CertificateDer::from).collect(),
        spiffe_id,
        algorithms: provider.signature_verification_algorithms,
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The single URI SAN of a certificate, as the X.509-SVID standard requires.
pub fn svid_uri(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad subjectAltName: {e}"))?
        .ok_or("no subjectAltName")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok((*one).to_owned()),
        _ => Err(format!("{} URI SANs; an X.509-SVID has exactly one", uris.len())),
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    authorities: Vec<CertificateDer<'static>>,
    spiffe_id: String,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors = self
            .authorities
            .iter()
            .map(|a| webpki::anchor_from_trusted_cert(a).map(|t| t.to_owned()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| rustls::Error::General(format!("bundle authority: {e}")))?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            self.algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| {
            rustls::Error::General(format!("server certificate does not chain to the bundle: {e}"))
        })?;
        let id = svid_uri(end_entity).map_err(rustls::Error::General)?;
        if id != self.spiffe_id {
            return Err(rustls::Error::General(format!(
                "server presented {id}, expected {}",
                self.spiffe_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
