//! `castellan ephemeral …`: the requester's and the approver's side of
//! just-in-time issuance, over the HTTP API.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::{ClientArgs, problem_line};

#[derive(Subcommand)]
pub(super) enum EphemeralCommand {
    /// Ask for a short-lived certificate (a key is generated here unless --csr).
    Request(Request),
    /// List requests you may act on.
    List(List),
    /// Show one request.
    Show(Show),
    /// Approve a request: shows it, then votes on exactly what was shown.
    Approve(Vote),
    /// Deny a request.
    Deny(Vote),
    /// Cancel your own pending request.
    Cancel(Show),
    /// Wait for a request to be decided; writes the certificate if issued.
    Wait(Wait),
}

#[derive(Args)]
pub(super) struct Request {
    #[command(flatten)]
    client: ClientArgs,
    /// Why you need it (required; approvers see it).
    #[arg(long)]
    justification: String,
    /// Requested lifetime in seconds (policy may shorten it).
    #[arg(long)]
    ttl: Option<u64>,
    /// Ticket or incident reference.
    #[arg(long)]
    ticket: Option<String>,
    /// Break-glass: issue at once where policy allows it.
    #[arg(long)]
    emergency: bool,
    /// The SPIFFE ID to ask for (policy decides).
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Use this CSR (PEM) instead of generating a key.
    #[arg(long)]
    csr: Option<PathBuf>,
    /// Wait up to this many seconds for the decision.
    #[arg(long)]
    wait: Option<u64>,
    /// Where to write svid.key, svid.pem and bundle.pem.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct List {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this state: pending, approved, issued, denied, expired, cancelled.
    #[arg(long)]
    state: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct Show {
    #[command(flatten)]
    client: ClientArgs,
    /// Request id.
    id: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct Vote {
    #[command(flatten)]
    client: ClientArgs,
    /// Request id.
    id: String,
    /// Why (kept in the audit log).
    #[arg(long, default_value = "")]
    reason: String,
    /// Vote on this binding instead of the one just fetched.
    #[arg(long)]
    binding: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct Wait {
    #[command(flatten)]
    client: ClientArgs,
    /// Request id.
    id: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Where to write svid.pem and bundle.pem once issued.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    #[arg(long)]
    json: bool,
}

pub(super) async fn call(
    client: &ClientArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    let endpoint = client.endpoint()?;
    let mut conn = endpoint.connect().await?;
    let (status, bytes) = conn
        .send(
            method,
            path,
            client.token.as_deref(),
            body.map(|b| Bytes::from(b.to_string())),
        )
        .await?;
    if !status.is_success() {
        anyhow::bail!("{}", problem_line(status, &bytes));
    }
    Ok((
        status,
        serde_json::from_slice(&bytes).context("server answer is not JSON")?,
    ))
}

/// Every item of a paged admin listing, page by page (1000 at a time).
pub(super) async fn all_pages(client: &ClientArgs, path: &str) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    let progress = super::Progress::new("reading");
    loop {
        let page_path = match &cursor {
            Some(c) => format!("{path}?limit=1000&cursor={c}"),
            None => format!("{path}?limit=1000"),
        };
        let (_, page) = call(client, Method::GET, &page_path, None).await?;
        all.extend(page["items"].as_array().cloned().unwrap_or_default());
        progress.show(format_args!("{} records", all.len()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => return Ok(all),
        }
    }
}

fn show_request(r: &Value) {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
    println!("request     {}", s("request_id"));
    println!("state       {}", s("state"));
    println!("spiffe id   {}", s("spiffe_id"));
    println!(
        "requester   {} ({})",
        r["requester"]["name"].as_str().unwrap_or("-"),
        r["requester"]["kind"].as_str().unwrap_or("-")
    );
    println!("ttl         {} s", r["ttl_seconds"]);
    println!("why         {}", s("justification"));
    if let Some(t) = r["ticket"].as_str() {
        println!("ticket      {t}");
    }
    println!(
        "approvals   {}/{} (groups: {})",
        r["approvals"].as_array().map_or(0, Vec::len),
        r["required_approvals"],
        r["approver_groups"]
            .as_array()
            .map(|g| g.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    println!("expires     {}", s("expires_at"));
    println!("binding     {}", s("binding"));
    if r["emergency"] == true {
        println!("emergency   yes (flagged for post-review)");
    }
}

fn table(items: &[Value]) {
    println!(
        "{:<36}  {:<9}  {:<44}  {:<16}  {:<9}  EXPIRES",
        "ID", "STATE", "SPIFFE ID", "REQUESTER", "APPROVALS"
    );
    for r in items {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<36}  {:<9}  {:<44}  {:<16}  {:<9}  {}",
            s("request_id"),
            s("state"),
            s("spiffe_id"),
            r["requester"]["name"].as_str().unwrap_or("-"),
            format!(
                "{}/{}",
                r["approvals"].as_array().map_or(0, Vec::len),
                r["required_approvals"]
            ),
            s("expires_at"),
        );
    }
}

/// Writes the certificate files of an issued request.
fn write_issued(r: &Value, out_dir: &Path, key_pem: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    if let Some(k) = key_pem {
        castellan::util::write_private_file(&out_dir.join("svid.key"), k.as_bytes())?;
    }
    let chain = r["chain_pem"].as_str().context("no certificate in the answer")?;
    std::fs::write(out_dir.join("svid.pem"), chain)?;
    std::fs::write(
        out_dir.join("bundle.pem"),
        r["bundle_pem"].as_str().unwrap_or_default(),
    )?;
    eprintln!(
        "wrote {} (expires {})",
        out_dir.join("svid.pem").display(),
        r["not_after"].as_str().unwrap_or("-")
    );
    Ok(())
}

pub(super) async fn ephemeral(cmd: EphemeralCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EphemeralCommand::Request(a) => request(a).await,
        EphemeralCommand::List(a) => {
            let path = match &a.state {
                Some(s) => format!("/api/v1/ephemeral?state={s}"),
                None => "/api/v1/ephemeral".into(),
            };
            let (_, v) = call(&a.client, Method::GET, &path, None).await?;
            let items = v["items"].as_array().cloned().unwrap_or_default();
            if a.json {
                println!("{v}")
            } else {
                table(&items)
            }
            Ok(ExitCode::SUCCESS)
        }
        EphemeralCommand::Show(a) => {
            let (_, v) = call(
                &a.client,
                Method::GET,
                &format!("/api/v1/ephemeral/{}", a.id),
                None,
            )
            .await?;
            if a.json {
                println!("{v}")
            } else {
                show_request(&v)
            }
            Ok(ExitCode::SUCCESS)
        }
        EphemeralCommand::Approve(a) => vote(a, "approve").await,
        EphemeralCommand::Deny(a) => vote(a, "deny").await,
        EphemeralCommand::Cancel(a) => {
            let (_, v) = call(
                &a.client,
                Method::POST,
                &format!("/api/v1/ephemeral/{}/cancel", a.id),
                Some(json!({})),
            )
            .await?;
            if a.json {
                println!("{v}")
            } else {
                println!("{} is {}", a.id, v["state"].as_str().unwrap_or("-"))
            }
            Ok(ExitCode::SUCCESS)
        }
        EphemeralCommand::Wait(a) => {
            let v = wait(&a.client, &a.id, a.timeout).await?;
            if a.json {
                println!("{v}")
            } else {
                println!("{} is {}", a.id, v["state"].as_str().unwrap_or("-"))
            }
            if v["state"] == "issued" {
                write_issued(&v, &a.out_dir, None)?;
                return Ok(ExitCode::SUCCESS);
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn wait(client: &ClientArgs, id: &str, timeout: u64) -> anyhow::Result<Value> {
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(timeout);
    let progress = super::Progress::new("waiting for approval");
    let mut votes_seen = 0;
    loop {
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_secs()
            .clamp(1, 60);
        let (_, v) = call(
            client,
            Method::GET,
            &format!("/api/v1/ephemeral/{id}?wait={left}"),
            None,
        )
        .await?;
        let state = v["state"].as_str().unwrap_or_default();
        // Each new vote is worth a line wherever stderr goes.
        let votes = v["approvals"].as_array().map(Vec::as_slice).unwrap_or_default();
        for vote in votes.iter().skip(votes_seen) {
            eprintln!(
                "{} by {}: {}",
                vote["decision"].as_str().unwrap_or("vote"),
                vote["approver"].as_str().unwrap_or("?"),
                vote["reason"].as_str().unwrap_or("")
            );
        }
        votes_seen = votes.len();
        progress.show(format_args!(
            "{state}, {} of {} approvals, {} s",
            votes.iter().filter(|x| x["decision"] == "approve").count(),
            v["required_approvals"],
            started.elapsed().as_secs()
        ));
        if !matches!(state, "pending" | "approved") || std::time::Instant::now() >= deadline {
            return Ok(v);
        }
    }
}

async fn request(a: Request) -> anyhow::Result<ExitCode> {
    let (csr, key_pem) = match &a.csr {
        Some(p) => (
            std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
            None,
        ),
        None => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
                .serialize_request(&key)?
                .pem()?;
            (csr, Some(key.serialize_pem()))
        }
    };
    let body = json!({
        "csr": csr, "ttl_seconds": a.ttl, "justification": a.justification, "ticket": a.ticket,
        "emergency": a.emergency, "spiffe_id": a.spiffe_id,
    });
    let (status, mut v) = call(&a.client, Method::POST, "/api/v1/ephemeral", Some(body)).await?;
    // Keep the key whatever happens next: the request may be approved later.
    if let Some(k) = &key_pem {
        std::fs::create_dir_all(&a.out_dir)
            .with_context(|| format!("cannot create {}", a.out_dir.display()))?;
        castellan::util::write_private_file(&a.out_dir.join("svid.key"), k.as_bytes())?;
    }
    if status == StatusCode::ACCEPTED {
        eprintln!(
            "pending approval: {} of {}",
            v["required_approvals"], v["approver_groups"]
        );
        if let Some(w) = a.wait {
            v = wait(&a.client, v["request_id"].as_str().unwrap_or_default(), w).await?;
        }
    }
    if a.json {
        println!("{v}")
    } else {
        show_request(&v)
    }
    if v["state"] == "issued" {
        write_issued(&v, &a.out_dir, None)?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn vote(a: Vote, decision: &str) -> anyhow::Result<ExitCode> {
    let (_, current) = call(
        &a.client,
        Method::GET,
        &format!("/api/v1/ephemeral/{}", a.id),
        None,
    )
    .await?;
    if !a.json {
        show_request(&current);
    }
    let binding = a
        .binding
        .clone()
        .or_else(|| current["binding"].as_str().map(str::to_owned))
        .unwrap_or_default();
    let body = json!({ "decision": decision, "reason": a.reason, "binding": binding });
    let (_, v) = call(
        &a.client,
        Method::POST,
        &format!("/api/v1/ephemeral/{}/approvals", a.id),
        Some(body),
    )
    .await?;
    if a.json {
        println!("{v}")
    } else {
        println!(
            "voted {decision}: {} is now {}",
            a.id,
            v["state"].as_str().unwrap_or("-")
        )
    }
    Ok(ExitCode::SUCCESS)
}
