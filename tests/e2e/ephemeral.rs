//! Just-in-time, approval-gated ephemeral issuance through the real binary:
//! approvals bound to what was approved, minted exactly once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Cluster, Resp, Server, csr, pem_certs, policies_with};
use x509_parser::prelude::*;

const EPHEMERAL: &str = "/api/v1/ephemeral";

fn request_body(csr: &str, justification: &str) -> Value {
    json!({ "csr": csr, "ttl_seconds": 600, "justification": justification, "ticket": "INC-1234" })
}

/// Starts dev with tokens: requester `alice`, approvers `sre1..3` in `sre`.
fn setup() -> (Server, String, Vec<String>) {
    let server = Server::dev();
    let alice = server.token("alice", "requester", &[]);
    let sres = (1..=3)
        .map(|i| server.token(&format!("sre{i}"), "approver", &["sre"]))
        .collect();
    (server, alice, sres)
}

fn vote(server: &Server, token: &str, id: &str, decision: &str, binding: &str) -> Resp {
    server.post(
        &format!("{EPHEMERAL}/{id}/approvals"),
        &json!({ "decision": decision, "reason": "looks right", "binding": binding }),
        Some(token),
    )
}

fn ephemeral_certs(server: &Server) -> Vec<Value> {
    server
        .certificates()
        .into_iter()
        .filter(|c| c["source"] == "ephemeral")
        .collect()
}

#[test]
fn two_of_three_approvals_issue_one_certificate_with_the_approval_extension() {
    let (server, alice, sres) = setup();
    let (key, c) = csr();
    let r = server.post(
        EPHEMERAL,
        &request_body(&c, "rotate the payments DB password"),
        Some(&alice),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["state"], "pending");
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/user/alice");
    assert_eq!(r.body["required_approvals"], 2);
    assert_eq!(r.body["approvals"], json!([]));
    let binding = r.body["binding"].as_str().unwrap().to_owned();
    assert!(binding.starts_with("sha256:") && binding.len() == 71, "{binding}");
    let id = r.body["request_id"].as_str().unwrap().to_owned();
    assert!(r.body["expires_at"].as_str().is_some());

    // Approvers see it; the requester sees her own.
    let listed = server.get(&format!("{EPHEMERAL}?state=pending"), Some(&sres[0]));
    assert_eq!(listed.body["items"][0]["request_id"], id.as_str());
    let mine = server.get(&format!("{EPHEMERAL}?state=pending"), Some(&alice));
    assert_eq!(mine.body["items"].as_array().unwrap().len(), 1);

    let first = vote(&server, &sres[0], &id, "approve", &binding);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["state"], "pending");
    // A repeat vote is a no-op.
    let again = vote(&server, &sres[0], &id, "approve", &binding);
    assert_eq!(again.status, 200);
    assert_eq!(again.body["approvals"].as_array().unwrap().len(), 1);
    assert!(
        ephemeral_certs(&server).is_empty(),
        "one approval of two issues nothing"
    );

    let second = vote(&server, &sres[1], &id, "approve", &binding);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body["state"], "issued");
    let got = server.get(&format!("{EPHEMERAL}/{id}"), None);
    assert_eq!(got.body["state"], "issued");
    let chain = pem_certs(got.body["chain_pem"].as_str().unwrap());
    spiffe::X509Svid::parse_from_der(&chain.concat(), &key.serialize_der()).unwrap();

    // The approval evidence rides in the certificate.
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let ext = leaf
        .extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == "1.3.6.1.4.1.32473.6420.1")
        .expect("approval extension");
    assert!(!ext.critical);
    let (_, text) = x509_parser::der_parser::der::parse_der_utf8string(ext.value).unwrap();
    let evidence: Value = serde_json::from_str(text.as_str().unwrap()).unwrap();
    assert_eq!(evidence["request_id"], id.as_str());
    assert_eq!(evidence["binding"], binding.as_str());
    assert_eq!(evidence["approvers"], json!(["user:sre1", "user:sre2"]));

    // A late vote changes nothing; exactly one certificate exists.
    vote(&server, &sres[2], &id, "approve", &binding).assert_problem(409, "request-not-pending");
    assert_eq!(ephemeral_certs(&server).len(), 1);
    let audit = server.audit();
    let issued: Vec<_> = audit.iter().filter(|e| e["kind"] == "ephemeral.issued").collect();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        issued[0]["detail"]["approvers"],
        json!(["user:sre1", "user:sre2"])
    );
}

