//! The `castellan` binary: every command is in [`castellan::cli`].

/// mimalloc: the issuance path allocates from many threads at once (HTTP,
/// Rego, JSON), where glibc's allocator contends.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    castellan::cli::main()
}
