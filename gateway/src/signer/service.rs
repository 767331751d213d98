//! `castellan signer`: the signer as a process of its own, serving the
//! gRPC service of `proto/signer.proto` on a Unix socket. Gateways then hold
//! no key. It trusts nothing a gateway says about purpose:
//!
//! - callers are authenticated by the kernel (`SO_PEERCRED`): only uids on
//!   its allow-list get a connection;
//! - the X.509 key signs X.509-SVID leaves of its trust domain only (one
//!   URI SAN, CA:false, the extensions an SVID may carry, within its TTL
//!   cap), and intermediates only through rotation (subordinate CAs for
//!   other teams only when its config allows);
//! - the JWT key signs JWT-SVID claim sets of its trust domain (re-built
//!   from typed claims, so nothing else rides along) and join tokens,
//!   within their caps;
//! - every signature and every refusal is written to its own hash-chained
//!   audit log before the answer leaves.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use castellan_proto::signer as pb;
use serde::Deserialize;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

use super::config::CaConfig;
use super::{
    AuditCheckpointClaims, InProcessSigner, JoinTokenClaims, JwtAlg, JwtSvidClaims, Rotation, Signer,
    SignerError, Template,
};
use crate::spiffe_id::SpiffeId;

/// How far a token's `iat` may be from the signer's clock.
const CLOCK_SKEW: i64 = 300;
/// The longest join token (as the admin API allows).
const MAX_JOIN_TOKEN: i64 = 7 * 86_400;

/// The signer process's configuration (`castellan signer --config FILE`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignerConfig {
    /// The trust domain it signs for. Default: `example.org`.
    pub trust_domain: String,
    /// Where the keyring and the audit log live. Default: `castellan-signer`.
    pub data_dir: PathBuf,
    /// The Unix socket it serves on. Default: `DATA_DIR/signer.sock`.
    pub socket: Option<PathBuf>,
    /// Uids that may connect (the gateways'). Default: the signer's own.
    pub allowed_uids: Vec<u32>,
    /// The longest X.509-SVID it signs. Default: 604800 (7 days).
    pub max_x509_ttl_seconds: u64,
    /// The longest JWT-SVID it signs. Default: 86400.
    pub max_jwt_ttl_seconds: u64,
    /// Sign subordinate CAs for other teams (`POST /api/v1/ca/intermediates`
    /// on a gateway). Default: false.
    pub allow_subordinate_cas: bool,
    /// Hold an RSA key for RS256 JWT-SVIDs too. Default: false.
    pub jwt_rs256: bool,
    /// The CA made on first start and the lives of rotated authorities
    /// (as a gateway's `[ca]`; rotation is driven by the gateways' leader).
    pub ca: CaConfig,
}

impl Default for SignerConfig {
    fn default() -> Self {
        Self {
            trust_domain: "example.org".into(),
            data_dir: "castellan-signer".into(),
            socket: None,
            allowed_uids: vec![nix::unistd::getuid().as_raw()],
            max_x509_ttl_seconds: 7 * 86_400,
            max_jwt_ttl_seconds: 86_400,
            allow_subordinate_cas: false,
            jwt_rs256: false,
            ca: CaConfig::default(),
        }
    }
}

impl SignerConfig {
    /// Reads and checks a config file; relative paths are the file's.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        let mut config: Self = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.data_dir.is_relative() {
            config.data_dir = base.join(&config.data_dir);
        }
        if let Some(s) = config.socket.as_mut().filter(|s| s.is_relative()) {
            *s = base.join(&*s);
        }
        for p in [
            &mut config.ca.upstream_cert_file,
            &mut config.ca.upstream_key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        anyhow::ensure!(
            crate::spiffe_id::SpiffeId::parse(&format!("spiffe://{}/x", config.trust_domain)).is_ok(),
            "trust_domain: `{}` is not a trust domain name",
            config.trust_domain
        );
        anyhow::ensure!(
            !config.allowed_uids.is_empty(),
            "allowed_uids: list the gateways' uids"
        );
        anyhow::ensure!(
            (60..=365 * 86_400).contains(&config.max_x509_ttl_seconds),
            "max_x509_ttl_seconds: between 60 and 31536000"
        );
        anyhow::ensure!(
            (60..=30 * 86_400).contains(&config.max_jwt_ttl_seconds),
            "max_jwt_ttl_seconds: between 60 and 2592000"
        );
        Ok(config)
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("signer.sock"))
    }
}

