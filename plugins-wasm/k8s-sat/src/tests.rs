use super::*;

const NOW: i64 = 1_800_000_000;

fn config() -> Config {
    Config {
        trust_sources: vec![TrustSource {
            name: "prod".into(),
            issuer: "https://k8s.example".into(),
            audiences: vec!["castellan".into()],
            key_set: "ks-prod".into(),
        }],
        leeway_seconds: None,
    }
}

fn token(payload: &Value) -> String {
    let enc = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    format!(
        "{}.{}.c2ln",
        enc(&serde_json::json!({"alg": "ES256", "kid": "k1"})),
        enc(payload)
    )
}

fn projected() -> Value {
    serde_json::json!({
        "iss": "https://k8s.example",
        "aud": ["castellan"],
        "sub": "system:serviceaccount:prod:api",
        "exp": NOW + 600, "iat": NOW - 10, "nbf": NOW - 10,
        "kubernetes.io": {
            "namespace": "prod",
            "serviceaccount": {"name": "api", "uid": "u1"},
            "pod": {"name": "api-7d9", "uid": "p1"}
        }
    })
}

/// Stands in for the host: "verifies" by returning the payload as-is.
fn run(payload: Value) -> Result<Attestation, AttestError> {
    let t = token(&payload);
    attest_token(&t, &config(), NOW, |ks, _| {
        assert_eq!(ks, "ks-prod");
        Ok(payload.to_string())
    })
}

fn rejected(r: Result<Attestation, AttestError>) -> String {
    match r {
        Err(AttestError::Rejected(m)) => m,
        other => panic!("expected rejection, got {other:?}"),
    }
}

#[test]
fn projected_token_yields_subject_and_selectors() {
    let a = run(projected()).unwrap();
    assert_eq!(a.subject, "ns/prod/sa/api");
    assert_eq!(
        a.selectors,
        [
            "k8s:ns:prod",
            "k8s:sa:api",
            "k8s:pod-name:api-7d9",
            "k8s:pod-uid:p1"
        ]
    );
    let claims: Value = serde_json::from_str(&a.claims_json).unwrap();
    assert_eq!(claims["trust_source"], "prod");
    assert_eq!(claims["token_shape"], "projected");
}

#[test]
fn legacy_token_is_accepted() {
    let p = serde_json::json!({
        "iss": "https://k8s.example", "aud": "castellan", "exp": NOW + 60,
        "sub": "system:serviceaccount:dev:web",
        "kubernetes.io/serviceaccount/namespace": "dev",
        "kubernetes.io/serviceaccount/service-account.name": "web"
    });
    let a = run(p).unwrap();
    assert_eq!(a.subject, "ns/dev/sa/web");
    assert_eq!(a.selectors, ["k8s:ns:dev", "k8s:sa:web"]);
}

#[test]
fn lifetime_checks_apply_leeway() {
    let mut p = projected();
    p["exp"] = (NOW - 61).into();
    assert!(rejected(run(p)).contains("expired"));
    let mut p = projected();
    p["exp"] = (NOW - 30).into();
    assert!(run(p).is_ok(), "within leeway");
    let mut p = projected();
    p["nbf"] = (NOW + 120).into();
    assert!(rejected(run(p)).contains("nbf"));
    let mut p = projected();
    p["iat"] = (NOW + 120).into();
    assert!(rejected(run(p)).contains("iat"));
    let mut p = projected();
    p.as_object_mut().unwrap().remove("exp");
    assert!(rejected(run(p)).contains("exp"));
}

#[test]
fn audience_and_issuer_must_match() {
    let mut p = projected();
    p["aud"] = serde_json::json!(["other"]);
    assert!(rejected(run(p)).contains("audience"));
    let mut p = projected();
    p["iss"] = "https://evil.example".into();
    assert!(rejected(run(p)).contains("not trusted"));
}

#[test]
fn identity_claims_are_required_and_consistent() {
    let mut p = projected();
    p["kubernetes.io"].as_object_mut().unwrap().remove("namespace");
    assert!(rejected(run(p)).contains("namespace"));
    let mut p = projected();
    p["sub"] = "system:serviceaccount:prod:admin".into();
    assert!(rejected(run(p)).contains("sub"));
    let mut p = projected();
    p["kubernetes.io"]["namespace"] = "prod/../kube-system".into();
    assert!(rejected(run(p)).contains("not a valid"));
}

#[test]
fn verification_failure_is_a_rejection() {
    let t = token(&projected());
    let r = attest_token(&t, &config(), NOW, |_, _| Err("bad signature".into()));
    assert!(rejected(r).contains("bad signature"));
}

#[test]
fn garbage_is_malformed_not_a_panic() {
    for evidence in [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.!!!.c",
        "a.bnVsbA.c",
        "\u{0}.\u{1}.\u{2}",
    ] {
        let r = attest_token(evidence, &config(), NOW, |_, _| unreachable!());
        assert!(
            matches!(r, Err(AttestError::Malformed(_))),
            "{evidence:?} gave {r:?}"
        );
    }
}

#[test]
fn no_trust_source_is_distinct() {
    let cfg = Config {
        trust_sources: vec![],
        leeway_seconds: None,
    };
    let r = attest_token(&token(&projected()), &cfg, NOW, |_, _| unreachable!());
    assert!(matches!(r, Err(AttestError::NoTrustSource(_))));
}
