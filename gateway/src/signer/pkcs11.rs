//! Keys in an HSM, through PKCS#11 (`[ca] key_manager = "pkcs11"`): P-256
//! keys generated inside the token (sensitive, never extractable), found by
//! their label, and used through one logged-in session. Signing hashes in
//! the host (SHA-256) and asks the token for `CKM_ECDSA` over the digest;
//! certificates get the DER form of the signature, JWTs its raw `r‖s`.
//!
//! The PIN is read from a file and kept only as a secret in the session
//! login; it is never logged.

use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use sha2::Digest as _;

use super::SignerError;

/// DER of the P-256 curve's OID (prime256v1), as `CKA_EC_PARAMS`.
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
/// What names a key in the keyring: `pkcs11:<label>`.
pub const KEY_PREFIX: &str = "pkcs11:";

/// A logged-in token.
pub struct Token {
    // Kept for the life of the session.
    _context: Pkcs11,
    session: Mutex<Session>,
    label: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({})", self.label)
    }
}

fn hsm(what: &str) -> impl Fn(cryptoki::error::Error) -> SignerError + '_ {
    move |e| SignerError::Key(format!("PKCS#11 {what}: {e}"))
}

impl Token {
    /// Loads the module, finds the token by label and logs in.
    pub fn open(config: &super::config::Pkcs11Config) -> Result<Arc<Self>, SignerError> {
        let context = Pkcs11::new(&config.module)
            .map_err(|e| SignerError::Key(format!("PKCS#11 module {}: {e}", config.module.display())))?;
        match context.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(())
            | Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::CryptokiAlreadyInitialized, _)) => {
            }
            Err(e) => return Err(hsm("initialize")(e)),
        }
        let mut slot = None;
        for s in context.get_slots_with_token().map_err(hsm("slots"))? {
            let info = context.get_token_info(s).map_err(hsm("token info"))?;
            if info.label().trim_end() == config.token_label {
                slot = Some(s);
                break;
            }
        }
        let slot = slot
            .ok_or_else(|| SignerError::Key(format!("no PKCS#11 token labelled `{}`", config.token_label)))?;
        let pin = std::fs::read_to_string(&config.pin_file)
            .map_err(|e| SignerError::Key(format!("pin_file {}: {e}", config.pin_file.display())))?;
        let session = context.open_rw_session(slot).map_err(hsm("session"))?;
        session
            .login(UserType::User, Some(&AuthPin::from(pin.trim_end().to_owned())))
            .map_err(|_| {
                SignerError::Key(format!(
                    "the PIN of token `{}` is not accepted",
                    config.token_label
                ))
            })?;
        Ok(Arc::new(Self {
            _context: context,
            session: Mutex::new(session),
            label: config.token_label.clone(),
        }))
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Generates a P-256 key pair inside the token under `label`; the
    /// private key can sign and can never leave it.
    pub fn generate(self: &Arc<Self>, label: &str) -> Result<TokenKey, SignerError> {
        let name = label.as_bytes().to_vec();
        let public = [
            Attribute::Token(true),
            Attribute::Verify(true),
            Attribute::EcParams(P256_PARAMS.to_vec()),
            Attribute::Label(name.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(name),
        ];
        self.session()
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(hsm("generate a key"))?;
        self.find(label)
    }

    /// The key pair labelled `label`.
    pub fn find(self: &Arc<Self>, label: &str) -> Result<TokenKey, SignerError> {
        let session = self.session();
        let find = |class| {
            session
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::KeyType(KeyType::EC),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .map_err(hsm("find a key"))?
                .first()
                .copied()
                .ok_or_else(|| SignerError::Key(format!("no key `{label}` in token `{}`", self.label)))
        };
        let (private, public) = (find(ObjectClass::PRIVATE_KEY)?, find(ObjectClass::PUBLIC_KEY)?);
        let point = session
            .get_attributes(public, &[AttributeType::EcPoint])
            .map_err(hsm("read a public key"))?
            .into_iter()
            .find_map(|a| match a {
                Attribute::EcPoint(p) => Some(p),
                _ => None,
            })
            .ok_or_else(|| SignerError::Key(format!("key `{label}` has no EC point")))?;
        // CKA_EC_POINT is the point wrapped in a DER OCTET STRING.
        let point = match point.as_slice() {
            [0x04, 0x41, rest @ ..] if rest.len() == 65 => rest.to_vec(),
            raw if raw.len() == 65 && raw[0] == 0x04 => raw.to_vec(),
            _ => return Err(SignerError::Key(format!("key `{label}` is not a P-256 key"))),
        };
        Ok(TokenKey {
            token: self.clone(),
            label: label.to_owned(),
            private,
            point,
        })
    }

    /// The private key labelled `label`, whose public point is known from
    /// elsewhere (a certificate): keys imported without their public half.
    pub fn find_private(self: &Arc<Self>, label: &str, point: &[u8]) -> Result<TokenKey, SignerError> {
        let session = self.session();
        let private = session
            .find_objects(&[
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(hsm("find a key"))?
            .first()
            .copied()
            .ok_or_else(|| SignerError::Key(format!("no key `{label}` in token `{}`", self.label)))?;
        Ok(TokenKey {
            token: self.clone(),
            label: label.to_owned(),
            private,
            point: point.to_vec(),
        })
    }

    /// Destroys the key pair labelled `label` (a revoked authority's).
    pub fn destroy(&self, label: &str) -> Result<(), SignerError> {
        let session = self.session();
        let objects = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(hsm("find a key"))?;
        for o in objects {
            session.destroy_object(o).map_err(hsm("destroy a key"))?;
        }
        Ok(())
    }
}

/// A P-256 key pair in a token.
#[derive(Clone)]
pub struct TokenKey {
    token: Arc<Token>,
    label: String,
    private: ObjectHandle,
    /// The uncompressed public point.
    point: Vec<u8>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenKey({})", self.label)
    }
}

impl TokenKey {
    /// ECDSA P-256 over SHA-256 of `msg`: the raw `r‖s` (64 bytes).
    pub fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, SignerError> {
        let digest = sha2::Sha256::digest(msg);
        let sig = self
            .token
            .session()
            .sign(&Mechanism::Ecdsa, self.private, &digest)
            .map_err(hsm("sign"))?;
        if sig.len() != 64 {
            return Err(SignerError::Key(format!(
                "the token returned a {}-byte signature",
                sig.len()
            )));
        }
        Ok(sig)
    }
}

/// An ECDSA signature `r‖s` as the DER `ECDSA-Sig-Value` certificates carry.
fn der_signature(raw: &[u8]) -> Vec<u8> {
    let int = |b: &[u8]| {
        let b = {
            let start = b.iter().position(|&x| x != 0).unwrap_or(b.len() - 1);
            &b[start..]
        };
        let mut v = Vec::with_capacity(b.len() + 1);
        if b[0] & 0x80 != 0 {
            v.push(0);
        }
        v.extend_from_slice(b);
        crate::util::der_tlv(0x02, &v)
    };
    crate::util::der_tlv(0x30, &[int(&raw[..32]), int(&raw[32..])].concat())
}

impl rcgen::PublicKeyData for TokenKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for TokenKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_raw(msg)
            .map(|raw| der_signature(&raw))
            .map_err(|_| rcgen::Error::RemoteKeyError)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn raw_signatures_become_der_integers_without_sign_trouble() {
        let mut raw = [0u8; 64];
        raw[0] = 0x80; // r needs a leading zero
        raw[33] = 0x01; // s has leading zeros to drop
        let der = super::der_signature(&raw);
        assert_eq!(&der[..5], &[0x30, der.len() as u8 - 2, 0x02, 33, 0x00]);
        let (_, parsed) = x509_parser::der_parser::der::parse_der_sequence(&der).unwrap();
        assert_eq!(parsed.as_sequence().unwrap().len(), 2);
    }

    #[test]
    fn a_missing_module_is_a_clear_error() {
        let err = super::Token::open(&crate::signer::config::Pkcs11Config {
            module: "/nonexistent/libpkcs11.so".into(),
            token_label: "t".into(),
            pin_file: "/nonexistent/pin".into(),
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/libpkcs11.so"), "{err}");
    }
}
