//! "Why no identity?": what the engine would do with some evidence, a set
//! of selectors, or what it did with a refused request, stage by stage,
//! without issuing, spending or recording anything.
//!
//! - **attest**: which trust source verified the evidence, or why none did
//!   (each set the module checked and how the check ended). Evidence that
//!   answers a server challenge is not run: running it would spend the
//!   challenge. Single-use evidence is verified, never spent.
//! - **entries**: the registration entries the selectors match, each with
//!   the workload policy's answer and reasons, and the closest entries that
//!   do not match with the selectors each one lacks.
//! - **decide**: for evidence, the attested-issuance policy's answer.
//!
//! A refused request is found by the id its problem response (`request_id`)
//! or gRPC status named; its recorded selectors are explained against the
//! entries and policy as they are now.

use std::sync::Arc;

use serde::Serialize;
use serde_json::{Value, json};

use super::{Engine, EngineError, check_method};
use crate::model::policy::{EntryDoc, INPUT_VERSION, IssuanceAsk, IssuanceInput, WorkloadInput};
use crate::model::{Attestation, AuditRecord, Entry};
use crate::policy::Loaded;

/// The method the Workload API attests its callers with.
const WORKLOAD_METHOD: &str = "unix";

/// Unmatched entries shown, closest first.
const CLOSEST_UNMATCHED: usize = 10;

/// Audit entries searched for a refused request's id.
const REFUSAL_SEARCH: u64 = 50_000;

/// What to explain.
#[derive(Debug, Clone)]
pub enum Ask {
    /// Evidence for a method, as a caller would present it.
    Evidence { method: String, evidence: String },
    /// A caller's selectors, as attestation would produce them (the
    /// Workload API's `unix` method unless another is named).
    Selectors {
        method: Option<String>,
        selectors: Vec<String>,
    },
    /// The id of a refused request.
    Refusal(String),
}

/// The explanation.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// One line per surface: what would be (or was) the outcome and why.
    pub verdict: Vec<String>,
    /// The refusal as recorded, when a request id was asked about.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestReport>,
    /// The selectors the entries were matched with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selectors: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<EntriesReport>,
    /// The attested-issuance policy's answer (evidence only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuance: Option<DecisionReport>,
    /// The policy bundle revision the answers come from.
    pub policy_revision: String,
}

/// How attestation went.
#[derive(Debug, Serialize)]
pub struct AttestReport {
    pub method: String,
    pub verified: bool,
    /// The trust source whose keys or certificates verified the evidence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trust_source: Option<String>,
    /// Every check the module made, in order.
    pub checks: Vec<TrustCheck>,
    /// The trust sources configured for the method.
    pub trust_sources: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Set when the evidence is good for one use (verified, not spent).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub single_use: bool,
    /// The problem type and detail when it was not verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One verification against a trust source's keys or certificates.
#[derive(Debug, Serialize)]
pub struct TrustCheck {
    pub trust_source: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Which entries the selectors match, and what the policy says of each.
#[derive(Debug, Serialize)]
pub struct EntriesReport {
    pub matched: Vec<MatchedEntry>,
    /// The closest entries that do not match, fewest missing selectors first.
    pub unmatched: Vec<UnmatchedEntry>,
    /// How many entries do not match in all.
    pub unmatched_total: usize,
}

#[derive(Debug, Serialize)]
pub struct MatchedEntry {
    pub id: String,
    pub spiffe_id: String,
    /// The workload policy's answer; none when it failed (the SVID is
    /// withheld: fail closed).
    pub allowed: Option<bool>,
    pub reasons: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct UnmatchedEntry {
    pub id: String,
    pub spiffe_id: String,
    /// The entry's selectors the caller lacks.
    pub missing: Vec<String>,
}

/// A policy decision.
#[derive(Debug, Serialize)]
pub struct DecisionReport {
    pub allow: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spiffe_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    pub reasons: Vec<String>,
}

impl Engine {
    /// Explains `ask`. Nothing is issued, spent or recorded.
    pub async fn explain(self: &Arc<Self>, ask: Ask) -> Result<Explanation, EngineError> {
        match ask {
            Ask::Refusal(id) => self.explain_refusal(&id).await,
            ask => {
                let engine = self.clone();
                self.blocking(move || Ok(engine.explain_now(ask))).await
            }
        }
    }

