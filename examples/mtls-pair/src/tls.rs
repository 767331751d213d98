//! rustls configurations for the two workloads: TLS 1.3 only, the ring
//! provider, the workload's current X.509-SVID presented at every handshake,
//! and a [`PeerVerifier`] on the other side. Session resumption is off so
//! that every connection is verified against the current bundle and ID.

use std::fmt::Debug;
use std::sync::Arc;

use rustls::client::{ResolvesClientCert, Resumption};
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{BundleSource, SpiffeId, SvidSource, X509Bundle, X509Svid};
use tracing::warn;

use crate::Error;
use crate::verify::PeerVerifier;

/// What both configurations read: an SVID and bundles that stay current,
/// such as an [`X509Source`](spiffe::X509Source).
pub trait Source:
    SvidSource<Item = X509Svid> + BundleSource<Item = X509Bundle> + Clone + Debug + Send + Sync + 'static
{
}

impl<T> Source for T where
    T: SvidSource<Item = X509Svid> + BundleSource<Item = X509Bundle> + Clone + Debug + Send + Sync + 'static
{
}

/// The server's configuration: it requires a client SVID and accepts only
/// `allow`.
pub fn server_config<S: Source>(source: S, allow: SpiffeId) -> Result<ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PeerVerifier::new(source.clone(), allow, &provider);
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(SvidResolver { source, provider }));
    // A resumed session skips the verifier: refuse to make one.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// The client's configuration: the server must present `expect`.
pub fn client_config<S: Source>(source: S, expect: SpiffeId) -> Result<ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PeerVerifier::new(source.clone(), expect, &provider);
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(SvidResolver { source, provider }));
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The SPIFFE ID in the peer's leaf, once the handshake has verified it.
pub fn peer_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    spiffe::cert::spiffe_id_from_der(leaf).ok()
}

/// The rustls error behind an I/O error from tokio-rustls, if there is one.
pub fn tls_error(err: &std::io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Hands rustls the workload's SVID as the source holds it at that moment, so
/// a rotated SVID is used from the next handshake on without a restart.
#[derive(Debug)]
struct SvidResolver<S> {
    source: S,
    provider: Arc<CryptoProvider>,
}

// === impl SvidResolver ===

impl<S: Source> SvidResolver<S> {
    /// Converting per handshake costs a key parse; it keeps no second copy of
    /// the key that could go stale.
    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let svid = self
            .source
            .svid()
            .map_err(|e| warn!("no X.509-SVID to present: {e}"))
            .ok()?;
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.private_key().as_bytes().to_vec()));
        CertifiedKey::from_der(chain, key, &self.provider)
            .map(Arc::new)
            .map_err(|e| warn!("the X.509-SVID of {} is unusable: {e}", svid.spiffe_id()))
            .ok()
    }
}

impl<S: Source> ResolvesServerCert for SvidResolver<S> {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

impl<S: Source> ResolvesClientCert for SvidResolver<S> {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
