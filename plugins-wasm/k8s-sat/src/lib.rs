//! `k8s_sat`: attests a Kubernetes workload by its service-account token.
//!
//! The module owns the claim checks (issuer, audience, lifetime, the
//! namespace and service-account claims in both token shapes). It must not do
//! crypto itself: the signature is checked by the host's `verify-jws` against
//! the trust source's key set, and only the payload the host verified is read.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use castellan_attestor_sdk::{AudienceRule, Context, Error as SdkError};
use serde::Deserialize;
use serde_json::{Map, Value};

wit_bindgen::generate!({
    world: "attestor",
    path: "../wit",
});

/// Seconds of clock skew tolerated on `exp`, `nbf` and `iat` unless the host
/// configures another value.
const DEFAULT_LEEWAY_SECONDS: i64 = 60;

/// Longest evidence accepted; real service-account tokens are a few KiB.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What the host passes as `config`.
#[derive(Debug, Deserialize)]
pub struct Config {
    /// Trust sources configured for `k8s_sat`; the token's issuer picks one.
    pub trust_sources: Vec<TrustSource>,
    #[serde(default)]
    pub leeway_seconds: Option<i64>,
}

/// One cluster whose tokens are trusted.
#[derive(Debug, Clone, Deserialize)]
pub struct TrustSource {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    /// Name of the host-held key set to verify signatures with.
    pub key_set: String,
    /// `key_binding`: `"optional"` (default) or `"required"`.
    #[serde(default)]
    pub settings: Value,
}

struct K8sSat;

impl Guest for K8sSat {
    fn attest(evidence: String, config: String, context: String) -> Result<Attestation, AttestError> {
        castellan_attestor_sdk::link();
        let config: Config = serde_json::from_str(&config)
            .map_err(|e| AttestError::Config(format!("k8s_sat configuration: {e}")))?;
        let context: Context = serde_json::from_str(&context)
            .map_err(|e| AttestError::Config(format!("k8s_sat context: {e}")))?;
        let now = castellan::attestor::clock::now();
        attest_token(&evidence, &config, &context, now, |key_set, token| {
            castellan::attestor::crypto::verify_jws(key_set, token).map(|v| v.payload_json)
        })
    }
}

export!(K8sSat);

