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

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use time::{Duration, OffsetDateTime};

use crate::ca::CaMaterial;
use crate::spiffe_id::SpiffeId;

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
#[derive(Debug, Clone, serde::Serialize)]
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
#[derive(Debug, Clone, serde::Serialize)]
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct Confirmation {
    pub jkt: String,
}

/// One level of an RFC 8693 `act` claim, nesting the one before it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ActClaim {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<ActClaim>>,
}

/// The task an agent identity is scoped to.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskClaim {
    pub id: String,
    pub purpose: String,
}

/// The claims of a join token: a one-time bootstrap credential for a host,
/// verified by the `join_token` attestor like any token.
#[derive(Debug, Clone, serde::Serialize)]
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
}

/// Signs credentials. Implementations: [`InProcessSigner`] (embedded), and
/// later a client for a separate signer process. Blocking (see the module
/// documentation).
pub trait Signer: Send + Sync + 'static {
    /// Mints an X.509-SVID for the template; refuses an identity outside the
    /// signer's trust domain.
    fn sign_x509_svid(&self, template: &Template) -> Result<IssuedCertificate, SignerError>;

    /// When the X.509 authority that signs leaves can be relied on: its
    /// certificate's validity, within every certificate above it. No leaf
    /// is signed outside it.
    fn x509_authority_validity(&self) -> (OffsetDateTime, OffsetDateTime);

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

    /// Intermediate certificates (PEM) that complete a leaf's chain.
    fn intermediates_pem(&self) -> &str;

    /// Trust anchors (PEM) relying parties verify chains against.
    fn bundle_pem(&self) -> &str;

    /// Signs a JWT-SVID with `alg`; the header carries `kid` and `typ: JWT`.
    /// Refuses a `sub` outside the signer's trust domain.
    fn sign_jwt_svid(&self, claims: &JwtSvidClaims, alg: JwtAlg) -> Result<String, SignerError>;

    /// Signs a join token (ES256) with the JWT key.
    fn sign_join_token(&self, claims: &JoinTokenClaims) -> Result<String, SignerError>;

    /// The public JWT signing keys as a JWKS, for relying parties.
    fn jwks(&self) -> serde_json::Value;

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
}

/// Signs in this process with the intermediate CA key.
pub struct InProcessSigner {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    /// What signs subordinate CAs: the root, or under an upstream
    /// authority Castellan's own CA.
    root: Issuer<'static, KeyPair>,
    jwt_key: jsonwebtoken::EncodingKey,
    jwt_kid: String,
    /// The optional RS256 JWT-SVID key and its `kid`.
    rsa_jwt: Option<(jsonwebtoken::EncodingKey, String)>,
    jwks: serde_json::Value,
    /// The signing authority's validity, within the root's.
    authority_not_before: OffsetDateTime,
    authority_not_after: OffsetDateTime,
    intermediates_pem: String,
    bundle_pem: String,
}

