use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use super::*;
use crate::wire::testing::*;

/// A software stand-in for a TPM's P-256 AK that signs quotes the way a TPM
/// would, to exercise the verifier without a TPM.
struct SoftAk {
    pair: EcdsaKeyPair,
    rng: SystemRandom,
}

impl SoftAk {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        Self { pair, rng }
    }

    fn public(&self, attributes: u32) -> wire::Public {
        let bytes = ecc_public(
            attributes,
            Some((wire::ALG_ECDSA, wire::ALG_SHA256)),
            self.pair.public_key().as_ref(),
        );
        wire::Public::from_tpm2b(&bytes).unwrap()
    }

    fn sign(&self, attest: &[u8]) -> Vec<u8> {
        ecdsa_signature(self.pair.sign(&self.rng, attest).unwrap().as_ref())
    }
}

fn pcrs() -> BTreeMap<u32, Vec<u8>> {
    [(0, vec![0xa0; 32]), (1, vec![0xa1; 32]), (16, vec![0; 32])].into()
}

/// A quote over PCRs 0, 1 and 16 with the digest of `pcrs()`.
fn quote(nonce: &[u8]) -> Vec<u8> {
    let values = pcrs();
    let digest = wire::pcr_digest(wire::ALG_SHA256, values.values().map(Vec::as_slice)).unwrap();
    quote_attest(nonce, &[0x03, 0x00, 0x01], &digest)
}

#[test]
fn quote_signed_by_the_ak_verifies() {
    let ak = SoftAk::new();
    let attest = quote(b"nonce");
    let info = verify_quote(
        &ak.public(AK_ATTRIBUTES),
        &attest,
        &ak.sign(&attest),
        b"nonce",
        &pcrs(),
    )
    .unwrap();
    assert_eq!(info.pcr_bank, wire::ALG_SHA256);
    assert_eq!(
        info.attest.pcr_selection,
        vec![(wire::ALG_SHA256, vec![0, 1, 16])]
    );
}

#[test]
fn tampered_quote_or_other_key_is_refused() {
    let ak = SoftAk::new();
    let attest = quote(b"nonce");
    let signature = ak.sign(&attest);
    let mut tampered = attest.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    let err = verify_quote(
        &ak.public(AK_ATTRIBUTES),
        &tampered,
        &signature,
        b"nonce",
        &pcrs(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadSignature), "{err}");
    let other = SoftAk::new();
    let err = verify_quote(
        &other.public(AK_ATTRIBUTES),
        &attest,
        &signature,
        b"nonce",
        &pcrs(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::BadSignature), "{err}");
}

#[test]
fn unrestricted_or_decrypting_ak_is_refused() {
    let ak = SoftAk::new();
    let attest = quote(b"nonce");
    let signature = ak.sign(&attest);
    for attributes in [
        AK_ATTRIBUTES & !wire::attributes::RESTRICTED,
        AK_ATTRIBUTES & !wire::attributes::FIXED_TPM,
        AK_ATTRIBUTES | wire::attributes::DECRYPT,
    ] {
        let err = verify_quote(&ak.public(attributes), &attest, &signature, b"nonce", &pcrs()).unwrap_err();
        assert!(matches!(err, Error::WeakAttestationKey(_)), "{err}");
    }
}

#[test]
fn pcr_values_must_match_the_quote_exactly() {
    let ak = SoftAk::new();
    let public = ak.public(AK_ATTRIBUTES);
    let attest = quote(b"nonce");
    let signature = ak.sign(&attest);
    let mut changed = pcrs();
    changed.insert(1, vec![0xff; 32]);
    let err = verify_quote(&public, &attest, &signature, b"nonce", &changed).unwrap_err();
    assert!(matches!(err, Error::PcrDigestMismatch), "{err}");
    let mut short = pcrs();
    short.insert(1, vec![0xa1; 20]);
    let err = verify_quote(&public, &attest, &signature, b"nonce", &short).unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

#[test]
fn garbage_evidence_is_an_error_not_a_panic() {
    let ak = SoftAk::new();
    let public = ak.public(AK_ATTRIBUTES);
    let attest = quote(b"nonce");
    let signature = ak.sign(&attest);
    for len in 0..signature.len() {
        assert!(verify_quote(&public, &attest, &signature[..len], b"nonce", &pcrs()).is_err());
    }
    // A correctly signed but malformed TPMS_ATTEST.
    for len in 0..attest.len() {
        let cut = &attest[..len];
        assert!(verify_quote(&public, cut, &ak.sign(cut), b"nonce", &pcrs()).is_err());
    }
}
