//! Server challenges for methods whose proof must be fresh: the client asks
//! for a nonce, signs (or quotes) it, and sends the evidence with the
//! challenge's id. A challenge is taken at the first attestation that
//! names it, whatever the outcome, so a nonce is never accepted twice; it
//! expires unused after a few minutes. Challenges live in the store, so a
//! challenge issued by one gateway is answered at any gateway sharing it,
//! and survives a restart.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};

use crate::model::ChallengeRecord;
use crate::store::{ChallengeRoom, Store};

/// How long a challenge may wait for its evidence.
pub const CHALLENGE_TTL_SECONDS: i64 = 300;
/// Challenges pending at once, at most: beyond it new ones are refused.
const MAX_PENDING: u64 = 16_384;
/// Challenges one client (an IPv4 address, or an IPv6 /64) may have pending
/// at once, so that no client can take the whole table.
pub const MAX_PER_CLIENT: u64 = 256;

/// Why a challenge could not be issued or taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChallengeError {
    /// Too many challenges are pending.
    #[error("too many challenges are pending; try again shortly")]
    Full,
    /// This client has too many challenges pending.
    #[error("this client has {MAX_PER_CLIENT} challenges pending; answer or let some expire first")]
    ClientLimit,
    /// The id names no live challenge (never issued, used, or expired).
    #[error("unknown, used or expired challenge")]
    Unknown,
    /// The challenge was issued for another method.
    #[error("the challenge was issued for another method")]
    WrongMethod,
    /// The store could not keep or give back the challenge.
    #[error("challenges are unavailable: {0}")]
    Unavailable(String),
}

/// Who asked: an IPv4 address, or the /64 of an IPv6 one (a host usually
/// holds a whole /64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Client(u128);

impl From<std::net::IpAddr> for Client {
    fn from(ip: std::net::IpAddr) -> Self {
        match ip {
            std::net::IpAddr::V4(v4) => Client(u128::from(u32::from(v4))),
            std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client(u128::from(u32::from(v4))),
                None => Client((u128::from(v6) >> 64) | (1 << 127)),
            },
        }
    }
}

impl Client {
    /// How the store names the client.
    fn key(self) -> String {
        format!("{:032x}", self.0)
    }
}

/// Pending challenges, kept in the store.
pub struct Challenges {
    store: Store,
}

/// A challenge as the client receives it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Issued {
    pub challenge_id: String,
    /// 32 random bytes, base64.
    pub nonce: String,
    pub expires_at: i64,
    /// Method-specific material for the client (e.g. a TPM credential blob).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

impl Challenges {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Issues a challenge for `method`. `private` joins the module's view
    /// (never the client's); `public` joins the client's.
    pub async fn issue(
        &self,
        method: &str,
        client: Option<Client>,
        private: serde_json::Map<String, Value>,
        public: serde_json::Map<String, Value>,
        now: i64,
    ) -> Result<Issued, ChallengeError> {
        let id = uuid::Uuid::new_v4().to_string();
        let nonce = STANDARD.encode(crate::util::random_bytes::<32>());
        let expires_at = now + CHALLENGE_TTL_SECONDS;
        let mut context = json!({ "id": id, "nonce": nonce, "expires_at": expires_at });
        for (k, v) in private {
            context[k] = v;
        }
        let record = ChallengeRecord {
            id: id.clone(),
            method: method.to_owned(),
            client: client.map(Client::key),
            expires_at,
            context,
        };
        let room = self
            .store
            .put_challenge(record, MAX_PENDING, MAX_PER_CLIENT, now)
            .await
            .map_err(|e| ChallengeError::Unavailable(e.to_string()))?;
        match room {
            ChallengeRoom::Stored => Ok(Issued {
                challenge_id: id,
                nonce,
                expires_at,
                extra: public,
            }),
            ChallengeRoom::Full => Err(ChallengeError::Full),
            ChallengeRoom::ClientFull => Err(ChallengeError::ClientLimit),
        }
    }

    /// Takes the challenge `id` for `method`: it can never be taken again.
    pub async fn take(&self, id: &str, method: &str, now: i64) -> Result<Value, ChallengeError> {
        let p = self
            .store
            .take_challenge(id, now)
            .await
            .map_err(|e| ChallengeError::Unavailable(e.to_string()))?
            .ok_or(ChallengeError::Unknown)?;
        if p.method != method {
            return Err(ChallengeError::WrongMethod);
        }
        Ok(p.context)
    }
}

/// The `challenge_id` of JSON evidence, if it names one.
pub fn challenge_id(evidence: &str) -> Option<String> {
    if !evidence.trim_start().starts_with('{') {
        return None;
    }
    let v: Value = serde_json::from_str(evidence).ok()?;
    v.get("challenge_id")?.as_str().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_challenge_is_taken_once_for_its_method_before_it_expires() {
        let c = Challenges::new(Store::memory());
        let empty = serde_json::Map::new;
        let a = c.issue("x509pop", None, empty(), empty(), 100).await.unwrap();
        assert_eq!(
            c.take(&a.challenge_id, "tpm", 101).await,
            Err(ChallengeError::WrongMethod)
        );
        // A wrong-method attempt consumed it too: no second try.
        assert_eq!(
            c.take(&a.challenge_id, "x509pop", 101).await,
            Err(ChallengeError::Unknown)
        );
        let b = c.issue("x509pop", None, empty(), empty(), 100).await.unwrap();
        let ctx = c.take(&b.challenge_id, "x509pop", 150).await.unwrap();
        assert_eq!(ctx["nonce"], b.nonce.as_str());
        assert_eq!(
            c.take(&b.challenge_id, "x509pop", 150).await,
            Err(ChallengeError::Unknown)
        );
        let late = c.issue("x509pop", None, empty(), empty(), 100).await.unwrap();
        assert_eq!(
            c.take(&late.challenge_id, "x509pop", 100 + CHALLENGE_TTL_SECONDS + 1)
                .await,
            Err(ChallengeError::Unknown)
        );
        assert_eq!(challenge_id(r#"{"challenge_id": "x"}"#).as_deref(), Some("x"));
        assert_eq!(challenge_id("eyJ.a.b"), None);
    }

    #[tokio::test]
    async fn one_client_cannot_take_the_table() {
        let c = Challenges::new(Store::memory());
        let empty = serde_json::Map::new;
        let flooder = Client::from(std::net::IpAddr::from([203, 0, 113, 7]));
        let same_64 = |last: u16| Client::from(std::net::IpAddr::from([0x2001, 0xdb8, 0, 1, 0, 0, 0, last]));
        for _ in 0..MAX_PER_CLIENT {
            c.issue("x509pop", Some(flooder), empty(), empty(), 100)
                .await
                .unwrap();
        }
        assert_eq!(
            c.issue("x509pop", Some(flooder), empty(), empty(), 100)
                .await
                .err(),
            Some(ChallengeError::ClientLimit)
        );
        // Another client is served; an IPv6 host's whole /64 is one client.
        let other = c
            .issue("x509pop", Some(same_64(1)), empty(), empty(), 100)
            .await
            .unwrap();
        assert_eq!(same_64(1), same_64(2));
        // Answering, or expiry, frees the client's slots.
        c.take(&other.challenge_id, "x509pop", 101).await.unwrap();
        let later = 100 + CHALLENGE_TTL_SECONDS + 1;
        c.issue("x509pop", Some(flooder), empty(), empty(), later)
            .await
            .unwrap();
    }
}
