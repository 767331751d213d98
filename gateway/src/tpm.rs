//! The client side of the `tpm` method: a TPM that answers the server's
//! challenges. `castellan tpm evidence` answers one; `castellan bench
//! attestors --tpm-tcti` answers many with the same TPM before its clock
//! starts.
//!
//! A [`Tpm`] holds the TSS context (with the EK and a transient AK) and is
//! not `Send`: open it and use it on one blocking thread. Its handles are
//! flushed when it is dropped, on every path. The activated secrets and the
//! evidence are never logged.

use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use castellan_tpm::client::{Attestor, EkKind};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use castellan::client::Endpoint;

/// What the server answers to a tpm challenge request.
#[derive(serde::Deserialize)]
struct Challenge {
    challenge_id: String,
    nonce: String,
    credential_blob: String,
    encrypted_secret: String,
}

/// An opened TPM with its EK certificate, if it has one, read.
pub struct Tpm {
    attestor: Attestor,
    ek_certificate: Option<Vec<u8>>,
}

impl Tpm {
    /// Connects through `tcti`, creates the EK (of `ek` kind; `None` for
    /// the one the vendor certified) and a transient AK, and reads the EK
    /// certificate (the manufacturer's word for the EK). `choose` says how
    /// the user picks another TPM, for the error.
    pub fn open(tcti: &str, ek: Option<EkKind>, choose: &str) -> anyhow::Result<Self> {
        let mut attestor = Attestor::connect_with(tcti, ek).map_err(|e| {
            anyhow::anyhow!(
                "cannot use a TPM through TCTI `{tcti}`: {}; {choose}",
                one_line(&e)
            )
        })?;
        let ek_certificate = attestor
            .ek_certificate()
            .map_err(|e| anyhow::anyhow!("cannot read the EK certificate from the TPM: {}", one_line(&e)))?;
        Ok(Self {
            attestor,
            ek_certificate,
        })
    }

    /// The EK's certificate (DER) from NV, if the vendor provisioned one.
    /// Without it the server trusts the EK only if a tpm trust source
    /// enrolls its hash ([`Self::ek_sha256`]).
    pub fn ek_certificate(&self) -> Option<&[u8]> {
        self.ek_certificate.as_deref()
    }

    /// The EK in use.
    pub fn ek_kind(&self) -> EkKind {
        self.attestor.ek_kind()
    }

    /// The hex SHA-256 of the EK's TPMT_PUBLIC: what the server's `tpm`
    /// method names the machine by (`ek_sha256`, `spiffe://TD/tpm/<it>`).
    pub fn ek_sha256(&self) -> anyhow::Result<String> {
        let ek = castellan_tpm::wire::Public::from_tpm2b(self.attestor.ek_public())
            .map_err(|e| anyhow::anyhow!("the TPM's EK public area does not parse: {}", one_line(&e)))?;
        Ok(castellan::util::sha256_hex(ek.tpmt_bytes()))
    }

    /// Gets a challenge for this TPM's EK and AK, activates the credential
    /// and quotes `pcrs` over SHA-256(nonce || `key_sha256`), where
    /// `key_sha256` is the SHA-256 of the DER SubjectPublicKeyInfo of the
    /// CSR the evidence will be posted with. Returns the evidence JSON.
    /// Blocking: the HTTP call runs on `runtime`.
    pub fn answer_challenge(
        &mut self,
        runtime: &tokio::runtime::Handle,
        endpoint: &Endpoint,
        key_sha256: &[u8],
        pcrs: &[u32],
    ) -> anyhow::Result<Value> {
        let mut ask = json!({
            "method": "tpm",
            "ek_public": STANDARD.encode(self.attestor.ek_public()),
            "ak_public": STANDARD.encode(self.attestor.ak_public()),
        });
        if let Some(der) = &self.ek_certificate {
            ask["ek_certificate"] = STANDARD.encode(der).into();
        }
        let challenge: Challenge = runtime
            .block_on(post(endpoint, "/api/v1/attestation/challenges", &ask))
            .context("cannot get a challenge from the server")?;
        tracing::debug!(challenge_id = %challenge.challenge_id, "challenge received");

        let decode = |field: &str, text: &str| {
            STANDARD
                .decode(text)
                .with_context(|| format!("the server's challenge has a `{field}` that is not base64"))
        };
        let nonce = decode("nonce", &challenge.nonce)?;
        let blob = decode("credential_blob", &challenge.credential_blob)?;
        let wrapped = decode("encrypted_secret", &challenge.encrypted_secret)?;
        let activated = self.attestor.activate_credential(&blob, &wrapped).map_err(|e| {
            anyhow::anyhow!(
                "the TPM could not activate the server's credential (was it made for this TPM's EK?): {}",
                one_line(&e)
            )
        })?;
        let qualifying = Sha256::new()
            .chain_update(&nonce)
            .chain_update(key_sha256)
            .finalize();
        let quote = self
            .attestor
            .quote(&qualifying, pcrs)
            .map_err(|e| anyhow::anyhow!("the TPM could not quote the PCRs: {}", one_line(&e)))?;
        let values: serde_json::Map<String, Value> = quote
            .pcrs
            .iter()
            .map(|(pcr, value)| (pcr.to_string(), Value::String(hex::encode(value))))
            .collect();
        Ok(json!({
            "challenge_id": challenge.challenge_id,
            "activated_secret": STANDARD.encode(activated),
            "attest": STANDARD.encode(&quote.attest),
            "signature": STANDARD.encode(&quote.signature),
            "pcrs": values,
        }))
    }
}

/// A TPM error in one line. tss-esapi's errors repeat their message down
/// the source chain, so this gives the top one and, when it says something
/// new, the innermost (which carries the response code).
fn one_line(e: &castellan_tpm::Error) -> String {
    let mut root: &dyn std::error::Error = e;
    while let Some(next) = root.source() {
        root = next;
    }
    let (top, root) = (e.to_string(), root.to_string());
    let top = top.trim_end_matches('.');
    if top.ends_with(root.trim_end_matches('.')) {
        top.to_owned()
    } else {
        format!("{top} ({root})")
    }
}

/// POSTs JSON and expects 201 with a JSON answer; a refusal becomes the
/// server's problem detail.
async fn post<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    path: &str,
    body: &Value,
) -> anyhow::Result<T> {
    let mut conn = endpoint.connect().await?;
    let (status, resp) = conn
        .send(Method::POST, path, None, Some(Bytes::from(body.to_string())))
        .await?;
    anyhow::ensure!(
        status == StatusCode::CREATED,
        "{}",
        castellan::client::problem_line(status, &resp)
    );
    serde_json::from_slice(&resp).context("the server's answer is not the expected JSON")
}
