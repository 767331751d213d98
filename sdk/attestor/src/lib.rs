//! Write a Castellan attestor module in Rust.
//!
//! ```ignore
//! use castellan_attestor_sdk::{Attestation, Attestor, Context, Error, JwtTrustSources, attestor};
//!
//! struct CiJob;
//!
//! impl Attestor for CiJob {
//!     type Config = JwtTrustSources;
//!     fn attest(evidence: &str, config: JwtTrustSources, _: &Context) -> Result<Attestation, Error> {
//!         let jwt = config.verify(evidence)?;          // host-side signature check
//!         let repo = jwt.claim_str("repository")?;
//!         Ok(Attestation::new(format!("repo/{repo}")).selector("ci", "repo", &repo))
//!     }
//! }
//!
//! attestor!(CiJob);
//! ```
//!
//! The module is a `wasm32-wasip2` component. On wasm32 this crate makes it
//! `no_std` (a global allocator, a panic handler that traps, the canonical
//! ABI's `cabi_realloc`), so the module imports nothing but the Castellan
//! host capabilities it uses: `crypto` ([`host::verify_jws`]), `clock`
//! ([`host::now`]) and `log` ([`host::log`]). Its bundle manifest must grant
//! each capability it imports, or the gateway refuses to load it.

#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::borrow::ToOwned;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

pub use base64;
pub use serde;
pub use serde_json;

/// The WIT bindings, generated once here; modules use them through
/// [`attestor!`] and the wrappers below.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "attestor",
        path: "../../plugins-wasm/wit",
        pub_export_macro: true,
        export_macro_name: "export",
        default_bindings_module: "castellan_attestor_sdk::bindings",
        type_section_suffix: "castellan-attestor-sdk",
    });
}

use bindings::castellan::attestor::types as wit;

/// Request facts the host passes.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Context {
    #[serde(default)]
    pub trust_domain: String,
    /// Hex SHA-256 of the DER SubjectPublicKeyInfo the caller wants
    /// certified, when the request carries one: evidence that can name it
    /// should, and the module should check it does.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// The server challenge the evidence named (`challenge_id`), already
    /// taken by the host: it cannot be answered twice.
    #[serde(default)]
    pub challenge: Option<Challenge>,
}

/// A server challenge as the host resolved it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Challenge {
    pub id: String,
    /// Base64 of 32 random bytes.
    pub nonce: String,
    pub expires_at: i64,
    /// Method-specific material the host kept for the module.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// What a module proved.
#[derive(Debug, Clone)]
pub struct Attestation {
    subject: String,
    selectors: Vec<String>,
    claims: Map<String, Value>,
}

impl Attestation {
    /// An attestation of `subject` (e.g. `repo/acme/api`).
    pub fn new(subject: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            selectors: Vec::new(),
            claims: Map::new(),
        }
    }

    /// Adds the selector `kind:key:value`.
    pub fn selector(mut self, kind: &str, key: &str, value: &str) -> Self {
        self.selectors.push(format!("{kind}:{key}:{value}"));
        self
    }

    /// Adds a verified claim for policy.
    pub fn claim(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.claims.insert(key.to_owned(), value.into());
        self
    }

    /// Marks the evidence as good for one use: the host refuses a second
    /// attestation with the same `id` (per method) until `until` (Unix
    /// seconds). Modules have no memory between calls; the host keeps it.
    pub fn single_use(mut self, id: &str, until: i64) -> Self {
        self.claims.insert(
            SINGLE_USE_CLAIM.to_owned(),
            serde_json::json!({ "id": id, "until": until }),
        );
        self
    }
}

/// The reserved claim [`Attestation::single_use`] sets; the host removes it
/// before policy sees the claims.
pub const SINGLE_USE_CLAIM: &str = "_single_use";

