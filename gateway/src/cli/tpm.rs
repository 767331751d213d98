//! `castellan tpm evidence`: the client side of the `tpm` method. It talks
//! to the machine's TPM through tss-esapi, asks the server for a challenge
//! (MakeCredential to the EK for a fresh AK), activates it and quotes PCRs
//! bound to the key of a CSR, and writes the evidence that attested issuance
//! takes with that CSR.
//!
//! The AK is transient — created when the TPM is opened and flushed when it
//! is dropped — so the challenge and its answer happen in this one process.
//! All TPM work runs on one blocking thread (the TSS context stays on it);
//! the HTTP calls go through the CLI's own client. The activated secret and
//! key material are never logged: the evidence goes to the output only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use castellan_tpm::client::Attestor;
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use super::{ServerArgs, problem_line};
use crate::client::Endpoint;

/// Used when neither `--tcti` nor a TCTI variable is set: the kernel's
/// resource manager, which flushes what a crashed client leaves behind.
const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// The evidence may still be spent by whoever holds it and the (public) CSR
/// until the server sees it: owner-only, like a key.
const EVIDENCE_MODE: u32 = 0o600;

#[derive(Subcommand)]
pub(super) enum TpmCommand {
    /// Answer a server challenge with this machine's TPM and print the
    /// evidence for `POST /api/v1/workloads/attested-issuance` (method `tpm`).
    Evidence(Evidence),
}

#[derive(Args)]
pub(super) struct Evidence {
    #[command(flatten)]
    server: ServerArgs,
    /// TCTI of the TPM, e.g. `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321` [default: $TPM2TOOLS_TCTI, else
    /// $TCTI, else device:/dev/tpmrm0].
    #[arg(long)]
    tcti: Option<String>,
    /// The PEM CSR to be certified: the quote is bound to its key, so the
    /// evidence is good only together with this CSR.
    #[arg(long)]
    csr: PathBuf,
    /// SHA-256 PCRs to quote, comma-separated (0 to 23).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1,2,3,4,5,6,7",
        value_parser = clap::value_parser!(u32).range(0..24)
    )]
    pcrs: Vec<u32>,
    /// Write the evidence here (mode 0600, replaced atomically) instead of
    /// standard output.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// What the server answers to a tpm challenge request.
#[derive(serde::Deserialize)]
struct Challenge {
    challenge_id: String,
    nonce: String,
    credential_blob: String,
    encrypted_secret: String,
}

pub(super) async fn run(cmd: TpmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TpmCommand::Evidence(args) => evidence(args).await,
    }
}

