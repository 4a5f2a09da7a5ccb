#!/usr/bin/env bash
# Runs the whole test suite, installing first what the tests need beyond Rust:
#   - strace (the opt-in test watches a client's system calls),
#   - Kannel and its test SMSC fakesmsc (the SMS fallback tests run a real Kannel on loopback),
#   - python-gsmmodem-new and smppy (with its PDU codec smpppdu) in a private virtualenv: the
#     independent SMS PDU codec the SMS and modem tests compare against, and the SMPP server the
#     SMPP tests run (tests/smsc/).
# Usage: scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v strace >/dev/null || missing+=(strace)
command -v bearerbox >/dev/null || missing+=(kannel)
[ -x /usr/lib/kannel/test/fakesmsc ] || missing+=(kannel-extras)
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

venv=target/test-venv
if ! "$venv/bin/python" -c 'import gsmmodem.pdu, smppy, smpp.pdu' 2>/dev/null; then
  echo "installing python-gsmmodem-new, smppy and smpppdu into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q python-gsmmodem-new==0.13.0 pyserial==3.5 smppy==0.3.2 smpppdu==0.1.2
fi
export TIDINGS_SMS_PYTHON="$PWD/$venv/bin/python"

cargo test --workspace "$@"
