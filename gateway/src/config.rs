//! The one typed configuration of a Castellan server: parsed from TOML,
//! overridden by `CASTELLAN_*` environment variables, validated at start-up
//! with errors that name the offending key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spiffe_id::validate_trust_domain;
use crate::trust::TrustSourceSpec;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A value is present but not acceptable.
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

/// Everything a server needs. Every field has a default, so an empty file
/// is a valid (loopback-only, TLS-on) configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory for the store, the CA keys and the admin token.
    /// Env: `CASTELLAN_DATA_DIR`. Default: `./castellan-data`.
    pub data_dir: PathBuf,
    /// The SPIFFE trust domain this server issues in.
    /// Env: `CASTELLAN_TRUST_DOMAIN`. Default: `example.org`.
    pub trust_domain: String,
    /// Directory holding the policy bundle (`.manifest`, `*.rego`,
    /// `data.json`); unset means the embedded default bundle.
    /// Env: `CASTELLAN_POLICIES`.
    pub policies: Option<PathBuf>,
    /// The URL relying parties reach this server at; the `iss` of JWT-SVIDs
    /// and the base of discovery. Default: the listener's own address.
    /// Env: `CASTELLAN_PUBLIC_URL`.
    pub public_url: Option<String>,
    /// Wall-clock budget of one policy evaluation, in milliseconds; a policy
    /// that runs longer fails the request closed. Default: 100.
    pub policy_deadline_ms: u64,
    /// The HTTP API.
    pub http: HttpConfig,
    /// Limits of the attestor sandbox.
    pub sandbox: SandboxConfig,
    /// Issuance limits that hold whatever a policy says.
    pub issuance: IssuanceConfig,
    /// Trust sources declared here live alongside those created over the
    /// API; they cannot be deleted over the API.
    pub trust_sources: Vec<TrustSourceSpec>,
    /// Webhooks notified of approval events, signed with HMAC-SHA256.
    pub webhooks: Vec<crate::notify::WebhookConfig>,
    /// OIDC issuers whose ID tokens authenticate people (approvers).
    pub oidc_issuers: Vec<crate::auth::OidcIssuerConfig>,
    /// Policy bundles loaded at run time.
    pub bundles: BundlesConfig,
    /// Decision logs in OPA's shape.
    pub decision_logs: DecisionLogsConfig,
    /// The SPIFFE Workload API.
    pub workload_api: WorkloadApiConfig,
    /// The certificate authority's layout.
    pub ca: CaConfig,
    /// A separate signer process, instead of keys in this one.
    pub signer: SignerClientConfig,
    /// Prometheus metrics.
    pub metrics: MetricsConfig,
    /// Where records are kept.
    pub store: StoreConfig,
    /// SPIFFE federation with other trust domains.
    pub federation: FederationConfig,
}

/// Federation: foreign trust domains' bundles, and the refresh hint
/// Castellan's own bundle endpoint announces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// `spiffe_refresh_hint` of the bundle served at
    /// `/.well-known/spiffe-bundle`, seconds. Default: 300.
    pub refresh_hint_seconds: u64,
    /// Foreign trust domains (`[[federation.trust_domains]]`).
    pub trust_domains: Vec<crate::federation::FederatedTrustDomain>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            refresh_hint_seconds: 300,
            trust_domains: Vec::new(),
        }
    }
}

/// Where the store lives: redb in the data directory (one gateway), or a
/// PostgreSQL database that several gateways share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `redb` or `postgres`. Default: `redb` (`DATA_DIR/castellan.redb`).
    pub backend: String,
    /// The database, `postgres://user@host:port/dbname?…`, with no password
    /// in it. Env: `CASTELLAN_STORE_URL`.
    pub url: Option<String>,
    /// A file holding the database password (read at start, never logged).
    pub password_file: Option<PathBuf>,
    /// Connections kept for reads (the writer has one more). Default: 16.
    pub max_connections: usize,
    /// Roots (PEM) the database's TLS certificate must chain to, when the
    /// URL's `sslmode` asks for TLS and it names no `sslrootcert`. Default:
    /// the Web PKI roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: "redb".into(),
            url: None,
            password_file: None,
            max_connections: 16,
            ca_file: None,
        }
    }
}

