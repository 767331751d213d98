//! `castellan svid-helper`: a SPIFFE Workload API client that keeps a
//! workload's identity on disk, in the manner of spiffe-helper. It writes the
//! X.509-SVID (leaf, then intermediates), its PKCS#8 key and the trust
//! bundle — and, when asked, a JWT-SVID and the trust domain's JWKS — rewrites
//! them on every update the server pushes, and starts a command that it
//! signals (or restarts) on each rotation.
//!
//! It must never print key material or tokens, and never let a secret sit in a
//! file another user could open, not even for a moment: every file is written
//! to a temporary file created with its final mode, then renamed into place.

use std::io::Write as _;
use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Component, Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, ExitStatus};
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use clap::builder::NonEmptyStringValueParser;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use spiffe::transport::Endpoint;
use spiffe::{SpiffeId, TrustDomain, WorkloadApiClient, WorkloadApiError, X509Context, X509Svid};
use time::OffsetDateTime;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::{Instant, sleep_until};
use tokio_stream::{Stream, StreamExt as _};

use castellan::util::{pem_block, rfc3339};

/// Certificates, bundles and JWKS: public material.
const PUBLIC_MODE: u32 = 0o644;
/// Private keys and bearer tokens.
const SECRET_MODE: u32 = 0o600;
/// How long a command asked to stop (SIGTERM) gets before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Keep an SVID on disk from the Workload API (flags follow spiffe-helper).
#[derive(Args)]
pub(super) struct SvidHelperArgs {
    /// Workload API socket: `unix:/path` or a plain path.
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    socket: String,
    /// Directory to write into; created with mode 0700 if missing.
    #[arg(long)]
    dir: PathBuf,
    /// File for the X.509-SVID: the leaf certificate, then its intermediates.
    #[arg(long, default_value = "svid.pem")]
    svid_file: String,
    /// File for the SVID's private key (PKCS#8 PEM, mode 0600).
    #[arg(long, default_value = "svid_key.pem")]
    key_file: String,
    /// File for the trust bundle: the trust domain's X.509 authorities, then federated ones.
    #[arg(long, default_value = "bundle.pem")]
    bundle_file: String,
    /// Use the X.509-SVID with this SPIFFE ID (default: the first one offered).
    #[arg(long, value_parser = parse_spiffe_id)]
    spiffe_id: Option<SpiffeId>,
    /// Also keep a JWT-SVID for this audience on disk, refreshed at half its lifetime; repeat for more.
    #[arg(long = "jwt-audience", value_parser = NonEmptyStringValueParser::new())]
    jwt_audiences: Vec<String>,
    /// File for the JWT-SVID (mode 0600).
    #[arg(long, default_value = "jwt_svid.token")]
    jwt_svid_file: String,
    /// File for the JWT bundle: the trust domain's JWKS.
    #[arg(long, default_value = "jwt_bundle.json")]
    jwt_bundle_file: String,
    /// Program to start after the first write and to tell about every rotation.
    #[arg(long)]
    cmd: Option<String>,
    /// The program's arguments, split on whitespace.
    #[arg(long, requires = "cmd", allow_hyphen_values = true)]
    cmd_args: Option<String>,
    /// Signal sent to the program on each rotation (SIGHUP, HUP, USR1, …); without it the program is restarted.
    #[arg(long, requires = "cmd", value_parser = parse_signal)]
    signal: Option<Signal>,
    /// Write the files once and exit.
    #[arg(long, conflicts_with_all = ["cmd", "cmd_args", "signal"])]
    once: bool,
    /// With --once: give up after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout_secs: u64,
}

