//! Attenuation, the broker's guarantee: what is granted never exceeds what
//! was asked, what policy allows, or what the parent in a delegation chain
//! holds — in scopes and in lifetime. Enforced here in the host, after policy,
//! so a policy bug cannot widen a grant.

use std::collections::BTreeSet;

/// The bounds one grant must respect.
#[derive(Debug, Clone)]
pub struct Bounds<'a> {
    pub requested_scopes: &'a [String],
    pub policy_scopes: &'a [String],
    /// `None` when there is no parent agent (a person or nobody delegates).
    pub parent_scopes: Option<&'a [String]>,
    pub requested_ttl: u64,
    pub policy_max_ttl: u64,
    /// Seconds the parent's token still lives, when there is a parent.
    pub parent_remaining: Option<u64>,
    /// The server's hard cap.
    pub server_max_ttl: u64,
}

/// What may be granted: the scope intersection (sorted, deduplicated) and
/// the smallest lifetime of all bounds.
pub fn attenuate(b: &Bounds<'_>) -> (Vec<String>, u64) {
    let allowed: BTreeSet<&String> = b.policy_scopes.iter().collect();
    let parent: Option<BTreeSet<&String>> = b.parent_scopes.map(|p| p.iter().collect());
    let scopes: BTreeSet<String> = b
        .requested_scopes
        .iter()
        .filter(|s| allowed.contains(s))
        .filter(|s| parent.as_ref().is_none_or(|p| p.contains(s)))
        .cloned()
        .collect();
    let ttl = [
        Some(b.requested_ttl),
        Some(b.policy_max_ttl),
        b.parent_remaining,
        Some(b.server_max_ttl),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(0);
    (scopes.into_iter().collect(), ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn scope_set() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::vec("[a-d]:(read|write)", 0..6)
    }

    proptest! {
        /// Granted scopes ⊆ requested ∩ policy ∩ parent; TTL ≤ every bound.
        #[test]
        fn grants_never_exceed_any_bound(
            requested in scope_set(),
            policy in scope_set(),
            parent in proptest::option::of(scope_set()),
            requested_ttl in 0u64..100_000,
            policy_max in 0u64..100_000,
            parent_remaining in proptest::option::of(0u64..100_000),
            server_max in 0u64..100_000,
        ) {
            let b = Bounds {
                requested_scopes: &requested,
                policy_scopes: &policy,
                parent_scopes: parent.as_deref(),
                requested_ttl,
                policy_max_ttl: policy_max,
                parent_remaining,
                server_max_ttl: server_max,
            };
            let (scopes, ttl) = attenuate(&b);
            for s in &scopes {
                prop_assert!(requested.contains(s));
                prop_assert!(policy.contains(s));
                if let Some(p) = &parent {
                    prop_assert!(p.contains(s));
                }
            }
            prop_assert!(ttl <= requested_ttl && ttl <= policy_max && ttl <= server_max);
            if let Some(r) = parent_remaining {
                prop_assert!(ttl <= r);
            }
            // Nothing is dropped that every bound allows.
            for s in &requested {
                let in_all = policy.contains(s) && parent.as_ref().is_none_or(|p| p.contains(s));
                prop_assert_eq!(in_all, scopes.contains(s));
            }
        }
    }
}
