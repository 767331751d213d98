//! Decision logs: every policy decision as one JSON line in OPA's
//! decision-log shape (`decision_id`, `path`, `input`, `result`,
//! `bundles.<name>.revision`, `timestamp`), with configured input fields
//! erased first. Lines go to a background writer so the issuance path never
//! waits on the disk; if it falls behind, lines are dropped and counted
//! rather than slowing issuance down.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use serde_json::{Value, json};

use super::BundleInfo;

/// Lines queued before new ones are dropped.
const QUEUE: usize = 8192;

/// Writes decision-log lines.
pub struct DecisionLogger {
    tx: SyncSender<String>,
    /// JSON Pointers (RFC 6901) into `input` to erase, e.g. `/request/justification`.
    mask: Vec<String>,
    dropped: AtomicU64,
}

impl DecisionLogger {
    /// Appends to `path` (created 0600).
    pub fn open(path: PathBuf, mask: Vec<String>) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)?;
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("castellan-decision-log".into())
            .spawn(move || {
                while let Ok(line) = rx.recv() {
                    let mut batch = line;
                    batch.push('\n');
                    while let Ok(more) = rx.try_recv() {
                        batch.push_str(&more);
                        batch.push('\n');
                    }
                    if let Err(e) = file.write_all(batch.as_bytes()) {
                        tracing::error!(error = %e, "cannot write the decision log");
                    }
                }
            })?;
        Ok(Self {
            tx,
            mask,
            dropped: AtomicU64::new(0),
        })
    }

    /// Logs one decision.
    pub fn log(&self, rule: &str, input: &Value, result: &Value, bundles: &[BundleInfo]) {
        let mut input = input.clone();
        let mut erased = Vec::new();
        for pointer in &self.mask {
            if erase(&mut input, pointer) {
                erased.push(pointer.clone());
            }
        }
        let bundles: serde_json::Map<String, Value> = bundles
            .iter()
            .map(|b| (b.name.clone(), json!({ "revision": b.revision })))
            .collect();
        let mut line = json!({
            "decision_id": uuid::Uuid::new_v4().to_string(),
            "path": rule.trim_start_matches("data.").replace('.', "/"),
            "input": input,
            "result": result,
            "bundles": bundles,
            "timestamp": time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default(),
            "labels": { "app": "castellan" },
        });
        if !erased.is_empty() {
            line["erased"] = json!(erased);
        }
        match self.tx.try_send(line.to_string()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(dropped = n, "decision log is behind; lines dropped");
                }
            }
        }
    }
}

/// Removes the value at a JSON Pointer; returns whether it was there.
fn erase(doc: &mut Value, pointer: &str) -> bool {
    let Some((parent, last)) = pointer.rsplit_once('/') else {
        return false;
    };
    let last = last.replace("~1", "/").replace("~0", "~");
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&last).is_some(),
        Some(Value::Array(a)) => match last.parse::<usize>() {
            Ok(i) if i < a.len() => {
                a.remove(i);
                true
            }
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_by_json_pointer() {
        let mut v = json!({"request": {"justification": "secret", "ttl_seconds": 5}, "a/b": {"c": 1}});
        assert!(erase(&mut v, "/request/justification"));
        assert!(erase(&mut v, "/a~1b/c"));
        assert!(!erase(&mut v, "/nope/x"));
        assert_eq!(v, json!({"request": {"ttl_seconds": 5}, "a/b": {}}));
    }
}