#[test]
fn self_approval_wrong_binding_and_ineligible_voters_are_refused() {
    let server = Server::dev();
    // Alice is in `sre` herself: she still cannot approve her own request.
    let alice = server.token("alice", "approver", &["sre"]);
    let bob = server.token("bob", "approver", &["sre"]);
    let carol = server.token("carol", "approver", &["dba"]);
    let dave = server.token("dave", "requester", &["sre"]);
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "debug prod"), Some(&alice));
    let id = r.body["request_id"].as_str().unwrap().to_owned();
    let binding = r.body["binding"].as_str().unwrap().to_owned();

    vote(&server, &alice, &id, "approve", &binding).assert_problem(403, "self-approval");
    vote(&server, &carol, &id, "approve", &binding).assert_problem(403, "not-eligible");
    vote(&server, &dave, &id, "approve", &binding).assert_problem(403, "not-eligible");
    let wrong = format!("sha256:{}", "0".repeat(64));
    vote(&server, &bob, &id, "approve", &wrong).assert_problem(409, "binding-mismatch");
    server
        .post(
            &format!("{EPHEMERAL}/{id}/approvals"),
            &json!({"decision": "approve", "binding": binding}),
            None,
        )
        .assert_problem(401, "unauthorized");
    let r = server.get(&format!("{EPHEMERAL}/{id}"), None);
    assert_eq!(r.body["approvals"], json!([]), "no refused vote was counted");
    assert_eq!(
        server
            .audit()
            .iter()
            .filter(|e| e["kind"] == "ephemeral.refused")
            .count(),
        4
    );

    // Missing justification and a bad CSR are refused before anything is stored.
    server
        .post(EPHEMERAL, &json!({"csr": c, "justification": " "}), Some(&alice))
        .assert_problem(400, "malformed-request");
    server
        .post(
            EPHEMERAL,
            &json!({"csr": "x", "justification": "j"}),
            Some(&alice),
        )
        .assert_problem(400, "invalid-csr");
    server
        .post(EPHEMERAL, &request_body(&c, "no token"), None)
        .assert_problem(401, "unauthorized");
}

#[test]
fn deny_and_cancel_are_final() {
    let (server, alice, sres) = setup();
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "one"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    let denied = vote(&server, &sres[0], &id, "deny", &binding);
    assert_eq!(denied.body["state"], "denied", "{}", denied.body);
    vote(&server, &sres[1], &id, "approve", &binding).assert_problem(409, "request-not-pending");

    let r = server.post(EPHEMERAL, &request_body(&c, "two"), Some(&alice));
    let (id2, binding2) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    server
        .post(&format!("{EPHEMERAL}/{id2}/cancel"), &json!({}), Some(&sres[0]))
        .assert_problem(403, "not-requester");
    let cancelled = server.post(&format!("{EPHEMERAL}/{id2}/cancel"), &json!({}), Some(&alice));
    assert_eq!(cancelled.body["state"], "cancelled", "{}", cancelled.body);
    vote(&server, &sres[0], &id2, "approve", &binding2).assert_problem(409, "request-not-pending");
    server
        .post(&format!("{EPHEMERAL}/{id2}/cancel"), &json!({}), Some(&alice))
        .assert_problem(409, "request-not-pending");
    assert!(ephemeral_certs(&server).is_empty());
    server
        .get(&format!("{EPHEMERAL}/does-not-exist"), None)
        .assert_problem(404, "not-found");
}

