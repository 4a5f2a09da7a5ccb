#!/usr/bin/env bash
# Runs the whole test suite, installing first what the tests need beyond Rust:
#   - strace (the opt-in test watches a client's system calls),
#   - Kannel and its test SMSC fakesmsc (the SMS fallback tests run a real Kannel on loopback),
#   - python-gsmmodem-new and smppy (with its PDU codec smpppdu) in a private virtualenv: the
#     independent SMS PDU codec the SMS and modem tests compare against, and the SMPP server the
#     SMPP tests run (tests/smsc/);
#   - PostgreSQL, for the store's tests of its PostgreSQL engine (each in a schema of its own in
#     the database TIDINGS_TEST_POSTGRES names, by default postgres://postgres@127.0.0.1:5432/test):
#     installed, started and given the database `test` when that URL does not answer; it also
#     holds, a database each, the test servers of the part of the suite run a second time on
#     PostgreSQL and NATS at the end (TIDINGS_TEST_ENGINE=postgres);
#   - nats-server, for the tests of several nodes sharing a bus (tests/integration/cluster.rs):
#     started on the URL TIDINGS_TEST_NATS names (by default nats://127.0.0.1:4222) when nothing
#     answers there;
#   - schemathesis, in the same virtualenv, which then checks a running server against its
#     OpenAPI document (scripts/schemathesis.toml: every check, 100 cases per operation, a fixed
#     seed, about a minute; no failure allowed).
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
command -v nats-server >/dev/null || missing+=(nats-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian packages)"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

pg_url=${TIDINGS_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
pg_answers() { command -v psql >/dev/null && psql "$pg_url" -Atqc 'SELECT 1' >/dev/null 2>&1; }
if ! pg_answers; then
  if ! command -v pg_ctlcluster >/dev/null || ! command -v psql >/dev/null; then
    echo "installing postgresql (Debian package)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  as_root service postgresql start >/dev/null || true
  as_root su postgres -c "createdb test" 2>/dev/null || true
  if ! pg_answers && [ -z "${TIDINGS_TEST_POSTGRES:-}" ]; then
    # A fresh Debian cluster asks for a password over TCP (scram-sha-256 in pg_hba.conf): the
    # tests get a role of their own, with a password, that may make the databases they use.
    as_root su postgres -c "psql -q -v ON_ERROR_STOP=1" >/dev/null <<'SQL' || true
SELECT 'CREATE ROLE tidings_test LOGIN CREATEDB PASSWORD ''tidings-test'''
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tidings_test')\gexec
GRANT ALL ON DATABASE test TO tidings_test;
SQL
    pg_url=postgres://tidings_test:tidings-test@127.0.0.1:5432/test
  fi
  if ! pg_answers; then
    echo "PostgreSQL does not answer at $pg_url: allow the user without a password from" \
      "127.0.0.1 (a 'host all postgres 127.0.0.1/32 trust' line in pg_hba.conf, then" \
      "'service postgresql reload'), or set TIDINGS_TEST_POSTGRES (README.md, Tests)" >&2
    exit 1
  fi
fi
export TIDINGS_TEST_POSTGRES="$pg_url"

nats_url=${TIDINGS_TEST_NATS:-nats://127.0.0.1:4222}
nats_address=${nats_url#nats://}
nats_host=${nats_address%:*}
nats_port=${nats_address##*:}
nats_answers() { (exec 3<>"/dev/tcp/$nats_host/$nats_port") 2>/dev/null; }
if ! nats_answers; then
  echo "starting nats-server on $nats_host:$nats_port"
  nohup nats-server -a "$nats_host" -p "$nats_port" >/dev/null 2>&1 &
  for _ in $(seq 50); do nats_answers && break; sleep 0.1; done
  nats_answers || { echo "nats-server did not start on $nats_host:$nats_port" >&2; exit 1; }
fi
export TIDINGS_TEST_NATS="$nats_url"

venv=target/test-venv
if ! "$venv/bin/python" -c 'import gsmmodem.pdu, smppy, smpp.pdu, schemathesis' 2>/dev/null; then
  echo "installing python-gsmmodem-new, smppy, smpppdu and schemathesis into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q python-gsmmodem-new==0.13.0 pyserial==3.5 smppy==0.3.2 \
    smpppdu==0.1.2 schemathesis==4.32.5
fi
export TIDINGS_SMS_PYTHON="$PWD/$venv/bin/python"

echo "== [${SECONDS} s] cargo test --workspace"
cargo test --workspace "$@"

# A part of the PostgreSQL pass (every test server on PostgreSQL and NATS; the whole pass takes
# about 20 minutes here, see README.md): deliver first and resends, which decide what each
# engine must make durable, and the privacy scans, which read PostgreSQL's files too.
echo "== [${SECONDS} s] PostgreSQL pass: deliver first, resends, privacy"
TIDINGS_TEST_ENGINE=postgres cargo test --workspace -- \
  deliver_first:: resend:: privacy:: audit::

# The OpenAPI document against the server it describes: a server of the build just tested, in a
# temporary directory, on a free loopback port.
echo "== [${SECONDS} s] schemathesis: the server answers as its OpenAPI document says"
scratch=$(mktemp -d)
HOME="$scratch" target/debug/tidings server --listen 127.0.0.1:0 --metrics-listen off \
  --data-dir "$scratch/data" --key-file "$scratch/server.key" --outbox-dir "$scratch/outbox" \
  >"$scratch/stdout" 2>"$scratch/server.log" &
server=$!
trap 'kill "$server" 2>/dev/null; rm -rf "$scratch"' EXIT
for _ in $(seq 300); do
  grep -q 'listening on' "$scratch/stdout" && break
  kill -0 "$server" 2>/dev/null || { cat "$scratch/server.log"; exit 1; }
  sleep 0.1
done
url=$(sed -n 's/.*listening on //p' "$scratch/stdout")
[ -n "$url" ] || { echo "the server did not start"; cat "$scratch/server.log"; exit 1; }
(cd "$scratch" && "$OLDPWD/$venv/bin/schemathesis" --config-file "$OLDPWD/scripts/schemathesis.toml" \
  run "$url/v1/openapi.json" --checks all --max-examples 100 --seed 1 --workers 2 --warnings off)
