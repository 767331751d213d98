#!/usr/bin/env bash
# Starts a software TPM to try or benchmark the tpm method with when the
# machine has no TPM to spare: swtpm_setup manufactures it with an RSA-2048
# EK certificate from a throwaway local CA made in DIR, and swtpm serves it on
# 127.0.0.1:PORT (control channel PORT+1) in the background.
#
#   scripts/swtpm.sh DIR [PORT]      (PORT defaults to 2321)
#
# Then: TCTI swtpm:host=127.0.0.1,port=PORT; the EK's CA certificates (root
# and intermediate, for a tpm trust source) in DIR/ek-ca.pem; stop it with
# kill "$(cat DIR/swtpm.pid)". DIR must not exist or be empty. Needs the
# packages scripts/setup.sh installs.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 DIR [PORT]" >&2
  exit 2
fi
dir=$1
port=${2:-2321}
if [ -e "$dir" ] && [ -n "$(ls -A "$dir")" ]; then
  echo "error: $dir exists and is not empty" >&2
  exit 1
fi
mkdir -p "$dir/ca" "$dir/state"
dir=$(cd "$dir" && pwd)

cat >"$dir/ca/localca.conf" <<EOF
statedir = $dir/ca
signingkey = $dir/ca/signkey.pem
issuercert = $dir/ca/issuercert.pem
certserial = $dir/ca/certserial
EOF
cat >"$dir/ca/localca.options" <<EOF
--platform-manufacturer Castellan
--platform-version 1.0
--platform-model swtpm
EOF
cat >"$dir/ca/swtpm_setup.conf" <<EOF
create_certs_tool = $(command -v swtpm_localca)
create_certs_tool_config = $dir/ca/localca.conf
create_certs_tool_options = $dir/ca/localca.options
active_pcr_banks = sha256
EOF

swtpm_setup --tpm2 --tpmstate "$dir/state" --create-ek-cert --create-platform-cert \
  --lock-nvram --overwrite --config "$dir/ca/swtpm_setup.conf" >"$dir/setup.log" 2>&1 || {
  cat "$dir/setup.log" >&2
  exit 1
}
cat "$dir/ca/swtpm-localca-rootca-cert.pem" "$dir/ca/issuercert.pem" >"$dir/ek-ca.pem"

swtpm socket --tpm2 --tpmstate "dir=$dir/state" \
  --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
  --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
  --flags not-need-init,startup-clear \
  --pid "file=$dir/swtpm.pid" --daemon --log "file=$dir/swtpm.log"

echo "swtpm:host=127.0.0.1,port=$port"
