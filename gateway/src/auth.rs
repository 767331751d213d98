//! Caller authentication for the admin API: bearer tokens, kept only as
//! SHA-256 hashes in memory and compared in constant time.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::util::write_private_file;

/// Prefix that makes Castellan tokens recognisable to secret scanners.
const TOKEN_PREFIX: &str = "cst_";

/// Checks admin bearer tokens.
pub struct AdminAuth {
    hash: [u8; 32],
}

impl std::fmt::Debug for AdminAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminAuth(..)")
    }
}

impl AdminAuth {
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

    /// Builds a checker for one known token.
    pub fn from_token(token: &str) -> Self {
        Self {
            hash: Sha256::digest(token.as_bytes()).into(),
        }
    }

    /// Whether an `Authorization` header value carries the admin token.
    pub fn check_header(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let presented: [u8; 32] = Sha256::digest(token.trim().as_bytes()).into();
        // Compare every byte whatever the first mismatch, so timing says nothing.
        presented
            .iter()
            .zip(self.hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
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
        let a = AdminAuth::load_or_create(&path).unwrap();
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
        let b = AdminAuth::load_or_create(&path).unwrap();
        assert!(b.check_header(Some(&format!("Bearer {}", token.trim()))));
    }
}