#[test]
fn a_vote_after_expiry_is_refused_with_410() {
    let tmp = tempfile::tempdir().unwrap();
    let policies = policies_with(tmp.path(), "short", |d| {
        d["castellan"]["ephemeral"]["pending_ttl_seconds"] = 1.into()
    });
    let server = Server::dev_in(
        &tmp.path().join("data"),
        &["--policies", policies.to_str().unwrap()],
    );
    let alice = server.token("alice", "requester", &[]);
    let sre = server.token("sre1", "approver", &["sre"]);
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "expire me"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    std::thread::sleep(Duration::from_millis(2100));
    vote(&server, &sre, &id, "approve", &binding).assert_problem(410, "request-expired");
    assert_eq!(
        server.get(&format!("{EPHEMERAL}/{id}"), None).body["state"],
        "expired"
    );
    assert!(
        server
            .audit()
            .iter()
            .any(|e| e["kind"] == "ephemeral.expired" && e["detail"]["request_id"] == id.as_str())
    );
}

#[test]
fn break_glass_follows_the_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, c) = csr();
    let body = json!({ "csr": c, "ttl_seconds": 3600, "justification": "prod is down", "emergency": true });

    // The default bundle refuses break-glass.
    let strict = Server::dev_in(&tmp.path().join("strict"), &[]);
    let alice = strict.token("alice", "requester", &[]);
    let r = strict.post(EPHEMERAL, &body, Some(&alice));
    r.assert_problem(403, "policy-denied");
    assert!(r.body["detail"].as_str().unwrap().contains("break-glass"));

    // A bundle that allows it issues at once, with the emergency TTL, flagged.
    let policies = policies_with(tmp.path(), "glass", |d| {
        d["castellan"]["ephemeral"]["emergency"] = json!({"allowed": true, "max_ttl_seconds": 120});
    });
    let lenient = Server::dev_in(
        &tmp.path().join("lenient"),
        &["--policies", policies.to_str().unwrap()],
    );
    let alice = lenient.token("alice", "requester", &[]);
    let r = lenient.post(EPHEMERAL, &body, Some(&alice));
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["state"], "issued");
    assert_eq!(r.body["post_review"], true);
    let der = pem_certs(r.body["certificate_pem"].as_str().unwrap()).remove(0);
    let (_, leaf) = X509Certificate::from_der(&der).unwrap();
    let lifetime = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(lifetime <= 180, "emergency TTL applies, got {lifetime}");
    assert!(
        lenient
            .audit()
            .iter()
            .any(|e| e["kind"] == "ephemeral.break_glass")
    );
    // Justification stays mandatory for break-glass.
    lenient
        .post(
            EPHEMERAL,
            &json!({ "csr": c, "emergency": true, "justification": "" }),
            Some(&alice),
        )
        .assert_problem(400, "malformed-request");
}

#[test]
fn twenty_racing_approvals_mint_exactly_one_certificate() {
    let server = Server::dev();
    let alice = server.token("alice", "requester", &[]);
    let approvers: Vec<String> = (0..20)
        .map(|i| server.token(&format!("racer{i}"), "approver", &["sre"]))
        .collect();
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "race"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(approvers.len()));
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = approvers
            .iter()
            .map(|t| {
                let (server, id, binding, barrier) = (&server, &id, &binding, barrier.clone());
                s.spawn(move || {
                    barrier.wait();
                    vote(server, t, id, "approve", binding).status
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s == 200 || *s == 409), "{statuses:?}");
    assert_eq!(ephemeral_certs(&server).len(), 1, "exactly one certificate");
    let r = server.get(&format!("{EPHEMERAL}/{id}"), None);
    assert_eq!(r.body["state"], "issued");
    assert_eq!(
        server
            .audit()
            .iter()
            .filter(|e| e["kind"] == "ephemeral.issued")
            .count(),
        1
    );
}

#[test]
fn idempotency_key_replays_and_conflicts() {
    let (server, alice, _) = setup();
    let (_, c) = csr();
    let body = request_body(&c, "idempotent");
    let first = server.post_with(EPHEMERAL, &body, Some(&alice), &[("idempotency-key", "k-1")]);
    assert_eq!(first.status, 202);
    let replay = server.post_with(EPHEMERAL, &body, Some(&alice), &[("idempotency-key", "k-1")]);
    assert_eq!(replay.status, 202);
    assert_eq!(
        replay.body["request_id"], first.body["request_id"],
        "the original response"
    );
    let other = request_body(&c, "something else");
    server
        .post_with(EPHEMERAL, &other, Some(&alice), &[("idempotency-key", "k-1")])
        .assert_problem(422, "idempotency-key-reused");
    let mine = server.get(&format!("{EPHEMERAL}?state=pending"), Some(&alice));
    assert_eq!(
        mine.body["items"].as_array().unwrap().len(),
        1,
        "only one request was created"
    );
    // Without a key, a repeat is a new request.
    assert_ne!(
        server.post(EPHEMERAL, &body, Some(&alice)).body["request_id"],
        first.body["request_id"]
    );
}

#[test]
fn pending_requests_and_votes_survive_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::dev_in(&dir, &[]);
    let alice = server.token("alice", "requester", &[]);
    let sre1 = server.token("sre1", "approver", &["sre"]);
    let sre2 = server.token("sre2", "approver", &["sre"]);
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "survive"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    assert_eq!(vote(&server, &sre1, &id, "approve", &binding).status, 200);
    server.stop();

    let server = Server::dev_in(&dir, &[]);
    let r = server.get(&format!("{EPHEMERAL}/{id}"), None);
    assert_eq!(r.body["state"], "pending");
    assert_eq!(
        r.body["approvals"].as_array().unwrap().len(),
        1,
        "the vote survived"
    );
    let done = vote(&server, &sre2, &id, "approve", &binding);
    assert_eq!(done.body["state"], "issued", "tokens survived too: {}", done.body);
}

