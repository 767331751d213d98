//! The in-process signer: the embedded default, and what the separate
//! signer process runs. Its keyring is a directory: `authorities.json`
//! (every authority's public description, state and key file, replaced
//! atomically) and the key files (mode 0600). A CA made before rotation
//! existed (`root.key`, `intermediate.key`, `jwt-signing.key`) is taken
//! into the keyring as it is, on first open.
//!
//! Rotation holds one lock; signing never waits for it: the keys that sign
//! are an immutable snapshot swapped whole.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SubjectPublicKeyInfo,
};
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use super::authorities::{Authorities, Authority, Kind, Rotation, State};
use super::keys::{CaKey, KeyStore, fresh_name};
use super::pkcs11::Token;
use super::*;
use crate::ca::CaMaterial;
use crate::spiffe_id::SpiffeId;

/// The keyring's index file in the CA directory.
const KEYRING: &str = "authorities.json";
/// The trust anchors, kept current beside the keyring.
pub const BUNDLE: &str = "bundle.pem";
/// The longest leaf the signer makes (the listener's certificate): what an
/// active authority may have signed before a restart is assumed to last
/// this long.
const LONGEST_LEAF: Duration = Duration::days(90);

/// How long authorities made by rotation live.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// An X.509 authority (a self-signed authority, or an intermediate).
    pub x509: Duration,
    /// A JWT key.
    pub jwt: Duration,
}

impl Lifetimes {
    /// The lives `[ca]` sets.
    pub fn of(ca: &super::config::CaConfig) -> Self {
        let at = |s: u64| Duration::seconds(s.min(i64::MAX as u64) as i64);
        Self {
            x509: at(ca.x509_authority_ttl_seconds),
            jwt: at(ca.jwt_key_ttl_seconds),
        }
    }
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            x509: Duration::days(365),
            jwt: Duration::days(365),
        }
    }
}

/// One authority in the keyring file: what anyone may see, and the files
/// of its keys (relative to the CA directory).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    #[serde(flatten)]
    public: Authority,
    key: String,
    /// The key of the root above an intermediate, which signs successor
    /// intermediates and subordinate CAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    root_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Keyring {
    trust_domain: String,
    generation: u64,
    authorities: Vec<Entry>,
}

/// The keys that sign now, loaded from one keyring state.
struct Loaded {
    keyring: Keyring,
    public: Arc<Authorities>,
    x509: Option<ActiveX509>,
    jwt: Option<ActiveJwt>,
}

struct ActiveX509 {
    id: String,
    issuer: Issuer<'static, CaKey>,
    /// What signs subordinate CAs: the root above, or the authority itself.
    upstream: Issuer<'static, CaKey>,
    chain_pem: String,
    from: OffsetDateTime,
    until: OffsetDateTime,
}

struct ActiveJwt {
    id: String,
    key: CaKey,
    until: i64,
}

/// Signs in this process with keys from its keyring directory.
pub struct InProcessSigner {
    trust_domain: String,
    dir: PathBuf,
    /// Where its keys are (files, or a PKCS#11 token).
    keys: KeyStore,
    lifetimes: Lifetimes,
    /// The life of a listener certificate (at most [`LONGEST_LEAF`]).
    server_cert_ttl: Duration,
    loaded: ArcSwap<Loaded>,
    /// Serialises rotations (signing does not take it).
    rotation: Mutex<()>,
    /// The optional RS256 JWT-SVID key and its `kid`, outside rotation.
    rsa_jwt: Option<(jsonwebtoken::EncodingKey, String)>,
    static_jwks: Vec<serde_json::Value>,
    /// The latest expiry each active authority signed (X.509, JWT).
    signed_until: [AtomicI64; 2],
}

impl InProcessSigner {
    /// Opens the keyring in `ca.dir`, taking `ca` into it on first use; the
    /// signer signs for `trust_domain` only.
    pub fn new(ca: &CaMaterial, trust_domain: &str) -> Result<Self, SignerError> {
        if !keyring_exists(&ca.dir) {
            let keyring = migrate(ca, trust_domain, Lifetimes::default())?;
            save(&ca.dir, &keyring)?;
        }
        Self::open(&ca.dir, trust_domain, None)
    }

