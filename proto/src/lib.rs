//! Generated code for Castellan's gRPC protocols.

/// The SPIFFE Workload API (no proto package: paths are `/SpiffeWorkloadAPI/<Rpc>`).
#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}

/// Castellan's signer service (`castellan signer`), spoken over a Unix
/// socket between gateways and the process that holds the keys.
#[allow(clippy::all, missing_docs)]
pub mod signer {
    tonic::include_proto!("castellan.signer.v1");
}

/// Envoy's Secret Discovery Service (v3), the subset Castellan serves on the
/// Workload API socket. Modules follow the proto packages, which the
/// generated code refers to by relative path.
#[allow(clippy::all, missing_docs)]
pub mod envoy {
    pub mod service {
        pub mod secret {
            pub mod v3 {
                tonic::include_proto!("envoy.service.secret.v3");
            }
        }
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod extensions {
        pub mod transport_sockets {
            pub mod tls {
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.transport_sockets.tls.v3");

                    /// The type URL of a [`Secret`] in an `Any`.
                    pub const SECRET_TYPE_URL: &str =
                        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
                    /// The type URL of a [`SpiffeCertValidatorConfig`] in an `Any`.
                    pub const SPIFFE_VALIDATOR_TYPE_URL: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig";
                }
            }
        }
    }
    pub mod r#type {
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// `google.rpc.Status`, which xDS requests carry to report a rejected update.
#[allow(clippy::all, missing_docs)]
pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}
