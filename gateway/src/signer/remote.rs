//! The client of a separate signer process (`[signer] endpoint`): the
//! [`Signer`] contract over the signer's gRPC service on a Unix socket. The
//! contract is blocking and is called from the engine's blocking pool and
//! from start-up and TLS handshakes alike, so each call runs on a small
//! runtime of this client's own and the caller waits for its answer; it
//! never blocks a runtime it does not own.
//!
//! The authorities are cached: rotation answers with the new set, and the
//! gateway re-reads them when another gateway rotated (the store's change
//! feed) and every ten seconds.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use castellan_proto::signer as pb;
use pb::signer_client::SignerClient;
use tonic::transport::Channel;

use super::{
    AuditCheckpointClaims, Authorities, IssuedCertificate, JoinTokenClaims, JwtAlg, JwtSvidClaims, Rotation,
    Signer, SignerError, Template,
};
use crate::spiffe_id::SpiffeId;

/// The longest a call may take before the signer counts as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A separate signer, reached over its Unix socket.
pub struct RemoteSigner {
    path: PathBuf,
    runtime: tokio::runtime::Handle,
    client: SignerClient<Channel>,
    authorities: ArcSwap<Authorities>,
}

impl RemoteSigner {
    /// Connects to the signer at `path` and reads its authorities; fails
    /// when it does not answer.
    pub fn connect(path: &Path) -> Result<Self, SignerError> {
        let runtime = client_runtime()?;
        let channel = {
            let _entered = runtime.enter();
            let socket = path.to_owned();
            tonic::transport::Endpoint::from_static("http://castellan-signer")
                .connect_timeout(Duration::from_secs(5))
                .connect_with_connector_lazy(tower::service_fn(move |_: tonic::codegen::http::Uri| {
                    let socket = socket.clone();
                    async move {
                        tokio::net::UnixStream::connect(socket)
                            .await
                            .map(hyper_util::rt::TokioIo::new)
                    }
                }))
        };
        let signer = Self {
            path: path.to_owned(),
            runtime,
            client: SignerClient::new(channel),
            authorities: ArcSwap::from_pointee(Authorities::new(0, vec![], vec![])),
        };
        signer.refresh()?;
        Ok(signer)
    }

    /// Runs one call on the client's runtime and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, SignerError>
    where
        T: Send + 'static,
        F: FnOnce(SignerClient<Channel>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let client = self.client.clone();
        self.runtime.spawn(async move {
            let answer = tokio::time::timeout(CALL_TIMEOUT, f(client)).await;
            let _ = tx.send(answer);
        });
        match rx.recv() {
            Ok(Ok(Ok(response))) => Ok(response.into_inner()),
            Ok(Ok(Err(status))) => Err(from_status(status, &self.path)),
            Ok(Err(_)) => Err(SignerError::Unavailable(format!(
                "{} did not answer within {} s",
                self.path.display(),
                CALL_TIMEOUT.as_secs()
            ))),
            Err(_) => Err(SignerError::Unavailable("the signer client stopped".into())),
        }
    }

    fn keep(&self, reply: pb::AuthoritiesReply) -> Result<Arc<Authorities>, SignerError> {
        let mut authorities: Authorities = serde_json::from_slice(&reply.authorities_json)
            .map_err(|e| SignerError::Unavailable(format!("the signer's authorities do not decode: {e}")))?;
        authorities.derive();
        let authorities = Arc::new(authorities);
        self.authorities.store(authorities.clone());
        Ok(authorities)
    }
}

/// A runtime on a thread of its own, for the client's calls; it lives as
/// long as the process.
fn client_runtime() -> Result<tokio::runtime::Handle, SignerError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("signer-client".into())
        .spawn(
            move || match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => {
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            },
        )
        .map_err(|e| SignerError::Unavailable(format!("cannot start the signer client: {e}")))?;
    rx.recv()
        .map_err(|_| SignerError::Unavailable("cannot start the signer client".into()))?
        .map_err(|e| SignerError::Unavailable(format!("cannot start the signer client: {e}")))
}

/// The signer's refusal as the error it was on the other side.
fn from_status(status: tonic::Status, path: &Path) -> SignerError {
    let message = status.message();
    let (kind, text) = match message.strip_prefix('[').and_then(|m| m.split_once("] ")) {
        Some((kind, text)) => (kind, text.to_owned()),
        None => ("", message.to_owned()),
    };
    match kind {
        "foreign-identity" => SignerError::ForeignIdentity(text),
        "purpose" => SignerError::Purpose(text),
        "template" => SignerError::Template(text),
        "no-key" => SignerError::NoKey(JwtAlg::RS256),
        "authority-unusable" => SignerError::AuthorityUnusable(text),
        "rotation" | "in-use" => SignerError::Rotation(text),
        "unknown-authority" => SignerError::UnknownAuthority(
            text.trim_start_matches("no authority ")
                .trim_matches('`')
                .to_owned(),
        ),
        _ => SignerError::Unavailable(format!("{}: {:?} {}", path.display(), status.code(), message)),
    }
}

