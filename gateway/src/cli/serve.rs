//! `castellan dev` and `castellan serve`: start a server on embedded
//! defaults (loopback, dev trust source) or from a config file (TLS).

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::server;
use castellan::config::Config;
use castellan::dev::DevCluster;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(super) struct DevArgs {
    #[command(subcommand)]
    command: Option<DevCommand>,
    /// Directory for the store, CA keys, admin token and dev cluster key.
    #[arg(long, default_value = "castellan-dev")]
    data_dir: PathBuf,
    /// Where to listen; plain HTTP, so loopback only. Port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8443")]
    http_addr: SocketAddr,
    /// SPIFFE trust domain to issue in.
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    /// Load the policy bundle from this directory instead of the embedded one.
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Start from this config file (trust sources, federation, ...); the
    /// flags here still win, and dev always serves plain HTTP.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Federate with a trust domain whose SPIFFE bundle is in a file
    /// (`TRUST_DOMAIN=FILE`, repeatable; the file is re-read when it changes).
    #[arg(long, value_name = "TRUST_DOMAIN=FILE")]
    federate: Vec<String>,
    /// Workload API: sign JWT-SVIDs with ES256 or RS256.
    #[arg(long, default_value = "ES256")]
    jwt_svid_algorithm: String,
    /// Workload API: add a `unix:sha256:` selector of the caller's executable.
    #[arg(long)]
    exe_sha256: bool,
}

#[derive(Subcommand)]
pub(super) enum DevCommand {
    /// Mint dev credentials.
    #[command(subcommand)]
    Token(DevTokenCommand),
}

#[derive(Subcommand)]
pub(super) enum DevTokenCommand {
    /// Print a projected service-account token signed by the dev cluster.
    K8s(DevTokenK8s),
}

#[derive(Args)]
pub(super) struct DevTokenK8s {
    /// The `castellan dev` data directory.
    #[arg(long, default_value = "castellan-dev")]
    data_dir: PathBuf,
    /// Kubernetes namespace.
    #[arg(long)]
    namespace: String,
    /// Service account name.
    #[arg(long)]
    service_account: String,
    /// Pod name (default: generated).
    #[arg(long)]
    pod: Option<String>,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 600)]
    ttl: i64,
    /// The token's audience. The dev trust source accepts `castellan`, and
    /// `castellan/key/<hex SHA-256 of a DER SubjectPublicKeyInfo>` for a
    /// token good only with that key (`svid issue --key`).
    #[arg(long, default_value = castellan::dev::DEV_AUDIENCE)]
    audience: String,
}

#[derive(Args)]
pub(super) struct ServeArgs {
    /// TOML config file; `CASTELLAN_*` variables override it.
    #[arg(long)]
    config: PathBuf,
}

/// `castellan dev`, or `castellan dev token k8s`.
pub(super) async fn dev_command(args: DevArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(DevCommand::Token(DevTokenCommand::K8s(t))) => dev_token(t),
        None => dev(args).await,
    }
}

