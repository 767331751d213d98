//! The command line: `castellan dev`, `serve`, `svid`, `bench`, `policy`.
//! Each command prints one clear `error:` line and exits non-zero on failure.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod attestor;
mod audit;
mod bundle;
mod ca;
mod entry;
mod ephemeral;
mod explain;
mod inventory;
mod load;
mod serve;
mod svid;
mod svid_helper;
mod token;
#[cfg(feature = "tpm")]
mod tpm;

use castellan::client::Endpoint;
pub(crate) use castellan::client::problem_line;
use castellan::policy::{TestOutcome, run_tests};

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
    Dev(serve::DevArgs),
    /// Run a server from a config file (TLS; the production entry point).
    Serve(serve::ServeArgs),
    /// Run the signer: the process that holds the CA and JWT keys, for
    /// gateways configured with `[signer] endpoint`.
    Signer(SignerArgs),
    /// Get an X.509-SVID from a running server.
    #[command(subcommand)]
    Svid(svid::SvidCommand),
    /// Measure a running server.
    #[command(subcommand)]
    Bench(load::BenchCommand),
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
    Token(token::TokenCommand),
    /// The CA's signing authorities and their rotation (admin).
    #[command(subcommand)]
    Ca(ca::CaCommand),
    /// The audit log: list, a signed export, and its offline verification.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The certificate inventory (admin).
    #[command(subcommand)]
    Certificates(inventory::CertificatesCommand),
    /// Trust sources: list, show, create, rotate, revoke (admin).
    #[command(subcommand)]
    TrustSource(inventory::TrustSourceCommand),
    /// Why a caller would get, or did not get, an identity (admin): from
    /// evidence, selectors or a refused request's id. Issues nothing.
    Explain(explain::Explain),
    /// Agent tokens the broker issued: list, revoke (admin).
    #[command(subcommand)]
    Agent(inventory::AgentCommand),
    /// Exit 0 when the server is ready (its store answers), 1 when not: for probes.
    Healthcheck(inventory::Healthcheck),
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

#[derive(Args)]
struct SignerArgs {
    /// The signer's config file (trust_domain, data_dir, socket, allowed_uids, caps).
    #[arg(long)]
    config: PathBuf,
}

/// How client commands reach a server.
#[derive(Args, Clone)]
struct ClientArgs {
    /// Server address, e.g. http://127.0.0.1:8443.
    #[arg(long, env = "CASTELLAN_ADDR", default_value = "http://127.0.0.1:8443")]
    addr: String,
    /// CA certificate to trust for https:// addresses (e.g. DATA_DIR/ca/bundle.pem).
    #[arg(long, env = "CASTELLAN_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// API token.
    #[arg(long, env = "CASTELLAN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A progress line on stderr for long-running commands, redrawn in place;
/// shown only when stderr is a terminal, so scripts and logs stay clean.
pub(crate) struct Progress {
    on: bool,
    what: &'static str,
    shown: std::cell::Cell<bool>,
}

impl Progress {
    pub(crate) fn new(what: &'static str) -> Self {
        use std::io::IsTerminal as _;
        Self {
            on: std::io::stderr().is_terminal(),
            what,
            shown: std::cell::Cell::new(false),
        }
    }

    pub(crate) fn show(&self, text: impl std::fmt::Display) {
        if self.on {
            use std::io::Write as _;
            eprint!("\r\x1b[2K{}: {text}", self.what);
            let _ = std::io::stderr().flush();
            self.shown.set(true);
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.shown.get() {
            eprintln!();
        }
    }
}

impl ClientArgs {
    fn endpoint(&self) -> anyhow::Result<Endpoint> {
        Ok(Endpoint::parse(&self.addr, self.ca_file.as_deref())?)
    }
}

/// Where a server is, for commands that need no token.
#[derive(Args, Clone)]
struct ServerArgs {
    /// Server address, e.g. http://127.0.0.1:8443.
    #[arg(long, env = "CASTELLAN_ADDR", default_value = "http://127.0.0.1:8443")]
    addr: String,
    /// CA certificate to trust for https:// addresses (e.g. DATA_DIR/ca/bundle.pem).
    #[arg(long, env = "CASTELLAN_CA_FILE")]
    ca_file: Option<PathBuf>,
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
        Command::Dev(args) => serve::dev_command(args).await,
        Command::Serve(args) => serve::serve(args).await,
        Command::Svid(svid::SvidCommand::Issue(args)) => svid::svid_issue(args).await,
        Command::Bench(cmd) => load::run(cmd).await,
        Command::Policy(PolicyCommand::Test(args)) => policy_test(args),
        Command::Token(cmd) => token::run(cmd).await,
        Command::Signer(args) => {
            let config = castellan::signer::service::SignerConfig::load(&args.config)?;
            castellan::signer::service::run(config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ca(cmd) => ca::run(cmd).await,
        Command::Audit(cmd) => audit::run(cmd).await,
        Command::Certificates(cmd) => inventory::certificates(cmd).await,
        Command::TrustSource(cmd) => inventory::trust_source(cmd).await,
        Command::Healthcheck(args) => inventory::healthcheck(args).await,
        Command::Explain(args) => explain::run(args).await,
        Command::Agent(cmd) => inventory::agent(cmd).await,
        Command::Bundle(cmd) => bundle::run(cmd),
        Command::Attestor(cmd) => attestor::run(cmd),
        Command::Entry(cmd) => entry::run(cmd).await,
        Command::Ephemeral(cmd) => ephemeral::ephemeral(cmd).await,
        Command::SvidHelper(args) => svid_helper::run(args).await,
        #[cfg(feature = "tpm")]
        Command::Tpm(cmd) => tpm::run(cmd).await,
    }
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
