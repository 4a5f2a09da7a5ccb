#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, one after another, starting from
# the committed seed corpus in fuzz/corpus/<target>/.
#
#   fuzz/run.sh [SECONDS] [TARGET...]      default: 30 s per target, every target
#
# It works on the stable toolchain: cargo-fuzz passes nightly-only flags (-Z), which
# RUSTC_BOOTSTRAP=1 lets stable accept, and `--sanitizer none` needs no sanitizer runtime. The
# code under test forbids `unsafe`, so AddressSanitizer would add little but time; the checks are
# the targets' own assertions and Rust's (bounds, and overflow: cargo-fuzz builds with debug
# assertions).
# New inputs the fuzzer finds go to target/fuzz-corpus/<target>/, not into the committed corpus;
# a crash is written to fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
shift || true
if ! command -v cargo-fuzz >/dev/null; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
flags=(--sanitizer none)
cargo fuzz build "${flags[@]}"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi
mkdir -p ../target/fuzz-logs
for target in "${targets[@]}"; do
    found=../target/fuzz-corpus/$target
    log=../target/fuzz-logs/$target.log
    mkdir -p "$found"
    echo "== fuzz $target for $seconds s"
    # -rss_limit_mb bounds memory: a decoder that allocates whatever the input announces fails.
    if ! cargo fuzz run "${flags[@]}" "$target" "$found" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
        >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz target $target failed: the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    # The last status line (executions, coverage, corpus) and the run's totals.
    grep -E '^#[0-9]+' "$log" | tail -n 1
    grep -E '^stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" || true
done
