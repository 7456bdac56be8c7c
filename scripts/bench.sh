#!/usr/bin/env bash
# Latency of "buy now" under a burst, on the local stack (release build), as ratios to a
# baseline measured in the same run. Brings the stack up first if it is not running.
#   scripts/bench.sh [--buyers 2000] [--concurrency 64] [--stock 1000]
# The job engine's benchmark (fire delay, burn-down, graphile-worker, the pgbench ceiling):
#   scripts/bench.sh jobs [--rate 1000] [--secs 60] [--jobs 100000] [--workers 16]
# The event relay against a bare rdkafka producer, and the outbox lag under load:
#   scripts/bench.sh events [--events 200000] [--repeat 7] [--writers 8] [--secs 20]
# The compensation chaos run, early first check against the plain 30 s poll:
#   scripts/bench.sh compensation [--orders 2000]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = jobs ]; then
  shift
  exec scripts/bench-jobs.sh "$@"
fi
if [ "${1:-}" = events ]; then
  shift
  exec scripts/bench-events.sh "$@"
fi
if [ "${1:-}" = compensation ]; then
  shift
  exec scripts/bench-compensation.sh "$@"
fi
curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1 || scripts/dev-up.sh >/dev/null
cargo build --release --bins --locked -q
exec target/release/loadgen burst --sku "sku-bench-$(date +%s)" "$@"
