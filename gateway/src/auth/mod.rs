//! Caller authentication: the bootstrap admin token and API tokens with a
//! role and groups, kept only as SHA-256 hashes and compared by hash.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::util::write_private_file;

mod oidc;

pub use crate::model::{OidcLink, Principal, PrincipalKind, Role, TokenRecord};
pub use oidc::{LoginClient, OidcIdentity, OidcIssuerConfig, OidcIssuers, Purpose};

/// Prefix that makes Castellan tokens recognisable to secret scanners.
const TOKEN_PREFIX: &str = "cst_";

/// Checks bearer tokens: the bootstrap admin token and API tokens.
pub struct Authenticator {
    admin_hash: [u8; 32],
    oidc: std::sync::Arc<OidcIssuers>,
    tokens: arc_swap::ArcSwap<std::collections::HashMap<String, std::sync::Arc<TokenRecord>>>,
    writes: std::sync::Mutex<()>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator(..)")
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares every byte whatever the first mismatch, so timing says nothing.
fn equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Authenticator {
    /// Loads the admin token from `path`, creating one (mode 0600) if the
    /// file does not exist.
    pub fn load_or_create(path: &Path) -> std::io::Result<Self> {
        let token = match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
            Ok(_) => return Err(std::io::Error::other(format!("{} is empty", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = generate_token();
                write_private_file(path, format!("{token}\n").as_bytes())?;
                token
            }
            Err(e) => return Err(e),
        };
        Ok(Self::from_token(&token))
    }

    /// An authenticator for one known admin token.
    pub fn from_token(token: &str) -> Self {
        Self {
            admin_hash: digest(token),
            oidc: Default::default(),
            tokens: arc_swap::ArcSwap::from_pointee(Default::default()),
            writes: std::sync::Mutex::new(()),
        }
    }

    /// Accepts ID tokens from these OIDC issuers.
    pub fn with_oidc(mut self, oidc: std::sync::Arc<OidcIssuers>) -> Self {
        self.oidc = oidc;
        self
    }

    /// Makes stored API tokens usable.
    pub fn load_tokens(&self, records: Vec<TokenRecord>) {
        let map = records
            .into_iter()
            .map(|r| (r.token_sha256.clone(), std::sync::Arc::new(r)))
            .collect();
        self.tokens.store(std::sync::Arc::new(map));
    }

    /// Whether a live token already has this name (names identify people:
    /// unique among live tokens).
    pub fn name_taken(&self, name: &str) -> bool {
        let now = crate::util::now_unix();
        name == "admin"
            || self
                .tokens
                .load()
                .values()
                .any(|r| r.name == name && r.is_live(now))
    }

    /// The name of the live token linked to this OIDC identity, if any.
    pub fn linked_to(&self, issuer: &str, subject: &str) -> Option<String> {
        let now = crate::util::now_unix();
        self.tokens
            .load()
            .values()
            .find(|r| {
                r.is_live(now)
                    && r.oidc
                        .as_ref()
                        .is_some_and(|l| l.issuer == issuer && l.subject == subject)
            })
            .map(|r| r.name.clone())
    }

    /// The issuers the console signs people in with (those with a `client_id`).
    pub fn login_clients(&self) -> Vec<LoginClient> {
        self.oidc.login_clients()
    }

    /// Whether `name` is a configured OIDC issuer.
    pub fn has_oidc_issuer(&self, name: &str) -> bool {
        self.oidc.has_issuer(name)
    }

    /// Adds or replaces a stored token (a revoked one stops authenticating
    /// at once).
    pub fn add_token(&self, record: TokenRecord) {
        let _guard = self.writes.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.tokens.load().as_ref().clone();
        next.insert(record.token_sha256.clone(), std::sync::Arc::new(record));
        self.tokens.store(std::sync::Arc::new(next));
    }

    /// The person behind an OIDC identity: the API token linked to it, or
    /// the identity's own namespace.
    pub fn person_of(&self, identity: &OidcIdentity) -> (String, Vec<String>) {
        match self.linked_to(&identity.issuer_name, &identity.subject) {
            Some(token) => (format!("user:{token}"), vec![identity.person()]),
            None => (identity.person(), Vec::new()),
        }
    }

    /// The caller behind an `Authorization: Bearer …` header, if any.
    pub fn authenticate(&self, header: Option<&str>) -> Option<Principal> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        let presented = digest(token);
        if equal(&presented, &self.admin_hash) {
            return Some(Principal {
                id: "user:admin".into(),
                name: "admin".into(),
                role: Role::Admin,
                groups: Vec::new(),
                kind: PrincipalKind::Admin,
                persons: Vec::new(),
            });
        }
        // The map is keyed by hash: a lookup reveals nothing a hash does not.
        let Some(record) = self.tokens.load().get(&hex::encode(presented)).cloned() else {
            // Not an API token: perhaps an ID token from a configured issuer.
            if self.oidc.is_empty() || token.starts_with(TOKEN_PREFIX) || token.split('.').count() != 3 {
                return None;
            }
            return match self.oidc.verify(token, Purpose::Login, crate::util::now_unix()) {
                Ok(identity) => {
                    let (id, persons) = self.person_of(&identity);
                    let name = id.strip_prefix("user:").unwrap_or(&identity.name).to_owned();
                    Some(Principal {
                        id,
                        name,
                        role: Role::Approver,
                        groups: identity.groups,
                        kind: PrincipalKind::Oidc,
                        persons,
                    })
                }
                Err(why) => {
                    tracing::info!(%why, "OIDC ID token refused");
                    None
                }
            };
        };
        if !record.is_live(crate::util::now_unix()) {
            return None;
        }
        let (id, persons) = record.person();
        Some(Principal {
            id,
            name: record.name.clone(),
            role: record.role,
            groups: record.groups.clone(),
            kind: PrincipalKind::Token,
            persons,
        })
    }

    /// Whether an `Authorization` header value carries the admin token.
    pub fn check_header(&self, header: Option<&str>) -> bool {
        self.authenticate(header).is_some_and(|p| p.role == Role::Admin)
    }
}

/// Creates an API token: returns the token (shown once) and its record.
pub fn new_api_token(name: &str, role: Role, groups: Vec<String>) -> (String, TokenRecord) {
    let token = generate_token();
    let record = TokenRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: name.to_owned(),
        role,
        groups,
        created_at: crate::util::rfc3339(time::OffsetDateTime::now_utc()),
        token_sha256: hex::encode(digest(&token)),
        oidc: None,
        expires_at: None,
        revoked_at: None,
    };
    (token, record)
}

