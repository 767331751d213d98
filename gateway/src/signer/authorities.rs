//! The signing authorities and their life, as everyone may see them (no
//! key): the X.509 authorities that sign SVID leaves and the JWT keys that
//! sign JWT-SVIDs. They rotate like a SPIRE server's local authorities:
//!
//! - **prepared**: published in every bundle (X.509 trust anchors, JWKS)
//!   but signing nothing, so relying parties learn it first;
//! - **active**: the one authority of its kind that signs;
//! - **retired**: replaced by another, still published while what it signed
//!   may be valid; **tainted** besides, when holders must re-mint now;
//! - **revoked**: gone from every bundle, its key deleted.
//!
//! This module only describes; the signer changes the states, and
//! [`due`] says what automatic rotation would do next.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Which key an authority holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Signs X.509-SVID leaves (and the listener's certificate).
    X509,
    /// Signs JWT-SVIDs and join tokens.
    Jwt,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::X509 => "x509",
            Kind::Jwt => "jwt",
        })
    }
}

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Prepared,
    Active,
    Retired,
    Revoked,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Prepared => "prepared",
            State::Active => "active",
            State::Retired => "retired",
            State::Revoked => "revoked",
        })
    }
}

/// One authority. Times are Unix seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Authority {
    /// X.509: hex SHA-256 of the signing certificate's public key (first 20
    /// bytes); JWT: the key's `kid` (its RFC 7638 thumbprint).
    pub id: String,
    pub kind: Kind,
    pub state: State,
    /// Holders of what it signed must re-mint now.
    #[serde(default)]
    pub tainted: bool,
    /// When it may sign: for X.509 within every certificate above it.
    pub not_before: i64,
    pub not_after: i64,
    pub prepared_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tainted_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
    /// The latest expiry of anything it signed, as far as known (exact once
    /// it is retired).
    #[serde(default)]
    pub signed_until: i64,
    /// X.509: the signing certificate (PEM).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cert_pem: String,
    /// X.509: the certificates a leaf's chain carries after the leaf (the
    /// signing certificate and any intermediates above it); empty when the
    /// signing certificate is itself the trust anchor.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chain_pem: String,
    /// X.509: the trust anchor published in bundles.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub anchor_pem: String,
    /// JWT: the public key as a JWK, with its `kid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwk: Option<Value>,
}

impl Authority {
    /// A newly prepared authority, made at `now`, valid from `from` until
    /// `until` (Unix seconds).
    pub fn prepared(id: String, kind: Kind, from: i64, until: i64, now: i64) -> Self {
        Self {
            id,
            kind,
            state: State::Prepared,
            tainted: false,
            not_before: from,
            not_after: until,
            prepared_at: now,
            activated_at: None,
            retired_at: None,
            tainted_at: None,
            revoked_at: None,
            signed_until: 0,
            cert_pem: String::new(),
            chain_pem: String::new(),
            anchor_pem: String::new(),
            jwk: None,
        }
    }

    /// Whether bundles publish it.
    pub fn published(&self) -> bool {
        self.state != State::Revoked
    }

    /// The fraction of its life gone at `now` (0 before it starts). Its life
    /// starts when it was made, not at its backdated NotBefore.
    pub fn life_used(&self, now: i64) -> f64 {
        let start = self.not_before.max(self.prepared_at.min(self.not_after));
        let life = (self.not_after - start).max(1) as f64;
        ((now - start) as f64 / life).clamp(0.0, f64::MAX)
    }
}

/// A snapshot of every authority, with the bundles they make. Immutable: a
/// change makes a new snapshot with a higher `generation`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Authorities {
    pub generation: u64,
    pub authorities: Vec<Authority>,
    /// JWT keys outside rotation (the RS256 key), published as they are.
    #[serde(default)]
    pub static_jwks: Vec<Value>,
    /// Trust anchors (PEM) of every published X.509 authority, active first.
    #[serde(skip)]
    bundle_pem: String,
    /// Public keys of every published JWT authority, active first.
    #[serde(skip)]
    jwks: Value,
}

impl Authorities {
    /// A snapshot, with its bundles derived.
    pub fn new(generation: u64, authorities: Vec<Authority>, static_jwks: Vec<Value>) -> Self {
        let mut snapshot = Self {
            generation,
            authorities,
            static_jwks,
            bundle_pem: String::new(),
            jwks: Value::Null,
        };
        snapshot.derive();
        snapshot
    }

