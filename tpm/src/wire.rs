//! TPM 2.0 wire formats (TPM 2.0 Library Part 2): just enough of
//! TPM2B_PUBLIC, TPMS_ATTEST and TPMT_SIGNATURE to verify a quote and to
//! make a credential, plus the TPM Name and the PCR digest.
//!
//! Everything here parses untrusted bytes from the network: it returns a
//! typed error on anything malformed and never panics or allocates more than
//! the input's length. Integers are big-endian, as on the TPM wire.

use ring::digest;

use crate::errors::{Error, Result};

/// TPM_ALG_RSA.
pub const ALG_RSA: u16 = 0x0001;
/// TPM_ALG_SHA1.
pub const ALG_SHA1: u16 = 0x0004;
/// TPM_ALG_AES.
pub const ALG_AES: u16 = 0x0006;
/// TPM_ALG_SHA256.
pub const ALG_SHA256: u16 = 0x000b;
/// TPM_ALG_SHA384.
pub const ALG_SHA384: u16 = 0x000c;
/// TPM_ALG_SHA512.
pub const ALG_SHA512: u16 = 0x000d;
/// TPM_ALG_NULL.
pub const ALG_NULL: u16 = 0x0010;
/// TPM_ALG_RSASSA (PKCS#1 v1.5 signatures).
pub const ALG_RSASSA: u16 = 0x0014;
/// TPM_ALG_RSAPSS.
pub const ALG_RSAPSS: u16 = 0x0016;
/// TPM_ALG_ECDSA.
pub const ALG_ECDSA: u16 = 0x0018;
/// TPM_ALG_ECDAA, whose scheme carries a count after the hash.
pub const ALG_ECDAA: u16 = 0x001a;
/// TPM_ALG_ECC.
pub const ALG_ECC: u16 = 0x0023;
/// TPM_ALG_CFB.
pub const ALG_CFB: u16 = 0x0043;
/// TPM_ECC_NIST_P256.
pub const ECC_NIST_P256: u16 = 0x0003;
/// TPM_GENERATED_VALUE, the magic that only the TPM puts in TPMS_ATTEST.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
pub const ST_ATTEST_QUOTE: u16 = 0x8018;

/// TPMA_OBJECT bits this crate checks.
pub mod attributes {
    /// fixedTPM: the key cannot leave this TPM.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// fixedParent: the key cannot be re-parented.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// sensitiveDataOrigin: the TPM generated the private part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// restricted: signs only TPM-generated structures (or decrypts only
    /// TPM-formatted blobs).
    pub const RESTRICTED: u32 = 1 << 16;
    /// decrypt.
    pub const DECRYPT: u32 = 1 << 17;
    /// sign.
    pub const SIGN: u32 = 1 << 18;
}

/// A parsed TPMT_PUBLIC (the public area of a TPM key), RSA or ECC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Public {
    /// nameAlg: the hash of the Name, and of the credential KDFs for an EK.
    pub name_alg: u16,
    /// objectAttributes (TPMA_OBJECT).
    pub attributes: u32,
    /// authPolicy.
    pub auth_policy: Vec<u8>,
    /// parameters.symmetric: (algorithm, key bits, mode), or `None` for
    /// TPM_ALG_NULL.
    pub symmetric: Option<(u16, u16, u16)>,
    /// parameters.scheme: (scheme, hash), or `None` for TPM_ALG_NULL.
    pub scheme: Option<(u16, u16)>,
    /// The key itself.
    pub key: PublicKey,
    /// The TPMT_PUBLIC bytes as received, which the Name is computed over.
    raw: Vec<u8>,
}

/// The public key of a [`Public`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PublicKey {
    /// An RSA key.
    Rsa {
        /// keyBits.
        bits: u16,
        /// The public exponent; the TPM's 0 already replaced by 65537.
        exponent: u32,
        /// The modulus, big-endian (unique.rsa).
        modulus: Vec<u8>,
    },
    /// An ECC key.
    Ecc {
        /// curveID (TPM_ECC_CURVE).
        curve: u16,
        /// kdf scheme, or `None` for TPM_ALG_NULL.
        kdf: Option<(u16, u16)>,
        /// unique.ecc.x.
        x: Vec<u8>,
        /// unique.ecc.y.
        y: Vec<u8>,
    },
}

/// TPMS_ATTEST of a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attest {
    /// qualifiedSigner: the Qualified Name of the signing key.
    pub qualified_signer: Vec<u8>,
    /// extraData: the caller's qualifying data, here the nonce.
    pub extra_data: Vec<u8>,
    /// clockInfo.clock, in milliseconds.
    pub clock: u64,
    /// clockInfo.resetCount.
    pub reset_count: u32,
    /// clockInfo.restartCount.
    pub restart_count: u32,
    /// clockInfo.safe.
    pub safe: bool,
    /// firmwareVersion.
    pub firmware_version: u64,
    /// attested.quote.pcrSelect: (hash algorithm, PCR indices ascending)
    /// per bank, in the order the TPM hashed them.
    pub pcr_selection: Vec<(u16, Vec<u32>)>,
    /// attested.quote.pcrDigest.
    pub pcr_digest: Vec<u8>,
}