impl InProcessSigner {
    /// Loads the intermediate key and certificate; the signer signs for
    /// `trust_domain` only.
    pub fn new(ca: &CaMaterial, trust_domain: &str) -> Result<Self, SignerError> {
        let key = KeyPair::from_pem(&ca.intermediate_key_pem).map_err(|e| SignerError::Key(e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca.intermediate_cert_pem, key)
            .map_err(|e| SignerError::Key(format!("intermediate certificate: {e}")))?;
        // Subordinate CAs come from the root, or, under an upstream
        // authority (whose key Castellan does not hold), from Castellan's CA.
        let (sub_cert, sub_key) = match &ca.root_key_pem {
            Some(key) => (&ca.root_cert_pem, key),
            None => (&ca.intermediate_cert_pem, &ca.intermediate_key_pem),
        };
        let sub_key = KeyPair::from_pem(sub_key).map_err(|e| SignerError::Key(format!("root key: {e}")))?;
        let root = Issuer::from_ca_cert_pem(sub_cert, sub_key)
            .map_err(|e| SignerError::Key(format!("root certificate: {e}")))?;
        let (int_from, int_until) = validity(&ca.intermediate_cert_pem)?;
        let (root_from, root_until) = validity(&ca.root_cert_pem)?;
        let (authority_not_before, authority_not_after) =
            (int_from.max(root_from), int_until.min(root_until));
        let jwt_pair =
            KeyPair::from_pem(&ca.jwt_key_pem).map_err(|e| SignerError::Key(format!("JWT key: {e}")))?;
        let jwt_key = jsonwebtoken::EncodingKey::from_ec_pem(ca.jwt_key_pem.as_bytes())
            .map_err(|e| SignerError::Key(format!("JWT key: {e}")))?;
        let jwk = p256_jwk(&jwt_pair, "");
        let jwt_kid = jwk_thumbprint(&jwk);
        let mut public = jwk;
        public["kid"] = jwt_kid.clone().into();
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            issuer,
            root,
            jwt_key,
            jwt_kid,
            rsa_jwt: None,
            jwks: serde_json::json!({ "keys": [public] }),
            authority_not_before,
            authority_not_after,
            intermediates_pem: if ca.one_tier() {
                String::new()
            } else {
                ca.intermediate_cert_pem.clone()
            },
            bundle_pem: ca.root_cert_pem.clone(),
        })
    }

    /// Adds an RSA key (PKCS#8 PEM) for RS256 JWT-SVIDs; its public half
    /// joins the JWKS.
    pub fn with_rsa_jwt_key(mut self, pem: &str) -> Result<Self, SignerError> {
        use base64::Engine as _;
        use rsa::pkcs8::DecodePrivateKey as _;
        use rsa::traits::PublicKeyParts as _;
        let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .map_err(|e| SignerError::Key(format!("RSA JWT key: {e}")))?;
        let b64 = |b: Vec<u8>| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let mut jwk = serde_json::json!({
            "kty": "RSA",
            "n": b64(private.n().to_bytes_be()),
            "e": b64(private.e().to_bytes_be()),
        });
        let kid = jwk_thumbprint(&jwk);
        jwk["kid"] = kid.clone().into();
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes())
            .map_err(|e| SignerError::Key(format!("RSA JWT key: {e}")))?;
        if let Some(keys) = self.jwks["keys"].as_array_mut() {
            keys.push(jwk);
        }
        self.rsa_jwt = Some((key, kid));
        Ok(self)
    }

    fn leaf_params(&self, ttl: Duration) -> Result<CertificateParams, SignerError> {
        if ttl <= Duration::ZERO {
            return Err(SignerError::Template("lifetime must be positive".into()));
        }
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        // A leaf never outlives the CA that signed it, nor starts before it;
        // an authority not valid now signs nothing.
        let (from, until) = (self.authority_not_before, self.authority_not_after);
        if now < from || now + Duration::seconds(1) >= until {
            return Err(SignerError::AuthorityUnusable(authority_problem(
                from, until, now,
            )));
        }
        let mut params = CertificateParams::default();
        params.not_before = (now - BACKDATE).max(from);
        params.not_after = (now + ttl).min(until);
        params.serial_number = Some(random_serial());
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Castellan");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        Ok(params)
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

fn finish(cert: rcgen::Certificate, params: &CertificateParams) -> IssuedCertificate {
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
    }
}

/// The public JWK of a P-256 key.
pub fn p256_jwk(key: &KeyPair, kid: &str) -> serde_json::Value {
    use base64::Engine as _;
    let raw = key.public_key_raw();
    serde_json::json!({
        "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[1..33]),
        "y": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[33..65]),
    })
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

impl InProcessSigner {
    /// Refuses an identity outside this signer's trust domain.
    fn check_identity(&self, id: &SpiffeId) -> Result<(), SignerError> {
        if id.trust_domain() != self.trust_domain || id.path().is_empty() {
            return Err(SignerError::ForeignIdentity(id.to_string()));
        }
        Ok(())
    }

    fn sign_jwt(
        &self,
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
}

impl Signer for InProcessSigner {
    fn sign_jwt_svid(&self, claims: &JwtSvidClaims, alg: JwtAlg) -> Result<String, SignerError> {
        self.check_identity(&claims.sub)?;
        if claims.aud.is_empty() || claims.exp <= claims.iat {
            return Err(SignerError::Template(
                "a JWT-SVID needs an audience and a lifetime".into(),
            ));
        }
        let (algorithm, key, kid) = match (alg, &self.rsa_jwt) {
            (JwtAlg::ES256, _) => (jsonwebtoken::Algorithm::ES256, &self.jwt_key, &self.jwt_kid),
            (JwtAlg::RS256, Some((key, kid))) => (jsonwebtoken::Algorithm::RS256, key, kid),
            (JwtAlg::RS256, None) => return Err(SignerError::NoKey(alg)),
        };
        self.sign_jwt(claims, algorithm, key, kid)
    }

    fn sign_join_token(&self, claims: &JoinTokenClaims) -> Result<String, SignerError> {
        self.sign_jwt(
            claims,
            jsonwebtoken::Algorithm::ES256,
            &self.jwt_key,
            &self.jwt_kid,
        )
    }

    fn jwks(&self) -> serde_json::Value {
        self.jwks.clone()
    }

