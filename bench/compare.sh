#!/usr/bin/env bash
# The one command to rerun the comparison. On one throwaway server (fsync on,
# synchronous_commit on), in one go:
#   - spread (1,000 accounts) and hot (one account), each in three modes: debit-only
#     (`run --gateway none`), end to end through the log gateway (`--gateway log`), and
#     end to end through the webhook gateway to a local bank the bench runs itself
#     (`--gateway webhook`, signed and authenticated, ~1 ms per call);
#     each with p50/p99 from enqueue to done at half that mode's peak rate;
#   - transfers between random pairs;
#   - PostgreSQL's pgbench TPC-B-like transaction at the same concurrency as the reference.
# It prints one table: ops/s, ratio to pgbench, ratio end-to-end/debit-only, latencies,
# worker RSS and the audit. Exits non-zero if a mode failed or the audit found anything.
# Extra arguments go to `ledger-demo bench`, e.g.
#   bench/compare.sh --withdrawals 100000 --pgbench-seconds 30
#   bench/compare.sh --json
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p ledger-demo
echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(pg_config --version 2>/dev/null || echo PostgreSQL)"
exec ./target/release/ledger-demo bench --scenario all --pgbench --withdrawals 50000 --pgbench-seconds 15 "$@"