    /// Makes a CA whose keys are generated inside `token` (one tier, with
    /// `intermediate` a root and an intermediate, or under `upstream`: its
    /// chain PEM and its key), and opens it.
    pub fn create_in_token(
        dir: &Path,
        trust_domain: &str,
        token: Arc<Token>,
        intermediate: bool,
        upstream: Option<(&str, CaKey)>,
        lifetimes: Lifetimes,
    ) -> Result<Self, SignerError> {
        std::fs::create_dir_all(dir).map_err(|e| SignerError::Key(format!("{}: {e}", dir.display())))?;
        let keys = KeyStore::new(dir, Some(token.clone()));
        let keyring = create_keyring(&keys, trust_domain, intermediate, upstream, lifetimes)?;
        save(dir, &keyring)?;
        Self::open(dir, trust_domain, Some(token))
    }

    /// Opens an existing keyring; keys named `pkcs11:…` are in `token`.
    pub fn open(dir: &Path, trust_domain: &str, token: Option<Arc<Token>>) -> Result<Self, SignerError> {
        let path = dir.join(KEYRING);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| SignerError::Key(format!("{}: {e}", path.display())))?;
        let mut keyring: Keyring =
            serde_json::from_str(&text).map_err(|e| SignerError::Key(format!("{}: {e}", path.display())))?;
        if keyring.trust_domain != trust_domain {
            return Err(SignerError::Key(format!(
                "the keyring in {} is for trust domain `{}`, not `{trust_domain}`",
                dir.display(),
                keyring.trust_domain
            )));
        }
        // What the active authorities signed before this start is not
        // known exactly: assume the longest leaf, from now.
        let assumed = (OffsetDateTime::now_utc() + LONGEST_LEAF).unix_timestamp();
        for e in &mut keyring.authorities {
            if e.public.state == State::Active {
                e.public.signed_until = e.public.signed_until.max(assumed.min(e.public.not_after));
            }
        }
        let keys = KeyStore::new(dir, token);
        let loaded = load(&keys, keyring, &[])?;
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            dir: dir.to_owned(),
            keys,
            lifetimes: Lifetimes::default(),
            server_cert_ttl: LONGEST_LEAF,
            loaded: ArcSwap::from_pointee(loaded),
            rotation: Mutex::new(()),
            rsa_jwt: None,
            static_jwks: Vec::new(),
            signed_until: [AtomicI64::new(0), AtomicI64::new(0)],
        })
    }

    /// How long authorities made by rotation live.
    pub fn with_lifetimes(mut self, lifetimes: Lifetimes) -> Self {
        self.lifetimes = lifetimes;
        self
    }

    /// How long listener certificates live (capped at 90 days).
    pub fn with_server_cert_ttl(mut self, ttl: Duration) -> Self {
        self.server_cert_ttl = ttl.min(LONGEST_LEAF);
        self
    }

    /// Adds an RSA key (PKCS#8 PEM) for RS256 JWT-SVIDs; its public half
    /// joins the JWKS. It stays outside rotation.
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
        self.static_jwks = vec![jwk];
        self.rsa_jwt = Some((key, kid));
        let keyring = self.loaded.load().keyring.clone();
        self.loaded
            .store(Arc::new(load(&self.keys, keyring, &self.static_jwks)?));
        Ok(self)
    }

    /// Refuses an identity outside this signer's trust domain.
    fn check_identity(&self, id: &SpiffeId) -> Result<(), SignerError> {
        if id.trust_domain() != self.trust_domain || id.path().is_empty() {
            return Err(SignerError::ForeignIdentity(id.to_string()));
        }
        Ok(())
    }

    fn leaf_params(&self, x509: &ActiveX509, ttl: Duration) -> Result<CertificateParams, SignerError> {
        if ttl <= Duration::ZERO {
            return Err(SignerError::Template("lifetime must be positive".into()));
        }
        let now = OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap_or_else(|_| OffsetDateTime::now_utc());
        // A leaf never outlives the CA that signed it, nor starts before it;
        // an authority not valid now signs nothing.
        let (from, until) = (x509.from, x509.until);
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
        self.signed_until[0].fetch_max(params.not_after.unix_timestamp(), Ordering::Relaxed);
        Ok(params)
    }

    /// Runs `f` with the active X.509 authority.
    fn with_x509<T>(&self, f: impl FnOnce(&ActiveX509) -> Result<T, SignerError>) -> Result<T, SignerError> {
        match &self.loaded.load().x509 {
            Some(x509) => f(x509),
            None => Err(SignerError::AuthorityUnusable(
                "no X.509 authority is active: activate one (castellan ca list)".into(),
            )),
        }
    }

    fn sign_jwt(&self, claims: &impl Serialize, exp: i64) -> Result<String, SignerError> {
        let loaded = self.loaded.load();
        let Some(jwt) = &loaded.jwt else {
            return Err(SignerError::AuthorityUnusable("no JWT key is active".into()));
        };
        if OffsetDateTime::now_utc().unix_timestamp() >= jwt.until {
            return Err(SignerError::AuthorityUnusable(
                "the JWT key expired: rotate it (castellan ca prepare --jwt)".into(),
            ));
        }
        if exp > jwt.until {
            return Err(SignerError::Template(format!(
                "the token would outlive its key (until {})",
                jwt.until
            )));
        }
        self.signed_until[1].fetch_max(exp, Ordering::Relaxed);
        jwt.key.sign_jwt(claims, &jwt.id)
    }

    /// Applies `rotation` to `keyring` at `now`: the new keyring, and the
    /// key files no published authority needs any more.
    fn apply(
        &self,
        keyring: &mut Keyring,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<(), SignerError> {
        let t = now.unix_timestamp();
        match rotation {
            Rotation::Prepare { kind, root } => {
                let entry = self.prepare(keyring, *kind, *root, now)?;
                keyring.authorities.push(entry);
            }
            Rotation::Activate { id } => {
                let idx = find(keyring, id)?;
                let target = &keyring.authorities[idx].public;
                if target.state != State::Prepared {
                    return Err(refused(format!(
                        "{id} is {}: only a prepared authority can be activated",
                        target.state
                    )));
                }
                if t < target.not_before || t >= target.not_after {
                    return Err(refused(format!("{id} is not valid now")));
                }
                let kind = target.kind;
                let slot = usize::from(kind == Kind::Jwt);
                for e in &mut keyring.authorities {
                    if e.public.kind == kind && e.public.state == State::Active {
                        e.public.state = State::Retired;
                        e.public.retired_at = Some(t);
                        let signed = self.signed_until[slot].load(Ordering::Relaxed);
                        e.public.signed_until = e.public.signed_until.max(signed);
                    }
                }
                let target = &mut keyring.authorities[idx].public;
                target.state = State::Active;
                target.activated_at = Some(t);
            }
            Rotation::Taint { id } => {
                let idx = find(keyring, id)?;
                let a = &mut keyring.authorities[idx].public;
                if a.state != State::Retired {
                    return Err(refused(format!(
                        "{id} is {}: only a retired authority can be tainted (activate its successor first)",
                        a.state
                    )));
                }
                if a.tainted {
                    return Err(refused(format!("{id} is already tainted")));
                }
                a.tainted = true;
                a.tainted_at = Some(t);
            }
            Rotation::Revoke { id } => {
                let idx = find(keyring, id)?;
                let a = &mut keyring.authorities[idx].public;
                match a.state {
                    State::Prepared => {}
                    State::Retired if a.tainted || a.signed_until <= t || a.not_after <= t => {}
                    State::Retired => {
                        return Err(SignerError::AuthorityInUse {
                            id: id.clone(),
                            until: crate::util::rfc3339(
                                OffsetDateTime::from_unix_timestamp(a.signed_until).unwrap_or(now),
                            ),
                        });
                    }
                    state => {
                        return Err(refused(format!(
                            "{id} is {state}: only a prepared or retired authority can be revoked"
                        )));
                    }
                }
                a.state = State::Revoked;
                a.revoked_at = Some(t);
            }
        }
        keyring.generation += 1;
        Ok(())
    }

    /// A new authority of `kind`, its keys made (in the token, when the
    /// signer has one).
    fn prepare(
        &self,
        keyring: &Keyring,
        kind: Kind,
        root: bool,
        now: OffsetDateTime,
    ) -> Result<Entry, SignerError> {
        let (td, keys, t) = (&self.trust_domain, &self.keys, now.unix_timestamp());
        if kind == Kind::Jwt {
            let (key, name) = keys.generate(&fresh_name("jwt"))?;
            let mut jwk = key.jwk("");
            let id = jwk_thumbprint(&jwk);
            jwk["kid"] = id.clone().into();
            let until = (now + self.lifetimes.jwt).unix_timestamp();
            return Ok(Entry {
                public: Authority::prepared(id, Kind::Jwt, t - 60, until, t).with_jwk(jwk),
                key: name,
                root_key: None,
            });
        }
        let active = keyring
            .authorities
            .iter()
            .find(|e| e.public.kind == Kind::X509 && e.public.state == State::Active)
            .ok_or_else(|| refused("no X.509 authority is active to succeed".into()))?;
        let life = self.lifetimes.x509;
        let one_tier = active.public.chain_pem.is_empty();
        let ca_err = |e: crate::ca::CaError| SignerError::Key(e.to_string());
        let made = if one_tier || root {
            // One tier, or a new root asked for: a self-signed root, and
            // under two tiers an intermediate below it.
            let root_life = if one_tier { life } else { crate::ca::ROOT_LIFETIME };
            own_root(keys, td, !one_tier, root_life, life)?
        } else if let Some(root_name) = &active.root_key {
            let issuer = Issuer::from_ca_cert_pem(&active.public.anchor_pem, keys.load(root_name)?)
                .map_err(|e| SignerError::Key(format!("root certificate: {e}")))?;
            let (key, name) = keys.generate(&fresh_name("x509"))?;
            let int = crate::ca::new_intermediate_with(td, &issuer, life, &key).map_err(ca_err)?;
            let anchor = active.public.anchor_pem.clone();
            Made::signing(&key, name, int.pem(), int.pem(), anchor, Some(root_name.clone()))
        } else {
            return Err(refused(
                "Castellan's CA sits under an upstream authority whose key it does not hold: \
                 make its successor under that authority"
                    .into(),
            ));
        };
        made.entry(t)
    }
}