    fn sign_x509_svid(&self, t: &Template) -> Result<IssuedCertificate, SignerError> {
        self.check_identity(&t.spiffe_id)?;
        let public_key = SubjectPublicKeyInfo::from_der(&t.public_key_der)
            .map_err(|e| SignerError::PublicKey(e.to_string()))?;
        let mut params = self.leaf_params(t.ttl)?;
        let uri = t
            .spiffe_id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| SignerError::Template(e.to_string()))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        for dns in &t.dns_names {
            if !crate::util::valid_dns_name(dns) {
                return Err(SignerError::Template(format!("`{dns}` is not a valid DNS name")));
            }
            let name = dns
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| SignerError::Template(e.to_string()))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.custom_extensions = t
            .extensions
            .iter()
            .map(|(oid, der)| CustomExtension::from_oid_content(oid, der.clone()))
            .collect();
        let cert = params.signed_by(&public_key, &self.issuer)?;
        Ok(finish(cert, &params))
    }

    fn sign_subordinate_ca(
        &self,
        public_key_der: &[u8],
        common_name: &str,
        ttl: Duration,
    ) -> Result<IssuedCertificate, SignerError> {
        let key = SubjectPublicKeyInfo::from_der(public_key_der)
            .map_err(|e| SignerError::PublicKey(e.to_string()))?;
        if common_name.is_empty() || common_name.len() > 64 || common_name.chars().any(char::is_control) {
            return Err(SignerError::Template(
                "a subordinate CA needs a name of 1 to 64 characters".into(),
            ));
        }
        let mut params = self.leaf_params(ttl)?;
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.distinguished_name.push(DnType::CommonName, common_name);
        let mut constraints =
            CustomExtension::from_oid_content(&[2, 5, 29, 30], spiffe_name_constraints(&self.trust_domain));
        constraints.set_criticality(true);
        params.custom_extensions = vec![constraints];
        let cert = params.signed_by(&key, &self.root)?;
        Ok(finish(cert, &params))
    }

    fn x509_authority_validity(&self) -> (OffsetDateTime, OffsetDateTime) {
        (self.authority_not_before, self.authority_not_after)
    }

    fn intermediates_pem(&self) -> &str {
        &self.intermediates_pem
    }

    fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    fn issue_server_certificate(
        &self,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        public_key_der: &[u8],
    ) -> Result<String, SignerError> {
        self.check_identity(spiffe_id)?;
        let key = SubjectPublicKeyInfo::from_der(public_key_der)
            .map_err(|e| SignerError::PublicKey(e.to_string()))?;
        let mut params = self.leaf_params(Duration::days(90))?;
        params.is_ca = IsCa::ExplicitNoCa;
        params
            .distinguished_name
            .push(DnType::CommonName, "Castellan API");
        let uri = spiffe_id
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| SignerError::Template(e.to_string()))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for dns in dns_names {
            let name = dns
                .clone()
                .try_into()
                .map_err(|e: rcgen::Error| SignerError::Template(e.to_string()))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(format!("{}{}", cert.pem(), self.intermediates_pem))
    }
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

    #[test]
    fn jwts_carry_the_thumbprint_kid_and_verify_with_the_published_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::load_or_create(&dir.path().join("ca"), "example.org", true).unwrap();
        let signer = InProcessSigner::new(&ca, "example.org").unwrap();
        let claims = |sub: &str| JwtSvidClaims {
            sub: SpiffeId::parse(sub).unwrap(),
            aud: vec!["a".into()],
            iat: 1,
            exp: 4_000_000_000,
            iss: None,
            jti: None,
            agent: None,
        };
        let token = signer
            .sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::ES256)
            .unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        let jwks = signer.jwks();
        assert_eq!(header.kid.as_deref(), jwks["keys"][0]["kid"].as_str());
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        let keys = crate::trust::KeySet::from_jwks(&jwks).unwrap();
        keys.verify_compact(&token).unwrap();
        assert!(jwks["keys"][0].get("d").is_none(), "public only");
        // Purpose: nothing outside the trust domain, in any shape.
        assert!(matches!(
            signer.sign_jwt_svid(&claims("spiffe://evil.org/a"), JwtAlg::ES256),
            Err(SignerError::ForeignIdentity(_))
        ));
        assert!(matches!(
            signer.sign_jwt_svid(&claims("spiffe://example.org/a"), JwtAlg::RS256),
            Err(SignerError::NoKey(JwtAlg::RS256))
        ));
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let template = |id: &str| Template {
            spiffe_id: SpiffeId::parse(id).unwrap(),
            public_key_der: rcgen::PublicKeyData::subject_public_key_info(&key),
            ttl: Duration::minutes(5),
            dns_names: vec![],
            extensions: vec![],
        };
        assert!(signer.sign_x509_svid(&template("spiffe://example.org/w")).is_ok());
        assert!(matches!(
            signer.sign_x509_svid(&template("spiffe://evil.org/w")),
            Err(SignerError::ForeignIdentity(_))
        ));
    }
}
