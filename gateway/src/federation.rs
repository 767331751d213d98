//! SPIFFE federation: the bundles of foreign trust domains, and Castellan's
//! own bundle as a SPIFFE bundle endpoint serves it.
//!
//! A foreign bundle comes from a file (re-read when it changes) or from the
//! trust domain's bundle endpoint, fetched over TLS with the `https_web`
//! profile (Web PKI, plus an optional private root) or the `https_spiffe`
//! profile (the endpoint presents an X.509-SVID with a configured SPIFFE ID,
//! verified against the foreign domain's own bundle, bootstrapped from a
//! file and then from each fetch). Bundles are refreshed at their
//! `spiffe_refresh_hint`. A bundle that does not parse, holds private key
//! material, or comes from an endpoint that fails verification never
//! replaces the one in use.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::signer::Authorities;
use crate::spiffe_id::{SpiffeId, validate_trust_domain};

/// Used when a bundle names no refresh hint.
const DEFAULT_REFRESH: Duration = Duration::from_secs(300);
/// Bounds on a peer's refresh hint: never hammer it, never go stale for a day.
const MIN_REFRESH: Duration = Duration::from_secs(1);
const MAX_REFRESH: Duration = Duration::from_secs(86_400);
/// How often a bundle file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(2);
/// One fetch from a bundle endpoint, connect to last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A bundle document larger than this is refused.
const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// Why a federated bundle could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FederationError {
    /// The document is not a SPIFFE bundle.
    #[error("invalid SPIFFE bundle: {0}")]
    Bundle(String),
    /// The bundle file could not be read.
    #[error("cannot read bundle file {path}: {source}")]
    File { path: String, source: std::io::Error },
    /// The bundle endpoint could not be reached or verified.
    #[error("bundle endpoint {url}: {message}")]
    Endpoint { url: String, message: String },
}

/// A trust domain to federate with (`[[federation.trust_domains]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedTrustDomain {
    /// The foreign trust domain's name, e.g. `partner.example`.
    pub trust_domain: String,
    /// A SPIFFE bundle (JWKS) file. Alone, it is the source (re-read when it
    /// changes); with `profile = "https_spiffe"`, it bootstraps trust in the
    /// endpoint.
    #[serde(default)]
    pub bundle_file: Option<PathBuf>,
    /// The foreign SPIFFE bundle endpoint, `https://...`.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// `https_web` or `https_spiffe`. Required with `endpoint_url`.
    #[serde(default)]
    pub profile: Option<String>,
    /// `https_spiffe`: the SPIFFE ID the endpoint's server must present.
    #[serde(default)]
    pub endpoint_spiffe_id: Option<String>,
    /// `https_web`: a PEM file of extra roots for a privately issued server
    /// certificate (the Web PKI roots are always trusted).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Refresh period when the bundle names no `spiffe_refresh_hint`.
    /// Default: 300 s.
    #[serde(default)]
    pub refresh_seconds: Option<u64>,
}

impl FederatedTrustDomain {
    /// Checks the combination of settings; the message names the setting.
    pub fn check(&self, own_trust_domain: &str) -> Result<(), String> {
        validate_trust_domain(&self.trust_domain).map_err(|e| format!("trust_domain: {e}"))?;
        if self.trust_domain == own_trust_domain {
            return Err("trust_domain is Castellan's own trust domain".into());
        }
        if let Some(r) = self.refresh_seconds
            && !(MIN_REFRESH.as_secs()..=MAX_REFRESH.as_secs()).contains(&r)
        {
            return Err("refresh_seconds must be between 1 and 86400".into());
        }
        let Some(url) = &self.endpoint_url else {
            if self.bundle_file.is_none() {
                return Err("give bundle_file, endpoint_url, or both".into());
            }
            if self.profile.is_some() || self.endpoint_spiffe_id.is_some() || self.ca_file.is_some() {
                return Err("profile, endpoint_spiffe_id and ca_file need endpoint_url".into());
            }
            return Ok(());
        };
        if !url.starts_with("https://") {
            return Err("endpoint_url must be https://".into());
        }
        match self.profile.as_deref() {
            Some("https_web") => {
                if self.endpoint_spiffe_id.is_some() || self.bundle_file.is_some() {
                    return Err("https_web takes neither endpoint_spiffe_id nor bundle_file".into());
                }
            }
            Some("https_spiffe") => {
                let id = self
                    .endpoint_spiffe_id
                    .as_deref()
                    .ok_or("https_spiffe needs endpoint_spiffe_id")?;
                let id = SpiffeId::parse(id).map_err(|e| format!("endpoint_spiffe_id: {e}"))?;
                if id.trust_domain() != self.trust_domain {
                    return Err("endpoint_spiffe_id must be in the federated trust domain".into());
                }
                if self.bundle_file.is_none() {
                    return Err("https_spiffe needs bundle_file to bootstrap trust in the endpoint".into());
                }
                if self.ca_file.is_some() {
                    return Err("https_spiffe takes no ca_file (the bundle is the trust anchor)".into());
                }
            }
            Some(other) => return Err(format!("profile `{other}` is not https_web or https_spiffe")),
            None => return Err("endpoint_url needs profile (https_web or https_spiffe)".into()),
        }
        Ok(())
    }
}

