//! `castellan bench flood`: a legitimate client's attested issuances (and
//! challenges), measured alone and then during each flood of the outside
//! review: challenge requests, half-sent requests, and refused requests
//! each with a new `Idempotency-Key`. The attackers connect from one
//! loopback address, the legitimate client from another, as two hosts would.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::Method;
use tokio::io::AsyncWriteExt;

use castellan::client::Endpoint;

/// How to run it.
pub struct FloodOptions {
    pub endpoint: Endpoint,
    pub admin_token: String,
    /// Seconds each phase lasts.
    pub seconds: u64,
    /// Attacking tasks.
    pub attackers: usize,
    /// The attackers' local address, and the legitimate client's.
    pub attacker_ip: IpAddr,
    pub client_ip: IpAddr,
}

/// What the legitimate client saw in one phase.
#[derive(Debug)]
pub struct Phase {
    pub name: &'static str,
    pub attacks: usize,
    pub issued: usize,
    pub failed: usize,
    pub challenges_ok: usize,
    pub challenges_failed: usize,
    pub p50: Duration,
    pub p99: Duration,
}

/// The flood kinds, after a baseline without one.
#[derive(Clone, Copy, PartialEq)]
enum Flood {
    None,
    Challenges,
    SlowHeaders,
    Refusals,
}

impl Flood {
    fn name(self) -> &'static str {
        match self {
            Flood::None => "baseline (no flood)",
            Flood::Challenges => "challenge flood",
            Flood::SlowHeaders => "half-sent requests",
            Flood::Refusals => "refusals with new idempotency keys",
        }
    }
}