impl StoreConfig {
    /// The PostgreSQL connection settings: the URL plus the password file,
    /// and TLS when `sslmode` asks for it.
    pub fn postgres(&self) -> Result<(postgres::Config, Option<crate::store::MakeRustls>), ConfigError> {
        let url = self.url.as_deref().ok_or(ConfigError::Invalid {
            key: "store.url",
            message: "is required with store.backend = \"postgres\" (or set CASTELLAN_STORE_URL)".into(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            key: "store.url",
            message,
        };
        let (url, ssl) = take_ssl_params(url);
        if let Some(k) = ["sslcert", "sslkey", "sslpassword", "sslcrl"]
            .iter()
            .find(|k| ssl.iter().any(|(n, _)| n == *k))
        {
            return Err(invalid(format!(
                "names `{k}`: client certificates are not supported; authenticate with store.password_file"
            )));
        }
        let param = |k: &str| ssl.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let tls = match param("sslmode").as_deref() {
            None | Some("disable") => None,
            Some("require" | "verify-ca" | "verify-full") => {
                let roots = param("sslrootcert")
                    .map(PathBuf::from)
                    .or_else(|| self.ca_file.clone());
                let client = match &roots {
                    Some(path) => crate::tls::private_client_config(path),
                    None => crate::tls::web_client_config(None),
                }
                .map_err(|e| ConfigError::Invalid {
                    key: "store.ca_file",
                    message: crate::util::error_chain(&e),
                })?;
                Some(crate::store::MakeRustls(client))
            }
            Some(mode @ ("allow" | "prefer")) => {
                return Err(invalid(format!(
                    "has sslmode={mode}, which falls back to no encryption and checks no certificate; \
                     use sslmode=verify-full (or disable, on a private network)"
                )));
            }
            Some(other) => {
                return Err(invalid(format!(
                    "has an unknown sslmode `{}`",
                    other.chars().take(32).collect::<String>()
                )));
            }
        };
        let mut config: postgres::Config = url.parse().map_err(|e| ConfigError::Invalid {
            key: "store.url",
            message: format!("is not a PostgreSQL URL: {e}"),
        })?;
        if config.get_password().is_some() {
            return Err(ConfigError::Invalid {
                key: "store.url",
                message: "must not hold a password: put it in store.password_file".into(),
            });
        }
        config.ssl_mode(if tls.is_some() {
            postgres::config::SslMode::Require
        } else {
            postgres::config::SslMode::Disable
        });
        if let Some(file) = &self.password_file {
            let password = std::fs::read_to_string(file).map_err(|e| ConfigError::Invalid {
                key: "store.password_file",
                message: format!("{}: {e}", file.display()),
            })?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        Ok((config, tls))
    }
}

/// Splits the TLS parameters (`ssl…`) out of a PostgreSQL URL or key=value
/// string: the client library knows few of them, and Castellan decides TLS
/// itself.
fn take_ssl_params(url: &str) -> (String, Vec<(String, String)>) {
    let mut ssl = Vec::new();
    let mut keep = |pair: &str| match pair.split_once('=') {
        Some((k, v)) if k.starts_with("ssl") => {
            ssl.push((k.to_owned(), v.to_owned()));
            false
        }
        _ => true,
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_owned(), ssl);
        };
        let kept: Vec<&str> = query.split('&').filter(|p| keep(p)).collect();
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        (url, ssl)
    } else {
        let kept: Vec<&str> = url.split_whitespace().filter(|p| keep(p)).collect();
        (kept.join(" "), ssl)
    }
}

/// Prometheus metrics at `GET /metrics`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Serve them. Default: true.
    pub enabled: bool,
    /// A separate plain-HTTP listener for them (e.g. `127.0.0.1:9090`),
    /// instead of the API listener. Default: none (on the API listener).
    pub addr: Option<std::net::SocketAddr>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            addr: None,
        }
    }
}

