//! `castellan bench workload-api`: many concurrent Workload API streams
//! against a live server. It registers K entries that every stream matches,
//! opens N connections with one `FetchX509SVID` stream each, reads the
//! server's resident memory before and after (the server's pid comes from
//! the socket's peer credentials), then adds an entry every stream matches
//! and times how long the server takes to push the resulting change to all
//! of them. The signatures the server made for the streams are counted in
//! its inventory: SVIDs are shared per identity, so K (then one more), not
//! N. Then it waits for the SVIDs' half-life and times how long their
//! rotation takes to reach every stream. Finally it drives `FetchJWTSVID` at
//! a fixed concurrency. It measures; it asserts nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use castellan_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use castellan_proto::workload::{JwtsvidRequest, X509svidRequest};
use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::sync::mpsc;
use tonic::transport::Channel;

use castellan::client::Endpoint;

/// What to run.
pub struct Options {
    pub socket: PathBuf,
    pub endpoint: Endpoint,
    pub admin_token: String,
    pub streams: usize,
    /// Entries every stream matches.
    pub entries: usize,
    /// X.509-SVID lifetime of the bench entries: they rotate at half of it.
    pub svid_ttl: u64,
    pub jwt_concurrency: usize,
    pub jwt_requests: usize,
    pub server_pid: Option<u32>,
}

/// What was measured.
#[derive(Debug)]
pub struct Report {
    pub streams: usize,
    pub entries: usize,
    /// X.509-SVIDs the server signed while the streams opened.
    pub signed_open: usize,
    /// X.509-SVIDs the server signed for the change pushed to every stream.
    pub signed_push: usize,
    /// X.509-SVIDs the server signed for the rotation at half-life.
    pub signed_rotation: usize,
    /// From the first stream's rotated response to each stream's.
    pub rotation_p50: Duration,
    pub rotation_all: Duration,
    /// Until every stream held its first SVID.
    pub open_elapsed: Duration,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// From the entry change to each stream's rotated response.
    pub push_p50: Duration,
    pub push_all: Duration,
    pub jwt: super::Report,
}

