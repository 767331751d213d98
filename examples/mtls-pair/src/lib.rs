//! Two workloads, `mtls-server` and `mtls-client`, talk mutual TLS with the
//! X.509-SVIDs the SPIFFE Workload API gives them, and each accepts exactly
//! one peer SPIFFE ID.
//!
//! This crate owns what both binaries share: getting an [`X509Source`] from
//! the Workload API with a bounded first wait ([`workload`]), verifying and
//! authorizing the peer ([`verify`]), and the rustls configurations that
//! present the current SVID at every handshake ([`tls`]). It must not trust
//! anything but the trust domain's bundle from the Workload API: no system
//! roots, no hostnames, no session resumption.
//!
//! [`X509Source`]: spiffe::X509Source

mod error;
pub mod tls;
pub mod verify;
pub mod workload;

pub use error::{Error, Refusal};

use std::io::IsTerminal as _;
use std::process::ExitCode;

/// Logs to stderr, `info` unless `RUST_LOG` says otherwise. Stdout is kept
/// for what the binaries answer.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// The process outcome: one `error:` line on stderr and a non-zero status on
/// failure.
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line. Many errors (spiffe's, rustls's)
/// already print their cause, so a cause is added only if not yet said.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line = format!("{line}: {cause}");
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let e = anyhow::Error::new(std::io::Error::other("connection refused"))
            .context("cannot connect to 127.0.0.1:1");
        assert_eq!(
            error_line(&e),
            "cannot connect to 127.0.0.1:1: connection refused"
        );
        // Our errors, like spiffe's, already print their cause.
        let e = anyhow::Error::new(Error::Source {
            endpoint: "unix:/run/workload.sock".into(),
            source: spiffe::X509SourceError::Closed,
        });
        assert_eq!(
            error_line(&e),
            "Workload API at unix:/run/workload.sock: source is closed"
        );
    }
}
