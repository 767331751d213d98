//! `agent --castellan URL --tool URL --evidence-file F [--subject-token-file F]`:
//! an agent that gets an identity acting for a person and calls a tool.

use std::sync::Arc;
use std::time::Duration;

use castellan_client::{Agent, AgentConfig};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

fn main() -> std::process::ExitCode {
    let castellan = arg("--castellan").unwrap_or_else(|| "http://127.0.0.1:8443".into());
    let tool = arg("--tool").unwrap_or_else(|| "http://127.0.0.1:9090".into());
    let Some(evidence_file) = arg("--evidence-file") else {
        eprintln!("error: --evidence-file is required (e.g. a projected service-account token)");
        return std::process::ExitCode::FAILURE;
    };
    let subject_token = arg("--subject-token-file")
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|t| t.trim().to_owned());
    let config = AgentConfig {
        castellan_url: castellan,
        agent_id: arg("--agent-id").unwrap_or_else(|| "triage-bot".into()),
        method: "k8s_sat".into(),
        evidence: Arc::new(move || {
            std::fs::read_to_string(&evidence_file)
                .unwrap_or_default()
                .trim()
                .to_owned()
        }),
        scopes: vec!["tickets:read".into()],
        audience: vec![tool.clone()],
        subject_token,
        task: None,
        renew_before: Duration::from_secs(60),
    };
    let agent = match Agent::new(config) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match castellan_example_agent::call_tool(&agent, "GET", &format!("{tool}/tickets")) {
        Ok((status, body)) => {
            println!("{status} {body}");
            if status == 200 {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