/// An X.509 authority just made: its certificates and the names of its keys.
struct Made {
    id: String,
    key: String,
    root_key: Option<String>,
    cert_pem: String,
    chain_pem: String,
    anchor_pem: String,
}

impl Made {
    fn signing(
        key: &CaKey,
        name: String,
        cert_pem: String,
        chain_pem: String,
        anchor_pem: String,
        root_key: Option<String>,
    ) -> Self {
        Self {
            id: spki_id(&rcgen::PublicKeyData::subject_public_key_info(key)),
            key: name,
            root_key,
            cert_pem,
            chain_pem,
            anchor_pem,
        }
    }

    /// Its keyring entry, prepared at `now`.
    fn entry(self, now: i64) -> Result<Entry, SignerError> {
        let all = format!("{}{}{}", self.cert_pem, self.chain_pem, self.anchor_pem);
        let (from, until) = validity(&all)?;
        let mut public = Authority::prepared(
            self.id,
            Kind::X509,
            from.unix_timestamp(),
            until.unix_timestamp(),
            now,
        );
        public.cert_pem = self.cert_pem;
        public.chain_pem = self.chain_pem;
        public.anchor_pem = self.anchor_pem;
        Ok(Entry {
            public,
            key: self.key,
            root_key: self.root_key,
        })
    }
}