/// A parsed TPMT_SIGNATURE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signature {
    /// TPM_ALG_RSASSA or TPM_ALG_RSAPSS.
    Rsa {
        /// ALG_RSASSA or ALG_RSAPSS.
        scheme: u16,
        /// The digest algorithm.
        hash: u16,
        /// The signature, big-endian.
        sig: Vec<u8>,
    },
    /// TPM_ALG_ECDSA.
    Ecdsa {
        /// The digest algorithm.
        hash: u16,
        /// signatureR.
        r: Vec<u8>,
        /// signatureS.
        s: Vec<u8>,
    },
}

/// A cursor over untrusted bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

/// The ring digest algorithm for a TPM hash algorithm.
pub fn digest_algorithm(alg: u16) -> Result<&'static digest::Algorithm> {
    match alg {
        ALG_SHA1 => Ok(&digest::SHA1_FOR_LEGACY_USE_ONLY),
        ALG_SHA256 => Ok(&digest::SHA256),
        ALG_SHA384 => Ok(&digest::SHA384),
        ALG_SHA512 => Ok(&digest::SHA512),
        alg => Err(Error::UnsupportedAlgorithm { what: "hash", alg }),
    }
}

/// The PCR digest a quote carries: the hash of the selected PCRs' values
/// concatenated in selection order (Part 3, TPM2_Quote). `values` yields
/// the values in that order.
pub fn pcr_digest<'v>(hash_alg: u16, values: impl IntoIterator<Item = &'v [u8]>) -> Result<Vec<u8>> {
    let mut ctx = digest::Context::new(digest_algorithm(hash_alg)?);
    for value in values {
        ctx.update(value);
    }
    Ok(ctx.finish().as_ref().to_vec())
}

