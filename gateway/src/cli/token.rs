//! `castellan token …`: API tokens over the admin API (create, list,
//! revoke). A token is printed once, at creation; listings never show one.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::ClientArgs;
use super::ephemeral::call;

#[derive(Subcommand)]
pub(super) enum TokenCommand {
    /// Create an API token (admin); the token is printed once.
    Create(TokenCreate),
    /// List API tokens (admin): names, roles, links, expiry; never a secret.
    List(TokenList),
    /// Revoke an API token (admin): it stops authenticating at once.
    Revoke(TokenRevoke),
}

#[derive(Args)]
pub(super) struct TokenCreate {
    #[command(flatten)]
    client: ClientArgs,
    /// Unique name of the person or CI principal (letters, digits, `-`, `_`, `.`).
    #[arg(long)]
    name: String,
    /// admin, approver or requester.
    #[arg(long)]
    role: String,
    /// Group membership, repeatable (e.g. --group sre).
    #[arg(long = "group")]
    groups: Vec<String>,
    /// The `[[oidc_issuers]]` name the holder also signs in through: a login
    /// there is the same person (with --oidc-subject).
    #[arg(long, requires = "oidc_subject")]
    oidc_issuer: Option<String>,
    /// The holder's `sub` at that issuer.
    #[arg(long, requires = "oidc_issuer")]
    oidc_subject: Option<String>,
    /// Seconds until the token stops authenticating.
    #[arg(long)]
    expires_in: Option<u64>,
    /// Print the whole answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct TokenList {
    #[command(flatten)]
    client: ClientArgs,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct TokenRevoke {
    #[command(flatten)]
    client: ClientArgs,
    /// The token's id (from `castellan token list`).
    id: String,
}

pub(super) async fn run(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TokenCommand::Create(t) => create(t).await,
        TokenCommand::List(a) => {
            let (_, v) = call(&a.client, Method::GET, "/api/v1/tokens", None).await?;
            if a.json {
                println!("{v}");
            } else {
                table(v["items"].as_array().map(Vec::as_slice).unwrap_or_default());
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke(a) => {
            let (_, v) = call(
                &a.client,
                Method::DELETE,
                &format!("/api/v1/tokens/{}", a.id),
                None,
            )
            .await?;
            eprintln!(
                "revoked token `{}` ({})",
                v["name"].as_str().unwrap_or("-"),
                v["id"].as_str().unwrap_or("-")
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn create(t: TokenCreate) -> anyhow::Result<ExitCode> {
    let mut body = json!({ "name": t.name, "role": t.role, "groups": t.groups });
    if let (Some(issuer), Some(subject)) = (&t.oidc_issuer, &t.oidc_subject) {
        body["oidc"] = json!({ "issuer": issuer, "subject": subject });
    }
    if let Some(s) = t.expires_in {
        body["expires_in"] = s.into();
    }
    let (_, v) = call(&t.client, Method::POST, "/api/v1/tokens", Some(body)).await?;
    if t.json {
        println!("{v}");
    } else {
        eprintln!(
            "created token `{}` (role {}, groups [{}]); it is shown only once:",
            t.name,
            t.role,
            t.groups.join(", ")
        );
        println!("{}", v["token"].as_str().unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn table(items: &[Value]) {
    println!(
        "{:<36}  {:<16}  {:<9}  {:<16}  {:<24}  {:<20}  STATE",
        "ID", "NAME", "ROLE", "GROUPS", "OIDC", "EXPIRES"
    );
    for t in items {
        let s = |k: &str| t[k].as_str().unwrap_or("-").to_owned();
        let groups: Vec<&str> = t["groups"]
            .as_array()
            .map(|g| g.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let oidc = match (t["oidc"]["issuer"].as_str(), t["oidc"]["subject"].as_str()) {
            (Some(i), Some(s)) => format!("{i}:{s}"),
            _ => "-".into(),
        };
        let state = if t["revoked_at"].is_string() {
            "revoked"
        } else {
            "live"
        };
        println!(
            "{:<36}  {:<16}  {:<9}  {:<16}  {:<24}  {:<20}  {}",
            s("id"),
            s("name"),
            s("role"),
            if groups.is_empty() {
                "-".into()
            } else {
                groups.join(",")
            },
            oidc,
            s("expires_at"),
            state
        );
    }
}