/// Why evidence was refused. The text reaches the caller: never put the
/// evidence itself or a secret in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The evidence does not parse.
    Malformed(String),
    /// The evidence parsed but did not verify.
    Rejected(String),
    /// No configured trust source fits the evidence.
    NoTrustSource(String),
    /// The module's configuration is unusable.
    Config(String),
}

impl Error {
    pub fn malformed(m: impl Into<String>) -> Self {
        Self::Malformed(m.into())
    }

    pub fn rejected(m: impl Into<String>) -> Self {
        Self::Rejected(m.into())
    }
}

/// Parses JSON evidence into `T`, which must come as a JSON object: serde
/// would also take a struct's fields as an array, in order, which no client
/// sends and no module should accept.
pub fn json_evidence<T: DeserializeOwned>(evidence: &str) -> Result<T, Error> {
    if !evidence.trim_start().starts_with('{') {
        return Err(Error::malformed("evidence is not a JSON object"));
    }
    serde_json::from_str(evidence).map_err(|_| Error::malformed("evidence is not the expected JSON"))
}

/// A module's entry point: implement it and call [`attestor!`].
pub trait Attestor {
    /// The configuration the host passes, deserialised from JSON.
    type Config: DeserializeOwned;

    /// Verifies `evidence` and says what it proves.
    fn attest(evidence: &str, config: Self::Config, context: &Context) -> Result<Attestation, Error>;
}

/// The host capabilities.
pub mod host {
    use super::*;
    use crate::bindings::castellan::attestor::{clock, crypto, log as wlog};

    /// A JWS the host verified: its decoded header and payload.
    #[derive(Debug, Clone)]
    pub struct VerifiedJws {
        pub header: Value,
        pub claims: Map<String, Value>,
        /// The signature segment (base64url).
        pub signature: String,
        /// Lowercase hex SHA-256 of the signed content (`header.payload`).
        pub content_sha256: String,
        /// Set by [`JwtTrustSources::verify_bound`] when an audience bound
        /// the token to the key the request certifies.
        pub key_bound: bool,
    }

    impl VerifiedJws {
        /// A string claim, or a rejection naming it.
        pub fn claim_str(&self, name: &str) -> Result<String, Error> {
            self.claims
                .get(name)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Error::rejected(format!("token has no `{name}` claim")))
        }