/// Why one attempt to fetch or write the material failed. The daemon logs
/// each and retries; `--once` retries until its deadline and reports the last.
#[derive(Debug, thiserror::Error)]
enum HelperError {
    /// The Workload API knows no identity for this process.
    #[error(
        "no identity is registered for this process (uid {uid}): the Workload API answered PermissionDenied ({detail}); \
         register an entry whose selectors match it, e.g. \
         `castellan entry create -spiffeID spiffe://<trust-domain>/<path> -selector unix:uid:{uid}`"
    )]
    NoIdentity { uid: u32, detail: String },
    /// The Workload API could not be reached, or failed the call.
    #[error("Workload API at {socket}: {detail}")]
    Api { socket: String, detail: String },
    /// The Workload API closed the X.509 stream.
    #[error("the Workload API at {socket} closed the X.509-SVID stream")]
    StreamEnded { socket: String },
    /// `--spiffe-id` names an identity that was not offered.
    #[error("the Workload API offers no X.509-SVID for --spiffe-id {wanted} (it offers: {offered})")]
    NoSuchSvid { wanted: SpiffeId, offered: String },
    /// An update without any X.509-SVID.
    #[error("the Workload API sent no X.509-SVID")]
    NoSvid,
    /// No bundle for the SVID's own trust domain.
    #[error("the Workload API sent no {kind} bundle for trust domain {trust_domain}")]
    NoBundle {
        kind: &'static str,
        trust_domain: String,
    },
    /// A JWT authority that is not a JSON object.
    #[error("the Workload API sent a JWT authority that is not JSON: {0}")]
    BadJwk(serde_json::Error),
    /// A file could not be written.
    #[error("cannot write {}: {error}", path.display())]
    Write { path: PathBuf, error: std::io::Error },
}

/// The helper's configuration, checked once at start-up.
struct Settings {
    /// The socket as given, for messages.
    socket: String,
    endpoint: Endpoint,
    files: Files,
    spiffe_id: Option<SpiffeId>,
    jwt_audiences: Vec<String>,
    command: Option<CommandSpec>,
    once: bool,
    timeout: Duration,
}

/// Where the material goes: one directory, a file name for each part.
struct Files {
    dir: PathBuf,
    svid: String,
    key: String,
    bundle: String,
    jwt_svid: String,
    jwt_bundle: String,
}

/// How the command learns of a rotation.
#[derive(Clone, Copy)]
enum Reload {
    Signal(Signal),
    Restart,
}

/// The program to run beside the files.
#[derive(Clone)]
struct CommandSpec {
    program: String,
    args: Vec<String>,
    reload: Reload,
}

/// The command as it runs: started after the first complete write, told of
/// every X.509 rotation, and started again at the next rotation if it exited
/// on its own (as spiffe-helper does).
struct Process {
    spec: CommandSpec,
    child: Option<tokio::process::Child>,
    started: bool,
}

/// An open Workload API connection and its X.509 context stream.
struct Session {
    client: WorkloadApiClient,
    contexts: Pin<Box<dyn Stream<Item = Result<X509Context, WorkloadApiError>> + Send>>,
}

/// The daemon's state between updates.
struct Daemon<'a> {
    settings: &'a Settings,
    process: Option<Process>,
    /// The identity in the X.509 files, once written.
    identity: Option<SpiffeId>,
    jwt: Option<JwtSchedule>,
}

/// When the JWT-SVID is next due, and for which identity one is on disk.
#[derive(Default)]
struct JwtSchedule {
    due: Option<Instant>,
    written_for: Option<SpiffeId>,
    backoff: Backoff,
}

/// Retry delay: 500 ms, doubling up to 30 s; reset after a success.
#[derive(Default)]
struct Backoff {
    failures: u32,
}

/// Runs `castellan svid-helper`.
pub(super) async fn run(args: SvidHelperArgs) -> anyhow::Result<ExitCode> {
    let settings = Settings::new(args)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&settings.files.dir)
        .with_context(|| format!("--dir: cannot create {}", settings.files.dir.display()))?;
    if settings.once {
        once(&settings).await
    } else {
        Daemon::new(&settings).run().await
    }
}

/// `--once`: fetch and write until it works or the deadline passes.
async fn once(settings: &Settings) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + settings.timeout;
    let mut backoff = Backoff::default();
    let mut last = None;
    loop {
        match tokio::time::timeout_at(deadline, write_once(settings)).await {
            Ok(Ok(())) => return Ok(ExitCode::SUCCESS),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "svid-helper: not written yet; retrying");
                last = Some(e);
            }
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            break;
        }
        sleep_until(deadline.min(Instant::now() + backoff.next())).await;
    }
    let why = match last {
        Some(e) => e.to_string(),
        None => format!("the Workload API at {} did not answer", settings.socket),
    };
    anyhow::bail!(
        "{why} (gave up after {} s; see --timeout-secs)",
        settings.timeout.as_secs()
    )
}

