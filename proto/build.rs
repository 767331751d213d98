//! Generates the Workload API server code with a vendored `protoc`, so the
//! build needs nothing installed beyond cargo.
#![allow(clippy::expect_used, clippy::unwrap_used)] // a build script reports failure by panicking

fn main() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    // SAFETY-free: build scripts are single-threaded; the variable is read by the builder below.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=workload.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["workload.proto"], &["."])
        .expect("compile workload.proto");
}