/// One trust domain's bundle: X.509 authorities and JWT keys.
#[derive(Debug, Clone, PartialEq)]
pub struct TrustBundle {
    pub trust_domain: String,
    /// DER certificates.
    pub x509_authorities: Vec<Vec<u8>>,
    /// Public JWKs, each with a `kid`, without `use`.
    pub jwt_authorities: Vec<Value>,
    pub sequence: Option<u64>,
    pub refresh_hint: Option<u64>,
}

impl TrustBundle {
    /// Parses a SPIFFE bundle (a JWKS whose keys say `use: x509-svid` with one
    /// certificate in `x5c`, or `use: jwt-svid` with a `kid`). Keys with
    /// another `use` are skipped, as the standard asks.
    pub fn parse(trust_domain: &str, doc: &[u8]) -> Result<Self, FederationError> {
        let bad = |m: String| FederationError::Bundle(m);
        if doc.len() > MAX_BUNDLE_BYTES {
            return Err(bad("larger than 1 MiB".into()));
        }
        let v: Value = serde_json::from_slice(doc).map_err(|e| bad(format!("not JSON: {e}")))?;
        let keys = v
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no `keys` array".into()))?;
        let mut x509_authorities = Vec::new();
        let mut jwt_authorities = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            match k.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    let x5c = k
                        .get("x5c")
                        .and_then(Value::as_array)
                        .filter(|a| a.len() == 1)
                        .and_then(|a| a[0].as_str())
                        .ok_or_else(|| {
                            bad(format!("key {i}: x509-svid needs exactly one x5c certificate"))
                        })?;
                    let der = STANDARD
                        .decode(x5c)
                        .map_err(|_| bad(format!("key {i}: x5c is not base64")))?;
                    x509_parser::parse_x509_certificate(&der)
                        .map_err(|e| bad(format!("key {i}: x5c is not a certificate: {e}")))?;
                    x509_authorities.push(der);
                }
                Some("jwt-svid") => {
                    let mut jwk = k.clone();
                    if let Some(o) = jwk.as_object_mut() {
                        o.remove("use");
                    }
                    jwt_authorities.push(jwk);
                }
                _ => {}
            }
        }
        if x509_authorities.is_empty() && jwt_authorities.is_empty() {
            return Err(bad("no x509-svid or jwt-svid keys".into()));
        }
        if !jwt_authorities.is_empty() {
            // Refuses private material, symmetric keys and missing `kid`s.
            crate::trust::KeySet::from_jwks(&json!({ "keys": jwt_authorities }))
                .map_err(|e| bad(e.to_string()))?;
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            x509_authorities,
            jwt_authorities,
            sequence: v.get("spiffe_sequence").and_then(Value::as_u64),
            refresh_hint: v.get("spiffe_refresh_hint").and_then(Value::as_u64),
        })
    }

    /// The X.509 authorities, DER, one by one.
    pub fn x509_authorities(&self) -> impl Iterator<Item = &[u8]> {
        self.x509_authorities.iter().map(Vec::as_slice)
    }

    /// The X.509 authorities concatenated, as the Workload API carries them.
    pub fn x509_der(&self) -> Vec<u8> {
        self.x509_authorities.concat()
    }

    /// The JWT authorities as a JWKS, as the Workload API carries them.
    pub fn jwt_jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .jwt_authorities
            .iter()
            .map(|k| {
                let mut k = k.clone();
                k["use"] = "jwt-svid".into();
                k
            })
            .collect();
        json!({ "keys": keys })
    }

    /// Verification keys for JWT-SVIDs of this trust domain.
    pub fn jwt_keys(&self) -> Option<crate::trust::KeySet> {
        crate::trust::KeySet::from_jwks(&json!({ "keys": self.jwt_authorities })).ok()
    }
}

