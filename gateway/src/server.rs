//! Assembles a running server from a [`Config`]: the store, CA and signer,
//! trust sources, attestors, policies and the HTTP listener (plain on
//! loopback, rustls TLS otherwise).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use castellan::attest::Attestors;
use castellan::attest::challenge::Client;
use castellan::auth::Authenticator;
use castellan::bundle::BundleKeys;
use castellan::ca;
use castellan::config::Config;
use castellan::engine::Engine;
use castellan::http::{AppState, router};
use castellan::signer::{InProcessSigner, Signer};
use castellan::store::Store;
use castellan::trust::{Registry, TrustSource};

/// A server ready to listen.
pub struct App {
    pub engine: Arc<Engine>,
    pub auth: Arc<Authenticator>,
    pub bundles: Arc<castellan::bundle::Bundles>,
    /// Public keys that may sign bundles, and whether unsigned ones pass.
    pub bundle_keys: Arc<BundleKeys>,
    /// Foreign trust domains' bundles (refreshers start with the listener).
    pub federation: Arc<castellan::federation::Federation>,
    /// Started with the listener; `None` once started or when no webhooks.
    pub dispatcher: std::sync::Mutex<Option<castellan::notify::Dispatcher>>,
    pub admin_token_path: PathBuf,
    pub ca_created: bool,
    pub config: Config,
}

/// Builds every stage from `config`. `extra_sources` are in-memory trust
/// sources (the dev cluster) that are never persisted.
pub async fn build(config: Config, extra_sources: Vec<TrustSource>) -> anyhow::Result<App> {
    let dir = &config.data_dir;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    restrict_dir(dir)?;

    let store = open_store(&config).await?.observe_commits(Arc::new(|took| {
        let m = castellan::metrics::get();
        m.store_commit_seconds.observe(took.as_secs_f64());
        m.stage("record", took.as_secs_f64());
    }));

    let ca_dir = dir.join("ca");
    let (signer, ca_created): (Arc<dyn Signer>, bool) = match config.signer.socket() {
        // The keys are elsewhere: this data directory never holds one.
        Some(socket) => (
            Arc::new(
                castellan::signer::remote::RemoteSigner::connect(&socket)
                    .with_context(|| format!("signer.endpoint unix:{}", socket.display()))?,
            ),
            false,
        ),
        None => {
            let (mut signer, created) = open_signer(&config, &ca_dir)?;
            if config.workload_api.jwt_svid_algorithm == "RS256" {
                signer = signer.with_rsa_jwt_key(&ca::load_or_create_rsa_jwt_key(&ca_dir)?)?;
            }
            (Arc::new(signer), created)
        }
    };
    // A CA that is not valid now would sign nothing valid: refuse to start
    // rather than serve refusals (or, worse, credentials nobody accepts).
    let (from, until) = signer.authorities().x509_validity();
    let at = |t| time::OffsetDateTime::from_unix_timestamp(t).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let (from, until) = (at(from), at(until));
    let now = time::OffsetDateTime::now_utc();
    if now < from || now >= until {
        anyhow::bail!(
            "{} (the CA in {}). Rotate it while the server is stopped: \
             `castellan ca prepare --offline --config FILE`, then `castellan ca activate ID --offline --config FILE` \
             (relying parties must trust the new authority's bundle)",
            castellan::signer::authority_problem(from, until, now),
            ca_dir.display()
        );
    }

    let admin_token_path = dir.join("admin.token");
    let oidc = Arc::new(castellan::auth::OidcIssuers::new(&config.oidc_issuers)?);
    let auth = Arc::new(
        Authenticator::load_or_create(&admin_token_path)
            .with_context(|| format!("admin token {}", admin_token_path.display()))?
            .with_oidc(oidc.clone()),
    );

    auth.load_tokens(store.tokens().await?);

    let cache_dir = dir.join("cache").join("attestors");
    let attestors = Arc::new(Attestors::with_cache_dir(
        &config.sandbox,
        castellan::attest::embedded::MODULES,
        Some(&cache_dir),
    )?);

    let mut sources = Vec::new();
    for spec in config.trust_sources.clone() {
        let name = spec.name.clone();
        sources.push(
            spec.into_source("config")
                .with_context(|| format!("config trust source `{name}`"))?,
        );
    }
    sources.extend(extra_sources);
    sources.push(castellan::engine::join_token::trust_source(
        &config.trust_domain,
        signer.authorities().jwks(),
    ));
    sources.extend(store.trust_sources().await?);
    let trust = Arc::new(Registry::new(sources)?);

    castellan::policy::set_eval_deadline(std::time::Duration::from_millis(config.policy_deadline_ms));
    let initial = match &config.policies {
        Some(dir) => castellan::bundle::Bundle::from_dir(dir)
            .with_context(|| format!("policy bundle {}", dir.display()))?,
        None => castellan::bundle::Bundle::embedded(),
    };
    let logger = if config.decision_logs.enabled {
        let path = config
            .decision_logs
            .path
            .clone()
            .unwrap_or_else(|| dir.join("decisions.log"));
        let logger = castellan::policy::DecisionLogger::open(path.clone(), config.decision_logs.mask.clone())
            .with_context(|| format!("decision_logs.path {}", path.display()))?;
        Some(Arc::new(logger))
    } else {
        None
    };
    let (bundles, policies) =
        castellan::bundle::Bundles::start(attestors.clone(), "default", initial, logger)
            .map_err(|e| anyhow::anyhow!("policy bundle: {e}"))?;
    let bundles = Arc::new(bundles.with_replaceable_methods(config.bundles.replaceable_methods.clone()));
    let signing_keys = castellan::bundle::load_keys(&config)?;
    // A source whose method no module serves stays inert until a bundle
    // brings one; it is not an error (bundles may be pushed after start).
    let snapshot = policies.snapshot();
    for s in trust.list() {
        if !snapshot.modules.contains_key(&s.method) {
            tracing::warn!(source = %s.name, method = %s.method, "trust source's method has no attestor module yet");
        }
    }

    let workers = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let max_in_flight = (workers * 4).min(config.sandbox.max_instances as usize);
    let entries = Arc::new(castellan::entries::Entries::new(store.entries().await?));
    let engine = Engine::new(castellan::engine::Parts {
        trust_domain: config.trust_domain.clone(),
        attestors,
        trust,
        policies,
        signer,
        store: store.clone(),
        limits: config.issuance.clone(),
        entries,
        oidc,
        max_in_flight,
        rotation: castellan::signer::authorities::Schedule::of(&config.ca),
    })
    .await
    .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    if let Some(url) = &config.public_url {
        let _ = engine.public_url.set(url.trim_end_matches('/').to_owned());
    }
    // Always running: with no webhooks it drains the outbox, which would
    // otherwise grow with every notification.
    let dispatcher = Some(castellan::notify::Dispatcher::new(store, &config.webhooks)?);
    Ok(App {
        engine,
        auth,
        bundles,
        bundle_keys: Arc::new(signing_keys),
        federation: castellan::federation::Federation::new(config.federation.trust_domains.clone()),
        dispatcher: std::sync::Mutex::new(dispatcher),
        admin_token_path,
        ca_created,
        config,
    })
}

