//! Envoy's Secret Discovery Service (v3) on the Workload API socket, as a
//! SPIRE agent serves it, so Envoy and the meshes built on it read their
//! identities from Castellan. The caller is attested from the socket's peer
//! exactly as for the Workload API; the same entries and policy decide, and
//! the same shared SVIDs are handed out. Envoy sends no security header, so
//! none is asked for (the header guards against SSRF into the Workload API;
//! SDS callers are configured proxies).
//!
//! Secret names: a SPIFFE ID is that TLS certificate; `default` (configurable)
//! the caller's first one; a trust domain ID (`spiffe://example.org`) that
//! domain's validation context; `ROOTCA` Castellan's own; `ALL` one
//! validation context for every domain the caller may trust. No names means
//! everything the caller is entitled to. Validation contexts use Envoy's
//! SPIFFE certificate validator unless the configuration or the caller's
//! node metadata (`disable_spiffe_cert_validation`) turns it off, or the
//! caller is an Envoy older than 1.18.

use castellan_proto::envoy::config::core::v3::{DataSource, Node, TypedExtensionConfig, data_source, node};
use castellan_proto::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, SECRET_TYPE_URL, SPIFFE_VALIDATOR_TYPE_URL, Secret,
    SpiffeCertValidatorConfig, TlsCertificate, secret, spiffe_cert_validator_config,
};
use castellan_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use castellan_proto::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use prost::Message as _;
use prost_types::Any;
use std::collections::{BTreeMap, BTreeSet};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{WorkloadApi, status, stream_ends};
use crate::config::SdsConfig;
use crate::engine::EngineError;
use crate::model::Attestation;
use crate::util::pem_block;

/// Envoy's name for its SPIFFE certificate validator extension.
const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";

/// The node metadata key with which a caller turns SPIFFE validation off.
const DISABLE_SPIFFE_VALIDATION: &str = "disable_spiffe_cert_validation";

/// The SDS service (cheap to clone: it holds handles).
#[derive(Clone)]
pub struct Sds {
    api: WorkloadApi,
}

impl Sds {
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    pub fn into_service(self) -> SecretDiscoveryServiceServer<Self> {
        SecretDiscoveryServiceServer::new(self)
    }

    fn names(&self) -> &SdsConfig {
        &self.api.config.sds
    }

    /// Everything the caller may be sent right now: its SVIDs (only when a
    /// name asks for one, so a proxy that wants only a validation context
    /// costs no signature) and the bundles of the domains it may trust.
    async fn material(
        &self,
        operation: &'static str,
        attestation: &Attestation,
        request: &DiscoveryRequest,
    ) -> Result<Material, EngineError> {
        let entries = self
            .api
            .engine
            .workload_entitled_or_refused(operation, attestation)
            .await?;
        let wants_svids = request.resource_names.iter().all(String::is_empty)
            || request
                .resource_names
                .iter()
                .any(|n| *n == self.names().default_svid_name || entries.iter().any(|e| e.spiffe_id == *n));
        let mut svids = Vec::new();
        let mut rotate_at = i64::MAX;
        if wants_svids {
            for m in self.api.engine.workload_x509(attestation, &entries).await? {
                rotate_at = rotate_at.min(m.rotate_at);
                svids.push(SvidPem {
                    spiffe_id: m.entry.spiffe_id.clone(),
                    chain: format!("{}{}", pem_block("CERTIFICATE", &m.certificate_der), m.chain_pem),
                    key: pem_block("PRIVATE KEY", &m.key_der),
                });
            }
        }
        let own = format!("spiffe://{}", self.api.engine.trust_domain);
        let mut bundles =
            BTreeMap::from([(own.clone(), self.api.engine.authorities().bundle_pem().to_owned())]);
        let federated: BTreeSet<&String> = entries.iter().flat_map(|e| &e.federates_with).collect();
        for td in federated {
            if let Some(b) = self.api.federation.get(td) {
                let pem: String = b
                    .x509_authorities()
                    .map(|der| pem_block("CERTIFICATE", der))
                    .collect();
                if !pem.is_empty() {
                    bundles.insert(format!("spiffe://{td}"), pem);
                }
            }
        }
        Ok(Material {
            svids,
            own,
            bundles,
            rotate_at,
        })
    }

