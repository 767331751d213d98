//! Castellan: a gateway that hands workloads and AI agents short-lived SPIFFE
//! identities after they prove what they are and a policy says yes.
//!
//! The library is layered, and imports only point down:
//!
//! - **model**: the types every stage and store share (with `util` and
//!   `spiffe_id`, the leaves).
//! - **stages**: `attest` (WASM attestors), `trust` (trust sources),
//!   `policy` and `bundle` (Rego and signed bundles), `approvals` (the rules
//!   of a vote), `broker` (delegation and attenuation), `entries`
//!   (registration entries), `signer` and `ca` (keys), `store` (storage and
//!   the rules above it), `auth`, `federation`, `notify`, `config`.
//! - **engine**: the one pipeline every credential goes through.
//! - **surfaces**: `http` and `workload_api`, thin adapters over the engine.
//!
//! The `castellan` binary (`main.rs`) sits on top: its commands (`cli`), the
//! server assembly (`server`), and the tools a user runs beside the server
//! (`bench`, the TPM client `tpm`, `cli::svid_helper`) are not part of this
//! library.

pub mod approvals;
pub mod attest;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod bundle;
pub mod ca;
pub mod client;
pub mod config;
pub mod dev;
pub mod engine;
pub mod entries;
pub mod federation;
pub mod http;
pub mod metrics;
pub mod model;
pub mod notify;
pub mod policy;
pub mod signer;
pub mod spiffe_id;
pub mod store;
pub mod tls;
pub mod trust;
pub mod util;
pub mod workload_api;

#[cfg(test)]
mod layering;
