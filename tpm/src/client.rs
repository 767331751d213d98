//! The TPM side of attestation, through tss-esapi: create the EK and an AK,
//! read the EK certificate, activate a credential, quote PCRs.
//!
//! An [`Attestor`] holds a TSS context with the EK and AK loaded as
//! transient objects and flushes both when dropped; every session it starts
//! is flushed before the call that started it returns, so a long-lived
//! agent does not exhaust the TPM's handle slots.

use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, ak, ek};
use tss_esapi::attributes::SessionAttributesBuilder;
use tss_esapi::constants::{SessionType, Tss2ResponseCodeKind};
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, SignatureSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, EncryptedSecret, IdObject, PcrSelectionList, PcrSlot, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

use crate::ek::trim_der;
use crate::errors::{Error, Result};
use crate::wire;

/// Which endorsement key to attest with: those of the TCG default
/// low-range templates, whose certificates vendors write to NV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EkKind {
    /// RSA-2048 (template L-1; certificate at NV 0x01c00002).
    Rsa2048,
    /// ECC NIST P-256 (template L-2; certificate at NV 0x01c0000a).
    EccP256,
}

impl EkKind {
    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            Self::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
            Self::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
        }
    }
}

/// A TPM with its EK and an AK loaded.
pub struct Attestor {
    ctx: Context,
    kind: EkKind,
    ek: KeyHandle,
    ak: KeyHandle,
    ek_public: Vec<u8>,
    ak_public: Vec<u8>,
}

/// A quote and the PCR values it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    /// TPMS_ATTEST as signed.
    pub attest: Vec<u8>,
    /// TPMT_SIGNATURE over `attest`.
    pub signature: Vec<u8>,
    /// The quoted PCRs' SHA-256 values, by index.
    pub pcrs: std::collections::BTreeMap<u32, Vec<u8>>,
}

// === impl Attestor ===

impl Attestor {
    /// Connects through a TCTI configuration string (for example
    /// `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`), creates the
    /// RSA-2048 EK from the TCG default template and an RSA-2048
    /// RSASSA-SHA256 restricted signing AK under it.
    pub fn connect(tcti: &str) -> Result<Self> {
        Self::connect_with(tcti, Some(EkKind::Rsa2048))
    }

    /// Like [`Self::connect`], with the EK `kind`; `None` picks the one the
    /// vendor certified: RSA-2048 if its certificate is in NV, else P-256
    /// if that one's is, else RSA-2048.
    pub fn connect_with(tcti: &str, kind: Option<EkKind>) -> Result<Self> {
        let tcti = TctiNameConf::from_str(tcti)?;
        let mut ctx = Context::new(tcti)?;
        let kind = match kind {
            Some(kind) => kind,
            None if nv_certificate(&mut ctx, EkKind::Rsa2048)?.is_some() => EkKind::Rsa2048,
            None if nv_certificate(&mut ctx, EkKind::EccP256)?.is_some() => EkKind::EccP256,
            None => EkKind::Rsa2048,
        };
        let ek = ek::create_ek_object_2(&mut ctx, kind.selection(), None)?;
        let keys = Self::create_ak(&mut ctx, ek);
        let (ak, ek_public, ak_public) = match keys {
            Ok(keys) => keys,
            Err(e) => {
                flush(&mut ctx, ek.into());
                return Err(e);
            }
        };
        Ok(Self {
            ctx,
            kind,
            ek,
            ak,
            ek_public,
            ak_public,
        })
    }

    /// The EK in use.
    pub fn ek_kind(&self) -> EkKind {
        self.kind
    }

    fn create_ak(ctx: &mut Context, ek: KeyHandle) -> Result<(KeyHandle, Vec<u8>, Vec<u8>)> {
        let created = ak::create_ak(
            ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::RsaSsa,
            None,
            None,
        )?;
        let ak = ak::load_ak(ctx, ek, None, created.out_private, created.out_public)?;
        let publics = (|| {
            let (ek_public, _, _) = ctx.read_public(ek)?;
            let (ak_public, _, _) = ctx.read_public(ak)?;
            Ok::<_, Error>((
                wire::tpm2b(&ek_public.marshall()?)?,
                wire::tpm2b(&ak_public.marshall()?)?,
            ))
        })();
        match publics {
            Ok((ek_public, ak_public)) => Ok((ak, ek_public, ak_public)),
            Err(e) => {
                flush(ctx, ak.into());
                Err(e)
            }
        }
    }

    /// The EK's TPM2B_PUBLIC.
    pub fn ek_public(&self) -> &[u8] {
        &self.ek_public
    }

    /// The AK's TPM2B_PUBLIC.
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// The certificate (DER) of the EK in use, from its NV index
    /// (0x01c00002 for RSA-2048, 0x01c0000a for P-256), or `None` if the
    /// TPM has none there.
    pub fn ek_certificate(&mut self) -> Result<Option<Vec<u8>>> {
        nv_certificate(&mut self.ctx, self.kind)
    }

