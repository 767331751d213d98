#![allow(clippy::expect_used, clippy::unwrap_used)] // a build script reports failure by panicking

//! Builds the built-in attestor modules (plugins-wasm/, its own workspace) for
//! wasm32-wasip2 and embeds them, with the default policy bundle, in the
//! binary, so `castellan dev` needs nothing beside itself.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Built-in modules: (attestation method, crate directory, artifact name).
const MODULES: &[(&str, &str, &str)] = &[
    ("k8s_sat", "k8s-sat", "k8s_sat.wasm"),
    ("unix", "unix", "unix_attestor.wasm"),
    ("github_oidc", "github-oidc", "github_oidc_attestor.wasm"),
    ("gcp_iit", "gcp-iit", "gcp_iit_attestor.wasm"),
    ("azure_msi", "azure-msi", "azure_msi_attestor.wasm"),
    ("aws_iid", "aws-iid", "aws_iid_attestor.wasm"),
    ("join_token", "join-token", "join_token_attestor.wasm"),
    ("x509pop", "x509pop", "x509pop_attestor.wasm"),
    ("tpm", "tpm", "tpm_attestor.wasm"),
];

/// Test fixtures (never embedded in the binary): (constant, artifact name).
const FIXTURES: &[(&str, &str)] = &[("HOSTILE", "hostile.wasm"), ("WASI_FS", "wasi_fs.wasm")];

/// Example modules built for the end-to-end tests: (crate dir, artifact).
const EXAMPLES: &[(&str, &str)] = &[("examples/custom-attestor", "ci_job_attestor.wasm")];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir
        .parent()
        .expect("gateway/ sits in the workspace root")
        .to_path_buf();
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let plugins = root.join("plugins-wasm");
    let policies = root.join("policies");
    println!("cargo:rerun-if-changed={}", plugins.join("wit").display());
    println!("cargo:rerun-if-changed={}", plugins.join("Cargo.toml").display());
    for (_, dir, _) in MODULES {
        println!("cargo:rerun-if-changed={}", plugins.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", plugins.join("fixtures").display());
    println!("cargo:rerun-if-changed={}", plugins.join(".cargo").display());
    println!("cargo:rerun-if-changed={}", root.join("sdk/attestor").display());
    for (dir, _) in EXAMPLES {
        println!("cargo:rerun-if-changed={}", root.join(dir).join("src").display());
        println!(
            "cargo:rerun-if-changed={}",
            root.join(dir).join("Cargo.toml").display()
        );
    }
    println!("cargo:rerun-if-changed={}", policies.display());

    build_modules(&root, &plugins, &out_dir);
    embed_policies(&policies, &out_dir);
}

fn build_modules(root: &Path, plugins: &Path, out_dir: &Path) {
    ensure_wasm_target();
    // A target dir of its own beside the workspace's, so the nested cargo
    // never waits on the outer one's lock and rebuilds are incremental.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("wasm-plugins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let build = |dir: &Path| {
        let status = Command::new(&cargo)
            // From inside the workspace so its .cargo/config.toml applies.
            .current_dir(dir)
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "--manifest-path",
            ])
            .arg(dir.join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target_dir)
            // Settings meant for the host build must not leak into the guest build.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("CARGO_TARGET_DIR")
            .status()
            .expect("cannot run cargo to build the attestor modules");
        assert!(
            status.success(),
            "building the modules in {} failed",
            dir.display()
        );
    };
    build(plugins);
    for (dir, _) in EXAMPLES {
        build(&root.join(dir));
    }

    // Copies a built module next to the generated code; returns its path as
    // an `include_bytes!` argument.
    let stage = |artifact: &str| {
        let built = target_dir.join("wasm32-wasip2/release").join(artifact);
        let dest = out_dir.join(artifact);
        std::fs::copy(&built, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", built.display()));
        format!("{:?}", dest.display().to_string())
    };
    let mut code = String::from(
        "/// Built-in attestor modules: (method, component bytes).\npub const MODULES: &[(&str, &[u8])] = &[\n",
    );
    for (method, _, artifact) in MODULES {
        code.push_str(&format!(
            "    ({method:?}, include_bytes!({})),\n",
            stage(artifact)
        ));
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("embedded_attestors.rs"), code).expect("write embedded_attestors.rs");

    let mut fixtures = String::from("// Test fixtures: hostile and ungranted-import modules.\n");
    for (name, artifact) in FIXTURES.iter().chain(&[("CI_JOB", EXAMPLES[0].1)]) {
        fixtures.push_str(&format!(
            "pub const {name}: &[u8] = include_bytes!({});\n",
            stage(artifact)
        ));
    }
    std::fs::write(out_dir.join("test_fixtures.rs"), fixtures).expect("write test_fixtures.rs");
}

/// Adds the wasm32-wasip2 target when rustup is present and it is missing.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let installed = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .ok()
        .and_then(|o| {
            o.status
                .success()
                .then(|| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        })
        .is_some_and(|dir| Path::new(&dir).exists());
    if !installed {
        let ok = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "the wasm32-wasip2 target is missing: run `rustup target add wasm32-wasip2`"
        );
    }
}

fn embed_policies(dir: &Path, out_dir: &Path) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("policies/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            (name.ends_with(".rego") && !name.ends_with("_test.rego"))
                || name == "data.json"
                || name == ".manifest"
        })
        .collect();
    files.sort();
    let mut code = String::from(
        "/// The default policy bundle: (file name, contents).\npub const FILES: &[(&str, &str)] = &[\n",
    );
    for f in files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name")
            .to_owned();
        code.push_str(&format!(
            "    ({name:?}, include_str!({:?})),\n",
            f.display().to_string()
        ));
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("embedded_policies.rs"), code).expect("write embedded_policies.rs");
}
