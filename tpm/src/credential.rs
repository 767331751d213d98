//! MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 TPM2_MakeCredential):
//! wraps a secret to an EK so that only the TPM holding that EK, and only
//! while an object with the given Name is loaded in it, can recover it with
//! TPM2_ActivateCredential. This is what binds an attestation key to an EK.
//!
//! It uses no TPM. EKs of the TCG default low-range templates are handled:
//! RSA-2048 ("L-1", the seed RSA-OAEP-encrypted) and ECC NIST P-256 ("L-2",
//! the seed shared by ephemeral ECDH and KDFe), both with SHA-256 names and
//! AES-128-CFB; other EKs are refused as unsupported.

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
    /// TPM2B_ENCRYPTED_SECRET: u16 size || RSA-OAEP(seed), or, for an ECC
    /// EK, the ephemeral ECDH point (TPMS_ECC_POINT).
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
    let Some((wire::ALG_AES, 128, wire::ALG_CFB)) = ek.symmetric else {
        return Err(Error::Unsupported(
            "MakeCredential to an EK whose symmetric definition is not AES-128-CFB",
        ));
    };
    let (seed, encrypted_seed) = match &ek.key {
        PublicKey::Rsa {
            exponent, modulus, ..
        } => {
            let mut seed = vec![0; digest_len];
            rand::rngs::OsRng.fill_bytes(&mut seed);
            let encrypted = oaep_encrypt(ek.name_alg, modulus, *exponent, &seed)?;
            (seed, encrypted)
        }
        PublicKey::Ecc {
            curve: wire::ECC_NIST_P256,
            x,
            y,
            ..
        } if ek.name_alg == wire::ALG_SHA256 => ecdh_seed(x, y)?,
        PublicKey::Ecc { .. } => {
            return Err(Error::Unsupported(
                "MakeCredential to an ECC EK other than NIST P-256 with SHA-256",
            ));
        }
    };

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

/// The seed for a P-256 EK at (`x`, `y`) (Part 1, Annex C.6.1): an
/// ephemeral key pair, Z the x-coordinate of the shared point, seed =
/// KDFe(SHA-256, Z, "IDENTITY", ephemeral x, EK x, 256 bits). The TPM
/// recomputes Z from the ephemeral public point, which is what travels, as
/// a TPMS_ECC_POINT (TPM2B x || TPM2B y).
fn ecdh_seed(x: &[u8], y: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
    use ring::agreement;
    if x.len() != 32 || y.len() != 32 {
        return Err(Error::Invalid {
            what: "EK ECC point",
            detail: format!("coordinates of {} and {} bytes; P-256 has 32", x.len(), y.len()),
        });
    }
    let mut ek_point = Vec::with_capacity(65);
    ek_point.push(4);
    ek_point.extend_from_slice(x);
    ek_point.extend_from_slice(y);
    let rng = ring::rand::SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| Error::Crypto("ECDH P-256 key generation".into()))?;
    let ephemeral_point = ephemeral
        .compute_public_key()
        .map_err(|_| Error::Crypto("ECDH P-256 public key".into()))?;
    let (eph_x, eph_y) = ephemeral_point.as_ref()[1..].split_at(32);
    let peer = agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &ek_point);
    // ring checks that the EK's point is on the curve.
    let seed = agreement::agree_ephemeral(ephemeral, &peer, |z| kdfe_sha256(z, b"IDENTITY", eph_x, x))
        .map_err(|_| Error::Invalid {
            what: "EK ECC point",
            detail: "not a point on P-256".into(),
        })?;
    let mut point = wire::tpm2b(eph_x)?;
    point.extend_from_slice(&wire::tpm2b(eph_y)?);
    Ok((seed, point))
}

/// KDFe (Part 1, §11.4.10.3) with SHA-256 for 256 bits: one block,
/// SHA-256(counter 1 || Z || use || NUL || party U x || party V x).
/// `usage` is given without its terminating NUL, which is added here.
pub fn kdfe_sha256(z: &[u8], usage: &[u8], party_u: &[u8], party_v: &[u8]) -> Vec<u8> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(&1u32.to_be_bytes());
    ctx.update(z);
    ctx.update(usage);
    ctx.update(&[0]);
    ctx.update(party_u);
    ctx.update(party_v);
    ctx.finish().as_ref().to_vec()
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
