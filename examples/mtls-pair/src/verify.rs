//! Peer verification for both ends of the connection: the peer's chain must
//! lead to its trust domain's X.509 bundle from the Workload API, its leaf
//! must be an X.509-SVID (exactly one URI SAN), and its SPIFFE ID must be
//! the one ID this workload accepts. Nothing else is looked at: there is no
//! hostname, and DNS SANs mean nothing here.

use std::fmt::Debug;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use spiffe::{BundleSource, SpiffeId, X509Bundle};
use tracing::warn;

use crate::Refusal;

#[cfg(test)]
mod tests;

/// Verifies a peer against the current bundles of `B` and accepts exactly
/// one SPIFFE ID. Serves as the server's client verifier and the client's
/// server verifier.
#[derive(Debug)]
pub struct PeerVerifier<B> {
    bundles: B,
    allowed: SpiffeId,
    algorithms: WebPkiSupportedAlgorithms,
}

// === impl PeerVerifier ===

impl<B> PeerVerifier<B>
where
    B: BundleSource<Item = X509Bundle>,
{
    /// A verifier accepting only `allowed`, checking chains and handshake
    /// signatures with `provider`'s algorithms.
    pub fn new(bundles: B, allowed: SpiffeId, provider: &CryptoProvider) -> Self {
        Self {
            bundles,
            allowed,
            algorithms: provider.signature_verification_algorithms,
        }
    }

    /// The peer's SPIFFE ID, if its chain is good now and the ID is the one
    /// accepted. `usage` is the extended key usage the peer's role needs.
    pub fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<SpiffeId, Refusal> {
        let peer = spiffe::cert::spiffe_id_from_der(end_entity).map_err(Refusal::NotAnSvid)?;
        // The bundle is read at every handshake, so a rotated trust domain CA
        // is honoured without a restart.
        let bundle = self
            .bundles
            .bundle_for_trust_domain(peer.trust_domain())
            .map_err(|e| Refusal::Bundles(e.to_string()))?
            .ok_or_else(|| Refusal::NoBundle(peer.trust_domain().clone()))?;
        let roots: Vec<CertificateDer<'_>> = bundle
            .authorities()
            .iter()
            .map(|a| CertificateDer::from(a.as_bytes()))
            .collect();
        let chain = |source| Refusal::Chain {
            peer: peer.clone(),
            source,
        };
        let anchors = roots
            .iter()
            .map(webpki::anchor_from_trusted_cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(chain)?;
        webpki::EndEntityCert::try_from(end_entity)
            .and_then(|leaf| {
                leaf.verify_for_usage(
                    self.algorithms.all,
                    &anchors,
                    intermediates,
                    now,
                    usage,
                    None,
                    None,
                )
                .map(|_| ())
            })
            .map_err(chain)?;
        if peer != self.allowed {
            return Err(Refusal::NotAuthorized {
                peer,
                allowed: self.allowed.clone(),
            });
        }
        Ok(peer)
    }

    /// [`Self::check`] in rustls's terms; the refusal is logged here because
    /// the TLS error can carry only its kind.
    fn verify(
        &self,
        role: &str,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), rustls::Error> {
        self.check(end_entity, intermediates, now, usage)
            .map(|_| ())
            .map_err(|refusal| {
                warn!("refused the {role}: {refusal}");
                rustls::Error::InvalidCertificate(certificate_error(&refusal))
            })
    }
}

/// The TLS alert each refusal sends: `access_denied` for a good certificate
/// with the wrong ID, `unknown_ca` and friends for a bad chain.
fn certificate_error(refusal: &Refusal) -> CertificateError {
    match refusal {
        Refusal::NotAuthorized { .. } => CertificateError::ApplicationVerificationFailure,
        Refusal::NotAnSvid(_) => CertificateError::BadEncoding,
        // Without the trust domain's bundle no issuer can be vouched for.
        Refusal::NoBundle(_) | Refusal::Bundles(_) => CertificateError::UnknownIssuer,
        Refusal::Chain { source, .. } => match source {
            webpki::Error::UnknownIssuer => CertificateError::UnknownIssuer,
            webpki::Error::InvalidSignatureForPublicKey => CertificateError::BadSignature,
            webpki::Error::CertExpired { time, not_after } => CertificateError::ExpiredContext {
                time: *time,
                not_after: *not_after,
            },
            webpki::Error::CertNotValidYet { time, not_before } => CertificateError::NotValidYetContext {
                time: *time,
                not_before: *not_before,
            },
            webpki::Error::BadDer | webpki::Error::BadDerTime => CertificateError::BadEncoding,
            _ => CertificateError::Other(rustls::OtherError(Arc::new(source.clone()))),
        },
    }
}

/// Both rustls verifier traits ask for the same three methods: a handshake
/// signature is checked the same way whichever side the peer is on.
macro_rules! handshake_signatures {
    () => {
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
    };
}

impl<B> ClientCertVerifier for PeerVerifier<B>
where
    B: BundleSource<Item = X509Bundle> + Debug + Send + Sync,
{
    /// No hints: each workload has one SVID and always sends it.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(
            "client",
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

impl<B> ServerCertVerifier for PeerVerifier<B>
where
    B: BundleSource<Item = X509Bundle> + Debug + Send + Sync,
{
    /// `server_name` is ignored on purpose: the server is identified by the
    /// SPIFFE ID in its SVID, not by where the client dialled. No OCSP: SVIDs
    /// are short-lived instead.
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verify(
            "server",
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}
