//! `castellan bench issuance`: a load generator for attested issuance. It
//! registers its own trust source over the admin API, pre-generates tokens
//! and CSRs (so the client's crypto is not measured), drives the endpoint at
//! a chosen concurrency over keep-alive connections, and prints issuances/s
//! and latency percentiles. It measures; it asserts nothing.

pub mod cpu;
mod flood;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hyper::{Method, StatusCode};
use rcgen::KeyPair;
use serde_json::json;

use castellan::client::Endpoint;

pub mod attestors;
pub mod workload_api;
use castellan::dev::{mint_projected_token, p256_jwk};

/// What to run.
pub struct Options {
    pub endpoint: Endpoint,
    pub admin_token: String,
    pub concurrency: usize,
    pub requests: usize,
    pub warmup: usize,
    /// The server's process, when not the one listening on the port here.
    pub server_pid: Option<u32>,
    /// Distinct tokens, presented in turn (as pods present their projected
    /// tokens many times); `None`: a new token for every request.
    pub tokens: Option<usize>,
}

/// What was measured.
#[derive(Debug)]
pub struct Report {
    pub requests: usize,
    pub issued: usize,
    pub refused: Vec<(u16, usize)>,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// What the server's process spent during the measured part.
    pub server_cpu: Option<cpu::ServerCpu>,
}

impl Report {
    pub fn rate(&self) -> f64 {
        self.issued as f64 / self.elapsed.as_secs_f64()
    }
}

pub use flood::{FloodOptions, run_flood};

/// A trust source the load tool registers for itself, and removes after.
struct BenchSource {
    key: KeyPair,
    kid: String,
    issuer: String,
    id: String,
}

async fn register_source(
    admin: &mut castellan::client::Conn,
    token: &str,
    prefix: &str,
) -> anyhow::Result<BenchSource> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let issuer = format!("https://{prefix}-{tag}.castellan.invalid");
    let kid = format!("{prefix}-{tag}");
    let body = json!({
        "name": kid, "method": "k8s_sat", "issuer": issuer,
        "audiences": ["castellan-bench"], "jwks": {"keys": [p256_jwk(&key, &kid)]},
    });
    let (status, resp) = admin
        .send(
            Method::POST,
            "/api/v1/trust-sources",
            Some(token),
            Some(Bytes::from(body.to_string())),
        )
        .await?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "creating the bench trust source: {status} {}",
        String::from_utf8_lossy(&resp)
    );
    let id = serde_json::from_slice::<serde_json::Value>(&resp)?["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok(BenchSource { key, kid, issuer, id })
}

async fn remove_source(admin: &mut castellan::client::Conn, token: &str, source: &BenchSource) {
    let _ = admin
        .send(
            Method::DELETE,
            &format!("/api/v1/trust-sources/{}", source.id),
            Some(token),
            None,
        )
        .await;
}

/// Runs the benchmark against a live server.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let mut admin = opts.endpoint.connect().await?;
    let source = register_source(&mut admin, &opts.admin_token, "bench").await?;
    let total = opts.requests + opts.warmup;
    eprintln!("generating {total} tokens and CSRs…");
    let bodies = Arc::new(calls(generate_bodies(
        &source.key,
        &source.kid,
        &source.issuer,
        total,
        opts.tokens.unwrap_or(total).max(1),
    )?));
    let path = "/api/v1/workloads/attested-issuance";
    let warm = opts.concurrency.min(opts.warmup.max(1));
    drop(run_paced(&opts.endpoint, path, bodies.clone(), 0, opts.warmup, warm, None).await?);
    let probe = cpu::Probe::new(opts.endpoint.authority(), opts.server_pid);
    let cpu_start = probe.start();
    let started = Instant::now();
    let (mut latencies, statuses) = run_paced(
        &opts.endpoint,
        path,
        bodies,
        opts.warmup,
        total,
        opts.concurrency,
        None,
    )
    .await?;
    let elapsed = started.elapsed();
    let server_cpu = probe.since(cpu_start);
    remove_source(&mut admin, &opts.admin_token, &source).await;
    latencies.sort();
    Ok(Report {
        server_cpu,
        ..summarise(opts.requests, latencies, &statuses, elapsed)
    })
}