/// The whole check, with the host's signature verification passed in so the
/// logic can be unit-tested natively. `verify` returns the verified payload.
pub fn attest_token(
    token: &str,
    config: &Config,
    context: &Context,
    now: i64,
    verify: impl Fn(&str, &str) -> Result<String, String>,
) -> Result<Attestation, AttestError> {
    let token = token.trim();
    if token.is_empty() {
        return Err(AttestError::Malformed("evidence is empty".into()));
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AttestError::Malformed(format!(
            "token is larger than {MAX_TOKEN_BYTES} bytes"
        )));
    }
    if config.trust_sources.is_empty() {
        return Err(AttestError::NoTrustSource(
            "no trust source is configured for k8s_sat".into(),
        ));
    }

    // The unverified issuer only routes the token to a trust source; nothing
    // else is read before the signature has been checked with that source's keys.
    let unverified = decode_payload_unverified(token)?;
    let issuer = unverified
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| AttestError::Rejected("token has no `iss` claim".into()))?;
    // Two clusters may share an issuer (`https://kubernetes.default.svc`):
    // every source with this issuer is tried, and the one whose keys verify
    // the signature is the source.
    let mut candidates = config
        .trust_sources
        .iter()
        .filter(|s| s.issuer == issuer)
        .peekable();
    if candidates.peek().is_none() {
        return Err(AttestError::Rejected(format!(
            "issuer `{}` is not trusted for k8s_sat",
            printable(issuer)
        )));
    }
    let mut refusal = String::new();
    let mut verified = None;
    for candidate in candidates {
        match verify(&candidate.key_set, token) {
            Ok(payload) => {
                verified = Some((candidate, payload));
                break;
            }
            Err(e) if refusal.is_empty() => refusal = e,
            Err(_) => {}
        }
    }
    let (source, payload) = verified.ok_or_else(|| AttestError::Rejected(format!("signature: {refusal}")))?;
    let claims: Map<String, Value> = serde_json::from_str::<Value>(&payload)
        .ok()
        .and_then(|v| match v {
            Value::Object(m) => Some(m),
            _ => None,
        })
        .ok_or_else(|| AttestError::Malformed("token payload is not a JSON object".into()))?;

    let leeway = config
        .leeway_seconds
        .unwrap_or(DEFAULT_LEEWAY_SECONDS)
        .clamp(0, 300);
    check_issuer(&claims, &source.issuer)?;
    let (audiences, key_bound) = check_audience(&claims, source, context)?;
    let expires_at = check_lifetime(&claims, now, leeway)?;
    let identity = Identity::from_claims(&claims)?;

    let mut selectors = vec![
        format!("k8s:ns:{}", identity.namespace),
        format!("k8s:sa:{}", identity.service_account),
    ];
    if let Some(pod) = &identity.pod_name {
        selectors.push(format!("k8s:pod-name:{pod}"));
    }
    if let Some(uid) = &identity.pod_uid {
        selectors.push(format!("k8s:pod-uid:{uid}"));
    }
    let verified = serde_json::json!({
        "trust_source": source.name,
        "issuer": source.issuer,
        "audiences": audiences,
        "expires_at": expires_at,
        "namespace": identity.namespace,
        "service_account": identity.service_account,
        "pod_name": identity.pod_name,
        "pod_uid": identity.pod_uid,
        "token_shape": identity.shape,
        "key_bound": key_bound,
    });
    Ok(Attestation {
        subject: format!("ns/{}/sa/{}", identity.namespace, identity.service_account),
        selectors,
        claims_json: verified.to_string(),
    })
}

fn decode_payload_unverified(token: &str) -> Result<Map<String, Value>, AttestError> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AttestError::Malformed(
            "evidence is not a compact JWS (three dot-separated parts)".into(),
        ));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| AttestError::Malformed("token payload is not base64url".into()))?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(AttestError::Malformed(
            "token payload is not a JSON object".into(),
        )),
    }
}

fn check_issuer(claims: &Map<String, Value>, expected: &str) -> Result<(), AttestError> {
    match claims.get("iss").and_then(Value::as_str) {
        Some(iss) if iss == expected => Ok(()),
        _ => Err(AttestError::Rejected(
            "issuer does not match the trust source".into(),
        )),
    }
}

fn check_audience(
    claims: &Map<String, Value>,
    source: &TrustSource,
    context: &Context,
) -> Result<(Vec<String>, bool), AttestError> {
    let auds: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| AttestError::Rejected("`aud` holds a non-string value".into()))?,
        _ => return Err(AttestError::Rejected("token has no `aud` claim".into())),
    };
    let rule = AudienceRule {
        source: &source.name,
        accepted: &source.audiences,
        settings: &source.settings,
    };
    let refs: Vec<&str> = auds.iter().map(String::as_str).collect();
    let key_bound = rule.check(&refs, Some(context)).map_err(|e| match e {
        SdkError::Config(m) => AttestError::Config(m),
        SdkError::Malformed(m) => AttestError::Malformed(m),
        SdkError::Rejected(m) | SdkError::NoTrustSource(m) => AttestError::Rejected(m),
    })?;
    Ok((auds, key_bound))
}