/// The store `config` names.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    Ok(match config.store.backend.as_str() {
        "postgres" => {
            let (pg, tls) = config.store.postgres()?;
            Store::postgres_with(pg, tls, config.store.max_connections)
                .context("cannot open the PostgreSQL store (store.url)")?
        }
        _ => Store::redb(&config.data_dir.join("castellan.redb"))?,
    })
}

/// The in-process signer over the CA directory: its keyring, or, on first
/// start, a CA made (or one from before rotation, taken in).
pub fn open_signer(config: &Config, ca_dir: &Path) -> anyhow::Result<(InProcessSigner, bool)> {
    Ok(castellan::signer::open_or_create(
        ca_dir,
        &config.trust_domain,
        &config.ca,
    )?)
}

impl App {
    /// The SPIFFE ID in Castellan's own server certificate: what a federated
    /// peer names as `endpoint_spiffe_id`.
    pub fn server_spiffe_id(&self) -> anyhow::Result<castellan::spiffe_id::SpiffeId> {
        Ok(castellan::spiffe_id::SpiffeId::parse(&format!(
            "spiffe://{}/castellan/server",
            self.config.trust_domain
        ))?)
    }

    /// Where the Workload API listens.
    pub fn workload_socket(&self) -> PathBuf {
        self.config
            .workload_api
            .socket
            .clone()
            .unwrap_or_else(|| self.config.data_dir.join("workload.sock"))
    }
}

/// Keeps the data directory private to its owner: it holds CA keys.
fn restrict_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set permissions on {}", dir.display()))
}