async fn write_once(settings: &Settings) -> Result<(), HelperError> {
    let client = settings.connect().await?;
    let context = client
        .fetch_x509_context()
        .await
        .map_err(|e| settings.api_error(&e))?;
    let id = settings.files.write_x509(&context, settings.spiffe_id.as_ref())?;
    if !settings.jwt_audiences.is_empty() {
        settings.write_jwt(&client, &id).await?;
    }
    Ok(())
}

/// Connects and opens the X.509 context stream, once `at` has come.
async fn open(settings: &Settings, at: Instant) -> Result<Session, HelperError> {
    sleep_until(at).await;
    let client = settings.connect().await?;
    let contexts = client
        .stream_x509_contexts()
        .await
        .map_err(|e| settings.api_error(&e))?;
    Ok(Session {
        client,
        contexts: Box::pin(contexts),
    })
}

/// The next update on the open stream; never resolves without one.
async fn next_update(session: &mut Option<Session>) -> Option<Result<X509Context, WorkloadApiError>> {
    match session {
        Some(s) => s.contexts.next().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the running command exits; never if none runs.
async fn exited(process: &mut Option<Process>) -> std::io::Result<ExitStatus> {
    match process {
        Some(p) => p.exited().await,
        None => std::future::pending().await,
    }
}

/// Prints a `wrote …` line. stdout may be a closed pipe in a long-running
/// daemon; losing the line must not stop the helper.
fn say(line: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Every message in an error's chain: tonic's top-level errors alone say
/// little ("transport error"); the cause is further down.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = e.source();
    }
    text
}

/// `SPIFFE_ENDPOINT_SOCKET` is a URI (`unix:/path`); spiffe-helper's
/// `agent_address` is a plain path. Take both.
fn parse_socket(raw: &str) -> anyhow::Result<Endpoint> {
    // Anything with a scheme is a URI (so `http://…` is refused, not taken
    // for a relative path); anything else is a path.
    let scheme = raw.split_once(':').map(|(s, _)| s);
    let is_uri = !raw.starts_with(['/', '.'])
        && scheme.is_some_and(|s| {
            s.starts_with(|c: char| c.is_ascii_alphabetic())
                && s.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        });
    if !is_uri {
        // Straight to a path: a URI would percent-encode spaces and the like.
        let path = std::path::absolute(raw).with_context(|| format!("--socket {raw:?}"))?;
        return Ok(Endpoint::Unix(path));
    }
    Endpoint::parse(raw).with_context(|| {
        format!("--socket (or SPIFFE_ENDPOINT_SOCKET) {raw:?} is not a Workload API address; give unix:/path or a path")
    })
}

/// `SIGHUP`, `HUP`, `hup` or a signal number.
fn parse_signal(raw: &str) -> Result<Signal, String> {
    let bad = || format!("{raw:?} is not a signal; give a name such as SIGHUP, HUP or USR1");
    if let Ok(number) = raw.parse::<i32>() {
        return Signal::try_from(number).map_err(|_| bad());
    }
    let name = raw.trim().to_ascii_uppercase();
    let name = if name.starts_with("SIG") {
        name
    } else {
        format!("SIG{name}")
    };
    name.parse().map_err(|_| bad())
}

fn parse_spiffe_id(raw: &str) -> Result<SpiffeId, String> {
    SpiffeId::new(raw).map_err(|e| format!("{raw:?} is not a SPIFFE ID: {e}"))
}

/// The SVID `wanted`, or the default (first) one.
fn choose<'c>(context: &'c X509Context, wanted: Option<&SpiffeId>) -> Result<&'c X509Svid, HelperError> {
    let Some(wanted) = wanted else {
        return context.default_svid().map(|s| &**s).ok_or(HelperError::NoSvid);
    };
    context
        .svids()
        .iter()
        .find(|s| s.spiffe_id() == wanted)
        .map(|s| &**s)
        .ok_or_else(|| HelperError::NoSuchSvid {
            wanted: wanted.clone(),
            offered: context
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The SVID's own trust domain's authorities first, then every federated
/// bundle's, so a relying party can verify peers of either.
fn bundle_pem(context: &X509Context, own: &TrustDomain) -> Result<String, HelperError> {
    let bundles = context.bundle_set();
    let Some(local) = bundles.get_ref(own).filter(|b| !b.authorities().is_empty()) else {
        return Err(HelperError::NoBundle {
            kind: "X.509",
            trust_domain: own.to_string(),
        });
    };
    let federated = bundles.iter().filter(|(td, _)| *td != own).map(|(_, b)| b);
    Ok(std::iter::once(local)
        .chain(federated)
        .flat_map(|b| b.authorities())
        .map(|a| pem_block("CERTIFICATE", a.as_bytes()))
        .collect())
}

fn leaf_not_after(der: &[u8]) -> Option<OffsetDateTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.to_datetime())
}

