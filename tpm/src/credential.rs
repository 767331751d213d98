//! MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 TPM2_MakeCredential):
//! wraps a secret to an EK so that only the TPM holding that EK, and only
//! while an object with the given Name is loaded in it, can recover it with
//! TPM2_ActivateCredential. This is what binds an attestation key to an EK.
//!
//! It uses no TPM. Only RSA EKs with an AES-128-CFB symmetric definition (the
//! TCG default "template L-1") are handled; ECC EKs would need ECDH seed
//! sharing and are refused as unsupported.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use rand::RngCore;
use ring::hmac;
use rsa::{BigUint, Oaep, RsaPublicKey};

use crate::errors::{Error, Result};
use crate::wire::{self, PublicKey};

/// A credential made for one EK and one object Name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// TPM2B_ID_OBJECT: u16 size || TPM2B_DIGEST(integrityHMAC) || encIdentity.
    pub id_object: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET: u16 size || RSA-OAEP(seed).
    pub encrypted_secret: Vec<u8>,
}

/// Wraps `secret` (1 to digest-size bytes) to `ek` for the object named
/// `ak_name`.
pub fn make_credential(ek: &wire::Public, ak_name: &[u8], secret: &[u8]) -> Result<Credential> {
    let digest = wire::digest_algorithm(ek.name_alg)?;
    let digest_len = digest.output_len();
    if secret.is_empty() || secret.len() > digest_len {
        return Err(Error::Invalid {
            what: "credential secret",
            detail: format!("{} bytes; 1 to {digest_len} allowed", secret.len()),
        });
    }
    let PublicKey::Rsa {
        exponent, modulus, ..
    } = &ek.key
    else {
        return Err(Error::Unsupported("MakeCredential to an ECC EK"));
    };
    let Some((wire::ALG_AES, 128, wire::ALG_CFB)) = ek.symmetric else {
        return Err(Error::Unsupported(
            "MakeCredential to an EK whose symmetric definition is not AES-128-CFB",
        ));
    };

    let mut seed = vec![0; digest_len];
    rand::rngs::OsRng.fill_bytes(&mut seed);
    let encrypted_seed = oaep_encrypt(ek.name_alg, modulus, *exponent, &seed)?;

    // The credential is a TPM2B_DIGEST, encrypted with a key bound to the
    // object's Name, then MACed together with that Name.
    let sym_key = kdfa(ek.name_alg, &seed, b"STORAGE", ak_name, &[], 128)?;
    let mut enc_identity = wire::tpm2b(secret)?;
    let iv = [0u8; 16];
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &iv)
        .map_err(|e| Error::Crypto(format!("AES-128-CFB key: {e}")))?
        .encrypt(&mut enc_identity);

    let bits = u32::try_from(digest_len * 8).map_err(|_| Error::Unsupported("digest size"))?;
    let hmac_key = kdfa(ek.name_alg, &seed, b"INTEGRITY", &[], &[], bits)?;
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac_algorithm(ek.name_alg)?, &hmac_key));
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer_hmac = mac.sign();

    let mut id_object = wire::tpm2b(outer_hmac.as_ref())?;
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object: wire::tpm2b(&id_object)?,
        encrypted_secret: wire::tpm2b(&encrypted_seed)?,
    })
}

/// KDFa (Part 1, §11.4.10.2): counter-mode HMAC KDF from SP 800-108.
/// `label` is given without its terminating NUL, which is added here.
pub fn kdfa(
    hash_alg: u16,
    key: &[u8],
    label: &[u8],
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Result<Vec<u8>> {
    let key = hmac::Key::new(hmac_algorithm(hash_alg)?, key);
    let len = usize::try_from(bits.div_ceil(8)).map_err(|_| Error::Unsupported("KDF length"))?;
    let mut out = Vec::with_capacity(len);
    let mut counter = 1u32;
    while out.len() < len {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label);
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(len);
    Ok(out)
}

/// RSA-OAEP with the EK's name algorithm and the label "IDENTITY\0".
fn oaep_encrypt(hash_alg: u16, modulus: &[u8], exponent: u32, seed: &[u8]) -> Result<Vec<u8>> {
    let key = RsaPublicKey::new(BigUint::from_bytes_be(modulus), BigUint::from(exponent)).map_err(|e| {
        Error::Invalid {
            what: "EK RSA key",
            detail: e.to_string(),
        }
    })?;
    // The TPM's label includes the terminating NUL.
    let label = "IDENTITY\0";
    let padding = match hash_alg {
        wire::ALG_SHA256 => Oaep::new_with_label::<sha2::Sha256, _>(label),
        wire::ALG_SHA384 => Oaep::new_with_label::<sha2::Sha384, _>(label),
        wire::ALG_SHA512 => Oaep::new_with_label::<sha2::Sha512, _>(label),
        alg => return Err(Error::UnsupportedAlgorithm { what: "EK name", alg }),
    };
    key.encrypt(&mut rand::rngs::OsRng, padding, seed)
        .map_err(|e| Error::Crypto(format!("RSA-OAEP: {e}")))
}

fn hmac_algorithm(hash_alg: u16) -> Result<hmac::Algorithm> {
    match hash_alg {
        wire::ALG_SHA256 => Ok(hmac::HMAC_SHA256),
        wire::ALG_SHA384 => Ok(hmac::HMAC_SHA384),
        wire::ALG_SHA512 => Ok(hmac::HMAC_SHA512),
        alg => Err(Error::UnsupportedAlgorithm {
            what: "KDF hash",
            alg,
        }),
    }
}

#[cfg(test)]
mod tests;