        /// A string claim fit to become a selector value: 1 to 256 bytes,
        /// no control characters.
        pub fn claim_selector(&self, name: &str) -> Result<String, Error> {
            let v = self.claim_str(name)?;
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                return Err(Error::rejected(format!(
                    "claim `{name}` is empty, too long or has control characters"
                )));
            }
            Ok(v)
        }

        /// Like [`Self::claim_selector`], for a claim that may be absent.
        pub fn optional_selector(&self, name: &str) -> Result<Option<String>, Error> {
            match self.claims.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => self.claim_selector(name).map(Some),
            }
        }

        /// A numeric claim.
        pub fn claim_i64(&self, name: &str) -> Option<i64> {
            self.claims.get(name).and_then(Value::as_i64)
        }

        /// Until when a single use of this token must be remembered: as
        /// long as [`JwtTrustSources::verify`] would still accept it
        /// (`exp` plus the leeway).
        pub fn usable_until(&self) -> i64 {
            self.claim_i64("exp")
                .unwrap_or_default()
                .saturating_add(JWT_LEEWAY_SECONDS)
        }

        /// What identifies this token for replay protection: its `jti` when
        /// it has one, else a hash of its signed content. Never the
        /// signature: an ECDSA signature `(r, s)` has a twin `(r, n−s)` that
        /// verifies the same content, and would be a second "new" token.
        pub fn replay_id(&self) -> String {
            match self.claims.get("jti").and_then(Value::as_str) {
                Some(jti) if !jti.is_empty() && jti.len() <= 200 => format!("jti:{jti}"),
                _ => format!("content:{}", self.content_sha256),
            }
        }
    }

    /// `crypto`: verifies a compact JWS with the host's key set `key_set`
    /// (asymmetric algorithms only; the key is chosen by `kid`).
    pub fn verify_jws(key_set: &str, compact: &str) -> Result<VerifiedJws, Error> {
        let v =
            crypto::verify_jws(key_set, compact).map_err(|e| Error::rejected(format!("signature: {e}")))?;
        let header =
            serde_json::from_str(&v.header_json).map_err(|_| Error::malformed("header is not JSON"))?;
        let claims = match serde_json::from_str::<Value>(&v.payload_json) {
            Ok(Value::Object(m)) => m,
            _ => return Err(Error::malformed("payload is not a JSON object")),
        };
        let signature = compact.rsplit('.').next().unwrap_or_default().to_owned();
        let signed = compact.rsplit_once('.').map_or(compact, |(content, _)| content);
        let content_sha256 = <sha2::Sha256 as sha2::Digest>::digest(signed.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(VerifiedJws {
            header,
            claims,
            signature,
            content_sha256,
            key_bound: false,
        })
    }

    /// `crypto`: verifies `signature` over `message` with a DER
    /// SubjectPublicKeyInfo (`rsa-pkcs1-sha256`, `rsa-pss-sha256`,
    /// `ecdsa-p256-sha256`, `ecdsa-p384-sha384`).
    pub fn verify_signature(
        algorithm: &str,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), Error> {
        crypto::verify_signature(algorithm, public_key, message, signature)
            .map_err(|e| Error::rejected(format!("signature: {e}")))
    }

    /// `crypto`: verifies a signature with any certificate of a trust
    /// source's certificate set.
    pub fn verify_with_certificates(
        cert_set: &str,
        algorithm: &str,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), Error> {
        crypto::verify_with_certificates(cert_set, algorithm, message, signature)
            .map_err(|e| Error::rejected(format!("signature: {e}")))
    }

    /// What a verified chain's leaf says.
    pub use crypto::VerifiedCertificate;

    /// `crypto`: verifies a chain (DER, leaf first) to a root of the set.
    pub fn verify_chain(
        cert_set: &str,
        chain: &[Vec<u8>],
        usage: &str,
    ) -> Result<VerifiedCertificate, Error> {
        crypto::verify_chain(cert_set, chain, usage).map_err(|e| Error::rejected(format!("certificate: {e}")))
    }

    /// `crypto`: verifies a PKCS#7 SignedData with the set; returns the content.
    pub fn verify_pkcs7(cert_set: &str, signed_data: &[u8]) -> Result<Vec<u8>, Error> {
        crypto::verify_pkcs7(cert_set, signed_data).map_err(|e| Error::rejected(format!("signature: {e}")))
    }

    /// `crypto`: verifies a TPM 2.0 quote (TPMS_ATTEST and TPMT_SIGNATURE)
    /// by the AK (TPM2B_PUBLIC) over `nonce` and the PCR values given;
    /// returns the quoted bank's algorithm id.
    pub fn verify_tpm_quote(
        ak_public: &[u8],
        attest: &[u8],
        signature: &[u8],
        nonce: &[u8],
        pcrs: &[(u32, Vec<u8>)],
    ) -> Result<u16, Error> {
        crypto::verify_tpm_quote(ak_public, attest, signature, nonce, pcrs).map_err(Error::rejected)
    }

    /// `crypto`: SHA-256.
    pub fn sha256(data: &[u8]) -> Vec<u8> {
        crypto::sha256(data)
    }

    /// `clock`: seconds since the Unix epoch.
    pub fn now() -> i64 {
        clock::now()
    }

    /// `log`: a line in the gateway's log.
    pub fn log(message: &str) {
        wlog::log(wlog::Level::Info, message);
    }
}

/// The configuration of any method: each trust source with its key set,
/// its certificate set (X.509 methods) and its method-specific settings.
#[derive(Debug, Clone, Deserialize)]
pub struct TrustSources {
    pub trust_sources: Vec<TrustSourceConfig>,
}

