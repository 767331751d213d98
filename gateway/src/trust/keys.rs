//! Verification keys: the key set built once from a source's JWKS, the JWS
//! checks behind the `verify-jws` capability (algorithm and `kid`
//! discipline), and fetching a JWKS from a URL.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

use super::TrustError;

/// Largest number of keys one JWKS may hold.
const MAX_KEYS: usize = 64;

/// One verification key from a JWKS.
struct Key {
    kid: String,
    family: KeyFamily,
    /// The JWK's `alg`, when it pins one.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    EcP256,
    EcP384,
}

/// The verification keys of one trust source, parsed once when the source
/// is loaded so that the issuance path only looks keys up.
pub struct KeySet {
    keys: Vec<Key>,
}

/// Algorithms a JWS may use. `none` and HMAC are never accepted: a public
/// key must not double as a shared secret.
fn parse_alg(alg: &str) -> Option<Algorithm> {
    Some(match alg {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        _ => return None,
    })
}

fn alg_family(alg: Algorithm) -> Option<KeyFamily> {
    match alg {
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => Some(KeyFamily::Rsa),
        Algorithm::ES256 => Some(KeyFamily::EcP256),
        Algorithm::ES384 => Some(KeyFamily::EcP384),
        _ => None,
    }
}

impl KeySet {
    /// Parses a JWKS. Every key must be a public RSA (≥ 2048 bits) or EC
    /// P-256/P-384 key with a unique `kid`; private or symmetric key material
    /// is refused outright so it is never stored.
    pub fn from_jwks(jwks: &Value) -> Result<Self, TrustError> {
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| TrustError::Jwks("must be an object with a `keys` array".into()))?;
        if keys.is_empty() || keys.len() > MAX_KEYS {
            return Err(TrustError::Jwks(format!(
                "must hold between 1 and {MAX_KEYS} keys"
            )));
        }
        let mut out = Vec::with_capacity(keys.len());
        for (i, k) in keys.iter().enumerate() {
            let obj = k
                .as_object()
                .ok_or_else(|| TrustError::Jwks(format!("key {i} is not an object")))?;
            let field = |name: &str| obj.get(name).and_then(Value::as_str);
            let kid = field("kid")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| TrustError::Jwks(format!("key {i} has no `kid`")))?
                .to_owned();
            if out.iter().any(|o: &Key| o.kid == kid) {
                return Err(TrustError::Jwks(format!("`kid` {kid} appears twice")));
            }
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                if obj.contains_key(private) {
                    return Err(TrustError::Jwks(format!(
                        "key {kid} contains private or symmetric key material (`{private}`); give public keys only"
                    )));
                }
            }
            if matches!(field("use"), Some(u) if u != "sig") {
                return Err(TrustError::Jwks(format!(
                    "key {kid} is not a signing key (`use`)"
                )));
            }
            let alg = match field("alg") {
                None => None,
                Some(a) => Some(parse_alg(a).ok_or_else(|| {
                    TrustError::Jwks(format!(
                        "key {kid}: algorithm `{a}` is not accepted (asymmetric only)"
                    ))
                })?),
            };
            let bad = |m: &str| TrustError::Jwks(format!("key {kid}: {m}"));
            let (family, key) = match field("kty") {
                Some("RSA") => {
                    let n = field("n").ok_or_else(|| bad("RSA key without `n`"))?;
                    let e = field("e").ok_or_else(|| bad("RSA key without `e`"))?;
                    let n_bytes = URL_SAFE_NO_PAD
                        .decode(n)
                        .map_err(|_| bad("`n` is not base64url"))?;
                    let bits = n_bytes.iter().skip_while(|b| **b == 0).count() * 8;
                    if bits < 2048 {
                        return Err(bad("RSA keys must be at least 2048 bits"));
                    }
                    let key = DecodingKey::from_rsa_components(n, e).map_err(|e| bad(&e.to_string()))?;
                    (KeyFamily::Rsa, key)
                }
                Some("EC") => {
                    let (family, len) = match field("crv") {
                        Some("P-256") => (KeyFamily::EcP256, 32),
                        Some("P-384") => (KeyFamily::EcP384, 48),
                        _ => return Err(bad("EC keys must use crv P-256 or P-384")),
                    };
                    let x = field("x").ok_or_else(|| bad("EC key without `x`"))?;
                    let y = field("y").ok_or_else(|| bad("EC key without `y`"))?;
                    let xb = URL_SAFE_NO_PAD
                        .decode(x)
                        .map_err(|_| bad("`x` is not base64url"))?;
                    let yb = URL_SAFE_NO_PAD
                        .decode(y)
                        .map_err(|_| bad("`y` is not base64url"))?;
                    if xb.len() != len || yb.len() != len {
                        return Err(bad("EC coordinates have the wrong length"));
                    }
                    let key = DecodingKey::from_ec_components(x, y).map_err(|e| bad(&e.to_string()))?;
                    (family, key)
                }
                Some(other) => {
                    return Err(bad(&format!(
                        "key type `{other}` is not accepted (RSA or EC only)"
                    )));
                }
                None => return Err(bad("no `kty`")),
            };
            if let Some(a) = alg
                && alg_family(a) != Some(family)
            {
                return Err(bad("`alg` does not fit the key type"));
            }
            out.push(Key {
                kid,
                family,
                alg,
                key,
            });
        }
        Ok(Self { keys: out })
    }

    /// Verifies a compact JWS and returns its decoded header and payload.
    /// The header's `kid` picks the key. The error text is safe to show the
    /// caller.
    pub fn verify_compact(&self, compact: &str) -> Result<(Value, String), String> {
        self.verify_with(compact, |header| {
            let kid = header
                .get("kid")
                .and_then(Value::as_str)
                .ok_or("header has no `kid`")?;
            self.keys
                .iter()
                .find(|k| k.kid == kid)
                .ok_or_else(|| format!("no key with kid `{}` in the trust source", printable(kid)))
        })
    }

    /// Verifies a compact JWS with the set's only key, whatever the header's
    /// `kid` (a DPoP proof carries its key in the header and no `kid`).
    pub fn verify_compact_single(&self, compact: &str) -> Result<(Value, String), String> {
        self.verify_with(compact, |_| match self.keys.as_slice() {
            [key] => Ok(key),
            _ => Err("exactly one key is needed".to_owned()),
        })
    }

    fn verify_with<'k>(
        &'k self,
        compact: &str,
        pick: impl FnOnce(&Value) -> Result<&'k Key, String>,
    ) -> Result<(Value, String), String> {
        let mut parts = compact.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWS".into());
        };
        let header_bytes = URL_SAFE_NO_PAD.decode(h).map_err(|_| "header is not base64url")?;
        let header: Value = serde_json::from_slice(&header_bytes).map_err(|_| "header is not JSON")?;
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or("header has no `alg`")?;
        let alg = parse_alg(alg_name).ok_or_else(|| {
            format!(
                "algorithm `{}` is not accepted (asymmetric algorithms only)",
                printable(alg_name)
            )
        })?;
        if header.get("crit").is_some() {
            return Err("`crit` header parameters are not supported".into());
        }
        let key = pick(&header)?;
        if alg_family(alg) != Some(key.family) || key.alg.is_some_and(|a| a != alg) {
            return Err(format!("algorithm {alg_name} does not fit key `{}`", key.kid));
        }
        let signing_input = &compact[..h.len() + 1 + p.len()];
        let ok = jsonwebtoken::crypto::verify(s, signing_input.as_bytes(), &key.key, alg)
            .map_err(|_| "signature is malformed")?;
        if !ok {
            return Err("signature does not verify".into());
        }
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "payload is not base64url")?;
        let payload = String::from_utf8(payload).map_err(|_| "payload is not UTF-8")?;
        Ok((header, payload))
    }
}

fn printable(s: &str) -> String {
    s.chars().take(64).filter(|c| !c.is_control()).collect()
}

/// Fetches a JWKS document (10 s budget) and checks its keys.
pub async fn fetch_jwks(url: &str) -> Result<Value, TrustError> {
    let err = |m: String| TrustError::Jwks(format!("{url}: {m}"));
    let tls = crate::tls::web_client_config(None).map_err(|e| err(e.to_string()))?;
    let (endpoint, path) = crate::client::Endpoint::parse_url_with(url, Some(tls))
        .map_err(|e| err(crate::util::error_chain(&e)))?;
    let fetch = async {
        let mut conn = endpoint.connect().await?;
        conn.get_limited(&path, 1 << 20).await
    };
    let (status, body) = tokio::time::timeout(std::time::Duration::from_secs(10), fetch)
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(crate::util::error_chain(&e)))?;
    if !status.is_success() {
        return Err(err(format!("answered {status}")));
    }
    if body.len() > 1 << 20 {
        return Err(err("larger than 1 MiB".into()));
    }
    let jwks: Value = serde_json::from_slice(&body).map_err(|e| err(format!("not JSON: {e}")))?;
    KeySet::from_jwks(&jwks)?;
    Ok(jwks)
}
