//! The store conformance suite: the same cases against every backend, so a
//! backend that passes keeps every guarantee the flows rely on (durable
//! writes, one chain, serialised transitions, single use, the cascade).
//! Add a backend by adding a line to `backends!` at the bottom.

#![cfg(test)]

use std::sync::Arc;

use serde_json::json;

use super::{ChallengeRoom, Effects, IdempotencyClaim, Store, StoreError};
use crate::model::{
    Actor, AgentToken, AuditEvent, AuditKind, CertificateRecord, ChallengeRecord, Entry, IdempotentResponse,
    Notification, Request, Requester, RevocationFilter, Rule, Source, State, StoredBundle, TokenRecord,
    TrustSource,
};
use crate::util::now_unix;

fn event(n: u64) -> AuditEvent {
    AuditEvent::new(AuditKind::IssuanceIssued, Actor::Castellan, json!({ "n": n }))
}

fn cert(serial: &str) -> CertificateRecord {
    CertificateRecord {
        serial: serial.into(),
        spiffe_id: "spiffe://example.org/a".into(),
        not_before: "2026-01-01T00:00:00Z".into(),
        not_after: "2026-01-01T01:00:00Z".into(),
        source: Source::AttestedIssuance,
        method: "k8s_sat".into(),
        subject: "ns/a/sa/b".into(),
        public_key_sha256: "00".into(),
        issued_at: "2026-01-01T00:00:00Z".into(),
        selectors: vec!["k8s_sat:ns:a".into()],
    }
}

fn request(id: &str, created_at: &str) -> Request {
    Request {
        id: id.into(),
        state: State::Pending,
        requester: Requester {
            id: "user:alice".into(),
            name: "alice".into(),
            kind: "token".into(),
            persons: Vec::new(),
        },
        spiffe_id: "spiffe://example.org/db".into(),
        dns_names: vec![],
        ttl_seconds: 300,
        justification: "incident".into(),
        ticket: None,
        emergency: false,
        post_review: false,
        public_key: "AAAA".into(),
        binding: "sha256:00".into(),
        rule: Rule {
            required_approvals: 1,
            approver_groups: vec!["sre".into()],
            approver_principals: vec![],
            deny_threshold: 1,
        },
        votes: vec![],
        created_at: created_at.into(),
        expires_at: now_unix() + 900,
        decided_at: None,
        issued: None,
        policy_revision: "r1".into(),
        attestation: None,
        agent: None,
    }
}

fn agent_token(jti: &str, parent: Option<&str>, exp: i64) -> AgentToken {
    AgentToken {
        jti: jti.into(),
        agent_id: format!("agent-{jti}"),
        spiffe_id: "spiffe://example.org/agent".into(),
        parent_jti: parent.map(str::to_owned),
        task_id: Some("task-1".into()),
        scopes: vec!["read".into()],
        audience: vec!["api".into()],
        iat: now_unix(),
        exp,
        chain: vec![],
        revoked_at: None,
    }
}

/// Records `n` certificates, each with its audit event.
pub(super) async fn record_some(store: &Store, n: u64) {
    for i in 0..n {
        store
            .record_issuance(cert(&format!("{i:04x}")), event(i))
            .await
            .unwrap();
    }
}

pub(super) async fn certificates_page_in_issuance_order(store: Store) {
    record_some(&store, 50).await;
    assert_eq!(store.count_certificates().await.unwrap(), 50);
    let first = store.list_certificates(20, None).await.unwrap();
    assert_eq!(first.items.len(), 20);
    assert_eq!(first.items[0].serial, "0000");
    let cursor = first.next_cursor.unwrap();
    let second = store.list_certificates(40, Some(&cursor)).await.unwrap();
    assert_eq!(second.items.len(), 30);
    assert_eq!(second.items[0].serial, "0014");
    assert!(second.next_cursor.is_none());
    assert!(matches!(
        store.list_certificates(10, Some("not-a-cursor")).await,
        Err(StoreError::Cursor)
    ));
}

pub(super) async fn concurrent_writers_share_one_chain(store: Store) {
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                s.record_issuance(cert(&format!("{i:02x}")), event(i)).await
            } else {
                s.audit(event(i)).await
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.verify_audit_chain().await.unwrap(), 40);
    let page = store.list_audit(100, None).await.unwrap();
    let seqs: Vec<u64> = page.items.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert_eq!(store.count_certificates().await.unwrap(), 20);
}

