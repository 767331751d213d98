//! `castellan attestor run`: runs a module locally in the same sandbox the
//! gateway uses, with the same host capabilities, and prints what it proved.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use castellan::attest::{Attestors, ModuleSet};
use castellan::config::SandboxConfig;
use castellan::trust::{Registry, TrustSourceSpec};

#[derive(Subcommand)]
pub(super) enum AttestorCommand {
    /// Run a module over evidence and print the attestation or the error.
    Run(Run),
}

#[derive(Args)]
pub(super) struct Run {
    /// The module (.wasm component).
    module: PathBuf,
    /// File holding the evidence, passed to the module as is.
    #[arg(long)]
    evidence: PathBuf,
    /// JSON with the trust sources the module may use:
    /// `{"trust_sources": [{"name", "issuer", "audiences", "jwks"}]}`.
    #[arg(long)]
    config: PathBuf,
    /// The method name to run it as.
    #[arg(long, default_value = "local")]
    method: String,
    /// Capabilities granted (comma-separated): crypto, clock, log.
    #[arg(long, default_value = "crypto,clock,log", value_delimiter = ',')]
    capabilities: Vec<String>,
    /// Wall-clock budget of the call, in milliseconds.
    #[arg(long, default_value_t = 50)]
    deadline_ms: u64,
}

pub(super) fn run(cmd: AttestorCommand) -> anyhow::Result<ExitCode> {
    let AttestorCommand::Run(r) = cmd;
    let bytes = std::fs::read(&r.module).with_context(|| format!("{}", r.module.display()))?;
    let evidence =
        std::fs::read_to_string(&r.evidence).with_context(|| format!("{}", r.evidence.display()))?;
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&r.config).with_context(|| format!("{}", r.config.display()))?,
    )
    .with_context(|| format!("{} is not JSON", r.config.display()))?;
    let mut sources = Vec::new();
    for (i, ts) in config["trust_sources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let mut ts = ts;
        ts["method"] = r.method.clone().into();
        let spec: TrustSourceSpec =
            serde_json::from_value(ts).with_context(|| format!("trust_sources[{i}]"))?;
        sources.push(
            spec.into_source("local")
                .with_context(|| format!("trust_sources[{i}]"))?,
        );
    }
    let registry = Arc::new(Registry::new(sources)?);
    let sandbox = SandboxConfig {
        deadline_ms: r.deadline_ms,
        ..SandboxConfig::default()
    };
    let attestors = Attestors::new(&sandbox, &[])?;
    let module = attestors.compile(&r.method, &bytes, &r.capabilities)?;
    let modules: ModuleSet = [(r.method.clone(), module)].into_iter().collect();
    let context = serde_json::json!({ "trust_domain": "example.org" });
    match attestors.attest_in(
        &modules,
        &r.method,
        evidence.trim(),
        registry.snapshot(),
        &context,
    ) {
        Ok(a) => {
            println!("{}", serde_json::to_string_pretty(&a)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => anyhow::bail!("{e}"),
    }
}