    /// Fills in what is derived (after deserializing).
    pub fn derive(&mut self) {
        let order = |a: &&Authority| match a.state {
            State::Active => 0,
            State::Prepared => 1,
            _ => 2,
        };
        let mut published: Vec<&Authority> = self.authorities.iter().filter(|a| a.published()).collect();
        published.sort_by_key(order);
        let mut anchors: Vec<String> = Vec::new();
        let mut keys: Vec<Value> = Vec::new();
        for a in published {
            match a.kind {
                Kind::X509 => {
                    for pem in crate::util::pem_blocks(&a.anchor_pem, "CERTIFICATE") {
                        if !anchors.contains(&pem) {
                            anchors.push(pem);
                        }
                    }
                }
                Kind::Jwt => keys.extend(a.jwk.clone()),
            }
        }
        keys.extend(self.static_jwks.iter().cloned());
        self.bundle_pem = anchors.concat();
        self.jwks = serde_json::json!({ "keys": keys });
    }

    /// The one authority of `kind` that signs, if any.
    pub fn active(&self, kind: Kind) -> Option<&Authority> {
        self.authorities
            .iter()
            .find(|a| a.kind == kind && a.state == State::Active)
    }

    /// The authority with this id.
    pub fn get(&self, id: &str) -> Option<&Authority> {
        self.authorities.iter().find(|a| a.id == id)
    }

    /// Trust anchors (PEM) relying parties verify X.509-SVID chains with.
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The public JWT-SVID keys as a JWKS.
    pub fn jwks(&self) -> Value {
        self.jwks.clone()
    }

    /// When the active X.509 authority can be relied on (Unix seconds);
    /// `(0, 0)` when none is.
    pub fn x509_validity(&self) -> (i64, i64) {
        self.active(Kind::X509)
            .map(|a| (a.not_before, a.not_after))
            .unwrap_or((0, 0))
    }

    /// Whether a credential signed by `id` must be re-minted now: its
    /// authority is tainted or no longer published.
    pub fn must_remint(&self, id: &str) -> bool {
        self.get(id).is_none_or(|a| a.tainted || !a.published())
    }
}

impl Authorities {
    /// The authorities as operators read them: the active ones first, times
    /// in RFC 3339.
    pub fn view(&self) -> Value {
        let rank = |s: State| match s {
            State::Active => 0,
            State::Prepared => 1,
            State::Retired => 2,
            State::Revoked => 3,
        };
        let mut list: Vec<&Authority> = self.authorities.iter().collect();
        list.sort_by_key(|a| {
            (
                a.kind == Kind::Jwt,
                rank(a.state),
                std::cmp::Reverse(a.prepared_at),
            )
        });
        serde_json::json!({
            "generation": self.generation,
            "authorities": list.into_iter().map(Authority::view).collect::<Vec<_>>(),
        })
    }
}

impl Authority {
    /// One authority as operators read it.
    pub fn view(&self) -> Value {
        let t = |s: Option<i64>| s.map(crate::util::rfc3339_unix);
        let mut v = serde_json::json!({
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "tainted": self.tainted,
            "not_before": crate::util::rfc3339_unix(self.not_before),
            "not_after": crate::util::rfc3339_unix(self.not_after),
            "prepared_at": crate::util::rfc3339_unix(self.prepared_at),
            "activated_at": t(self.activated_at),
            "retired_at": t(self.retired_at),
            "tainted_at": t(self.tainted_at),
            "revoked_at": t(self.revoked_at),
        });
        match self.kind {
            Kind::X509 => v["certificate_pem"] = self.cert_pem.clone().into(),
            Kind::Jwt => v["jwk"] = self.jwk.clone().unwrap_or_default(),
        }
        v
    }
}

/// A change an operator (or automatic rotation) asks of the authorities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Rotation {
    /// A new authority of `kind`, published but not signing. With `root`
    /// (X.509 under an intermediate), a new root and intermediate.
    Prepare {
        kind: Kind,
        #[serde(default)]
        root: bool,
    },
    /// The prepared authority `id` signs from now on; the active one of its
    /// kind retires.
    Activate { id: String },
    /// Holders of what the retired authority `id` signed re-mint now.
    Taint { id: String },
    /// The authority `id` leaves every bundle and its key is deleted.
    Revoke { id: String },
}