/// Prepends a u16 size to `body`, as every TPM2B does.
pub fn tpm2b(body: &[u8]) -> Result<Vec<u8>> {
    let len = u16::try_from(body.len()).map_err(|_| Error::Invalid {
        what: "TPM2B",
        detail: format!("{} bytes do not fit a u16 size", body.len()),
    })?;
    let mut out = Vec::with_capacity(body.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(body);
    Ok(out)
}

// === impl Public ===

impl Public {
    /// Parses a TPM2B_PUBLIC (size-prefixed), as the TPM returns it.
    pub fn from_tpm2b(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let body = r.tpm2b("TPM2B_PUBLIC")?;
        r.finish("TPM2B_PUBLIC")?;
        Self::from_tpmt(body)
    }

    /// Parses a bare TPMT_PUBLIC.
    pub fn from_tpmt(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let kind = r.u16("TPMT_PUBLIC.type")?;
        let name_alg = r.u16("TPMT_PUBLIC.nameAlg")?;
        digest_algorithm(name_alg)?;
        let attributes = r.u32("TPMT_PUBLIC.objectAttributes")?;
        let auth_policy = r.tpm2b("TPMT_PUBLIC.authPolicy")?.to_vec();
        let symmetric = match r.u16("parameters.symmetric.algorithm")? {
            ALG_NULL => None,
            alg => Some((
                alg,
                r.u16("parameters.symmetric.keyBits")?,
                r.u16("parameters.symmetric.mode")?,
            )),
        };
        let scheme = r.scheme("parameters.scheme")?;
        let key = match kind {
            ALG_RSA => {
                let bits = r.u16("parameters.keyBits")?;
                let exponent = match r.u32("parameters.exponent")? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.tpm2b("unique.rsa")?.to_vec();
                PublicKey::Rsa {
                    bits,
                    exponent,
                    modulus,
                }
            }
            ALG_ECC => {
                let curve = r.u16("parameters.curveID")?;
                let kdf = r.scheme("parameters.kdf")?;
                let x = r.tpm2b("unique.ecc.x")?.to_vec();
                let y = r.tpm2b("unique.ecc.y")?.to_vec();
                PublicKey::Ecc { curve, kdf, x, y }
            }
            alg => return Err(Error::UnsupportedAlgorithm { what: "key", alg }),
        };
        r.finish("TPMT_PUBLIC")?;
        Ok(Self {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key,
            raw: bytes.to_vec(),
        })
    }

    /// The TPMT_PUBLIC bytes this was parsed from.
    pub fn tpmt_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The TPM Name: nameAlg || H_nameAlg(TPMT_PUBLIC) (Part 1, §16).
    pub fn name(&self) -> Result<Vec<u8>> {
        let hash = digest::digest(digest_algorithm(self.name_alg)?, &self.raw);
        let mut name = self.name_alg.to_be_bytes().to_vec();
        name.extend_from_slice(hash.as_ref());
        Ok(name)
    }

    /// Whether every bit of `bits` is set in objectAttributes.
    pub fn has_attributes(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }
}

// === impl Attest ===

impl Attest {
    /// Parses a TPMS_ATTEST and requires it to be a TPM-generated quote.
    pub fn parse_quote(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let magic = r.u32("TPMS_ATTEST.magic")?;
        if magic != TPM_GENERATED_VALUE {
            return Err(Error::BadMagic(magic));
        }
        let kind = r.u16("TPMS_ATTEST.type")?;
        if kind != ST_ATTEST_QUOTE {
            return Err(Error::NotAQuote(kind));
        }
        let qualified_signer = r.tpm2b("TPMS_ATTEST.qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b("TPMS_ATTEST.extraData")?.to_vec();
        let clock = r.u64("clockInfo.clock")?;
        let reset_count = r.u32("clockInfo.resetCount")?;
        let restart_count = r.u32("clockInfo.restartCount")?;
        let safe = r.u8("clockInfo.safe")? != 0;
        let firmware_version = r.u64("TPMS_ATTEST.firmwareVersion")?;
        let count = r.u32("TPML_PCR_SELECTION.count")?;
        // TPM_NUM_PCR_BANKS is 16 in the reference implementation; a larger
        // count is malformed, and bounding it bounds the allocation.
        if count > 16 {
            return Err(Error::Invalid {
                what: "TPML_PCR_SELECTION.count",
                detail: format!("{count} banks"),
            });
        }
        let mut pcr_selection = Vec::new();
        for _ in 0..count {
            let hash = r.u16("TPMS_PCR_SELECTION.hash")?;
            let size = usize::from(r.u8("TPMS_PCR_SELECTION.sizeofSelect")?);
            let bitmap = r.take(size, "TPMS_PCR_SELECTION.pcrSelect")?;
            // Bit n of byte i selects PCR 8*i + n.
            let pcrs = (0u32..)
                .zip(
                    bitmap
                        .iter()
                        .flat_map(|byte| (0..8).map(move |bit| byte & (1 << bit) != 0)),
                )
                .filter_map(|(pcr, selected)| selected.then_some(pcr))
                .collect();
            pcr_selection.push((hash, pcrs));
        }
        let pcr_digest = r.tpm2b("TPMS_QUOTE_INFO.pcrDigest")?.to_vec();
        r.finish("TPMS_ATTEST")?;
        Ok(Self {
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            safe,
            firmware_version,
            pcr_selection,
            pcr_digest,
        })
    }
}

// === impl Signature ===

impl Signature {
    /// Parses a TPMT_SIGNATURE of the schemes this crate verifies.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes);
        let sig_alg = r.u16("TPMT_SIGNATURE.sigAlg")?;
        let sig = match sig_alg {
            ALG_RSASSA | ALG_RSAPSS => Signature::Rsa {
                scheme: sig_alg,
                hash: r.u16("TPMS_SIGNATURE_RSA.hash")?,
                sig: r.tpm2b("TPMS_SIGNATURE_RSA.sig")?.to_vec(),
            },
            ALG_ECDSA => Signature::Ecdsa {
                hash: r.u16("TPMS_SIGNATURE_ECC.hash")?,
                r: r.tpm2b("TPMS_SIGNATURE_ECC.signatureR")?.to_vec(),
                s: r.tpm2b("TPMS_SIGNATURE_ECC.signatureS")?.to_vec(),
            },
            alg => {
                return Err(Error::UnsupportedAlgorithm {
                    what: "signature",
                    alg,
                });
            }
        };
        r.finish("TPMT_SIGNATURE")?;
        Ok(sig)
    }

    /// The digest algorithm the signature was made with.
    pub fn hash(&self) -> u16 {
        match self {
            Signature::Rsa { hash, .. } | Signature::Ecdsa { hash, .. } => *hash,
        }
    }
}

// === impl Reader ===

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if self.bytes.len() < n {
            return Err(Error::Truncated { what });
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N]> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn tpm2b(&mut self, what: &'static str) -> Result<&'a [u8]> {
        let len = self.u16(what)?;
        self.take(usize::from(len), what)
    }

    /// A scheme (TPMT_RSA_SCHEME, TPMT_ECC_SCHEME, TPMT_KDF_SCHEME): an
    /// algorithm, then for anything but NULL its hash (and for ECDAA a count,
    /// which nothing here needs).
    fn scheme(&mut self, what: &'static str) -> Result<Option<(u16, u16)>> {
        match self.u16(what)? {
            ALG_NULL => Ok(None),
            // RSAES carries no details.
            0x0015 => Ok(Some((0x0015, ALG_NULL))),
            alg => {
                let hash = self.u16(what)?;
                if alg == ALG_ECDAA {
                    self.u16(what)?;
                }
                Ok(Some((alg, hash)))
            }
        }
    }

    fn finish(&self, what: &'static str) -> Result<()> {
        match self.bytes.len() {
            0 => Ok(()),
            extra => Err(Error::TrailingBytes { what, extra }),
        }
    }
}

#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
