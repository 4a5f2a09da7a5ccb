#!/bin/sh
# The full benchmark run, as recorded in docs/BENCHMARKS.md: installs the peers from Debian's
# packages if they are missing, builds the release server and harness, and runs every target
# through every phase three times (each figure the median). About 45 minutes on a 2-core machine.
# Writes results.{md,json} and latency.svg to docs/bench (or to $BENCH_OUT).
#
# Usage: crates/bench/run.sh [tidings-bench run options, e.g. --targets tidings,mosquitto]
set -eu
cd "$(dirname "$0")/../.."
crates/bench/install-peers.sh
cargo build --release --locked -p tidings -p tidings-bench
target=${CARGO_TARGET_DIR:-target}
exec "$target/release/tidings-bench" run --out "${BENCH_OUT:-docs/bench}" "$@"