    /// TPM2_ActivateCredential with the AK and the EK: returns the secret
    /// the verifier wrapped with `make_credential`, which the TPM releases
    /// only if the credential was made for this EK and this AK's Name.
    pub fn activate_credential(&mut self, id_object: &[u8], encrypted_secret: &[u8]) -> Result<Vec<u8>> {
        let id_object = IdObject::try_from(strip_tpm2b(id_object, "TPM2B_ID_OBJECT")?)?;
        let secret = EncryptedSecret::try_from(strip_tpm2b(encrypted_secret, "TPM2B_ENCRYPTED_SECRET")?)?;
        let hmac = self.start_session(SessionType::Hmac)?;
        let result = self.start_session(SessionType::Policy).and_then(|policy| {
            let (ak, ek) = (self.ak, self.ek);
            let activated = (|| {
                // The EK's default policy is PolicySecret(TPM_RH_ENDORSEMENT).
                self.ctx.execute_with_session(Some(hmac), |ctx| {
                    ctx.policy_secret(
                        PolicySession::try_from(policy)?,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })?;
                self.ctx.set_sessions((Some(hmac), Some(policy), None));
                let out = self.ctx.activate_credential(ak, ek, id_object, secret);
                self.ctx.clear_sessions();
                Ok::<_, Error>(out?.value().to_vec())
            })();
            flush(&mut self.ctx, SessionHandle::from(policy).into());
            activated
        });
        flush(&mut self.ctx, SessionHandle::from(hmac).into());
        result
    }

    /// TPM2_Quote with the AK over `nonce` and the SHA-256 PCRs `pcrs`, and
    /// the values of those PCRs. The values are read after the quote; if a
    /// PCR is extended in between, the verifier sees a digest mismatch and
    /// the client retries, which is the safe way round.
    pub fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<Quote> {
        let slots = pcrs
            .iter()
            .map(|pcr| pcr_slot(*pcr))
            .collect::<Result<Vec<_>>>()?;
        let selection = PcrSelectionList::builder()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()?;
        let ak = self.ak;
        let (attest, signature) = self.ctx.execute_with_nullauth_session(|ctx| {
            ctx.quote(
                ak,
                Data::try_from(nonce.to_vec())?,
                SignatureScheme::Null,
                selection,
            )
        })?;
        let mut values = std::collections::BTreeMap::new();
        for (pcr, slot) in pcrs.iter().zip(slots) {
            let one = PcrSelectionList::builder()
                .with_selection(HashingAlgorithm::Sha256, &[slot])
                .build()?;
            let (_, _, digests) = self.ctx.execute_without_session(|ctx| ctx.pcr_read(one))?;
            let value = digests
                .value()
                .first()
                .ok_or(Error::Unsupported("TPM returned no value for a selected PCR"))?;
            values.insert(*pcr, value.value().to_vec());
        }
        Ok(Quote {
            attest: attest.marshall()?,
            signature: signature.marshall()?,
            pcrs: values,
        })
    }

    fn start_session(&mut self, kind: SessionType) -> Result<AuthSession> {
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )?
            .ok_or(Error::Unsupported("TPM returned no session"))?;
        let (attributes, mask) = SessionAttributesBuilder::new().build();
        if let Err(e) = self.ctx.tr_sess_set_attributes(session, attributes, mask) {
            flush(&mut self.ctx, SessionHandle::from(session).into());
            return Err(e.into());
        }
        Ok(session)
    }
}

impl Drop for Attestor {
    fn drop(&mut self) {
        flush(&mut self.ctx, self.ak.into());
        flush(&mut self.ctx, self.ek.into());
    }
}

/// The EK certificate of `kind` from NV, or `None` if its index is not
/// defined (the TPM shipped without one).
fn nv_certificate(ctx: &mut Context, kind: EkKind) -> Result<Option<Vec<u8>>> {
    match ek::retrieve_ek_pubcert(ctx, kind.selection()) {
        Ok(bytes) => Ok(Some(trim_der(&bytes)?.to_vec())),
        Err(tss_esapi::Error::Tss2Error(rc)) if rc.kind() == Some(Tss2ResponseCodeKind::Handle) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Flushes a transient object or session; a failure is only logged, since
/// there is nothing better to do with it on a cleanup path.
fn flush(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.flush_context(handle) {
        tracing::warn!(error = %e, "could not flush a TPM handle");
    }
}

fn pcr_slot(pcr: u32) -> Result<PcrSlot> {
    let bit = 1u32.checked_shl(pcr).filter(|_| pcr < 24).ok_or(Error::Invalid {
        what: "PCR index",
        detail: format!("{pcr} is not 0 to 23"),
    })?;
    Ok(PcrSlot::try_from(bit)?)
}

/// The body of a TPM2B, which the tss-esapi buffer types take without size.
fn strip_tpm2b(bytes: &[u8], what: &'static str) -> Result<Vec<u8>> {
    let (size, body) = bytes.split_at_checked(2).ok_or(Error::Truncated { what })?;
    let size = usize::from(u16::from_be_bytes([size[0], size[1]]));
    if body.len() != size {
        return Err(Error::Invalid {
            what,
            detail: format!("size field says {size} bytes, {} follow", body.len()),
        });
    }
    Ok(body.to_vec())
}