impl Authority {
    fn with_jwk(mut self, jwk: serde_json::Value) -> Self {
        self.jwk = Some(jwk);
        self
    }
}

fn refused(message: String) -> SignerError {
    SignerError::Rotation(message)
}

fn find(keyring: &Keyring, id: &str) -> Result<usize, SignerError> {
    keyring
        .authorities
        .iter()
        .position(|e| e.public.id == id)
        .ok_or_else(|| SignerError::UnknownAuthority(id.to_owned()))
}

/// Whether `dir` holds a keyring.
pub fn keyring_exists(dir: &Path) -> bool {
    dir.join(KEYRING).exists()
}

/// An X.509 authority's id: hex of the first 20 bytes of the SHA-256 of its
/// SubjectPublicKeyInfo.
fn spki_id(spki: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(spki)[..20])
}

/// The keyring of a CA made before rotation: its signing key is the active
/// X.509 authority, its JWT key the active JWT authority.
fn migrate(ca: &CaMaterial, trust_domain: &str, lifetimes: Lifetimes) -> Result<Keyring, SignerError> {
    let now = OffsetDateTime::now_utc();
    let one_tier = ca.one_tier();
    let signing = crate::util::pem_blocks(&ca.intermediate_cert_pem, "CERTIFICATE")
        .into_iter()
        .next()
        .ok_or_else(|| SignerError::Key("no CA certificate".into()))?;
    let (from, until) = validity(&format!("{}{}", ca.intermediate_cert_pem, ca.root_cert_pem))?;
    let key = KeyPair::from_pem(&ca.intermediate_key_pem).map_err(|e| SignerError::Key(e.to_string()))?;
    let mut x509 = Authority::prepared(
        spki_id(&rcgen::PublicKeyData::subject_public_key_info(&key)),
        Kind::X509,
        from.unix_timestamp(),
        until.unix_timestamp(),
        from.unix_timestamp(),
    );
    x509.state = State::Active;
    x509.activated_at = Some(from.unix_timestamp());
    x509.cert_pem = signing;
    x509.chain_pem = if one_tier {
        String::new()
    } else {
        ca.intermediate_cert_pem.clone()
    };
    x509.anchor_pem = ca.root_cert_pem.clone();
    let jwt_pair =
        KeyPair::from_pem(&ca.jwt_key_pem).map_err(|e| SignerError::Key(format!("JWT key: {e}")))?;
    let x509 = Entry {
        public: x509,
        key: if one_tier { "root.key" } else { "intermediate.key" }.into(),
        root_key: (!one_tier && ca.root_key_pem.is_some()).then(|| "root.key".into()),
    };
    let jwt = active_jwt(p256_jwk(&jwt_pair, ""), "jwt-signing.key".into(), lifetimes, now);
    Ok(first_keyring(trust_domain, x509, jwt))
}