    /// Evidence or selectors. Blocking.
    fn explain_now(&self, ask: Ask) -> Explanation {
        let snapshot = self.policies.snapshot();
        let mut out = Explanation {
            verdict: Vec::new(),
            refusal: None,
            attestation: None,
            selectors: None,
            entries: None,
            issuance: None,
            policy_revision: snapshot.revision(),
        };
        let attestation = match ask {
            Ask::Evidence { method, evidence } => {
                let (report, attestation) = self.attest_dry(&snapshot, &method, &evidence);
                if !report.verified {
                    out.verdict.push(format!(
                        "no identity on any surface: the evidence was not verified ({}: {})",
                        report.problem.as_deref().unwrap_or("attestation-failed"),
                        report.detail.as_deref().unwrap_or("")
                    ));
                }
                out.attestation = Some(report);
                match attestation {
                    Some(a) => {
                        let issuance = self.issuance_dry(&snapshot, &a);
                        out.verdict.push(match &issuance {
                            d if d.allow => format!(
                                "attested issuance: would issue {} for {} s",
                                d.spiffe_id.as_deref().unwrap_or("?"),
                                d.ttl_seconds.unwrap_or(0)
                            ),
                            d => format!("attested issuance: refused: {}", d.reasons.join("; ")),
                        });
                        out.issuance = Some(issuance);
                        a
                    }
                    None => return out,
                }
            }
            Ask::Selectors { method, selectors } => Attestation {
                method: method.unwrap_or_else(|| WORKLOAD_METHOD.to_owned()),
                subject: String::new(),
                selectors,
                claims: json!({}),
                single_use: None,
            },
            Ask::Refusal(_) => return out,
        };
        let entries = self.entries_dry(&snapshot, &attestation);
        out.verdict.push(entries.verdict());
        out.selectors = Some(attestation.selectors);
        out.entries = Some(entries);
        out
    }