/// Builds the rustls configuration for the API listener: the operator's
/// certificate files, or a certificate from Castellan's own CA, issued
/// again before it expires (see [`ListenerCert`]).
pub fn tls_config(app: &App, addr: SocketAddr) -> anyhow::Result<rustls::ServerConfig> {
    let tls = &app.config.http.tls;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth();
    let mut config = match (&tls.cert_file, &tls.key_file) {
        (Some(c), Some(k)) => builder.with_cert_resolver(Arc::new(FileCert::new(c.clone(), k.clone())?)),
        _ => {
            let mut ips = vec![addr.ip()];
            if addr.ip().is_unspecified() {
                ips = vec![std::net::Ipv4Addr::LOCALHOST.into()];
            }
            let (signer, spiffe_id, dns_names) = (
                app.engine.signer.clone(),
                app.server_spiffe_id()?,
                tls.dns_names.clone(),
            );
            let issue = move || -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
                // The listener's key is made here and never leaves this process.
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
                let chain = signer.issue_server_certificate(&spiffe_id, &dns_names, &ips, &spki)?;
                let (certs, key) = parse_cert_and_key(&chain, &key.serialize_pem())?;
                let key = rustls::crypto::ring::sign::any_supported_type(&key)?;
                Ok(Arc::new(rustls::sign::CertifiedKey::new(certs, key)))
            };
            // A certificate from an authority that no longer signs is
            // replaced at the next handshake, long before that authority
            // leaves the bundle.
            let engine = app.engine.clone();
            let epoch = move || {
                engine
                    .authorities()
                    .active(castellan::signer::Kind::X509)
                    .map(|a| a.id.clone())
                    .unwrap_or_default()
            };
            builder.with_cert_resolver(Arc::new(
                ListenerCert::new(Box::new(issue))?.with_epoch(Box::new(epoch)),
            ))
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn parse_cert_and_key(
    chain_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
)> {
    let certs = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("TLS certificate chain is not PEM")?;
    anyhow::ensure!(!certs.is_empty(), "TLS certificate file holds no certificate");
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .context("TLS private key is not PEM")?
        .context("TLS key file holds no private key")?;
    Ok((certs, key))
}

/// Reads a certificate chain and its key from files into what rustls serves.
fn load_cert_files(cert: &Path, key: &Path) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
    let chain_pem =
        std::fs::read_to_string(cert).with_context(|| format!("http.tls.cert_file {}", cert.display()))?;
    let key_pem =
        std::fs::read_to_string(key).with_context(|| format!("http.tls.key_file {}", key.display()))?;
    let (certs, key) = parse_cert_and_key(&chain_pem, &key_pem)?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)?;
    let certified = rustls::sign::CertifiedKey::new(certs, key);
    certified
        .keys_match()
        .context("TLS certificate and key do not match")?;
    Ok(Arc::new(certified))
}

/// The operator's certificate files, read again when they change (looked
/// at during a handshake, at most every ten seconds), so a certificate
/// renewed on disk (cert-manager, certbot) is served without a restart.
/// Files that do not load (half-written, mismatched) leave the current one
/// in place.
pub struct FileCert {
    cert: PathBuf,
    key: PathBuf,
    /// The certificate served, the files' stamp it was read from, and when
    /// the files are next looked at (Unix seconds).
    current: arc_swap::ArcSwap<(Arc<rustls::sign::CertifiedKey>, FileStamp, i64)>,
    checking: std::sync::Mutex<()>,
}

type FileStamp = Option<[(u64, std::time::SystemTime); 2]>;

fn file_stamp(cert: &Path, key: &Path) -> FileStamp {
    let stamp = |p: &Path| {
        std::fs::metadata(p)
            .and_then(|m| Ok((m.len(), m.modified()?)))
            .ok()
    };
    Some([stamp(cert)?, stamp(key)?])
}

impl std::fmt::Debug for FileCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FileCert(..)")
    }
}

impl FileCert {
    pub fn new(cert: PathBuf, key: PathBuf) -> anyhow::Result<Self> {
        let stamp = file_stamp(&cert, &key);
        let first = load_cert_files(&cert, &key)?;
        Ok(Self {
            current: arc_swap::ArcSwap::from_pointee((first, stamp, 0)),
            cert,
            key,
            checking: std::sync::Mutex::new(()),
        })
    }