/// The active JWT authority of a new keyring: the key `key` (public `jwk`).
fn active_jwt(mut jwk: serde_json::Value, key: String, lifetimes: Lifetimes, now: OffsetDateTime) -> Entry {
    let t = now.unix_timestamp();
    let kid = jwk_thumbprint(&jwk);
    jwk["kid"] = kid.clone().into();
    let mut public =
        Authority::prepared(kid, Kind::Jwt, t - 60, (now + lifetimes.jwt).unix_timestamp(), t).with_jwk(jwk);
    public.state = State::Active;
    public.activated_at = Some(t);
    Entry {
        public,
        key,
        root_key: None,
    }
}

/// A keyring's first generation: one active authority of each kind.
fn first_keyring(trust_domain: &str, x509: Entry, jwt: Entry) -> Keyring {
    Keyring {
        trust_domain: trust_domain.to_owned(),
        generation: 1,
        authorities: vec![x509, jwt],
    }
}

/// A new CA's keyring with every key made by `keys` (in a token): an
/// active X.509 authority (a root, or a root and an intermediate) and an
/// active JWT key.
fn create_keyring(
    keys: &KeyStore,
    trust_domain: &str,
    intermediate: bool,
    upstream: Option<(&str, CaKey)>,
    lifetimes: Lifetimes,
) -> Result<Keyring, SignerError> {
    let now = OffsetDateTime::now_utc();
    let t = now.unix_timestamp();
    let made = match upstream {
        Some((chain_pem, upstream_key)) => {
            under_upstream(keys, trust_domain, chain_pem, upstream_key, lifetimes)?
        }
        None => own_root(
            keys,
            trust_domain,
            intermediate,
            crate::ca::ROOT_LIFETIME,
            lifetimes.x509,
        )?,
    };
    let mut x509 = made.entry(t)?;
    x509.public.state = State::Active;
    x509.public.activated_at = Some(t);
    let (key, name) = keys.generate(&fresh_name("jwt"))?;
    let jwt = active_jwt(key.jwk(""), name, lifetimes, now);
    Ok(first_keyring(trust_domain, x509, jwt))
}

/// A root of Castellan's own living `root_life` (and, with `intermediate`,
/// an intermediate under it living `life`).
fn own_root(
    keys: &KeyStore,
    trust_domain: &str,
    intermediate: bool,
    root_life: Duration,
    life: Duration,
) -> Result<Made, SignerError> {
    let ca_err = |e: crate::ca::CaError| SignerError::Key(e.to_string());
    let (root_key, root_name) = keys.generate(&fresh_name("root"))?;
    let (params, root_cert) = crate::ca::new_root_with(trust_domain, root_life, &root_key).map_err(ca_err)?;
    Ok(if intermediate {
        let issuer = Issuer::new(params, &root_key);
        let (key, name) = keys.generate(&fresh_name("x509"))?;
        let int = crate::ca::new_intermediate_with(trust_domain, &issuer, life, &key).map_err(ca_err)?;
        Made::signing(&key, name, int.pem(), int.pem(), root_cert.pem(), Some(root_name))
    } else {
        Made::signing(
            &root_key,
            root_name,
            root_cert.pem(),
            String::new(),
            root_cert.pem(),
            None,
        )
    })
}

