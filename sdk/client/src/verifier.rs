//! The tool-server side: offline verification of JWT-SVIDs and DPoP proofs.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use serde_json::Value;

use crate::{now, thumbprint, token_hash};

/// Seconds a DPoP proof stays acceptable, either side of now.
const PROOF_WINDOW: i64 = 60;

/// Why a call was refused. The text is safe to return to the caller.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("missing `Authorization: DPoP <token>` or `DPoP` proof")]
    Missing,
    #[error("token: {0}")]
    Token(String),
    #[error("proof of possession: {0}")]
    Proof(String),
    #[error("token revoked")]
    Revoked,
    #[error("scope `{0}` not granted")]
    Scope(String),
    #[error("discovery: {0}")]
    Discovery(String),
}

/// What a verified call carries.
#[derive(Debug, Clone)]
pub struct Verified {
    pub spiffe_id: String,
    pub scopes: Vec<String>,
    /// The RFC 8693 `act` claim: who the agent acts for.
    pub act: Option<Value>,
    pub task: Option<Value>,
    pub jti: String,
}

impl Verified {
    /// Refuses unless `scope` was granted.
    pub fn require_scope(&self, scope: &str) -> Result<(), VerifyError> {
        if self.scopes.iter().any(|s| s == scope) {
            Ok(())
        } else {
            Err(VerifyError::Scope(scope.into()))
        }
    }

    /// The person at the root of the delegation chain, if any: the
    /// innermost actor (RFC 8693 §4.1 nests prior actors inside the current
    /// one), as its issuer's `sub`.
    pub fn on_behalf_of(&self) -> Option<&str> {
        let mut actor = self.act.as_ref()?;
        while let Some(prior) = actor.get("act").filter(|a| a.is_object()) {
            actor = prior;
        }
        actor["sub"].as_str()
    }

    /// The current actor: the party that delegated this token (the parent
    /// agent, or the person when no agent did).
    pub fn current_actor(&self) -> Option<&str> {
        self.act.as_ref().and_then(|a| a["sub"].as_str())
    }
}

/// Verifies calls for one audience, offline after start-up.
pub struct Verifier {
    issuer: String,
    audience: String,
    keys: HashMap<String, jsonwebtoken::DecodingKey>,
    feed_url: String,
    revoked: Mutex<(HashSet<String>, Option<String>)>,
    seen_proofs: Mutex<HashMap<String, i64>>,
    http: ureq::Agent,
}

impl Verifier {
    /// Reads discovery and the JWKS from Castellan once.
    pub fn discover(castellan_url: &str, audience: &str) -> Result<Self, VerifyError> {
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let get = |url: &str| -> Result<Value, VerifyError> {
            http.get(url)
                .call()
                .map_err(|e| VerifyError::Discovery(e.to_string()))?
                .into_body()
                .read_json()
                .map_err(|e| VerifyError::Discovery(e.to_string()))
        };
        let base = castellan_url.trim_end_matches('/');
        let d = get(&format!("{base}/.well-known/openid-configuration"))?;
        let issuer = d["issuer"]
            .as_str()
            .ok_or(VerifyError::Discovery("no issuer".into()))?
            .to_owned();
        let jwks = get(d["jwks_uri"]
            .as_str()
            .ok_or(VerifyError::Discovery("no jwks_uri".into()))?)?;
        let mut keys = HashMap::new();
        for k in jwks["keys"].as_array().into_iter().flatten() {
            let (Some(kid), Ok(jwk)) = (
                k["kid"].as_str(),
                serde_json::from_value::<jsonwebtoken::jwk::Jwk>(k.clone()),
            ) else {
                continue;
            };
            if let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(&jwk) {
                keys.insert(kid.to_owned(), key);
            }
        }
        let feed_url = d["revocation_feed"].as_str().unwrap_or_default().to_owned();
        Ok(Self {
            issuer,
            audience: audience.to_owned(),
            keys,
            feed_url,
            revoked: Mutex::new((HashSet::new(), None)),
            seen_proofs: Mutex::new(HashMap::new()),
            http,
        })
    }

    /// Polls the revocation feed for entries since the last poll.
    pub fn refresh_revocations(&self) -> Result<usize, VerifyError> {
        let mut state = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let mut added = 0;
        loop {
            let url = match &state.1 {
                Some(c) => format!("{}?cursor={c}", self.feed_url),
                None => self.feed_url.clone(),
            };
            let page: Value = self
                .http
                .get(&url)
                .call()
                .map_err(|e| VerifyError::Discovery(e.to_string()))?
                .into_body()
                .read_json()
                .map_err(|e| VerifyError::Discovery(e.to_string()))?;
            let items = page["items"].as_array().cloned().unwrap_or_default();
            for r in &items {
                if let Some(j) = r["jti"].as_str() {
                    added += usize::from(state.0.insert(j.to_owned()));
                }
                if let Some(seq) = r["seq"].as_u64() {
                    state.1 = Some(seq.to_string());
                }
            }
            if page["next_cursor"].is_null() {
                return Ok(added);
            }
        }
    }