pub(super) async fn a_failed_transaction_writes_nothing(store: Store) {
    record_some(&store, 1).await;
    let failed = store
        .transact(|t| {
            t.put_certificate(99, &cert("ff"))?;
            Err::<(), _>(StoreError::Backend("refused on purpose".into()))
        })
        .await;
    assert!(failed.is_err());
    assert_eq!(store.count_certificates().await.unwrap(), 1);
    assert_eq!(store.verify_audit_chain().await.unwrap(), 1);
}

pub(super) async fn request_updates_are_serialised_and_refusals_write_nothing(store: Store) {
    store
        .create_request(request("r1", "2026-01-01T00:00:00Z"), Effects::default())
        .await
        .unwrap();
    // Twenty racing transitions out of `pending`: exactly one wins.
    let store = Arc::new(store);
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let s = store.clone();
        tasks.push(tokio::spawn(async move {
            s.update_request("r1", move |r: &mut Request| {
                if r.state != State::Pending {
                    return Err("not pending");
                }
                r.state = State::Approved;
                Ok(Effects {
                    audit: vec![event(i)],
                    ..Effects::default()
                })
            })
            .await
        }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Some(Ok(r)) => {
                assert_eq!(r.state, State::Approved);
                wins += 1;
            }
            Some(Err(refused)) => assert_eq!(refused, "not pending"),
            None => panic!("the request exists"),
        }
    }
    assert_eq!(wins, 1);
    // One audit event: the refused updates wrote nothing.
    assert_eq!(store.verify_audit_chain().await.unwrap(), 1);
    let missing = store
        .update_request("nope", |_: &mut Request| Ok::<_, ()>(Effects::default()))
        .await
        .unwrap();
    assert!(missing.is_none());
}

pub(super) async fn the_pending_index_follows_states(store: Store) {
    for (id, at) in [("b", "2026-01-02T00:00:00Z"), ("a", "2026-01-01T00:00:00Z")] {
        store
            .create_request(request(id, at), Effects::default())
            .await
            .unwrap();
    }
    let pending: Vec<String> = store
        .list_requests(Some(State::Pending))
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(pending, ["a", "b"], "oldest first");
    store
        .update_request("a", |r: &mut Request| {
            r.state = State::Denied;
            Ok::<_, ()>(Effects::default())
        })
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let pending = store.list_requests(Some(State::Pending)).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, "b");
    assert_eq!(store.list_requests(None).await.unwrap().len(), 2);
    assert_eq!(store.list_requests(Some(State::Denied)).await.unwrap()[0].id, "a");
    assert_eq!(
        store.get_request("a").await.unwrap().unwrap().state,
        State::Denied
    );
}

pub(super) async fn the_outbox_queues_in_order_with_the_change(store: Store) {
    let notify = |e: &str| Notification {
        event: e.into(),
        payload: json!({ "event": e }),
    };
    store
        .create_request(
            request("r1", "2026-01-01T00:00:00Z"),
            Effects {
                notify: vec![notify("ephemeral.created"), notify("ephemeral.decided")],
                ..Effects::default()
            },
        )
        .await
        .unwrap();
    let items = store.outbox(10).await.unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!((items[0].seq, items[1].seq), (1, 2));
    assert_eq!(items[0].notification.event, "ephemeral.created");
    let mut first = items[0].clone();
    first.done.push("hook".into());
    store.outbox_update(1, Some(first.clone())).await.unwrap();
    store.outbox_update(2, None).await.unwrap();
    assert_eq!(store.outbox(10).await.unwrap(), vec![first]);
}

pub(super) async fn revocation_cascades_to_descendants(store: Store) {
    let exp = now_unix() + 600;
    let tokens = [
        agent_token("p", None, exp),
        agent_token("c", Some("p"), exp),
        agent_token("g", Some("c"), exp),
        agent_token("expired", Some("c"), now_unix() - 1),
        agent_token("other", None, exp),
    ];
    for t in tokens {
        store.put_agent_token(t, Effects::default()).await.unwrap();
    }
    let revoked = store
        .revoke(
            RevocationFilter {
                jti: Some("p".into()),
                ..Default::default()
            },
            Actor::User("admin".into()),
        )
        .await
        .unwrap();
    let mut jtis: Vec<&str> = revoked.iter().map(|r| r.jti.as_str()).collect();
    jtis.sort();
    assert_eq!(jtis, ["c", "g", "p"], "expired tokens get no feed entry");
    for jti in ["p", "c", "g", "expired"] {
        assert!(
            store
                .agent_token(jti)
                .await
                .unwrap()
                .unwrap()
                .revoked_at
                .is_some(),
            "{jti}"
        );
    }
    assert!(
        store
            .agent_token("other")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_none()
    );
    let feed = store.revocations(2, None).await.unwrap();
    assert_eq!(feed.items.len(), 2);
    let rest = store.revocations(10, feed.next_cursor.as_deref()).await.unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].seq, 3);
    // Revoking again changes nothing and audits nothing.
    let again = store
        .revoke(
            RevocationFilter {
                agent_id: Some("agent-p".into()),
                ..Default::default()
            },
            Actor::User("admin".into()),
        )
        .await
        .unwrap();
    assert!(again.is_empty());
    let audit = store.list_audit(10, None).await.unwrap().items;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].event.kind, AuditKind::BrokerRevoked);
    assert_eq!(audit[0].event.actor.to_string(), "user:admin");
}