/// Castellan's own bundle in the SPIFFE bundle format: each root with its
/// public key and `x5c`, each JWT key with its `kid`.
pub fn own_bundle(authorities: &Authorities, refresh_hint: u64) -> Value {
    let mut keys = Vec::new();
    let mut sequence = 0;
    let mut rest = authorities.bundle_pem().as_bytes();
    while let Ok((r, pem)) = x509_parser::pem::parse_x509_pem(rest) {
        rest = r;
        if let Ok(cert) = pem.parse_x509() {
            // The newest root's notBefore (it grows whenever a root is
            // added), plus the generation (it grows with every change).
            sequence = sequence.max(cert.validity().not_before.timestamp().max(0) as u64);
            let mut jwk = public_jwk(cert.public_key());
            jwk["use"] = "x509-svid".into();
            jwk["x5c"] = json!([STANDARD.encode(&pem.contents)]);
            keys.push(jwk);
        }
        if rest.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    sequence += authorities.generation;
    if let Some(jwt) = authorities.jwks()["keys"].as_array() {
        for k in jwt {
            let mut k = k.clone();
            k["use"] = "jwt-svid".into();
            keys.push(k);
        }
    }
    json!({ "keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": refresh_hint })
}

/// The JWK members of an EC P-256/P-384 or RSA public key.
fn public_jwk(spki: &x509_parser::x509::SubjectPublicKeyInfo) -> Value {
    use x509_parser::public_key::PublicKey;
    match spki.parsed() {
        Ok(PublicKey::EC(point)) => {
            let data = point.data();
            let (crv, len) = if data.len() == 97 {
                ("P-384", 48)
            } else {
                ("P-256", 32)
            };
            if data.len() == 1 + 2 * len && data[0] == 4 {
                json!({
                    "kty": "EC", "crv": crv,
                    "x": URL_SAFE_NO_PAD.encode(&data[1..1 + len]),
                    "y": URL_SAFE_NO_PAD.encode(&data[1 + len..]),
                })
            } else {
                json!({ "kty": "EC" })
            }
        }
        Ok(PublicKey::RSA(rsa)) => json!({
            "kty": "RSA",
            "n": URL_SAFE_NO_PAD.encode(rsa.modulus.iter().skip_while(|b| **b == 0).copied().collect::<Vec<_>>()),
            "e": URL_SAFE_NO_PAD.encode(rsa.exponent.iter().skip_while(|b| **b == 0).copied().collect::<Vec<_>>()),
        }),
        _ => json!({}),
    }
}

/// Where one federated trust domain stands, for operators.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub trust_domain: String,
    pub source: String,
    pub sequence: Option<u64>,
    pub refreshed_at: Option<String>,
    pub last_error: Option<String>,
}

/// The foreign bundles in use, swapped whole; a watch tells the Workload
/// API's streams when any changed.
pub struct Federation {
    bundles: ArcSwap<BTreeMap<String, Arc<TrustBundle>>>,
    status: std::sync::Mutex<BTreeMap<String, Status>>,
    version: watch::Sender<u64>,
    /// Trust domains whose first refresh has not finished yet.
    pending: watch::Sender<usize>,
    configured: Vec<FederatedTrustDomain>,
}

impl Federation {
    pub fn new(configured: Vec<FederatedTrustDomain>) -> Arc<Self> {
        let status = configured
            .iter()
            .map(|c| {
                let source = match (&c.endpoint_url, &c.bundle_file) {
                    (Some(u), _) => format!("{} {u}", c.profile.as_deref().unwrap_or_default()),
                    (None, Some(f)) => format!("file {}", f.display()),
                    (None, None) => String::new(),
                };
                let s = Status {
                    trust_domain: c.trust_domain.clone(),
                    source,
                    ..Status::default()
                };
                (c.trust_domain.clone(), s)
            })
            .collect();
        Arc::new(Self {
            bundles: ArcSwap::from_pointee(BTreeMap::new()),
            status: std::sync::Mutex::new(status),
            version: watch::channel(0).0,
            pending: watch::channel(configured.len()).0,
            configured,
        })
    }

    /// The bundle of a foreign trust domain, if Castellan has one.
    pub fn get(&self, trust_domain: &str) -> Option<Arc<TrustBundle>> {
        self.bundles.load().get(trust_domain).cloned()
    }

    /// Every foreign bundle in use.
    pub fn all(&self) -> Vec<Arc<TrustBundle>> {
        self.bundles.load().values().cloned().collect()
    }

    /// Changes whenever a bundle is added or replaced.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Whether every configured trust domain has had its first refresh
    /// (successful or not).
    pub fn first_refresh_done(&self) -> watch::Receiver<usize> {
        self.pending.subscribe()
    }

