#!/usr/bin/env bash
# Runs our three scenarios and PostgreSQL's pgbench TPC-B-like transaction at the same
# concurrency, on one throwaway server (fsync on), in one go, and prints the table with
# the ratio ours/pgbench. Extra arguments go to `ledger-worker bench`, e.g.
#   bench/compare.sh --withdrawals 100000 --pgbench-seconds 30
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ledger-worker
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(pg_config --version 2>/dev/null || echo PostgreSQL)"
exec ./target/release/ledger-worker bench --scenario all --pgbench --withdrawals 50000 --pgbench-seconds 15 "$@"