    /// The secrets `request` names, rendered from `material`; an error
    /// names what the caller may not have.
    fn render(&self, request: &DiscoveryRequest, material: &Material) -> Result<Vec<Any>, Status> {
        let names = self.names();
        let mut wanted: BTreeSet<&str> = request
            .resource_names
            .iter()
            .map(String::as_str)
            .filter(|n| !n.is_empty())
            .collect();
        let all = wanted.is_empty();
        let spiffe = spiffe_validation(names.disable_spiffe_cert_validation, request.node.as_ref());
        let mut out = Vec::new();
        for (td, pem) in &material.bundles {
            if all || wanted.remove(td.as_str()) {
                out.push(validation_context(td, &[(td, pem)], spiffe)?);
            }
        }
        if wanted.remove(names.default_bundle_name.as_str()) {
            let pem = &material.bundles[&material.own];
            out.push(validation_context(
                &names.default_bundle_name,
                &[(&material.own, pem)],
                spiffe,
            )?);
        }
        if wanted.remove(names.default_all_bundles_name.as_str()) {
            if !spiffe {
                return Err(Status::invalid_argument(format!(
                    "`{}` needs SPIFFE certificate validation (Envoy 1.18 or later, not disabled)",
                    names.default_all_bundles_name
                )));
            }
            let every: Vec<(&String, &String)> = material.bundles.iter().collect();
            out.push(validation_context(&names.default_all_bundles_name, &every, true)?);
        }
        for (i, svid) in material.svids.iter().enumerate() {
            if all || wanted.remove(svid.spiffe_id.as_str()) {
                out.push(tls_certificate(&svid.spiffe_id, svid));
            }
            if i == 0 && wanted.remove(names.default_svid_name.as_str()) {
                out.push(tls_certificate(&names.default_svid_name, svid));
            }
        }
        if !wanted.is_empty() {
            let missing: Vec<&str> = wanted.into_iter().collect();
            return Err(Status::invalid_argument(format!(
                "the caller is not entitled to the requested secrets {missing:?}"
            )));
        }
        Ok(out)
    }

    /// Audits, through the engine, a caller's request for secrets it may
    /// not have (someone probing for other identities is worth a record).
    async fn refused(&self, operation: &'static str, attestation: &Attestation, s: Status) -> Status {
        let e = EngineError::Forbidden(s.message().to_owned());
        self.api.engine.workload_refused(operation, attestation, &e).await;
        s
    }