/// Where the keys are: in this process (the default), or in a separate
/// signer process (`castellan signer`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignerClientConfig {
    /// `unix:/run/castellan/signer.sock`: sign through that signer; this
    /// gateway's data directory then holds no CA or JWT key, and `[ca]`
    /// only sets when automatic rotation acts. Env: `CASTELLAN_SIGNER`.
    pub endpoint: Option<String>,
}

impl SignerClientConfig {
    /// The signer's socket, when one is configured.
    pub fn socket(&self) -> Option<PathBuf> {
        self.endpoint
            .as_deref()
            .map(|e| PathBuf::from(e.strip_prefix("unix:").unwrap_or(e)))
    }
}

pub use crate::signer::config::{CaConfig, Pkcs11Config};

/// The Workload API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkloadApiConfig {
    /// Unix socket path. Default: `DATA_DIR/workload.sock`.
    /// Env: `CASTELLAN_WORKLOAD_SOCKET`.
    pub socket: Option<PathBuf>,
    /// Also give callers a `unix:sha256:<hex>` selector: the SHA-256 of
    /// their executable (hashed once per file version, then cached).
    /// Default: false.
    pub exe_sha256: bool,
    /// Signature algorithm of JWT-SVIDs: `ES256` or `RS256`. Default: `ES256`.
    pub jwt_svid_algorithm: String,
    /// Envoy's Secret Discovery Service on the same socket.
    pub sds: SdsConfig,
}

/// Names of the SDS secrets that stand for something else, as a SPIRE
/// agent's `sds` block has them. Any other name is a SPIFFE ID (a TLS
/// certificate) or a trust domain ID (a validation context).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdsConfig {
    /// The caller's first SVID. Default: `default`.
    pub default_svid_name: String,
    /// The validation context of Castellan's own trust domain. Default: `ROOTCA`.
    pub default_bundle_name: String,
    /// One validation context for every trust domain the caller may trust
    /// (SPIFFE validation only). Default: `ALL`.
    pub default_all_bundles_name: String,
    /// Send plain `trusted_ca` validation contexts rather than Envoy's SPIFFE
    /// certificate validator. A caller may override it with the node metadata
    /// key `disable_spiffe_cert_validation`. Default: false.
    pub disable_spiffe_cert_validation: bool,
}

impl Default for SdsConfig {
    fn default() -> Self {
        Self {
            default_svid_name: "default".into(),
            default_bundle_name: "ROOTCA".into(),
            default_all_bundles_name: "ALL".into(),
            disable_spiffe_cert_validation: false,
        }
    }
}

impl WorkloadApiConfig {
    /// The JWT-SVID algorithm (validated at start: ES256 or RS256).
    pub fn jwt_alg(&self) -> crate::signer::JwtAlg {
        match self.jwt_svid_algorithm.as_str() {
            "RS256" => crate::signer::JwtAlg::RS256,
            _ => crate::signer::JwtAlg::ES256,
        }
    }
}

impl Default for WorkloadApiConfig {
    fn default() -> Self {
        Self {
            socket: None,
            exe_sha256: false,
            jwt_svid_algorithm: "ES256".into(),
            sds: SdsConfig::default(),
        }
    }
}

/// Decision logging.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecisionLogsConfig {
    /// Log every policy decision. Default: false.
    pub enabled: bool,
    /// File to append JSON lines to. Default: `DATA_DIR/decisions.log`.
    pub path: Option<PathBuf>,
    /// JSON Pointers into the input to erase before logging, e.g.
    /// `/request/justification`. Default: none.
    pub mask: Vec<String>,
}

