#!/usr/bin/env bash
# Runs every test: the gateway's unit tests, the end-to-end tests in tests/
# (which drive the real binary), the attestor modules' own tests, and the
# default policy bundle's Rego tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --manifest-path plugins-wasm/Cargo.toml
cargo build -p castellan
target/debug/castellan policy test policies
cargo test --workspace
