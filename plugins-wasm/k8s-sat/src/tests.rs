use super::*;

const NOW: i64 = 1_800_000_000;

fn config() -> Config {
    Config {
        trust_sources: vec![TrustSource {
            name: "prod".into(),
            issuer: "https://k8s.example".into(),
            audiences: vec!["castellan".into()],
            key_set: "ks-prod".into(),
            settings: Value::Null,
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
    attest_token(&t, &config(), &Context::default(), NOW, |ks, _| {
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
    let r = attest_token(&t, &config(), &Context::default(), NOW, |_, _| {
        Err("bad signature".into())
    });
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
        let r = attest_token(
            evidence,
            &config(),
            &Context::default(),
            NOW,
            |_, _| unreachable!(),
        );
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
    let r = attest_token(
        &token(&projected()),
        &cfg,
        &Context::default(),
        NOW,
        |_, _| unreachable!(),
    );
    assert!(matches!(r, Err(AttestError::NoTrustSource(_))));
}

const KEY: &str = "3f0c5a0e6b1d2c4f8a9e7d6c5b4a39281706f5e4d3c2b1a0918273645546372a";

/// Runs `payload` for a request certifying `key` (hex SHA-256 of its SPKI).
fn run_for_key(payload: Value, key: Option<&str>, settings: Value) -> Result<Attestation, AttestError> {
    let mut cfg = config();
    cfg.trust_sources[0].settings = settings;
    let context = Context {
        key_sha256: key.map(str::to_owned),
        ..Context::default()
    };
    attest_token(&token(&payload), &cfg, &context, NOW, |_, _| {
        Ok(payload.to_string())
    })
}

fn key_bound(a: &Attestation) -> bool {
    let claims: Value = serde_json::from_str(&a.claims_json).unwrap();
    claims["key_bound"].as_bool().unwrap()
}

#[test]
fn an_audience_can_bind_the_token_to_the_requested_key() {
    let mut p = projected();
    p["aud"] = serde_json::json!([format!("castellan/key/{KEY}")]);
    let a = run_for_key(p.clone(), Some(KEY), Value::Null).unwrap();
    assert!(key_bound(&a));
    // Another key, or none, or a digest in another case or length.
    let other = KEY.replace('3', "4");
    assert!(rejected(run_for_key(p.clone(), Some(&other), Value::Null)).contains("another key"));
    assert!(rejected(run_for_key(p.clone(), None, Value::Null)).contains("certifies none"));
    for aud in [
        format!("castellan/key/{}", KEY.to_uppercase()),
        format!("castellan/key/{}", &KEY[..40]),
        format!("other/key/{KEY}"),
        format!("castellan/key/{KEY}/x"),
    ] {
        p["aud"] = serde_json::json!([aud]);
        assert!(rejected(run_for_key(p.clone(), Some(KEY), Value::Null)).contains("audience"));
    }
    // Two bound audiences must agree.
    p["aud"] = serde_json::json!([format!("castellan/key/{KEY}"), format!("castellan/key/{other}")]);
    assert!(rejected(run_for_key(p, Some(KEY), Value::Null)).contains("two different keys"));
}

#[test]
fn a_trust_source_can_require_key_binding() {
    let required = serde_json::json!({"key_binding": "required"});
    let plain = projected();
    assert!(!key_bound(
        &run_for_key(plain.clone(), Some(KEY), Value::Null).unwrap()
    ));
    assert!(rejected(run_for_key(plain.clone(), Some(KEY), required.clone())).contains("requires"));
    let mut bound = projected();
    bound["aud"] = serde_json::json!(["castellan", format!("castellan/key/{KEY}")]);
    assert!(key_bound(&run_for_key(bound, Some(KEY), required).unwrap()));
    let r = run_for_key(plain, Some(KEY), serde_json::json!({"key_binding": true}));
    assert!(matches!(r, Err(AttestError::Config(_))), "{r:?}");
}

#[test]
fn pod_name_and_uid_are_bounded_like_other_names() {
    let mut p = projected();
    p["kubernetes.io"]["pod"]["name"] = "a".repeat(2000).into();
    assert!(rejected(run(p)).contains("pod name"));
    let mut p = projected();
    p["kubernetes.io"]["pod"]["name"] = "api\u{7f}1".into();
    assert!(rejected(run(p)).contains("pod name"));
    let mut p = projected();
    p["kubernetes.io"]["pod"]["uid"] = "x".repeat(100).into();
    assert!(rejected(run(p)).contains("pod uid"));
}

#[test]
fn two_clusters_sharing_an_issuer_are_told_apart_by_their_keys() {
    let mut config = config();
    let mut staging = config.trust_sources[0].clone();
    staging.name = "staging".into();
    staging.key_set = "ks-staging".into();
    config.trust_sources.insert(0, staging);
    let payload = projected();
    let t = token(&payload);
    // Only prod's keys verify this token: prod is the source, although
    // staging is configured first with the same issuer.
    let a = attest_token(&t, &config, &Context::default(), NOW, |ks, _| {
        if ks == "ks-prod" {
            Ok(payload.to_string())
        } else {
            Err("signature does not verify".into())
        }
    })
    .unwrap();
    assert!(
        a.claims_json.contains(r#""trust_source":"prod""#),
        "{}",
        a.claims_json
    );
    // Keys of neither: refused with the first source's reason.
    let r = attest_token(&t, &config, &Context::default(), NOW, |_, _| {
        Err("no key with kid `k1`".into())
    });
    assert!(rejected(r).contains("no key with kid"));
}
