//! The signer's part of the configuration: the CA made on first start, how
//! its authorities rotate, and where its keys are. Shared by a gateway's
//! `[ca]` and the signer process's (`castellan signer`).

use std::path::PathBuf;

use serde::Deserialize;

/// The certificate authority created on first start, and how its
/// authorities rotate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Sign with an intermediate CA under the root, which every chain then
    /// carries, rather than with the root itself (a SPIRE server's default
    /// layout: chains are the leaf alone). A CA that already exists keeps
    /// its intermediate; setting this adds one under an existing root.
    /// Default: false.
    pub intermediate: bool,
    /// Make Castellan's CA under an external CA: its certificate chain
    /// (its own certificate first, up to the root relying parties trust),
    /// PEM. Used only when the CA is made; with `upstream_key_file`.
    pub upstream_cert_file: Option<PathBuf>,
    /// The external CA's key (PEM), read only when Castellan's CA is made.
    pub upstream_key_file: Option<PathBuf>,
    /// Or the external CA's key in the `[ca.pkcs11]` token, by label (with
    /// `key_manager = "pkcs11"`): used once, to sign Castellan's CA, whose
    /// own key is then made in the token too.
    pub upstream_key_label: Option<String>,
    /// How long an X.509 authority made by rotation lives (a self-signed
    /// authority, or an intermediate within its root). Default: 31536000
    /// (365 days).
    pub x509_authority_ttl_seconds: u64,
    /// How long a JWT key made by rotation lives. Default: 31536000.
    pub jwt_key_ttl_seconds: u64,
    /// Rotate automatically: prepare a successor at `prepare_at` of the
    /// active authority's life, activate it at `activate_at`. The gap
    /// between them is the overlap in which every bundle carries both.
    /// Default: true.
    pub auto_rotate: bool,
    /// Default: 0.5.
    pub prepare_at: f64,
    /// Default: 0.8333 (five sixths).
    pub activate_at: f64,
    /// Where new CA and JWT keys are made and kept: `disk` (files in
    /// `DATA_DIR/ca`, mode 0600) or `pkcs11` (generated inside the token of
    /// `[ca.pkcs11]`, never exported). Default: `disk`.
    pub key_manager: String,
    /// The token, with `key_manager = "pkcs11"`.
    pub pkcs11: Option<Pkcs11Config>,
}

/// A PKCS#11 token holding the CA and JWT keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The PKCS#11 module, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token (as `softhsm2-util --init-token --label`).
    pub token_label: String,
    /// A file holding the user PIN (read at start; never logged).
    pub pin_file: PathBuf,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            intermediate: false,
            upstream_cert_file: None,
            upstream_key_file: None,
            upstream_key_label: None,
            x509_authority_ttl_seconds: 365 * 86_400,
            jwt_key_ttl_seconds: 365 * 86_400,
            auto_rotate: true,
            prepare_at: 0.5,
            activate_at: 0.8333,
            key_manager: "disk".into(),
            pkcs11: None,
        }
    }
}