    /// A refused request: its record, and its selectors against the entries
    /// and policy as they are now.
    async fn explain_refusal(self: &Arc<Self>, id: &str) -> Result<Explanation, EngineError> {
        let record = self
            .store
            .find_refusal(id, REFUSAL_SEARCH)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "no refusal with request id `{}` among the last {REFUSAL_SEARCH} audit entries (past the \
                     refusal budget, refusals are counted rather than recorded one by one)",
                    super::printable(id)
                ))
            })?;
        let detail = &record.event.detail;
        let selectors: Option<Vec<String>> = detail["selectors"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect());
        let method = detail["method"].as_str().map(str::to_owned);
        let mut out = match selectors {
            Some(selectors) => {
                let engine = self.clone();
                let ask = Ask::Selectors {
                    method: method.clone(),
                    selectors,
                };
                self.blocking(move || Ok(engine.explain_now(ask))).await?
            }
            None => Explanation {
                verdict: Vec::new(),
                refusal: None,
                attestation: method.map(|m| self.unverified_report(&m, detail)),
                selectors: None,
                entries: None,
                issuance: None,
                policy_revision: self.policies.revision(),
            },
        };
        out.verdict.insert(0, refusal_line(&record));
        out.refusal = Some(json!({
            "seq": record.seq,
            "at": record.at,
            "kind": record.event.kind.as_str(),
            "actor": record.event.actor,
            "detail": record.event.detail,
        }));
        Ok(out)
    }

    /// Attests without spending anything. Blocking.
    fn attest_dry(
        &self,
        snapshot: &Loaded,
        method: &str,
        evidence: &str,
    ) -> (AttestReport, Option<Attestation>) {
        let method = super::printable(method);
        let trust = self.trust.snapshot();
        let mut report = AttestReport {
            trust_sources: trust
                .by_method
                .get(&method)
                .map(|v| v.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default(),
            method: method.clone(),
            verified: false,
            trust_source: None,
            checks: Vec::new(),
            subject: None,
            single_use: false,
            problem: None,
            detail: None,
        };
        let refused = |mut report: AttestReport, e: EngineError| {
            report.problem = Some(e.slug().to_owned());
            report.detail = Some(e.detail());
            (report, None)
        };
        if let Err(e) = check_method(super::Surface::AttestedIssuance, &method) {
            return refused(report, e);
        }
        if !snapshot.modules.contains_key(&method) {
            return refused(report, EngineError::UnknownMethod(method));
        }
        if let Some(id) = crate::attest::challenge::challenge_id(evidence) {
            return refused(
                report,
                EngineError::BadRequest(format!(
                    "the evidence answers server challenge `{}`; explaining it would spend the challenge. \
                     Present it, then explain the refusal by its request id",
                    super::printable(&id)
                )),
            );
        }
        let context = json!({ "trust_domain": self.trust_domain });
        let mut used = Vec::new();
        let result =
            self.attestors
                .attest_traced(&snapshot.modules, &method, evidence, trust, &context, &mut used);
        report.checks = used
            .into_iter()
            .map(|u| TrustCheck {
                trust_source: self.trust_source_name(&u.set),
                ok: u.error.is_none(),
                error: u.error,
            })
            .collect();
        report.trust_source = report
            .checks
            .iter()
            .rev()
            .find(|c| c.ok)
            .map(|c| c.trust_source.clone());
        match result {
            Ok(a) => {
                report.verified = true;
                report.subject = Some(a.subject.clone());
                report.single_use = a.single_use.is_some();
                (report, Some(a))
            }
            Err(e) => {
                let e = super::attest_error(e);
                refused(report, e)
            }
        }
    }

    /// The report of an attestation a refusal record says failed.
    fn unverified_report(&self, method: &str, detail: &Value) -> AttestReport {
        AttestReport {
            method: method.to_owned(),
            verified: false,
            trust_source: None,
            checks: Vec::new(),
            trust_sources: self
                .trust
                .snapshot()
                .by_method
                .get(method)
                .map(|v| v.iter().map(|s| s.name.clone()).collect())
                .unwrap_or_default(),
            subject: None,
            single_use: false,
            problem: detail["problem"].as_str().map(str::to_owned),
            detail: detail["detail"].as_str().map(str::to_owned),
        }
    }

    /// The name of the trust source a set (`ts:<id>`) belongs to.
    fn trust_source_name(&self, set: &str) -> String {
        set.strip_prefix("ts:")
            .and_then(|id| self.trust.get(id))
            .map(|s| s.name.clone())
            .unwrap_or_else(|| set.to_owned())
    }

    /// The attested-issuance policy's answer, with the server's limits
    /// applied as issuance applies them. Blocking.
    fn issuance_dry(&self, snapshot: &Loaded, attestation: &Attestation) -> DecisionReport {
        let input = IssuanceInput {
            version: INPUT_VERSION,
            trust_domain: &self.trust_domain,
            attestation,
            request: IssuanceAsk {
                ttl_seconds: None,
                dns_names: Vec::new(),
            },
        };
        match snapshot.decide_issuance(&input) {
            Ok(d) if d.allow => match self.check_identity(d.spiffe_id, d.ttl_seconds) {
                Ok((id, ttl)) => DecisionReport {
                    allow: true,
                    spiffe_id: Some(id.to_string()),
                    ttl_seconds: Some(ttl),
                    reasons: d.reasons,
                },
                Err(e) => DecisionReport {
                    allow: false,
                    spiffe_id: None,
                    ttl_seconds: None,
                    reasons: vec![format!(
                        "the policy allowed, but its answer is unusable: {}",
                        e.detail()
                    )],
                },
            },
            Ok(d) => DecisionReport {
                allow: false,
                spiffe_id: None,
                ttl_seconds: None,
                reasons: super::reasons_or_default(d.reasons),
            },
            Err(e) => DecisionReport {
                allow: false,
                spiffe_id: None,
                ttl_seconds: None,
                reasons: vec![format!("policy evaluation failed: {e}")],
            },
        }
    }

    /// The entries `attestation`'s selectors match, each with the workload
    /// policy's answer, and the closest that do not. Blocking.
    pub(super) fn entries_dry(&self, snapshot: &Loaded, attestation: &Attestation) -> EntriesReport {
        let mut matched = Vec::new();
        let mut unmatched = Vec::new();
        for entry in self.entries.list() {
            let missing: Vec<String> = entry
                .selectors
                .iter()
                .filter(|s| !attestation.selectors.contains(s))
                .cloned()
                .collect();
            if missing.is_empty() {
                matched.push(workload_decision(self, snapshot, attestation, &entry));
            } else {
                unmatched.push(UnmatchedEntry {
                    id: entry.id.clone(),
                    spiffe_id: entry.spiffe_id.clone(),
                    missing,
                });
            }
        }
        let unmatched_total = unmatched.len();
        unmatched.sort_by_key(|u| u.missing.len());
        unmatched.truncate(CLOSEST_UNMATCHED);
        EntriesReport {
            matched,
            unmatched,
            unmatched_total,
        }
    }
}