    /// Verifies one call from its method, full URL and header values.
    pub fn verify(
        &self,
        method: &str,
        url: &str,
        authorization: Option<&str>,
        dpop: Option<&str>,
    ) -> Result<Verified, VerifyError> {
        let token = authorization
            .and_then(|a| a.strip_prefix("DPoP "))
            .ok_or(VerifyError::Missing)?
            .trim();
        let proof = dpop.ok_or(VerifyError::Missing)?;

        // 1. The JWT-SVID, offline: signature by kid, issuer, audience, expiry.
        let header = jsonwebtoken::decode_header(token).map_err(|e| VerifyError::Token(e.to_string()))?;
        let kid = header.kid.ok_or(VerifyError::Token("no kid".into()))?;
        let key = self
            .keys
            .get(&kid)
            .ok_or(VerifyError::Token("unknown kid".into()))?;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&[&self.audience]);
        v.set_issuer(&[&self.issuer]);
        v.leeway = 30;
        let claims = jsonwebtoken::decode::<Value>(token, key, &v)
            .map_err(|e| VerifyError::Token(e.to_string()))?
            .claims;
        let jti = claims["jti"].as_str().unwrap_or_default().to_owned();
        if self
            .revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .contains(&jti)
        {
            return Err(VerifyError::Revoked);
        }
        let jkt = claims["cnf"]["jkt"]
            .as_str()
            .ok_or(VerifyError::Proof("the token is not key-bound".into()))?;

        // 2. The DPoP proof: signed by the key the token is bound to, for
        //    this method, URL and token, fresh, and not seen before.
        let ph = jsonwebtoken::decode_header(proof).map_err(|e| VerifyError::Proof(e.to_string()))?;
        if ph.typ.as_deref() != Some("dpop+jwt") || ph.alg != jsonwebtoken::Algorithm::ES256 {
            return Err(VerifyError::Proof("not an ES256 dpop+jwt".into()));
        }
        let jwk = ph
            .jwk
            .ok_or(VerifyError::Proof("no jwk in the proof header".into()))?;
        let jwk_value = serde_json::to_value(&jwk).map_err(|e| VerifyError::Proof(e.to_string()))?;
        if thumbprint(&jwk_value) != jkt {
            return Err(VerifyError::Proof(
                "the proof's key is not the one the token is bound to".into(),
            ));
        }
        let pkey =
            jsonwebtoken::DecodingKey::from_jwk(&jwk).map_err(|e| VerifyError::Proof(e.to_string()))?;
        let mut pv = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        pv.required_spec_claims.clear();
        pv.validate_exp = false;
        pv.validate_aud = false;
        let pc = jsonwebtoken::decode::<Value>(proof, &pkey, &pv)
            .map_err(|e| VerifyError::Proof(e.to_string()))?
            .claims;
        if pc["htm"].as_str() != Some(&method.to_ascii_uppercase()) || pc["htu"].as_str() != Some(url) {
            return Err(VerifyError::Proof("the proof is for another request".into()));
        }
        if pc["ath"].as_str() != Some(token_hash(token).as_str()) {
            return Err(VerifyError::Proof("the proof is for another token".into()));
        }
        let iat = pc["iat"].as_i64().ok_or(VerifyError::Proof("no iat".into()))?;
        let now = now();
        if (now - iat).abs() > PROOF_WINDOW {
            return Err(VerifyError::Proof("stale proof".into()));
        }
        let proof_id = pc["jti"]
            .as_str()
            .ok_or(VerifyError::Proof("no jti".into()))?
            .to_owned();
        {
            let mut seen = self.seen_proofs.lock().unwrap_or_else(|p| p.into_inner());
            seen.retain(|_, t| now - *t <= PROOF_WINDOW * 2);
            if seen.insert(proof_id, iat).is_some() {
                return Err(VerifyError::Proof("replayed proof".into()));
            }
        }
        Ok(Verified {
            spiffe_id: claims["sub"].as_str().unwrap_or_default().to_owned(),
            scopes: claims["scope"]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            act: claims.get("act").cloned(),
            task: claims.get("task").cloned(),
            jti,
        })
    }
}
