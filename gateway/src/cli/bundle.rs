//! `castellan bundle …`: build, sign, verify and inspect policy bundles.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use castellan::bundle::{self, Bundle, SigningAlg};

#[derive(Subcommand)]
pub(super) enum BundleCommand {
    /// Pack a bundle directory into a .tar.gz (fills in module hashes, checks the manifest, compiles the Rego).
    Build(Build),
    /// Sign a bundle (adds .signatures.json, OPA's scheme).
    Sign(Sign),
    /// Verify a signed bundle with a public key.
    Verify(Verify),
    /// Show a bundle's manifest, files and signature (unverified).
    Inspect(Inspect),
}

#[derive(Args)]
pub(super) struct Build {
    /// Bundle directory: .manifest, *.rego, data.json, attestors/*.wasm.
    dir: PathBuf,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(Args)]
pub(super) struct Sign {
    /// Bundle file (.tar.gz).
    bundle: PathBuf,
    /// Private key, PEM (PKCS#8 EC P-256, RSA, or Ed25519).
    #[arg(long)]
    key: PathBuf,
    /// ES256, RS256 or EdDSA.
    #[arg(long, default_value = "ES256")]
    alg: String,
    /// Key id recorded in the signature.
    #[arg(long)]
    keyid: Option<String>,
    /// Output file (default: sign in place).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
pub(super) struct Verify {
    /// Bundle file (.tar.gz).
    bundle: PathBuf,
    /// Public key, PEM (SubjectPublicKeyInfo).
    #[arg(long)]
    key: PathBuf,
}

#[derive(Args)]
pub(super) struct Inspect {
    /// Bundle file (.tar.gz).
    bundle: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn read_bundle(path: &PathBuf) -> anyhow::Result<Bundle> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Bundle::from_tar_gz(&bytes).with_context(|| format!("{}", path.display()))
}

pub(super) fn run(cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BundleCommand::Build(b) => {
            let built = bundle::build(&b.dir).with_context(|| format!("{}", b.dir.display()))?;
            // Compile the Rego now so authors hear about errors before shipping.
            if built.rego().next().is_some() {
                let files = castellan::policy::BundleFiles::from_files(&built.files)?;
                files
                    .check_compiles()
                    .context("the bundle's Rego does not compile")?;
            }
            std::fs::write(&b.output, built.to_tar_gz()?)
                .with_context(|| format!("{}", b.output.display()))?;
            let m = built.manifest()?;
            eprintln!(
                "built {} (revision {:?}, {} files, {} attestor modules)",
                b.output.display(),
                m.revision,
                built.files.len(),
                m.attestors.len()
            );
        }
        BundleCommand::Sign(s) => {
            let alg = SigningAlg::parse(&s.alg)
                .with_context(|| format!("--alg must be ES256, RS256 or EdDSA, not {}", s.alg))?;
            let key = std::fs::read_to_string(&s.key).with_context(|| format!("{}", s.key.display()))?;
            let mut b = read_bundle(&s.bundle)?;
            b.check()?;
            bundle::sign(&mut b, &key, alg, s.keyid.as_deref())?;
            let out = s.output.unwrap_or(s.bundle);
            std::fs::write(&out, b.to_tar_gz()?).with_context(|| format!("{}", out.display()))?;
            eprintln!(
                "signed {} ({} files, {})",
                out.display(),
                b.files.len() - 1,
                s.alg
            );
        }
        BundleCommand::Verify(v) => {
            let key = std::fs::read_to_string(&v.key).with_context(|| format!("{}", v.key.display()))?;
            let b = read_bundle(&v.bundle)?;
            let sig = bundle::verify(&b, &key)?;
            b.check()?;
            println!(
                "verified: {} files signed with {}{}",
                sig.files,
                sig.alg,
                sig.keyid.map(|k| format!(" (keyid {k})")).unwrap_or_default()
            );
        }
        BundleCommand::Inspect(i) => {
            let b = read_bundle(&i.bundle)?;
            let m = b.manifest()?;
            let signed = b.files.contains_key(bundle::SIGNATURES_FILE);
            if i.json {
                let files: Vec<_> = b
                    .files
                    .iter()
                    .map(|(p, d)| serde_json::json!({ "path": p, "size": d.len(), "sha256": castellan::util::sha256_hex(d) }))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "manifest": m, "files": files, "signed": signed })
                );
            } else {
                println!("revision    {}", m.revision);
                println!("roots       {}", m.roots.join(", "));
                println!(
                    "signed      {}",
                    if signed {
                        "yes (run `bundle verify` with the key to check)"
                    } else {
                        "no"
                    }
                );
                for a in &m.attestors {
                    println!(
                        "attestor    {} -> {} (capabilities: {})",
                        a.method,
                        a.path,
                        a.capabilities.join(", ")
                    );
                }
                for (p, d) in &b.files {
                    println!("file        {p} ({} bytes)", d.len());
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