fn generate_bodies(
    key: &KeyPair,
    kid: &str,
    issuer: &str,
    n: usize,
    distinct_tokens: usize,
) -> anyhow::Result<Vec<Bytes>> {
    let mut out = Vec::with_capacity(n);
    let mut tokens = Vec::with_capacity(distinct_tokens.min(n));
    for i in 0..n {
        if tokens.len() < distinct_tokens {
            tokens.push(mint_projected_token(
                key,
                kid,
                issuer,
                "castellan-bench",
                "bench",
                &format!("load-{}", i % 64),
                None,
                3600,
            )?);
        }
        let token = tokens[i % distinct_tokens].clone();
        let csr_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&csr_key)?
            .pem()?;
        let body = json!({ "method": "k8s_sat", "evidence": token, "csr": csr, "ttl_seconds": 600 });
        out.push(Bytes::from(body.to_string()));
    }
    Ok(out)
}

/// What `bench approvals` measured.
#[derive(Debug)]
pub struct ApprovalReport {
    pub requests: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
    /// The server's CPU over the whole flows (create, two votes, the poll).
    pub server_cpu: Option<cpu::ServerCpu>,
}

/// Measures the time from the final approval being sent to a requester that
/// long-polls holding its certificate. Uses the default policy's shape (two
/// approvers in `sre`); creates its own tokens with the admin token.
pub async fn run_approvals(
    endpoint: Endpoint,
    vote_endpoint: Endpoint,
    admin_token: &str,
    requests: usize,
    server_pid: Option<u32>,
) -> anyhow::Result<ApprovalReport> {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut admin = endpoint.connect().await?;
    let mut token = async |name: String, role: &str| -> anyhow::Result<String> {
        let body = json!({ "name": name, "role": role, "groups": ["sre"] });
        let (status, resp) = admin
            .send(
                Method::POST,
                "/api/v1/tokens",
                Some(admin_token),
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        anyhow::ensure!(
            status == StatusCode::CREATED,
            "creating a bench token: {status} {}",
            String::from_utf8_lossy(&resp)
        );
        Ok(serde_json::from_slice::<serde_json::Value>(&resp)?["token"]
            .as_str()
            .unwrap_or_default()
            .to_owned())
    };
    let requester = token(format!("bench-req-{tag}"), "requester").await?;
    let first = token(format!("bench-a1-{tag}"), "approver").await?;
    let last = token(format!("bench-a2-{tag}"), "approver").await?;

    let mut req_conn = endpoint.connect().await?;
    let mut vote_conn = vote_endpoint.connect().await?;
    // Votes may go to another gateway sharing the store: wait until the
    // approvers' tokens have reached it.
    let mut known = false;
    for _ in 0..50 {
        let (status, _) = vote_conn
            .send(Method::GET, "/api/v1/ephemeral", Some(&last), None)
            .await?;
        if status != StatusCode::UNAUTHORIZED {
            known = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::ensure!(
        known,
        "the voting gateway does not know the bench's tokens after 5 s"
    );
    let mut latencies = Vec::with_capacity(requests);
    let probe = cpu::Probe::new(endpoint.authority(), server_pid);
    let cpu_start = probe.start();
    for _ in 0..requests {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        let body = json!({ "csr": csr, "ttl_seconds": 600, "justification": "bench" });
        let (status, resp) = req_conn
            .send(
                Method::POST,
                "/api/v1/ephemeral",
                Some(&requester),
                Some(Bytes::from(body.to_string())),
            )
            .await?;
        anyhow::ensure!(
            status == StatusCode::ACCEPTED,
            "creating a request: {status} {}",
            String::from_utf8_lossy(&resp)
        );
        let created: serde_json::Value = serde_json::from_slice(&resp)?;
        let id = created["request_id"].as_str().unwrap_or_default().to_owned();
        let vote = json!({ "decision": "approve", "binding": created["binding"] }).to_string();
        let path = format!("/api/v1/ephemeral/{id}/approvals");
        let (status, _) = vote_conn
            .send(Method::POST, &path, Some(&first), Some(Bytes::from(vote.clone())))
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "first approval: {status}");

        // The requester long-polls on its own connection.
        let mut poll_conn = endpoint.connect().await?;
        let poll_path = format!("/api/v1/ephemeral/{id}?wait=30");
        let poll = tokio::spawn(async move {
            let r = poll_conn.send(Method::GET, &poll_path, None, None).await;
            (r, Instant::now())
        });
        // Let the poll reach the server and park before the final vote.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        let (status, _) = vote_conn
            .send(Method::POST, &path, Some(&last), Some(Bytes::from(vote)))
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "final approval: {status}");
        let (result, done) = poll.await?;
        let (_, body) = result?;
        let polled: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(
            polled["state"] == "issued" && polled["certificate_pem"].is_string(),
            "the long-poll returned without the certificate"
        );
        latencies.push(done.saturating_duration_since(sent));
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(ApprovalReport {
        requests,
        p50: pct(0.5),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        server_cpu: probe.since(cpu_start),
    })
}

/// Options of `bench broker`.
pub struct BrokerOptions {
    pub endpoint: Endpoint,
    pub admin_token: String,
    pub concurrency: usize,
    pub requests: usize,
    /// Open-loop rate in requests/s; `None` runs flat out (closed loop).
    pub rate: Option<f64>,
    pub server_pid: Option<u32>,
    /// One token per agent, presented every time, instead of a new one per request.
    pub reuse_tokens: bool,
}

/// Agent identities with a one-hop delegation chain: a parent agent's
/// JWT-SVID delegates to each child. Registers its own trust source; the
/// default policy (namespace `agents`, agent id = service account) applies.
pub async fn run_broker(opts: BrokerOptions) -> anyhow::Result<Report> {
    let mut admin = opts.endpoint.connect().await?;
    let source = register_source(&mut admin, &opts.admin_token, "bench-broker").await?;
    let (key, kid, issuer) = (&source.key, &source.kid, &source.issuer);

    // Delegating with a parent's token proves the parent's key (a DPoP
    // proof per request, made ahead) and needs this Castellan, as discovery
    // names it, in the parent's audience.
    let path = "/api/v1/broker/agent-identities";
    let (_, discovery) = admin
        .send(Method::GET, "/.well-known/openid-configuration", None, None)
        .await?;
    let castellan = serde_json::from_slice::<serde_json::Value>(&discovery)?["issuer"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let parent_key = AgentKey::new()?;
    let child_key = AgentKey::new()?;

    // The parent agent, once.
    let token =
        |sa: &str| mint_projected_token(key, kid, issuer, "castellan-bench", "agents", sa, None, 3600);
    let parent_body = json!({
        "agent_id": "bench-parent", "method": "k8s_sat", "evidence": token("bench-parent")?,
        "scopes": ["tickets:read", "docs:read"], "audience": ["https://tools.bench", castellan],
        "public_key_jwk": parent_key.jwk,
    });
    let (status, resp) = admin
        .send(
            Method::POST,
            path,
            None,
            Some(Bytes::from(parent_body.to_string())),
        )
        .await?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "the parent agent: {status} {}",
        String::from_utf8_lossy(&resp)
    );
    let parent_jwt = serde_json::from_slice::<serde_json::Value>(&resp)?["jwt_svid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();

    let total = opts.requests + 200;
    eprintln!("generating {total} agent requests…");
    let url = format!("{castellan}{path}");
    let mut bodies = Vec::with_capacity(total);
    // With `reuse_tokens`, each of the 64 agents presents one token, as pods
    // present their projected token many times.
    let mut minted: HashMap<String, String> = HashMap::new();
    for i in 0..total {
        let sa = format!("bench-child-{}", i % 64);
        let evidence = match minted.get(&sa) {
            Some(t) if opts.reuse_tokens => t.clone(),
            _ => {
                let t = token(&sa)?;
                minted.insert(sa.clone(), t.clone());
                t
            }
        };
        let b = json!({
            "agent_id": sa, "method": "k8s_sat", "evidence": evidence,
            "scopes": ["tickets:read"], "audience": ["https://tools.bench"],
            "public_key_jwk": child_key.jwk,
            "delegation": {"subject_token": parent_jwt},
        });
        bodies.push(Call {
            body: Bytes::from(b.to_string()),
            dpop: Some(parent_key.proof(&url, &parent_jwt)?),
        });
    }
    let bodies = Arc::new(bodies);
    drop(
        run_paced(
            &opts.endpoint,
            path,
            bodies.clone(),
            0,
            200,
            opts.concurrency.min(8),
            None,
        )
        .await?,
    );
    let probe = cpu::Probe::new(opts.endpoint.authority(), opts.server_pid);
    let cpu_start = probe.start();
    let started = Instant::now();
    let (mut latencies, statuses) = run_paced(
        &opts.endpoint,
        path,
        bodies,
        200,
        total,
        opts.concurrency,
        opts.rate,
    )
    .await?;
    let elapsed = started.elapsed();
    let server_cpu = probe.since(cpu_start);
    remove_source(&mut admin, &opts.admin_token, &source).await;
    latencies.sort();
    Ok(Report {
        server_cpu,
        ..summarise(opts.requests, latencies, &statuses, elapsed)
    })
}

fn summarise(requests: usize, latencies: Vec<Duration>, statuses: &[u16], elapsed: Duration) -> Report {
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let issued = statuses.iter().filter(|s| **s == 201).count();
    let mut refused: Vec<(u16, usize)> = Vec::new();
    for s in statuses.iter().filter(|s| **s != 201) {
        match refused.iter_mut().find(|(c, _)| c == s) {
            Some((_, n)) => *n += 1,
            None => refused.push((*s, 1)),
        }
    }
    Report {
        requests,
        issued,
        refused,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        server_cpu: None,
    }
}

/// One request of a run: its body and, for agents delegating with a
/// parent's token, the DPoP proof of the parent's key.
pub(crate) struct Call {
    pub body: Bytes,
    pub dpop: Option<String>,
}

/// Calls with bodies only.
pub(crate) fn calls(bodies: Vec<Bytes>) -> Vec<Call> {
    bodies.into_iter().map(|body| Call { body, dpop: None }).collect()
}

/// A P-256 key an agent holds, and the DPoP proofs (RFC 9449) it signs.
struct AgentKey {
    signing: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
}

impl AgentKey {
    fn new() -> anyhow::Result<Self> {
        use base64::Engine as _;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let raw = key.public_key_raw();
        let jwk = json!({"kty": "EC", "crv": "P-256", "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())?;
        Ok(Self { signing, jwk })
    }

    /// A proof for `POST url` accompanying `token`.
    fn proof(&self, url: &str, token: &str) -> anyhow::Result<String> {
        use base64::Engine as _;
        use sha2::Digest as _;
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk = Some(serde_json::from_value(self.jwk.clone())?);
        let ath =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()));
        let claims = json!({"jti": uuid::Uuid::new_v4().to_string(), "htm": "POST", "htu": url,
            "iat": castellan::util::now_unix(), "ath": ath});
        Ok(jsonwebtoken::encode(&header, &claims, &self.signing)?)
    }
}

/// Sends `bodies[start..end]`; with a rate, request i is due at
/// `t0 + (i - start) / rate` and its latency counts from then, so a server
/// that falls behind is charged for the queueing it causes.
async fn run_paced(
    endpoint: &Endpoint,
    path: &'static str,
    bodies: Arc<Vec<Call>>,
    start: usize,
    end: usize,
    concurrency: usize,
    rate: Option<f64>,
) -> anyhow::Result<(Vec<Duration>, Vec<u16>)> {
    let next = Arc::new(AtomicUsize::new(start));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (endpoint, bodies, next) = (endpoint.clone(), bodies.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = endpoint.connect().await?;
            let (mut lat, mut st) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end {
                    break;
                }
                let due = match rate {
                    Some(r) => t0 + Duration::from_secs_f64((i - start) as f64 / r),
                    None => Instant::now(),
                };
                tokio::time::sleep_until(due.into()).await;
                let call = &bodies[i];
                let headers: Vec<(&str, String)> = call.dpop.iter().map(|p| ("dpop", p.clone())).collect();
                let (status, _) = conn
                    .send_with(Method::POST, path, None, &headers, Some(call.body.clone()))
                    .await
                    .context("request failed")?;
                lat.push(due.elapsed());
                st.push(status.as_u16());
            }
            anyhow::Ok((lat, st))
        }));
    }
    let (mut latencies, mut statuses) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, s) = t.await??;
        latencies.extend(l);
        statuses.extend(s);
    }
    Ok((latencies, statuses))
}
