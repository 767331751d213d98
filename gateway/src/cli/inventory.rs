//! `castellan certificates list`, `castellan trust-source …` and
//! `castellan healthcheck`: the admin API's inventory and trust sources as
//! tables (or `--json`), and a readiness probe's exit status.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::ephemeral::call;
use super::{ClientArgs, ServerArgs};

#[derive(Subcommand)]
pub(super) enum CertificatesCommand {
    /// Issued certificates, oldest first (admin); filters narrow the list.
    List(CertificatesList),
}

#[derive(Args)]
pub(super) struct CertificatesList {
    #[command(flatten)]
    client: ClientArgs,
    /// Only this SPIFFE ID.
    #[arg(long)]
    spiffe_id: Option<String>,
    /// Only this source (attested_issuance, ephemeral, broker, workload_api).
    #[arg(long)]
    source: Option<String>,
    /// Only those issued at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub(super) enum TrustSourceCommand {
    /// Every trust source (admin).
    List(TrustSourceTarget),
    /// One trust source, whole (admin).
    Show(TrustSourceId),
    /// Create a trust source (admin).
    Create(TrustSourceCreate),
    /// Rotate its keys or roots, keeping the old ones for an overlap (admin).
    Rotate(TrustSourceRotate),
    /// Stop trusting it at once (admin).
    Revoke(TrustSourceId),
}