    /// Runs one `StreamSecrets` stream, with xDS's version and nonce
    /// handshake: a response answers a request whose names changed, or
    /// follows a change of the secrets (rotation, entries, bundles); a
    /// request carrying an old nonce is stale and ignored.
    async fn stream(
        self,
        attestation: Attestation,
        mut inbound: Streaming<DiscoveryRequest>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) {
        let open = crate::metrics::OpenStream::open();
        let engine = self.api.engine.clone();
        let mut entries_changed = engine.entries.subscribe();
        let mut bundles_changed = self.api.federation.subscribe();
        let mut authorities_changed = engine.authority_changes();
        let mut last: Option<DiscoveryRequest> = None;
        let mut last_node: Option<Node> = None;
        let mut nonce: Option<String> = None;
        let mut sent: Option<Vec<Any>> = None;
        let mut version = 0u64;
        let mut rotate_at = tokio::time::Instant::now() + FAR;
        loop {
            let mut answer = false;
            tokio::select! {
                message = inbound.message() => {
                    let Ok(Some(mut request)) = message else { return };
                    if let Some(e) = &request.error_detail {
                        tracing::warn!(names = ?request.resource_names, error = %e.message,
                            "an SDS client rejected the secrets it was sent");
                    }
                    if nonce.as_ref().is_some_and(|n| *n != request.response_nonce) {
                        continue; // stale: answers an older response
                    }
                    if let Err(s) = check_type(&request) {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    match &request.node {
                        Some(node) => last_node = Some(node.clone()),
                        None => request.node = last_node.clone(),
                    }
                    answer = last.as_ref().is_none_or(|l| name_set(l) != name_set(&request));
                    last = Some(request);
                    if !answer {
                        continue; // an acknowledgement (or a rejection) of what was sent
                    }
                }
                _ = tokio::time::sleep_until(rotate_at) => {}
                r = entries_changed.changed() => if r.is_err() { return },
                r = bundles_changed.changed() => if r.is_err() { return },
                r = authorities_changed.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
            let Some(request) = &last else { continue };
            let material = match self.material("sds_stream_secrets", &attestation, request).await {
                Ok(m) => m,
                Err(e) => {
                    if stream_ends(e, &tx).await {
                        return;
                    }
                    continue;
                }
            };
            rotate_at = wake_at(material.rotate_at);
            let resources = match self.render(request, &material) {
                Ok(r) => r,
                Err(s) => {
                    let s = self.refused("sds_stream_secrets", &attestation, s).await;
                    let _ = tx.send(Err(s)).await;
                    return;
                }
            };
            if !answer && sent.as_ref() == Some(&resources) {
                continue;
            }
            version += 1;
            let n = hex::encode(crate::util::random_bytes::<8>());
            let response = DiscoveryResponse {
                version_info: version.to_string(),
                resources: resources.clone(),
                canary: false,
                type_url: SECRET_TYPE_URL.into(),
                nonce: n.clone(),
            };
            if tx.send(Ok(response)).await.is_err() {
                return;
            }
            open.pushed();
            nonce = Some(n);
            sent = Some(resources);
        }
    }
}

/// How long a stream with no SVID to renew sleeps between wake-ups it does
/// not need (entries and bundles wake it when they change).
const FAR: std::time::Duration = std::time::Duration::from_secs(3600);

/// When to look again: when the first SVID is due for renewal.
fn wake_at(rotate_at: i64) -> tokio::time::Instant {
    if rotate_at == i64::MAX {
        return tokio::time::Instant::now() + FAR;
    }
    super::wake_at(rotate_at)
}

/// What a caller may be sent at one moment.
struct Material {
    svids: Vec<SvidPem>,
    /// Castellan's own trust domain ID.
    own: String,
    /// PEM roots by trust domain ID: the own domain's and those the
    /// caller's entries federate with.
    bundles: BTreeMap<String, String>,
    /// When the first SVID is due for renewal (`i64::MAX` when none was
    /// minted).
    rotate_at: i64,
}

struct SvidPem {
    spiffe_id: String,
    /// The leaf and the intermediates, PEM.
    chain: String,
    /// PKCS#8, PEM.
    key: String,
}

fn name_set(r: &DiscoveryRequest) -> BTreeSet<&str> {
    r.resource_names.iter().map(String::as_str).collect()
}

/// A request must ask for secrets (or leave the type out, as SPIRE accepts).
fn check_type(r: &DiscoveryRequest) -> Result<(), Status> {
    if r.type_url.is_empty() || r.type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "this service serves `{SECRET_TYPE_URL}`, not `{}`",
            r.type_url
        )))
    }
}

/// Whether validation contexts use Envoy's SPIFFE validator: yes unless the
/// configuration or the caller's node metadata says no, or the caller is an
/// Envoy that predates it (1.18).
fn spiffe_validation(disabled_by_config: bool, node: Option<&Node>) -> bool {
    let mut disabled = disabled_by_config;
    if let Some(v) = node
        .and_then(|n| n.metadata.as_ref())
        .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION))
        .and_then(|v| v.kind.as_ref())
    {
        use prost_types::value::Kind;
        match v {
            Kind::BoolValue(b) => disabled = *b,
            Kind::StringValue(s) => match s.to_ascii_lowercase().as_str() {
                "true" | "1" | "t" => disabled = true,
                "false" | "0" | "f" => disabled = false,
                _ => {}
            },
            _ => {}
        }
    }
    let too_old = match node.and_then(|n| n.user_agent_version_type.as_ref()) {
        Some(node::UserAgentVersionType::UserAgentBuildVersion(b)) => b
            .version
            .as_ref()
            .is_some_and(|v| v.major_number < 1 || (v.major_number == 1 && v.minor_number < 18)),
        _ => false,
    };
    !disabled && !too_old
}

fn inline(pem: &str) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(pem.as_bytes().to_vec())),
    })
}

fn any_secret(secret: Secret) -> Any {
    Any {
        type_url: SECRET_TYPE_URL.into(),
        value: secret.encode_to_vec(),
    }
}

fn tls_certificate(name: &str, svid: &SvidPem) -> Any {
    any_secret(Secret {
        name: name.into(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(&svid.chain),
            private_key: inline(&svid.key),
        })),
    })
}

