//! The `castellan` binary: the commands (`cli`), the assembly of a running
//! server from a config (`server`), and the tools a user runs beside the
//! server (`bench`, the TPM client `tpm`, `cli::svid_helper`). They sit on
//! top of the `castellan` library and are not part of it.

mod bench;
mod cli;
mod server;
#[cfg(feature = "tpm")]
mod tpm;

/// mimalloc: the issuance path allocates from many threads at once (HTTP,
/// Rego, JSON), where glibc's allocator contends.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
