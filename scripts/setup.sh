#!/usr/bin/env bash
# Installs what building Castellan needs beyond rustup and cargo: the
# wasm32-wasip2 target the attestor modules are compiled for.
set -euo pipefail
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
