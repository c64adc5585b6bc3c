#!/usr/bin/env bash
# Issue 9's proof: a fresh clone of this checkout's HEAD, `bash .ci/run` (fmt, clippy, the
# README's `cargo test`), then `cargo test` 4 more times, then 3 times beside two
# CPU-burning processes, then the demo with a DATABASE_URL set (it must ignore it), then
# a look for leftover processes and throwaway clusters. Prints one line per run.
set -u
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d /tmp/ledger-proof.XXXXXX)
git clone -q "$here" "$work/clone" && cd "$work/clone" || exit 1
echo "commit $(git rev-parse --short HEAD), logs in $work"
passed() { grep -h '^test result' "$1" | awk '{s+=$4} END {print s}'; }
s=$(date +%s); CI=true bash .ci/run > "$work/ci.log" 2>&1 < /dev/null
echo "ci: rc=$? $(( $(date +%s) - s )) s, $(passed "$work/ci.log") tests passed"
for i in 2 3 4 5; do
  s=$(date +%s); cargo test > "$work/run$i.log" 2>&1; rc=$?
  echo "run $i (idle): rc=$rc $(( $(date +%s) - s )) s, $(passed "$work/run$i.log") tests passed"
done
sh -c 'while :; do :; done' & b1=$!
sh -c 'while :; do :; done' & b2=$!
trap 'kill $b1 $b2 2>/dev/null' EXIT
for i in 6 7 8; do
  s=$(date +%s); cargo test > "$work/run$i.log" 2>&1; rc=$?
  echo "run $i (2 burners): rc=$rc $(( $(date +%s) - s )) s, $(passed "$work/run$i.log") tests passed"
done
kill $b1 $b2
s=$(date +%s)
DATABASE_URL=postgres://nobody@127.0.0.1:1/real_ledger cargo run --release -q -p ledger-demo -- demo > "$work/demo.log" 2>&1
echo "demo (DATABASE_URL set and ignored): rc=$? $(( $(date +%s) - s )) s"
sleep 3
echo "leftover processes:"
ps -eo pid,user,cmd | grep -E "ledger-worker|ledger-demo|ledger-pg|postgres" | grep -v grep || echo none
echo "leftover clusters:"; ls -d /tmp/ledger-pg-* 2>/dev/null || echo none