/// Castellan's CA signed by an upstream authority's key (used once): chains
/// carry it and the upstream's intermediates; bundles hold the upstream's
/// root.
fn under_upstream(
    keys: &KeyStore,
    trust_domain: &str,
    chain_pem: &str,
    upstream_key: CaKey,
    lifetimes: Lifetimes,
) -> Result<Made, SignerError> {
    let spki = rcgen::PublicKeyData::subject_public_key_info(&upstream_key);
    let checked = crate::ca::check_upstream(chain_pem, &spki)
        .map_err(|m| SignerError::Key(format!("ca.upstream: {m}")))?;
    let issuer = Issuer::from_ca_cert_pem(&checked.chain[0], upstream_key)
        .map_err(|e| SignerError::Key(format!("ca.upstream: {e}")))?;
    let (key, name) = keys.generate(&fresh_name("x509"))?;
    let cert = crate::ca::new_under_upstream(trust_domain, &issuer, checked.until, lifetimes.x509, &key)
        .map_err(|e| SignerError::Key(e.to_string()))?;
    let chain = format!(
        "{}{}",
        cert.pem(),
        checked.chain[..checked.chain.len() - 1].concat()
    );
    Ok(Made::signing(&key, name, cert.pem(), chain, checked.anchor, None))
}

/// Writes the keyring index atomically, and beside it `bundle.pem`: the
/// trust anchors as they are now, for clients of the API listener.
fn save(dir: &Path, keyring: &Keyring) -> Result<(), SignerError> {
    let text = serde_json::to_vec_pretty(keyring).map_err(|e| SignerError::Key(e.to_string()))?;
    crate::util::write_file_atomic(&dir.join(KEYRING), &text, 0o600)
        .map_err(|e| SignerError::Key(format!("{KEYRING}: {e}")))?;
    let public = Authorities::new(
        keyring.generation,
        keyring.authorities.iter().map(|e| e.public.clone()).collect(),
        vec![],
    );
    crate::util::write_file_atomic(&dir.join(BUNDLE), public.bundle_pem().as_bytes(), 0o644)
        .map_err(|e| SignerError::Key(format!("{BUNDLE}: {e}")))
}

/// Loads the active keys of `keyring`.
fn load(keys: &KeyStore, keyring: Keyring, static_jwks: &[serde_json::Value]) -> Result<Loaded, SignerError> {
    let mut x509 = None;
    let mut jwt = None;
    for e in keyring
        .authorities
        .iter()
        .filter(|e| e.public.state == State::Active)
    {
        let a = &e.public;
        match a.kind {
            Kind::X509 => {
                let issuer = Issuer::from_ca_cert_pem(&a.cert_pem, keys.load(&e.key)?)
                    .map_err(|err| SignerError::Key(format!("{}: {err}", a.id)))?;
                // Subordinate CAs come from the root above, or from the
                // authority itself (a self-signed one, or under an upstream
                // authority whose key Castellan does not hold).
                let upstream = match &e.root_key {
                    Some(root) => Issuer::from_ca_cert_pem(&a.anchor_pem, keys.load(root)?),
                    None => Issuer::from_ca_cert_pem(&a.cert_pem, keys.load(&e.key)?),
                }
                .map_err(|err| SignerError::Key(format!("{}: {err}", a.id)))?;
                let at =
                    |t| OffsetDateTime::from_unix_timestamp(t).map_err(|e| SignerError::Key(e.to_string()));
                x509 = Some(ActiveX509 {
                    id: a.id.clone(),
                    issuer,
                    upstream,
                    chain_pem: a.chain_pem.clone(),
                    from: at(a.not_before)?,
                    until: at(a.not_after)?,
                });
            }
            Kind::Jwt => {
                jwt = Some(ActiveJwt {
                    id: a.id.clone(),
                    key: keys.load(&e.key)?,
                    until: a.not_after,
                });
            }
        }
    }
    let public = Arc::new(Authorities::new(
        keyring.generation,
        keyring.authorities.iter().map(|e| e.public.clone()).collect(),
        static_jwks.to_vec(),
    ));
    Ok(Loaded {
        keyring,
        public,
        x509,
        jwt,
    })
}

