//! `mtls-client --connect HOST:PORT --expect SPIFFE_ID`: a workload that
//! sends one line to the server over mTLS, provided the server's SVID carries
//! exactly the expected SPIFFE ID, and prints the answer.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, anyhow};
use castellan_example_mtls_pair::{tls, workload};
use clap::Parser;
use rustls::{AlertDescription, CertificateError};
use rustls_pki_types::ServerName;
use spiffe::SpiffeId;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long the server has to accept, handshake and answer.
const SERVER_WAIT: Duration = Duration::from_secs(10);

/// The longest answer read.
const MAX_LINE: u64 = 4096;

/// Says a line to the server that carries the expected SPIFFE ID.
#[derive(Parser)]
#[command(name = "mtls-client")]
struct Args {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:9443")]
    connect: SocketAddr,
    /// The SPIFFE ID the server must present, e.g. spiffe://example.org/server.
    #[arg(long)]
    expect: SpiffeId,
    /// The line to send.
    #[arg(long, default_value = "hello")]
    message: String,
    #[command(flatten)]
    workload: workload::WorkloadArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    castellan_example_mtls_pair::init_logging();
    castellan_example_mtls_pair::exit_code(run(Args::parse()).await)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let source = workload::connect(args.workload.wait()).await?;
    let me = source.svid()?.spiffe_id().clone();
    let config = tls::client_config(source, args.expect.clone())?;
    let addr = args.connect;
    let tcp = tokio::time::timeout(SERVER_WAIT, TcpStream::connect(addr))
        .await
        .with_context(|| format!("connecting to {addr} timed out"))?
        .with_context(|| format!("cannot connect to {addr}"))?;
    // Not a hostname to check, only where we dialled: the server is known by
    // the SPIFFE ID in its SVID. An IP address also keeps SNI off the wire.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio::time::timeout(
        SERVER_WAIT,
        TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .with_context(|| format!("TLS handshake with {addr} timed out"))?
    .map_err(|e| match tls::tls_error(&e) {
        Some(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)) => {
            anyhow!("refused the server at {addr}: it is not {}", args.expect)
        }
        _ => anyhow!("TLS handshake with {addr} failed: {e}"),
    })?;
    let answer = tokio::time::timeout(SERVER_WAIT, exchange(tls, &args.message))
        .await
        .with_context(|| format!("no answer from {addr} in time"))?
        .map_err(|e| match tls::tls_error(&e) {
            // TLS 1.3 lets the client finish first; the server's verdict on
            // our SVID arrives as an alert on the first read.
            Some(rustls::Error::AlertReceived(alert)) => anyhow!(
                "the server at {addr} refused this workload ({me}): TLS alert {}",
                alert_name(*alert)
            ),
            _ => anyhow!("talking to {addr}: {e}"),
        })?;
    anyhow::ensure!(
        !answer.is_empty(),
        "the server at {addr} closed the connection without answering"
    );
    print!("{answer}");
    Ok(())
}

/// Sends `message` as one line and reads one line back.
async fn exchange(mut tls: TlsStream<TcpStream>, message: &str) -> std::io::Result<String> {
    let sent = async {
        tls.write_all(format!("{}\n", message.trim_end()).as_bytes())
            .await?;
        tls.flush().await
    }
    .await;
    // If the server refused us and closed, the write can fail before the
    // alert is read; the read below still reports the alert.
    let mut stream = BufReader::new(tls);
    let mut answer = String::new();
    let read = (&mut stream).take(MAX_LINE).read_line(&mut answer).await;
    match (sent, read) {
        (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
        (Ok(()), Ok(_)) => Ok(answer),
    }
}

/// The alert by its RFC 8446 name, and what it means from a Castellan-style
/// peer where that is known.
fn alert_name(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::AccessDenied => "access_denied (our SPIFFE ID is not the one it accepts)".into(),
        AlertDescription::UnknownCA => "unknown_ca (our SVID does not chain to its bundle)".into(),
        AlertDescription::BadCertificate => "bad_certificate (our certificate is not an X.509-SVID)".into(),
        other => format!("{other:?}"),
    }
}
