//! `castellan ca …`: the signing authorities and their rotation (list,
//! prepare, activate, taint, revoke) over the admin API, or, with
//! `--offline`, on the data directory of a stopped server (the way out
//! when its CA expired and it will not start). Offline steps are audited
//! in the server's store like any other.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::{Value, json};

use super::ClientArgs;
use super::ephemeral::call;
use castellan::config::Config;
use castellan::signer::{Authorities, Kind, Rotation, Signer as _};

#[derive(Subcommand)]
pub(super) enum CaCommand {
    /// List the signing authorities: X.509 authorities and JWT keys, their
    /// state (prepared, active, retired, revoked) and validity.
    List(Target),
    /// Prepare a new authority: published in every bundle, signing nothing
    /// until activated.
    Prepare(Prepare),
    /// Activate a prepared authority: it signs from now on, and the one it
    /// replaces retires (still published).
    Activate(Step),
    /// Taint a retired authority: holders of what it signed re-mint now.
    Taint(Step),
    /// Revoke a prepared or retired authority: it leaves every bundle and
    /// its key is deleted (a retired one once tainted, or once nothing it
    /// signed is valid).
    Revoke(Step),
}

#[derive(Args)]
pub(super) struct Target {
    #[command(flatten)]
    client: ClientArgs,
    /// Act on the data directory of a stopped server (read from --config)
    /// instead of through the API.
    #[arg(long, requires = "config")]
    offline: bool,
    /// The server's config file, with --offline.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(super) struct Prepare {
    #[command(flatten)]
    target: Target,
    /// A JWT key rather than an X.509 authority.
    #[arg(long, conflicts_with = "root")]
    jwt: bool,
    /// Under an intermediate CA: a new root too (published first).
    #[arg(long)]
    root: bool,
}

#[derive(Args)]
pub(super) struct Step {
    #[command(flatten)]
    target: Target,
    /// The authority's id (from `castellan ca list`).
    id: String,
}

pub(super) async fn run(cmd: CaCommand) -> anyhow::Result<ExitCode> {
    let (target, rotation) = match cmd {
        CaCommand::List(t) => (t, None),
        CaCommand::Prepare(p) => {
            let kind = if p.jwt { Kind::Jwt } else { Kind::X509 };
            (p.target, Some(Rotation::Prepare { kind, root: p.root }))
        }
        CaCommand::Activate(s) => (s.target, Some(Rotation::Activate { id: s.id })),
        CaCommand::Taint(s) => (s.target, Some(Rotation::Taint { id: s.id })),
        CaCommand::Revoke(s) => (s.target, Some(Rotation::Revoke { id: s.id })),
    };
    let answer = if target.offline {
        offline(&target, rotation).await?
    } else {
        online(&target.client, rotation).await?
    };
    if target.json {
        println!("{answer}");
    } else {
        table(&answer);
    }
    Ok(ExitCode::SUCCESS)
}

async fn online(client: &ClientArgs, rotation: Option<Rotation>) -> anyhow::Result<Value> {
    let (method, path, body) = match &rotation {
        None => (Method::GET, "/api/v1/ca/authorities".to_owned(), None),
        Some(Rotation::Prepare { kind, root }) => (
            Method::POST,
            "/api/v1/ca/authorities".to_owned(),
            Some(json!({ "kind": kind, "root": root })),
        ),
        Some(r @ (Rotation::Activate { id } | Rotation::Taint { id } | Rotation::Revoke { id })) => (
            Method::POST,
            format!("/api/v1/ca/authorities/{id}/{}", r.name()),
            None,
        ),
    };
    Ok(call(client, method, &path, body).await?.1)
}

/// Opens the keyring and the store of a stopped server, applies the step,
/// and audits it.
async fn offline(target: &Target, rotation: Option<Rotation>) -> anyhow::Result<Value> {
    let path = target.config.as_ref().context("--offline needs --config")?;
    let config = Config::load(path)?;
    let ca_dir = config.data_dir.join("ca");
    anyhow::ensure!(
        castellan::signer::keyring_exists(&ca_dir) || castellan::ca::exists(&ca_dir),
        "no CA in {}: start the server once first",
        ca_dir.display()
    );
    let Some(rotation) = rotation else {
        let (signer, _) = crate::server::open_signer(&config, &ca_dir)?;
        return Ok(signer.authorities().view());
    };
    // The store first: a running server holds it, and must be the one to
    // rotate (through the API).
    let store = crate::server::open_store(&config)
        .await
        .context("cannot open the store: is the server still running? Then rotate through the API")?;
    let (signer, _) = crate::server::open_signer(&config, &ca_dir)?;
    let result = signer.rotate(&rotation);
    let detail = serde_json::to_value(&rotation)?;
    let (kind, data) = match &result {
        Ok(after) => (
            castellan::model::AuditKind::CaRotated,
            json!({ "rotation": detail, "generation": after.generation, "offline": true }),
        ),
        Err(e) => (
            castellan::model::AuditKind::CaRotationRefused,
            json!({ "rotation": detail, "detail": e.to_string(), "offline": true }),
        ),
    };
    let who = std::env::var("USER").unwrap_or_else(|_| "operator".into());
    let event = castellan::model::AuditEvent::new(
        kind,
        castellan::model::Actor::User(format!("{who} (offline)")),
        data,
    );
    store.record_rotation(event).await?;
    let after: std::sync::Arc<Authorities> = result?;
    let mut doc = after.view();
    if let Rotation::Prepare { .. } = rotation {
        doc["prepared"] = after
            .authorities
            .iter()
            .filter(|a| a.state == castellan::signer::State::Prepared)
            .max_by_key(|a| a.prepared_at)
            .map(castellan::signer::Authority::view)
            .unwrap_or_default();
    }
    Ok(doc)
}

fn table(doc: &Value) {
    if let Some(p) = doc.get("prepared").filter(|p| !p.is_null()) {
        println!("prepared {}", p["id"].as_str().unwrap_or("-"));
    }
    println!(
        "{:<6} {:<40} {:<9} {:<7} {:<20} {:<20}",
        "KIND", "ID", "STATE", "TAINTED", "NOT BEFORE", "NOT AFTER"
    );
    for a in doc["authorities"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let s = |k: &str| a[k].as_str().unwrap_or("-").to_owned();
        println!(
            "{:<6} {:<40} {:<9} {:<7} {:<20} {:<20}",
            s("kind"),
            s("id"),
            s("state"),
            if a["tainted"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            s("not_before"),
            s("not_after"),
        );
    }
}