    pub fn status(&self) -> Vec<Status> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn store(&self, bundle: TrustBundle) {
        let td = bundle.trust_domain.clone();
        if self.get(&td).is_some_and(|b| *b == bundle) {
            self.note(&td, bundle.sequence, None);
            return;
        }
        if let (Some(old), Some(new)) = (self.get(&td).and_then(|b| b.sequence), bundle.sequence)
            && new < old
        {
            tracing::warn!(trust_domain = %td, old, new, "federated bundle's spiffe_sequence went backwards");
        }
        tracing::info!(trust_domain = %td, sequence = ?bundle.sequence, "federated bundle updated");
        let sequence = bundle.sequence;
        let mut next = self.bundles.load().as_ref().clone();
        next.insert(td.clone(), Arc::new(bundle));
        self.bundles.store(Arc::new(next));
        self.version.send_modify(|v| *v += 1);
        self.note(&td, sequence, None);
    }

    fn note(&self, td: &str, sequence: Option<u64>, error: Option<String>) {
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = status.get_mut(td) {
            match error {
                Some(e) => s.last_error = Some(e),
                None => {
                    s.sequence = sequence;
                    s.refreshed_at = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
                    s.last_error = None;
                }
            }
        }
    }

    /// Starts one refresher per configured trust domain.
    pub fn start(self: &Arc<Self>) {
        for c in self.configured.clone() {
            let this = self.clone();
            tokio::spawn(async move { this.refresh_loop(c).await });
        }
    }

