//! The command line: `castellan dev`, `serve`, `svid`, `bench`, `policy`.
//! Each command prints one clear `error:` line and exits non-zero on failure.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use hyper::{Method, StatusCode};

mod attestor;
mod bundle;
mod entry;
mod ephemeral;
mod svid_helper;
#[cfg(feature = "tpm")]
mod tpm;

use crate::client::Endpoint;
use crate::config::Config;
use crate::dev::DevCluster;
use crate::policy::{TestOutcome, run_tests};
use crate::server;

/// Castellan: short-lived SPIFFE identities for workloads and AI agents,
/// issued only after attestation and policy.
#[derive(Parser)]
#[command(name = "castellan", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process on embedded defaults (loopback HTTP).
    Dev(DevArgs),
    /// Run a server from a config file (TLS; the production entry point).
    Serve(ServeArgs),
    /// Get an X.509-SVID from a running server.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Measure a running server.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Work with policy bundles.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Workload API registration entries (SPIRE-style flags: -spiffeID, -selector, …).
    #[command(subcommand)]
    Entry(entry::EntryCommand),
    /// Run attestor modules locally.
    #[command(subcommand)]
    Attestor(attestor::AttestorCommand),
    /// Build, sign, verify and inspect policy bundles.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Manage API tokens (admin).
    #[command(subcommand)]
    Token(ephemeral::TokenCommand),
    /// Just-in-time, approval-gated certificates.
    #[command(subcommand)]
    Ephemeral(ephemeral::EphemeralCommand),
    /// Keep an SVID, its key and bundle on disk from the Workload API; signal a command on rotation.
    SvidHelper(svid_helper::SvidHelperArgs),
    /// The machine's TPM 2.0: answer a `tpm` attestation challenge.
    #[cfg(feature = "tpm")]
    #[command(subcommand)]
    Tpm(tpm::TpmCommand),
}

/// How client commands reach a server.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Server address, e.g. http://127.0.0.1:8443.
    #[arg(long, env = "CASTELLAN_ADDR", default_value = "http://127.0.0.1:8443")]
    addr: String,
    /// CA certificate to trust for https:// addresses (e.g. DATA_DIR/ca/root.crt).
    #[arg(long, env = "CASTELLAN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// API token.
    #[arg(long, env = "CASTELLAN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

