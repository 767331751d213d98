//! The `castellan` binary: every command is in [`castellan::cli`].

fn main() -> std::process::ExitCode {
    castellan::cli::main()
}