pub(super) async fn evidence_is_spent_once_while_it_matters(store: Store) {
    assert!(store.spend("k8s\0jti-1", 1_000, 500).await.unwrap());
    assert!(!store.spend("k8s\0jti-1", 1_000, 600).await.unwrap());
    // Once it stopped mattering it may be spent again (it is expired anyway).
    assert!(store.spend("k8s\0jti-1", 3_000, 2_000).await.unwrap());
    assert!(store.spend("k8s\0jti-2", 100, 50).await.unwrap());
    store.spent_purge(1_500).await.unwrap();
    assert!(!store.spend("k8s\0jti-1", 3_000, 2_500).await.unwrap());
    assert!(store.spend("k8s\0jti-2", 100, 60).await.unwrap(), "purged");
}

pub(super) async fn idempotent_responses_are_kept_a_while(store: Store) {
    let saved = |created_at| IdempotentResponse {
        body_sha256: "h".into(),
        status: 201,
        body: "{}".into(),
        content_type: "application/json".into(),
        created_at,
        secret: false,
    };
    store.idempotency_put("old", saved(100)).await.unwrap();
    store.idempotency_put("new", saved(10_000)).await.unwrap();
    store.idempotency_purge(5_000).await.unwrap();
    assert!(store.idempotency_get("old").await.unwrap().is_none());
    assert_eq!(store.idempotency_get("new").await.unwrap(), Some(saved(10_000)));
}

/// A key is claimed once: a second claim finds it in flight until the
/// lease ends, an answer is replayed while it is kept, a release frees it.
pub(super) async fn idempotency_keys_are_claimed_once(store: Store) {
    let terms = (120, 86_400);
    let claim = |now| store.idempotency_claim("k", "h", now, terms);
    assert_eq!(claim(1_000).await.unwrap(), IdempotencyClaim::Claimed);
    assert_eq!(claim(1_050).await.unwrap(), IdempotencyClaim::InFlight);
    // The claim's gateway died: after the lease, another takes the key over.
    assert_eq!(claim(1_200).await.unwrap(), IdempotencyClaim::Claimed);
    store.idempotency_release("k").await.unwrap();
    assert_eq!(claim(1_201).await.unwrap(), IdempotencyClaim::Claimed);
    let answer = IdempotentResponse {
        body_sha256: "h".into(),
        status: 201,
        body: "{}".into(),
        content_type: "application/json".into(),
        created_at: 1_202,
        secret: false,
    };
    store.idempotency_put("k", answer.clone()).await.unwrap();
    assert_eq!(claim(1_300).await.unwrap(), IdempotencyClaim::Answered(answer));
    // Past its keeping, the answer no longer holds the key.
    assert_eq!(claim(1_202 + 86_400).await.unwrap(), IdempotencyClaim::Claimed);
}