/// Bundles pushed with `PUT /api/v1/bundles/{name}` or watched on disk.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BundlesConfig {
    /// `required` (default): a bundle must be signed by one of `keys`.
    /// `off` accepts unsigned bundles; only for development.
    pub verification: String,
    /// Public keys (PEM) that may sign bundles.
    pub keys: Vec<BundleKey>,
    /// Bundle files or directories to load at start and reload when they
    /// change (checked every two seconds).
    pub sources: Vec<BundleSource>,
    /// Attestation methods a pushed or watched bundle may replace although
    /// Castellan (or another bundle) serves them, e.g. `["k8s_sat"]`.
    /// Default: none; a bundle may only add new methods.
    pub replaceable_methods: Vec<String>,
}

/// A bundle signing key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleKey {
    /// Matched against the signature's `keyid` when it has one.
    #[serde(default)]
    pub keyid: Option<String>,
    pub public_key_file: PathBuf,
}

/// A watched bundle.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleSource {
    pub name: String,
    /// A `.tar.gz` bundle or a bundle directory.
    pub path: PathBuf,
}

impl Default for BundlesConfig {
    fn default() -> Self {
        Self {
            verification: "required".into(),
            keys: Vec::new(),
            sources: Vec::new(),
            replaceable_methods: Vec::new(),
        }
    }
}

/// The HTTP API listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on. Env: `CASTELLAN_HTTP_ADDR`. Default: `127.0.0.1:8443`.
    pub addr: SocketAddr,
    /// Largest request body accepted, in bytes. Default: 65536.
    pub max_body_bytes: usize,
    /// TLS settings. TLS is on unless `enabled = false`, which is only
    /// accepted on a loopback address.
    pub tls: TlsConfig,
    /// Connections open at once, at most; beyond it new ones are closed at
    /// once. Default: 4096.
    pub max_connections: usize,
    /// Connections one client (IPv4 address, or IPv6 /64) may hold open at
    /// once. Default: 512.
    pub max_connections_per_client: usize,
    /// Seconds a connection may take to send a request's headers (HTTP/1)
    /// or to finish its TLS handshake. Default: 10. (A request body must
    /// arrive within 10 s of its headers.)
    pub header_read_timeout_seconds: u64,
}

/// TLS for the HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve TLS. Default: true.
    pub enabled: bool,
    /// PEM certificate chain to serve. Unset (with `key_file` unset) means a
    /// server certificate issued by Castellan's own CA.
    /// Env: `CASTELLAN_TLS_CERT_FILE`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key for `cert_file`. Env: `CASTELLAN_TLS_KEY_FILE`.
    pub key_file: Option<PathBuf>,
    /// DNS names for a certificate from the own CA. Default: `["localhost"]`.
    pub dns_names: Vec<String>,
}

/// Limits on each attestor module call.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Wall-clock budget of one call, in milliseconds. Default: 50.
    pub deadline_ms: u64,
    /// Linear memory a module may grow to, in bytes. Default: 16 MiB.
    pub max_memory_bytes: usize,
    /// Module instances alive at once (the pool size). Default: 64.
    pub max_instances: u32,
}

/// Hard bounds on issued credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuanceConfig {
    /// The longest X.509-SVID lifetime ever issued, whatever the policy
    /// says, in seconds. Default: 86400.
    pub max_ttl_seconds: u64,
    /// The shortest lifetime that may be requested, in seconds. Default: 60.
    pub min_ttl_seconds: u64,
    /// Verified service-account tokens remembered, so the same token is not
    /// verified again until it expires (0: off). Default: 65536.
    pub evidence_cache_entries: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("castellan-data"),
            trust_domain: "example.org".into(),
            policies: None,
            policy_deadline_ms: 100,
            public_url: None,
            http: HttpConfig::default(),
            sandbox: SandboxConfig::default(),
            issuance: IssuanceConfig::default(),
            trust_sources: Vec::new(),
            webhooks: Vec::new(),
            oidc_issuers: Vec::new(),
            bundles: BundlesConfig::default(),
            decision_logs: DecisionLogsConfig::default(),
            workload_api: WorkloadApiConfig::default(),
            ca: CaConfig::default(),
            signer: SignerClientConfig::default(),
            metrics: MetricsConfig::default(),
            store: StoreConfig::default(),
            federation: FederationConfig::default(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8443)),
            max_body_bytes: 64 * 1024,
            tls: TlsConfig::default(),
            max_connections: 4096,
            max_connections_per_client: 512,
            header_read_timeout_seconds: 10,
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            cert_file: None,
            key_file: None,
            dns_names: vec!["localhost".into()],
        }
    }
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            deadline_ms: 50,
            max_memory_bytes: 16 << 20,
            max_instances: 64,
        }
    }
}

