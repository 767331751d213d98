//! The verifier against a real software TPM: credential activation, quotes,
//! and EK certificates made by a manufacturer CA the test creates.

// Test code: a failed set-up step should stop the test where it happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use castellan_tpm::client::{Attestor, EkKind};
use castellan_tpm::{Error, ek, make_credential, verify_quote, wire};
use rustls_pki_types::UnixTime;

use castellan_tpm::testing::{Ca, SwTpm, TempDir};

const PCRS: [u32; 4] = [0, 1, 7, 16];

/// A manufactured TPM with its EK and AK loaded.
struct Machine {
    attestor: Attestor,
    ek: wire::Public,
    ak: wire::Public,
    ek_cert: Vec<u8>,
    // Dropped last, after the attestor has flushed its handles.
    _tpm: SwTpm,
}

impl Machine {
    fn new(ca: &Ca) -> Self {
        let tpm = SwTpm::manufacture(ca);
        let mut attestor = Attestor::connect(&tpm.tcti()).unwrap();
        let ek = wire::Public::from_tpm2b(attestor.ek_public()).unwrap();
        let ak = wire::Public::from_tpm2b(attestor.ak_public()).unwrap();
        let ek_cert = attestor
            .ek_certificate()
            .unwrap()
            .expect("swtpm_setup wrote an EK certificate");
        Self {
            attestor,
            ek,
            ak,
            ek_cert,
            _tpm: tpm,
        }
    }
}

fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut nonce = vec![0; 32];
    rand::thread_rng().fill_bytes(&mut nonce);
    nonce
}

#[test]
fn genuine_tpm_activates_the_credential_and_its_quote_verifies() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let ca = Ca::new();
    let mut m = Machine::new(&ca);

    ek::check_ek_matches(&m.ek_cert, &m.ek).unwrap();
    ek::verify_ek_chain(&m.ek_cert, &[ca.intermediate()], &[ca.root()], UnixTime::now()).unwrap();

    let secret = nonce();
    let credential = make_credential(&m.ek, &m.ak.name().unwrap(), &secret).unwrap();
    let activated = m
        .attestor
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .unwrap();
    assert_eq!(activated, secret);

    let nonce = nonce();
    let quote = m.attestor.quote(&nonce, &PCRS).unwrap();
    assert_eq!(quote.pcrs.keys().copied().collect::<Vec<_>>(), PCRS);
    let info = verify_quote(&m.ak, &quote.attest, &quote.signature, &nonce, &quote.pcrs).unwrap();
    assert_eq!(info.pcr_bank, wire::ALG_SHA256);
    assert_eq!(info.attest.extra_data, nonce);
    assert_eq!(info.attest.pcr_selection, vec![(wire::ALG_SHA256, PCRS.to_vec())]);
    // The quote names the AK that signed it.
    assert!(
        info.attest
            .qualified_signer
            .starts_with(&wire::ALG_SHA256.to_be_bytes())
    );
}

#[test]
fn quote_over_another_nonce_is_refused() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let mut m = Machine::new(&Ca::new());
    let issued = nonce();
    let quote = m.attestor.quote(&issued, &PCRS).unwrap();

    let other = nonce();
    let err = verify_quote(&m.ak, &quote.attest, &quote.signature, &other, &quote.pcrs).unwrap_err();
    assert!(matches!(err, Error::NonceMismatch), "{err}");
    // A prefix of the nonce is not the nonce.
    let err = verify_quote(&m.ak, &quote.attest, &quote.signature, &issued[..16], &quote.pcrs).unwrap_err();
    assert!(matches!(err, Error::NonceMismatch), "{err}");
}

#[test]
fn changed_pcr_values_are_refused() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let mut m = Machine::new(&Ca::new());
    let nonce = nonce();
    let before = m.attestor.quote(&nonce, &PCRS).unwrap();

    // Claiming a different value than the TPM quoted.
    let mut forged = before.pcrs.clone();
    forged.insert(16, vec![0x42; 32]);
    let err = verify_quote(&m.ak, &before.attest, &before.signature, &nonce, &forged).unwrap_err();
    assert!(matches!(err, Error::PcrDigestMismatch), "{err}");

    // Leaving out a quoted PCR, or adding one the quote does not cover.
    let mut missing = before.pcrs.clone();
    missing.remove(&7);
    let err = verify_quote(&m.ak, &before.attest, &before.signature, &nonce, &missing).unwrap_err();
    assert!(matches!(err, Error::PcrMissing(7)), "{err}");
    let mut extra = before.pcrs.clone();
    extra.insert(10, vec![0; 32]);
    let err = verify_quote(&m.ak, &before.attest, &before.signature, &nonce, &extra).unwrap_err();
    assert!(matches!(err, Error::PcrNotQuoted(10)), "{err}");

    // The machine's state really changes: a PCR policy pinned to the old
    // values no longer matches a fresh, genuine quote.
    m._tpm.extend_pcr(16, &[0x5a; 32]);
    let after = m.attestor.quote(&nonce, &PCRS).unwrap();
    verify_quote(&m.ak, &after.attest, &after.signature, &nonce, &after.pcrs).unwrap();
    assert_ne!(after.pcrs[&16], before.pcrs[&16]);
    assert_eq!(after.pcrs[&0], before.pcrs[&0]);
    let err = verify_quote(&m.ak, &after.attest, &after.signature, &nonce, &before.pcrs).unwrap_err();
    assert!(matches!(err, Error::PcrDigestMismatch), "{err}");
}