/// A file name given by flag `flag` must name a file inside `--dir`.
fn file_name(flag: &str, name: String) -> anyhow::Result<String> {
    let mut parts = Path::new(&name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(_)), None) => Ok(name),
        _ => anyhow::bail!("--{flag} {name:?} must be a plain file name inside --dir"),
    }
}

/// Writes `contents` to `dir/name` through a temporary file in the same
/// directory and a rename, so a reader sees the old file or the new one,
/// never half of one. The temporary file is created with `mode` (0600 for
/// secrets): key bytes are never readable by others, not even before the
/// rename.
fn write_atomic(dir: &Path, name: &str, contents: &[u8], mode: u32) -> Result<(), HelperError> {
    let path = dir.join(name);
    castellan::util::write_file_atomic(&path, contents, mode)
        .map_err(|error| HelperError::Write { path, error })
}

// === impl Settings ===

impl Settings {
    fn new(a: SvidHelperArgs) -> anyhow::Result<Self> {
        let files = Files {
            dir: a.dir,
            svid: file_name("svid-file", a.svid_file)?,
            key: file_name("key-file", a.key_file)?,
            bundle: file_name("bundle-file", a.bundle_file)?,
            jwt_svid: file_name("jwt-svid-file", a.jwt_svid_file)?,
            jwt_bundle: file_name("jwt-bundle-file", a.jwt_bundle_file)?,
        };
        let mut names = vec![&files.svid, &files.key, &files.bundle];
        if !a.jwt_audiences.is_empty() {
            names.extend([&files.jwt_svid, &files.jwt_bundle]);
        }
        let count = names.len();
        names.sort();
        names.dedup();
        // Two parts in one file would overwrite each other, the key perhaps
        // landing in a file meant to be public.
        anyhow::ensure!(
            names.len() == count,
            "the output file names (--svid-file, --key-file, --bundle-file, --jwt-svid-file, --jwt-bundle-file) must differ"
        );
        let command = a.cmd.map(|program| CommandSpec {
            program,
            args: a
                .cmd_args
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            reload: a.signal.map_or(Reload::Restart, Reload::Signal),
        });
        Ok(Self {
            endpoint: parse_socket(&a.socket)?,
            socket: a.socket,
            files,
            spiffe_id: a.spiffe_id,
            jwt_audiences: a.jwt_audiences,
            command,
            once: a.once,
            timeout: Duration::from_secs(a.timeout_secs),
        })
    }

    async fn connect(&self) -> Result<WorkloadApiClient, HelperError> {
        WorkloadApiClient::connect(self.endpoint.clone())
            .await
            .map_err(|e| self.api_error(&e))
    }

    /// PermissionDenied means no entry matches this process: say so, with
    /// the uid the server attests, rather than a bare gRPC status.
    fn api_error(&self, e: &WorkloadApiError) -> HelperError {
        match e {
            WorkloadApiError::NoIdentityIssued => HelperError::NoIdentity {
                uid: nix::unistd::getuid().as_raw(),
                detail: "no identity issued".into(),
            },
            WorkloadApiError::PermissionDenied(detail) => HelperError::NoIdentity {
                uid: nix::unistd::getuid().as_raw(),
                detail: detail.clone(),
            },
            other => HelperError::Api {
                socket: self.socket.clone(),
                detail: chain(other),
            },
        }
    }

