//! `castellan explain`: why a caller would get, or did not get, an identity
//! (`POST /api/v1/explain`), as a report or `--json`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Args;
use hyper::Method;
use serde_json::{Value, json};

use super::ClientArgs;
use super::ephemeral::call;

/// Explain from evidence, selectors, or a refused request's id (admin).
/// Nothing is issued, spent or recorded.
#[derive(Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["evidence", "evidence_file", "selector", "refusal"]))]
pub(super) struct Explain {
    #[command(flatten)]
    client: ClientArgs,
    /// The attestation method of `--evidence`, or the method whose
    /// selectors `--selector` gives (default: unix, the Workload API's).
    #[arg(long)]
    method: Option<String>,
    /// The evidence, as a caller would present it (`-` reads stdin).
    #[arg(long, requires = "method")]
    evidence: Option<String>,
    /// A file holding the evidence.
    #[arg(long, requires = "method")]
    evidence_file: Option<PathBuf>,
    /// A selector the caller has (type:key:value), repeatable.
    #[arg(long)]
    selector: Vec<String>,
    /// The request id a refusal named (problem `request_id`, or the
    /// Workload API status message).
    #[arg(long)]
    refusal: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(a: Explain) -> anyhow::Result<ExitCode> {
    let evidence = match (&a.evidence, &a.evidence_file) {
        (Some(e), _) if e == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the evidence from stdin")?;
            Some(s.trim().to_owned())
        }
        (Some(e), _) => Some(e.clone()),
        (None, Some(p)) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("{}", p.display()))?
                .trim()
                .to_owned(),
        ),
        (None, None) => None,
    };
    let body = match (evidence, a.refusal) {
        (Some(evidence), _) => json!({ "method": a.method, "evidence": evidence }),
        (None, Some(id)) => json!({ "request_id": id }),
        (None, None) => {
            let mut b = json!({ "selectors": a.selector });
            if let Some(m) = a.method {
                b["method"] = m.into();
            }
            b
        }
    };
    let (_, answer) = call(&a.client, Method::POST, "/api/v1/explain", Some(body)).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print!("{}", report(&answer));
    }
    Ok(ExitCode::SUCCESS)
}

/// The explanation as a person reads it.
fn report(x: &Value) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(&s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    for v in x["verdict"].as_array().into_iter().flatten() {
        line(format!("=> {}", s(v)));
    }
    if let Some(r) = x.get("refusal") {
        line(String::new());
        line(format!(
            "refusal     #{} {} at {} (actor {})",
            r["seq"],
            s(&r["kind"]),
            s(&r["at"]),
            r["actor"]
        ));
        if let Some(reasons) = r["detail"]["reasons"].as_array() {
            line(format!("  reasons   {}", list(&Value::Array(reasons.clone()))));
        }
    }
    if let Some(a) = x.get("attestation") {
        line(String::new());
        let configured = list(&a["trust_sources"]);
        if a["verified"] == true {
            line(format!(
                "attestation {}: verified by trust source {} (subject {}){}",
                s(&a["method"]),
                s(&a["trust_source"]),
                s(&a["subject"]),
                if a["single_use"] == true {
                    "; single-use evidence, not spent"
                } else {
                    ""
                }
            ));
        } else {
            line(format!(
                "attestation {}: NOT verified: {}: {}",
                s(&a["method"]),
                s(&a["problem"]),
                s(&a["detail"])
            ));
        }
        for c in a["checks"].as_array().into_iter().flatten() {
            match c["error"].as_str() {
                None => line(format!("  checked against {}: verified", s(&c["trust_source"]))),
                Some(e) => line(format!(
                    "  checked against {}: failed: {e}",
                    s(&c["trust_source"])
                )),
            }
        }
        line(format!(
            "  trust sources for {}: {}",
            s(&a["method"]),
            if configured.is_empty() {
                "none".to_owned()
            } else {
                configured
            }
        ));
    }
    if let Some(sel) = x.get("selectors") {
        line(String::new());
        line(format!("selectors   {}", list(sel)));
    }
    if let Some(e) = x.get("entries") {
        let matched = e["matched"].as_array().cloned().unwrap_or_default();
        line(format!("entries matched: {}", matched.len()));
        for m in &matched {
            let answer = match m["allowed"].as_bool() {
                Some(true) => "allowed".to_owned(),
                Some(false) => format!("denied: {}", list(&m["reasons"])),
                None => format!("withheld: {}", list(&m["reasons"])),
            };
            line(format!("  {} ({}): {answer}", s(&m["spiffe_id"]), s(&m["id"])));
        }
        let unmatched = e["unmatched"].as_array().cloned().unwrap_or_default();
        line(format!(
            "entries not matched: {} (closest {} shown)",
            e["unmatched_total"],
            unmatched.len()
        ));
        for u in &unmatched {
            line(format!(
                "  {} ({}): lacks {}",
                s(&u["spiffe_id"]),
                s(&u["id"]),
                list(&u["missing"])
            ));
        }
    }
    if let Some(d) = x.get("issuance") {
        line(String::new());
        if d["allow"] == true {
            line(format!(
                "issuance policy: allow {} for {} s",
                s(&d["spiffe_id"]),
                d["ttl_seconds"]
            ));
        } else {
            line(format!("issuance policy: deny: {}", list(&d["reasons"])));
        }
    }
    line(format!("policy revision {}", s(&x["policy_revision"])));
    out
}
