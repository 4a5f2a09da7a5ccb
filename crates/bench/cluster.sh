#!/usr/bin/env bash
# The Tidings "server" of `tidings-bench run --tidings-nodes N`: N nodes over one PostgreSQL
# database and a nats-server of their own, all started here, so that the harness sees one
# process tree (it adds the machine's PostgreSQL processes to what it counts). The harness runs
# it as `cluster.sh <tidings binary> server --config FILE` with TIDINGS_BENCH_NODES=N.
# Node k listens 100*k ports above the configured address; once all listen, the first node's
# listening line is printed. The database: one per data directory, made from the prepared one
# (the registration's) when the harness copied the prepared directory, so every run starts from
# the same registered users; a restart keeps its directory's database. The databases stay until
# the next run on the same port (tidings_bench_*: drop them when done).
# PostgreSQL: TIDINGS_BENCH_POSTGRES (default postgres://postgres@127.0.0.1:5432).
set -euo pipefail
tidings=$1
shift
nodes=${TIDINGS_BENCH_NODES:-3}
postgres=${TIDINGS_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432}
config=""
previous=""
for arg in "$@"; do
  [ "$previous" = --config ] && config=$arg
  previous=$arg
done
setting() { sed -n "s/^$1 = \"\(.*\)\"$/\1/p" "$config"; }
listen=$(setting listen)
data_dir=$(setting data_dir)
host=${listen%:*}
port=${listen##*:}
mkdir -p "$data_dir"
# `postgres-template` names the prepared database; `postgres-database` this directory's own. A
# copy of the prepared directory has both the same: it gets a database of its own, made from the
# template; a restart on the same directory keeps its database.
template=$(cat "$data_dir/postgres-template" 2>/dev/null || true)
database=$(cat "$data_dir/postgres-database" 2>/dev/null || true)
sql() { psql "$postgres/postgres" -qAtc "$1"; }
if [ -z "$template" ]; then
  database=tidings_bench_${port}_$$
  sql "CREATE DATABASE $database"
  echo "$database" >"$data_dir/postgres-template"
elif [ "$database" = "$template" ]; then
  # Databases of earlier runs of this invocation (same port) are not needed any more.
  for old in $(sql "SELECT datname FROM pg_database WHERE datname LIKE 'tidings_bench_${port}_%' AND datname <> '$template'"); do
    sql "DROP DATABASE IF EXISTS $old WITH (FORCE)" || true
  done
  database=tidings_bench_${port}_$$
  sql "CREATE DATABASE $database TEMPLATE $template"
fi
echo "$database" >"$data_dir/postgres-database"

nats_port=$((port + 1000))
nats-server -a 127.0.0.1 -p "$nats_port" >"$data_dir/../nats.log" 2>&1 &
children=($!)
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 100); do answers "$nats_port" && break; sleep 0.1; done

stop() {
  kill -TERM "${children[@]}" 2>/dev/null || true
  wait || true
  exit 0
}
trap stop TERM INT

for k in $(seq 0 $((nodes - 1))); do
  node_port=$((port + 100 * k))
  "$tidings" "$@" --listen "$host:$node_port" --store "$postgres/$database" \
    --bus "nats://127.0.0.1:$nats_port" --bus-prefix "bench$port" --node-name "bench-$k" \
    >"$data_dir/../node-$k.out" &
  children+=($!)
  # Each node applies the schema at start: one at a time.
  for _ in $(seq 600); do answers "$node_port" && break; sleep 0.1; done
done
# Every node listens: the first node's listening line tells the harness.
head -n 1 "$data_dir/../node-0.out"
wait