    /// Fetches a JWT-SVID for `id` and the JWT bundle, and writes both.
    /// Returns when the token expires.
    async fn write_jwt(
        &self,
        client: &WorkloadApiClient,
        id: &SpiffeId,
    ) -> Result<OffsetDateTime, HelperError> {
        let svid = client
            .fetch_jwt_svid(&self.jwt_audiences, Some(id))
            .await
            .map_err(|e| self.api_error(&e))?;
        let bundles = client.fetch_jwt_bundles().await.map_err(|e| self.api_error(&e))?;
        let trust_domain = svid.spiffe_id().trust_domain();
        let bundle = bundles
            .get_ref(trust_domain)
            .ok_or_else(|| HelperError::NoBundle {
                kind: "JWT",
                trust_domain: trust_domain.to_string(),
            })?;
        let mut keys = bundle
            .jwt_authorities()
            .map(|a| serde_json::from_slice::<serde_json::Value>(a.jwk_json()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(HelperError::BadJwk)?;
        // The bundle is a map; sort so an unchanged bundle is an unchanged file.
        keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
        let jwks = serde_json::json!({ "keys": keys });
        let f = &self.files;
        write_atomic(&f.dir, &f.jwt_svid, svid.token().as_bytes(), SECRET_MODE)?;
        write_atomic(
            &f.dir,
            &f.jwt_bundle,
            format!("{jwks:#}\n").as_bytes(),
            PUBLIC_MODE,
        )?;
        let expires = svid.expiry();
        say(format_args!(
            "wrote {}, {} for {} (audience {}; expires {})",
            f.jwt_svid,
            f.jwt_bundle,
            svid.spiffe_id(),
            self.jwt_audiences.join(", "),
            rfc3339(expires)
        ));
        Ok(expires)
    }
}

// === impl Files ===

impl Files {
    /// Writes the chosen SVID, its key and the bundle; returns its SPIFFE ID.
    fn write_x509(&self, context: &X509Context, wanted: Option<&SpiffeId>) -> Result<SpiffeId, HelperError> {
        let svid = choose(context, wanted)?;
        let chain: String = svid
            .cert_chain()
            .iter()
            .map(|c| pem_block("CERTIFICATE", c.as_bytes()))
            .collect();
        let bundle = bundle_pem(context, svid.spiffe_id().trust_domain())?;
        let key = pem_block("PRIVATE KEY", svid.private_key().as_bytes());
        write_atomic(&self.dir, &self.svid, chain.as_bytes(), PUBLIC_MODE)?;
        write_atomic(&self.dir, &self.key, key.as_bytes(), SECRET_MODE)?;
        write_atomic(&self.dir, &self.bundle, bundle.as_bytes(), PUBLIC_MODE)?;
        let expires = leaf_not_after(svid.leaf().as_bytes()).map_or_else(|| "unknown".into(), rfc3339);
        say(format_args!(
            "wrote {}, {}, {} for {} (expires {expires})",
            self.svid,
            self.key,
            self.bundle,
            svid.spiffe_id()
        ));
        Ok(svid.spiffe_id().clone())
    }
}

// === impl Daemon ===

impl<'a> Daemon<'a> {
    fn new(settings: &'a Settings) -> Self {
        Self {
            settings,
            process: settings.command.clone().map(Process::new),
            identity: None,
            jwt: (!settings.jwt_audiences.is_empty()).then(JwtSchedule::default),
        }
    }

    /// Follows the X.509 stream until SIGTERM or SIGINT, reconnecting with
    /// backoff whenever it breaks; then stops the command.
    async fn run(mut self) -> anyhow::Result<ExitCode> {
        let mut terminate = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let settings = self.settings;
        let mut session: Option<Session> = None;
        let mut backoff = Backoff::default();
        let mut reconnect_at = Instant::now();
        tracing::info!(socket = %settings.socket, dir = %settings.files.dir.display(), "svid-helper following the Workload API");
        loop {
            let jwt_due = self.jwt.as_ref().and_then(|j| j.due);
            let failure = tokio::select! {
                _ = terminate.recv() => break,
                _ = interrupt.recv() => break,
                opened = open(settings, reconnect_at), if session.is_none() => match opened {
                    Ok(s) => {
                        // The backoff resets on a written update, not on a
                        // connection: a stream that fails at once still backs off.
                        session = Some(s);
                        continue;
                    }
                    Err(e) => Some(e),
                },
                update = next_update(&mut session) => match (update, &session) {
                    (Some(Ok(context)), Some(s)) => {
                        let client = s.client.clone();
                        self.on_update(&client, &context).await.err()
                    }
                    (Some(Err(e)), _) => Some(settings.api_error(&e)),
                    _ => Some(HelperError::StreamEnded { socket: settings.socket.clone() }),
                },
                _ = sleep_until(jwt_due.unwrap_or_else(Instant::now)), if jwt_due.is_some() && session.is_some() => {
                    if let Some(s) = &session {
                        let client = s.client.clone();
                        self.refresh_jwt(&client).await;
                    }
                    // A refresh is no rotation: the command is only started
                    // here if it waited for the first token.
                    if self.ready()
                        && let Some(p) = &mut self.process
                        && !p.started
                    {
                        p.rotated().await;
                    }
                    continue;
                }
                status = exited(&mut self.process) => {
                    match status {
                        Ok(status) => tracing::warn!(%status, "svid-helper: the command exited; it is started again at the next rotation"),
                        Err(e) => tracing::warn!(error = %e, "svid-helper: cannot wait for the command"),
                    }
                    continue;
                }
            };
            match failure {
                None => backoff.reset(),
                Some(e) => {
                    let delay = backoff.next();
                    tracing::warn!(error = %e, retry_in = ?delay, "svid-helper: no update written");
                    session = None;
                    reconnect_at = Instant::now() + delay;
                }
            }
        }
        tracing::info!("svid-helper stopping");
        if let Some(p) = &mut self.process {
            p.stop().await;
        }
        Ok(ExitCode::SUCCESS)
    }

    /// An X.509 update: rewrite the files, then the JWT if it is for another
    /// identity (or none is on disk yet), then tell the command.
    async fn on_update(
        &mut self,
        client: &WorkloadApiClient,
        context: &X509Context,
    ) -> Result<(), HelperError> {
        let id = self
            .settings
            .files
            .write_x509(context, self.settings.spiffe_id.as_ref())?;
        self.identity = Some(id.clone());
        if self
            .jwt
            .as_ref()
            .is_some_and(|j| j.written_for.as_ref() != Some(&id))
        {
            self.refresh_jwt(client).await;
        }
        if self.ready()
            && let Some(p) = &mut self.process
        {
            p.rotated().await;
        }
        Ok(())
    }

    /// Writes a fresh JWT-SVID and schedules the next at half its lifetime,
    /// or a retry. JWT refreshes do not signal the command (spiffe-helper
    /// does not either); the command re-reads the token file.
    async fn refresh_jwt(&mut self, client: &WorkloadApiClient) {
        let (Some(id), Some(jwt)) = (&self.identity, &mut self.jwt) else {
            return;
        };
        match self.settings.write_jwt(client, id).await {
            Ok(expires) => {
                jwt.backoff.reset();
                jwt.written_for = Some(id.clone());
                let left = (expires - OffsetDateTime::now_utc()).whole_milliseconds() / 2;
                let half =
                    Duration::from_millis(u64::try_from(left).unwrap_or(0)).max(Duration::from_secs(1));
                jwt.due = Some(Instant::now() + half);
            }
            Err(e) => {
                let delay = jwt.backoff.next();
                tracing::warn!(error = %e, retry_in = ?delay, "svid-helper: JWT-SVID not written");
                jwt.due = Some(Instant::now() + delay);
            }
        }
    }

    /// Every file asked for is on disk for the current identity.
    fn ready(&self) -> bool {
        self.identity.is_some()
            && self
                .jwt
                .as_ref()
                .is_none_or(|j| j.written_for.is_some() && j.written_for == self.identity)
    }
}

// === impl Process ===

impl Process {
    fn new(spec: CommandSpec) -> Self {
        Self {
            spec,
            child: None,
            started: false,
        }
    }

    /// After a write: start the command if it is not running, else signal it
    /// or restart it.
    async fn rotated(&mut self) {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            tracing::warn!(%status, "svid-helper: the command had exited; starting it again");
            self.child = None;
        }
        match (&self.child, self.spec.reload) {
            (None, _) => self.start(),
            (Some(child), Reload::Signal(signal)) => {
                if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok())
                    && let Err(e) = nix::sys::signal::kill(Pid::from_raw(pid), signal)
                {
                    tracing::warn!(error = %e, %signal, pid, "svid-helper: cannot signal the command");
                }
            }
            (Some(_), Reload::Restart) => {
                self.stop().await;
                self.start();
            }
        }
    }

