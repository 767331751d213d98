//! Generated code for Castellan's gRPC protocols.

/// The SPIFFE Workload API (no proto package: paths are `/SpiffeWorkloadAPI/<Rpc>`).
#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}
