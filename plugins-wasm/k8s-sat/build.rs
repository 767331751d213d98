// Without std, nothing links wasi-libc's string routines (`memcmp`, `memcpy`),
// which compiler-generated code still calls. Link them statically from the
// target's self-contained libc: they are pure functions and import no WASI.
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo:rustc-link-arg=-lc");
        // 128 KiB of stack instead of the default 1 MiB: enough for the
        // parsers' bounded recursion, and it keeps a call's memory small.
        println!("cargo:rustc-link-arg=-zstack-size=131072");
    }
}