async fn dev(args: DevArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.http_addr.ip().is_loopback(),
        "`castellan dev` serves plain HTTP, which is only allowed on a loopback address (not {}); use `castellan serve` for TLS",
        args.http_addr
    );
    let base = match &args.config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let mut config = Config {
        data_dir: args.data_dir.clone(),
        trust_domain: args.trust_domain,
        policies: args.policies.or(base.policies.clone()),
        ..base
    };
    config.http.addr = args.http_addr;
    config.http.tls.enabled = false;
    // The dev server keeps everything in its data directory.
    config.store = castellan::config::StoreConfig::default();
    config.workload_api.jwt_svid_algorithm = args.jwt_svid_algorithm;
    config.workload_api.exe_sha256 = args.exe_sha256;
    for f in &args.federate {
        let (td, file) = f
            .split_once('=')
            .with_context(|| format!("--federate `{f}`: expected TRUST_DOMAIN=FILE"))?;
        config
            .federation
            .trust_domains
            .push(castellan::federation::FederatedTrustDomain {
                trust_domain: td.to_owned(),
                bundle_file: Some(std::path::absolute(file)?),
                endpoint_url: None,
                profile: None,
                endpoint_spiffe_id: None,
                ca_file: None,
                refresh_seconds: None,
            });
    }
    // dev accepts unsigned bundles over the API; `serve` requires signatures.
    config.bundles.verification = "off".into();
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let cluster = DevCluster::load_or_create(&config.data_dir)?;
    let app = server::build(config, vec![cluster.trust_source()]).await?;
    let (listener, local) = server::bind(app.config.http.addr).await?;
    // Bound before anything says "listening": a client may connect at once.
    let workload = castellan::workload_api::bind(&app.workload_socket())?;

    let dir = std::fs::canonicalize(&app.config.data_dir).unwrap_or(app.config.data_dir.clone());
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "Castellan dev server — trust domain {}",
        app.config.trust_domain
    )?;
    writeln!(out, "  data directory   {}", dir.display())?;
    writeln!(out, "  store            {}", dir.join("castellan.redb").display())?;
    writeln!(
        out,
        "  CA bundle        {} ({})",
        dir.join("ca/bundle.pem").display(),
        if app.ca_created { "created" } else { "reused" }
    )?;
    writeln!(
        out,
        "  admin token      {} (mode 0600)",
        dir.join("admin.token").display()
    )?;
    let policy_source = match &app.config.policies {
        Some(p) => p.display().to_string(),
        None => "embedded default".into(),
    };
    writeln!(
        out,
        "  policies         {policy_source} (revision {})",
        app.engine.policies.revision()
    )?;
    writeln!(
        out,
        "  attestors        {}",
        app.engine.policies.snapshot().methods().join(", ")
    )?;
    writeln!(
        out,
        "  dev trust source {} (method k8s_sat, issuer {}, audience {})",
        castellan::dev::DEV_CLUSTER,
        castellan::dev::DEV_ISSUER,
        castellan::dev::DEV_AUDIENCE
    )?;
    writeln!(
        out,
        "  get a token      castellan dev token k8s --data-dir {} --namespace default --service-account demo",
        dir.display()
    )?;
    writeln!(
        out,
        "  bundles          PUT /api/v1/bundles/<name>; signature verification off (dev)"
    )?;
    writeln!(out, "  workload API     unix:{}", app.workload_socket().display())?;
    writeln!(
        out,
        "  approver console http://{local}/console/ (sign in with an approver token)"
    )?;
    writeln!(out, "listening on http://{local}")?;
    out.flush()?;
    drop(out);
    server::serve(&app, listener, None, workload).await?;
    Ok(ExitCode::SUCCESS)
}

fn dev_token(t: DevTokenK8s) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=86_400).contains(&t.ttl),
        "--ttl must be between 1 and 86400 seconds"
    );
    let cluster = DevCluster::load(&t.data_dir)?;
    anyhow::ensure!(
        !t.audience.is_empty() && t.audience.len() <= 512,
        "--audience must be 1 to 512 characters"
    );
    let token = cluster.mint_token_for(
        &t.audience,
        &t.namespace,
        &t.service_account,
        t.pod.as_deref(),
        t.ttl,
    )?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    // On every interface, the server cannot know the URL its clients use,
    // and JWT-SVIDs and discovery must name it (`iss`, `jwks_uri`).
    if config.http.addr.ip().is_unspecified() && config.public_url.is_none() {
        anyhow::bail!(
            "http.addr {} listens on every interface, so Castellan cannot tell the URL clients reach it at; \
             set `public_url` in the config (or CASTELLAN_PUBLIC_URL), e.g. public_url = \"https://castellan.example.com:{}\"",
            config.http.addr,
            config.http.addr.port()
        );
    }
    let app = server::build(config, Vec::new()).await?;
    let (listener, local) = server::bind(app.config.http.addr).await?;
    // Bound before anything says "listening": a client may connect at once.
    let workload = castellan::workload_api::bind(&app.workload_socket())?;
    let tls = if app.config.http.tls.enabled {
        Some(server::tls_config(&app, local)?)
    } else {
        None
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(
        trust_domain = %app.config.trust_domain,
        data_dir = %app.config.data_dir.display(),
        admin_token = %app.admin_token_path.display(),
        console = %format!("{scheme}://{local}/console/"),
        "castellan serving"
    );
    println!("listening on {scheme}://{local}");
    server::serve(&app, listener, tls, workload).await?;
    Ok(ExitCode::SUCCESS)
}
