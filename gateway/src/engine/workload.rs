//! The Workload API flow. The caller is attested from evidence the host
//! gathered from the kernel (the only place the engine accepts host
//! evidence), its selectors are matched against registration entries, each
//! matching entry passes `castellan.workload_api`, and SVIDs are minted,
//! recorded in the inventory and audited before they are handed out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;

use super::{Engine, EngineError, Refusal, Surface};
use crate::model::policy::{EntryDoc, INPUT_VERSION, WorkloadInput};
use crate::model::{Actor, Attestation, AuditEvent, AuditKind, CertificateRecord, Entry, Source};
use crate::signer::{JwtAlg, JwtSvidClaims, Kind, Template};
use crate::spiffe_id::SpiffeId;
use crate::store::Effects;
use crate::util::{now_unix, rfc3339, sha256_hex};

/// The method whose module reads host evidence.
const HOST_METHOD: &str = "unix";

/// Evidence about a Workload API caller, gathered by the host from the
/// kernel (peer credentials, `/proc`). Only the Workload API adapter makes
/// one; nothing a caller sends becomes host evidence.
#[derive(Debug, Clone)]
pub struct HostEvidence {
    json: String,
}

impl HostEvidence {
    /// Evidence as the `unix` module reads it (`pid`, `uid`, `gid`, and
    /// what the host learnt of the process).
    pub fn from_kernel(evidence: serde_json::Value) -> Self {
        Self {
            json: evidence.to_string(),
        }
    }
}

/// An X.509-SVID minted for a Workload API caller, with its new key.
#[derive(Debug, Clone)]
pub struct WorkloadSvid {
    pub entry: Arc<Entry>,
    /// DER of the leaf.
    pub certificate_der: Vec<u8>,
    /// PKCS#8 DER of the key (the Workload API is the one surface that
    /// hands out a private key: the standard asks it to).
    pub key_der: Vec<u8>,
    pub not_after: i64,
    /// When it is renewed: half way through its life.
    pub rotate_at: i64,
    /// The authority that signed it.
    pub authority: String,
    /// The certificates its chain carries after it (PEM).
    pub chain_pem: String,
}

/// SVIDs shared by every caller entitled to the same entry, as a SPIRE agent
/// shares them: an X.509-SVID (key included) per entry until half its life,
/// or until the entry or the signing authority changes; a JWT-SVID per
/// (entry, audience, algorithm) until half its life. A thousand callers
/// reconnecting cost one signature per identity, and a caller sees new
/// material only when it really rotates.
#[derive(Default)]
pub(super) struct SvidCache {
    x509: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<CachedX509>>>>>,
    jwt: Mutex<HashMap<JwtKey, CachedJwt>>,
}

/// (entry id, sorted audience, algorithm).
type JwtKey = (String, Vec<String>, JwtAlg);

/// JWT-SVIDs cached at once, at most: callers choose audiences freely.
const MAX_CACHED_JWTS: usize = 16_384;

struct CachedX509 {
    entry: Entry,
    authority: String,
    svid: WorkloadSvid,
}

struct CachedJwt {
    entry: Entry,
    authority: String,
    token: String,
    rotate_at: i64,
}

impl SvidCache {
    fn x509_slot(&self, entry_id: &str) -> Arc<tokio::sync::Mutex<Option<CachedX509>>> {
        let mut slots = self.x509.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(entry_id.to_owned()).or_default().clone()
    }

    fn jwt(&self, key: &JwtKey, entry: &Entry, authority: &str, now: i64) -> Option<String> {
        let cache = self.jwt.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(key)
            .filter(|c| c.entry == *entry && c.authority == authority && now < c.rotate_at)
            .map(|c| c.token.clone())
    }

    fn put_jwt(&self, key: JwtKey, cached: CachedJwt) {
        let mut cache = self.jwt.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_JWTS {
            let now = now_unix();
            cache.retain(|_, c| now < c.rotate_at);
            if cache.len() >= MAX_CACHED_JWTS {
                cache.clear();
            }
        }
        cache.insert(key, cached);
    }