impl Default for IssuanceConfig {
    fn default() -> Self {
        Self {
            max_ttl_seconds: 86_400,
            min_ttl_seconds: 60,
            evidence_cache_entries: 65_536,
        }
    }
}

impl Config {
    /// Reads a TOML file, applies environment overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        // Relative paths in a file are relative to that file.
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_relative(base);
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `CASTELLAN_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("CASTELLAN_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("CASTELLAN_TRUST_DOMAIN") {
            self.trust_domain = v;
        }
        if let Some(v) = get("CASTELLAN_WORKLOAD_SOCKET") {
            self.workload_api.socket = Some(v.into());
        }
        if let Some(v) = get("CASTELLAN_SIGNER") {
            self.signer.endpoint = Some(v);
        }
        if let Some(v) = get("CASTELLAN_PUBLIC_URL") {
            self.public_url = Some(v);
        }
        if let Some(v) = get("CASTELLAN_POLICIES") {
            self.policies = Some(v.into());
        }
        if let Some(v) = get("CASTELLAN_HTTP_ADDR") {
            self.http.addr = v.parse().map_err(|e| ConfigError::Invalid {
                key: "http.addr (CASTELLAN_HTTP_ADDR)",
                message: format!("`{v}` is not HOST:PORT: {e}"),
            })?;
        }
        if let Some(v) = get("CASTELLAN_TLS_CERT_FILE") {
            self.http.tls.cert_file = Some(v.into());
        }
        if let Some(v) = get("CASTELLAN_TLS_KEY_FILE") {
            self.http.tls.key_file = Some(v.into());
        }
        if let Some(v) = get("CASTELLAN_STORE_URL") {
            self.store.url = Some(v);
        }
        Ok(())
    }

    fn resolve_relative(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.data_dir);
        if let Some(p) = self.policies.as_mut() {
            fix(p);
        }
        if let Some(p) = self.http.tls.cert_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.http.tls.key_file.as_mut() {
            fix(p);
        }
        for ts in &mut self.trust_sources {
            if let Some(p) = ts.jwks_file.as_mut() {
                fix(p);
            }
            if let Some(p) = ts.certificates_file.as_mut() {
                fix(p);
            }
        }
        if let Some(p) = self.workload_api.socket.as_mut() {
            fix(p);
        }
        if let Some(p) = self.store.password_file.as_mut() {
            fix(p);
        }
        if let Some(p) = self.store.ca_file.as_mut() {
            fix(p);
        }
        for p in [&mut self.ca.upstream_cert_file, &mut self.ca.upstream_key_file]
            .into_iter()
            .flatten()
        {
            fix(p);
        }
        if let Some(p) = self.ca.pkcs11.as_mut() {
            fix(&mut p.module);
            fix(&mut p.pin_file);
        }
        if let Some(p) = self.decision_logs.path.as_mut() {
            fix(p);
        }
        for k in &mut self.bundles.keys {
            fix(&mut k.public_key_file);
        }
        for s in &mut self.bundles.sources {
            fix(&mut s.path);
        }
        for o in &mut self.oidc_issuers {
            if let Some(p) = o.jwks_file.as_mut() {
                fix(p);
            }
        }
        for f in &mut self.federation.trust_domains {
            if let Some(p) = f.bundle_file.as_mut() {
                fix(p);
            }
            if let Some(p) = f.ca_file.as_mut() {
                fix(p);
            }
        }
        for w in &mut self.webhooks {
            fix(&mut w.secret_file);
            if let Some(p) = w.ca_file.as_mut() {
                fix(p);
            }
        }
    }

    /// Checks every value; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_trust_domain(&self.trust_domain).map_err(|e| ConfigError::Invalid {
            key: "trust_domain",
            message: format!("`{}`: {e}", self.trust_domain),
        })?;
        if !self.http.tls.enabled && !self.http.addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                key: "http.tls.enabled",
                message: format!(
                    "plain HTTP is only allowed on a loopback address, not {}",
                    self.http.addr
                ),
            });
        }
        if self.http.tls.cert_file.is_some() != self.http.tls.key_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "http.tls.cert_file",
                message: "cert_file and key_file must be given together".into(),
            });
        }
        if !(1024..=16 << 20).contains(&self.http.max_body_bytes) {
            return Err(ConfigError::Invalid {
                key: "http.max_body_bytes",
                message: "must be between 1024 and 16777216".into(),
            });
        }
        if let Some(m) = self.decision_logs.mask.iter().find(|m| !m.starts_with('/')) {
            return Err(ConfigError::Invalid {
                key: "decision_logs.mask",
                message: format!("`{m}` is not a JSON Pointer (it must start with `/`)"),
            });
        }
        if !matches!(self.bundles.verification.as_str(), "required" | "off") {
            return Err(ConfigError::Invalid {
                key: "bundles.verification",
                message: format!("must be `required` or `off`, not `{}`", self.bundles.verification),
            });
        }
        if !(1..=10_000).contains(&self.policy_deadline_ms) {
            return Err(ConfigError::Invalid {
                key: "policy_deadline_ms",
                message: "must be between 1 and 10000".into(),
            });
        }
        if !(1..=10_000).contains(&self.sandbox.deadline_ms) {
            return Err(ConfigError::Invalid {
                key: "sandbox.deadline_ms",
                message: "must be between 1 and 10000".into(),
            });
        }
        if !(1 << 20..=1 << 30).contains(&self.sandbox.max_memory_bytes) {
            return Err(ConfigError::Invalid {
                key: "sandbox.max_memory_bytes",
                message: "must be between 1 MiB and 1 GiB".into(),
            });
        }
        if !(1..=4096).contains(&self.sandbox.max_instances) {
            return Err(ConfigError::Invalid {
                key: "sandbox.max_instances",
                message: "must be between 1 and 4096".into(),
            });
        }
        if self.issuance.min_ttl_seconds == 0 || self.issuance.min_ttl_seconds > self.issuance.max_ttl_seconds
        {
            return Err(ConfigError::Invalid {
                key: "issuance.min_ttl_seconds",
                message: "must be at least 1 and not above issuance.max_ttl_seconds".into(),
            });
        }
        for (key, ttl) in [
            (
                "ca.x509_authority_ttl_seconds",
                self.ca.x509_authority_ttl_seconds,
            ),
            ("ca.jwt_key_ttl_seconds", self.ca.jwt_key_ttl_seconds),
        ] {
            if !(60..=20 * 365 * 86_400).contains(&ttl) {
                return Err(ConfigError::Invalid {
                    key,
                    message: "must be between 60 seconds and 20 years (what it signs is cut to its life)"
                        .into(),
                });
            }
        }
        if let Some(e) = &self.signer.endpoint
            && (!e.starts_with("unix:/") || e.len() < 7)
        {
            return Err(ConfigError::Invalid {
                key: "signer.endpoint",
                message: format!("`{e}` is not unix:/ABSOLUTE/PATH"),
            });
        }
        match (self.ca.key_manager.as_str(), &self.ca.pkcs11) {
            ("disk", _) | ("pkcs11", Some(_)) => {}
            ("pkcs11", None) => {
                return Err(ConfigError::Invalid {
                    key: "ca.pkcs11",
                    message: "key_manager = \"pkcs11\" needs [ca.pkcs11] module, token_label and pin_file"
                        .into(),
                });
            }
            (other, _) => {
                return Err(ConfigError::Invalid {
                    key: "ca.key_manager",
                    message: format!("must be disk or pkcs11, not `{other}`"),
                });
            }
        }
        let (p, a) = (self.ca.prepare_at, self.ca.activate_at);
        if !(0.0 < p && p < a && a < 1.0) {
            return Err(ConfigError::Invalid {
                key: "ca.activate_at",
                message: "needs 0 < ca.prepare_at < ca.activate_at < 1".into(),
            });
        }
        if !matches!(self.workload_api.jwt_svid_algorithm.as_str(), "ES256" | "RS256") {
            return Err(ConfigError::Invalid {
                key: "workload_api.jwt_svid_algorithm",
                message: format!(
                    "must be ES256 or RS256, not `{}`",
                    self.workload_api.jwt_svid_algorithm
                ),
            });
        }
        match self.store.backend.as_str() {
            "redb" => {}
            "postgres" => {
                self.store.postgres()?;
            }
            other => {
                return Err(ConfigError::Invalid {
                    key: "store.backend",
                    message: format!("must be `redb` or `postgres`, not `{other}`"),
                });
            }
        }
        if !(1..=1024).contains(&self.store.max_connections) {
            return Err(ConfigError::Invalid {
                key: "store.max_connections",
                message: "must be between 1 and 1024".into(),
            });
        }
        let sds = &self.workload_api.sds;
        let sds_names = [
            ("workload_api.sds.default_svid_name", &sds.default_svid_name),
            ("workload_api.sds.default_bundle_name", &sds.default_bundle_name),
            (
                "workload_api.sds.default_all_bundles_name",
                &sds.default_all_bundles_name,
            ),
        ];
        for (i, (key, name)) in sds_names.iter().enumerate() {
            if name.is_empty()
                || name.starts_with("spiffe://")
                || sds_names[..i].iter().any(|(_, n)| n == name)
            {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!(
                        "`{name}` must be non-empty, distinct from the other SDS names and not a SPIFFE ID"
                    ),
                });
            }
        }
        if !(1..=86_400).contains(&self.federation.refresh_hint_seconds) {
            return Err(ConfigError::Invalid {
                key: "federation.refresh_hint_seconds",
                message: "must be between 1 and 86400".into(),
            });
        }
        let mut seen = std::collections::HashSet::new();
        for f in &self.federation.trust_domains {
            let problem = f
                .check(&self.trust_domain)
                .err()
                .or_else(|| (!seen.insert(&f.trust_domain)).then(|| "appears twice".to_owned()));
            if let Some(message) = problem {
                return Err(ConfigError::Invalid {
                    key: "federation.trust_domains",
                    message: format!("`{}`: {message}", f.trust_domain),
                });
            }
        }
        for (i, ts) in self.trust_sources.iter().enumerate() {
            ts.check().map_err(|e| ConfigError::Invalid {
                key: "trust_sources",
                message: format!("entry {i} (`{}`): {e}", ts.name),
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_a_valid_config() {
        let c: Config = toml::from_str("").unwrap();
        c.validate().unwrap();
        assert!(c.http.tls.enabled);
        assert_eq!(c.trust_domain, "example.org");
    }

    #[test]
    fn plain_http_off_loopback_is_refused() {
        let mut c: Config =
            toml::from_str("[http]\naddr = \"0.0.0.0:8443\"\ntls = { enabled = false }").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("http.tls.enabled"), "{e}");
        c.http.addr = "127.0.0.1:8443".parse().unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        assert!(toml::from_str::<Config>("trust_domian = \"x\"").is_err());
        let mut c = Config::default();
        c.apply_env(|k| (k == "CASTELLAN_TRUST_DOMAIN").then(|| "Not Valid".to_string()))
            .unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("trust_domain"));
        let e = c.apply_env(|k| (k == "CASTELLAN_HTTP_ADDR").then(|| "nope".to_string()));
        assert!(e.unwrap_err().to_string().contains("CASTELLAN_HTTP_ADDR"));
    }

    #[test]
    fn a_postgres_store_needs_a_url_without_a_password() {
        let refused = |toml_text: &str| {
            let c: Config = toml::from_str(toml_text).unwrap();
            c.validate().unwrap_err().to_string()
        };
        assert!(refused("[store]\nbackend = \"mysql\"").contains("store.backend"));
        assert!(refused("[store]\nbackend = \"postgres\"").contains("CASTELLAN_STORE_URL"));
        let e = refused("[store]\nbackend = \"postgres\"\nurl = \"postgres://c:hunter2@db/castellan\"");
        assert!(e.contains("store.password_file") && !e.contains("hunter2"), "{e}");
        for mode in ["prefer", "allow"] {
            let e = refused(&format!(
                "[store]\nbackend = \"postgres\"\nurl = \"postgres://c@db/x?sslmode={mode}\""
            ));
            assert!(e.contains("verify-full"), "{mode}: {e}");
        }
        let e = refused(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://c@db/x?sslmode=verify-full&sslcert=c.pem\"",
        );
        assert!(e.contains("client certificates"), "{e}");
        let e = refused(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://c@db/x?sslmode=verify-full&sslrootcert=/nonexistent.pem\"",
        );
        assert!(e.contains("/nonexistent.pem"), "{e}");
        assert!(refused("[store]\nmax_connections = 0").contains("store.max_connections"));

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("db-password");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut c: Config = toml::from_str(&format!(
            "[store]\nbackend = \"postgres\"\nurl = \"postgres://c@db/castellan\"\npassword_file = {:?}",
            file.display().to_string()
        ))
        .unwrap();
        c.apply_env(|k| (k == "CASTELLAN_STORE_URL").then(|| "postgres://c@other:5433/castellan".into()))
            .unwrap();
        c.validate().unwrap();
        let (pg, tls) = c.store.postgres().unwrap();
        assert!(tls.is_none());
        assert_eq!(pg.get_password(), Some(&b"s3cret"[..]));
        assert_eq!(pg.get_ports(), [5433]);
    }

    /// `sslmode` require, verify-ca and verify-full all mean verified TLS,
    /// against `sslrootcert`, `store.ca_file` or the Web PKI; the TLS
    /// parameters are taken out of what the client library parses.
    #[test]
    fn postgres_tls_modes_verify_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = dir.path().join("db-ca.pem");
        std::fs::write(&pem, ca.self_signed(&key).unwrap().pem()).unwrap();
        let store = |url: String, ca_file: Option<&Path>| StoreConfig {
            backend: "postgres".into(),
            url: Some(url),
            ca_file: ca_file.map(Path::to_owned),
            ..StoreConfig::default()
        };
        for mode in ["require", "verify-ca", "verify-full"] {
            let (pg, tls) = store(
                format!(
                    "postgres://c@db/x?sslmode={mode}&sslrootcert={}&application_name=gw",
                    pem.display()
                ),
                None,
            )
            .postgres()
            .unwrap();
            assert!(tls.is_some(), "{mode}");
            assert_eq!(pg.get_ssl_mode(), postgres::config::SslMode::Require);
            assert_eq!(pg.get_application_name(), Some("gw"));
        }
        let (_, tls) = store("postgres://c@db/x?sslmode=verify-full".into(), Some(&pem))
            .postgres()
            .unwrap();
        assert!(tls.is_some());
        let (pg, tls) = store("host=db user=c dbname=x sslmode=verify-full".into(), None)
            .postgres()
            .unwrap();
        assert!(tls.is_some(), "the Web PKI by default");
        assert_eq!(pg.get_dbname(), Some("x"));
        let (pg, tls) = store("postgres://c@db/x?sslmode=disable".into(), None)
            .postgres()
            .unwrap();
        assert!(tls.is_none());
        assert_eq!(pg.get_ssl_mode(), postgres::config::SslMode::Disable);
    }
}