/// The signer's own audit log: one JSON object a line, each carrying the
/// SHA-256 of the line before it (`prev`), so a line removed or changed
/// breaks the chain.
pub struct SignerAudit {
    file: Mutex<AuditFile>,
}

struct AuditFile {
    file: std::fs::File,
    prev: String,
    seq: u64,
}

impl SignerAudit {
    /// Opens (or starts) the log at `path`, continuing its chain.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use sha2::Digest as _;
        use std::io::BufRead as _;
        let (mut prev, mut seq) = (hex::encode([0u8; 32]), 0);
        if let Ok(f) = std::fs::File::open(path) {
            for line in std::io::BufReader::new(f).lines() {
                let line = line?;
                if line.is_empty() {
                    continue;
                }
                prev = hex::encode(sha2::Sha256::digest(line.as_bytes()));
                seq += 1;
            }
        }
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            file: Mutex::new(AuditFile { file, prev, seq }),
        })
    }

    /// Appends one record; an error means it was not written.
    pub fn record(&self, mut entry: Value) -> std::io::Result<()> {
        use sha2::Digest as _;
        use std::io::Write as _;
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.seq += 1;
        entry["seq"] = f.seq.into();
        entry["at"] = crate::util::rfc3339(time::OffsetDateTime::now_utc()).into();
        entry["prev"] = f.prev.clone().into();
        let line = entry.to_string();
        f.file.write_all(format!("{line}\n").as_bytes())?;
        f.prev = hex::encode(sha2::Sha256::digest(line.as_bytes()));
        Ok(())
    }
}

/// The gRPC service: purpose checks, then the in-process signer, then the
/// audit record.
pub struct SignerService {
    inner: Arc<InProcessSigner>,
    trust_domain: String,
    max_x509_ttl: i64,
    max_jwt_ttl: i64,
    allow_subordinate_cas: bool,
    allowed_uids: Vec<u32>,
    audit: Arc<SignerAudit>,
}

impl SignerService {
    pub fn new(inner: Arc<InProcessSigner>, config: &SignerConfig, audit: Arc<SignerAudit>) -> Self {
        Self {
            inner,
            trust_domain: config.trust_domain.clone(),
            max_x509_ttl: config.max_x509_ttl_seconds as i64,
            max_jwt_ttl: config.max_jwt_ttl_seconds as i64,
            allow_subordinate_cas: config.allow_subordinate_cas,
            allowed_uids: config.allowed_uids.clone(),
            audit,
        }
    }

