#!/usr/bin/env bash
# Runs every test: the attestor modules' own tests, the default policy
# bundle's Rego tests, the gateway's unit tests and the end-to-end tests in
# tests/ (which drive the real binary). Ends with one line of totals.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --manifest-path plugins-wasm/Cargo.toml --all-targets 2>&1 | tee -a "$log"
cargo build -p castellan
target/debug/castellan policy test policies | tee -a "$log"
cargo test --workspace --all-targets 2>&1 | tee -a "$log"
# Sum cargo's "test result:" lines and the Rego runner's "N passed, N failed".
awk '
  /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1) } }
  /^[0-9]+ passed, [0-9]+ failed$/ { p += $1; f += $3 }
  END { printf "total: %d passed, %d failed\n", p, f }
' "$log"