/// Valid API token names: a person's name becomes a SPIFFE ID path segment
/// (`spiffe://<td>/user/<name>`), so only its characters are allowed
/// (letters, digits, `-`, `_`, `.`; not `.` or `..`).
pub fn valid_token_name(s: &str) -> bool {
    s.len() <= 64 && crate::spiffe_id::valid_path_segment(s)
}

/// Valid group and display names: what can safely sit in a log line.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'))
}

/// A new random API token.
pub fn generate_token() -> String {
    let bytes: [u8; 32] = crate::util::random_bytes();
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_is_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let a = Authenticator::load_or_create(&path).unwrap();
        let token = std::fs::read_to_string(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(a.check_header(Some(&format!("Bearer {}", token.trim()))));
        assert!(!a.check_header(Some("Bearer cst_wrong")));
        assert!(!a.check_header(Some(token.trim())));
        assert!(!a.check_header(None));
        let (api, record) = new_api_token("alice", Role::Approver, vec!["sre".into()]);
        assert!(!record.token_sha256.contains(&api));
        a.add_token(record);
        let p = a.authenticate(Some(&format!("Bearer {api}"))).unwrap();
        assert_eq!(
            (p.id.as_str(), p.role, p.groups.as_slice()),
            ("user:alice", Role::Approver, &["sre".to_owned()][..])
        );
        assert!(
            !a.check_header(Some(&format!("Bearer {api}"))),
            "an approver is not an admin"
        );
        assert!(a.name_taken("alice") && a.name_taken("admin") && !a.name_taken("bob"));
        let b = Authenticator::load_or_create(&path).unwrap();
        assert!(b.check_header(Some(&format!("Bearer {}", token.trim()))));
    }
}
