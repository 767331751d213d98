//! SPIFFE IDs and trust domain names, validated as the SPIFFE ID standard
//! says: `spiffe://<trust-domain>/<path>`, lowercase trust domain of
//! `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]`, no empty, `.` or `..`
//! segments, no query or fragment.

use std::fmt;

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a SPIFFE ID or trust domain was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// The scheme is not `spiffe://`.
    #[error("a SPIFFE ID starts with `spiffe://`")]
    Scheme,
    /// The trust domain is empty or has characters outside `[a-z0-9.-_]`.
    #[error("trust domain must be non-empty lowercase letters, digits, `.`, `-` or `_`")]
    TrustDomain,
    /// A path segment is empty, `.`, `..`, or has characters outside `[A-Za-z0-9.-_]`.
    #[error("path segments must be non-empty letters, digits, `.`, `-` or `_` (not `.` or `..`)")]
    Path,
    /// Longer than the 2048 bytes the standard allows.
    #[error("a SPIFFE ID is at most 2048 bytes")]
    TooLong,
}

/// A SPIFFE ID serialises as its URI (in JWT-SVID claims, for instance).
impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A SPIFFE ID deserialises from its URI, validated.
impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        SpiffeId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Whether `seg` may be one segment of a SPIFFE ID's path: letters,
/// digits, `.`, `-` and `_`, and neither empty, `.` nor `..`.
pub fn valid_path_segment(seg: &str) -> bool {
    !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID.
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.len() > 2048 {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(SpiffeIdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        if !path.is_empty() && !path[1..].split('/').all(valid_path_segment) {
            return Err(SpiffeIdError::Path);
        }
        Ok(Self {
            trust_domain: td.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The trust domain name.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`, or empty for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

/// Checks a trust domain name.
pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(SpiffeIdError::TrustDomain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_standard_ids() {
        let id = SpiffeId::parse("spiffe://example.org/ns/prod/sa/api").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/prod/sa/api");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/prod/sa/api");
        assert!(SpiffeId::parse("spiffe://example.org").is_ok());
    }

    #[test]
    fn refuses_what_the_standard_forbids() {
        for bad in [
            "http://example.org/a",
            "spiffe://",
            "spiffe://Example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a?x=1",
            "spiffe://example.org/a#f",
            "spiffe://user@example.org/a",
            "spiffe://example.org:8080/a",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad} should be refused");
        }
    }
}
