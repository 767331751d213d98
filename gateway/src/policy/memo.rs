//! Decisions a policy snapshot has already made. Rego over the same input,
//! data and policies gives the same answer unless a policy calls a builtin
//! whose answer changes (the clock, randomness, the network, the runtime):
//! a snapshot whose sources name none of them remembers its decisions by a
//! hash of (entry point, input). The memo belongs to the snapshot, so a new
//! bundle starts empty. It is bypassed while decision logs are on, which
//! record every evaluation.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::Value;

/// Decisions remembered at once, at most; past it the memo starts over.
const CAPACITY: usize = 65_536;

/// Builtins whose answer depends on more than their arguments.
const NONDETERMINISTIC: &[&str] = &[
    "time.now_ns",
    "rand.",
    "uuid.",
    "http.send",
    "net.lookup",
    "opa.runtime",
    "trace(",
];

/// Whether a policy source calls none of the nondeterministic builtins
/// (a textual check: a mention in a comment also counts, erring on the
/// side of evaluating every time).
pub(super) fn is_deterministic(rego: &str) -> bool {
    !NONDETERMINISTIC.iter().any(|b| rego.contains(b))
}

/// The memo's key for `rule` over `input`.
pub(super) fn key(rule: &str, input: &Value) -> [u8; 32] {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    h.update(rule.as_bytes());
    h.update([0]);
    // serde_json writes a `Value` the same way every time (sorted keys).
    h.update(serde_json::to_vec(input).unwrap_or_default());
    h.finalize().into()
}

#[derive(Default)]
pub(super) struct Memo(Mutex<HashMap<[u8; 32], Value>>);

impl Memo {
    pub(super) fn get(&self, key: &[u8; 32]) -> Option<Value> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(key).cloned()
    }

    pub(super) fn put(&self, key: [u8; 32], value: &Value) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= CAPACITY {
            m.clear();
        }
        m.insert(key, value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_that_read_the_clock_or_the_network_are_not_memoised() {
        assert!(is_deterministic("package x\nallow if input.a == 1"));
        assert!(!is_deterministic("package x\nallow if time.now_ns() < input.exp"));
        assert!(!is_deterministic("package x\nr := http.send({})"));
        assert_ne!(
            key("a", &serde_json::json!({"x": 1})),
            key("b", &serde_json::json!({"x": 1}))
        );
        assert_ne!(
            key("a", &serde_json::json!({"x": 1})),
            key("a", &serde_json::json!({"x": 2}))
        );
    }
}