/// One matching entry through `castellan.workload_api`.
fn workload_decision(
    engine: &Engine,
    snapshot: &Loaded,
    attestation: &Attestation,
    entry: &Entry,
) -> MatchedEntry {
    let input = WorkloadInput {
        version: INPUT_VERSION,
        trust_domain: &engine.trust_domain,
        attestation,
        entry: EntryDoc {
            id: &entry.id,
            spiffe_id: &entry.spiffe_id,
            selectors: &entry.selectors,
        },
    };
    let (allowed, reasons) = match snapshot.decide_workload(&input) {
        Ok(d) => (Some(d.allow), d.reasons),
        Err(e) => (
            None,
            vec![format!("policy evaluation failed (SVID withheld): {e}")],
        ),
    };
    MatchedEntry {
        id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.clone(),
        allowed,
        reasons,
    }
}

impl EntriesReport {
    /// The Workload API's outcome in one line.
    fn verdict(&self) -> String {
        let allowed: Vec<&str> = self
            .matched
            .iter()
            .filter(|m| m.allowed == Some(true))
            .map(|m| m.spiffe_id.as_str())
            .collect();
        if !allowed.is_empty() {
            return format!("Workload API: would receive {}", allowed.join(", "));
        }
        if self.matched.is_empty() {
            return match self.unmatched.first() {
                Some(closest) => format!(
                    "Workload API: nothing: no entry matches; the closest ({}) lacks {}",
                    closest.spiffe_id,
                    closest.missing.join(", ")
                ),
                None => "Workload API: nothing: there are no registration entries".to_owned(),
            };
        }
        let why: Vec<String> = self
            .matched
            .iter()
            .map(|m| format!("{}: {}", m.spiffe_id, m.reasons.join("; ")))
            .collect();
        format!(
            "Workload API: nothing: the policy allowed none of the matching entries ({})",
            why.join(" | ")
        )
    }

    /// What a refusal record keeps of it: the matching entries' answers
    /// and the closest misses.
    pub(super) fn for_audit(&self) -> Value {
        json!({
            "matched": self.matched,
            "closest_unmatched": self.unmatched.iter().take(3).collect::<Vec<_>>(),
            "unmatched_total": self.unmatched_total,
        })
    }
}

/// The first line of a refused request's explanation.
fn refusal_line(record: &AuditRecord) -> String {
    let d = &record.event.detail;
    format!(
        "refused at {} on {} ({}): {}: {}",
        record.at,
        d["surface"].as_str().unwrap_or("?"),
        d["operation"].as_str().unwrap_or("?"),
        d["problem"].as_str().unwrap_or("?"),
        d["detail"].as_str().unwrap_or("")
    )
}