    /// The certificate to serve at `now`, read again first if the files
    /// changed.
    pub fn at(&self, now: i64) -> Arc<rustls::sign::CertifiedKey> {
        if now < self.current.load().2 {
            return self.current.load().0.clone();
        }
        if let Ok(_checking) = self.checking.try_lock() {
            let current = self.current.load_full();
            let stamp = file_stamp(&self.cert, &self.key);
            let cert = if stamp == current.1 {
                current.0.clone()
            } else {
                match load_cert_files(&self.cert, &self.key) {
                    Ok(c) => {
                        tracing::info!(file = %self.cert.display(), "the listener's TLS certificate was read again");
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the changed TLS certificate files do not load; serving the current one");
                        current.0.clone()
                    }
                }
            };
            self.current.store(Arc::new((cert, stamp, now + 10)));
        }
        self.current.load().0.clone()
    }
}

impl rustls::server::ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.at(castellan::util::now_unix()))
    }
}

type IssueListenerCert = Box<dyn Fn() -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> + Send + Sync>;

/// The listener's own certificate. Once two thirds of its life have passed
/// (checked at each handshake), a new key and certificate are made and
/// served from the next handshake on, so it never expires while the server
/// runs. If that fails (the CA is unusable), the current one is kept and
/// the attempt repeated a minute later.
pub struct ListenerCert {
    issue: IssueListenerCert,
    /// What the certificate was issued under (the active authority): when
    /// it changes, the certificate is replaced.
    epoch: Box<dyn Fn() -> String + Send + Sync>,
    /// The certificate served, when to replace it (Unix seconds), and its
    /// epoch.
    current: arc_swap::ArcSwap<(Arc<rustls::sign::CertifiedKey>, i64, String)>,
    renewing: std::sync::Mutex<()>,
}

impl std::fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ListenerCert(..)")
    }
}

impl ListenerCert {
    pub fn new(issue: IssueListenerCert) -> anyhow::Result<Self> {
        let first = issue()?;
        let renew_at = renew_at(&first)?;
        Ok(Self {
            issue,
            epoch: Box::new(String::new),
            current: arc_swap::ArcSwap::from_pointee((first, renew_at, String::new())),
            renewing: std::sync::Mutex::new(()),
        })
    }

    /// Replaces the certificate whenever `epoch` answers something else.
    pub fn with_epoch(mut self, epoch: Box<dyn Fn() -> String + Send + Sync>) -> Self {
        let (cert, at, _) = self.current.load().as_ref().clone();
        self.current.store(Arc::new((cert, at, epoch())));
        self.epoch = epoch;
        self
    }

    /// The certificate to serve at `now`, renewed first if due.
    pub fn at(&self, now: i64) -> Arc<rustls::sign::CertifiedKey> {
        let current = self.current.load();
        let due =
            |c: &(Arc<rustls::sign::CertifiedKey>, i64, String), epoch: &str| now >= c.1 || c.2 != epoch;
        let epoch = (self.epoch)();
        if !due(&current, &epoch) {
            return current.0.clone();
        }
        // One handshake renews; the others serve the current one meanwhile.
        if let Ok(_renewing) = self.renewing.try_lock()
            && due(&self.current.load(), &epoch)
        {
            let next = (self.issue)().and_then(|c| Ok((renew_at(&c)?, c)));
            match next {
                Ok((at, cert)) => {
                    tracing::info!("the listener's TLS certificate was renewed");
                    self.current.store(Arc::new((cert, at, epoch)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "the listener's TLS certificate could not be renewed; retrying in a minute");
                    let (cert, _, old) = self.current.load().as_ref().clone();
                    self.current
                        .store(Arc::new((cert, now + 60, if old == epoch { old } else { epoch })));
                }
            }
        }
        self.current.load().0.clone()
    }
}

/// Two thirds into the leaf's validity.
fn renew_at(cert: &rustls::sign::CertifiedKey) -> anyhow::Result<i64> {
    let leaf = cert.cert.first().context("no certificate")?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).context("the listener certificate")?;
    let (from, until) = (
        parsed.validity().not_before.timestamp(),
        parsed.validity().not_after.timestamp(),
    );
    Ok(from + (until - from) * 2 / 3)
}

impl rustls::server::ResolvesServerCert for ListenerCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.at(castellan::util::now_unix()))
    }
}