/// One trust source as a module sees it.
#[derive(Debug, Clone, Deserialize)]
pub struct TrustSourceConfig {
    pub name: String,
    #[serde(default)]
    pub issuer: String,
    #[serde(default)]
    pub audiences: Vec<String>,
    pub key_set: String,
    /// Set when the source has certificates.
    #[serde(default)]
    pub cert_set: Option<String>,
    /// Method-specific settings (an object), or null.
    #[serde(default)]
    pub settings: Value,
}

/// The usual configuration of a JWT method: the trust sources the host
/// passes, each naming its issuer, audiences and key set.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtTrustSources {
    pub trust_sources: Vec<JwtTrustSource>,
}

/// One trust source.
#[derive(Debug, Clone, Deserialize)]
pub struct JwtTrustSource {
    pub name: String,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub key_set: String,
    /// Method-specific settings (an object), or null. JWT methods read
    /// `key_binding` from it (see [`JwtTrustSources::verify_bound`]).
    #[serde(default)]
    pub settings: Value,
}

/// Clock skew allowed on `exp`, `nbf` and `iat`.
pub const JWT_LEEWAY_SECONDS: i64 = 60;

/// What separates an accepted audience from the key digest in a bound
/// audience: `<audience>/key/<hex SHA-256 of the key's DER SPKI>`.
pub const KEY_BINDING_INFIX: &str = "/key/";

/// How one audience relates to the accepted ones.
enum AudienceMatch {
    None,
    /// An accepted audience as it is.
    Plain,
    /// An accepted audience naming a key: the lowercase hex digest.
    Bound(String),
}

fn match_audience(accepted: &[String], aud: &str) -> AudienceMatch {
    if accepted.iter().any(|a| a == aud) {
        return AudienceMatch::Plain;
    }
    for prefix in accepted {
        let digest = aud
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_prefix(KEY_BINDING_INFIX));
        if let Some(digest) = digest
            && digest.len() == 64
            && digest
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return AudienceMatch::Bound(digest.to_owned());
        }
    }
    AudienceMatch::None
}

/// A trust source's audiences and its `settings.key_binding`
/// (`"optional"`, the default, or `"required"`).
pub struct AudienceRule<'a> {
    pub source: &'a str,
    pub accepted: &'a [String],
    pub settings: &'a Value,
}

impl AudienceRule<'_> {
    /// Checks a token's `aud` values. With `binding` (the request's
    /// context), an audience may also name the key being certified as
    /// `<accepted>/key/<hex SHA-256 of its DER SubjectPublicKeyInfo>`, and
    /// must then name exactly `context.key_sha256`. Returns whether the
    /// token is bound to the requested key.
    pub fn check(&self, audiences: &[&str], binding: Option<&Context>) -> Result<bool, Error> {
        let mut plain = false;
        let mut bound: Option<String> = None;
        for aud in audiences {
            match match_audience(self.accepted, aud) {
                AudienceMatch::Plain => plain = true,
                // Only where the caller asked for binding; elsewhere a
                // bound-looking audience is just not an accepted one.
                AudienceMatch::Bound(digest) if binding.is_some() => {
                    if bound.as_ref().is_some_and(|b| *b != digest) {
                        return Err(Error::rejected("token audiences name two different keys"));
                    }
                    bound = Some(digest);
                }
                _ => {}
            }
        }
        if !plain && bound.is_none() {
            return Err(Error::rejected("token audience is not accepted"));
        }
        let Some(context) = binding else {
            return Ok(false);
        };
        match (bound, context.key_sha256.as_deref()) {
            (Some(digest), Some(key)) if digest.eq_ignore_ascii_case(key) => Ok(true),
            (Some(_), Some(_)) => Err(Error::rejected(
                "token is bound to another key than the one requested",
            )),
            (Some(_), None) => Err(Error::rejected(
                "token is bound to a key, but the request certifies none (send a CSR)",
            )),
            (None, _) if self.key_binding_required()? => Err(Error::rejected(format!(
                "trust source `{}` requires the token's audience to name the requested key \
                 (`<audience>{KEY_BINDING_INFIX}<hex SHA-256 of the key's DER SubjectPublicKeyInfo>`)",
                self.source
            ))),
            (None, _) => Ok(false),
        }
    }

    fn key_binding_required(&self) -> Result<bool, Error> {
        match self.settings.get("key_binding") {
            None | Some(Value::Null) => Ok(false),
            Some(Value::String(s)) if s == "optional" => Ok(false),
            Some(Value::String(s)) if s == "required" => Ok(true),
            Some(_) => Err(Error::Config(format!(
                "trust source `{}`: settings.key_binding must be \"optional\" or \"required\"",
                self.source
            ))),
        }
    }
}

