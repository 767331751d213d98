//! Workload API registration entries.

use serde::{Deserialize, Serialize};

/// A registration entry: who (selectors, all of which must match) gets which
/// identity, and for how long.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub id: String,
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    /// X.509-SVID lifetime, seconds.
    pub x509_svid_ttl: u64,
    /// JWT-SVID lifetime, seconds.
    pub jwt_svid_ttl: u64,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub hint: String,
    #[serde(default)]
    pub federates_with: Vec<String>,
    pub created_at: String,
}
