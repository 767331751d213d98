//! `castellan bench …`: drive a running server with the load generator
//! (`crate::bench`) and print what it measured.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use castellan::client::Endpoint;

use super::ServerArgs;

#[derive(Subcommand)]
pub(super) enum BenchCommand {
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
    /// A legitimate client's issuances and challenges, alone and during each
    /// flood (challenges, half-sent requests, refusals with new idempotency keys).
    Flood(BenchFlood),
    /// Signatures per second through the signer a gateway config names: its
    /// keyring in process (disk or PKCS#11), or its `[signer] endpoint`.
    Signer(BenchSigner),
}

#[derive(Args)]
pub(super) struct BenchSigner {
    /// The gateway's config file.
    #[arg(long)]
    config: PathBuf,
    /// Threads signing at once.
    #[arg(long, default_value_t = 8)]
    threads: usize,
    /// Signatures of each kind.
    #[arg(long, default_value_t = 5_000)]
    signatures: usize,
}

#[derive(Args)]
pub(super) struct BenchFlood {
    #[command(flatten)]
    server: ServerArgs,
    /// File holding the admin API token.
    #[arg(long)]
    token_file: PathBuf,
    /// Seconds each phase lasts.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Attacking tasks.
    #[arg(long, default_value_t = 64)]
    attackers: usize,
    /// The attackers' local address (another loopback address than the client's).
    #[arg(long, default_value = "127.0.0.1")]
    attacker_ip: std::net::IpAddr,
    /// The legitimate client's local address.
    #[arg(long, default_value = "127.0.0.2")]
    client_ip: std::net::IpAddr,
}

#[derive(Args)]
pub(super) struct BenchAttestors {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's process id, for its CPU time [default: the process
    /// listening on the address's port on this machine].
    #[arg(long)]
    server_pid: Option<u32>,
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
pub(super) struct BenchWorkloadApi {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's process id, for its CPU time [default: the process
    /// listening on the address's port on this machine].
    #[arg(long)]
    server_pid: Option<u32>,
    /// File holding the admin API token (to register the bench entries).
    #[arg(long)]
    token_file: PathBuf,
    /// The Workload API socket.
    #[arg(long)]
    socket: PathBuf,
    /// Concurrent FetchX509SVID streams, one connection each.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Registration entries every stream matches (each stream gets one
    /// X.509-SVID per entry).
    #[arg(long, default_value_t = 10)]
    entries: usize,
    /// X.509-SVID lifetime of those entries, in seconds: the bench waits
    /// for their rotation at half of it (open the streams well within that).
    #[arg(long, default_value_t = 60)]
    svid_ttl: u64,
    /// FetchJWTSVID calls in flight at once.
    #[arg(long, default_value_t = 32)]
    jwt_concurrency: usize,
    /// FetchJWTSVID calls measured.
    #[arg(long, default_value_t = 20_000)]
    jwt_requests: usize,
}

#[derive(Args)]
pub(super) struct BenchBroker {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's process id, for its CPU time [default: the process
    /// listening on the address's port on this machine].
    #[arg(long)]
    server_pid: Option<u32>,
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
    /// Each of the 64 agents presents one token every time (as pods present
    /// their projected token) [default: a new token per request].
    #[arg(long)]
    reuse_tokens: bool,
}

#[derive(Args)]
pub(super) struct BenchApprovals {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's process id, for its CPU time [default: the process
    /// listening on the address's port on this machine].
    #[arg(long)]
    server_pid: Option<u32>,
    /// File holding the admin API token (to create the bench's own tokens).
    #[arg(long)]
    token_file: PathBuf,
    /// Requests to approve, one after another.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Where the votes go (another gateway on the same database); the
    /// requester creates and long-polls at `--addr`. Default: `--addr`.
    #[arg(long)]
    vote_addr: Option<String>,
}

#[derive(Args)]
pub(super) struct BenchIssuance {
    #[command(flatten)]
    server: ServerArgs,
    /// The server's process id, for its CPU time [default: the process
    /// listening on the address's port on this machine].
    #[arg(long)]
    server_pid: Option<u32>,
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
    /// Distinct service-account tokens, presented in turn as pods present
    /// theirs many times [default: a new token for every request].
    #[arg(long)]
    tokens: Option<usize>,
}

/// Runs one `castellan bench` command.
pub(super) async fn run(cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Issuance(args) => bench(args).await,
        BenchCommand::Approvals(args) => bench_approvals(args).await,
        BenchCommand::Broker(args) => bench_broker(args).await,
        BenchCommand::WorkloadApi(args) => bench_workload_api(args).await,
        BenchCommand::Attestors(args) => bench_attestors(args).await,
        BenchCommand::Flood(args) => bench_flood(args).await,
        BenchCommand::Signer(args) => bench_signer(args),
    }
}

