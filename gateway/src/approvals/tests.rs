use super::*;
use crate::auth::Role;

fn principal(name: &str, role: Role, groups: &[&str]) -> Principal {
    Principal {
        id: format!("user:{name}"),
        name: name.into(),
        role,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        kind: crate::model::PrincipalKind::Token,
        persons: Vec::new(),
    }
}

fn request(required: u32) -> Request {
    let binding = binding("spiffe://example.org/user/alice", "a2V5", 600, &[], "why");
    Request {
        id: "r1".into(),
        state: State::Pending,
        requester: Requester {
            id: "user:alice".into(),
            name: "alice".into(),
            kind: "token".into(),
            persons: Vec::new(),
        },
        spiffe_id: "spiffe://example.org/user/alice".into(),
        dns_names: vec![],
        ttl_seconds: 600,
        justification: "why".into(),
        ticket: None,
        emergency: false,
        post_review: false,
        public_key: "a2V5".into(),
        binding,
        rule: Rule {
            required_approvals: required,
            approver_groups: vec!["sre".into()],
            approver_principals: vec!["bob".into()],
            deny_threshold: 1,
        },
        votes: vec![],
        created_at: "2026-01-01T00:00:00Z".into(),
        expires_at: 1_000,
        decided_at: None,
        issued: None,
        policy_revision: "t".into(),
        attestation: None,
        agent: None,
    }
}

#[test]
fn binding_covers_every_approved_field() {
    let base = binding("spiffe://x/a", "k", 600, &[], "j");
    assert_eq!(base, binding("spiffe://x/a", "k", 600, &[], "j"), "deterministic");
    for other in [
        binding("spiffe://x/b", "k", 600, &[], "j"),
        binding("spiffe://x/a", "k2", 600, &[], "j"),
        binding("spiffe://x/a", "k", 601, &[], "j"),
        binding("spiffe://x/a", "k", 600, &["d.example".into()], "j"),
        binding("spiffe://x/a", "k", 600, &[], "j2"),
    ] {
        assert_ne!(base, other);
    }
}

#[test]
fn quorum_approves_once_and_repeats_are_no_ops() {
    let mut r = request(2);
    let b = r.binding.clone();
    let sre1 = principal("sre1", Role::Approver, &["sre"]);
    assert_eq!(
        r.vote(&sre1, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Recorded)
    );
    assert_eq!(
        r.vote(&sre1, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Repeat)
    );
    // Named principal, no group needed.
    let bob = principal("bob", Role::Approver, &[]);
    assert_eq!(
        r.vote(&bob, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Approved)
    );
    assert_eq!(r.state, State::Approved);
    assert_eq!(r.approvers(), ["user:sre1", "user:bob"]);
    let sre2 = principal("sre2", Role::Approver, &["sre"]);
    assert_eq!(
        r.vote(&sre2, VoteDecision::Approve, "", &b, 10),
        Err(ApprovalError::NotPending("approved"))
    );
}

#[test]
fn refusals_leave_the_request_untouched() {
    let mut r = request(1);
    let b = r.binding.clone();
    let alice_in_sre = Principal {
        groups: vec!["sre".into()],
        ..principal("alice", Role::Approver, &[])
    };
    assert_eq!(
        r.vote(&alice_in_sre, VoteDecision::Approve, "", &b, 10),
        Err(ApprovalError::SelfApproval)
    );
    let requester_role = principal("eve", Role::Requester, &["sre"]);
    assert!(matches!(
        r.vote(&requester_role, VoteDecision::Approve, "", &b, 10),
        Err(ApprovalError::NotEligible(_))
    ));
    let sre = principal("sre1", Role::Approver, &["sre"]);
    assert_eq!(
        r.vote(&sre, VoteDecision::Approve, "", "sha256:00", 10),
        Err(ApprovalError::BindingMismatch)
    );
    assert!(r.votes.is_empty() && r.state == State::Pending);
    assert_eq!(r.cancel(&sre, 10), Err(ApprovalError::NotRequester));
}

