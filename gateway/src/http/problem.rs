//! RFC 9457 problem details: every HTTP error Castellan returns is one of
//! these, with a stable `type`, a `title`, and a `detail` a person can act on.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::engine::EngineError;

/// The URI prefix of every problem type.
pub const TYPE_PREFIX: &str = crate::model::PROBLEM_TYPE_PREFIX;

/// A problem response.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_uri: String,
    pub title: &'static str,
    pub status: u16,
    pub detail: String,
    /// Policy reasons, for `policy-denied`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasons: Option<Vec<String>>,
    /// Seconds after which a retry may succeed (`Retry-After`).
    #[serde(skip)]
    pub retry_after: Option<u64>,
}

impl Problem {
    /// A problem of kind `slug`.
    pub fn new(status: StatusCode, slug: &str, title: &'static str, detail: impl Into<String>) -> Self {
        Self {
            type_uri: format!("{TYPE_PREFIX}{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            reasons: None,
            retry_after: None,
        }
    }

    /// 400 `malformed-request`.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail,
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authentication required",
            "this endpoint needs an admin API token: `Authorization: Bearer <token>`",
        )
    }

    /// 404 `not-found`.
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    /// 413 `payload-too-large`.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Request body too large",
            format!("the request body is larger than {limit} bytes"),
        )
    }

    /// 500 `internal`.
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    /// 503 `unavailable`.
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
    }

    /// The `type` without its prefix.
    pub fn slug(&self) -> &str {
        self.type_uri.strip_prefix(TYPE_PREFIX).unwrap_or(&self.type_uri)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let unauthorized = status == StatusCode::UNAUTHORIZED;
        let mut doc = serde_json::to_value(&self).unwrap_or_default();
        // The occurrence: the request's id (which `castellan explain
        // --refusal` takes), also as the RFC 9457 `instance`.
        if let (Some(id), Some(obj)) = (crate::engine::request_id(), doc.as_object_mut()) {
            obj.insert("instance".into(), format!("urn:uuid:{id}").into());
            obj.insert("request_id".into(), id.into());
        }
        let body = serde_json::to_vec(&doc).unwrap_or_default();
        let mut resp = (status, body).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(seconds) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        resp
    }
}

/// The title of each problem type the engine produces.
fn title(slug: &str) -> &'static str {
    match slug {
        "malformed-request" => "Malformed request",
        "payload-too-large" => "Request body too large",
        "invalid-csr" => "Invalid CSR",
        "unknown-method" => "Unknown attestation method",
        "no-trust-source" => "No trust source for this method",
        "attestation-failed" => "Attestation failed",
        "policy-denied" => "Denied by policy",
        "not-registered" => "No identity registered",
        "delegation-refused" => "Delegation refused",
        "invalid-dpop-proof" => "Invalid DPoP proof",
        "key-required" => "A key to bind to is required",
        "invalid-identity" => "Not a valid identity",
        "not-found" => "Not found",
        "request-expired" => "Request expired",
        "request-not-pending" => "Request not pending",
        "self-approval" => "Self-approval refused",
        "not-eligible" => "Not an eligible approver",
        "binding-mismatch" => "Binding mismatch",
        "not-requester" => "Not the requester",
        "unauthorized" => "Authentication required",
        "forbidden" => "Forbidden",
        "overloaded" => "Overloaded",
        "unavailable" => "Service unavailable",
        _ => "Issuance failed",
    }
}

impl From<EngineError> for Problem {
    fn from(e: EngineError) -> Self {
        let slug = e.slug();
        let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut p = Problem::new(status, slug, title(slug), e.detail());
        p.reasons = e.reasons().map(<[String]>::to_vec);
        if matches!(e, EngineError::Overloaded) {
            p.retry_after = Some(1);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overload_is_a_503_with_retry_after_and_host_evidence_a_422() {
        let resp = Problem::from(EngineError::Overloaded).into_response();
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/problem+json");
        let p = Problem::from(EngineError::HostEvidenceOnly("unix".into()));
        assert_eq!((p.status, p.slug()), (422, "unknown-method"));
        assert!(p.detail.contains("only available on the Workload API"));
    }
}
