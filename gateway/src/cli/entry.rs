//! `castellan entry create|list|show|delete`: Workload API registration
//! entries, with the flags SPIRE users know (`-spiffeID`, `-selector`, …).

use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::{ClientArgs, problem_line};

#[derive(Subcommand)]
pub(super) enum EntryCommand {
    /// Register an identity for callers whose selectors all match.
    Create(Create),
    /// List entries.
    List(List),
    /// Show one entry.
    Show(ById),
    /// Delete an entry (open streams lose the identity at once).
    Delete(ById),
}

#[derive(Args)]
pub(super) struct Create {
    #[command(flatten)]
    client: ClientArgs,
    /// The SPIFFE ID to issue.
    #[arg(long = "spiffeID")]
    spiffe_id: String,
    /// A selector, `type:key:value` (e.g. unix:uid:1000); repeat for more.
    #[arg(long = "selector", required = true)]
    selectors: Vec<String>,
    /// X.509-SVID lifetime, seconds.
    #[arg(long = "x509SVIDTTL", default_value_t = 3600)]
    x509_ttl: u64,
    /// JWT-SVID lifetime, seconds.
    #[arg(long = "jwtSVIDTTL", default_value_t = 300)]
    jwt_ttl: u64,
    /// A DNS SAN; repeat for more.
    #[arg(long = "dns")]
    dns: Vec<String>,
    /// A hint for clients choosing among several SVIDs.
    #[arg(long = "hint", default_value = "")]
    hint: String,
    /// A trust domain whose bundle callers also get; repeat for more.
    #[arg(long = "federatesWith")]
    federates_with: Vec<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct List {
    #[command(flatten)]
    client: ClientArgs,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct ById {
    #[command(flatten)]
    client: ClientArgs,
    /// Entry id.
    #[arg(long = "entryID")]
    id: String,
    #[arg(long)]
    json: bool,
}

/// SPIRE's CLI takes `-spiffeID`; clap wants `--spiffeID`. Accept both.
pub(super) fn normalise_args(args: Vec<String>) -> Vec<String> {
    let is_entry = args.get(1).is_some_and(|a| a == "entry");
    args.into_iter()
        .map(|a| {
            if is_entry && a.starts_with('-') && !a.starts_with("--") && a.len() > 2 {
                format!("-{a}")
            } else {
                a
            }
        })
        .collect()
}

async fn call(client: &ClientArgs, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
    let mut conn = client.endpoint()?.connect().await?;
    let (status, bytes) = conn
        .send(
            method,
            path,
            client.token.as_deref(),
            body.map(|b| Bytes::from(b.to_string())),
        )
        .await?;
    anyhow::ensure!(status.is_success(), "{}", problem_line(status, &bytes));
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).context("server answer is not JSON")
}

fn show(e: &Value) {
    println!("Entry ID         : {}", e["id"].as_str().unwrap_or("-"));
    println!("SPIFFE ID        : {}", e["spiffe_id"].as_str().unwrap_or("-"));
    for s in e["selectors"].as_array().into_iter().flatten() {
        println!("Selector         : {}", s.as_str().unwrap_or("-"));
    }
    println!("X509-SVID TTL    : {}", e["x509_svid_ttl"]);
    println!("JWT-SVID TTL     : {}", e["jwt_svid_ttl"]);
    for d in e["dns_names"].as_array().into_iter().flatten() {
        println!("DNS name         : {}", d.as_str().unwrap_or("-"));
    }
    for td in e["federates_with"].as_array().into_iter().flatten() {
        println!("FederatesWith    : {}", td.as_str().unwrap_or("-"));
    }
    if let Some(h) = e["hint"].as_str().filter(|h| !h.is_empty()) {
        println!("Hint             : {h}");
    }
}

pub(super) async fn run(cmd: EntryCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        EntryCommand::Create(c) => {
            let body = json!({
                "spiffe_id": c.spiffe_id, "selectors": c.selectors, "x509_svid_ttl": c.x509_ttl,
                "jwt_svid_ttl": c.jwt_ttl, "dns_names": c.dns, "hint": c.hint, "federates_with": c.federates_with,
            });
            let e = call(&c.client, Method::POST, "/api/v1/entries", Some(body)).await?;
            if c.json { println!("{e}") } else { show(&e) }
        }
        EntryCommand::List(l) => {
            let v = call(&l.client, Method::GET, "/api/v1/entries", None).await?;
            if l.json {
                println!("{v}");
            } else {
                let items = v["items"].as_array().cloned().unwrap_or_default();
                println!("Found {} entries", items.len());
                for e in &items {
                    println!();
                    show(e);
                }
            }
        }
        EntryCommand::Show(s) => {
            let e = call(&s.client, Method::GET, &format!("/api/v1/entries/{}", s.id), None).await?;
            if s.json { println!("{e}") } else { show(&e) }
        }
        EntryCommand::Delete(d) => {
            call(
                &d.client,
                Method::DELETE,
                &format!("/api/v1/entries/{}", d.id),
                None,
            )
            .await?;
            if !d.json {
                println!("Deleted entry {}", d.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