/// Deletes key files that no published authority uses any more.
fn delete_unused_keys(keys: &KeyStore, before: &Keyring, after: &Keyring) {
    let used = |k: &Keyring| -> std::collections::HashSet<String> {
        k.authorities
            .iter()
            .filter(|e| e.public.published())
            .flat_map(|e| std::iter::once(e.key.clone()).chain(e.root_key.clone()))
            .collect()
    };
    let still = used(after);
    for key in used(before).difference(&still) {
        keys.delete(key);
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
        match (alg, &self.rsa_jwt) {
            (JwtAlg::ES256, _) => self.sign_jwt(claims, claims.exp),
            (JwtAlg::RS256, Some((key, kid))) => encode_jwt(claims, jsonwebtoken::Algorithm::RS256, key, kid),
            (JwtAlg::RS256, None) => Err(SignerError::NoKey(alg)),
        }
    }

    fn sign_join_token(&self, claims: &JoinTokenClaims) -> Result<String, SignerError> {
        self.sign_jwt(claims, claims.exp)
    }

    fn sign_audit_checkpoint(&self, claims: &AuditCheckpointClaims) -> Result<String, SignerError> {
        if claims.iss != super::audit_issuer(&self.trust_domain) || !claims.head.starts_with("sha256:") {
            return Err(SignerError::Purpose(
                "an audit checkpoint is this trust domain's, over a sha256 head".into(),
            ));
        }
        self.sign_jwt(claims, claims.iat)
    }

    fn sign_x509_svid(&self, t: &Template) -> Result<IssuedCertificate, SignerError> {
        self.check_identity(&t.spiffe_id)?;
        let public_key = SubjectPublicKeyInfo::from_der(&t.public_key_der)
            .map_err(|e| SignerError::PublicKey(e.to_string()))?;
        self.with_x509(|x509| {
            let mut params = self.leaf_params(x509, t.ttl)?;
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
            let cert = params.signed_by(&public_key, &x509.issuer)?;
            Ok(finish(cert, &params, &x509.id, &x509.chain_pem))
        })
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
        self.with_x509(|x509| {
            let mut params = self.leaf_params(x509, ttl)?;
            params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            params.distinguished_name.push(DnType::CommonName, common_name);
            let mut constraints = CustomExtension::from_oid_content(
                &[2, 5, 29, 30],
                spiffe_name_constraints(&self.trust_domain),
            );
            constraints.set_criticality(true);
            params.custom_extensions = vec![constraints];
            let cert = params.signed_by(&key, &x509.upstream)?;
            Ok(finish(cert, &params, &x509.id, ""))
        })
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
        self.with_x509(|x509| {
            let mut params = self.leaf_params(x509, self.server_cert_ttl)?;
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
            let cert = params.signed_by(&key, &x509.issuer)?;
            Ok(format!("{}{}", cert.pem(), x509.chain_pem))
        })
    }

    fn authorities(&self) -> Arc<Authorities> {
        self.loaded.load().public.clone()
    }

    fn rotate(&self, rotation: &Rotation) -> Result<Arc<Authorities>, SignerError> {
        let _one = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.loaded.load_full();
        let mut keyring = current.keyring.clone();
        // Persist what the active authorities signed so far with any change.
        for (slot, kind) in [(0, Kind::X509), (1, Kind::Jwt)] {
            let signed = self.signed_until[slot].load(Ordering::Relaxed);
            for e in &mut keyring.authorities {
                if e.public.kind == kind && e.public.state == State::Active {
                    e.public.signed_until = e.public.signed_until.max(signed);
                }
            }
        }
        self.apply(&mut keyring, rotation, OffsetDateTime::now_utc())?;
        // Load before saving: a key that does not load is refused, and the
        // keyring on disk stays as it was.
        let loaded = load(&self.keys, keyring, &self.static_jwks)?;
        save(&self.dir, &loaded.keyring)?;
        if matches!(rotation, Rotation::Activate { .. }) {
            let slot = usize::from(
                matches!(loaded.public.get(rotation_id(rotation)), Some(a) if a.kind == Kind::Jwt),
            );
            self.signed_until[slot].store(0, Ordering::Relaxed);
        }
        delete_unused_keys(&self.keys, &current.keyring, &loaded.keyring);
        let public = loaded.public.clone();
        self.loaded.store(Arc::new(loaded));
        Ok(public)
    }
}

fn rotation_id(rotation: &Rotation) -> &str {
    match rotation {
        Rotation::Activate { id } | Rotation::Taint { id } | Rotation::Revoke { id } => id,
        Rotation::Prepare { .. } => "",
    }
}

#[cfg(test)]
mod tests;