    async fn refresh_loop(self: Arc<Self>, c: FederatedTrustDomain) {
        let fallback = c
            .refresh_seconds
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_REFRESH);
        let mut first = true;
        let mut last_file: Option<Vec<u8>> = None;
        loop {
            let result = match &c.endpoint_url {
                Some(url) => self.fetch(&c, url).await,
                None => match &c.bundle_file {
                    Some(path) => read_file(path).await.and_then(|doc| {
                        // Unchanged files are not re-parsed every poll.
                        if last_file.as_deref() == Some(&doc[..]) {
                            return Ok(None);
                        }
                        last_file = Some(doc.clone());
                        TrustBundle::parse(&c.trust_domain, &doc).map(Some)
                    }),
                    None => Ok(None),
                },
            };
            let wait = match result {
                Ok(Some(b)) => {
                    let hint = b.refresh_hint.map(Duration::from_secs).unwrap_or(fallback);
                    self.store(b);
                    hint.clamp(MIN_REFRESH, MAX_REFRESH)
                }
                Ok(None) => fallback,
                Err(e) => {
                    tracing::warn!(trust_domain = %c.trust_domain, error = %e, "federated bundle refresh failed; keeping the bundle in use");
                    self.note(&c.trust_domain, None, Some(e.to_string()));
                    // Retry sooner than a full period, but do not hammer.
                    fallback.min(Duration::from_secs(30))
                }
            };
            if first {
                first = false;
                self.pending.send_modify(|n| *n = n.saturating_sub(1));
            }
            let wait = if c.endpoint_url.is_none() {
                wait.min(FILE_POLL)
            } else {
                wait
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Fetches the bundle from the endpoint, verifying the server as the
    /// profile says.
    async fn fetch(
        &self,
        c: &FederatedTrustDomain,
        url: &str,
    ) -> Result<Option<TrustBundle>, FederationError> {
        let err = |m: String| FederationError::Endpoint {
            url: url.to_owned(),
            message: m,
        };
        let tls = match c.profile.as_deref() {
            Some("https_spiffe") => {
                // The anchor is the domain's bundle in use, or the bootstrap file.
                let anchors = match self.get(&c.trust_domain) {
                    Some(b) if !b.x509_authorities.is_empty() => b.x509_authorities.clone(),
                    _ => {
                        let path = c
                            .bundle_file
                            .as_ref()
                            .ok_or_else(|| err("no bootstrap bundle_file".into()))?;
                        TrustBundle::parse(&c.trust_domain, &read_file(path).await?)?.x509_authorities
                    }
                };
                let expected = c.endpoint_spiffe_id.clone().unwrap_or_default();
                crate::tls::spiffe_client_config(anchors, expected).map_err(|e| err(e.to_string()))?
            }
            _ => crate::tls::web_client_config(c.ca_file.as_deref()).map_err(|e| err(e.to_string()))?,
        };
        let (endpoint, path) = crate::client::Endpoint::parse_url_with(url, Some(tls))
            .map_err(|e| err(crate::util::error_chain(&e)))?;
        let fetch = async {
            let mut conn = endpoint.connect().await?;
            conn.get_limited(&path, MAX_BUNDLE_BYTES).await
        };
        let (status, body) = tokio::time::timeout(FETCH_TIMEOUT, fetch)
            .await
            .map_err(|_| err("timed out".into()))?
            .map_err(|e| err(crate::util::error_chain(&e)))?;
        if !status.is_success() {
            return Err(err(format!("answered {status}")));
        }
        TrustBundle::parse(&c.trust_domain, &body).map(Some)
    }
}

async fn read_file(path: &std::path::Path) -> Result<Vec<u8>, FederationError> {
    tokio::fs::read(path).await.map_err(|e| FederationError::File {
        path: path.display().to_string(),
        source: e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signer::Signer as _;

    fn signer() -> crate::signer::InProcessSigner {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::load_or_create(dir.path(), "example.org", true).unwrap();
        crate::signer::InProcessSigner::new(&ca, "example.org").unwrap()
    }

    #[test]
    fn own_bundle_round_trips_through_the_parser() {
        let s = signer();
        let doc = own_bundle(&s.authorities(), 120);
        assert_eq!(doc["spiffe_refresh_hint"], 120);
        assert!(doc["spiffe_sequence"].as_u64().unwrap() > 0);
        let b = TrustBundle::parse("example.org", doc.to_string().as_bytes()).unwrap();
        assert_eq!(b.x509_authorities.len(), 1);
        assert_eq!(b.jwt_authorities.len(), 1);
        assert_eq!(b.refresh_hint, Some(120));
        let root = x509_parser::pem::parse_x509_pem(s.authorities().bundle_pem().as_bytes())
            .unwrap()
            .1;
        assert_eq!(b.x509_authorities[0], root.contents);
        // The x509-svid key's public members match the certificate's key.
        let x509_key = doc["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["use"] == "x509-svid")
            .unwrap();
        assert_eq!(x509_key["kty"], "EC");
        assert_eq!(x509_key["crv"], "P-256");
        // And the JWT key verifies what the signer signs.
        let claims = crate::signer::JwtSvidClaims {
            sub: crate::spiffe_id::SpiffeId::parse("spiffe://example.org/a").unwrap(),
            aud: vec!["a".into()],
            iat: crate::util::now_unix(),
            exp: crate::util::now_unix() + 300,
            iss: None,
            jti: None,
            agent: None,
        };
        let jwt = s.sign_jwt_svid(&claims, crate::signer::JwtAlg::ES256).unwrap();
        b.jwt_keys().unwrap().verify_compact(&jwt).unwrap();
    }

    #[test]
    fn refuses_what_is_not_a_spiffe_bundle() {
        for (doc, why) in [
            (&b"not json"[..], "not JSON"),
            (br#"{"keys": []}"#, "no x509-svid or jwt-svid"),
            (
                br#"{"keys": [{"use": "x509-svid", "x5c": ["AAAA"]}]}"#,
                "not a certificate",
            ),
            (br#"{"keys": [{"use": "x509-svid", "x5c": []}]}"#, "exactly one"),
            (
                br#"{"keys": [{"use": "jwt-svid", "kty": "oct", "kid": "k", "k": "c2VjcmV0"}]}"#,
                "private or symmetric",
            ),
        ] {
            let e = TrustBundle::parse("partner.test", doc).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn settings_are_checked_together() {
        let base = FederatedTrustDomain {
            trust_domain: "partner.test".into(),
            bundle_file: None,
            endpoint_url: None,
            profile: None,
            endpoint_spiffe_id: None,
            ca_file: None,
            refresh_seconds: None,
        };
        assert!(base.check("example.org").unwrap_err().contains("bundle_file"));
        let file = FederatedTrustDomain {
            bundle_file: Some("b.json".into()),
            ..base.clone()
        };
        file.check("example.org").unwrap();
        assert!(
            file.check("partner.test")
                .unwrap_err()
                .contains("own trust domain")
        );
        let spiffe = FederatedTrustDomain {
            endpoint_url: Some("https://127.0.0.1:1/bundle".into()),
            profile: Some("https_spiffe".into()),
            endpoint_spiffe_id: Some("spiffe://other.test/server".into()),
            ..file.clone()
        };
        assert!(
            spiffe
                .check("example.org")
                .unwrap_err()
                .contains("federated trust domain")
        );
        let web = FederatedTrustDomain {
            endpoint_url: Some("http://127.0.0.1:1/bundle".into()),
            profile: Some("https_web".into()),
            ..base.clone()
        };
        assert!(web.check("example.org").unwrap_err().contains("https://"));
    }
}
