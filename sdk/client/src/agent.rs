//! The agent side: identity requests, renewal, DPoP proofs.

use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::{Error, now, thumbprint, token_hash};

/// How an [`Agent`] asks for its identity.
#[derive(Clone)]
pub struct AgentConfig {
    /// Castellan's base URL, e.g. `http://127.0.0.1:8443`.
    pub castellan_url: String,
    pub agent_id: String,
    /// Attestation method, e.g. `k8s_sat`.
    pub method: String,
    /// Returns fresh evidence (e.g. reads the projected service-account
    /// token file), called at every request and renewal.
    pub evidence: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
    pub scopes: Vec<String>,
    pub audience: Vec<String>,
    /// Who the agent acts for: a person's ID token or a parent's JWT-SVID.
    pub subject_token: Option<String>,
    /// `{"id", "purpose"}` of the task, if any.
    pub task: Option<Value>,
    /// Renew when less than this is left. Default 60 s.
    pub renew_before: Duration,
}

/// An identity the broker granted.
#[derive(Debug, Clone)]
pub struct Identity {
    pub spiffe_id: String,
    pub jwt_svid: String,
    pub scopes: Vec<String>,
    pub expires_at: i64,
    pub delegation_chain: Value,
}

/// An agent with a key of its own and a renewing identity bound to it.
pub struct Agent {
    config: AgentConfig,
    key: rcgen::KeyPair,
    signing: jsonwebtoken::EncodingKey,
    jwk: Value,
    current: Mutex<Option<Identity>>,
    http: ureq::Agent,
}

impl Agent {
    /// Generates the agent's P-256 key. Nothing is requested yet.
    pub fn new(config: AgentConfig) -> Result<Self, Error> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let signing = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes())
            .map_err(|e| Error::Crypto(e.to_string()))?;
        let raw = key.public_key_raw();
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&raw[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&raw[33..65]),
        });
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            config,
            key,
            signing,
            jwk,
            current: Mutex::new(None),
            http,
        })
    }

    /// The public key the identity is bound to (as a JWK).
    pub fn public_jwk(&self) -> &Value {
        &self.jwk
    }

    /// The current identity, renewed first if it expires within
    /// `renew_before` (or was never fetched).
    pub fn identity(&self) -> Result<Identity, Error> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = current
            .as_ref()
            .is_some_and(|i| i.expires_at - now() > self.config.renew_before.as_secs() as i64);
        if !fresh {
            *current = Some(self.request()?);
        }
        current.clone().ok_or_else(|| Error::Http("no identity".into()))
    }

    fn request(&self) -> Result<Identity, Error> {
        let mut body = json!({
            "agent_id": self.config.agent_id,
            "method": self.config.method,
            "evidence": (self.config.evidence)(),
            "scopes": self.config.scopes,
            "audience": self.config.audience,
            "public_key_jwk": self.jwk,
        });
        if let Some(t) = &self.config.subject_token {
            body["delegation"] = json!({ "subject_token": t });
        }
        if let Some(t) = &self.config.task {
            body["task"] = t.clone();
        }
        let url = format!(
            "{}/api/v1/broker/agent-identities",
            self.config.castellan_url.trim_end_matches('/')
        );
        let resp = self
            .http
            .post(&url)
            .send_json(&body)
            .map_err(|e| Error::Http(e.to_string()))?;
        answer(resp)
    }

    /// Collects an identity that needed approval, once it is approved: the
    /// request's id came with [`Error::Pending`]. Proves this agent holds
    /// the key it asked with; the identity is delivered once.
    pub fn collect(&self, request_id: &str) -> Result<Identity, Error> {
        let url = format!(
            "{}/api/v1/ephemeral/{request_id}/collect",
            self.config.castellan_url.trim_end_matches('/')
        );
        let proof = self.proof("POST", &url, None)?;
        let resp = self
            .http
            .post(&url)
            .header("dpop", &proof)
            .send_empty()
            .map_err(|e| Error::Http(e.to_string()))?;
        let identity = answer(resp)?;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.clone());
        Ok(identity)
    }

    /// A DPoP proof (RFC 9449) for one request with `token`.
    pub fn dpop_proof(&self, method: &str, url: &str, token: &str) -> Result<String, Error> {
        self.proof(method, url, Some(token))
    }

    /// A DPoP proof for one request, with the hash of the token it
    /// accompanies, if any.
    fn proof(&self, method: &str, url: &str, token: Option<&str>) -> Result<String, Error> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.typ = Some("dpop+jwt".into());
        header.jwk =
            Some(serde_json::from_value(self.jwk.clone()).map_err(|e| Error::Crypto(e.to_string()))?);
        let mut claims = json!({
            "jti": uuid::Uuid::new_v4().to_string(),
            "htm": method.to_ascii_uppercase(),
            "htu": url,
            "iat": now(),
        });
        if let Some(token) = token {
            claims["ath"] = token_hash(token).into();
        }
        jsonwebtoken::encode(&header, &claims, &self.signing).map_err(|e| Error::Crypto(e.to_string()))
    }

    /// Headers that authorise one call: `Authorization: DPoP <JWT-SVID>` and
    /// `DPoP: <proof>`. Renews the identity first when needed.
    pub fn authorize(&self, method: &str, url: &str) -> Result<[(String, String); 2], Error> {
        let id = self.identity()?;
        let proof = self.dpop_proof(method, url, &id.jwt_svid)?;
        Ok([
            ("authorization".into(), format!("DPoP {}", id.jwt_svid)),
            ("dpop".into(), proof),
        ])
    }

    /// The key's RFC 7638 thumbprint (what `cnf.jkt` holds).
    pub fn key_thumbprint(&self) -> String {
        thumbprint(&self.jwk)
    }

    #[doc(hidden)]
    pub fn key_pair(&self) -> &rcgen::KeyPair {
        &self.key
    }
}

/// An identity from a `201`, `Pending` from a `202`, or the refusal.
fn answer(resp: ureq::http::Response<ureq::Body>) -> Result<Identity, Error> {
    let status = resp.status().as_u16();
    let v: Value = resp
        .into_body()
        .read_json()
        .map_err(|e| Error::Http(e.to_string()))?;
    match status {
        201 => Ok(Identity {
            spiffe_id: v["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            jwt_svid: v["jwt_svid"].as_str().unwrap_or_default().to_owned(),
            scopes: v["scopes"]
                .as_array()
                .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
                .unwrap_or_default(),
            expires_at: now() + v["expires_in"].as_i64().unwrap_or(0),
            delegation_chain: v["delegation_chain"].clone(),
        }),
        202 => Err(Error::Pending(
            v["request_id"].as_str().unwrap_or_default().to_owned(),
        )),
        _ => Err(Error::Refused {
            status,
            problem: v["type"]
                .as_str()
                .unwrap_or_default()
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned(),
            detail: v["detail"].as_str().unwrap_or_default().to_owned(),
        }),
    }
}