/// A validation context named `name` for `domains` (trust domain ID, PEM
/// roots): Envoy's SPIFFE validator, which checks each peer against its own
/// domain's roots, or plain `trusted_ca` for a single domain.
fn validation_context(name: &str, domains: &[(&String, &String)], spiffe: bool) -> Result<Any, Status> {
    let context = if spiffe {
        let trust_domains = domains
            .iter()
            .map(|(td, pem)| spiffe_cert_validator_config::TrustDomain {
                name: td.trim_start_matches("spiffe://").to_owned(),
                trust_bundle: inline(pem),
            })
            .collect();
        let config = SpiffeCertValidatorConfig { trust_domains };
        CertificateValidationContext {
            trusted_ca: None,
            custom_validator_config: Some(TypedExtensionConfig {
                name: SPIFFE_VALIDATOR.into(),
                typed_config: Some(Any {
                    type_url: SPIFFE_VALIDATOR_TYPE_URL.into(),
                    value: config.encode_to_vec(),
                }),
            }),
        }
    } else {
        let [(_, pem)] = domains else {
            return Err(Status::internal(
                "a plain validation context holds one trust domain",
            ));
        };
        CertificateValidationContext {
            trusted_ca: inline(pem),
            custom_validator_config: None,
        }
    };
    Ok(any_secret(Secret {
        name: name.into(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }))
}

type Stream<T> = ReceiverStream<Result<T, Status>>;

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = Stream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = Stream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "incremental SDS is not served; use StreamSecrets (Envoy's default)",
        ))
    }

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.api.ready()?;
        let attestation = self.api.attest("sds_stream_secrets", &req).await?;
        self.api
            .entitled_or_denied("sds_stream_secrets", &attestation)
            .await?;
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(self.clone().stream(attestation, req.into_inner(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        self.api.ready()?;
        check_type(req.get_ref())?;
        let attestation = self.api.attest("sds_fetch_secrets", &req).await?;
        let request = req.into_inner();
        let material = self
            .material("sds_fetch_secrets", &attestation, &request)
            .await
            .map_err(status)?;
        let resources = match self.render(&request, &material) {
            Ok(r) => r,
            Err(s) => return Err(self.refused("sds_fetch_secrets", &attestation, s).await),
        };
        Ok(Response::new(DiscoveryResponse {
            version_info: String::new(),
            resources,
            canary: false,
            type_url: SECRET_TYPE_URL.into(),
            nonce: String::new(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use castellan_proto::envoy::config::core::v3::BuildVersion;
    use castellan_proto::envoy::r#type::v3::SemanticVersion;

    use super::*;

    fn node(version: Option<(u32, u32)>, metadata: Option<prost_types::value::Kind>) -> Node {
        let mut n = Node::default();
        if let Some((major_number, minor_number)) = version {
            n.user_agent_version_type =
                Some(node::UserAgentVersionType::UserAgentBuildVersion(BuildVersion {
                    version: Some(SemanticVersion {
                        major_number,
                        minor_number,
                        patch: 0,
                    }),
                    metadata: None,
                }));
        }
        if let Some(kind) = metadata {
            let mut s = prost_types::Struct::default();
            s.fields.insert(
                DISABLE_SPIFFE_VALIDATION.into(),
                prost_types::Value { kind: Some(kind) },
            );
            n.metadata = Some(s);
        }
        n
    }

    #[test]
    fn spiffe_validation_unless_turned_off_or_too_old() {
        use prost_types::value::Kind;
        assert!(spiffe_validation(false, None));
        assert!(!spiffe_validation(true, None));
        assert!(spiffe_validation(false, Some(&node(Some((1, 31)), None))));
        assert!(
            !spiffe_validation(false, Some(&node(Some((1, 17)), None))),
            "Envoy before 1.18"
        );
        assert!(!spiffe_validation(
            false,
            Some(&node(None, Some(Kind::BoolValue(true))))
        ));
        assert!(!spiffe_validation(
            false,
            Some(&node(None, Some(Kind::StringValue("true".into()))))
        ));
        // The node may turn it back on, and nonsense changes nothing.
        assert!(spiffe_validation(
            true,
            Some(&node(None, Some(Kind::BoolValue(false))))
        ));
        assert!(!spiffe_validation(
            true,
            Some(&node(None, Some(Kind::StringValue("maybe".into()))))
        ));
    }

    #[test]
    fn only_secret_requests_are_served() {
        let mut r = DiscoveryRequest::default();
        assert!(check_type(&r).is_ok(), "the type may be left out");
        r.type_url = SECRET_TYPE_URL.into();
        assert!(check_type(&r).is_ok());
        r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert_eq!(check_type(&r).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