#[test]
fn second_tpm_cannot_pass_with_the_first_tpms_ek() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let ca = Ca::new();
    let first = Machine::new(&ca);
    let mut second = Machine::new(&ca);

    // The second TPM claims the first TPM's (genuine) EK certificate with
    // its own AK: the credential is wrapped to the first TPM's EK, which
    // the second TPM does not hold, so it cannot activate it.
    ek::check_ek_matches(&first.ek_cert, &first.ek).unwrap();
    let secret = nonce();
    let credential = make_credential(&first.ek, &second.ak.name().unwrap(), &secret).unwrap();
    let activated = second
        .attestor
        .activate_credential(&credential.id_object, &credential.encrypted_secret);
    assert!(
        activated.is_err(),
        "second TPM activated a credential for another EK"
    );

    // Its quote does not verify with the first TPM's AK either.
    let nonce = nonce();
    let quote = second.attestor.quote(&nonce, &PCRS).unwrap();
    let err = verify_quote(&first.ak, &quote.attest, &quote.signature, &nonce, &quote.pcrs).unwrap_err();
    assert!(matches!(err, Error::BadSignature), "{err}");

    // And the first TPM's EK certificate does not certify the second EK.
    let err = ek::check_ek_matches(&first.ek_cert, &second.ek).unwrap_err();
    assert!(matches!(err, Error::EkMismatch), "{err}");
}

#[test]
fn credential_for_another_ak_is_not_activated() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let mut m = Machine::new(&Ca::new());
    let mut wrong_name = m.ak.name().unwrap();
    if let Some(last) = wrong_name.last_mut() {
        *last ^= 1;
    }
    let credential = make_credential(&m.ek, &wrong_name, b"secret").unwrap();
    assert!(
        m.attestor
            .activate_credential(&credential.id_object, &credential.encrypted_secret)
            .is_err()
    );
}

#[test]
fn ek_certificate_from_another_manufacturer_is_refused() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let trusted = Ca::new();
    let untrusted = Ca::new();
    let genuine = Machine::new(&trusted);
    let rogue = Machine::new(&untrusted);

    ek::check_ek_matches(&rogue.ek_cert, &rogue.ek).unwrap();
    ek::verify_ek_chain(
        &rogue.ek_cert,
        &[untrusted.intermediate()],
        &[untrusted.root()],
        UnixTime::now(),
    )
    .unwrap();
    // Against the trusted manufacturer, with either intermediate offered.
    for intermediates in [
        vec![trusted.intermediate()],
        vec![untrusted.intermediate()],
        vec![],
    ] {
        let err = ek::verify_ek_chain(&rogue.ek_cert, &intermediates, &[trusted.root()], UnixTime::now())
            .unwrap_err();
        assert!(matches!(err, Error::UntrustedEk(_)), "{err}");
    }
    ek::verify_ek_chain(
        &genuine.ek_cert,
        &[trusted.intermediate()],
        &[trusted.root()],
        UnixTime::now(),
    )
    .unwrap();
}

#[test]
fn fresh_tpm_has_pcr_16_zeroed() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let mut m = Machine::new(&Ca::new());
    let quote = m.attestor.quote(&nonce(), &[16]).unwrap();
    // A freshly started TPM has PCR 16 all zero.
    let expected: BTreeMap<u32, Vec<u8>> = [(16, vec![0; 32])].into();
    assert_eq!(quote.pcrs, expected);
}

#[test]
fn every_tpm_handle_is_flushed() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tpm = SwTpm::manufacture(&Ca::new());
    for _ in 0..3 {
        let mut attestor = Attestor::connect(&tpm.tcti()).unwrap();
        let ek = wire::Public::from_tpm2b(attestor.ek_public()).unwrap();
        let ak = wire::Public::from_tpm2b(attestor.ak_public()).unwrap();
        let good = make_credential(&ek, &ak.name().unwrap(), b"secret").unwrap();
        attestor
            .activate_credential(&good.id_object, &good.encrypted_secret)
            .unwrap();
        let bad = make_credential(&ek, &ek.name().unwrap(), b"secret").unwrap();
        assert!(
            attestor
                .activate_credential(&bad.id_object, &bad.encrypted_secret)
                .is_err()
        );
        attestor.quote(&nonce(), &PCRS).unwrap();
    }
    assert_eq!(tpm.handles("handles-transient"), Vec::<String>::new());
    assert_eq!(tpm.handles("handles-loaded-session"), Vec::<String>::new());
    assert_eq!(tpm.handles("handles-saved-session"), Vec::<String>::new());
}