/// Binds the listener; returns it with the address actually bound.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Serves the API until SIGINT or SIGTERM.
pub async fn serve(
    app: &App,
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    workload: tokio::net::UnixListener,
) -> anyhow::Result<()> {
    // One socket per Workload API client and per HTTP connection.
    castellan::util::raise_fd_limit();
    // Without a configured public URL, JWT-SVIDs and discovery name the
    // address actually bound.
    if let Ok(local) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let host = match local.ip() {
            ip if ip.is_unspecified() => "localhost".to_owned(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let _ = app
            .engine
            .public_url
            .set(format!("{scheme}://{host}:{}", local.port()));
    }
    let state = AppState {
        engine: app.engine.clone(),
        auth: app.auth.clone(),
        bundles: app.bundles.clone(),
        bundle_keys: app.bundle_keys.clone(),
        federation: app.federation.clone(),
        bundle_refresh_hint: app.config.federation.refresh_hint_seconds,
        max_body_bytes: app.config.http.max_body_bytes,
        metrics_here: app.config.metrics.enabled && app.config.metrics.addr.is_none(),
    };
    if let (true, Some(addr)) = (app.config.metrics.enabled, app.config.metrics.addr) {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.addr {addr}"))?;
        let metrics = castellan::http::metrics_router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, metrics).await {
                tracing::error!(error = %e, "the metrics listener stopped");
            }
        });
    }
    if !app.config.bundles.sources.is_empty() {
        tokio::spawn(castellan::http::watch_bundle_sources(
            state.clone(),
            app.config.bundles.sources.clone(),
        ));
    }
    // Bundles pushed through the API (here before a restart, or through
    // another gateway sharing the store) are active before the first request.
    if let Err(e) = castellan::http::activate_stored_bundles(&state).await {
        anyhow::bail!("cannot read the stored policy bundles: {e}");
    }
    tokio::spawn(castellan::http::follow_store(state.clone()));
    let app_router = router(state);
    tokio::spawn(app.engine.clone().run_housekeeping());
    app.federation.start();
    tokio::spawn(castellan::trust::refresh_jwks_urls(app.engine.trust.clone()));
    let api = castellan::workload_api::WorkloadApi::new(
        app.engine.clone(),
        app.federation.clone(),
        app.config.workload_api.clone(),
    );
    tokio::spawn(async move {
        if let Err(e) = api.serve(workload).await {
            tracing::error!(error = %e, "the Workload API stopped");
        }
    });
    if let Some(d) = app.dispatcher.lock().unwrap_or_else(|p| p.into_inner()).take() {
        tokio::spawn(d.run());
    }
    let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
    let slots = Slots::new(
        app.config.http.max_connections,
        app.config.http.max_connections_per_client,
    );
    let header_timeout = std::time::Duration::from_secs(app.config.http.header_read_timeout_seconds.max(1));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        };
        let _ = stream.set_nodelay(true);
        // A cap on connections overall and per client: a flood of idle or
        // half-sent connections cannot take every slot.
        let Some(slot) = slots.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: at the connection limit");
            drop(stream);
            continue;
        };
        // Handlers see who connected (per-client limits).
        let client = castellan::http::ClientAddr(peer.ip());
        let service = TowerToHyperService::new(
            tower::ServiceBuilder::new()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(client);
                    req
                })
                .service(app_router.clone()),
        );
        let acceptor = acceptor.clone();
        let handshake_timeout = header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder
                .http2()
                .timer(hyper_util::rt::TokioTimer::new())
                .max_concurrent_streams(256)
                .keep_alive_interval(Some(std::time::Duration::from_secs(30)));
            let result = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => builder.serve_connection(TokioIo::new(tls), service).await,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    }
                }
                None => builder.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    Ok(())
}

/// Open connections, overall and per client (IPv4 address or IPv6 /64).
#[derive(Clone)]
struct Slots {
    inner: Arc<std::sync::Mutex<(usize, std::collections::HashMap<Client, usize>)>>,
    max: usize,
    per_client: usize,
}

/// One open connection's slot, given back when it closes.
struct Slot {
    slots: Slots,
    client: Client,
}

impl Slots {
    fn new(max: usize, per_client: usize) -> Self {
        Self {
            inner: Arc::default(),
            max: max.max(1),
            per_client: per_client.max(1),
        }
    }