impl Rotation {
    /// The operation's name, for audit and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Rotation::Prepare { .. } => "prepare",
            Rotation::Activate { .. } => "activate",
            Rotation::Taint { .. } => "taint",
            Rotation::Revoke { .. } => "revoke",
        }
    }
}

/// When automatic rotation acts, as fractions of the active authority's
/// life: prepare a successor at `prepare_at`, activate it at `activate_at`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub prepare_at: f64,
    pub activate_at: f64,
}

impl Schedule {
    /// When `[ca]` has automatic rotation act, if it is on.
    pub fn of(ca: &super::config::CaConfig) -> Option<Self> {
        ca.auto_rotate.then_some(Self {
            prepare_at: ca.prepare_at,
            activate_at: ca.activate_at,
        })
    }
}

/// What automatic rotation does next at `now`, at most one step per kind:
/// prepare a successor, activate it, or revoke a retired authority that
/// has expired (nothing it signed can be valid any more).
pub fn due(authorities: &Authorities, schedule: Schedule, now: i64) -> Vec<Rotation> {
    let mut steps = Vec::new();
    for kind in [Kind::X509, Kind::Jwt] {
        for a in &authorities.authorities {
            if a.kind == kind && a.state == State::Retired && a.not_after <= now {
                steps.push(Rotation::Revoke { id: a.id.clone() });
            }
        }
        let Some(active) = authorities.active(kind) else {
            continue;
        };
        let used = active.life_used(now);
        let prepared = authorities
            .authorities
            .iter()
            .filter(|a| a.kind == kind && a.state == State::Prepared && a.not_before <= now)
            .max_by_key(|a| a.prepared_at);
        match prepared {
            None if used >= schedule.prepare_at => steps.push(Rotation::Prepare { kind, root: false }),
            Some(p) if used >= schedule.activate_at => steps.push(Rotation::Activate { id: p.id.clone() }),
            _ => {}
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(id: &str, kind: Kind, state: State, from: i64, until: i64) -> Authority {
        let mut a = Authority::prepared(id.into(), kind, from, until, from);
        a.state = state;
        a.jwk = Some(serde_json::json!({ "kid": id }));
        a
    }

    const SCHEDULE: Schedule = Schedule {
        prepare_at: 0.5,
        activate_at: 0.8,
    };

    #[test]
    fn a_successor_is_prepared_at_half_life_and_activated_later() {
        let active = authority("a", Kind::Jwt, State::Active, 0, 100);
        let only = Authorities::new(1, vec![active.clone()], vec![]);
        assert!(due(&only, SCHEDULE, 49).is_empty());
        assert_eq!(
            due(&only, SCHEDULE, 50),
            vec![Rotation::Prepare {
                kind: Kind::Jwt,
                root: false
            }]
        );
        let both = Authorities::new(
            2,
            vec![active, authority("b", Kind::Jwt, State::Prepared, 50, 150)],
            vec![],
        );
        // Prepared: published, waiting for the overlap to pass.
        assert!(due(&both, SCHEDULE, 60).is_empty());
        assert_eq!(both.jwks()["keys"].as_array().unwrap().len(), 2);
        assert_eq!(both.jwks()["keys"][0]["kid"], "a", "the active key first");
        assert_eq!(
            due(&both, SCHEDULE, 80),
            vec![Rotation::Activate { id: "b".into() }]
        );
    }

    #[test]
    fn an_expired_retired_authority_is_revoked_and_leaves_the_bundle() {
        let set = Authorities::new(
            3,
            vec![
                authority("old", Kind::Jwt, State::Retired, 0, 100),
                authority("new", Kind::Jwt, State::Active, 50, 1000),
                authority("gone", Kind::Jwt, State::Revoked, 0, 100),
            ],
            vec![],
        );
        assert!(due(&set, SCHEDULE, 99).is_empty());
        assert_eq!(
            due(&set, SCHEDULE, 100),
            vec![Rotation::Revoke { id: "old".into() }]
        );
        let jwks = set.jwks();
        let kids: Vec<&str> = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap())
            .collect();
        assert_eq!(kids, ["new", "old"]);
        assert!(set.must_remint("gone") && set.must_remint("unknown") && !set.must_remint("old"));
    }
}