    /// Forgets what belongs to entries that no longer exist, and expired
    /// JWT-SVIDs.
    pub(super) fn prune(&self, live: &dyn Fn(&str) -> bool, now: i64) {
        self.x509
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live(id));
        self.jwt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(id, _, _), c| live(id) && now < c.rotate_at);
    }
}

/// Workload API policy decisions, kept while the policy snapshot they were
/// made with is active: by (digest of the caller's attestation, entry as
/// the policy sees it).
#[derive(Default)]
pub(super) struct WorkloadDecisions(Mutex<Decisions>);

#[derive(Default)]
struct Decisions {
    snapshot: Option<Arc<crate::policy::Loaded>>,
    allow: HashMap<(String, String), bool>,
}

/// Decisions kept at once, at most.
const MAX_CACHED_DECISIONS: usize = 65_536;

/// An entry as the workload policy sees it.
fn entry_key(entry: &Entry) -> String {
    format!(
        "{}\n{}\n{}",
        entry.id,
        entry.spiffe_id,
        entry.selectors.join("\n")
    )
}

/// The entries whose decision is to allow, in order.
fn allowed_of(candidates: Vec<Arc<Entry>>, decisions: &[Option<bool>]) -> Vec<Arc<Entry>> {
    candidates
        .into_iter()
        .zip(decisions)
        .filter_map(|(e, d)| (*d == Some(true)).then_some(e))
        .collect()
}

impl WorkloadDecisions {
    /// The known decision for each candidate; forgets everything when the
    /// policy snapshot has changed (the kept `Arc` makes the comparison
    /// exact: a snapshot's address cannot be reused while it is held).
    fn lookup(
        &self,
        snapshot: &Arc<crate::policy::Loaded>,
        caller: &str,
        candidates: &[Arc<Entry>],
    ) -> Vec<Option<bool>> {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !d.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snapshot)) {
            d.snapshot = Some(snapshot.clone());
            d.allow.clear();
        }
        candidates
            .iter()
            .map(|e| d.allow.get(&(caller.to_owned(), entry_key(e))).copied())
            .collect()
    }

    fn remember(&self, snapshot: &Arc<crate::policy::Loaded>, caller: &str, entry: &Entry, allow: bool) {
        let mut d = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !d.snapshot.as_ref().is_some_and(|s| Arc::ptr_eq(s, snapshot)) {
            return;
        }
        if d.allow.len() >= MAX_CACHED_DECISIONS {
            d.allow.clear();
        }
        d.allow.insert((caller.to_owned(), entry_key(entry)), allow);
    }
}

/// A JWT-SVID minted for a Workload API caller.
#[derive(Debug, Clone)]
pub struct WorkloadJwt {
    pub entry: Arc<Entry>,
    pub token: String,
}

impl Engine {
    /// Attests a Workload API caller from host evidence. A refusal is
    /// audited as `workload_api.refused`.
    pub async fn workload_caller(
        self: &Arc<Self>,
        operation: &'static str,
        evidence: HostEvidence,
    ) -> Result<Attestation, EngineError> {
        let refusal = || {
            Refusal::new(
                Surface::WorkloadApi,
                operation,
                Actor::Evidence(HOST_METHOD.into()),
            )
            .method(HOST_METHOD)
        };
        let result = async {
            let engine = self.clone();
            self.blocking(move || {
                let snapshot = engine.policies.snapshot();
                engine.attest(Surface::WorkloadApi, &snapshot, HOST_METHOD, &evidence.json, None)
            })
            .await
        }
        .await;
        self.audited(refusal, result).await
    }