#[test]
fn deadline_expires_and_denial_ends() {
    let mut r = request(2);
    let b = r.binding.clone();
    let sre = principal("sre1", Role::Approver, &["sre"]);
    assert_eq!(
        r.vote(&sre, VoteDecision::Approve, "", &b, 1_000),
        Err(ApprovalError::Expired)
    );
    assert_eq!(r.state, State::Expired);
    let mut r = request(2);
    assert_eq!(
        r.vote(&sre, VoteDecision::Deny, "no", &b, 10),
        Ok(VoteOutcome::Denied)
    );
    assert!(r.state.is_terminal());
    let alice = principal("alice", Role::Requester, &[]);
    assert_eq!(r.cancel(&alice, 10), Err(ApprovalError::NotPending("denied")));
}

#[test]
fn the_extension_is_a_der_utf8string_of_json() {
    let mut r = request(1);
    r.votes.push(Vote {
        approver: "user:bob".into(),
        persons: Vec::new(),
        decision: VoteDecision::Approve,
        reason: String::new(),
        at: "t".into(),
    });
    let der = approval_extension(&r);
    assert_eq!(der[0], 0x0c);
    let (_, s) = x509_parser::der_parser::der::parse_der_utf8string(&der).unwrap();
    let v: Value = serde_json::from_str(s.as_str().unwrap()).unwrap();
    assert_eq!(v["approvers"], json!(["user:bob"]));
    assert_eq!(v["binding"], r.binding.as_str());
}

/// One person through an API token and a linked OIDC login.
fn linked(name: &str, groups: &[&str]) -> (Principal, Principal) {
    let token = Principal {
        persons: vec!["oidc:corp:sub-1".into()],
        ..principal(name, Role::Approver, groups)
    };
    let login = Principal {
        kind: crate::model::PrincipalKind::Oidc,
        ..token.clone()
    };
    (token, login)
}

#[test]
fn a_person_counts_once_through_a_token_and_a_linked_login() {
    let mut r = request(2);
    let b = r.binding.clone();
    let (token, login) = linked("bob", &["sre"]);
    assert_eq!(
        r.vote(&token, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Recorded)
    );
    assert_eq!(
        r.vote(&login, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Repeat)
    );
    // A login voted first, then was linked: the token still counts once.
    let mut r = request(2);
    let unlinked = Principal {
        id: "oidc:corp:sub-1".into(),
        name: "bob@example.com".into(),
        kind: crate::model::PrincipalKind::Oidc,
        ..principal("x", Role::Approver, &["sre"])
    };
    assert_eq!(
        r.vote(&unlinked, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Recorded)
    );
    assert_eq!(
        r.vote(&token, VoteDecision::Approve, "", &b, 10),
        Ok(VoteOutcome::Repeat)
    );
    assert_eq!(r.state, State::Pending);
}

#[test]
fn self_approval_sees_through_links_and_delegation_chains() {
    let b = request(1).binding;
    // The requester's linked login.
    let mut r = request(1);
    r.requester.persons = vec!["oidc:corp:sub-1".into()];
    let (_, login) = linked("alice", &["sre"]);
    assert_eq!(
        r.vote(&login, VoteDecision::Approve, "", &b, 10),
        Err(ApprovalError::SelfApproval)
    );
    // A token linked to the identity of a person in the delegation chain.
    let mut r = request(1);
    r.requester = Requester {
        id: "workload:k8s_sat:prod/agent".into(),
        name: "prod/agent".into(),
        kind: "evidence".into(),
        persons: vec!["oidc:corp:sub-1".into()],
    };
    let (token, _) = linked("bob", &["sre"]);
    assert_eq!(
        r.vote(&token, VoteDecision::Approve, "", &b, 10),
        Err(ApprovalError::SelfApproval)
    );
    assert!(r.is_own(&token));
}

#[test]
fn an_unlinked_login_never_answers_to_a_token_name() {
    let mut r = request(1);
    r.rule.approver_groups.clear();
    r.rule.approver_principals = vec!["bob".into()];
    let impostor = Principal {
        id: "oidc:corp:bob".into(),
        name: "bob".into(),
        kind: crate::model::PrincipalKind::Oidc,
        ..principal("x", Role::Approver, &[])
    };
    assert!(!r.is_eligible(&impostor));
    assert!(r.is_eligible(&principal("bob", Role::Approver, &[])));
    r.rule.approver_principals = vec!["oidc:corp:bob".into()];
    assert!(r.is_eligible(&impostor));
}
