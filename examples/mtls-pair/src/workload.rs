//! The workload's side of the SPIFFE Workload API: an [`X509Source`] that
//! keeps the SVID and bundles fresh in the background, found through
//! `SPIFFE_ENDPOINT_SOCKET`. The first SVID is waited for only so long: the
//! source retries a caller the API denies, quietly and forever.

use std::time::Duration;

use spiffe::{WorkloadApiClient, X509Source, X509SourceError};

use crate::Error;

/// The standard variable naming the Workload API, e.g. `unix:/run/workload.sock`.
pub const ENDPOINT_VAR: &str = "SPIFFE_ENDPOINT_SOCKET";

/// How long to wait for the Workload API to say why no SVID came.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Command-line settings both workloads share.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkloadArgs {
    /// How long to wait for the first X.509-SVID before giving up, seconds.
    #[arg(long, default_value_t = 10)]
    pub timeout_secs: u64,
}

impl WorkloadArgs {
    /// The bounded wait for the first SVID.
    pub fn wait(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// Connects to the Workload API named by `SPIFFE_ENDPOINT_SOCKET` and waits at
/// most `wait` for a first X.509-SVID and bundle. The source then follows
/// rotations by itself until dropped.
pub async fn connect(wait: Duration) -> Result<X509Source, Error> {
    let endpoint = std::env::var(ENDPOINT_VAR)
        .ok()
        .filter(|e| !e.is_empty())
        .ok_or(Error::NoEndpoint)?;
    let built = X509Source::builder()
        .endpoint(&endpoint)
        .initial_sync_timeout(wait)
        .build()
        .await;
    match built {
        Ok(source) => Ok(source),
        Err(X509SourceError::InitialSyncTimeout) => Err(Error::NoSvid {
            reason: why_no_svid(&endpoint).await,
            endpoint,
            waited: wait,
        }),
        Err(source) => Err(Error::Source { endpoint, source }),
    }
}

/// The source swallows the reasons it retries on, so ask once directly: a
/// person reading the error needs to know whether the socket is missing or
/// the caller matches no registration entry.
async fn why_no_svid(endpoint: &str) -> String {
    let probe = async {
        let client = WorkloadApiClient::connect_to(endpoint).await?;
        client.fetch_x509_svid().await.map(|_| ())
    };
    match tokio::time::timeout(PROBE_WAIT, probe).await {
        Ok(Err(e)) => e.to_string(),
        Ok(Ok(())) => "an SVID is available now; it came after the wait".to_owned(),
        Err(_) => "the Workload API does not answer".to_owned(),
    }
}