    fn start(&mut self) {
        self.started = true;
        match tokio::process::Command::new(&self.spec.program)
            .args(&self.spec.args)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(child) => {
                tracing::info!(program = %self.spec.program, pid = child.id(), "svid-helper: command started");
                self.child = Some(child);
            }
            // Left for the next rotation to try again, like an exited command.
            Err(e) => {
                tracing::error!(program = %self.spec.program, error = %e, "svid-helper: cannot start the command")
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `STOP_GRACE`.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id().and_then(|id| i32::try_from(id).ok()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
            tracing::warn!("svid-helper: the command ignored SIGTERM; killing it");
            let _ = child.kill().await;
        }
    }

    async fn exited(&mut self) -> std::io::Result<ExitStatus> {
        let Some(child) = &mut self.child else {
            return std::future::pending().await;
        };
        let status = child.wait().await;
        self.child = None;
        status
    }
}

// === impl Backoff ===

impl Backoff {
    fn next(&mut self) -> Duration {
        let delay = Duration::from_millis(500 << self.failures.min(6)).min(Duration::from_secs(30));
        self.failures = self.failures.saturating_add(1);
        delay
    }

    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_taken_by_name_short_name_or_number() {
        for raw in ["SIGHUP", "HUP", "hup", "1"] {
            assert_eq!(parse_signal(raw), Ok(Signal::SIGHUP), "{raw}");
        }
        assert_eq!(parse_signal("usr1"), Ok(Signal::SIGUSR1));
        assert!(parse_signal("RELOAD").is_err());
        assert!(parse_signal("999").is_err());
    }

