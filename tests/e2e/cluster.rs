//! Issue 15: several `castellan serve` gateways on one PostgreSQL database
//! keep every guarantee one gateway keeps. Each test starts three real
//! gateways (separate processes and data directories, sharing the CA and
//! the bootstrap admin token as a deployment shares a secret volume) on a
//! fresh database of the throwaway cluster.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Cluster, Resp, Server, csr, eventually, issuance_body, postgres_url};

const EPHEMERAL: &str = "/api/v1/ephemeral";
const ISSUE: &str = "/api/v1/workloads/attested-issuance";
const BROKER: &str = "/api/v1/broker/agent-identities";
/// What every gateway calls itself (behind one load balancer).
const PUBLIC_URL: &str = "https://castellan.test";

/// One cluster at a time: the timing guarantees (two seconds) are the
/// gateways', not a contest for two cores between clusters.
static ONE_CLUSTER: Mutex<()> = Mutex::new(());

struct Gateways {
    nodes: Vec<Server>,
    _one_at_a_time: std::sync::MutexGuard<'static, ()>,
    url: String,
    _tmp: tempfile::TempDir,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Starts `n` gateways on one fresh database; `extra` is appended to every
/// gateway's configuration (files it names live beside it, in `files`).
fn gateways(n: usize, extra: &str, files: &[(&str, String)]) -> Gateways {
    let one_at_a_time = ONE_CLUSTER.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let url = postgres_url();
    let mut configs = Vec::new();
    for i in 0..n {
        let dir = tmp.path().join(format!("g{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let config = dir.join("castellan.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = \"data\"\npublic_url = \"{PUBLIC_URL}\"\n\
                 [http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\
                 [store]\nbackend = \"postgres\"\nurl = \"{url}\"\nmax_connections = 8\n{extra}\n"
            ),
        )
        .unwrap();
        configs.push(config);
    }
    let data = |i: usize| tmp.path().join(format!("g{i}")).join("data");
    let mut nodes = vec![Server::serve(&configs[0], &data(0))];
    for (i, config) in configs.iter().enumerate().skip(1) {
        std::fs::create_dir_all(data(i)).unwrap();
        if data(0).join("ca").exists() {
            copy_dir(&data(0).join("ca"), &data(i).join("ca"));
        }
        std::fs::copy(data(0).join("admin.token"), data(i).join("admin.token")).unwrap();
        nodes.push(Server::serve(config, &data(i)));
    }
    Gateways {
        nodes,
        _one_at_a_time: one_at_a_time,
        url,
        _tmp: tmp,
    }
}

impl Gateways {
    /// An API token made through the first gateway, once every gateway
    /// accepts it.
    fn token(&self, name: &str, role: &str, groups: &[&str]) -> String {
        let token = self.nodes[0].token(name, role, groups);
        for node in &self.nodes {
            assert!(
                eventually(Duration::from_secs(2), || {
                    node.get(EPHEMERAL, Some(&token)).status != 401
                }),
                "token `{name}` reached every gateway within 2 s"
            );
        }
        token
    }

