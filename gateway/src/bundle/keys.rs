//! Who may sign policy bundles, and checking a bundle's signature against
//! them.

use super::BundleError;

/// Who may sign bundles.
pub struct BundleKeys {
    /// (keyid, PEM public key).
    pub keys: Vec<(Option<String>, String)>,
    /// Unsigned bundles pass (`bundles.verification = "off"`, or `dev`).
    pub verification_off: bool,
}

impl BundleKeys {
    /// Verifies a bundle's signature with the configured keys. Returns
    /// whether it was signed and verified.
    pub fn verify(&self, bundle: &super::Bundle) -> Result<bool, super::BundleError> {
        if !bundle.files.contains_key(super::SIGNATURES_FILE) {
            if self.verification_off {
                return Ok(false);
            }
            return Err(super::BundleError::Signature(
                "the bundle is not signed, and bundles.verification is `required`".into(),
            ));
        }
        if self.keys.is_empty() {
            return Err(super::BundleError::Signature(
                "no bundle signing keys are configured (bundles.keys)".into(),
            ));
        }
        let mut last = None;
        for (_, pem) in &self.keys {
            match super::verify(bundle, pem) {
                Ok(sig) => {
                    let expected = self
                        .keys
                        .iter()
                        .find(|(_, p)| p == pem)
                        .and_then(|(k, _)| k.clone());
                    if let (Some(want), Some(got)) = (expected, sig.keyid.as_ref())
                        && want != *got
                    {
                        last = Some(super::BundleError::Signature(format!(
                            "keyid `{got}` does not match the key's `{want}`"
                        )));
                        continue;
                    }
                    return Ok(true);
                }
                // An integrity failure is final: the signature was good, the content is not.
                Err(e @ super::BundleError::Integrity(_)) => return Err(e),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| super::BundleError::Signature("no key verifies the signature".into())))
    }
}

/// The bundle signing keys the config names.
pub fn load_keys(config: &crate::config::Config) -> Result<BundleKeys, BundleError> {
    let mut keys = Vec::new();
    for k in &config.bundles.keys {
        let pem = std::fs::read_to_string(&k.public_key_file).map_err(|e| {
            BundleError::Io(format!(
                "bundles.keys public_key_file {}: {e}",
                k.public_key_file.display()
            ))
        })?;
        keys.push((k.keyid.clone(), pem));
    }
    Ok(BundleKeys {
        keys,
        verification_off: config.bundles.verification == "off",
    })
}
