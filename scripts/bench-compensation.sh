#!/usr/bin/env bash
# The compensation chaos run (tests/integration/chaos.rs: 2,000 orders, 30 % of callbacks
# dropped, 10 % duplicated, 30 % of queries timing out, a worker SIGKILLed five times), once
# with the early first check (PAYMENT_FIRST_CHECK_MS=5000, the default) and once with the
# paper's plain 30 s poll (first check at 30 s), printing for each the time from "provider
# says paid" to PAID, and the 30 s run's p99 against the goal (35 s) and the paper (90 s).
#   scripts/bench.sh compensation [--orders 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
orders=2000
while [ $# -gt 0 ]; do
  case "$1" in
    --orders) orders="$2"; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
scripts/services.sh
cargo build --workspace --bins --locked -q
declare -A p99
for first in 5000 30000; do
  echo "== chaos run, first check at ${first} ms"
  log=$(mktemp)
  CHAOS_ORDERS=$orders CHAOS_FIRST_CHECK_MS=$first \
    cargo test -q -p integration-tests --test integration --locked -- chaos --nocapture 2>&1 | tee "$log" |
    grep -E '^chaos: (----|orders|callbacks|created|check|provider|  )' || true
  grep -q 'test result: ok' "$log" || { echo "chaos run failed; see $log" >&2; exit 1; }
  p99[$first]=$(awk '$1 == "chaos:" && $2 == "compensation" { print $6 }' "$log")
  rm -f "$log"
done
echo "== compensation: provider says paid -> PAID, p99"
awk -v early="${p99[5000]}" -v plain="${p99[30000]}" 'BEGIN {
  printf "early first check (5 s):  %8.0f ms\n", early
  printf "plain 30 s poll:          %8.0f ms  = %.2fx the 35 s goal, %.2fx the paper'"'"'s 90 s\n", plain, plain / 35000, plain / 90000
  printf "early check vs plain poll: %.2fx\n", early / plain
}'