    #[test]
    fn the_socket_is_a_uri_or_a_path() {
        let unix = |p: &str| Endpoint::Unix(PathBuf::from(p));
        assert_eq!(parse_socket("unix:/run/w.sock").ok(), Some(unix("/run/w.sock")));
        assert_eq!(parse_socket("unix:///run/w.sock").ok(), Some(unix("/run/w.sock")));
        assert_eq!(parse_socket("/run/w.sock").ok(), Some(unix("/run/w.sock")));
        let relative = parse_socket("w.sock").ok();
        assert!(matches!(relative, Some(Endpoint::Unix(p)) if p.is_absolute() && p.ends_with("w.sock")));
        assert_eq!(
            parse_socket("/run/a b/w.sock").ok(),
            Some(unix("/run/a b/w.sock"))
        );
        assert!(parse_socket("http://localhost").is_err());
        assert!(parse_socket("unix:relative").is_err());
    }

    #[test]
    fn file_names_stay_inside_the_directory() {
        assert!(file_name("svid-file", "svid.pem".into()).is_ok());
        for bad in ["../svid.pem", "/etc/svid.pem", "a/b.pem", "", "."] {
            assert!(file_name("svid-file", bad.into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn pem_blocks_wrap_at_64_characters() {
        let pem = pem_block("CERTIFICATE", &[7u8; 100]);
        let lines: Vec<_> = pem.lines().collect();
        assert_eq!(lines[0], "-----BEGIN CERTIFICATE-----");
        assert_eq!(lines[1].len(), 64);
        assert_eq!(lines.last(), Some(&"-----END CERTIFICATE-----"));
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.contents, vec![7u8; 100]);
    }

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..8).map(|_| b.next().as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(500));
    }
}
