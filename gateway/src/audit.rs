//! The audit trail as anyone can check it offline. The store chains every
//! entry to the one before it (`prev_hash`, `hash`); at intervals and on
//! demand Castellan appends a **checkpoint**: an entry whose detail holds a
//! JWS, signed by a JWT key of the trust bundle's JWKS, over the size of
//! the log and the hash of its last entry. An export is the entries as JSON
//! lines, ending with a checkpoint; [`verify_export`] re-hashes every entry,
//! checks every link and every checkpoint against the published keys, and
//! names the first entry that breaks.

use serde_json::Value;

use crate::model::{AuditRecord, genesis_hash};
use crate::signer::AuditCheckpointClaims;
use crate::trust::KeySet;

/// The kind of a checkpoint entry.
pub const CHECKPOINT: &str = "audit.checkpoint";

/// What a verified export holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// Checkpoints whose signatures verified.
    pub checkpoints: u64,
    /// Entries the last checkpoint covers.
    pub covered: u64,
}

/// Where and why an export does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Broken {
    /// A line is not an audit entry.
    #[error("line {line} is not an audit entry: {why}")]
    Line { line: usize, why: String },
    /// An entry's place, link or hash is wrong.
    #[error("entry {seq} breaks the chain: {why}")]
    Entry { seq: u64, why: String },
    /// A checkpoint does not verify.
    #[error("checkpoint at entry {seq} does not verify: {why}")]
    Checkpoint { seq: u64, why: String },
    /// The export ends in entries no checkpoint covers, or holds fewer than
    /// a checkpoint seen elsewhere covers.
    #[error("{0}")]
    Incomplete(String),
}

/// Checks an export (`text`: JSON lines) against `keys` (the JWKS of the
/// trust bundle). With `at_least`, the export must hold that many entries
/// (from a checkpoint obtained separately): a log cut at an older
/// checkpoint is refused too.
pub fn verify_export(text: &str, keys: &KeySet, at_least: Option<u64>) -> Result<Verified, Broken> {
    let mut hashes: Vec<String> = Vec::new();
    let mut prev = genesis_hash();
    let (mut checkpoints, mut covered, mut last_is_checkpoint) = (0, 0, false);
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record: AuditRecord = serde_json::from_str(line).map_err(|e| Broken::Line {
            line: i + 1,
            why: e.to_string(),
        })?;
        let seq = record.seq;
        let expected = hashes.len() as u64 + 1;
        let broken = |why: String| Broken::Entry { seq, why };
        if seq != expected {
            return Err(broken(format!(
                "expected entry {expected} here (an entry missing or moved)"
            )));
        }
        if record.prev_hash != prev {
            return Err(broken("its link to the entry before does not match".into()));
        }
        if record.compute_hash() != record.hash {
            return Err(broken("its content does not match its hash".into()));
        }
        last_is_checkpoint = record.event.kind.as_str() == CHECKPOINT;
        if last_is_checkpoint {
            let size = check_checkpoint(&record, &hashes, keys)?;
            checkpoints += 1;
            covered = size;
        }
        prev = record.hash.clone();
        hashes.push(record.hash);
    }
    let entries = hashes.len() as u64;
    if entries == 0 {
        return Err(Broken::Incomplete("the export holds no entry".into()));
    }
    if !last_is_checkpoint {
        return Err(Broken::Incomplete(format!(
            "the export does not end with a checkpoint: entries after {covered} are not covered (cut short?)"
        )));
    }
    if let Some(n) = at_least.filter(|n| entries < *n) {
        return Err(Broken::Incomplete(format!(
            "the export holds {entries} entries, fewer than the {n} a checkpoint says there were (truncated)"
        )));
    }
    Ok(Verified {
        entries,
        checkpoints,
        covered,
    })
}

/// Verifies one checkpoint entry against the hashes before it; the size it
/// covers.
fn check_checkpoint(record: &AuditRecord, hashes: &[String], keys: &KeySet) -> Result<u64, Broken> {
    let seq = record.seq;
    let broken = |why: String| Broken::Checkpoint { seq, why };
    let jws = record.event.detail["jws"]
        .as_str()
        .ok_or_else(|| broken("it carries no signature".into()))?;
    let claims = verify_checkpoint(jws, keys).map_err(broken)?;
    let size = claims.size;
    if size == 0 || size as usize > hashes.len() {
        return Err(broken(format!(
            "it covers {size} entries, but {} come before it",
            hashes.len()
        )));
    }
    if hashes[size as usize - 1] != claims.head {
        return Err(broken(format!("entry {size} is not the one it signed")));
    }
    let (d_size, d_head) = (&record.event.detail["size"], &record.event.detail["head"]);
    if d_size.as_u64() != Some(size) || d_head.as_str() != Some(claims.head.as_str()) {
        return Err(broken("its detail does not match what was signed".into()));
    }
    Ok(size)
}

/// A checkpoint's claims, once its signature verifies with `keys`.
pub fn verify_checkpoint(jws: &str, keys: &KeySet) -> Result<AuditCheckpointClaims, String> {
    let (_, payload) = keys.verify_compact(jws)?;
    let claims: AuditCheckpointClaims =
        serde_json::from_str(&payload).map_err(|e| format!("its claims do not decode: {e}"))?;
    if !claims.iss.starts_with("castellan:audit:") {
        return Err("it is not an audit checkpoint".into());
    }
    Ok(claims)
}

/// The detail of a checkpoint entry.
pub fn checkpoint_detail(claims: &AuditCheckpointClaims, jws: &str) -> Value {
    serde_json::json!({ "size": claims.size, "head": claims.head, "iat": claims.iat, "jws": jws })
}

#[cfg(test)]
mod tests;