impl ClientArgs {
    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Endpoint::parse(&self.addr, self.ca_file.as_deref())
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct DevArgs {
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
enum DevCommand {
    /// Mint dev credentials.
    #[command(subcommand)]
    Token(DevTokenCommand),
}

#[derive(Subcommand)]
enum DevTokenCommand {
    /// Print a projected service-account token signed by the dev cluster.
    K8s(DevTokenK8s),
}

#[derive(Args)]
struct DevTokenK8s {
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
    #[arg(long, default_value = crate::dev::DEV_AUDIENCE)]
    audience: String,
}

#[derive(Args)]
struct ServeArgs {
    /// TOML config file; `CASTELLAN_*` variables override it.
    #[arg(long)]
    config: PathBuf,
}

#[derive(Args, Clone)]
struct ServerArgs {
    /// Server address, e.g. http://127.0.0.1:8443.
    #[arg(long, env = "CASTELLAN_ADDR", default_value = "http://127.0.0.1:8443")]
    addr: String,
    /// CA certificate to trust for https:// addresses (e.g. DATA_DIR/ca/root.crt).
    #[arg(long, env = "CASTELLAN_CA_FILE")]
    ca_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum SvidCommand {
    /// Attest with evidence and write an X.509-SVID, its key and the bundle.
    Issue(SvidIssue),
}

#[derive(Args)]
struct SvidIssue {
    #[command(flatten)]
    server: ServerArgs,
    /// Attestation method.
    #[arg(long, default_value = "k8s_sat")]
    method: String,
    /// File holding the evidence (e.g. a service-account token); `-` reads stdin.
    #[arg(long)]
    evidence_file: PathBuf,
    /// Directory to write svid.pem, svid.key and bundle.pem into.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Certify this PKCS#8 PEM private key instead of a new one (for
    /// evidence bound to a key made beforehand: `castellan tpm evidence
    /// --csr`, or a token whose audience names the key). svid.key is then
    /// not written.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Requested lifetime in seconds (policy may shorten it).
    #[arg(long)]
    ttl: Option<u64>,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Drive attested issuance and print issuances/s and latency percentiles.
    Issuance(BenchIssuance),
    /// Time from the final approval to a long-polling requester holding its certificate.
    Approvals(BenchApprovals),
    /// Agent identities (JWT-SVID, one-hop delegation) per second, or latency at a set rate.
    Broker(BenchBroker),
    /// Attested issuances per second for each attestation method (against `castellan dev`).
    Attestors(BenchAttestors),
    /// Many open Workload API streams: server memory per stream, time to push
    /// a rotation to all of them, then FetchJWTSVID per second.
    WorkloadApi(BenchWorkloadApi),
}

#[derive(Args)]
struct BenchAttestors {
    #[command(flatten)]
    server: ServerArgs,
    /// File holding the admin API token.
    #[arg(long)]
    token_file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured issuances per method.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Only these methods, comma-separated [default: all; tpm only with
    /// --tpm-tcti].
    #[arg(long, value_delimiter = ',')]
    methods: Vec<String>,
    /// Adds the tpm row, answering one challenge per request with the TPM
    /// behind this TCTI (e.g. `swtpm:host=127.0.0.1,port=2321`) before the
    /// clock starts. Use a TPM you may load: each proof makes an
    /// ActivateCredential and a quote.
    #[arg(long)]
    tpm_tcti: Option<String>,
    /// PEM file with the CA certificates (root and intermediates) of the
    /// TPM's EK certificate, for the bench's tpm trust source [default:
    /// the source enrolls the TPM's EK by its hash instead].
    #[arg(long, requires = "tpm_tcti")]
    tpm_ek_ca: Option<PathBuf>,
}

#[derive(Args)]
struct BenchWorkloadApi {
    #[command(flatten)]
    server: ServerArgs,
    /// File holding the admin API token (to register the bench entries).
    #[arg(long)]
    token_file: PathBuf,
    /// The Workload API socket.
    #[arg(long)]
    socket: PathBuf,
    /// Concurrent FetchX509SVID streams, one connection each.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// FetchJWTSVID calls in flight at once.
    #[arg(long, default_value_t = 32)]
    jwt_concurrency: usize,
    /// FetchJWTSVID calls measured.
    #[arg(long, default_value_t = 20_000)]
    jwt_requests: usize,
}

#[derive(Args)]
struct BenchBroker {
    #[command(flatten)]
    server: ServerArgs,
    /// File holding the admin API token (to register the bench trust source).
    #[arg(long)]
    token_file: PathBuf,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured requests.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Open-loop rate (requests/s); latency counts from each request's due time.
    #[arg(long)]
    rate: Option<f64>,
}

#[derive(Args)]
struct BenchApprovals {
    #[command(flatten)]
    server: ServerArgs,
    /// File holding the admin API token (to create the bench's own tokens).
    #[arg(long)]
    token_file: PathBuf,
    /// Requests to approve, one after another.
    #[arg(long, default_value_t = 200)]
    requests: usize,
}

#[derive(Args)]
struct BenchIssuance {
    #[command(flatten)]
    server: ServerArgs,
    /// Admin API token (used only to register the bench trust source).
    #[arg(
        long,
        env = "CASTELLAN_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file"
    )]
    token: Option<String>,
    /// File holding the admin API token, e.g. DATA_DIR/admin.token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured requests.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Unmeasured requests sent first.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run the `test_` rules of a policy directory, like `opa test`.
    Test(PolicyTest),
}

#[derive(Args)]
struct PolicyTest {
    /// Directory with .rego files (tests in *_test.rego) and data.json.
    dir: PathBuf,
    /// Print every test, not only failures.
    #[arg(short, long)]
    verbose: bool,
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse_from(entry::normalise_args(std::env::args().collect()));
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CASTELLAN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,wasmtime=warn,cranelift=warn,tss_esapi=warn")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Dev(args) => match args.command {
            Some(DevCommand::Token(DevTokenCommand::K8s(t))) => dev_token(t),
            None => dev(args).await,
        },
        Command::Serve(args) => serve(args).await,
        Command::Svid(SvidCommand::Issue(args)) => svid_issue(args).await,
        Command::Bench(BenchCommand::Issuance(args)) => bench(args).await,
        Command::Bench(BenchCommand::Approvals(args)) => bench_approvals(args).await,
        Command::Bench(BenchCommand::Broker(args)) => bench_broker(args).await,
        Command::Bench(BenchCommand::WorkloadApi(args)) => bench_workload_api(args).await,
        Command::Bench(BenchCommand::Attestors(args)) => bench_attestors(args).await,
        Command::Policy(PolicyCommand::Test(args)) => policy_test(args),
        Command::Token(cmd) => ephemeral::token(cmd).await,
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Attestor(cmd) => attestor::run(cmd),
        Command::Entry(cmd) => entry::run(cmd).await,
        Command::Ephemeral(cmd) => ephemeral::ephemeral(cmd).await,
        Command::SvidHelper(args) => svid_helper::run(args).await,
        #[cfg(feature = "tpm")]
        Command::Tpm(cmd) => tpm::run(cmd).await,
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
    config.workload_api.jwt_svid_algorithm = args.jwt_svid_algorithm;
    config.workload_api.exe_sha256 = args.exe_sha256;
    for f in &args.federate {
        let (td, file) = f
            .split_once('=')
            .with_context(|| format!("--federate `{f}`: expected TRUST_DOMAIN=FILE"))?;
        config
            .federation
            .trust_domains
            .push(crate::federation::FederatedTrustDomain {
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
    let workload = crate::workload_api::bind(&app.workload_socket())?;

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
        dir.join("ca/root.crt").display(),
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
        app.pipeline.policies.revision()
    )?;
    writeln!(
        out,
        "  attestors        {}",
        app.pipeline.policies.snapshot().methods().join(", ")
    )?;
    writeln!(
        out,
        "  dev trust source {} (method k8s_sat, issuer {}, audience {})",
        crate::dev::DEV_CLUSTER,
        crate::dev::DEV_ISSUER,
        crate::dev::DEV_AUDIENCE
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

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let app = server::build(config, Vec::new()).await?;
    let (listener, local) = server::bind(app.config.http.addr).await?;
    // Bound before anything says "listening": a client may connect at once.
    let workload = crate::workload_api::bind(&app.workload_socket())?;
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
        "castellan serving"
    );
    println!("listening on {scheme}://{local}");
    server::serve(&app, listener, tls, workload).await?;
    Ok(ExitCode::SUCCESS)
}

fn read_evidence(path: &Path) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading evidence from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading evidence from {}", path.display()))?
    };
    Ok(text.trim().to_owned())
}

/// Turns a problem+json body into one readable line.
pub(crate) fn problem_line(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(p) => format!(
            "{} {}: {}",
            status.as_u16(),
            p["type"]
                .as_str()
                .and_then(|t| t.strip_prefix(crate::http::TYPE_PREFIX))
                .unwrap_or("error"),
            p["detail"].as_str().unwrap_or("")
        ),
        Err(_) => format!("{status}"),
    }
}

