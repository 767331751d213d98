//! The signer: the only code that touches CA keys. It mints X.509-SVIDs from
//! a [`Template`] exactly as the X.509-SVID standard asks (one URI SAN, leaf
//! KeyUsage critical with digitalSignature, BasicConstraints CA:false),
//! JWT-SVIDs from typed [`JwtSvidClaims`], and join tokens from typed
//! [`JoinTokenClaims`]. It never decides *whether* to sign (that is the
//! engine's job) but it does enforce *what* it signs: only identities in its
//! own trust domain, so a separate signer process could refuse a
//! compromised gateway whatever it asks.
//!
//! The contract is **blocking**: every method does CPU work here, or, for a
//! signer in another process, waits on its socket. The engine calls it from
//! its blocking pool; start-up code calls it directly.

use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, SerialNumber};
use time::{Duration, OffsetDateTime};

use crate::spiffe_id::SpiffeId;

pub mod authorities;
pub mod config;
mod in_process;
mod keys;
pub mod pkcs11;
pub mod remote;
pub mod service;
mod setup;

pub use authorities::{Authorities, Authority, Kind, Rotation, State};
pub use in_process::{InProcessSigner, Lifetimes, keyring_exists};
pub use setup::open_or_create;

/// How far NotBefore is backdated to absorb clock skew between machines.
const BACKDATE: Duration = Duration::seconds(30);

/// Why the signer refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SignerError {
    /// The identity asked for is not in the signer's trust domain.
    #[error("{0} is outside the trust domain this signer serves")]
    ForeignIdentity(String),
    /// No key of that algorithm is loaded.
    #[error("no {0} JWT-SVID key is loaded")]
    NoKey(JwtAlg),
    /// The CA key or certificate could not be loaded.
    #[error("signer key: {0}")]
    Key(String),
    /// The template's public key is not one the signer accepts.
    #[error("public key: {0}")]
    PublicKey(String),
    /// The template is inconsistent (e.g. zero lifetime).
    #[error("template: {0}")]
    Template(String),
    /// Signing itself failed.
    #[error("signing failed")]
    Sign(#[from] rcgen::Error),
    /// Signing a JWT failed.
    #[error("JWT signing failed")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// The X.509 authority is not valid now (expired, or not yet valid):
    /// nothing it signed would be.
    #[error("{0}")]
    AuthorityUnusable(String),
    /// A rotation step was refused (the reason says why and what to do).
    #[error("{0}")]
    Rotation(String),
    /// No authority has that id.
    #[error("no authority `{0}`")]
    UnknownAuthority(String),
    /// A retired authority cannot be revoked yet: what it signed is still
    /// valid and its holders were not told to re-mint.
    #[error(
        "{id} signed credentials valid until {until}: taint it first (holders re-mint now), or revoke it after then"
    )]
    AuthorityInUse { id: String, until: String },
    /// The request is outside what this signer signs (its purpose, or its
    /// caps).
    #[error("{0}")]
    Purpose(String),
    /// The separate signer could not be reached or answered an error.
    #[error("signer unavailable: {0}")]
    Unavailable(String),
}

/// The algorithms JWT-SVIDs are signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum JwtAlg {
    /// ECDSA P-256 with SHA-256: the default, and what agent identities and
    /// join tokens use.
    ES256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, for relying parties that only take RSA.
    RS256,
}

impl std::fmt::Display for JwtAlg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            JwtAlg::ES256 => "ES256",
            JwtAlg::RS256 => "RS256",
        })
    }
}

/// The claims of a JWT-SVID: `sub` is the SPIFFE ID, `aud` at least one
/// audience, `exp` required (the JWT-SVID standard), plus what agent
/// identities carry.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JwtSvidClaims {
    pub sub: SpiffeId,
    pub aud: Vec<String>,
    pub iat: i64,
    pub exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The broker's claims, for agent identities.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentClaims>,
}

/// What an agent identity's JWT-SVID says beyond the standard claims.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AgentClaims {
    /// Space-separated scopes.
    pub scope: String,
    pub agent_id: String,
    /// RFC 7800 confirmation: the thumbprint of the key the agent holds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
    /// RFC 8693 actor chain: who the agent acts for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<ActClaim>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskClaim>,
}

/// `cnf` with an RFC 7638 JWK thumbprint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Confirmation {
    pub jkt: String,
}

/// One level of an RFC 8693 `act` claim, nesting the one before it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ActClaim {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<ActClaim>>,
}

/// The task an agent identity is scoped to.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TaskClaim {
    pub id: String,
    pub purpose: String,
}

/// The claims of an audit checkpoint: the log's size and the hash of its
/// last entry, signed with the JWT key (the audit module checks them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditCheckpointClaims {
    /// `castellan:audit:<trust domain>`.
    pub iss: String,
    pub size: u64,
    pub head: String,
    pub iat: i64,
}