    /// The caller's uid, refused unless on the allow-list (the listener
    /// already drops other callers; this holds even if it did not).
    fn caller<T>(&self, req: &Request<T>) -> Result<u32, Status> {
        let uid = req
            .extensions()
            .get::<tonic::transport::server::UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if self.allowed_uids.contains(&uid) => Ok(uid),
            _ => Err(Status::permission_denied("this caller may not use the signer")),
        }
    }

    /// Runs `sign` on the blocking pool and audits what came of it; the
    /// answer leaves only once its record is written.
    async fn audited<T: Send + 'static>(
        &self,
        uid: u32,
        op: &'static str,
        subject: String,
        sign: impl FnOnce() -> Result<(T, Value), SignerError> + Send + 'static,
    ) -> Result<T, Status> {
        let result = tokio::task::spawn_blocking(sign)
            .await
            .map_err(|_| Status::internal("the signing task failed"))?;
        let record = match &result {
            Ok((_, detail)) => {
                json!({ "op": op, "uid": uid, "subject": subject, "outcome": "signed", "detail": detail })
            }
            Err(e) => {
                json!({ "op": op, "uid": uid, "subject": subject, "outcome": "refused", "reason": e.to_string() })
            }
        };
        let audit = self.audit.clone();
        let written = tokio::task::spawn_blocking(move || audit.record(record))
            .await
            .map_err(|_| Status::internal("the audit task failed"))?;
        if let Err(e) = written {
            tracing::error!(error = %e, "the signer's audit log could not be written; nothing is returned");
            return Err(Status::unavailable("the signer's audit log could not be written"));
        }
        result.map(|(t, _)| t).map_err(to_status)
    }

    fn x509_template(&self, r: pb::X509SvidRequest) -> Result<Template, SignerError> {
        let spiffe_id = SpiffeId::parse(&r.spiffe_id).map_err(|e| SignerError::Template(e.to_string()))?;
        if !(1..=self.max_x509_ttl).contains(&r.ttl_seconds) {
            return Err(SignerError::Purpose(format!(
                "an X.509-SVID lives 1 to {} seconds here",
                self.max_x509_ttl
            )));
        }
        // The signer sets every extension that makes a certificate what it
        // is (constraints, key usages, names, key identifiers).
        if let Some(e) = r.extensions.iter().find(|e| e.oid.starts_with(&[2, 5, 29])) {
            return Err(SignerError::Purpose(format!(
                "extension {} is the signer's to set",
                e.oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
            )));
        }
        Ok(Template {
            spiffe_id,
            public_key_der: r.public_key_der,
            ttl: time::Duration::seconds(r.ttl_seconds),
            dns_names: r.dns_names,
            extensions: r.extensions.into_iter().map(|e| (e.oid, e.der)).collect(),
        })
    }

    /// A JWT's lifetime and issue time, checked against the cap and the
    /// clock.
    fn check_jwt_times(&self, iat: i64, exp: i64, cap: i64) -> Result<(), SignerError> {
        let now = crate::util::now_unix();
        if (iat - now).abs() > CLOCK_SKEW {
            return Err(SignerError::Purpose("`iat` is not now".into()));
        }
        if exp <= iat || exp - iat > cap {
            return Err(SignerError::Purpose(format!(
                "a token lives 1 to {cap} seconds here"
            )));
        }
        Ok(())
    }
}

/// A signer error as a gRPC status, its kind in the message so the client
/// can tell them apart.
pub fn to_status(e: SignerError) -> Status {
    let kind = match &e {
        SignerError::ForeignIdentity(_) => "foreign-identity",
        SignerError::Purpose(_) => "purpose",
        SignerError::Template(_) | SignerError::PublicKey(_) => "template",
        SignerError::NoKey(_) => "no-key",
        SignerError::AuthorityUnusable(_) => "authority-unusable",
        SignerError::Rotation(_) => "rotation",
        SignerError::AuthorityInUse { .. } => "in-use",
        SignerError::UnknownAuthority(_) => "unknown-authority",
        _ => "failed",
    };
    let message = format!("[{kind}] {e}");
    match kind {
        "foreign-identity" | "purpose" => Status::permission_denied(message),
        "template" => Status::invalid_argument(message),
        "unknown-authority" => Status::not_found(message),
        "failed" => Status::internal(message),
        _ => Status::failed_precondition(message),
    }
}

