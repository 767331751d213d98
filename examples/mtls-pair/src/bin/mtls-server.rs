//! `mtls-server --listen HOST:PORT --allow SPIFFE_ID`: a workload that
//! answers one line per mTLS connection, and only to the client whose SVID
//! carries exactly the allowed SPIFFE ID.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use castellan_example_mtls_pair::{tls, workload};
use clap::Parser;
use spiffe::{SpiffeId, X509Source};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

/// How long a client has to finish the handshake and send its line.
const CLIENT_WAIT: Duration = Duration::from_secs(10);

/// The longest line read from a client.
const MAX_LINE: u64 = 4096;

/// Answers `hello <client ID>, I am <server ID>` to the one allowed client.
#[derive(Parser)]
#[command(name = "mtls-server")]
struct Args {
    /// Where to listen; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// The only client SPIFFE ID served, e.g. spiffe://example.org/client.
    #[arg(long)]
    allow: SpiffeId,
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
    let config = tls::server_config(source.clone(), args.allow.clone())?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    println!("listening on {local}");
    std::io::stdout().flush()?;
    info!(allow = %args.allow, "serving as {}", source.svid()?.spiffe_id());
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors and the like: the next accept may work.
                warn!("accept on {local}: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, source) = (acceptor.clone(), source.clone());
        tokio::spawn(async move {
            if let Err(e) = answer(&acceptor, tcp, &source).await {
                warn!("connection from {from}: {e:#}");
            }
        });
    }
}

/// One connection: handshake, read a line, answer, close.
async fn answer(acceptor: &TlsAcceptor, tcp: TcpStream, source: &X509Source) -> anyhow::Result<()> {
    let tls = tokio::time::timeout(CLIENT_WAIT, acceptor.accept(tcp))
        .await
        .context("TLS handshake timed out")?
        .context("TLS handshake failed")?;
    let client = tls::peer_id(tls.get_ref().1).context("the verified client has no SPIFFE ID")?;
    let me = source.svid()?.spiffe_id().clone();
    let mut stream = BufReader::new(tls);
    let mut line = String::new();
    tokio::time::timeout(CLIENT_WAIT, (&mut stream).take(MAX_LINE).read_line(&mut line))
        .await
        .context("no line from the client in time")?
        .context("reading the client's line")?;
    let tls = stream.get_mut();
    tls.write_all(format!("hello {client}, I am {me}\n").as_bytes())
        .await?;
    tls.shutdown().await?;
    info!(%client, "answered");
    Ok(())
}