/// Checks `exp` (required), `nbf` and `iat` (when present); returns `exp`.
fn check_lifetime(claims: &Map<String, Value>, now: i64, leeway: i64) -> Result<i64, AttestError> {
    let time = |name: &str| -> Result<Option<i64>, AttestError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .map(Some)
                .ok_or_else(|| AttestError::Rejected(format!("`{name}` is not a number"))),
        }
    };
    let exp = time("exp")?.ok_or_else(|| AttestError::Rejected("token has no `exp` claim".into()))?;
    if now > exp.saturating_add(leeway) {
        return Err(AttestError::Rejected("token has expired".into()));
    }
    if let Some(nbf) = time("nbf")?
        && now.saturating_add(leeway) < nbf
    {
        return Err(AttestError::Rejected("token is not valid yet (`nbf`)".into()));
    }
    if let Some(iat) = time("iat")?
        && now.saturating_add(leeway) < iat
    {
        return Err(AttestError::Rejected(
            "token was issued in the future (`iat`)".into(),
        ));
    }
    Ok(exp)
}

struct Identity {
    namespace: String,
    service_account: String,
    pod_name: Option<String>,
    pod_uid: Option<String>,
    shape: &'static str,
}

impl Identity {
    /// Reads the projected shape (`kubernetes.io: {namespace, serviceaccount,
    /// pod}`) or, failing that, the legacy secret-based claims. `sub`, when
    /// present, must name the same service account.
    fn from_claims(claims: &Map<String, Value>) -> Result<Self, AttestError> {
        let id = if let Some(k8s) = claims.get("kubernetes.io").and_then(Value::as_object) {
            let str_at = |obj: Option<&Value>, key: &str| {
                obj.and_then(|o| o.get(key))
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            };
            let sa = k8s.get("serviceaccount");
            let pod = k8s.get("pod");
            Identity {
                namespace: k8s
                    .get("namespace")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| missing("kubernetes.io.namespace"))?,
                service_account: str_at(sa, "name")
                    .ok_or_else(|| missing("kubernetes.io.serviceaccount.name"))?,
                pod_name: str_at(pod, "name"),
                pod_uid: str_at(pod, "uid"),
                shape: "projected",
            }
        } else {
            let get = |key: &str| claims.get(key).and_then(Value::as_str).map(str::to_owned);
            Identity {
                namespace: get("kubernetes.io/serviceaccount/namespace")
                    .ok_or_else(|| missing("kubernetes.io/serviceaccount/namespace"))?,
                service_account: get("kubernetes.io/serviceaccount/service-account.name")
                    .ok_or_else(|| missing("kubernetes.io/serviceaccount/service-account.name"))?,
                pod_name: None,
                pod_uid: None,
                shape: "legacy",
            }
        };
        for (what, value) in [
            ("namespace", &id.namespace),
            ("service account", &id.service_account),
        ] {
            if !is_dns_label_like(value) {
                return Err(AttestError::Rejected(format!(
                    "{what} `{}` is not a valid Kubernetes name",
                    printable(value)
                )));
            }
        }
        // The pod's name and uid become selectors too: the same bounds.
        if let Some(pod) = &id.pod_name
            && !is_dns_label_like(pod)
        {
            return Err(AttestError::Rejected(format!(
                "pod name `{}` is not a valid Kubernetes name",
                printable(pod)
            )));
        }
        if let Some(uid) = &id.pod_uid
            && (uid.is_empty()
                || uid.len() > 64
                || !uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            return Err(AttestError::Rejected(format!(
                "pod uid `{}` is not a UID",
                printable(uid)
            )));
        }
        if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
            let expected = format!("system:serviceaccount:{}:{}", id.namespace, id.service_account);
            if sub != expected {
                return Err(AttestError::Rejected(
                    "`sub` does not name the token's service account".into(),
                ));
            }
        }
        Ok(id)
    }
}

fn missing(claim: &str) -> AttestError {
    AttestError::Rejected(format!("token has no `{claim}` claim"))
}

/// Kubernetes names: lowercase alphanumerics, `-` and `.`, at most 253
/// characters. Anything else would let a token smuggle `/` or `:` into a
/// SPIFFE ID or a selector.
fn is_dns_label_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Caps and sanitises untrusted text before it is echoed in an error.
fn printable(s: &str) -> String {
    s.chars().take(80).filter(|c| !c.is_control()).collect()
}

#[cfg(test)]
mod tests;
