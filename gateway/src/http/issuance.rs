//! `POST /api/v1/workloads/attested-issuance` and the challenges that
//! challenge-based methods (x509pop, tpm) answer.

use axum::body::Body;
use axum::extract::State;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;

use super::{AppState, Problem, read_json};
use crate::engine::issuance::AttestedRequest;
use crate::engine::{Refusal, Surface};
use crate::model::Actor;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AttestedIssuanceBody {
    method: String,
    evidence: String,
    csr: String,
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

/// `POST /api/v1/workloads/attested-issuance`: no API token; the evidence
/// is the credential.
pub(super) async fn attested(State(state): State<AppState>, req: Request<Body>) -> Result<Response, Problem> {
    let body: AttestedIssuanceBody = match read_json(req.into_body(), state.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            let refusal = Refusal::new(Surface::AttestedIssuance, "issue", Actor::Anonymous);
            state.engine.audit_refusal(refusal, &e).await;
            return Err(e.into());
        }
    };
    let request = AttestedRequest {
        method: body.method,
        evidence: body.evidence,
        csr_pem: body.csr,
        ttl_seconds: body.ttl_seconds,
    };
    let issued = state.engine.issue_attested(request).await?;
    Ok((StatusCode::CREATED, axum::Json(issued)).into_response())
}

/// Methods whose evidence answers a server challenge.
const CHALLENGE_METHODS: &[&str] = &["x509pop", "tpm"];

/// What a challenge request may carry: the method, and for `tpm` the EK
/// certificate, the EK public area and the AK public area (base64).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChallengeAsk {
    method: String,
    #[serde(default)]
    ek_certificate: Option<String>,
    #[serde(default)]
    ek_public: Option<String>,
    #[serde(default)]
    ak_public: Option<String>,
}

/// `POST /api/v1/attestation/challenges`: a fresh nonce for a
/// challenge-based method. No authentication: the challenge proves nothing
/// by itself, and the evidence that answers it is verified in full.
pub(super) async fn create_challenge(
    State(state): State<AppState>,
    client: Option<axum::Extension<super::ClientAddr>>,
    body: Body,
) -> Result<Response, Problem> {
    let client = client.map(|axum::Extension(c)| crate::attest::challenge::Client::from(c.0));
    let issued = async {
        let ask: ChallengeAsk = read_json(body, state.max_body_bytes).await?;
        if !CHALLENGE_METHODS.contains(&ask.method.as_str()) {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown-method",
                "Unknown attestation method",
                format!(
                    "method `{}` takes no challenge (challenge methods: {})",
                    ask.method.chars().take(64).collect::<String>(),
                    CHALLENGE_METHODS.join(", ")
                ),
            ));
        }
        let (private, public) = match ask.method.as_str() {
            "tpm" => tpm_credential(&ask)?,
            _ => (serde_json::Map::new(), serde_json::Map::new()),
        };
        state
            .engine
            .challenges
            .issue(&ask.method, client, private, public, crate::util::now_unix())
            .await
            .map_err(|e| match e {
                crate::attest::challenge::ChallengeError::ClientLimit => Problem::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too-many-challenges",
                    "Too many pending challenges",
                    e.to_string(),
                ),
                other => Problem::unavailable(other.to_string()),
            })
    }
    .await?;
    Ok((StatusCode::CREATED, axum::Json(issued)).into_response())
}

/// The TPM part of a challenge: checks that the EK certificate, if one is
/// given, certifies the EK public area, then wraps a fresh secret to that
/// EK for the AK's Name (MakeCredential). Only the TPM holding that EK,
/// with that AK loaded, can recover the secret. The module later checks
/// the EK certificate's chain (or, without one, that a trust source
/// enrolls the EK), the secret and the quote.
type ChallengeParts = (serde_json::Map<String, Value>, serde_json::Map<String, Value>);

fn tpm_credential(ask: &ChallengeAsk) -> Result<ChallengeParts, Problem> {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    let invalid = |m: String| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-challenge-request",
            "Invalid challenge request",
            m,
        )
    };
    let field = |v: &Option<String>, name: &str| -> Result<Vec<u8>, Problem> {
        let text = v
            .as_deref()
            .ok_or_else(|| invalid(format!("`{name}` is required for tpm")))?;
        STANDARD
            .decode(text.trim())
            .map_err(|_| invalid(format!("`{name}` is not base64")))
    };
    let ek_public = field(&ask.ek_public, "ek_public")?;
    let ak_public = field(&ask.ak_public, "ak_public")?;
    let ek = castellan_tpm::wire::Public::from_tpm2b(&ek_public)
        .map_err(|e| invalid(format!("ek_public: {e}")))?;
    let ak = castellan_tpm::wire::Public::from_tpm2b(&ak_public)
        .map_err(|e| invalid(format!("ak_public: {e}")))?;
    // Without a certificate the EK is trusted only if a trust source
    // enrolls its hash; the module decides.
    let ek_cert = match ask.ek_certificate {
        Some(_) => {
            let der = field(&ask.ek_certificate, "ek_certificate")?;
            let der = castellan_tpm::ek::trim_der(&der)
                .map_err(|e| invalid(format!("ek_certificate: {e}")))?
                .to_vec();
            castellan_tpm::ek::check_ek_matches(&der, &ek)
                .map_err(|e| invalid(format!("ek_certificate: {e}")))?;
            Some(der)
        }
        None => None,
    };
    let ak_name = ak.name().map_err(|e| invalid(format!("ak_public: {e}")))?;
    let secret = crate::util::random_bytes::<32>();
    let credential = castellan_tpm::make_credential(&ek, &ak_name, &secret)
        .map_err(|e| invalid(format!("MakeCredential: {e}")))?;
    let mut private = serde_json::Map::new();
    private.insert("secret_sha256".into(), crate::util::sha256_hex(&secret).into());
    if let Some(der) = &ek_cert {
        private.insert("ek_certificate".into(), STANDARD.encode(der).into());
    }
    private.insert(
        "ek_public_sha256".into(),
        crate::util::sha256_hex(ek.tpmt_bytes()).into(),
    );
    private.insert("ak_public".into(), STANDARD.encode(&ak_public).into());
    let mut public = serde_json::Map::new();
    public.insert(
        "credential_blob".into(),
        STANDARD.encode(&credential.id_object).into(),
    );
    public.insert(
        "encrypted_secret".into(),
        STANDARD.encode(&credential.encrypted_secret).into(),
    );
    Ok((private, public))
}