    /// The entries the caller matches and the policy allows, in entry
    /// order. Each decision is logged when decision logs are on. An entry
    /// whose decision fails is withheld (fail closed), not an error.
    /// Decisions are remembered per (caller attestation, entry, policy
    /// snapshot), so a change pushed to thousands of streams evaluates only
    /// what changed.
    pub async fn workload_entitled(
        self: &Arc<Self>,
        attestation: &Attestation,
    ) -> Result<Vec<Arc<Entry>>, EngineError> {
        let candidates = self.entries.matching(&attestation.selectors);
        if candidates.is_empty() {
            return Ok(candidates);
        }
        let snapshot = self.policies.snapshot();
        let caller = sha256_hex(&serde_json::to_vec(attestation).unwrap_or_default());
        let known = self.decisions.lookup(&snapshot, &caller, &candidates);
        if known.iter().all(Option::is_some) {
            return Ok(allowed_of(candidates, &known));
        }
        let (engine, attestation) = (self.clone(), attestation.clone());
        self.blocking(move || {
            let mut decided = known;
            for (entry, decision) in candidates.iter().zip(decided.iter_mut()) {
                if decision.is_some() {
                    continue;
                }
                let input = WorkloadInput {
                    version: INPUT_VERSION,
                    trust_domain: &engine.trust_domain,
                    attestation: &attestation,
                    entry: EntryDoc {
                        id: &entry.id,
                        spiffe_id: &entry.spiffe_id,
                        selectors: &entry.selectors,
                    },
                };
                match snapshot.decide_workload(&input) {
                    Ok(d) => {
                        *decision = Some(d.allow);
                        engine.decisions.remember(&snapshot, &caller, entry, d.allow);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, entry = %entry.id, "workload_api policy failed; SVID withheld")
                    }
                }
            }
            Ok(allowed_of(candidates, &decided))
        })
        .await
    }

    /// Entitled entries, or `not-registered` (audited) when there are none.
    pub async fn workload_entitled_or_refused(
        self: &Arc<Self>,
        operation: &'static str,
        attestation: &Attestation,
    ) -> Result<Vec<Arc<Entry>>, EngineError> {
        let error = match self.workload_entitled(attestation).await {
            Ok(e) if e.is_empty() => EngineError::NotRegistered,
            Err(e) => e,
            entitled => return entitled,
        };
        self.workload_refused(operation, attestation, &error).await;
        Err(error)
    }

    /// Audits a Workload API refusal for an attested caller, with its
    /// selectors and, when no entry gave it an identity, why not: the
    /// matching entries' policy answers and the closest misses. Returns the
    /// request id the record carries.
    pub async fn workload_refused(
        self: &Arc<Self>,
        operation: &'static str,
        attestation: &Attestation,
        error: &EngineError,
    ) -> String {
        let mut refusal = caller_refusal(operation, attestation);
        // The explanation only enriches the record: under a flood of
        // refusals, past the refusal budget, it is not worked out at all.
        if matches!(error, EngineError::NotRegistered) && self.refusals.has_room() {
            let (engine, a) = (self.clone(), attestation.clone());
            let report = self
                .blocking(move || Ok(engine.entries_dry(&engine.policies.snapshot(), &a)))
                .await;
            refusal.explanation = report.ok().map(|r| r.for_audit());
        }
        self.audit_refusal(refusal, error).await
    }

    /// Mints an X.509-SVID with a fresh key for each entry, records them in
    /// the inventory with the caller's selectors, and audits them, all
    /// durably before they are returned.
    pub async fn workload_x509(
        self: &Arc<Self>,
        attestation: &Attestation,
        entries: &[Arc<Entry>],
    ) -> Result<Vec<WorkloadSvid>, EngineError> {
        let result = self.workload_x509_inner(attestation, entries).await;
        self.audited(|| caller_refusal("fetch_x509_svid", attestation), result)
            .await
    }

    async fn workload_x509_inner(
        self: &Arc<Self>,
        attestation: &Attestation,
        entries: &[Arc<Entry>],
    ) -> Result<Vec<WorkloadSvid>, EngineError> {
        let authority = self.active_authority(Kind::X509);
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            // One mint per entry at a time: callers arriving together wait
            // for it and share the result.
            let slot = self.svids.x509_slot(&entry.id);
            let mut cached = slot.lock().await;
            if let Some(c) = cached.as_ref()
                && c.entry == **entry
                && c.authority == authority
                && now_unix() < c.svid.rotate_at
            {
                out.push(c.svid.clone());
                continue;
            }
            let (engine, e) = (self.clone(), entry.clone());
            let (svid, cert) = self.blocking(move || engine.mint_workload_svid(e)).await?;
            let record = CertificateRecord {
                serial: cert.serial.clone(),
                spiffe_id: svid.entry.spiffe_id.clone(),
                not_before: rfc3339(cert.not_before),
                not_after: rfc3339(cert.not_after),
                source: Source::WorkloadApi,
                method: attestation.method.clone(),
                subject: attestation.subject.clone(),
                public_key_sha256: cert.spki_sha256.clone(),
                issued_at: rfc3339(time::OffsetDateTime::now_utc()),
                selectors: attestation.selectors.clone(),
            };
            let event = AuditEvent::new(
                AuditKind::WorkloadX509Issued,
                Actor::workload(&attestation.method, &attestation.subject),
                json!({
                    "surface": Surface::WorkloadApi.as_str(),
                    "entry_id": svid.entry.id,
                    "serial": record.serial,
                    "spiffe_id": record.spiffe_id,
                    "selectors": attestation.selectors,
                    "not_after": record.not_after,
                    "policy_revision": self.policies.revision(),
                    "attestation": crate::model::AttestationSummary::from(attestation),
                }),
            );
            self.store
                .record(Effects {
                    audit: vec![event],
                    certificates: vec![record],
                    ..Effects::default()
                })
                .await?;
            crate::metrics::get().issued("workload_x509", &attestation.method);
            *cached = Some(CachedX509 {
                entry: entry.as_ref().clone(),
                authority: authority.clone(),
                svid: svid.clone(),
            });
            out.push(svid);
        }
        Ok(out)
    }

    /// The id of the authority of `kind` that signs now: a cached SVID from
    /// another one is stale.
    fn active_authority(&self, kind: Kind) -> String {
        self.authorities()
            .active(kind)
            .map(|a| a.id.clone())
            .unwrap_or_default()
    }

    /// One X.509-SVID and its key. Blocking.
    fn mint_workload_svid(&self, entry: Arc<Entry>) -> Result<(WorkloadSvid, MintedCert), EngineError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| EngineError::Signer(crate::signer::SignerError::Sign(e)))?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let template = Template {
            spiffe_id: SpiffeId::parse(&entry.spiffe_id)
                .map_err(|_| EngineError::Corrupt("entry spiffe_id"))?,
            public_key_der: spki.clone(),
            ttl: time::Duration::seconds(entry.x509_svid_ttl as i64),
            dns_names: entry.dns_names.clone(),
            extensions: vec![],
        };
        let cert = self.sign_x509(&template)?;
        let minted = MintedCert {
            serial: cert.serial.clone(),
            not_before: cert.not_before,
            not_after: cert.not_after,
            spki_sha256: sha256_hex(&spki),
        };
        // Half of the life it was issued for: NotBefore is backdated for
        // clock skew, and counting from it would make a short-lived SVID due
        // for renewal as soon as it is minted.
        let (issued, until) = (now_unix(), cert.not_after.unix_timestamp());
        let svid = WorkloadSvid {
            entry,
            certificate_der: cert.der,
            key_der: key.serialize_der(),
            not_after: until,
            rotate_at: issued + (until - issued) / 2,
            authority: cert.authority,
            chain_pem: cert.chain_pem,
        };
        Ok((svid, minted))
    }

    /// Mints a JWT-SVID for each entry and audience set with `alg`, and
    /// audits them durably before they are returned.
    pub async fn workload_jwt(
        self: &Arc<Self>,
        attestation: &Attestation,
        entries: Vec<Arc<Entry>>,
        audience: Vec<String>,
        alg: JwtAlg,
    ) -> Result<Vec<WorkloadJwt>, EngineError> {
        let result = self.workload_jwt_inner(attestation, entries, audience, alg).await;
        self.audited(|| caller_refusal("fetch_jwt_svid", attestation), result)
            .await
    }

    async fn workload_jwt_inner(
        self: &Arc<Self>,
        attestation: &Attestation,
        entries: Vec<Arc<Entry>>,
        audience: Vec<String>,
        alg: JwtAlg,
    ) -> Result<Vec<WorkloadJwt>, EngineError> {
        let authority = self.active_authority(Kind::Jwt);
        let mut sorted = audience.clone();
        sorted.sort();
        sorted.dedup();
        let now = now_unix();
        let key = |e: &Entry| (e.id.clone(), sorted.clone(), alg);
        let (mut out, mut missing) = (Vec::new(), Vec::new());
        for entry in entries {
            match self.svids.jwt(&key(&entry), &entry, &authority, now) {
                Some(token) => out.push(WorkloadJwt { entry, token }),
                None => missing.push(entry),
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let engine = self.clone();
        let aud = audience.clone();
        // RSA signing takes milliseconds: keep it off the async workers.
        let (minted, jtis, iat) = self
            .blocking(move || {
                let now = now_unix();
                let mut out = Vec::with_capacity(missing.len());
                let mut jtis = Vec::with_capacity(missing.len());
                for entry in missing {
                    let claims = JwtSvidClaims {
                        sub: SpiffeId::parse(&entry.spiffe_id)
                            .map_err(|_| EngineError::Corrupt("entry spiffe_id"))?,
                        aud: aud.clone(),
                        iat: now,
                        exp: engine.jwt_exp(now, entry.jwt_svid_ttl as i64)?,
                        iss: None,
                        // Named in the audit log, so each token can be traced.
                        jti: Some(uuid::Uuid::new_v4().to_string()),
                        agent: None,
                    };
                    let token = engine.signer.sign_jwt_svid(&claims, alg)?;
                    jtis.extend(claims.jti);
                    out.push(WorkloadJwt { entry, token });
                }
                Ok((out, jtis, now))
            })
            .await?;
        let effects = Effects {
            audit: vec![AuditEvent::new(
                AuditKind::WorkloadJwtIssued,
                Actor::workload(&attestation.method, &attestation.subject),
                json!({
                    "surface": Surface::WorkloadApi.as_str(),
                    "spiffe_ids": minted.iter().map(|m| m.entry.spiffe_id.clone()).collect::<Vec<_>>(),
                    "audience": audience,
                    "iat": iat,
                    "jtis": jtis,
                    "selectors": attestation.selectors,
                    "policy_revision": self.policies.revision(),
                    "attestation": crate::model::AttestationSummary::from(attestation),
                }),
            )],
            ..Effects::default()
        };
        self.store.record(effects).await?;
        for _ in &minted {
            crate::metrics::get().issued("workload_jwt", &attestation.method);
        }
        for m in &minted {
            self.svids.put_jwt(
                key(&m.entry),
                CachedJwt {
                    entry: m.entry.as_ref().clone(),
                    authority: authority.clone(),
                    token: m.token.clone(),
                    rotate_at: iat + (m.entry.jwt_svid_ttl as i64) / 2,
                },
            );
        }
        out.extend(minted);
        Ok(out)
    }
}

/// What the inventory needs of a minted certificate.
struct MintedCert {
    serial: String,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
    spki_sha256: String,
}

/// How a refusal of an attested Workload API caller is recorded: who the
/// kernel says it is and its selectors, so an operator can see why it got
/// no identity.
fn caller_refusal(operation: &'static str, attestation: &Attestation) -> Refusal {
    let mut r = Refusal::new(
        Surface::WorkloadApi,
        operation,
        Actor::workload(&attestation.method, &attestation.subject),
    )
    .method(&attestation.method);
    r.selectors = Some(attestation.selectors.clone());
    r
}