#[test]
fn long_poll_wakes_when_the_last_approval_lands() {
    let (server, alice, sres) = setup();
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "wait for it"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    assert_eq!(vote(&server, &sres[0], &id, "approve", &binding).status, 200);
    let (waited, elapsed) = std::thread::scope(|s| {
        let poll = s.spawn(|| {
            let t = Instant::now();
            (
                server.get(&format!("{EPHEMERAL}/{id}?wait=30"), None),
                t.elapsed(),
            )
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(vote(&server, &sres[1], &id, "approve", &binding).status, 200);
        poll.join().unwrap()
    });
    assert_eq!(waited.body["state"], "issued", "{}", waited.body);
    assert!(waited.body["certificate_pem"].as_str().is_some());
    // Not a timing test: only that it woke on the approval, not at its 30 s limit.
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}");
}

#[test]
fn a_workload_can_ask_with_evidence_for_its_own_identity() {
    let (server, _, sres) = setup();
    let cluster = Cluster::new("https://k8s.jit.example");
    server.add_trust_source("jit", &cluster);
    let (_, c) = csr();
    let body = json!({
        "csr": c, "justification": "nightly migration", "method": "k8s_sat",
        "evidence": cluster.token("ci", "deployer"),
    });
    let r = server.post(EPHEMERAL, &body, None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["spiffe_id"], "spiffe://example.org/jit/ns/ci/sa/deployer");
    assert_eq!(r.body["requester"]["kind"], "evidence");
    assert_eq!(r.body["attestation"]["subject"], "ns/ci/sa/deployer");
    assert_eq!(r.body["attestation"]["method"], "k8s_sat");
    let mut other = body.clone();
    other["spiffe_id"] = "spiffe://example.org/ns/prod/sa/admin".into();
    server
        .post(EPHEMERAL, &other, None)
        .assert_problem(403, "policy-denied");
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    vote(&server, &sres[0], &id, "approve", &binding);
    assert_eq!(
        vote(&server, &sres[1], &id, "approve", &binding).body["state"],
        "issued"
    );
}

/// One request a webhook receiver got: lowercase headers and the body.
type Received = (Vec<(String, String)>, Vec<u8>);
type Inbox = std::sync::Arc<std::sync::Mutex<Vec<Received>>>;

/// A local webhook receiver: answers 500 to the first delivery, then 200,
/// and keeps every request it got as (headers, body).
fn receiver() -> (String, Inbox) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/castellan", listener.local_addr().unwrap());
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut headers = Vec::new();
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            loop {
                line.clear();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some((k, v)) = line.trim_end().split_once(':') {
                    headers.push((k.to_ascii_lowercase(), v.trim().to_owned()));
                }
            }
            let len: usize = headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse().unwrap())
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let first = {
                let mut g = seen.lock().unwrap();
                g.push((headers, body));
                g.len() == 1
            };
            let status = if first {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = stream.write_all(
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes(),
            );
        }
    });
    (url, got)
}