/// The issuer of audit checkpoints in `trust_domain`.
pub fn audit_issuer(trust_domain: &str) -> String {
    format!("castellan:audit:{trust_domain}")
}

/// The audience every join token carries.
pub const JOIN_TOKEN_AUDIENCE: &str = "castellan-join";

/// The issuer of join tokens in `trust_domain`.
pub fn join_token_issuer(trust_domain: &str) -> String {
    format!("castellan:join-token:{trust_domain}")
}

/// The claims of a join token: a one-time bootstrap credential for a host,
/// verified by the `join_token` attestor like any token.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JoinTokenClaims {
    pub iss: String,
    pub aud: Vec<String>,
    /// The host's name.
    pub sub: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
}

/// What to put in an X.509-SVID.
#[derive(Debug, Clone)]
pub struct Template {
    pub spiffe_id: SpiffeId,
    /// DER SubjectPublicKeyInfo of the key the certificate is bound to.
    pub public_key_der: Vec<u8>,
    pub ttl: Duration,
    /// DNS SANs in addition to the SPIFFE ID.
    pub dns_names: Vec<String>,
    /// Extra non-critical extensions (OID arcs, DER value).
    pub extensions: Vec<(Vec<u64>, Vec<u8>)>,
}

/// A freshly minted certificate.
#[derive(Debug, Clone)]
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    pub pem: String,
    /// Serial number, lowercase hex.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// The id of the authority that signed it.
    pub authority: String,
    /// The certificates a chain carries after it (PEM), as they were when
    /// it was signed.
    pub chain_pem: String,
}

/// Signs credentials. Implementations: [`InProcessSigner`] (embedded, and
/// what the separate signer process runs), and its client. Blocking (see the module
/// documentation).
pub trait Signer: Send + Sync + 'static {
    /// Mints an X.509-SVID for the template; refuses an identity outside the
    /// signer's trust domain.
    fn sign_x509_svid(&self, template: &Template) -> Result<IssuedCertificate, SignerError>;

    /// Signs a subordinate CA for `public_key_der` (a SubjectPublicKeyInfo),
    /// as an upstream authority for another CA: signed by the root, path
    /// length 0, name-constrained to this trust domain's SPIFFE IDs (no DNS
    /// name or IP address at all), within the root's life. Only the admin
    /// API's CA endpoint asks for one.
    fn sign_subordinate_ca(
        &self,
        public_key_der: &[u8],
        common_name: &str,
        ttl: Duration,
    ) -> Result<IssuedCertificate, SignerError>;

    /// Signs a JWT-SVID with `alg`; the header carries `kid` and `typ: JWT`.
    /// Refuses a `sub` outside the signer's trust domain.
    fn sign_jwt_svid(&self, claims: &JwtSvidClaims, alg: JwtAlg) -> Result<String, SignerError>;

    /// Signs a join token (ES256) with the JWT key.
    fn sign_join_token(&self, claims: &JoinTokenClaims) -> Result<String, SignerError>;

    /// Signs an audit checkpoint (ES256) with the JWT key.
    fn sign_audit_checkpoint(&self, claims: &AuditCheckpointClaims) -> Result<String, SignerError>;

    /// Issues a TLS server certificate for Castellan's own listener, bound
    /// to `public_key_der` (a SubjectPublicKeyInfo: the caller keeps the
    /// private key). It is also an X.509-SVID for `spiffe_id`, so that peers
    /// may authenticate the bundle endpoint with the `https_spiffe` profile.
    /// Returns the chain PEM, leaf first.
    fn issue_server_certificate(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        public_key_der: &[u8],
    ) -> Result<String, SignerError>;

    /// The authorities as they are now: what bundles publish, which sign.
    fn authorities(&self) -> Arc<Authorities>;

    /// Changes the authorities (prepare, activate, taint, revoke); the
    /// snapshot after the change.
    fn rotate(&self, rotation: &Rotation) -> Result<Arc<Authorities>, SignerError>;

    /// Re-reads the authorities where another process may have changed
    /// them (a shared signer); the snapshot.
    fn refresh(&self) -> Result<Arc<Authorities>, SignerError> {
        Ok(self.authorities())
    }

    /// Whether several gateways share this signer (so its rotations reach
    /// them all).
    fn shared(&self) -> bool {
        false
    }
}

