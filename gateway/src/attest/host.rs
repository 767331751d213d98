//! The host capabilities a module may import. Each is narrow: verify a JWS
//! with a named key set, a signature, a certificate chain or a PKCS#7
//! document with a named certificate set, hash, read the clock, log.
//! Nothing here reads files, opens sockets or exposes the environment, and
//! key material never enters the sandbox: modules name sets, the host
//! holds them.

use super::HostState;
use super::bindings::castellan::attestor::{clock, crypto, log, types};

impl types::Host for HostState {}

impl crypto::Host for HostState {
    fn verify_jws(&mut self, key_set: String, compact: String) -> Result<crypto::VerifiedJws, String> {
        let result = self
            .trust
            .key_sets
            .get(&key_set)
            .ok_or_else(|| {
                format!(
                    "unknown key set `{}`",
                    key_set.chars().take(64).collect::<String>()
                )
            })
            .and_then(|keys| keys.verify_compact(&compact));
        let (header, payload) = self.note(&key_set, result)?;
        Ok(crypto::VerifiedJws {
            header_json: header.to_string(),
            payload_json: payload,
        })
    }

    fn verify_signature(
        &mut self,
        algorithm: String,
        public_key: Vec<u8>,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), String> {
        crate::trust::certs::verify_signature(&algorithm, &public_key, &message, &signature)
    }

    fn verify_with_certificates(
        &mut self,
        cert_set: String,
        algorithm: String,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> Result<(), String> {
        let result = self
            .cert_set(&cert_set)
            .and_then(|set| set.verify_signature(&algorithm, &message, &signature));
        self.note(&cert_set, result)
    }

    fn verify_chain(
        &mut self,
        cert_set: String,
        chain: Vec<Vec<u8>>,
        usage: String,
    ) -> Result<crypto::VerifiedCertificate, String> {
        let result = self
            .cert_set(&cert_set)
            .and_then(|set| set.verify_chain(&chain, &usage));
        let leaf = self.note(&cert_set, result)?;
        Ok(crypto::VerifiedCertificate {
            public_key: leaf.public_key,
            common_name: leaf.common_name,
            dns_names: leaf.dns_names,
            uris: leaf.uris,
            fingerprint: leaf.fingerprint,
        })
    }

    fn verify_pkcs7(&mut self, cert_set: String, signed_data: Vec<u8>) -> Result<Vec<u8>, String> {
        let result = self
            .cert_set(&cert_set)
            .and_then(|set| set.verify_pkcs7(&signed_data));
        self.note(&cert_set, result)
    }

    fn verify_tpm_quote(
        &mut self,
        ak_public: Vec<u8>,
        attest: Vec<u8>,
        signature: Vec<u8>,
        nonce: Vec<u8>,
        pcrs: Vec<(u32, Vec<u8>)>,
    ) -> Result<u16, String> {
        let ak = castellan_tpm::wire::Public::from_tpm2b(&ak_public)
            .map_err(|e| format!("AK public area: {e}"))?;
        let pcrs = pcrs.into_iter().collect();
        castellan_tpm::verify_quote(&ak, &attest, &signature, &nonce, &pcrs)
            .map(|q| q.pcr_bank)
            .map_err(|e| format!("quote: {e}"))
    }

    fn sha256(&mut self, data: Vec<u8>) -> Vec<u8> {
        use sha2::Digest as _;
        sha2::Sha256::digest(&data).to_vec()
    }
}

impl HostState {
    /// Notes which set a check used and how it ended, and passes the result on.
    fn note<T>(&mut self, set: &str, result: Result<T, String>) -> Result<T, String> {
        // A hostile module could call in a loop: keep the first few.
        if self.used.len() < 16 {
            self.used.push(super::SetUse {
                set: set.chars().take(64).collect(),
                error: result.as_ref().err().map(|e| e.chars().take(256).collect()),
            });
        }
        result
    }

    fn cert_set(&self, name: &str) -> Result<std::sync::Arc<crate::trust::certs::CertSet>, String> {
        self.trust.cert_sets.get(name).cloned().ok_or_else(|| {
            format!(
                "unknown certificate set `{}`",
                name.chars().take(64).collect::<String>()
            )
        })
    }
}

impl clock::Host for HostState {
    fn now(&mut self) -> i64 {
        crate::util::now_unix()
    }
}

impl log::Host for HostState {
    fn log(&mut self, level: log::Level, message: String) {
        let message: String = message.chars().take(1024).collect();
        match level {
            log::Level::Debug => tracing::debug!(method = %self.method, "{message}"),
            log::Level::Info => tracing::info!(method = %self.method, "{message}"),
            log::Level::Warn => tracing::warn!(method = %self.method, "{message}"),
        }
    }
}
