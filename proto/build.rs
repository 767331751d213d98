//! Generates the Workload API and SDS code with a vendored `protoc` (and its
//! well-known types), so the build needs nothing installed beyond cargo.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a build script reports failure by panicking

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY-free: build scripts are single-threaded; the variable is read by the builder below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let well_known = protoc_bin_vendored::include_path().expect("vendored well-known types");
    for dir in ["workload.proto", "signer.proto", "envoy", "google"] {
        println!("cargo:rerun-if-changed={dir}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "workload.proto",
                "signer.proto",
                "envoy/service/secret/v3/sds.proto",
                "envoy/extensions/transport_sockets/tls/v3/secret.proto",
            ],
            &[".", well_known.to_str().expect("a UTF-8 path")],
        )
        .expect("compile the protos");
}