    fn admit(&self, ip: std::net::IpAddr) -> Option<Slot> {
        let client = Client::from(ip);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let held = inner.1.get(&client).copied().unwrap_or(0);
        if inner.0 >= self.max || held >= self.per_client {
            return None;
        }
        inner.0 += 1;
        inner.1.insert(client, held + 1);
        Some(Slot {
            slots: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.0 -= 1;
        if let Some(n) = inner.1.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                inner.1.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A self-signed certificate valid from `from` for `life` seconds.
    fn cert(from: i64, life: i64) -> anyhow::Result<Arc<rustls::sign::CertifiedKey>> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
        p.not_before = time::OffsetDateTime::from_unix_timestamp(from)?;
        p.not_after = time::OffsetDateTime::from_unix_timestamp(from + life)?;
        let c = p.self_signed(&key)?;
        let (certs, key) = parse_cert_and_key(&c.pem(), &key.serialize_pem())?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            certs,
            rustls::crypto::ring::sign::any_supported_type(&key)?,
        )))
    }

    /// Certificate files changed on disk are served from the next look (at
    /// most every ten seconds); files that do not load keep the current one.
    #[test]
    fn certificate_files_are_read_again_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        let write = |names: Vec<String>| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let cert = rcgen::CertificateParams::new(names)
                .unwrap()
                .self_signed(&key)
                .unwrap();
            std::fs::write(&cert_path, cert.pem()).unwrap();
            std::fs::write(&key_path, key.serialize_pem()).unwrap();
            key.serialize_pem()
        };
        write(vec!["a.example".into()]);
        let now = 1_900_000_000;
        let files = FileCert::new(cert_path.clone(), key_path.clone()).unwrap();
        let first = files.at(now);
        write(vec!["b.example".into(), "longer-name.example".into()]);
        assert!(
            Arc::ptr_eq(&first, &files.at(now + 5)),
            "looked at every ten seconds"
        );
        let second = files.at(now + 11);
        assert!(!Arc::ptr_eq(&first, &second), "read again");
        // A key that is not the certificate's (as mid-rotation): kept.
        let other = write(vec!["c.example".into(), "another-longer-name.example".into()]);
        std::fs::write(&key_path, format!("{other}\n")).unwrap();
        write(vec!["d.example".into()]);
        std::fs::write(&key_path, other).unwrap();
        assert!(
            Arc::ptr_eq(&second, &files.at(now + 22)),
            "files that do not match are not served"
        );
        std::fs::write(&cert_path, "not PEM").unwrap();
        assert!(Arc::ptr_eq(&second, &files.at(now + 33)));
    }

    /// Replaced at the next handshake once another authority signs, long
    /// before the one it chains to leaves the bundle.
    #[test]
    fn the_listener_certificate_follows_the_active_authority() {
        let now = 1_900_000_000;
        let calls = Arc::new(AtomicUsize::new(0));
        let active = Arc::new(std::sync::Mutex::new("a".to_owned()));
        let (c, a) = (calls.clone(), active.clone());
        let listener = ListenerCert::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
            cert(now, 300)
        }))
        .unwrap()
        .with_epoch(Box::new(move || a.lock().unwrap().clone()));
        let first = listener.at(now);
        assert!(Arc::ptr_eq(&first, &listener.at(now + 10)));
        *active.lock().unwrap() = "b".into();
        let second = listener.at(now + 11);
        assert!(!Arc::ptr_eq(&first, &second), "replaced after activation");
        assert!(Arc::ptr_eq(&second, &listener.at(now + 12)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    /// Renewed two thirds into its life; a failed renewal keeps the one in
    /// use and is tried again a minute later.
    #[test]
    fn the_listener_certificate_is_renewed_before_it_expires() {
        let now = 1_900_000_000;
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (c, f) = (calls.clone(), fail.clone());
        let listener = ListenerCert::new(Box::new(move || {
            let n = c.fetch_add(1, Ordering::SeqCst) as i64;
            anyhow::ensure!(!f.load(Ordering::SeqCst), "the CA is unusable");
            cert(now + n * 200, 300)
        }))
        .unwrap();
        let first = listener.at(now);
        assert!(Arc::ptr_eq(&first, &listener.at(now + 199)), "not due before 2/3");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let second = listener.at(now + 200);
        assert!(!Arc::ptr_eq(&first, &second), "renewed at 2/3 of its life");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // The second one (valid from now+200) is due at now+400.
        fail.store(true, Ordering::SeqCst);
        assert!(
            Arc::ptr_eq(&second, &listener.at(now + 400)),
            "kept when renewal fails"
        );
        assert!(
            Arc::ptr_eq(&second, &listener.at(now + 430)),
            "no retry within the minute"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        fail.store(false, Ordering::SeqCst);
        assert!(
            !Arc::ptr_eq(&second, &listener.at(now + 461)),
            "retried after a minute"
        );
    }
}