impl JwtTrustSources {
    /// Picks the trust source by the token's (unverified) `iss`, verifies
    /// the signature with its keys, then checks issuer, audience, `exp`,
    /// `nbf` and `iat` (60 s leeway). Returns the verified token. Only the
    /// accepted audiences themselves pass: for issuers that let the caller
    /// choose the audience, use [`Self::verify_bound`].
    pub fn verify(&self, token: &str) -> Result<host::VerifiedJws, Error> {
        self.verify_with(token, None)
    }

    /// Like [`Self::verify`], for issuers that let the caller choose the
    /// audience: the audience may also name the key the request certifies,
    /// as `<accepted audience>/key/<hex SHA-256 of its DER
    /// SubjectPublicKeyInfo>` ([`KEY_BINDING_INFIX`]). A bound token must
    /// name exactly `context.key_sha256`, so it is worthless with any other
    /// key; `settings.key_binding = "required"` refuses unbound tokens.
    /// The returned token's `key_bound` says which it was.
    pub fn verify_bound(&self, token: &str, context: &Context) -> Result<host::VerifiedJws, Error> {
        self.verify_with(token, Some(context))
    }

    fn verify_with(&self, token: &str, binding: Option<&Context>) -> Result<host::VerifiedJws, Error> {
        use base64::Engine as _;
        let payload = token
            .trim()
            .split('.')
            .nth(1)
            .ok_or_else(|| Error::malformed("not a compact JWS"))?;
        let unverified: Value = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| Error::malformed("payload is not base64url JSON"))?;
        let iss = unverified
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::rejected("no `iss`"))?;
        if self.trust_sources.is_empty() {
            return Err(Error::NoTrustSource("no trust source is configured".into()));
        }
        // Several sources may share an issuer: the one whose keys verify the
        // signature is the source.
        let mut first_refusal = None;
        let mut verified = None;
        for candidate in self.trust_sources.iter().filter(|s| s.issuer == iss) {
            match host::verify_jws(&candidate.key_set, token.trim()) {
                Ok(jwt) => {
                    verified = Some((candidate, jwt));
                    break;
                }
                Err(e) => {
                    first_refusal.get_or_insert(e);
                }
            }
        }
        let (source, jwt) = match (verified, first_refusal) {
            (Some(v), _) => v,
            (None, Some(e)) => return Err(e),
            (None, None) => return Err(Error::rejected("issuer is not trusted")),
        };
        if jwt.claims.get("iss").and_then(Value::as_str) != Some(source.issuer.as_str()) {
            return Err(Error::rejected("issuer does not match the trust source"));
        }
        let audiences: Vec<&str> = match jwt.claims.get("aud") {
            Some(Value::String(a)) => alloc::vec![a.as_str()],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let rule = AudienceRule {
            source: &source.name,
            accepted: &source.audiences,
            settings: &source.settings,
        };
        let key_bound = rule.check(&audiences, binding)?;
        let mut jwt = jwt;
        jwt.key_bound = key_bound;
        let now = host::now();
        let exp = jwt.claim_i64("exp").ok_or_else(|| Error::rejected("no `exp`"))?;
        if now > exp.saturating_add(JWT_LEEWAY_SECONDS) {
            return Err(Error::rejected("token has expired"));
        }
        if jwt.claim_i64("nbf").is_some_and(|t| now + JWT_LEEWAY_SECONDS < t)
            || jwt.claim_i64("iat").is_some_and(|t| now + JWT_LEEWAY_SECONDS < t)
        {
            return Err(Error::rejected("token is not valid yet"));
        }
        Ok(jwt)
    }
}

