//! Tampering with an export, each way an attacker might.

use super::*;
use crate::model::{Actor, AuditEvent, AuditKind};
use crate::signer::Signer as _;

struct Log {
    records: Vec<AuditRecord>,
    signer: crate::signer::InProcessSigner,
    _dir: tempfile::TempDir,
}

impl Log {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::load_or_create(&dir.path().join("ca"), "example.org", false).unwrap();
        let signer = crate::signer::InProcessSigner::new(&ca, "example.org").unwrap();
        Self {
            records: vec![],
            signer,
            _dir: dir,
        }
    }

    fn push(&mut self, kind: AuditKind, detail: Value) {
        let prev = self
            .records
            .last()
            .map(|r| r.hash.clone())
            .unwrap_or_else(genesis_hash);
        let mut r = AuditRecord {
            seq: self.records.len() as u64 + 1,
            at: "2026-12-01T00:00:00Z".into(),
            event: AuditEvent::new(kind, Actor::Castellan, detail),
            prev_hash: prev,
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        self.records.push(r);
    }

    fn checkpoint(&mut self) {
        let last = self.records.last().unwrap();
        let claims = AuditCheckpointClaims {
            iss: "castellan:audit:example.org".into(),
            size: last.seq,
            head: last.hash.clone(),
            iat: crate::util::now_unix(),
        };
        let jws = self.signer.sign_audit_checkpoint(&claims).unwrap();
        self.push(AuditKind::parse(CHECKPOINT), checkpoint_detail(&claims, &jws));
    }

    fn keys(&self) -> KeySet {
        KeySet::from_jwks(&self.signer.authorities().jwks()).unwrap()
    }

    fn text(records: &[AuditRecord]) -> String {
        records
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect()
    }
}

fn sample() -> Log {
    let mut log = Log::new();
    for i in 0..4 {
        log.push(
            AuditKind::IssuanceIssued,
            serde_json::json!({ "serial": format!("{i:02x}") }),
        );
    }
    log.checkpoint();
    for i in 4..6 {
        log.push(
            AuditKind::IssuanceIssued,
            serde_json::json!({ "serial": format!("{i:02x}") }),
        );
    }
    log.checkpoint();
    log
}

#[test]
fn an_untouched_export_verifies() {
    let log = sample();
    let v = verify_export(&Log::text(&log.records), &log.keys(), Some(8)).unwrap();
    assert_eq!(
        v,
        Verified {
            entries: 8,
            checkpoints: 2,
            covered: 7
        }
    );
}

#[test]
fn a_changed_entry_is_named() {
    let log = sample();
    let mut records = log.records.clone();
    records[2].event.detail["serial"] = "ff".into();
    let err = verify_export(&Log::text(&records), &log.keys(), None).unwrap_err();
    assert_eq!(
        err,
        Broken::Entry {
            seq: 3,
            why: "its content does not match its hash".into()
        }
    );
    // Re-hashing the changed entry moves the break to the next link; re-hashing
    // every entry after it breaks the checkpoint's signature instead.
    let mut rehashed = records.clone();
    let mut prev = rehashed[1].hash.clone();
    for r in rehashed.iter_mut().skip(2) {
        r.prev_hash = prev;
        r.hash = r.compute_hash();
        prev = r.hash.clone();
    }
    let err = verify_export(&Log::text(&rehashed), &log.keys(), None).unwrap_err();
    assert!(matches!(err, Broken::Checkpoint { seq: 5, .. }), "{err}");
}

#[test]
fn deleted_reordered_and_truncated_exports_are_refused() {
    let log = sample();
    let keys = log.keys();
    let mut deleted = log.records.clone();
    deleted.remove(1);
    assert!(matches!(
        verify_export(&Log::text(&deleted), &keys, None),
        Err(Broken::Entry { seq: 3, .. })
    ));
    let mut reordered = log.records.clone();
    reordered.swap(1, 2);
    assert!(matches!(
        verify_export(&Log::text(&reordered), &keys, None),
        Err(Broken::Entry { seq: 3, .. })
    ));
    // Cut after entry 6: the last checkpoint is gone.
    let cut = &log.records[..6];
    assert!(matches!(
        verify_export(&Log::text(cut), &keys, None),
        Err(Broken::Incomplete(_))
    ));
    // Cut at the earlier checkpoint: consistent on its own, refused once
    // the later checkpoint's size is known.
    let earlier = &log.records[..5];
    assert!(verify_export(&Log::text(earlier), &keys, None).is_ok());
    assert!(matches!(
        verify_export(&Log::text(earlier), &keys, Some(8)),
        Err(Broken::Incomplete(_))
    ));
}

#[test]
fn a_checkpoint_by_another_key_or_over_another_head_is_refused() {
    let log = sample();
    let stranger = Log::new();
    assert!(matches!(
        verify_export(&Log::text(&log.records), &stranger.keys(), None),
        Err(Broken::Checkpoint { seq: 5, .. })
    ));
    assert!(matches!(
        verify_export("not json\n", &log.keys(), None),
        Err(Broken::Line { line: 1, .. })
    ));
}