/// Challenges are taken once, counted per client while live, and purged
/// once expired.
pub(super) async fn challenges_are_taken_once_within_their_limits(store: Store) {
    let challenge = |id: &str, client: Option<&str>, expires_at| ChallengeRecord {
        id: id.into(),
        method: "x509pop".into(),
        client: client.map(str::to_owned),
        expires_at,
        context: json!({ "nonce": id }),
    };
    let put = |c| store.put_challenge(c, 4, 2, 100);
    assert_eq!(
        put(challenge("a", Some("c1"), 400)).await.unwrap(),
        ChallengeRoom::Stored
    );
    assert_eq!(
        put(challenge("b", Some("c1"), 400)).await.unwrap(),
        ChallengeRoom::Stored
    );
    assert_eq!(
        put(challenge("c", Some("c1"), 400)).await.unwrap(),
        ChallengeRoom::ClientFull
    );
    assert_eq!(
        put(challenge("d", None, 400)).await.unwrap(),
        ChallengeRoom::Stored
    );
    // One that expired before `now` holds room only until the purge a full
    // table triggers.
    assert_eq!(
        put(challenge("old", Some("c2"), 50)).await.unwrap(),
        ChallengeRoom::Stored
    );
    assert_eq!(
        put(challenge("e", Some("c2"), 400)).await.unwrap(),
        ChallengeRoom::Stored
    );
    assert_eq!(
        put(challenge("f", Some("c3"), 400)).await.unwrap(),
        ChallengeRoom::Full
    );
    let taken = store.take_challenge("a", 100).await.unwrap().unwrap();
    assert_eq!(taken.context["nonce"], "a");
    assert!(
        store.take_challenge("a", 100).await.unwrap().is_none(),
        "taken once"
    );
    assert!(
        store.take_challenge("old", 100).await.unwrap().is_none(),
        "purged"
    );
    // Taking frees the client's slot.
    assert_eq!(
        put(challenge("g", Some("c1"), 400)).await.unwrap(),
        ChallengeRoom::Stored
    );
    store.purge_challenges(500).await.unwrap();
    assert!(store.take_challenge("b", 500).await.unwrap().is_none());
    assert_eq!(
        put(challenge("h", Some("c1"), 900)).await.unwrap(),
        ChallengeRoom::Stored
    );
}

/// Pushed bundles are kept by name, the last push winning, with an audit
/// event in the same write.
pub(super) async fn bundles_are_kept_by_name(store: Store) {
    let bundle = |name: &str, sha: &str| StoredBundle {
        name: name.into(),
        tar_gz: "H4sI".into(),
        sha256: sha.into(),
        stored_at: 1,
    };
    store.put_bundle(bundle("b", "1"), event(1)).await.unwrap();
    store.put_bundle(bundle("a", "2"), event(2)).await.unwrap();
    store.put_bundle(bundle("b", "3"), event(3)).await.unwrap();
    assert_eq!(
        store.bundles().await.unwrap(),
        vec![bundle("a", "2"), bundle("b", "3")]
    );
    assert_eq!(store.verify_audit_chain().await.unwrap(), 3);
}

pub(super) async fn resources_are_stored_with_their_audit(store: Store) {
    let source = source_named("ts-1", "cluster");
    store.put_trust_source(source, event(1)).await.unwrap();
    assert_eq!(store.trust_sources().await.unwrap()[0].name, "cluster");
    assert!(store.delete_trust_source("ts-1", event(2)).await.unwrap());
    assert!(!store.delete_trust_source("ts-1", event(3)).await.unwrap());
    assert!(store.trust_sources().await.unwrap().is_empty());

    let token = TokenRecord {
        id: "t1".into(),
        name: "alice".into(),
        role: crate::model::Role::Approver,
        groups: vec!["sre".into()],
        created_at: "2026-01-01T00:00:00Z".into(),
        token_sha256: "ab".repeat(32),
        oidc: Some(crate::model::OidcLink {
            issuer: "corp".into(),
            subject: "sub-1".into(),
        }),
        expires_at: Some(2_000_000_000),
        revoked_at: None,
    };
    store.put_token(token.clone(), event(4)).await.unwrap();
    assert_eq!(store.tokens().await.unwrap(), vec![token.clone()]);

    let entry = |id: &str, at: &str| Entry {
        id: id.into(),
        spiffe_id: "spiffe://example.org/w".into(),
        selectors: vec!["unix:uid:0".into()],
        x509_svid_ttl: 3600,
        jwt_svid_ttl: 300,
        dns_names: vec![],
        hint: String::new(),
        federates_with: vec![],
        created_at: at.into(),
    };
    store
        .put_entry(entry("e2", "2026-01-02T00:00:00Z"), event(5))
        .await
        .unwrap();
    store
        .put_entry(entry("e1", "2026-01-01T00:00:00Z"), event(6))
        .await
        .unwrap();
    let ids: Vec<String> = store.entries().await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(ids, ["e1", "e2"]);
    assert!(store.delete_entry("e1", event(7)).await.unwrap());
    assert_eq!(store.entries().await.unwrap().len(), 1);
    // Every change above, including the no-op delete, was audited once.
    assert_eq!(store.verify_audit_chain().await.unwrap(), 7);

    // Names are unique across everything stored (whichever gateway made
    // it): a refused creation writes nothing, not even its audit event.
    let mut twin = source_named("ts-2", "shared");
    assert!(store.create_trust_source(twin.clone(), event(8)).await.unwrap());
    twin.id = "ts-3".into();
    assert!(!store.create_trust_source(twin, event(9)).await.unwrap());
    let mut second = token.clone();
    second.id = "t2".into();
    second.token_sha256 = "cd".repeat(32);
    assert!(
        !store
            .create_token(second.clone(), event(10), 1_000)
            .await
            .unwrap()
    );
    // A token that is no longer live frees its name.
    assert!(
        store
            .create_token(second, event(11), 2_000_000_001)
            .await
            .unwrap()
    );
    assert_eq!(store.verify_audit_chain().await.unwrap(), 9);
}

