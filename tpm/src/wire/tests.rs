use proptest::prelude::*;

use super::testing::*;
use super::*;

const EK_SYMMETRIC: Option<(u16, u16, u16)> = Some((ALG_AES, 128, ALG_CFB));

#[test]
fn rsa_public_round_trips_and_names_itself() {
    let modulus = [0xc5; 256];
    let bytes = rsa_public(AK_ATTRIBUTES, None, Some((ALG_RSASSA, ALG_SHA256)), &modulus);
    let public = Public::from_tpm2b(&bytes).unwrap();
    assert_eq!(public.name_alg, ALG_SHA256);
    assert!(public.has_attributes(attributes::RESTRICTED | attributes::SIGN));
    assert!(!public.has_attributes(attributes::DECRYPT));
    assert_eq!(public.scheme, Some((ALG_RSASSA, ALG_SHA256)));
    assert_eq!(
        public.key,
        PublicKey::Rsa {
            bits: 2048,
            exponent: 65537,
            modulus: modulus.to_vec()
        }
    );
    assert_eq!(public.tpmt_bytes(), &bytes[2..]);
    let name = public.name().unwrap();
    assert_eq!(&name[..2], &[0x00, 0x0b]);
    assert_eq!(&name[2..], digest::digest(&digest::SHA256, &bytes[2..]).as_ref());
}

#[test]
fn ecc_public_parses() {
    let mut point = vec![4];
    point.extend(1..=64u8);
    let public =
        Public::from_tpm2b(&ecc_public(AK_ATTRIBUTES, Some((ALG_ECDSA, ALG_SHA256)), &point)).unwrap();
    let PublicKey::Ecc { curve, kdf, x, y } = public.key else {
        panic!("not ECC");
    };
    assert_eq!((curve, kdf), (ECC_NIST_P256, None));
    assert_eq!((x.as_slice(), y.as_slice()), (&point[1..33], &point[33..]));
}

#[test]
fn ek_symmetric_definition_is_kept() {
    let public = Public::from_tpm2b(&rsa_public(0x0003_00b2, EK_SYMMETRIC, None, &[1; 256])).unwrap();
    assert_eq!(public.symmetric, EK_SYMMETRIC);
    assert_eq!(public.scheme, None);
}

#[test]
fn quote_attest_parses_selection_in_tpm_order() {
    // Bit n of byte i is PCR 8i + n.
    let attest = Attest::parse_quote(&quote_attest(b"nonce", &[0x83, 0x00, 0x01], &[9; 32])).unwrap();
    assert_eq!(attest.pcr_selection, vec![(ALG_SHA256, vec![0, 1, 7, 16])]);
    assert_eq!(attest.extra_data, b"nonce");
    assert_eq!(attest.pcr_digest, [9; 32]);
    assert_eq!(
        (
            attest.clock,
            attest.reset_count,
            attest.restart_count,
            attest.safe
        ),
        (1234, 5, 6, true)
    );
    assert_eq!(attest.firmware_version, 0x2019_1023);
}

#[test]
fn attest_that_is_not_a_tpm_quote_is_refused() {
    let good = quote_attest(b"n", &[1, 0, 0], &[0; 32]);
    let mut forged = good.clone();
    forged[0] = 0;
    assert!(matches!(Attest::parse_quote(&forged), Err(Error::BadMagic(_))));
    let mut certify = good.clone();
    certify[4..6].copy_from_slice(&0x8017u16.to_be_bytes());
    assert!(matches!(
        Attest::parse_quote(&certify),
        Err(Error::NotAQuote(0x8017))
    ));
    assert!(matches!(
        Attest::parse_quote(&good[..good.len() - 1]),
        Err(Error::Truncated { .. })
    ));
    let mut long = good;
    long.push(0);
    assert!(matches!(
        Attest::parse_quote(&long),
        Err(Error::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn signatures_parse_by_scheme() {
    let ecdsa = Signature::parse(&ecdsa_signature(&[7; 64])).unwrap();
    assert_eq!(
        ecdsa,
        Signature::Ecdsa {
            hash: ALG_SHA256,
            r: vec![7; 32],
            s: vec![7; 32]
        }
    );
    let mut rsa = ALG_RSAPSS.to_be_bytes().to_vec();
    rsa.extend_from_slice(&ALG_SHA256.to_be_bytes());
    rsa.extend_from_slice(&tpm2b(&[1; 256]).unwrap());
    assert!(matches!(
        Signature::parse(&rsa),
        Ok(Signature::Rsa {
            scheme: ALG_RSAPSS,
            ..
        })
    ));
    let hmac = [0x00, 0x05, 0x00, 0x0b];
    assert!(matches!(
        Signature::parse(&hmac),
        Err(Error::UnsupportedAlgorithm { alg: 0x0005, .. })
    ));
}

#[test]
fn pcr_digest_hashes_values_in_order() {
    let a = [1u8; 32];
    let b = [2u8; 32];
    let mut both = a.to_vec();
    both.extend_from_slice(&b);
    assert_eq!(
        pcr_digest(ALG_SHA256, [a.as_slice(), b.as_slice()]).unwrap(),
        digest::digest(&digest::SHA256, &both).as_ref()
    );
    assert_ne!(
        pcr_digest(ALG_SHA256, [a.as_slice(), b.as_slice()]).unwrap(),
        pcr_digest(ALG_SHA256, [b.as_slice(), a.as_slice()]).unwrap()
    );
}

fn valid_structures() -> Vec<Vec<u8>> {
    let mut point = vec![4];
    point.extend([3; 64]);
    vec![
        rsa_public(
            AK_ATTRIBUTES,
            EK_SYMMETRIC,
            Some((ALG_RSASSA, ALG_SHA256)),
            &[0xab; 256],
        ),
        ecc_public(AK_ATTRIBUTES, Some((ALG_ECDSA, ALG_SHA256)), &point),
        quote_attest(&[5; 32], &[0xff, 0xff, 0xff], &[6; 32]),
        ecdsa_signature(&[8; 64]),
    ]
}

/// Every parser on the same bytes; none may panic, whatever they are.
fn parse_everything(bytes: &[u8]) {
    let _ = Public::from_tpm2b(bytes);
    let _ = Public::from_tpmt(bytes);
    let _ = Attest::parse_quote(bytes);
    let _ = Signature::parse(bytes);
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        parse_everything(&bytes);
    }

    #[test]
    fn mutated_structures_never_panic(
        which in 0usize..4,
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = valid_structures().swap_remove(which);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        parse_everything(&bytes);
        parse_everything(&bytes[..cut.index(bytes.len() + 1)]);
    }
}