/// Runs an [`Attestor`]; called by the code [`attestor!`] generates.
#[doc(hidden)]
pub fn run<T: Attestor>(
    evidence: String,
    config: String,
    context: String,
) -> Result<wit::Attestation, wit::AttestError> {
    let config: T::Config =
        serde_json::from_str(&config).map_err(|e| wit::AttestError::Config(format!("configuration: {e}")))?;
    let context: Context = serde_json::from_str(&context).unwrap_or_default();
    match T::attest(&evidence, config, &context) {
        Ok(a) => Ok(wit::Attestation {
            subject: a.subject,
            selectors: a.selectors,
            claims_json: Value::Object(a.claims).to_string(),
        }),
        Err(Error::Malformed(m)) => Err(wit::AttestError::Malformed(m)),
        Err(Error::Rejected(m)) => Err(wit::AttestError::Rejected(m)),
        Err(Error::NoTrustSource(m)) => Err(wit::AttestError::NoTrustSource(m)),
        Err(Error::Config(m)) => Err(wit::AttestError::Config(m)),
    }
}

/// Exports `$t` (an [`Attestor`]) as the module's `attest` function.
#[macro_export]
macro_rules! attestor {
    ($t:ty) => {
        #[doc(hidden)]
        pub struct __CastellanAttestorExport;

        impl $crate::bindings::Guest for __CastellanAttestorExport {
            fn attest(
                evidence: $crate::__private::String,
                config: $crate::__private::String,
                context: $crate::__private::String,
            ) -> ::core::result::Result<
                $crate::bindings::castellan::attestor::types::Attestation,
                $crate::bindings::castellan::attestor::types::AttestError,
            > {
                $crate::run::<$t>(evidence, config, context)
            }
        }

        $crate::bindings::export!(__CastellanAttestorExport with_types_in $crate::bindings);
    };
}

#[doc(hidden)]
pub mod __private {
    pub use alloc::string::String;
}

// What std would have given a module on wasm32.
#[cfg(target_arch = "wasm32")]
mod rt {
    use alloc::alloc::{Layout, alloc, realloc};

    #[global_allocator]
    static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

    /// A panic is a trap: the host sees the call fail and refuses the request.
    #[panic_handler]
    fn panic(_: &core::panic::PanicInfo) -> ! {
        core::arch::wasm32::unreachable()
    }

    /// The canonical ABI's allocator, which std exports on wasip2.
    #[unsafe(no_mangle)]
    unsafe extern "C" fn cabi_realloc(
        old_ptr: *mut u8,
        old_len: usize,
        align: usize,
        new_len: usize,
    ) -> *mut u8 {
        if new_len == 0 {
            return align as *mut u8;
        }
        // SAFETY: the canonical ABI passes a power-of-two alignment and, for a
        // reallocation, the pointer and size it was given earlier.
        let ptr = unsafe {
            if old_len == 0 {
                alloc(Layout::from_size_align_unchecked(new_len, align))
            } else {
                realloc(
                    old_ptr,
                    Layout::from_size_align_unchecked(old_len, align),
                    new_len,
                )
            }
        };
        if ptr.is_null() {
            core::arch::wasm32::unreachable()
        }
        ptr
    }
}

/// Call once from a module that does not use [`attestor!`] so the linker
/// keeps the runtime above.
#[inline(always)]
pub fn link() {}