fn source_named(id: &str, name: &str) -> TrustSource {
    TrustSource {
        id: id.into(),
        name: name.into(),
        method: "k8s_sat".into(),
        issuer: "https://k8s".into(),
        audiences: vec!["castellan".into()],
        jwks: json!({"keys": []}),
        certificates: None,
        settings: None,
        jwks_url: None,
        jwks_refresh_seconds: None,
        previous: None,
        revoked_at: None,
        origin: "api".into(),
        created_at: "2026-01-01T00:00:00Z".into(),
    }
}

/// Generates one test per case for one backend.
pub(super) async fn expired_records_are_purged_and_lineage_checked(store: Store) {
    let now = now_unix();
    for t in [
        agent_token("old", None, now - 10),
        agent_token("live", None, now + 600),
        agent_token("child", Some("live"), now + 600),
    ] {
        assert_eq!(store.put_agent_token(t, Effects::default()).await.unwrap(), None);
    }
    // A child whose parent is revoked, or unknown, is not recorded.
    let revoke = |jti: &str| RevocationFilter {
        jti: Some(jti.into()),
        ..Default::default()
    };
    store.revoke(revoke("child"), Actor::Castellan).await.unwrap();
    let orphan = agent_token("grandchild", Some("child"), now + 600);
    assert_eq!(
        store.put_agent_token(orphan, Effects::default()).await.unwrap(),
        Some("child".into())
    );
    assert!(store.agent_token("grandchild").await.unwrap().is_none());
    let unknown = agent_token("stray", Some("nobody"), now + 600);
    assert_eq!(
        store.put_agent_token(unknown, Effects::default()).await.unwrap(),
        Some("nobody".into())
    );

    // A decided request past the retention, one within it, a pending one.
    for (id, state, deadline) in [
        ("decided-long-ago", State::Denied, now - 31 * 86_400),
        ("decided-lately", State::Issued, now - 86_400),
        ("waiting", State::Pending, now - 31 * 86_400),
    ] {
        let mut r = request(id, "2026-01-01T00:00:00Z");
        r.state = state;
        r.expires_at = deadline;
        store.create_request(r, Effects::default()).await.unwrap();
    }

    store.purge_expired(now, 30 * 86_400).await.unwrap();
    assert!(store.get_request("decided-long-ago").await.unwrap().is_none());
    assert!(store.get_request("decided-lately").await.unwrap().is_some());
    assert!(
        store.get_request("waiting").await.unwrap().is_some(),
        "open requests stay"
    );
    assert!(
        store.agent_token("old").await.unwrap().is_none(),
        "expired: forgotten"
    );
    assert!(store.agent_token("live").await.unwrap().is_some());
    // The cascade still finds the children of what is kept.
    let revoked = store.revoke(revoke("live"), Actor::Castellan).await.unwrap();
    assert_eq!(
        revoked.iter().map(|r| r.jti.as_str()).collect::<Vec<_>>(),
        ["live"]
    );
    assert!(
        store
            .agent_token("child")
            .await
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some()
    );
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;

            conformance!(@cases $make;
                certificates_page_in_issuance_order,
                concurrent_writers_share_one_chain,
                a_failed_transaction_writes_nothing,
                request_updates_are_serialised_and_refusals_write_nothing,
                the_pending_index_follows_states,
                the_outbox_queues_in_order_with_the_change,
                revocation_cascades_to_descendants,
                evidence_is_spent_once_while_it_matters,
                idempotent_responses_are_kept_a_while,
                resources_are_stored_with_their_audit,
                expired_records_are_purged_and_lineage_checked,
                idempotency_keys_are_claimed_once,
                challenges_are_taken_once_within_their_limits,
                bundles_are_kept_by_name,
            );
        }
    };
    (@cases $make:expr; $($case:ident,)*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_dir, store) = $make;
                super::$case(store).await;
            }
        )*
    };
}

fn redb_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::redb(&dir.path().join("castellan.redb")).unwrap();
    (dir, store)
}

conformance!(redb, redb_store());
conformance!(memory, ((), Store::memory()));

fn postgres_store() -> ((), Store) {
    (
        (),
        Store::postgres(super::pg_test_cluster::database(), 4).unwrap(),
    )
}

conformance!(postgres, postgres_store());