#[test]
fn webhooks_are_signed_and_retried_from_the_outbox() {
    let tmp = tempfile::tempdir().unwrap();
    let (url, got) = receiver();
    let secret = "whsec-0123456789abcdef";
    std::fs::write(tmp.path().join("hook.secret"), secret).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = {{ enabled = false }}\n\n[[webhooks]]\nname = \"ops\"\nurl = \"{url}\"\nsecret_file = \"hook.secret\"\n"
        ),
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let alice = server.token("alice", "requester", &[]);
    let sre1 = server.token("sre1", "approver", &["sre"]);
    let sre2 = server.token("sre2", "approver", &["sre"]);
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "hooked"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );
    vote(&server, &sre1, &id, "approve", &binding);
    vote(&server, &sre2, &id, "approve", &binding);

    let events = |g: &[Received]| -> Vec<String> {
        g.iter()
            .map(|(h, _)| {
                h.iter()
                    .find(|(k, _)| k == "x-castellan-event")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
            .collect()
    };
    let done = support::eventually(Duration::from_secs(20), || {
        let g = got.lock().unwrap();
        let e = events(&g);
        // `created` twice: its first delivery fails and must be retried.
        e.iter().filter(|x| *x == "ephemeral.created").count() >= 2
            && ["ephemeral.decided", "ephemeral.issued"]
                .iter()
                .all(|want| e.iter().any(|x| x == want))
    });
    let g = got.lock().unwrap();
    assert!(done, "events received: {:?}", events(&g));
    // The first delivery failed and the same delivery came again.
    let delivery = |i: usize| {
        g[i].0
            .iter()
            .find(|(k, _)| k == "x-castellan-delivery")
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(events(&g)[0], "ephemeral.created");
    assert!(
        (1..g.len()).any(|i| delivery(i) == delivery(0)),
        "the failed delivery was retried"
    );
    // Every delivery is signed: t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>.<body>")).
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    for (headers, body) in g.iter() {
        let sig = headers
            .iter()
            .find(|(k, _)| k == "x-castellan-signature")
            .map(|(_, v)| v.clone())
            .unwrap();
        let (t, v1) = sig.split_once(",v1=").unwrap();
        let t = t.strip_prefix("t=").unwrap();
        let mut msg = format!("{t}.").into_bytes();
        msg.extend_from_slice(body);
        let mac: Vec<u8> = (0..v1.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&v1[i..i + 2], 16).unwrap())
            .collect();
        ring::hmac::verify(&key, &msg, &mac).expect("valid HMAC");
        let payload: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(payload["data"]["request"]["request_id"], id.as_str());
        assert!(
            payload["data"]["request"].get("certificate_pem").is_none(),
            "no certificate in webhooks"
        );
    }
}

#[test]
fn the_cli_runs_the_whole_approval_flow() {
    let server = Server::dev();
    let cli = |token: &str, args: &[&str]| {
        let out = support::castellan()
            .env("CASTELLAN_ADDR", &server.base)
            .env("CASTELLAN_TOKEN", token)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let admin = server.admin_token.clone();
    let (ok, alice, err) = cli(
        &admin,
        &["token", "create", "--name", "alice", "--role", "requester"],
    );
    assert!(ok, "{err}");
    let alice = alice.trim().to_owned();
    let sre: Vec<String> = (1..=2)
        .map(|i| {
            cli(
                &admin,
                &[
                    "token",
                    "create",
                    "--name",
                    &format!("sre{i}"),
                    "--role",
                    "approver",
                    "--group",
                    "sre",
                ],
            )
            .1
            .trim()
            .to_owned()
        })
        .collect();
    let (ok, _, err) = cli(
        &alice,
        &["token", "create", "--name", "mallory", "--role", "admin"],
    );
    assert!(!ok && err.starts_with("error: 403 forbidden"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("creds");
    let (ok, out, err) = cli(
        &alice,
        &[
            "ephemeral",
            "request",
            "--justification",
            "hotfix",
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--json",
        ],
    );
    assert!(ok, "{err}");
    let req: Value = serde_json::from_str(out.trim()).unwrap();
    let id = req["request_id"].as_str().unwrap().to_owned();
    assert!(
        out_dir.join("svid.key").exists(),
        "the key stays with the requester"
    );

    let (ok, table, _) = cli(&sre[0], &["ephemeral", "list", "--state", "pending"]);
    assert!(ok && table.starts_with("ID") && table.contains(&id), "{table}");
    let (ok, shown, err) = cli(&sre[0], &["ephemeral", "approve", &id, "--reason", "ok"]);
    assert!(
        ok && shown.contains("binding") && shown.contains("voted approve"),
        "{shown}{err}"
    );
    let (ok, _, err) = cli(&alice, &["ephemeral", "approve", &id]);
    assert!(!ok && err.starts_with("error: 403 self-approval"), "{err}");
    let (ok, _, err) = cli(&sre[1], &["ephemeral", "approve", &id]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(
        &alice,
        &["ephemeral", "wait", &id, "--out-dir", out_dir.to_str().unwrap()],
    );
    assert!(ok && out.contains("issued"), "{out}{err}");
    let key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(out_dir.join("svid.key")).unwrap()).unwrap();
    let chain = pem_certs(&std::fs::read_to_string(out_dir.join("svid.pem")).unwrap()).concat();
    let svid = spiffe::X509Svid::parse_from_der(&chain, &key.serialize_der()).unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/user/alice");
}

#[test]
fn approvers_can_sign_in_with_an_oidc_id_token() {
    let tmp = tempfile::tempdir().unwrap();
    let idp = Cluster::new("https://idp.example.com");
    std::fs::write(tmp.path().join("idp-jwks.json"), idp.jwks().to_string()).unwrap();
    let config = tmp.path().join("castellan.toml");
    std::fs::write(
        &config,
        "data_dir = \"data\"\n[http]\naddr = \"127.0.0.1:0\"\ntls = { enabled = false }\n\n\
         [[oidc_issuers]]\nname = \"corp\"\nissuer = \"https://idp.example.com\"\naudiences = [\"castellan\"]\njwks_file = \"idp-jwks.json\"\n",
    )
    .unwrap();
    let server = Server::serve(&config, &tmp.path().join("data"));
    let alice = server.token("alice", "requester", &[]);
    let sre1 = server.token("sre1", "approver", &["sre"]);
    let id_token = |email: &str, groups: &[&str], exp_offset: i64| {
        let now = support::now();
        idp.sign(&json!({
            "iss": "https://idp.example.com", "aud": "castellan", "sub": format!("sub-{email}"),
            "email": email, "groups": groups, "iat": now, "exp": now + exp_offset,
        }))
    };
    let (_, c) = csr();
    let r = server.post(EPHEMERAL, &request_body(&c, "oidc"), Some(&alice));
    let (id, binding) = (
        r.body["request_id"].as_str().unwrap().to_owned(),
        r.body["binding"].as_str().unwrap().to_owned(),
    );

    // Expired, forged and wrong-group ID tokens do not count.
    vote(
        &server,
        &id_token("carol@example.com", &["sre"], -3600),
        &id,
        "approve",
        &binding,
    )
    .assert_problem(401, "unauthorized");
    let impostor = Cluster::new("https://idp.example.com");
    let now = support::now();
    let forged = impostor.sign(&json!({"iss": "https://idp.example.com", "aud": "castellan", "email": "carol@example.com", "groups": ["sre"], "exp": now + 300}));
    vote(&server, &forged, &id, "approve", &binding).assert_problem(401, "unauthorized");
    vote(
        &server,
        &id_token("dan@example.com", &["eng"], 300),
        &id,
        "approve",
        &binding,
    )
    .assert_problem(403, "not-eligible");

    assert_eq!(
        vote(&server, &sre1, &id, "approve", &binding).body["state"],
        "pending"
    );
    let done = vote(
        &server,
        &id_token("carol@example.com", &["sre"], 300),
        &id,
        "approve",
        &binding,
    );
    assert_eq!(done.body["state"], "issued", "{}", done.body);
    // An OIDC login linked to no API token is its own person, per issuer.
    assert_eq!(
        done.body["approvals"][1]["approver"],
        "oidc:corp:sub-carol@example.com"
    );
}