impl Signer for RemoteSigner {
    fn sign_x509_svid(&self, t: &Template) -> Result<IssuedCertificate, SignerError> {
        let request = pb::X509SvidRequest {
            spiffe_id: t.spiffe_id.to_string(),
            public_key_der: t.public_key_der.clone(),
            ttl_seconds: t.ttl.whole_seconds(),
            dns_names: t.dns_names.clone(),
            extensions: t
                .extensions
                .iter()
                .map(|(oid, der)| pb::Extension {
                    oid: oid.clone(),
                    der: der.clone(),
                })
                .collect(),
        };
        let signed = self.call(move |mut c| async move { c.sign_x509_svid(request).await })?;
        issued(signed)
    }

    fn sign_subordinate_ca(
        &self,
        public_key_der: &[u8],
        common_name: &str,
        ttl: time::Duration,
    ) -> Result<IssuedCertificate, SignerError> {
        let request = pb::SubordinateCaRequest {
            public_key_der: public_key_der.to_vec(),
            common_name: common_name.to_owned(),
            ttl_seconds: ttl.whole_seconds(),
        };
        issued(self.call(move |mut c| async move { c.sign_subordinate_ca(request).await })?)
    }

    fn sign_jwt_svid(&self, claims: &JwtSvidClaims, alg: JwtAlg) -> Result<String, SignerError> {
        let request = pb::JwtRequest {
            claims_json: serde_json::to_vec(claims).map_err(|e| SignerError::Template(e.to_string()))?,
            alg: alg.to_string(),
        };
        Ok(self
            .call(move |mut c| async move { c.sign_jwt_svid(request).await })?
            .token)
    }

    fn sign_join_token(&self, claims: &JoinTokenClaims) -> Result<String, SignerError> {
        let request = pb::JwtRequest {
            claims_json: serde_json::to_vec(claims).map_err(|e| SignerError::Template(e.to_string()))?,
            alg: JwtAlg::ES256.to_string(),
        };
        Ok(self
            .call(move |mut c| async move { c.sign_join_token(request).await })?
            .token)
    }

    fn sign_audit_checkpoint(&self, claims: &AuditCheckpointClaims) -> Result<String, SignerError> {
        let request = pb::JwtRequest {
            claims_json: serde_json::to_vec(claims).map_err(|e| SignerError::Template(e.to_string()))?,
            alg: JwtAlg::ES256.to_string(),
        };
        Ok(self
            .call(move |mut c| async move { c.sign_audit_checkpoint(request).await })?
            .token)
    }

    fn issue_server_certificate(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        public_key_der: &[u8],
    ) -> Result<String, SignerError> {
        let request = pb::ServerCertificateRequest {
            spiffe_id: spiffe_id.to_string(),
            dns_names: dns_names.to_vec(),
            ips: ips.iter().map(ToString::to_string).collect(),
            public_key_der: public_key_der.to_vec(),
        };
        Ok(self
            .call(move |mut c| async move { c.issue_server_certificate(request).await })?
            .pem)
    }

    fn authorities(&self) -> Arc<Authorities> {
        self.authorities.load_full()
    }

    fn rotate(&self, rotation: &Rotation) -> Result<Arc<Authorities>, SignerError> {
        let request = pb::RotateRequest {
            rotation_json: serde_json::to_vec(rotation).map_err(|e| SignerError::Template(e.to_string()))?,
        };
        let reply = self.call(move |mut c| async move { c.rotate(request).await })?;
        self.keep(reply)
    }

    fn refresh(&self) -> Result<Arc<Authorities>, SignerError> {
        let reply = self.call(|mut c| async move { c.authorities(pb::AuthoritiesRequest {}).await })?;
        self.keep(reply)
    }

    fn shared(&self) -> bool {
        true
    }
}

fn issued(c: pb::SignedCertificate) -> Result<IssuedCertificate, SignerError> {
    let at = |t| {
        time::OffsetDateTime::from_unix_timestamp(t)
            .map_err(|_| SignerError::Unavailable("the signer answered a bad time".into()))
    };
    Ok(IssuedCertificate {
        der: c.der,
        pem: c.pem,
        serial: c.serial,
        not_before: at(c.not_before)?,
        not_after: at(c.not_after)?,
        authority: c.authority,
        chain_pem: c.chain_pem,
    })
}
