//! Castellan: a gateway that hands workloads and AI agents short-lived SPIFFE
//! identities after they prove what they are and a policy says yes.
//!
//! The library is organised by pipeline stage (`attest`, `policy`, `signer`,
//! `ca`, `store`, `trust`, `auth`), with `issuance` tying the stages together
//! and the surfaces (`http`, `cli`) as thin adapters over it.

pub mod approvals;
pub mod attest;
pub mod auth;
pub mod bench;
pub mod broker;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod federation;
pub mod http;
pub mod issuance;
pub mod join_token;
pub mod notify;
pub mod policy;
pub mod server;
pub mod signer;
pub mod spiffe_id;
pub mod store;
pub mod tls;
#[cfg(feature = "tpm")]
pub mod tpm;
pub mod trust;
pub mod util;
pub mod workload_api;
