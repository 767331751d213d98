//! `castellan tpm evidence`: the client side of the `tpm` method. It talks
//! to the machine's TPM through tss-esapi, asks the server for a challenge
//! (MakeCredential to the EK for a fresh AK), activates it and quotes PCRs
//! bound to the key of a CSR, and writes the evidence that attested issuance
//! takes with that CSR.
//!
//! The TPM work is in [`crate::tpm`]. Its AK is transient — created when the
//! TPM is opened and flushed when it is dropped — so the challenge and its
//! answer happen in this one process, on one blocking thread. The evidence
//! goes to the output only.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use sha2::{Digest as _, Sha256};

use super::ServerArgs;
use crate::tpm::Tpm;
use castellan::client::Endpoint;
use castellan_tpm::client::EkKind;

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
    /// Print the hex SHA-256 of this TPM's EK public area: what the server
    /// names the machine by (`spiffe://TD/tpm/<it>`), what policy allows in
    /// `tpm.allowed_ek_sha256`, and what a tpm trust source enrolls in
    /// `settings.enrolled_ek_sha256` for a TPM without an EK certificate.
    Ek(Ek),
}

#[derive(Args)]
pub(super) struct Ek {
    /// TCTI of the TPM [default: $TPM2TOOLS_TCTI, else $TCTI, else
    /// device:/dev/tpmrm0].
    #[arg(long)]
    tcti: Option<String>,
    #[command(flatten)]
    ek: EkChoice,
}

/// Which endorsement key to use.
#[derive(Args)]
struct EkChoice {
    /// The EK: `rsa` (RSA-2048), `ecc` (NIST P-256), or `auto`: the one
    /// whose certificate the vendor wrote to NV (RSA first), else RSA.
    #[arg(long = "ek", value_enum, default_value_t = EkArg::Auto)]
    kind: EkArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EkArg {
    Auto,
    Rsa,
    Ecc,
}

impl EkChoice {
    fn kind(&self) -> Option<EkKind> {
        match self.kind {
            EkArg::Auto => None,
            EkArg::Rsa => Some(EkKind::Rsa2048),
            EkArg::Ecc => Some(EkKind::EccP256),
        }
    }
}

/// How the EK is named in messages.
fn ek_name(kind: EkKind) -> &'static str {
    match kind {
        EkKind::Rsa2048 => "RSA-2048",
        EkKind::EccP256 => "ECC P-256",
    }
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
    #[command(flatten)]
    ek: EkChoice,
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

pub(super) async fn run(cmd: TpmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TpmCommand::Evidence(args) => evidence(args).await,
        TpmCommand::Ek(args) => ek(args).await,
    }
}

async fn ek(args: Ek) -> anyhow::Result<ExitCode> {
    let tcti = args.tcti.unwrap_or_else(tcti_from_env);
    let kind = args.ek.kind();
    let (digest, certified, kind) = tokio::task::spawn_blocking(move || {
        let tpm = Tpm::open(&tcti, kind, "choose one with --tcti or TPM2TOOLS_TCTI")?;
        anyhow::Ok((tpm.ek_sha256()?, tpm.ek_certificate().is_some(), tpm.ek_kind()))
    })
    .await
    .context("the TPM task failed")??;
    println!("{digest}");
    let name = ek_name(kind);
    if certified {
        eprintln!(
            "the {name} EK has a certificate in NV: a tpm trust source with its manufacturer's CA \
             certificates vouches for it"
        );
    } else {
        eprintln!(
            "the {name} EK has no certificate: to trust it, enroll this digest in a tpm trust \
             source's settings.enrolled_ek_sha256"
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn evidence(args: Evidence) -> anyhow::Result<ExitCode> {
    let csr_pem = std::fs::read_to_string(&args.csr)
        .with_context(|| format!("cannot read the CSR {}", args.csr.display()))?;
    // The same parsing and checks as the server's, so a CSR it would refuse
    // fails here before the TPM is touched.
    let csr = castellan::engine::verify_csr(&csr_pem).with_context(|| format!("{}", args.csr.display()))?;
    let key_sha256 = Sha256::digest(&csr.spki_der);
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let tcti = args.tcti.unwrap_or_else(tcti_from_env);
    let mut pcrs = args.pcrs;
    pcrs.sort_unstable();
    pcrs.dedup();
    anyhow::ensure!(!pcrs.is_empty(), "--pcrs names no PCR");

    let runtime = tokio::runtime::Handle::current();
    let kind = args.ek.kind();
    let evidence = tokio::task::spawn_blocking(move || {
        let mut tpm = Tpm::open(&tcti, kind, "choose one with --tcti or TPM2TOOLS_TCTI")?;
        if tpm.ek_certificate().is_none() {
            eprintln!(
                "the TPM has no {} EK certificate: sending its EK public area alone, which the \
                 server trusts only if a tpm trust source enrolls EK {}",
                ek_name(tpm.ek_kind()),
                tpm.ek_sha256()?
            );
        }
        tpm.answer_challenge(&runtime, &endpoint, &key_sha256, &pcrs)
    })
    .await
    .context("the TPM task failed")??;

    let mut text = evidence.to_string();
    text.push('\n');
    match &args.output {
        Some(path) => {
            castellan::util::write_file_atomic(path, text.as_bytes(), EVIDENCE_MODE)
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
                TpmCommand::Ek(_) => Vec::new(),
            })
        };
        assert_eq!(parse("0,7,16").ok(), Some(vec![0, 7, 16]));
        assert!(parse("24").is_err());
        assert!(parse("x").is_err());
    }
}