#[derive(Args)]
pub(super) struct TrustSourceTarget {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct TrustSourceId {
    #[command(flatten)]
    target: TrustSourceTarget,
    /// The trust source's id.
    id: String,
}

#[derive(Args)]
pub(super) struct TrustSourceCreate {
    #[command(flatten)]
    target: TrustSourceTarget,
    #[arg(long)]
    name: String,
    /// The attestation method (k8s_sat, github_oidc, x509pop, …).
    #[arg(long)]
    method: String,
    #[arg(long, default_value = "")]
    issuer: String,
    /// Accepted audience, repeatable.
    #[arg(long = "audience")]
    audiences: Vec<String>,
    /// A JWKS file (token methods).
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// A PEM file of CA certificates (certificate methods).
    #[arg(long)]
    certificates_file: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct TrustSourceRotate {
    #[command(flatten)]
    target: TrustSourceTarget,
    /// The trust source's id.
    id: String,
    /// The new JWKS file.
    #[arg(long)]
    jwks_file: Option<PathBuf>,
    /// The new PEM file of CA certificates.
    #[arg(long)]
    certificates_file: Option<PathBuf>,
    /// How long the old keys stay trusted.
    #[arg(long, default_value_t = 3600)]
    overlap_seconds: u64,
}

#[derive(Subcommand)]
pub(super) enum AgentCommand {
    /// Agent tokens kept until they expire, newest first (admin).
    List(AgentList),
    /// Revoke an agent's tokens, a task's, or one token, with every token
    /// delegated from them (admin).
    Revoke(AgentRevoke),
}

#[derive(Args)]
pub(super) struct AgentList {
    #[command(flatten)]
    target: TrustSourceTarget,
    /// Only this agent's tokens.
    #[arg(long)]
    agent_id: Option<String>,
}

#[derive(Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["agent_id", "task_id", "jti"]))]
pub(super) struct AgentRevoke {
    #[command(flatten)]
    target: TrustSourceTarget,
    #[arg(long)]
    agent_id: Option<String>,
    #[arg(long)]
    task_id: Option<String>,
    #[arg(long)]
    jti: Option<String>,
}

/// `castellan healthcheck`: exit 0 when the server is ready, 1 when not.
#[derive(Args)]
pub(super) struct Healthcheck {
    #[command(flatten)]
    server: ServerArgs,
}

pub(super) async fn certificates(cmd: CertificatesCommand) -> anyhow::Result<ExitCode> {
    let CertificatesCommand::List(a) = cmd;
    let items = super::ephemeral::all_pages(&a.client, "/api/v1/certificates").await?;
    let keep = |c: &Value| {
        let s = |k: &str| c[k].as_str().unwrap_or_default();
        a.spiffe_id.as_deref().is_none_or(|id| s("spiffe_id") == id)
            && a.source.as_deref().is_none_or(|src| s("source") == src)
            // RFC 3339 in UTC sorts as text.
            && a.since.as_deref().is_none_or(|t| s("issued_at") >= t)
    };
    let items: Vec<Value> = items.into_iter().filter(keep).collect();
    if a.json {
        println!("{}", Value::Array(items));
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<34} {:<20} {:<18} {:<20} SPIFFE ID",
        "SERIAL", "ISSUED", "SOURCE", "NOT AFTER"
    );
    for c in &items {
        let s = |k: &str| c[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<34} {:<20} {:<18} {:<20} {}",
            s("serial"),
            s("issued_at"),
            s("source"),
            s("not_after"),
            s("spiffe_id")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn read(path: &Option<PathBuf>) -> anyhow::Result<Option<String>> {
    path.as_ref()
        .map(|p| std::fs::read_to_string(p).with_context(|| format!("{}", p.display())))
        .transpose()
}

pub(super) async fn trust_source(cmd: TrustSourceCommand) -> anyhow::Result<ExitCode> {
    let (target, method, path, body) = match &cmd {
        TrustSourceCommand::List(t) => (t, Method::GET, "/api/v1/trust-sources".to_owned(), None),
        TrustSourceCommand::Show(i) => (
            &i.target,
            Method::GET,
            format!("/api/v1/trust-sources/{}", i.id),
            None,
        ),
        TrustSourceCommand::Revoke(i) => (
            &i.target,
            Method::POST,
            format!("/api/v1/trust-sources/{}/revoke", i.id),
            None,
        ),
        TrustSourceCommand::Create(c) => {
            let mut spec =
                json!({ "name": c.name, "method": c.method, "issuer": c.issuer, "audiences": c.audiences });
            if let Some(jwks) = read(&c.jwks_file)? {
                spec["jwks"] = serde_json::from_str(&jwks).context("--jwks-file is not JSON")?;
            }
            if let Some(pem) = read(&c.certificates_file)? {
                spec["certificates"] = pem.into();
            }
            (
                &c.target,
                Method::POST,
                "/api/v1/trust-sources".to_owned(),
                Some(spec),
            )
        }
        TrustSourceCommand::Rotate(r) => {
            let mut body = json!({ "overlap_seconds": r.overlap_seconds });
            if let Some(jwks) = read(&r.jwks_file)? {
                body["jwks"] = serde_json::from_str(&jwks).context("--jwks-file is not JSON")?;
            }
            if let Some(pem) = read(&r.certificates_file)? {
                body["certificates"] = pem.into();
            }
            (
                &r.target,
                Method::POST,
                format!("/api/v1/trust-sources/{}/rotate", r.id),
                Some(body),
            )
        }
    };
    let (_, answer) = call(&target.client, method, &path, body).await?;
    if target.json || !matches!(cmd, TrustSourceCommand::List(_)) {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<38} {:<20} {:<12} {:<8} ISSUER",
        "ID", "NAME", "METHOD", "ORIGIN"
    );
    for s in answer["items"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let f = |k: &str| s[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<38} {:<20} {:<12} {:<8} {}",
            f("id"),
            f("name"),
            f("method"),
            f("origin"),
            f("issuer")
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn agent(cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AgentCommand::List(a) => {
            let path = match &a.agent_id {
                Some(id) => format!("/api/v1/broker/agents?limit=5000&agent_id={}", url_escape(id)),
                None => "/api/v1/broker/agents?limit=5000".to_owned(),
            };
            let (_, answer) = call(&a.target.client, Method::GET, &path, None).await?;
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<38} {:<20} {:<8} {:<20} {:<40} ACTS FOR",
                "JTI", "AGENT", "STATE", "EXPIRES", "SPIFFE ID"
            );
            for t in answer["items"].as_array().map(Vec::as_slice).unwrap_or_default() {
                let f = |k: &str| t[k].as_str().unwrap_or("-").to_owned();
                let expires = t["exp"]
                    .as_i64()
                    .and_then(|e| time::OffsetDateTime::from_unix_timestamp(e).ok())
                    .map(castellan::util::rfc3339)
                    .unwrap_or_default();
                let chain: Vec<String> = t["chain"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|l| {
                        format!(
                            "{} {}",
                            l["kind"].as_str().unwrap_or("?"),
                            l["sub"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                println!(
                    "{:<38} {:<20} {:<8} {:<20} {:<40} {}",
                    f("jti"),
                    f("agent_id"),
                    f("state"),
                    expires,
                    f("spiffe_id"),
                    if chain.is_empty() {
                        "-".to_owned()
                    } else {
                        chain.join(" <- ")
                    }
                );
            }
            if answer["truncated"] == true {
                println!("(more tokens than shown: narrow with --agent-id)");
            }
        }
        AgentCommand::Revoke(a) => {
            let body = json!({ "agent_id": a.agent_id, "task_id": a.task_id, "jti": a.jti });
            let body = Value::Object(
                body.as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, v)| !v.is_null())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            );
            let (_, answer) = call(
                &a.target.client,
                Method::POST,
                "/api/v1/broker/revocations",
                Some(body),
            )
            .await?;
            if a.target.json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(ExitCode::SUCCESS);
            }
            let revoked = answer["revoked"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            println!("revoked {} token(s)", revoked.len());
            for r in revoked {
                println!(
                    "  {} ({})",
                    r["jti"].as_str().unwrap_or("-"),
                    r["agent_id"].as_str().unwrap_or("-")
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `s` safe in a query string.
fn url_escape(s: &str) -> String {
    serde_urlencoded::to_string([("", s)])
        .map(|q| q.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

pub(super) async fn healthcheck(a: Healthcheck) -> anyhow::Result<ExitCode> {
    let endpoint = castellan::client::Endpoint::parse(&a.server.addr, a.server.ca_file.as_deref())?;
    let answer = async {
        let mut conn = endpoint.connect().await?;
        conn.get_limited("/readyz", 64 * 1024).await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), answer).await {
        Ok(Ok((status, body))) if status.is_success() => {
            println!("ready: {}", String::from_utf8_lossy(&body).trim());
            Ok(ExitCode::SUCCESS)
        }
        Ok(Ok((status, body))) => {
            println!("not ready ({status}): {}", String::from_utf8_lossy(&body).trim());
            Ok(ExitCode::from(1))
        }
        Ok(Err(e)) => {
            println!("not ready: {}", castellan::util::error_chain(&e));
            Ok(ExitCode::from(1))
        }
        Err(_) => {
            println!("not ready: no answer within 5 s");
            Ok(ExitCode::from(1))
        }
    }
}