/// DER of a NameConstraints extension value (RFC 5280, 4.2.1.10) that
/// permits URIs whose host is `trust_domain` (its SPIFFE IDs) and excludes
/// every DNS name and IP address.
fn spiffe_name_constraints(trust_domain: &str) -> Vec<u8> {
    use crate::util::der_tlv as tlv;
    let subtree = |general_name: Vec<u8>| tlv(0x30, &general_name);
    // GeneralName: [6] uniformResourceIdentifier, [2] dNSName, [7] iPAddress.
    let permitted = subtree(tlv(0x86, trust_domain.as_bytes()));
    let excluded: Vec<u8> = [
        subtree(tlv(0x82, b"")),
        subtree(tlv(0x87, &[0; 8])),
        subtree(tlv(0x87, &[0; 32])),
    ]
    .concat();
    tlv(0x30, &[tlv(0xa0, &permitted), tlv(0xa1, &excluded)].concat())
}

/// When every certificate of a PEM chain is valid at once.
fn validity(pem_text: &str) -> Result<(OffsetDateTime, OffsetDateTime), SignerError> {
    let at = |t: x509_parser::time::ASN1Time| {
        OffsetDateTime::from_unix_timestamp(t.timestamp()).map_err(|e| SignerError::Key(e.to_string()))
    };
    let mut window: Option<(OffsetDateTime, OffsetDateTime)> = None;
    for pem in x509_parser::pem::Pem::iter_from_buffer(pem_text.as_bytes()) {
        let pem = pem.map_err(|e| SignerError::Key(e.to_string()))?;
        let cert = pem.parse_x509().map_err(|e| SignerError::Key(e.to_string()))?;
        let (from, until) = (at(cert.validity().not_before)?, at(cert.validity().not_after)?);
        window = Some(match window {
            Some((f, u)) => (f.max(from), u.min(until)),
            None => (from, until),
        });
    }
    window.ok_or_else(|| SignerError::Key("no certificate".into()))
}

/// Why an authority valid from `from` until `until` cannot sign at `now`.
pub fn authority_problem(from: OffsetDateTime, until: OffsetDateTime, now: OffsetDateTime) -> String {
    if now < from {
        format!(
            "the CA is not valid until {}: check this host's clock",
            crate::util::rfc3339(from)
        )
    } else {
        format!(
            "the CA expired at {}: nothing it signed would be valid; rotate the CA",
            crate::util::rfc3339(until)
        )
    }
}

/// 128 random bits, top bit clear so the DER INTEGER stays positive and
/// 16 bytes long.
fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = crate::util::random_bytes();
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::from_slice(&b)
}

fn finish(
    cert: rcgen::Certificate,
    params: &CertificateParams,
    authority: &str,
    chain_pem: &str,
) -> IssuedCertificate {
    let serial = params
        .serial_number
        .as_ref()
        .map(|s| hex::encode(s.as_ref()))
        .unwrap_or_default();
    IssuedCertificate {
        der: cert.der().to_vec(),
        pem: cert.pem(),
        serial,
        not_before: params.not_before,
        not_after: params.not_after,
        authority: authority.to_owned(),
        chain_pem: chain_pem.to_owned(),
    }
}

/// The public JWK of a P-256 key.
pub fn p256_jwk(key: &KeyPair, kid: &str) -> serde_json::Value {
    p256_jwk_of_point(key.public_key_raw(), kid)
}

/// The public JWK of a P-256 key given as its uncompressed point.
pub fn p256_jwk_of_point(raw: &[u8], kid: &str) -> serde_json::Value {
    use base64::Engine as _;
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[33..65]),
    })
}

/// A JWS over `claims` with `key`, its header carrying `kid` and `typ: JWT`.
fn encode_jwt(
    claims: &impl serde::Serialize,
    algorithm: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
    kid: &str,
) -> Result<String, SignerError> {
    let mut header = jsonwebtoken::Header::new(algorithm);
    header.kid = Some(kid.to_owned());
    header.typ = Some("JWT".into());
    Ok(jsonwebtoken::encode(&header, claims, key)?)
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url) of an EC or RSA public JWK.
pub fn jwk_thumbprint(jwk: &serde_json::Value) -> String {
    use base64::Engine as _;
    let f = |k: &str| jwk.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    // Required members only, in lexicographic order, no whitespace.
    let canonical = match f("kty") {
        "RSA" => format!(r#"{{"e":"{}","kty":"RSA","n":"{}"}}"#, f("e"), f("n")),
        "OKP" => format!(r#"{{"crv":"{}","kty":"OKP","x":"{}"}}"#, f("crv"), f("x")),
        _ => format!(
            r#"{{"crv":"{}","kty":"EC","x":"{}","y":"{}"}}"#,
            f("crv"),
            f("x"),
            f("y")
        ),
    };
    use sha2::Digest;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(canonical.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of RFC 7638, section 3.1.
    #[test]
    fn thumbprint_matches_rfc_7638() {
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            jwk_thumbprint(&jwk),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }
}
