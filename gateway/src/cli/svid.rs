//! `castellan svid issue`: attest with evidence over HTTP and write an
//! X.509-SVID, its key and the bundle.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::{Method, StatusCode};

use castellan::client::Endpoint;

use super::{ServerArgs, problem_line};

#[derive(Subcommand)]
pub(super) enum SvidCommand {
    /// Attest with evidence and write an X.509-SVID, its key and the bundle.
    Issue(SvidIssue),
}

#[derive(Args)]
pub(super) struct SvidIssue {
    #[command(flatten)]
    server: ServerArgs,
    /// Attestation method.
    #[arg(long, default_value = "k8s_sat")]
    method: String,
    /// File holding the evidence (e.g. a service-account token); `-` reads stdin.
    #[arg(long)]
    evidence_file: PathBuf,
    /// Directory to write svid.pem, svid.key and bundle.pem into.
    #[arg(long, default_value = ".")]
    out_dir: PathBuf,
    /// Certify this PKCS#8 PEM private key instead of a new one (for
    /// evidence bound to a key made beforehand: `castellan tpm evidence
    /// --csr`, or a token whose audience names the key). svid.key is then
    /// not written.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Requested lifetime in seconds (policy may shorten it).
    #[arg(long)]
    ttl: Option<u64>,
}

pub(super) fn read_evidence(path: &Path) -> anyhow::Result<String> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading evidence from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading evidence from {}", path.display()))?
    };
    Ok(text.trim().to_owned())
}

pub(super) async fn svid_issue(args: SvidIssue) -> anyhow::Result<ExitCode> {
    let evidence = read_evidence(&args.evidence_file)?;
    let endpoint = Endpoint::parse(&args.server.addr, args.server.ca_file.as_deref())?;
    let key = match &args.key {
        Some(path) => {
            let pem =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            rcgen::KeyPair::from_pem(&pem).map_err(|_| {
                let hint = if pem.contains("-----BEGIN EC PRIVATE KEY-----")
                    || pem.contains("-----BEGIN RSA PRIVATE KEY-----")
                {
                    format!(
                        " (it is in the older SEC1/PKCS#1 form; convert it with \
                         `openssl pkcs8 -topk8 -nocrypt -in {0} -out {0}.p8`)",
                        path.display()
                    )
                } else {
                    String::new()
                };
                anyhow::anyhow!(
                    "{} is not an unencrypted PKCS#8 PEM private key (EC P-256/P-384, Ed25519 or RSA){hint}",
                    path.display()
                )
            })?
        }
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
    };
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .pem()?;
    let body = serde_json::json!({ "method": args.method, "evidence": evidence, "csr": csr, "ttl_seconds": args.ttl });
    let mut conn = endpoint.connect().await?;
    let (status, resp) = conn
        .send(
            Method::POST,
            "/api/v1/workloads/attested-issuance",
            None,
            Some(Bytes::from(body.to_string())),
        )
        .await?;
    anyhow::ensure!(status == StatusCode::CREATED, "{}", problem_line(status, &resp));
    let issued: serde_json::Value = serde_json::from_slice(&resp).context("server answer is not JSON")?;
    let field = |k: &str| {
        issued[k]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("answer has no `{k}`"))
    };
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let svid = args.out_dir.join("svid.pem");
    let key_note = match &args.key {
        Some(path) => format!("for the key in {}", path.display()),
        None => {
            let path = args.out_dir.join("svid.key");
            castellan::util::write_private_file(&path, key.serialize_pem().as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            format!("its key in {}", path.display())
        }
    };
    let bundle = args.out_dir.join("bundle.pem");
    std::fs::write(&svid, field("chain_pem")?).with_context(|| format!("cannot write {}", svid.display()))?;
    std::fs::write(&bundle, field("bundle_pem")?)
        .with_context(|| format!("cannot write {}", bundle.display()))?;
    println!("{}", field("spiffe_id")?);
    eprintln!(
        "wrote {} (expires {}), {key_note}, and the trust bundle in {}",
        svid.display(),
        field("not_after")?,
        bundle.display()
    );
    Ok(ExitCode::SUCCESS)
}
