use super::*;
use crate::wire::testing::*;

const EK_ATTRIBUTES: u32 = 0x0003_00b2;

fn rsa_ek() -> wire::Public {
    let mut modulus = vec![0xc5; 256];
    modulus[255] = 0x01;
    wire::Public::from_tpm2b(&rsa_public(
        EK_ATTRIBUTES,
        Some((wire::ALG_AES, 128, wire::ALG_CFB)),
        None,
        &modulus,
    ))
    .unwrap()
}

#[test]
fn credential_has_the_tpm_layout() {
    let name = [0x00, 0x0b].iter().chain(&[7; 32]).copied().collect::<Vec<_>>();
    let credential = make_credential(&rsa_ek(), &name, &[1; 32]).unwrap();
    // TPM2B_ID_OBJECT: size, TPM2B_DIGEST(HMAC-SHA256), encrypted TPM2B_DIGEST(secret).
    assert_eq!(credential.id_object.len(), 2 + (2 + 32) + (2 + 32));
    assert_eq!(&credential.id_object[..4], &[0, 68, 0, 32]);
    // TPM2B_ENCRYPTED_SECRET: size, one RSA-2048 block.
    assert_eq!(credential.encrypted_secret.len(), 2 + 256);
    assert_eq!(&credential.encrypted_secret[..2], &[1, 0]);
    // A fresh seed every time.
    assert_ne!(make_credential(&rsa_ek(), &name, &[1; 32]).unwrap(), credential);
}

#[test]
fn secret_must_fit_a_digest() {
    for secret in [&[][..], &[0; 33][..]] {
        assert!(matches!(
            make_credential(&rsa_ek(), b"name", secret),
            Err(Error::Invalid { .. })
        ));
    }
}

#[test]
fn a_p256_ek_gets_an_ephemeral_point() {
    use ring::agreement;
    let rng = ring::rand::SystemRandom::new();
    let key = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng).unwrap();
    let point = key.compute_public_key().unwrap();
    let ek = wire::Public::from_tpm2b(&ecc_ek_public(EK_ATTRIBUTES, point.as_ref())).unwrap();
    let c = make_credential(&ek, &[0x00, 0x0b, 7, 7, 7], b"secret").unwrap();
    // TPM2B(TPM2B(x) || TPM2B(y)), 32-byte coordinates of a fresh point.
    assert_eq!(c.encrypted_secret.len(), 2 + 2 + 32 + 2 + 32);
    assert_eq!(&c.encrypted_secret[..4], &[0, 68, 0, 32]);
    assert_eq!(&c.encrypted_secret[36..38], &[0, 32]);
    let again = make_credential(&ek, &[0x00, 0x0b, 7, 7, 7], b"secret").unwrap();
    assert_ne!(again.encrypted_secret, c.encrypted_secret);
    // A point off the curve is refused, not used.
    let mut off = point.as_ref().to_vec();
    off[64] ^= 1;
    let bad = wire::Public::from_tpm2b(&ecc_ek_public(EK_ATTRIBUTES, &off)).unwrap();
    assert!(matches!(
        make_credential(&bad, b"name", b"secret"),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn kdfe_is_one_sha256_block_with_the_nul_terminated_use() {
    let mut input = 1u32.to_be_bytes().to_vec();
    input.extend_from_slice(b"zzIDENTITY\0uv");
    assert_eq!(
        kdfe_sha256(b"zz", b"IDENTITY", b"u", b"v"),
        ring::digest::digest(&ring::digest::SHA256, &input).as_ref()
    );
}

#[test]
fn eks_without_aes_128_cfb_are_unsupported() {
    let mut point = vec![4];
    point.extend([9; 64]);
    let ecc = wire::Public::from_tpm2b(&ecc_public(EK_ATTRIBUTES, None, &point)).unwrap();
    assert!(matches!(
        make_credential(&ecc, b"name", b"secret"),
        Err(Error::Unsupported(_))
    ));
    let aes256 = wire::Public::from_tpm2b(&rsa_public(
        EK_ATTRIBUTES,
        Some((wire::ALG_AES, 256, wire::ALG_CFB)),
        None,
        &[0xc5; 256],
    ))
    .unwrap();
    assert!(matches!(
        make_credential(&aes256, b"name", b"secret"),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn kdfa_is_counter_mode_hmac() {
    // One block: HMAC(key, 1 || label || 0 || u || v || bits), truncated.
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"seed");
    let expected = hmac::sign(
        &key,
        &[&[0, 0, 0, 1][..], b"STORAGE\0", b"name", &[0, 0, 0, 128]].concat(),
    );
    assert_eq!(
        kdfa(wire::ALG_SHA256, b"seed", b"STORAGE", b"name", &[], 128).unwrap(),
        expected.as_ref()[..16]
    );
    // Two blocks for more than one digest.
    assert_eq!(
        kdfa(wire::ALG_SHA256, b"seed", b"X", &[], &[], 320)
            .unwrap()
            .len(),
        40
    );
}
