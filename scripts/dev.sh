#!/usr/bin/env bash
# Starts `castellan dev` on its embedded defaults: data in ./castellan-dev,
# plain HTTP on 127.0.0.1:8443. Extra arguments go to `castellan dev`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -p castellan -- dev "$@"