async fn svid_issue(args: SvidIssue) -> anyhow::Result<ExitCode> {
    let evidence = read_evidence(&args.evidence_file)?;
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let key = match &args.key {
        Some(path) => {
            let pem =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|_| {
                let hint = if pem.contains("-----BEGIN EC PRIVATE KEY-----")
                    || pem.contains("-----BEGIN RSA PRIVATE KEY-----")
                {
                    format!(
                        " (it is in the older SEC1/PKCS#1 form; convert it with \
                         `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.p8`)",
                        path.display()
                    )
                } else {
                    String::new()
                };
                anyhow::anyhow!(
                    "{} is not an unencrypted PKCS#8 PEM private key (EC P-256/P-384, Ed25519 or RSA){hint}",
                    path.display()
                )
            })?
        }
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
    };
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let body = serde_json::json!({ "method": args.method, "evidence": evidence, "csr": csr, "ttl_seconds": args.ttl });
    let mut conn = endpoint.connect().await?;
    let (status, resp) = conn
        .send(
            Method::POST,
            "/api/v1/workloads/attested-issuance",
            None,
            Some(Bytes::from(body.to_string())),
        )
        .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{}", problem_line(status, &resp));
    let issued: serde_json::Value = serde_json::from_slice(&resp).context("server answer is not JSON")?;
    let field = |k: &str| {
        issued[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("answer has no `{k}`"))
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let svid = args.out_dir.join("svid.pem");
    let key_note = match &args.key {
        Some(path) => format!("for the key in {}", path.display()),
        None => {
            let path = args.out_dir.join("svid.key");
            crate::util::write_private_file(&path, key.serialize_pem().as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            format!("its key in {}", path.display())
        }
    };
    let bundle = args.out_dir.join("bundle.pem");
    std::fs::write(&svid, field("chain_pem")?).with_context(|| format!("cannot write {}", svid.display()))?;
    std::fs::write(&bundle, field("bundle_pem")?)
        .with_context(|| format!("cannot write {}", bundle.display()))?;
    println!("{}", field("spiffe_id")?);
    eprintln!(
        "wrote {} (expires {}), {key_note}, and the trust bundle in {}",
        svid.display(),
        field("not_after")?,
        bundle.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn bench(args: BenchIssuance) -> anyhow::Result<ExitCode> {
    let token = match (args.token, &args.token_file) {
        (_, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("{}", f.display()))?
            .trim()
            .to_owned(),
        (Some(t), None) => t,
        (None, None) => anyhow::bail!("give --token-file or CASTELLAN_TOKEN"),
    };
    anyhow::ensure!(
        args.concurrency >= 1 && args.requests >= 1,
        "--concurrency and --requests must be at least 1"
    );
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let report = crate::bench::run(crate::bench::Options {
        endpoint,
        admin_token: token,
        concurrency: args.concurrency,
        requests: args.requests,
        warmup: args.warmup,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "attested issuance: {} requests at concurrency {}",
        report.requests, args.concurrency
    );
    println!("  issued       {}", report.issued);
    if !report.refused.is_empty() {
        println!("  refused      {:?} (status, count)", report.refused);
    }
    println!("  elapsed      {:.2} s", report.elapsed.as_secs_f64());
    println!("  throughput   {:.0} issuances/s", report.rate());
    println!(
        "  latency      p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(report.p50),
        ms(report.p99),
        ms(report.max)
    );
    Ok(if report.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An admin token from a file, trimmed.
fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("{}", path.display()))?
        .trim()
        .to_owned())
}

async fn bench_attestors(args: BenchAttestors) -> anyhow::Result<ExitCode> {
    let token = read_token_file(&args.token_file)?;
    anyhow::ensure!(
        args.concurrency >= 1 && args.requests >= 1,
        "--concurrency and --requests must be at least 1"
    );
    let ek_ca_pem = match &args.tpm_ek_ca {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the EK CA certificates {}", path.display()))?,
        ),
        None => None,
    };
    let tpm = args
        .tpm_tcti
        .map(|tcti| crate::bench::attestors::TpmTarget { tcti, ek_ca_pem });
    let rows = crate::bench::attestors::run(crate::bench::attestors::Options {
        endpoint: Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?,
        admin_token: token,
        concurrency: args.concurrency,
        requests: args.requests,
        methods: args.methods,
        tpm,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "attested issuance by method: {} requests each, concurrency {}",
        args.requests, args.concurrency
    );
    println!("  method        issued/s    p50 ms   p99 ms   refused");
    for r in rows {
        println!(
            "  {:<12} {:>9.0} {:>9.2} {:>8.2}   {:?}",
            r.method,
            r.report.rate(),
            ms(r.report.p50),
            ms(r.report.p99),
            r.report.refused
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn bench_workload_api(args: BenchWorkloadApi) -> anyhow::Result<ExitCode> {
    let token = read_token_file(&args.token_file)?;
    anyhow::ensure!(
        args.streams >= 1 && args.jwt_concurrency >= 1 && args.jwt_requests >= 1,
        "--streams, --jwt-concurrency and --jwt-requests must be at least 1"
    );
    let r = crate::bench::workload_api::run(crate::bench::workload_api::Options {
        socket: args.socket,
        endpoint: Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?,
        admin_token: token,
        streams: args.streams,
        jwt_concurrency: args.jwt_concurrency,
        jwt_requests: args.jwt_requests,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let grown = r.rss_after_kib.saturating_sub(r.rss_before_kib);
    println!("workload API: {} concurrent FetchX509SVID streams", r.streams);
    println!("  all open in  {:.0} ms", ms(r.open_elapsed));
    println!(
        "  server RSS   {} KiB -> {} KiB: {:.1} KiB per open stream",
        r.rss_before_kib,
        r.rss_after_kib,
        grown as f64 / r.streams as f64
    );
    println!(
        "  rotation     pushed to all in {:.0} ms (p50 {:.0} ms)",
        ms(r.push_all),
        ms(r.push_p50)
    );
    println!(
        "FetchJWTSVID: {} calls, concurrency {}",
        r.jwt.requests, args.jwt_concurrency
    );
    if !r.jwt.refused.is_empty() {
        println!("  failed       {}", r.jwt.requests - r.jwt.issued);
    }
    println!("  throughput   {:.0} JWT-SVIDs/s", r.jwt.rate());
    println!(
        "  latency      p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(r.jwt.p50),
        ms(r.jwt.p99),
        ms(r.jwt.max)
    );
    Ok(ExitCode::SUCCESS)
}

async fn bench_broker(args: BenchBroker) -> anyhow::Result<ExitCode> {
    let token = read_token_file(&args.token_file)?;
    anyhow::ensure!(
        args.concurrency >= 1 && args.requests >= 1,
        "--concurrency and --requests must be at least 1"
    );
    anyhow::ensure!(args.rate.is_none_or(|r| r > 0.0), "--rate must be positive");
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let r = crate::bench::run_broker(crate::bench::BrokerOptions {
        endpoint,
        admin_token: token,
        concurrency: args.concurrency,
        requests: args.requests,
        rate: args.rate,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    match args.rate {
        Some(rate) => println!(
            "agent identities (one-hop delegation): {} requests at {rate:.0}/s open loop",
            r.requests
        ),
        None => println!(
            "agent identities (one-hop delegation): {} requests at concurrency {}",
            r.requests, args.concurrency
        ),
    }
    println!("  issued       {}", r.issued);
    if !r.refused.is_empty() {
        println!("  refused      {:?} (status, count)", r.refused);
    }
    println!("  throughput   {:.0} identities/s", r.rate());
    println!(
        "  latency      p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(r.p50),
        ms(r.p99),
        ms(r.max)
    );
    Ok(if r.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn bench_approvals(args: BenchApprovals) -> anyhow::Result<ExitCode> {
    let token = read_token_file(&args.token_file)?;
    anyhow::ensure!(args.requests >= 1, "--requests must be at least 1");
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let r = crate::bench::run_approvals(endpoint, &token, args.requests).await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "final approval -> long-polling requester holds its certificate: {} requests",
        r.requests
    );
    println!(
        "  latency      p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        ms(r.p50),
        ms(r.p99),
        ms(r.max)
    );
    Ok(ExitCode::SUCCESS)
}

fn policy_test(args: PolicyTest) -> anyhow::Result<ExitCode> {
    let report = run_tests(&args.dir)?;
    for (name, outcome, took) in &report.results {
        match outcome {
            TestOutcome::Pass if args.verbose => {
                println!("PASS {name} ({:.1} ms)", took.as_secs_f64() * 1000.0)
            }
            TestOutcome::Pass => {}
            TestOutcome::Fail => println!("FAIL {name}"),
            TestOutcome::Error(e) => println!("ERROR {name}: {e}"),
        }
    }
    println!("{} passed, {} failed", report.passed(), report.failed());
    anyhow::ensure!(
        !report.results.is_empty(),
        "no test_ rules found in {}",
        args.dir.display()
    );
    Ok(if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
