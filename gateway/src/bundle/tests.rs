use super::*;

fn sample() -> Bundle {
    let mut b = Bundle::default();
    b.files.insert(
        ".manifest".into(),
        br#"{"revision": "r1", "roots": ["castellan"]}"#.to_vec(),
    );
    b.files.insert(
        "issuance.rego".into(),
        b"package castellan.issuance\ndecision := {\"allow\": false}\n".to_vec(),
    );
    b.files
        .insert("data.json".into(), br#"{"castellan": {"x": 1}}"#.to_vec());
    b
}

fn ec_keys() -> (String, String) {
    let k = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (k.serialize_pem(), k.public_key_pem())
}

#[test]
fn sign_and_verify_round_trip_with_each_algorithm() {
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let rsa = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
    let rsa_priv = rsa.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap().to_string();
    let rsa_pub = rsa
        .to_public_key()
        .to_public_key_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap();
    let (ec_priv, ec_pub) = ec_keys();
    for (alg, private, public) in [
        (SigningAlg::Es256, ec_priv, ec_pub),
        (SigningAlg::Rs256, rsa_priv, rsa_pub),
        (SigningAlg::EdDsa, ed.serialize_pem(), ed.public_key_pem()),
    ] {
        let mut b = sample();
        sign(&mut b, &private, alg, Some("authors-2026")).unwrap();
        let packed = b.to_tar_gz().unwrap();
        let back = Bundle::from_tar_gz(&packed).unwrap();
        assert_eq!(back, b);
        let v = verify(&back, &public).unwrap();
        assert_eq!(v.keyid.as_deref(), Some("authors-2026"));
        assert_eq!(v.files, 3);
    }
}

#[test]
fn json_is_hashed_canonically() {
    let a = file_hash("data.json", br#"{"b": 1, "a": [1, 2]}"#).unwrap();
    let b = file_hash("data.json", b"{\"a\":[1,2],\n  \"b\":1}").unwrap();
    assert_eq!(a, b);
    assert_ne!(
        file_hash("x.rego", b"a").unwrap(),
        file_hash("x.rego", b"a ").unwrap()
    );
}

#[test]
fn tampering_a_wrong_key_and_unsigned_bundles_are_refused() {
    let (private, public) = ec_keys();
    let (_, other_public) = ec_keys();
    let mut b = sample();
    assert!(
        matches!(verify(&b, &public), Err(BundleError::Signature(_))),
        "unsigned"
    );
    sign(&mut b, &private, SigningAlg::Es256, None).unwrap();
    assert!(
        matches!(verify(&b, &other_public), Err(BundleError::Signature(_))),
        "wrong key"
    );

    let mut tampered = b.clone();
    tampered.files.insert(
        "issuance.rego".into(),
        b"package castellan.issuance\ndecision := {\"allow\": true}\n".to_vec(),
    );
    assert!(matches!(
        verify(&tampered, &public),
        Err(BundleError::Integrity(_))
    ));
    let mut added = b.clone();
    added
        .files
        .insert("extra.rego".into(), b"package castellan.extra\n".to_vec());
    assert!(matches!(verify(&added, &public), Err(BundleError::Integrity(_))));
    let mut removed = b.clone();
    removed.files.remove("data.json");
    assert!(matches!(
        verify(&removed, &public),
        Err(BundleError::Integrity(_))
    ));
    // Reformatting JSON is not tampering.
    let mut reformatted = b.clone();
    reformatted.files.insert(
        "data.json".into(),
        b"{\n  \"castellan\": { \"x\": 1 }\n}\n".to_vec(),
    );
    verify(&reformatted, &public).unwrap();
}

#[test]
fn manifests_are_checked() {
    let mut b = sample();
    b.files.insert(
        ".manifest".into(),
        br#"{"roots": ["castellan", "castellan/issuance"]}"#.to_vec(),
    );
    assert!(b.check().unwrap_err().to_string().contains("overlap"));
    assert!(roots_overlap("castellan", "castellan/broker") && !roots_overlap("castellan", "castellans"));

    let mut b = sample();
    b.files.insert("attestors/x.wasm".into(), b"\0asm".to_vec());
    assert!(b.check().unwrap_err().to_string().contains("not listed"));
    b.files.insert(
        ".manifest".into(),
        br#"{"roots": ["castellan"], "attestors": [{"method": "x", "path": "attestors/x.wasm", "sha256": "00", "capabilities": ["crypto"]}]}"#.to_vec(),
    );
    assert!(matches!(b.check(), Err(BundleError::Integrity(_))));
    b.files.insert(
        ".manifest".into(),
        format!(r#"{{"roots": ["castellan"], "attestors": [{{"method": "x", "path": "attestors/x.wasm", "sha256": "{}", "capabilities": ["net"]}}]}}"#, crate::util::sha256_hex(b"\0asm")).into_bytes(),
    );
    assert!(b.check().unwrap_err().to_string().contains("unknown capability"));
}

#[test]
fn hostile_archives_are_refused() {
    let pack = |entries: &[(&str, &[u8], tar::EntryType)]| {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut builder = tar::Builder::new(gz);
        for (path, data, kind) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            // set_path refuses `..`; write the raw name to build a hostile archive.
            let name = h.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_cksum();
            builder.append(&h, *data).unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    };
    let traversal = pack(&[("../etc/passwd", b"x", tar::EntryType::Regular)]);
    assert!(matches!(
        Bundle::from_tar_gz(&traversal),
        Err(BundleError::Path(_))
    ));
    let absolute = pack(&[("/etc/passwd", b"x", tar::EntryType::Regular)]);
    assert!(matches!(
        Bundle::from_tar_gz(&absolute),
        Err(BundleError::Path(_))
    ));
    let link = pack(&[("data.json", b"", tar::EntryType::Symlink)]);
    assert!(matches!(Bundle::from_tar_gz(&link), Err(BundleError::Path(_))));
    assert!(matches!(
        Bundle::from_tar_gz(b"not gzip at all"),
        Err(BundleError::Archive(_))
    ));
    // A gzip bomb: 200 MiB of zeros compresses to ~200 KiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    {
        let mut builder = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        let size = 200u64 << 20;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_path("data.json").unwrap();
        h.set_cksum();
        builder.append(&h, std::io::repeat(0).take(size)).unwrap();
        builder.finish().unwrap();
    }
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < MAX_BUNDLE_BYTES);
    assert!(matches!(
        Bundle::from_tar_gz(&bomb),
        Err(BundleError::TooLarge(_)) | Err(BundleError::Archive(_))
    ));
}