#[tonic::async_trait]
impl pb::signer_server::Signer for SignerService {
    async fn sign_x509_svid(
        &self,
        req: Request<pb::X509SvidRequest>,
    ) -> Result<Response<pb::SignedCertificate>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let subject = r.spiffe_id.clone();
        let template = self.x509_template(r);
        let inner = self.inner.clone();
        let cert = self
            .audited(uid, "x509_svid", subject, move || {
                let cert = inner.sign_x509_svid(&template?)?;
                let detail = json!({ "serial": cert.serial, "not_after": cert.not_after.unix_timestamp(), "authority": cert.authority });
                Ok((cert, detail))
            })
            .await?;
        Ok(Response::new(signed(cert)))
    }

    async fn issue_server_certificate(
        &self,
        req: Request<pb::ServerCertificateRequest>,
    ) -> Result<Response<pb::CertificateChain>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let subject = r.spiffe_id.clone();
        let inner = self.inner.clone();
        let pem = self
            .audited(uid, "server_certificate", subject, move || {
                let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| SignerError::Template(e.to_string()))?;
                let ips = r
                    .ips
                    .iter()
                    .map(|ip| {
                        ip.parse()
                            .map_err(|_| SignerError::Template(format!("`{ip}` is not an IP address")))
                    })
                    .collect::<Result<Vec<std::net::IpAddr>, _>>()?;
                let pem = inner.issue_server_certificate(&id, &r.dns_names, &ips, &r.public_key_der)?;
                Ok((pem, json!({ "dns_names": r.dns_names, "ips": r.ips })))
            })
            .await?;
        Ok(Response::new(pb::CertificateChain { pem }))
    }

    async fn sign_subordinate_ca(
        &self,
        req: Request<pb::SubordinateCaRequest>,
    ) -> Result<Response<pb::SignedCertificate>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let allowed = self.allow_subordinate_cas;
        let inner = self.inner.clone();
        let cert = self
            .audited(uid, "subordinate_ca", r.common_name.clone(), move || {
                if !allowed {
                    return Err(SignerError::Purpose(
                        "this signer makes no subordinate CAs (allow_subordinate_cas = false)".into(),
                    ));
                }
                let cert = inner.sign_subordinate_ca(
                    &r.public_key_der,
                    &r.common_name,
                    time::Duration::seconds(r.ttl_seconds),
                )?;
                let detail = json!({ "serial": cert.serial, "not_after": cert.not_after.unix_timestamp() });
                Ok((cert, detail))
            })
            .await?;
        Ok(Response::new(signed(cert)))
    }

    async fn sign_jwt_svid(&self, req: Request<pb::JwtRequest>) -> Result<Response<pb::Jwt>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        // Typed claims: whatever else the caller put in is not signed.
        let claims: Result<JwtSvidClaims, SignerError> =
            serde_json::from_slice(&r.claims_json).map_err(|e| SignerError::Template(format!("claims: {e}")));
        let subject = claims.as_ref().map(|c| c.sub.to_string()).unwrap_or_default();
        let checked = claims.and_then(|c| self.check_jwt_times(c.iat, c.exp, self.max_jwt_ttl).map(|()| c));
        let inner = self.inner.clone();
        let token = self
            .audited(uid, "jwt_svid", subject, move || {
                let claims = checked?;
                let alg = match r.alg.as_str() {
                    "RS256" => JwtAlg::RS256,
                    _ => JwtAlg::ES256,
                };
                let token = inner.sign_jwt_svid(&claims, alg)?;
                Ok((
                    token,
                    json!({ "aud": claims.aud, "exp": claims.exp, "jti": claims.jti, "alg": alg }),
                ))
            })
            .await?;
        Ok(Response::new(pb::Jwt { token }))
    }

    async fn sign_join_token(&self, req: Request<pb::JwtRequest>) -> Result<Response<pb::Jwt>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let claims: Result<JoinTokenClaims, SignerError> =
            serde_json::from_slice(&r.claims_json).map_err(|e| SignerError::Template(format!("claims: {e}")));
        let subject = claims.as_ref().map(|c| c.sub.clone()).unwrap_or_default();
        let issuer = super::join_token_issuer(&self.trust_domain);
        let checked = claims.and_then(|c| {
            if c.iss != issuer || c.aud != [super::JOIN_TOKEN_AUDIENCE] {
                return Err(SignerError::Purpose(
                    "a join token is issued by this trust domain for `castellan-join`".into(),
                ));
            }
            self.check_jwt_times(c.iat, c.exp, MAX_JOIN_TOKEN).map(|()| c)
        });
        let inner = self.inner.clone();
        let token = self
            .audited(uid, "join_token", subject, move || {
                let claims = checked?;
                let token = inner.sign_join_token(&claims)?;
                Ok((token, json!({ "jti": claims.jti, "exp": claims.exp })))
            })
            .await?;
        Ok(Response::new(pb::Jwt { token }))
    }

    async fn sign_audit_checkpoint(&self, req: Request<pb::JwtRequest>) -> Result<Response<pb::Jwt>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let claims: Result<AuditCheckpointClaims, SignerError> =
            serde_json::from_slice(&r.claims_json).map_err(|e| SignerError::Template(format!("claims: {e}")));
        let checked = claims.and_then(|c| {
            if (c.iat - crate::util::now_unix()).abs() > CLOCK_SKEW {
                return Err(SignerError::Purpose("`iat` is not now".into()));
            }
            Ok(c)
        });
        let inner = self.inner.clone();
        let token = self
            .audited(uid, "audit_checkpoint", String::new(), move || {
                let claims = checked?;
                let token = inner.sign_audit_checkpoint(&claims)?;
                Ok((token, json!({ "size": claims.size, "head": claims.head })))
            })
            .await?;
        Ok(Response::new(pb::Jwt { token }))
    }

    async fn authorities(
        &self,
        req: Request<pb::AuthoritiesRequest>,
    ) -> Result<Response<pb::AuthoritiesReply>, Status> {
        self.caller(&req)?;
        Ok(Response::new(authorities_reply(&self.inner.authorities())?))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::AuthoritiesReply>, Status> {
        let uid = self.caller(&req)?;
        let r = req.into_inner();
        let rotation: Result<Rotation, SignerError> = serde_json::from_slice(&r.rotation_json)
            .map_err(|e| SignerError::Template(format!("rotation: {e}")));
        let subject = rotation.as_ref().map(|r| r.name().to_owned()).unwrap_or_default();
        let inner = self.inner.clone();
        let after = self
            .audited(uid, "rotate", subject, move || {
                let rotation = rotation?;
                let after = inner.rotate(&rotation)?;
                let detail = json!({ "rotation": rotation, "generation": after.generation });
                Ok((after, detail))
            })
            .await?;
        Ok(Response::new(authorities_reply(&after)?))
    }
}