async fn evidence(args: Evidence) -> anyhow::Result<ExitCode> {
    let csr_pem = std::fs::read_to_string(&args.csr)
        .with_context(|| format!("cannot read the CSR {}", args.csr.display()))?;
    // The same parsing and checks as the server's, so a CSR it would refuse
    // fails here before the TPM is touched.
    let csr = crate::issuance::verify_csr(&csr_pem).with_context(|| format!("{}", args.csr.display()))?;
    let key_sha256 = Sha256::digest(&csr.spki_der);
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let tcti = args.tcti.unwrap_or_else(tcti_from_env);
    let mut pcrs = args.pcrs;
    pcrs.sort_unstable();
    pcrs.dedup();
    anyhow::ensure!(!pcrs.is_empty(), "--pcrs names no PCR");

    let runtime = tokio::runtime::Handle::current();
    let evidence =
        tokio::task::spawn_blocking(move || answer_challenge(&runtime, &endpoint, &tcti, &key_sha256, &pcrs))
            .await
            .context("the TPM task failed")??;

    let mut text = evidence.to_string();
    text.push('\n');
    match &args.output {
        Some(path) => {
            crate::util::write_file_atomic(path, text.as_bytes(), EVIDENCE_MODE)
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!(
                "wrote {} (challenge {}); post it with the same CSR within the challenge's lifetime",
                path.display(),
                evidence["challenge_id"].as_str().unwrap_or("-")
            );
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `$TPM2TOOLS_TCTI` (as tpm2-tools read it), else `$TCTI` (as libtss2's
/// loader reads it), else the kernel resource manager.
fn tcti_from_env() -> String {
    ["TPM2TOOLS_TCTI", "TCTI"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| DEFAULT_TCTI.to_owned())
}

/// Opens the TPM, gets a challenge for its EK and a fresh AK, activates the
/// credential and quotes `pcrs` over SHA-256(nonce || `key_sha256`).
/// Blocking: run it off the async workers. The attestor (and with it the
/// EK and AK handles) is flushed when this returns, on every path.
fn answer_challenge(
    runtime: &tokio::runtime::Handle,
    endpoint: &Endpoint,
    tcti: &str,
    key_sha256: &[u8],
    pcrs: &[u32],
) -> anyhow::Result<Value> {
    let mut tpm = Attestor::connect(tcti).map_err(|e| {
        anyhow::anyhow!(
            "cannot use a TPM through TCTI `{tcti}`: {}; choose one with --tcti or TPM2TOOLS_TCTI",
            one_line(&e)
        )
    })?;
    let ek_certificate = tpm
        .ek_certificate()
        .map_err(|e| anyhow::anyhow!("cannot read the EK certificate from the TPM: {}", one_line(&e)))?
        .context(
            "the TPM has no RSA-2048 EK certificate in NV index 0x01c00002; the server \
             needs it to check the TPM's manufacturer, so this TPM cannot use the tpm method \
             until its vendor's EK certificate is provisioned there",
        )?;
    let ask = json!({
        "method": "tpm",
        "ek_certificate": STANDARD.encode(&ek_certificate),
        "ek_public": STANDARD.encode(tpm.ek_public()),
        "ak_public": STANDARD.encode(tpm.ak_public()),
    });
    let challenge: Challenge = runtime
        .block_on(post(endpoint, "/api/v1/attestation/challenges", &ask))
        .context("cannot get a challenge from the server")?;
    tracing::debug!(challenge_id = %challenge.challenge_id, "challenge received");

    let decode = |field: &str, text: &str| {
        STANDARD
            .decode(text)
            .with_context(|| format!("the server's challenge has a `{field}` that is not base64"))
    };
    let nonce = decode("nonce", &challenge.nonce)?;
    let blob = decode("credential_blob", &challenge.credential_blob)?;
    let wrapped = decode("encrypted_secret", &challenge.encrypted_secret)?;
    let activated = tpm.activate_credential(&blob, &wrapped).map_err(|e| {
        anyhow::anyhow!(
            "the TPM could not activate the server's credential (was it made for this TPM's EK?): {}",
            one_line(&e)
        )
    })?;
    let qualifying = Sha256::new()
        .chain_update(&nonce)
        .chain_update(key_sha256)
        .finalize();
    let quote = tpm
        .quote(&qualifying, pcrs)
        .map_err(|e| anyhow::anyhow!("the TPM could not quote the PCRs: {}", one_line(&e)))?;
    let values: serde_json::Map<String, Value> = quote
        .pcrs
        .iter()
        .map(|(pcr, value)| (pcr.to_string(), Value::String(hex::encode(value))))
        .collect();
    Ok(json!({
        "challenge_id": challenge.challenge_id,
        "activated_secret": STANDARD.encode(activated),
        "attest": STANDARD.encode(&quote.attest),
        "signature": STANDARD.encode(&quote.signature),
        "pcrs": values,
    }))
}

/// A TPM error in one line. tss-esapi's errors repeat their message down
/// the source chain, so this gives the top one and, when it says something
/// new, the innermost (which carries the response code).
fn one_line(e: &castellan_tpm::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let (top, root) = (e.to_string(), root.to_string());
    let top = top.trim_end_matches('.');
    if top.ends_with(root.trim_end_matches('.')) {
        top.to_owned()
    } else {
        format!("{top} ({root})")
    }
}

/// POSTs JSON and expects 201 with a JSON answer; a refusal becomes the
/// server's problem detail.
async fn post<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    path: &str,
    body: &Value,
) -> anyhow::Result<T> {
    let mut conn = endpoint.connect().await?;
    let (status, resp) = conn
        .send(Method::POST, path, None, Some(Bytes::from(body.to_string())))
        .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{}", problem_line(status, &resp));
    serde_json::from_slice(&resp).context("the server's answer is not the expected JSON")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcrs_parse_and_are_range_checked() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: TpmCommand,
        }
        let parse = |pcrs: &str| {
            Cli::try_parse_from(["t", "evidence", "--csr", "c.pem", "--pcrs", pcrs]).map(|c| match c.cmd {
                TpmCommand::Evidence(e) => e.pcrs,
            })
        };
        assert_eq!(parse("0,7,16").ok(), Some(vec![0, 7, 16]));
        assert!(parse("24").is_err());
        assert!(parse("x").is_err());
    }
}
