//! A budget for refusal records, so that a flood of bad requests cannot
//! become a flood of durable audit writes. Refusals are recorded one by one
//! up to a burst of [`BURST`] and then [`PER_SECOND`] a second; beyond that
//! they are counted by kind and problem, and the counts are written as one
//! `audit.refusals_suppressed` record per [`SUMMARY_SECONDS`] in which
//! anything was suppressed. Every refusal is still answered and logged.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

/// Refusal records written at once before the rate applies.
pub const BURST: f64 = 100.0;
/// Refusal records written per second, sustained.
pub const PER_SECOND: f64 = 20.0;
/// How often suppressed refusals are summarised.
pub const SUMMARY_SECONDS: u64 = 10;

/// Suppressed refusals by (audit kind, problem type).
pub(super) type Counts = BTreeMap<(String, String), u64>;

pub(super) struct RefusalBudget {
    state: Mutex<State>,
}

struct State {
    tokens: f64,
    refilled: Instant,
    suppressed: Counts,
    since: Option<String>,
}

impl Default for RefusalBudget {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                tokens: BURST,
                refilled: Instant::now(),
                suppressed: BTreeMap::new(),
                since: None,
            }),
        }
    }
}

impl RefusalBudget {
    /// Whether this refusal may be written; if not, it is counted.
    pub(super) fn admit(&self, kind: &str, problem: &str) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.duration_since(s.refilled).as_secs_f64();
        s.tokens = (s.tokens + elapsed * PER_SECOND).min(BURST);
        s.refilled = now;
        if s.tokens >= 1.0 {
            s.tokens -= 1.0;
            return true;
        }
        if s.since.is_none() {
            s.since = Some(crate::util::rfc3339(time::OffsetDateTime::now_utc()));
        }
        *s.suppressed
            .entry((kind.to_owned(), problem.to_owned()))
            .or_default() += 1;
        false
    }

    /// Whether a refusal now would be written (without spending the room):
    /// work that only enriches the record can be skipped when it would not.
    pub(super) fn has_room(&self) -> bool {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = Instant::now().duration_since(s.refilled).as_secs_f64();
        (s.tokens + elapsed * PER_SECOND).min(BURST) >= 1.0
    }

    /// The counts suppressed since the last summary, and since when.
    pub(super) fn take_summary(&self) -> Option<(String, Counts)> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let since = s.since.take()?;
        Some((since, std::mem::take(&mut s.suppressed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_counted_not_written() {
        let b = RefusalBudget::default();
        let written = (0..10_000)
            .filter(|_| b.admit("issuance.refused", "attestation-failed"))
            .count();
        assert!((100..=110).contains(&written), "{written}");
        let (_, counts) = b.take_summary().unwrap();
        let suppressed: u64 = counts.values().sum();
        assert_eq!(written as u64 + suppressed, 10_000);
        assert!(b.take_summary().is_none(), "the summary resets");
    }
}
