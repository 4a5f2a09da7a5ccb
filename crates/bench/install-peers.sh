#!/bin/sh
# Installs the benchmark peers from Debian's packages, idempotently.
#
# The harness never uses the system services these packages may start: it runs its own
# instances on non-default loopback ports with configurations from crates/bench/peers/ and stops each by
# its process id. This script only makes sure the programs are installed, and that the
# ejabberd package's own service (which listens on ALL interfaces with its default
# configuration) is not left running.
#
# Usage: crates/bench/install-peers.sh    (as root, or a user who may sudo)
set -eu

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
export DEBIAN_FRONTEND=noninteractive
packages="mosquitto nats-server ejabberd erlang-base openssl procps iproute2"
missing=""
for p in $packages; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    as_root apt-get update -qq
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# The ejabberd package starts its service on install (where an init system runs it). The
# harness starts its own ejabberd under a different node name and config; the packaged one
# would hold the default ports on all interfaces, so stop it if it is running.
if command -v ejabberdctl >/dev/null 2>&1; then
    if as_root ejabberdctl status >/dev/null 2>&1; then
        echo "stopping the packaged ejabberd service (the harness runs its own instance)"
        if command -v service >/dev/null 2>&1; then
            as_root service ejabberd stop >/dev/null 2>&1 || as_root ejabberdctl stop >/dev/null 2>&1 || true
        else
            as_root ejabberdctl stop >/dev/null 2>&1 || true
        fi
    fi
fi

for bin in mosquitto nats-server ejabberdctl openssl; do
    if ! command -v "$bin" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$bin" ]; then
        echo "error: $bin is still missing after installing" >&2
        exit 1
    fi
done
echo "peers installed:"
dpkg-query -W -f='  ${Package} ${Version}\n' mosquitto nats-server ejabberd