async fn bench_flood(args: BenchFlood) -> anyhow::Result<ExitCode> {
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("{}", args.token_file.display()))?
        .trim()
        .to_owned();
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let phases = crate::bench::run_flood(crate::bench::FloodOptions {
        endpoint,
        admin_token: token,
        seconds: args.seconds,
        attackers: args.attackers,
        attacker_ip: args.attacker_ip,
        client_ip: args.client_ip,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{:<36}  {:>9}  {:>8}  {:>6}  {:>10}  {:>8}  {:>8}",
        "phase", "attacks", "issued", "failed", "challenges", "p50 ms", "p99 ms"
    );
    for p in &phases {
        println!(
            "{:<36}  {:>9}  {:>8}  {:>6}  {:>10}  {:>8.2}  {:>8.2}",
            p.name,
            p.attacks,
            p.issued,
            p.failed,
            format!("{}/{}", p.challenges_ok, p.challenges_ok + p.challenges_failed),
            ms(p.p50),
            ms(p.p99)
        );
    }
    let served = phases
        .iter()
        .all(|p| p.issued > 0 && p.failed == 0 && p.challenges_failed == 0);
    Ok(if served {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
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
        server_pid: args.server_pid,
        tokens: args.tokens,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "attested issuance: {} requests at concurrency {}, {}",
        report.requests,
        args.concurrency,
        match args.tokens {
            Some(n) => format!("{n} distinct tokens in turn"),
            None => "a new token for each".to_owned(),
        }
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
    if let Some(c) = report.server_cpu {
        println!("{}", c.line(report.issued, "issuance"));
    }
    Ok(if report.refused.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An admin token from a file, trimmed.
pub(super) fn read_token_file(path: &std::path::Path) -> anyhow::Result<String> {
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
        server_pid: args.server_pid,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    println!(
        "attested issuance by method: {} requests each, concurrency {}",
        args.requests, args.concurrency
    );
    println!("  method        issued/s    p50 ms   p99 ms   CPU ms/op   refused");
    for r in rows {
        let cpu = r
            .report
            .server_cpu
            .map(|c| format!("{:.3}", ms(c.per_op(r.report.issued))))
            .unwrap_or_else(|| "-".into());
        println!(
            "  {:<12} {:>9.0} {:>9.2} {:>8.2}   {cpu:>9}   {:?}",
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
        args.streams >= 1
            && args.entries >= 1
            && args.jwt_concurrency >= 1
            && args.jwt_requests >= 1
            && (2..=86_400).contains(&args.svid_ttl),
        "--streams, --entries, --jwt-concurrency and --jwt-requests must be at least 1, --svid-ttl 2 to 86400"
    );
    let r = crate::bench::workload_api::run(crate::bench::workload_api::Options {
        socket: args.socket,
        endpoint: Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?,
        admin_token: token,
        streams: args.streams,
        entries: args.entries,
        svid_ttl: args.svid_ttl,
        jwt_concurrency: args.jwt_concurrency,
        jwt_requests: args.jwt_requests,
        server_pid: args.server_pid,
    })
    .await?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    let grown = r.rss_after_kib.saturating_sub(r.rss_before_kib);
    println!(
        "workload API: {} concurrent FetchX509SVID streams matching {} entries",
        r.streams, r.entries
    );
    println!("  all open in  {:.0} ms", ms(r.open_elapsed));
    println!(
        "  signatures   {} for the {} streams to open, {} for the change pushed to all",
        r.signed_open, r.streams, r.signed_push
    );
    println!(
        "  server RSS   {} KiB -> {} KiB: {:.1} KiB per open stream",
        r.rss_before_kib,
        r.rss_after_kib,
        grown as f64 / r.streams as f64
    );
    println!(
        "  new entry    pushed to all in {:.0} ms (p50 {:.0} ms)",
        ms(r.push_all),
        ms(r.push_p50)
    );
    println!(
        "  rotation     {} signatures at half-life; reached every stream {:.0} ms after the first (p50 {:.0} ms)",
        r.signed_rotation,
        ms(r.rotation_all),
        ms(r.rotation_p50)
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
    if let Some(c) = r.jwt.server_cpu {
        println!("{}", c.line(r.jwt.issued, "JWT-SVID"));
    }
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
        server_pid: args.server_pid,
        reuse_tokens: args.reuse_tokens,
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
    if let Some(c) = r.server_cpu {
        println!("{}", c.line(r.issued, "identity"));
    }
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
    let vote_endpoint = match &args.vote_addr {
        Some(a) => Endpoint::parse(a, args.server.ca_file.as_deref())?,
        None => endpoint.clone(),
    };
    let r =
        crate::bench::run_approvals(endpoint, vote_endpoint, &token, args.requests, args.server_pid).await?;
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
    if let Some(c) = r.server_cpu {
        println!(
            "{}",
            c.line(r.requests, "request (created, two votes, collected)")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Signs `signatures` X.509-SVIDs, then as many JWT-SVIDs, from `threads`
/// threads, through the signer the config names; prints each rate.
fn bench_signer(args: BenchSigner) -> anyhow::Result<ExitCode> {
    use castellan::signer::{JwtAlg, JwtSvidClaims, Signer, Template};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let config = castellan::config::Config::load(&args.config)?;
    let signer: std::sync::Arc<dyn Signer> = match config.signer.socket() {
        Some(socket) => std::sync::Arc::new(castellan::signer::remote::RemoteSigner::connect(&socket)?),
        None => std::sync::Arc::new(crate::server::open_signer(&config, &config.data_dir.join("ca"))?.0),
    };
    let where_ = match (&config.signer.endpoint, config.ca.key_manager.as_str()) {
        (Some(e), _) => format!("signer process at {e}"),
        (None, "pkcs11") => "in process, keys in the PKCS#11 token".into(),
        (None, _) => "in process, keys on disk".into(),
    };
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let id = castellan::spiffe_id::SpiffeId::parse(&format!("spiffe://{}/bench", config.trust_domain))?;
    println!("signer bench: {where_}, {} threads", args.threads);
    for kind in ["x509-svid", "jwt-svid"] {
        let next = AtomicUsize::new(0);
        let start = std::time::Instant::now();
        let failed = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..args.threads.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        let mut failed = 0usize;
                        while next.fetch_add(1, Ordering::Relaxed) < args.signatures {
                            let now = castellan::util::now_unix();
                            let ok = if kind == "x509-svid" {
                                signer
                                    .sign_x509_svid(&Template {
                                        spiffe_id: id.clone(),
                                        public_key_der: spki.clone(),
                                        ttl: time::Duration::minutes(5),
                                        dns_names: vec![],
                                        extensions: vec![],
                                    })
                                    .is_ok()
                            } else {
                                let claims = JwtSvidClaims {
                                    sub: id.clone(),
                                    aud: vec!["bench".into()],
                                    iat: now,
                                    exp: now + 300,
                                    iss: None,
                                    jti: None,
                                    agent: None,
                                };
                                signer.sign_jwt_svid(&claims, JwtAlg::ES256).is_ok()
                            };
                            failed += usize::from(!ok);
                        }
                        failed
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or(usize::MAX))
                .sum::<usize>()
        });
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "  {kind:<10} {:>8.0} signatures/s  ({} in {elapsed:.2} s, {failed} failed)",
            args.signatures as f64 / elapsed,
            args.signatures
        );
        anyhow::ensure!(failed == 0, "{failed} {kind} signatures failed");
    }
    Ok(ExitCode::SUCCESS)
}
