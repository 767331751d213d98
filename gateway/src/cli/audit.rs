//! `castellan audit …`: the audit log (list), a signed export of it
//! (export, checkpoint), and its offline verification (verify), which needs
//! nothing but the export and the trust bundle's JWKS.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use super::ClientArgs;
use super::ephemeral::call;

#[derive(Subcommand)]
pub(super) enum AuditCommand {
    /// The latest entries (admin).
    List(AuditList),
    /// Sign the log's head now; prints the checkpoint (admin).
    Checkpoint(AuditTarget),
    /// Sign the head, then write every entry as JSON lines (admin).
    Export(AuditExport),
    /// Check an export offline: every link, every entry's hash, every
    /// checkpoint against the JWKS; names the first entry that breaks.
    Verify(AuditVerify),
}

#[derive(Args)]
pub(super) struct AuditTarget {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct AuditList {
    #[command(flatten)]
    target: AuditTarget,
    /// How many of the latest entries.
    #[arg(long, default_value_t = 50)]
    limit: usize,
}

#[derive(Args)]
pub(super) struct AuditExport {
    #[command(flatten)]
    client: ClientArgs,
    /// Where to write the JSON lines (default: standard output).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct AuditVerify {
    /// The export (JSON lines).
    file: PathBuf,
    /// The trust bundle's JWKS (e.g. saved from /.well-known/jwks.json).
    #[arg(long, conflicts_with = "addr")]
    jwks: Option<PathBuf>,
    /// Or fetch the JWKS from this server's /.well-known/jwks.json.
    #[arg(long)]
    addr: Option<String>,
    /// CA certificate for an https:// --addr.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The export must hold at least this many entries (a checkpoint's size
    /// obtained separately): refuses a log cut at an older checkpoint.
    #[arg(long)]
    at_least: Option<u64>,
}

pub(super) async fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::List(a) => {
            let all = entries(&a.target.client).await?;
            let latest = &all[all.len().saturating_sub(a.limit)..];
            if a.target.json {
                println!("{}", Value::Array(latest.to_vec()));
            } else {
                println!("{:>6}  {:<20}  {:<28}  ACTOR", "SEQ", "AT", "KIND");
                for e in latest {
                    let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
                    println!(
                        "{:>6}  {:<20}  {:<28}  {}",
                        e["seq"],
                        s("at"),
                        s("kind"),
                        s("actor")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Checkpoint(a) => {
            let (_, v) = call(&a.client, Method::POST, "/api/v1/audit/checkpoints", None).await?;
            if a.json {
                println!("{v}");
            } else {
                println!(
                    "checkpoint: {} entries, head {}",
                    v["size"],
                    v["head"].as_str().unwrap_or("-")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Export(a) => {
            let (_, checkpoint) = call(&a.client, Method::POST, "/api/v1/audit/checkpoints", None).await?;
            let all = entries(&a.client).await?;
            let text: String = all.iter().map(|e| format!("{e}\n")).collect();
            match &a.out {
                Some(path) => std::fs::write(path, &text).with_context(|| format!("{}", path.display()))?,
                None => print!("{text}"),
            }
            eprintln!(
                "exported {} entries; the last checkpoint covers {}",
                all.len(),
                checkpoint["size"]
            );
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify(a) => verify(a).await,
    }
}

/// Every entry, oldest first.
async fn entries(client: &ClientArgs) -> anyhow::Result<Vec<Value>> {
    super::ephemeral::all_pages(client, "/api/v1/audit").await
}

async fn verify(a: AuditVerify) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file).with_context(|| format!("{}", a.file.display()))?;
    let jwks: Value = match (&a.jwks, &a.addr) {
        (Some(path), _) => serde_json::from_str(
            &std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?,
        )
        .with_context(|| format!("{} is not a JWKS", path.display()))?,
        (None, Some(addr)) => {
            let client = ClientArgs {
                addr: addr.clone(),
                ca_file: a.ca_file.clone(),
                token: None,
            };
            call(&client, Method::GET, "/.well-known/jwks.json", None)
                .await?
                .1
        }
        (None, None) => {
            anyhow::bail!("give --jwks FILE or --addr URL: the keys checkpoints are checked with")
        }
    };
    let keys = castellan::trust::KeySet::from_jwks(&jwks).map_err(|e| anyhow::anyhow!("the JWKS: {e}"))?;
    let verified = castellan::audit::verify_export(&text, &keys, a.at_least)?;
    println!(
        "verified: {} entries, {} checkpoints; the last covers {} entries",
        verified.entries, verified.checkpoints, verified.covered
    );
    Ok(ExitCode::SUCCESS)
}
