#!/usr/bin/env bash
# Installs what building and testing Castellan needs beyond rustup and cargo:
# the wasm32-wasip2 target the attestor modules are compiled for, and a
# software TPM (swtpm, swtpm_setup, tpm2-tools) plus the TSS headers that the
# castellan-tpm crate's client side and its tests need, and PostgreSQL, whose
# programs the store tests run a throwaway cluster with (they start it
# themselves: nothing is left running), the OpenSSL command line the tests
# verify chains with, and SoftHSM2, the PKCS#11 token the HSM tests keep
# keys in (each test makes its own token directory), and headless Chromium
# with chromedriver for the console's browser test. Quiet when everything
# is already there.
set -euo pipefail

# Installs Debian packages, from the cached package lists first, refreshing
# them only when that fails.
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${sudo[@]}" apt-get install -y --no-install-recommends "$@"; then
    "${sudo[@]}" apt-get update
    "${sudo[@]}" apt-get install -y --no-install-recommends "$@"
  fi
}

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi

tpm_packages=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config)
tpm_ready() {
  command -v swtpm >/dev/null &&
    command -v swtpm_setup >/dev/null &&
    command -v tpm2_startup >/dev/null &&
    command -v pkg-config >/dev/null &&
    pkg-config --exists tss2-esys tss2-tctildr tss2-mu
}
if ! tpm_ready; then
  apt_install "${tpm_packages[@]}"
fi

# PostgreSQL's server programs (initdb, postgres) for the store tests; the
# package's own cluster, if the install starts one, is not used.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  apt_install postgresql
fi

# The OpenSSL command line, an independent verifier of the chains Castellan
# signs (subordinate CAs and their name constraints).
if ! command -v openssl >/dev/null 2>&1; then
  apt_install openssl
fi

# SoftHSM2: a real PKCS#11 module and its token tool, for the key-manager
# tests (`[ca] key_manager = "pkcs11"`).
if [ ! -e /usr/lib/softhsm/libsofthsm2.so ] || ! command -v softhsm2-util >/dev/null 2>&1; then
  apt_install softhsm2
fi

# Headless Chromium and its WebDriver server, for the approver console's
# end-to-end test (a real browser; nothing is downloaded at run time).
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  apt_install chromium chromium-driver
fi

# Python with a real gRPC C-core client (grpcio) for the Workload API tests:
# stock clients built on C-core (py-spiffe, C++, Ruby) are tested with it, and
# with xds-protos (code generated from Envoy's official protos) as an SDS client,
# and Prometheus's own Python client, whose text parser checks /metrics.
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/grpc-venv"
if ! "$venv/bin/python" -c "import grpc, yaml, envoy.service.secret.v3.sds_pb2_grpc, prometheus_client" 2>/dev/null; then
  if ! python3 -m venv --help >/dev/null 2>&1; then
    apt_install python3 python3-venv
  fi
  if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "grpcio==1.85.*" "xds-protos==1.85.*" "PyYAML==6.*" \
    "prometheus-client>=0.20,<1"
fi