/// tpm2-tools is an independent TPM client: quotes it makes with each AK
/// scheme the verifier supports must parse and verify too.
#[test]
fn quotes_made_by_tpm2_tools_verify() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tpm = SwTpm::manufacture(&Ca::new());
    let work = TempDir::new("tools");
    let dir = work.path();
    let flush = || {
        tpm.tool(dir, "tpm2_flushcontext", &["-t"]);
        tpm.tool(dir, "tpm2_flushcontext", &["-s"]);
    };
    for (key, scheme) in [("rsa", "rsassa"), ("rsa", "rsapss"), ("ecc", "ecdsa")] {
        tpm.tool(dir, "tpm2_createek", &["-c", "ek.ctx", "-G", key, "-u", "ek.pub"]);
        let ak_args = [
            "-C", "ek.ctx", "-c", "ak.ctx", "-G", key, "-g", "sha256", "-s", scheme, "-u", "ak.pub",
        ];
        tpm.tool(dir, "tpm2_createak", &ak_args);
        flush();
        let quote_args = [
            "-c",
            "ak.ctx",
            "-l",
            "sha256:0,1,16",
            "-q",
            "c0ffee",
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-g",
            "sha256",
            "--scheme",
            scheme,
        ];
        tpm.tool(dir, "tpm2_quote", &quote_args);
        flush();
        tpm.tool(dir, "tpm2_pcrread", &["sha256:0,1,16", "-o", "pcrs.bin"]);

        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        let ak = wire::Public::from_tpm2b(&read("ak.pub")).unwrap();
        let values = read("pcrs.bin");
        let pcrs: BTreeMap<u32, Vec<u8>> = [0, 1, 16]
            .into_iter()
            .zip(values.chunks(32).map(<[u8]>::to_vec))
            .collect();
        verify_quote(
            &ak,
            &read("quote.msg"),
            &read("quote.sig"),
            &[0xc0, 0xff, 0xee],
            &pcrs,
        )
        .unwrap_or_else(|e| panic!("{scheme} quote: {e}"));
        // The EK public area tpm2-tools wrote is what the EK certificate certifies.
        if key == "rsa" {
            let mut attestor = Attestor::connect(&tpm.tcti()).unwrap();
            let cert = attestor.ek_certificate().unwrap().unwrap();
            ek::check_ek_matches(&cert, &wire::Public::from_tpm2b(&read("ek.pub")).unwrap()).unwrap();
        }
    }
}

#[test]
fn tpm_without_ek_certificate_says_so() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tpm = SwTpm::blank();
    let mut attestor = Attestor::connect(&tpm.tcti()).unwrap();
    assert_eq!(attestor.ek_certificate().unwrap(), None);
    // The EK still works for credential activation.
    let ek = wire::Public::from_tpm2b(attestor.ek_public()).unwrap();
    let ak = wire::Public::from_tpm2b(attestor.ak_public()).unwrap();
    let credential = make_credential(&ek, &ak.name().unwrap(), b"no certificate").unwrap();
    let secret = attestor
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .unwrap();
    assert_eq!(secret, b"no certificate");
}

/// A P-256 EK (template L-2): MakeCredential shares the seed by ECDH, and
/// the TPM activates the credential only for its own EK and that AK. Auto
/// selection picks RSA-2048 while its certificate is in NV.
#[test]
fn an_ecc_p256_ek_activates_credentials() {
    if !castellan_tpm::testing::available() {
        return;
    }
    let tpm = SwTpm::blank();
    let mut attestor = Attestor::connect_with(&tpm.tcti(), Some(EkKind::EccP256)).unwrap();
    assert_eq!(attestor.ek_kind(), EkKind::EccP256);
    assert_eq!(attestor.ek_certificate().unwrap(), None);
    let ek = wire::Public::from_tpm2b(attestor.ek_public()).unwrap();
    assert!(matches!(
        ek.key,
        wire::PublicKey::Ecc {
            curve: wire::ECC_NIST_P256,
            ..
        }
    ));
    let ak = wire::Public::from_tpm2b(attestor.ak_public()).unwrap();
    let secret = nonce();
    let credential = make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
    assert_eq!(credential.encrypted_secret.len(), 2 + 2 + 32 + 2 + 32);
    let activated = attestor
        .activate_credential(&credential.id_object, &credential.encrypted_secret)
        .unwrap();
    assert_eq!(activated, secret);
    // Made for another AK's Name: refused by the TPM.
    let other = make_credential(&ek, &ek.name().unwrap(), &secret).unwrap();
    assert!(
        attestor
            .activate_credential(&other.id_object, &other.encrypted_secret)
            .is_err()
    );
    // The quote side does not depend on the EK.
    let n = nonce();
    let quote = attestor.quote(&n, &PCRS).unwrap();
    verify_quote(&ak, &quote.attest, &quote.signature, &n, &quote.pcrs).unwrap();
    drop(attestor);
    assert_eq!(tpm.handles("handles-transient"), Vec::<String>::new());

    let ca = Ca::new();
    let certified = SwTpm::manufacture(&ca);
    let auto = Attestor::connect_with(&certified.tcti(), None).unwrap();
    assert_eq!(auto.ek_kind(), EkKind::Rsa2048);
}