fn signed(cert: super::IssuedCertificate) -> pb::SignedCertificate {
    pb::SignedCertificate {
        der: cert.der,
        pem: cert.pem,
        serial: cert.serial,
        not_before: cert.not_before.unix_timestamp(),
        not_after: cert.not_after.unix_timestamp(),
        authority: cert.authority,
        chain_pem: cert.chain_pem,
    }
}

fn authorities_reply(a: &super::Authorities) -> Result<pb::AuthoritiesReply, Status> {
    let authorities_json =
        serde_json::to_vec(a).map_err(|_| Status::internal("authorities do not encode"))?;
    Ok(pb::AuthoritiesReply { authorities_json })
}

/// Opens the keyring (making the CA on first start), the audit log and the
/// socket, and serves until the process ends.
pub async fn run(config: SignerConfig) -> anyhow::Result<()> {
    use anyhow::Context as _;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("data_dir {}", config.data_dir.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))?;
    let ca_dir = config.data_dir.join("ca");
    let signer = open_keyring(&config, &ca_dir)?;
    let audit = Arc::new(SignerAudit::open(&config.data_dir.join("signer-audit.log"))?);
    let socket = config.socket();
    let _ = std::fs::remove_file(&socket);
    let listener =
        tokio::net::UnixListener::bind(&socket).with_context(|| format!("socket {}", socket.display()))?;
    // Anyone may connect; only the kernel's word on who they are counts.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666))?;
    let allowed = config.allowed_uids.clone();
    let refusals = audit.clone();
    use tokio_stream::StreamExt as _;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter_map(move |conn| match conn {
        Ok(stream) => match stream.peer_cred() {
            Ok(cred) if allowed.contains(&cred.uid()) => Some(Ok(stream)),
            cred => {
                let uid = cred.ok().map(|c| c.uid());
                tracing::warn!(?uid, "a caller not on the allow-list was refused");
                let _ = refusals.record(json!({ "op": "connect", "uid": uid, "outcome": "refused", "reason": "uid not allowed" }));
                None
            }
        },
        Err(e) => Some(Err(e)),
    });
    let service = SignerService::new(Arc::new(signer), &config, audit);
    println!("signer listening on unix:{}", socket.display());
    tonic::transport::Server::builder()
        .add_service(pb::signer_server::SignerServer::new(service))
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}

/// The signer's keyring: opened, or made on first start (like a gateway's).
fn open_keyring(config: &SignerConfig, ca_dir: &Path) -> anyhow::Result<InProcessSigner> {
    let (signer, _) = super::open_or_create(ca_dir, &config.trust_domain, &config.ca)?;
    let server_cert_ttl =
        time::Duration::seconds(config.max_x509_ttl_seconds as i64).min(time::Duration::days(90));
    let mut signer = signer.with_server_cert_ttl(server_cert_ttl);
    if config.jwt_rs256 {
        signer = signer.with_rsa_jwt_key(&crate::ca::load_or_create_rsa_jwt_key(ca_dir)?)?;
    }
    Ok(signer)
}