    fn database(&self) -> postgres::Client {
        self.url
            .parse::<postgres::Config>()
            .unwrap()
            .connect(postgres::NoTls)
            .unwrap()
    }
}

fn request_body(csr: &str, justification: &str) -> Value {
    json!({ "csr": csr, "ttl_seconds": 600, "justification": justification, "ticket": "INC-15" })
}

fn vote(server: &Server, token: &str, id: &str, binding: &str) -> Resp {
    server.post(
        &format!("{EPHEMERAL}/{id}/approvals"),
        &json!({ "decision": "approve", "reason": "ok", "binding": binding }),
        Some(token),
    )
}

/// The votes that complete a quorum land on different gateways at the same
/// moment: 20 approvers over three gateways, five times over, and each
/// request yields exactly one certificate.
#[test]
fn racing_votes_across_gateways_issue_exactly_one_certificate() {
    let g = gateways(3, "", &[]);
    let alice = g.token("alice", "requester", &[]);
    let approvers: Vec<String> = (0..20)
        .map(|i| g.nodes[0].token(&format!("racer{i}"), "approver", &["sre"]))
        .collect();
    // Every approver token is known everywhere before the race.
    for t in &approvers {
        for node in &g.nodes {
            assert!(eventually(Duration::from_secs(2), || node
                .get(EPHEMERAL, Some(t))
                .status
                != 401));
        }
    }
    for round in 0..5 {
        let (_, c) = csr();
        let r = g.nodes[round % 3].post(EPHEMERAL, &request_body(&c, "race"), Some(&alice));
        assert_eq!(r.status, 202, "{}", r.body);
        let (id, binding) = (
            r.body["request_id"].as_str().unwrap().to_owned(),
            r.body["binding"].as_str().unwrap().to_owned(),
        );
        let barrier = Arc::new(Barrier::new(approvers.len()));
        let statuses: Vec<u16> = std::thread::scope(|s| {
            let handles: Vec<_> = approvers
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let (node, id, binding, barrier) = (&g.nodes[i % 3], &id, &binding, barrier.clone());
                    s.spawn(move || {
                        barrier.wait();
                        vote(node, t, id, binding).status
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(statuses.iter().all(|s| *s == 200 || *s == 409), "{statuses:?}");
        for node in &g.nodes {
            assert_eq!(
                node.get(&format!("{EPHEMERAL}/{id}"), None).body["state"],
                "issued"
            );
        }
        let issued = g.nodes[1]
            .audit()
            .iter()
            .filter(|e| e["kind"] == "ephemeral.issued" && e["detail"]["request_id"] == id.as_str())
            .count();
        assert_eq!(issued, 1, "round {round}: exactly one issuance");
    }
    let certs = g.nodes[2]
        .certificates()
        .into_iter()
        .filter(|c| c["source"] == "ephemeral")
        .count();
    assert_eq!(certs, 5, "one certificate per request");
}

/// Single-use evidence spent at one gateway is refused at another, and a
/// challenge issued by one gateway is answered at another, once.
#[test]
fn single_use_evidence_and_challenges_hold_across_gateways() {
    let g = gateways(3, "", &[]);
    let join = g.nodes[0].post_admin(
        "/api/v1/join-tokens",
        &json!({"name": "db-7", "ttl_seconds": 600}),
    );
    assert_eq!(join.status, 201, "{}", join.body);
    let token = join.body["token"].as_str().unwrap();
    let issue = |node: &Server, method: &str, evidence: &str| {
        let (_, c) = csr();
        node.post(
            ISSUE,
            &json!({ "method": method, "evidence": evidence, "csr": c }),
            None,
        )
    };
    let r = issue(&g.nodes[1], "join_token", token);
    assert_eq!(r.status, 201, "{}", r.body);
    let again = issue(&g.nodes[2], "join_token", token);
    again.assert_problem(403, "attestation-failed");
    assert!(
        again.body["detail"].as_str().unwrap().contains("already used"),
        "{}",
        again.body
    );

    // A challenge from gateway 0, answered at gateway 2.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&key).unwrap();
    let r = g.nodes[0].post_admin(
        "/api/v1/trust-sources",
        &json!({"name": "hosts", "method": "x509pop", "certificates": ca.pem()}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    for node in &g.nodes {
        assert!(eventually(Duration::from_secs(2), || node
            .get_admin("/api/v1/trust-sources")
            .body["items"]
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "hosts"))));
    }
    // A host certificate under that CA, and the key the host wants certified.
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &key).unwrap();
    let host_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut host = rcgen::CertificateParams::new(vec!["edge-1.hosts.example".to_owned()]).unwrap();
    host.distinguished_name.push(rcgen::DnType::CommonName, "edge-1");
    host.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let host = host.signed_by(&host_key, &issuer).unwrap();
    let csr_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .unwrap()
        .serialize_request(&csr_key)
        .unwrap()
        .pem()
        .unwrap();
    let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let ch = g.nodes[0].post(
        "/api/v1/attestation/challenges",
        &json!({"method": "x509pop"}),
        None,
    );
    assert_eq!(ch.status, 201, "{}", ch.body);
    let key_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        rcgen::PublicKeyData::subject_public_key_info(&csr_key),
    ));
    let message = format!(
        "castellan-x509pop-v1\n{}\n{key_sha}\n",
        ch.body["nonce"].as_str().unwrap()
    );
    let signature = rcgen::SigningKey::sign(&host_key, message.as_bytes()).unwrap();
    let evidence = json!({
        "challenge_id": ch.body["challenge_id"], "certificates": [b64(host.der())],
        "algorithm": "ecdsa-p256-sha256", "signature": b64(&signature),
    })
    .to_string();
    let answer = |node: &Server| {
        node.post(
            ISSUE,
            &json!({ "method": "x509pop", "evidence": evidence, "csr": csr }),
            None,
        )
    };
    // Answered at gateway 2, which did not issue it; then taken everywhere.
    let r = answer(&g.nodes[2]);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/x509pop/edge-1");
    for node in &g.nodes {
        let again = answer(node);
        again.assert_problem(403, "attestation-failed");
        assert!(
            again.body["detail"]
                .as_str()
                .unwrap()
                .contains("unknown, used or expired challenge"),
            "{}",
            again.body
        );
    }
}

/// Changes made through one gateway take effect on the others within two
/// seconds: trust sources, API tokens (and their revocation), entries.
#[test]
fn changes_through_one_gateway_reach_every_gateway() {
    let g = gateways(3, "", &[]);
    let cluster = Cluster::new("https://k8s.cluster.example");
    g.nodes[0].add_trust_source("shared", &cluster);
    let issued_at = |node: &Server| {
        let (_, c) = csr();
        node.post(ISSUE, &issuance_body(&cluster.token("a", "b"), &c, None), None)
            .status
    };
    for node in &g.nodes[1..] {
        assert!(
            eventually(Duration::from_secs(2), || issued_at(node) == 201),
            "the trust source reached {}",
            node.base
        );
    }

    // A name taken through one gateway is taken on all: the same token
    // name asked of three gateways at once is granted once.
    let barrier = Arc::new(Barrier::new(3));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = g
            .nodes
            .iter()
            .map(|node| {
                let barrier = barrier.clone();
                s.spawn(move || {
                    barrier.wait();
                    node.post_admin("/api/v1/tokens", &json!({ "name": "carol", "role": "requester" }))
                        .status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 201 || *s == 409), "{statuses:?}");

    let bob = g.token("bob", "requester", &[]);
    let listed = g.nodes[0].get_admin("/api/v1/tokens");
    let bob_id = listed.body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "bob")
        .and_then(|t| t["id"].as_str())
        .unwrap()
        .to_owned();
    let r = g.nodes[1].delete_admin(&format!("/api/v1/tokens/{bob_id}"));
    assert!(r.status < 300, "{}", r.body);
    for node in &g.nodes {
        assert!(
            eventually(Duration::from_secs(2), || node.get(EPHEMERAL, Some(&bob)).status
                == 401),
            "the revoked token stopped at {}",
            node.base
        );
    }

    let entry = g.nodes[2].post_admin(
        "/api/v1/entries",
        &json!({ "spiffe_id": "spiffe://example.org/web", "selectors": ["unix:uid:12345"] }),
    );
    assert_eq!(entry.status, 201, "{}", entry.body);
    let id = entry.body["id"].as_str().unwrap().to_owned();
    for node in &g.nodes {
        assert!(
            eventually(Duration::from_secs(2), || node.get_admin("/api/v1/entries").body
                ["items"]
                .as_array()
                .is_some_and(|a| a.iter().any(|e| e["id"] == id.as_str()))),
            "the entry reached {}",
            node.base
        );
    }
}

/// The same `Idempotency-Key` on two gateways replays the first answer;
/// sent to all three at once, it creates one request.
#[test]
fn idempotency_keys_and_the_audit_chain_hold_across_gateways() {
    let g = gateways(3, "", &[]);
    let alice = g.token("alice", "requester", &[]);
    let (_, c) = csr();
    let body = request_body(&c, "once");
    let first = g.nodes[0].post_with(EPHEMERAL, &body, Some(&alice), &[("idempotency-key", "k-1")]);
    assert_eq!(first.status, 202, "{}", first.body);
    let replay = g.nodes[1].post_with(EPHEMERAL, &body, Some(&alice), &[("idempotency-key", "k-1")]);
    assert_eq!(replay.status, 202, "{}", replay.body);
    assert_eq!(replay.body["request_id"], first.body["request_id"]);
    g.nodes[2]
        .post_with(
            EPHEMERAL,
            &request_body(&c, "other"),
            Some(&alice),
            &[("idempotency-key", "k-1")],
        )
        .assert_problem(422, "idempotency-key-reused");

    let (_, c) = csr();
    let body = request_body(&c, "racing");
    let barrier = Arc::new(Barrier::new(9));
    let answers: Vec<Resp> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..9)
            .map(|i| {
                let (node, body, alice, barrier) = (&g.nodes[i % 3], &body, &alice, barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    node.post_with(EPHEMERAL, body, Some(alice), &[("idempotency-key", "k-2")])
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .filter(|r| r.status == 202)
        .map(|r| r.body["request_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        ids.len(),
        1,
        "one request: {:?}",
        answers.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in answers.iter().filter(|r| r.status != 202) {
        r.assert_problem(409, "idempotency-key-in-flight");
    }
    let pending = g.nodes[0].get(&format!("{EPHEMERAL}?state=pending"), Some(&alice));
    assert_eq!(
        pending.body["items"].as_array().unwrap().len(),
        2,
        "{}",
        pending.body
    );

    // Every gateway wrote to one audit chain, and it verifies.
    let audited = g.nodes[0].audit().len() as u64;
    for node in &g.nodes {
        let v = node.get_admin("/api/v1/audit/verify");
        assert_eq!(v.status, 200, "{}", v.body);
        assert!(v.body["verified"].as_u64().unwrap() >= audited, "{}", v.body);
    }
}

/// A local webhook receiver answering 200: the deliveries' ids.
fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut line, mut len, mut delivery) = (String::new(), 0, String::new());
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    match k.to_ascii_lowercase().as_str() {
                        "content-length" => len = v.trim().parse().unwrap(),
                        "x-castellan-delivery" => delivery = v.trim().to_owned(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            seen.lock().unwrap().push(delivery);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (url, got)
}

/// Housekeeping runs once: with the same webhook on every gateway, each
/// notification is delivered once, not once per gateway.
#[test]
fn webhooks_are_delivered_once_not_once_per_gateway() {
    let (url, got) = receiver();
    let secret = ("hook.secret", "whsec-0123456789abcdef".to_owned());
    let g = gateways(
        3,
        &format!("[[webhooks]]\nname = \"ops\"\nurl = \"{url}\"\nsecret_file = \"hook.secret\"\n"),
        &[secret],
    );
    let alice = g.token("alice", "requester", &[]);
    for (i, node) in g.nodes.iter().enumerate() {
        let (_, c) = csr();
        let r = node.post(EPHEMERAL, &request_body(&c, &format!("hook {i}")), Some(&alice));
        assert_eq!(r.status, 202, "{}", r.body);
    }
    assert!(
        eventually(Duration::from_secs(10), || got.lock().unwrap().len() >= 3),
        "three deliveries"
    );
    // Long enough for every gateway's dispatcher to have passed several times.
    std::thread::sleep(Duration::from_secs(3));
    let got = got.lock().unwrap();
    let distinct: std::collections::BTreeSet<&String> = got.iter().collect();
    assert_eq!(got.len(), 3, "each delivered once: {got:?}");
    assert_eq!(distinct.len(), 3);
}

/// `kill -9` of a gateway under load loses no credential it acknowledged;
/// while the database is unreachable every gateway answers 503 and issues
/// nothing, and they recover by themselves when it returns.
#[test]
fn a_killed_gateway_loses_nothing_and_an_outage_fails_closed() {
    let g = gateways(2, "", &[]);
    let cluster = Cluster::new("https://k8s.load.example");
    g.nodes[0].add_trust_source("load", &cluster);
    let token = cluster.token("a", "b");
    assert!(eventually(Duration::from_secs(2), || {
        let (_, c) = csr();
        g.nodes[1]
            .post(ISSUE, &issuance_body(&token, &c, None), None)
            .status
            == 201
    }));
    let acknowledged = Mutex::new(Vec::<String>::new());
    let stop_at = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|s| {
        for i in 0..4 {
            let (node, token, acknowledged) = (&g.nodes[i % 2], &token, &acknowledged);
            s.spawn(move || {
                while Instant::now() < stop_at {
                    let (_, c) = csr();
                    let body = issuance_body(token, &c, None).to_string();
                    let Some(r) = node.try_post(ISSUE, body.as_bytes(), None) else {
                        assert_eq!(i % 2, 0, "the surviving gateway stopped answering");
                        break;
                    };
                    if r.status == 201 {
                        acknowledged
                            .lock()
                            .unwrap()
                            .push(r.body["serial"].as_str().unwrap().to_owned());
                    } else if i % 2 == 1 && r.status != 503 {
                        panic!("the surviving gateway refused: {} {}", r.status, r.body);
                    }
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        g.nodes[0].kill9();
    });
    let acknowledged = acknowledged.into_inner().unwrap();
    assert!(acknowledged.len() > 10, "load ran: {}", acknowledged.len());
    let mut kept = std::collections::BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/api/v1/certificates?limit=500&cursor={c}"),
            None => "/api/v1/certificates?limit=500".into(),
        };
        let page = g.nodes[1].get_admin(&path).body;
        for c in page["items"].as_array().unwrap() {
            kept.insert(c["serial"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    for serial in &acknowledged {
        assert!(
            kept.contains(serial),
            "acknowledged certificate {serial} was lost"
        );
    }

    // The database goes away: connections are cut and refused.
    let survivor = &g.nodes[1];
    let name: String = g
        .database()
        .query_one("SELECT current_database()", &[])
        .unwrap()
        .get(0);
    let mut db = g
        .url
        .parse::<postgres::Config>()
        .unwrap()
        .dbname("postgres")
        .connect(postgres::NoTls)
        .unwrap();
    db.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"))
        .unwrap();
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        &[&name],
    )
    .unwrap();
    let before = acknowledged.len();
    survivor.get("/readyz", None).assert_problem(503, "unavailable");
    for _ in 0..3 {
        let (_, c) = csr();
        let r = survivor.post(ISSUE, &issuance_body(&token, &c, None), None);
        r.assert_problem(503, "unavailable");
        assert!(r.body.get("certificate_pem").is_none());
    }
    db.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .unwrap();
    assert!(
        eventually(Duration::from_secs(10), || {
            let (_, c) = csr();
            survivor
                .post(ISSUE, &issuance_body(&token, &c, None), None)
                .status
                == 201
        }),
        "the gateway recovered by itself"
    );
    // Readiness answers from a check at most a second old.
    assert!(eventually(Duration::from_secs(3), || survivor
        .get("/readyz", None)
        .status
        == 200));
    let ready = survivor.get("/readyz", None);
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.body["status"], "ready");
    assert!(before > 0);
}

/// A revocation made through one gateway is in effect on the others at
/// once: introspection, the revocation feed and delegation checks.
#[test]
fn a_revocation_through_one_gateway_holds_on_every_gateway_at_once() {
    let cluster = Cluster::new("https://k8s.agents.example");
    let g = gateways(
        3,
        &format!(
            "[[trust_sources]]\nname = \"agents-cluster\"\nmethod = \"k8s_sat\"\nissuer = \"{}\"\n\
             audiences = [\"castellan\"]\njwks_file = \"k8s.json\"\n",
            cluster.issuer
        ),
        &[("k8s.json", cluster.jwks().to_string())],
    );
    let key = support::AgentKey::new();
    let ask = |node: &Server, agent: &str, extra: Value, dpop: Option<String>| {
        let mut body = json!({
            "agent_id": agent, "method": "k8s_sat", "evidence": cluster.token("agents", agent),
            "scopes": ["tickets:read"], "audience": ["https://tools.example.com", PUBLIC_URL],
            "public_key_jwk": key.jwk,
        });
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        match dpop {
            Some(p) => node.post_with(BROKER, &body, None, &[("dpop", &p)]),
            None => node.post(BROKER, &body, None),
        }
    };
    let parent = ask(&g.nodes[0], "planner", json!({}), None);
    assert_eq!(parent.status, 201, "{}", parent.body);
    let (jwt, jti) = (
        parent.body["jwt_svid"].as_str().unwrap().to_owned(),
        parent.body["jti"].as_str().unwrap().to_owned(),
    );
    let rs = g.token("tool-server", "requester", &[]);
    let introspect = |node: &Server| {
        node.post_form("/oauth2/introspect", &[("token", &jwt)], Some(&rs))
            .body["active"]
            .clone()
    };
    for node in &g.nodes {
        assert_eq!(introspect(node), true, "live at {}", node.base);
    }
    let rv = g.nodes[1].post_admin("/api/v1/broker/revocations", &json!({ "jti": jti }));
    assert_eq!(rv.status, 200, "{}", rv.body);
    // No waiting: every gateway reads revocations from the database.
    for node in &g.nodes {
        assert_eq!(introspect(node), false, "revoked at {}", node.base);
        let feed = node.get("/api/v1/broker/revocations", None).body;
        assert!(
            feed["items"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["jti"] == jti.as_str()),
            "{feed}"
        );
    }
    let proof = key.proof(&format!("{PUBLIC_URL}{BROKER}"), Some(&jwt));
    let child = ask(
        &g.nodes[2],
        "worker",
        json!({ "delegation": { "subject_token": jwt } }),
        Some(proof),
    );
    assert_eq!(child.status, 403, "{}", child.body);
    assert!(
        child.body["detail"].as_str().unwrap().contains("revoked"),
        "{}",
        child.body
    );
}

/// Entries made through one gateway reach Workload API streams another
/// gateway serves: the stream is re-pushed with the new SVID.
#[tokio::test(flavor = "multi_thread")]
async fn workload_api_streams_on_another_gateway_follow_entry_changes() {
    use futures::StreamExt as _;
    let g = tokio::task::block_in_place(|| gateways(3, "", &[]));
    let selector = format!("unix:uid:{}", support::my_uid());
    let entry = |node: &Server, name: &str| {
        let r = node.post_admin(
            "/api/v1/entries",
            &json!({"spiffe_id": format!("spiffe://example.org/{name}"), "selectors": [selector], "x509_svid_ttl": 3600}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    };
    entry(&g.nodes[0], "first");
    let socket = format!("unix:{}", g.nodes[1].dir.join("workload.sock").display());
    let client = spiffe::WorkloadApiClient::connect_to(socket).await.unwrap();
    let ids = |ctx: &spiffe::X509Context| {
        let mut ids: Vec<String> = ctx.svids().iter().map(|s| s.spiffe_id().to_string()).collect();
        ids.sort();
        ids
    };
    // The entry may take a moment to reach gateway 1: until then, it
    // refuses (no entry), and the client asks again.
    let mut stream = None;
    for _ in 0..40 {
        if let Ok(mut s) = client.stream_x509_contexts().await
            && let Some(Ok(ctx)) = s.next().await
        {
            assert_eq!(ids(&ctx), vec!["spiffe://example.org/first"]);
            stream = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut stream = stream.expect("gateway 1 serves the entry made through gateway 0");
    tokio::task::block_in_place(|| entry(&g.nodes[2], "second"));
    let next = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("re-pushed within 2 s")
        .unwrap()
        .unwrap();
    assert_eq!(
        ids(&next),
        vec!["spiffe://example.org/first", "spiffe://example.org/second"]
    );
}

/// A policy bundle pushed through one gateway is verified, compiled and
/// active on every gateway within two seconds (and decides there), and
/// after a restart.
#[test]
fn a_bundle_pushed_through_one_gateway_is_active_on_every_gateway() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let g = gateways(
        3,
        "[[bundles.keys]]\nkeyid = \"authors\"\npublic_key_file = \"authors.pub\"\n",
        &[("authors.pub", key.public_key_pem())],
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("v2");
    std::fs::create_dir_all(&dir).unwrap();
    let policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
    for e in std::fs::read_dir(&policies).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.join(".manifest"),
        json!({"revision": "cluster-v2", "roots": ["castellan"]}).to_string(),
    )
    .unwrap();
    let mut data: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data.json")).unwrap()).unwrap();
    data["castellan"]["issuance"]["denied_namespaces"] = json!(["kube-system", "payments"]);
    std::fs::write(dir.join("data.json"), data.to_string()).unwrap();
    let out = tmp.path().join("v2.tar.gz");
    let private = tmp.path().join("authors.key");
    std::fs::write(&private, key.serialize_pem()).unwrap();
    for args in [
        vec![
            "bundle",
            "build",
            dir.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        vec![
            "bundle",
            "sign",
            out.to_str().unwrap(),
            "--key",
            private.to_str().unwrap(),
            "--keyid",
            "authors",
        ],
    ] {
        let o = support::castellan().args(&args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let cluster = Cluster::new("https://k8s.bundles.example");
    g.nodes[0].add_trust_source("bundles", &cluster);
    let issue = |node: &Server| {
        let (_, c) = csr();
        node.post(
            ISSUE,
            &issuance_body(&cluster.token("payments", "api"), &c, None),
            None,
        )
    };
    assert!(eventually(Duration::from_secs(2), || issue(&g.nodes[1]).status == 201));

    let r = g.nodes[0].put_admin("/api/v1/bundles/default", std::fs::read(&out).unwrap());
    assert_eq!(r.status, 200, "{}", r.body);
    for node in &g.nodes {
        assert!(
            eventually(Duration::from_secs(2), || {
                node.get("/healthz", None).body["policy_revision"] == "cluster-v2"
            }),
            "active at {}",
            node.base
        );
        issue(node).assert_problem(403, "policy-denied");
    }
    // The pushed bundle is in the store: a gateway restarted is back on it.
    let mut g = g;
    let node = g.nodes.pop().unwrap();
    let (dir, config) = (
        node.dir.clone(),
        node.dir.parent().unwrap().join("castellan.toml"),
    );
    node.stop();
    let node = Server::serve(&config, &dir);
    assert_eq!(node.get("/healthz", None).body["policy_revision"], "cluster-v2");
    issue(&node).assert_problem(403, "policy-denied");
}

/// Issue 16: gateways rotate together only through one signer. With keys
/// of their own, each would rotate alone, so they refuse; sharing a signer,
/// a step through one gateway reaches every gateway's bundles at once.
#[test]
fn gateways_rotate_together_through_a_shared_signer_and_refuse_alone() {
    {
        let alone = gateways(2, "", &[]);
        let r = alone.nodes[0].post_admin("/api/v1/ca/authorities", &json!({"kind": "x509"}));
        r.assert_problem(409, "rotation-refused");
        assert!(
            r.body["detail"].as_str().unwrap().contains("[signer] endpoint"),
            "{}",
            r.body
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let signer = support::start_signer(tmp.path(), support::my_uid());
    let g = gateways(
        2,
        &format!("[signer]\nendpoint = \"unix:{}\"", signer.socket.display()),
        &[],
    );
    let x509_keys = |node: &Server| {
        node.get("/.well-known/spiffe-bundle", None).body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["use"] == "x509-svid")
            .count()
    };
    assert_eq!(x509_keys(&g.nodes[1]), 1);
    let r = g.nodes[0].post_admin("/api/v1/ca/authorities", &json!({"kind": "x509"}));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.body["prepared"]["id"].as_str().unwrap().to_owned();
    let new_root = support::pem_certs(r.body["prepared"]["certificate_pem"].as_str().unwrap()).remove(0);
    assert!(
        eventually(Duration::from_secs(2), || x509_keys(&g.nodes[1]) == 2),
        "the other gateway publishes the prepared authority within 2 s"
    );
    let r = g.nodes[1].post_admin(&format!("/api/v1/ca/authorities/{id}/activate"), &json!({}));
    assert_eq!(r.status, 200, "{}", r.body);
    // Issued through the first gateway: signed by the new authority.
    let cluster = Cluster::new("https://k8s.rotation.example");
    g.nodes[0].add_trust_source("rotation", &cluster);
    let (_, c) = csr();
    let r = g.nodes[0].post(
        ISSUE,
        &issuance_body(&cluster.token("ns", "sa"), &c, Some(600)),
        None,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let leaf = support::pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
    let (_, leaf) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let (_, root) = x509_parser::parse_x509_certificate(&new_root).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
}