pub async fn run_flood(opts: FloodOptions) -> anyhow::Result<Vec<Phase>> {
    let mut admin = opts.endpoint.connect().await?;
    let source = super::register_source(&mut admin, &opts.admin_token, "bench-flood").await?;
    let per_phase = 4000;
    eprintln!("generating {} tokens and CSRs…", per_phase * 4);
    let bodies = super::generate_bodies(
        &source.key,
        &source.kid,
        &source.issuer,
        per_phase * 4,
        per_phase * 4,
    )?;
    let mut phases = Vec::new();
    for (i, flood) in [
        Flood::None,
        Flood::Challenges,
        Flood::SlowHeaders,
        Flood::Refusals,
    ]
    .into_iter()
    .enumerate()
    {
        let slice = bodies[i * per_phase..(i + 1) * per_phase].to_vec();
        phases.push(phase(&opts, flood, slice).await?);
        // Let half-sent connections time out and challenges expire from view.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    super::remove_source(&mut admin, &opts.admin_token, &source).await;
    Ok(phases)
}

async fn phase(opts: &FloodOptions, flood: Flood, bodies: Vec<Bytes>) -> anyhow::Result<Phase> {
    let stop = Arc::new(AtomicBool::new(false));
    let attacks = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    if flood != Flood::None {
        for _ in 0..opts.attackers {
            let (endpoint, stop, attacks, ip) = (
                opts.endpoint.clone(),
                stop.clone(),
                attacks.clone(),
                opts.attacker_ip,
            );
            attackers.push(tokio::spawn(async move {
                attack(flood, endpoint, ip, stop, attacks).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The legitimate client: 4 workers issuing; every 100th issuance it also
    // asks for a challenge (it never answers them, so it must stay well
    // within its own per-client share).
    let deadline = Instant::now() + Duration::from_secs(opts.seconds);
    let next = Arc::new(AtomicUsize::new(0));
    let bodies = Arc::new(bodies);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (endpoint, next, bodies, ip) = (
            opts.endpoint.clone(),
            next.clone(),
            bodies.clone(),
            opts.client_ip,
        );
        workers.push(tokio::spawn(async move {
            let (mut lat, mut issued, mut failed, mut ch_ok, mut ch_failed) = (Vec::new(), 0, 0, 0, 0);
            let mut conn = endpoint.connect_from(Some(ip)).await.ok();
            while Instant::now() < deadline {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = bodies.get(i) else { break };
                if conn.is_none() {
                    conn = endpoint.connect_from(Some(ip)).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    failed += 1;
                    continue;
                };
                let started = Instant::now();
                match c
                    .send(
                        Method::POST,
                        "/api/v1/workloads/attested-issuance",
                        None,
                        Some(body.clone()),
                    )
                    .await
                {
                    Ok((s, _)) if s.as_u16() == 201 => {
                        issued += 1;
                        lat.push(started.elapsed());
                    }
                    Ok(_) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        conn = None;
                        continue;
                    }
                }
                if i % 100 != 0 {
                    continue;
                }
                let ask = Bytes::from_static(br#"{"method": "x509pop"}"#);
                match c
                    .send(Method::POST, "/api/v1/attestation/challenges", None, Some(ask))
                    .await
                {
                    Ok((s, _)) if s.as_u16() == 201 => ch_ok += 1,
                    Ok(_) => ch_failed += 1,
                    Err(_) => {
                        ch_failed += 1;
                        conn = None;
                    }
                }
            }
            (lat, issued, failed, ch_ok, ch_failed)
        }));
    }
    let (mut lat, mut issued, mut failed, mut ch_ok, mut ch_failed) = (Vec::new(), 0, 0, 0, 0);
    for w in workers {
        let (l, i, f, co, cf) = w.await?;
        lat.extend(l);
        issued += i;
        failed += f;
        ch_ok += co;
        ch_failed += cf;
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok(Phase {
        name: flood.name(),
        attacks: attacks.load(Ordering::Relaxed),
        issued,
        failed,
        challenges_ok: ch_ok,
        challenges_failed: ch_failed,
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

/// One attacker, until told to stop.
async fn attack(
    flood: Flood,
    endpoint: Endpoint,
    ip: IpAddr,
    stop: Arc<AtomicBool>,
    attacks: Arc<AtomicUsize>,
) {
    match flood {
        Flood::None => {}
        Flood::SlowHeaders => {
            // Connections that send half a request, reopened when closed.
            let addr = endpoint.authority().to_owned();
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                held.retain(|s: &tokio::net::TcpStream| s.peer_addr().is_ok());
                if held.len() < 8
                    && let Ok(socket) = tokio::net::TcpSocket::new_v4()
                    && socket.bind((ip, 0).into()).is_ok()
                    && let Ok(remote) = addr.parse::<std::net::SocketAddr>()
                    && let Ok(mut s) = socket.connect(remote).await
                {
                    let _ = s
                        .write_all(b"POST /api/v1/ephemeral HTTP/1.1\r\nHost: x\r\n")
                        .await;
                    attacks.fetch_add(1, Ordering::Relaxed);
                    held.push(s);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Flood::Challenges | Flood::Refusals => {
            let mut conn = None;
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                if conn.is_none() {
                    conn = endpoint.connect_from(Some(ip)).await.ok();
                }
                let Some(c) = conn.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                n += 1;
                let sent = if flood == Flood::Challenges {
                    let ask = Bytes::from_static(br#"{"method": "x509pop"}"#);
                    c.send(Method::POST, "/api/v1/attestation/challenges", None, Some(ask))
                        .await
                } else {
                    let garbage =
                        Bytes::from_static(br#"{"method": "k8s_sat", "evidence": "x.y.z", "csr": "-"}"#);
                    let key = format!("flood-{}-{n}", uuid::Uuid::new_v4());
                    c.send_with(
                        Method::POST,
                        "/api/v1/workloads/attested-issuance",
                        None,
                        &[("idempotency-key", key)],
                        Some(garbage),
                    )
                    .await
                };
                attacks.fetch_add(1, Ordering::Relaxed);
                if sent.is_err() {
                    conn = None;
                }
            }
        }
    }
}