/// One connection, as a separate workload would open it.
async fn connect(socket: &std::path::Path) -> anyhow::Result<(SpiffeWorkloadApiClient<Channel>, u32)> {
    let path = socket.to_owned();
    let pid = tokio::net::UnixStream::connect(&path)
        .await
        .with_context(|| format!("cannot connect to {}", path.display()))?
        .peer_cred()?
        .pid()
        .unwrap_or(0) as u32;
    let channel = tonic::transport::Endpoint::try_from("http://workload.invalid")?
        .connect_with_connector(tower::service_fn(move |_: tonic::codegen::http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await?;
    Ok((SpiffeWorkloadApiClient::new(channel), pid))
}

fn request<T>(body: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

async fn create_entry(
    admin: &mut castellan::client::Conn,
    token: &str,
    spiffe_id: &str,
    ttl: u64,
) -> anyhow::Result<String> {
    let uid = std::fs::read_to_string("/proc/self/status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        .context("own uid")?;
    let body =
        json!({ "spiffe_id": spiffe_id, "selectors": [format!("unix:uid:{uid}")], "x509_svid_ttl": ttl });
    let (status, resp) = admin
        .send(
            Method::POST,
            "/api/v1/entries",
            Some(token),
            Some(Bytes::from(body.to_string())),
        )
        .await?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "creating a bench entry: {status} {}",
        String::from_utf8_lossy(&resp)
    );
    Ok(serde_json::from_slice::<serde_json::Value>(&resp)?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// X.509-SVIDs in the server's inventory whose SPIFFE ID starts with `prefix`.
async fn signed(admin: &mut castellan::client::Conn, token: &str, prefix: &str) -> anyhow::Result<usize> {
    let (mut count, mut cursor) = (0, None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/certificates?limit=1000&cursor={c}"),
            None => "/api/v1/certificates?limit=1000".to_owned(),
        };
        let (status, body) = admin.send(Method::GET, &path, Some(token), None).await?;
        anyhow::ensure!(status.is_success(), "listing certificates: {status}");
        let page: serde_json::Value = serde_json::from_slice(&body)?;
        count += page["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter(|c| c["spiffe_id"].as_str().is_some_and(|id| id.starts_with(prefix)))
                    .count()
            })
            .unwrap_or(0);
        match page["next_cursor"].as_str() {
            Some(c) if !c.is_empty() => cursor = Some(c.to_owned()),
            _ => return Ok(count),
        }
    }
}

/// Runs the benchmark against a live server.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let mut admin = opts.endpoint.connect().await?;
    let (status, health) = admin.send(Method::GET, "/healthz", None, None).await?;
    anyhow::ensure!(status.is_success(), "healthz: {status}");
    let td = serde_json::from_slice::<serde_json::Value>(&health)?["trust_domain"]
        .as_str()
        .unwrap_or("example.org")
        .to_owned();
    castellan::util::raise_fd_limit();
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let prefix = format!("spiffe://{td}/bench/{tag}/");
    let mut entries = Vec::new();
    for k in 0..opts.entries.max(1) {
        entries.push(
            create_entry(
                &mut admin,
                &opts.admin_token,
                &format!("{prefix}{k}"),
                opts.svid_ttl,
            )
            .await?,
        );
    }

    let (_, pid) = connect(&opts.socket).await?;
    let rss_before_kib = rss_kib(pid);
    // Each stream reports the arrival time of every response it gets.
    let (arrivals, mut arrived) = mpsc::unbounded_channel::<(usize, Instant)>();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(opts.streams);
    for i in 0..opts.streams {
        let (mut client, _) = connect(&opts.socket).await?;
        let mut stream = client
            .fetch_x509svid(request(X509svidRequest {}))
            .await
            .with_context(|| format!("stream {i}"))?
            .into_inner();
        let arrivals = arrivals.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client;
            while let Ok(Some(_)) = stream.message().await {
                if arrivals.send((i, Instant::now())).is_err() {
                    return;
                }
            }
        }));
    }
    let mut first = vec![false; opts.streams];
    let mut have = 0;
    while have < opts.streams {
        let (i, _) = arrived.recv().await.context("a stream ended")?;
        if !std::mem::replace(&mut first[i], true) {
            have += 1;
        }
    }
    let open_elapsed = started.elapsed();
    // Let allocations settle before reading the server's memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_kib = rss_kib(pid);
    // The server closes idle connections: a fresh one after the long wait.
    admin = opts.endpoint.connect().await?;
    let signed_open = signed(&mut admin, &opts.admin_token, &prefix).await?;

    // One more entry for the same caller: every stream gets a new SVID.
    let changed = Instant::now();
    // It lives long: its own rotation must not mix with the others'.
    entries.push(create_entry(&mut admin, &opts.admin_token, &format!("{prefix}new"), 86_400).await?);
    let mut pushed = vec![None; opts.streams];
    let mut have = 0;
    while have < opts.streams {
        let (i, at) = tokio::time::timeout(Duration::from_secs(120), arrived.recv())
            .await
            .context("the rotation did not reach every stream within 120 s")?
            .context("a stream ended")?;
        if at >= changed && pushed[i].is_none() {
            pushed[i] = Some(at - changed);
            have += 1;
        }
    }
    let mut push: Vec<Duration> = pushed.into_iter().flatten().collect();
    push.sort();
    admin = opts.endpoint.connect().await?;
    let signed_push = signed(&mut admin, &opts.admin_token, &prefix).await? - signed_open;

    // The first K SVIDs were minted when the first stream opened; each
    // stream wakes at their half-life and gets the renewed ones.
    let settled = Instant::now();
    let mut rotated = vec![None; opts.streams];
    let mut have = 0;
    while have < opts.streams {
        let (i, at) = tokio::time::timeout(Duration::from_secs(opts.svid_ttl + 60), arrived.recv())
            .await
            .context("the rotation did not reach every stream in time")?
            .context("a stream ended")?;
        if at >= settled && rotated[i].is_none() {
            rotated[i] = Some(at);
            have += 1;
        }
    }
    let mut rotation: Vec<Instant> = rotated.into_iter().flatten().collect();
    rotation.sort();
    let first_rotated = rotation[0];
    let rotation: Vec<Duration> = rotation.iter().map(|t| *t - first_rotated).collect();
    for t in tasks {
        t.abort();
    }
    admin = opts.endpoint.connect().await?;
    let signed_rotation = signed(&mut admin, &opts.admin_token, &prefix).await? - signed_open - signed_push;

    let jwt = run_jwt(&opts).await?;
    admin = opts.endpoint.connect().await?;
    for id in entries {
        let _ = admin
            .send(
                Method::DELETE,
                &format!("/api/v1/entries/{id}"),
                Some(&opts.admin_token),
                None,
            )
            .await;
    }
    Ok(Report {
        streams: opts.streams,
        entries: opts.entries.max(1),
        signed_open,
        signed_push,
        signed_rotation,
        rotation_p50: rotation[rotation.len() / 2],
        rotation_all: rotation[rotation.len() - 1],
        open_elapsed,
        rss_before_kib,
        rss_after_kib,
        push_p50: push[push.len() / 2],
        push_all: push[push.len() - 1],
        jwt,
    })
}

/// `FetchJWTSVID` from `jwt_concurrency` connections.
async fn run_jwt(opts: &Options) -> anyhow::Result<super::Report> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let probe = super::cpu::Probe::new(opts.endpoint.authority(), opts.server_pid);
    let cpu_start = probe.start();
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..opts.jwt_concurrency {
        let (mut client, _) = connect(&opts.socket).await?;
        let next = next.clone();
        let total = opts.jwt_requests;
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut refused = 0usize;
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                let t = Instant::now();
                let r = client
                    .fetch_jwtsvid(request(JwtsvidRequest {
                        audience: vec!["bench".into()],
                        spiffe_id: String::new(),
                    }))
                    .await;
                match r {
                    Ok(_) => latencies.push(t.elapsed()),
                    Err(_) => refused += 1,
                }
            }
            (latencies, refused)
        }));
    }
    let mut latencies = Vec::new();
    let mut refused = 0;
    for w in workers {
        let (l, r) = w.await?;
        latencies.extend(l);
        refused += r;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    // `summarise` counts HTTP statuses; a gRPC success counts as 201 and a
    // failure as 0.
    let mut statuses = vec![201u16; latencies.len()];
    statuses.extend(std::iter::repeat_n(0, refused));
    Ok(super::Report {
        server_cpu: probe.since(cpu_start),
        ..super::summarise(opts.jwt_requests, latencies, &statuses, elapsed)
    })
}
