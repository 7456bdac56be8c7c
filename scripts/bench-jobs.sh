#!/usr/bin/env bash
# Job engine benchmark, all on the local Postgres in one run (called as `scripts/bench.sh jobs`):
#   1. fire delay: RATE jobs/s, each due 2 s after its insert, for SECS seconds: p50/p99/max
#      and the on-time rate (started within 100 ms of due);
#   2. burn-down: JOBS jobs all due now: jobs/s;
#   3. both again with graphile-worker (npm, bench/graphile) at the same concurrency, with its
#      local queue and batched completion;
#   4. the ceiling: pgbench running the engine's bare claim and complete statements
#      (bench/claim_complete.sql) on the same backlog;
#   5. what a NOTIFY costs a one-job insert transaction (as order creation writes them).
# Prints each figure, then the ratios.
#   scripts/bench.sh jobs [--rate 1000] [--secs 60] [--jobs 100000] [--workers 16]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=1000 secs=60 jobs=100000 workers=16
while [ $# -gt 0 ]; do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --secs) secs=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --workers) workers=$2; shift 2 ;;
    *) echo "unknown option $1 (--rate, --secs, --jobs, --workers)" >&2; exit 2 ;;
  esac
done

scripts/services.sh
command -v node >/dev/null || { echo "bench: node and npm are needed for the graphile-worker baseline" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "bench: pgbench (PostgreSQL's) is needed for the ceiling" >&2; exit 1; }
echo "== building job-bench (release)" >&2
cargo build --release -p job-bench --locked -q
if [ ! -d bench/graphile/node_modules/graphile-worker ]; then
  echo "== installing graphile-worker" >&2
  (cd bench/graphile && npm install --no-audit --no-fund --silent)
fi

admin=postgres://postgres@127.0.0.1:5432/postgres
ours=postgres://postgres@127.0.0.1:5432/bench_jobs_ours
theirs=postgres://postgres@127.0.0.1:5432/bench_jobs_graphile
for db in bench_jobs_ours bench_jobs_graphile; do
  psql -q "$admin" -c "drop database if exists $db with (force)" -c "create database $db"
done

results=$(mktemp)
trap 'rm -f "$results"' EXIT
# run LABEL COMMAND...: keeps the RESULT line, prefixed with LABEL
run() {
  local label=$1; shift
  echo "== $label" >&2
  "$@" | sed -n "s/^RESULT /$label /p" | tee -a "$results"
}
# get LABEL KEY
get() { awk -v l="$1" -v k="$2" '$1 == l { for (i = 3; i <= NF; i++) { split($i, kv, "="); if (kv[1] == k) print kv[2] } }' "$results"; }

run ours.fire target/release/job-bench fire "$ours" "$rate" "$secs" 2000 "$workers"
run graphile.fire node bench/graphile/bench.js fire "$theirs" "$rate" "$secs" 2000 "$workers"
# each burn-down starts from a checkpoint, so none pays for the WAL of the one before
checkpoint() { psql -q "$admin" -c "checkpoint"; }
checkpoint
run ours.burndown target/release/job-bench burndown "$ours" "$jobs" "$workers"
checkpoint
run graphile.burndown node bench/graphile/bench.js burndown "$theirs" "$jobs" "$workers"

echo "== ceiling: pgbench, bench/claim_complete.sql" >&2
psql -q "$ours" -c "truncate delayed_job, delayed_job_archive" \
  -c "insert into delayed_job (kind, payload, priority, run_at, max_attempts)
      select 'bench.noop', '{}', 1, now(), 3 from generate_series(1, $jobs)" \
  -c "vacuum analyze delayed_job"
clients=4
checkpoint
start=$(date +%s.%N)
pgbench -n -c "$clients" -j 2 -t $(( jobs / 500 / clients + 2 )) -f bench/claim_complete.sql "$ours" >/dev/null
end=$(date +%s.%N)
done_jobs=$(psql -At "$ours" -c "select count(*) from delayed_job_archive where state = 'completed'")
awk -v n="$done_jobs" -v s="$start" -v e="$end" 'BEGIN { printf "ceiling.burndown jobs=%d seconds=%.2f jobs_per_s=%.0f\n", n, e - s, n / (e - s) }' | tee -a "$results"

run ours.notify target/release/job-bench notify "$ours" 4000 8

echo
echo "== job engine vs graphile-worker and the bare ceiling (same Postgres, same run)"
printf '%-34s %12s %12s\n' "" "ours" "graphile"
for k in p50_ms p99_ms max_ms on_time_pct; do
  printf '%-34s %12s %12s\n' "fire delay $k" "$(get ours.fire $k)" "$(get graphile.fire $k)"
done
printf '%-34s %12s %12s\n' "burn-down jobs/s" "$(get ours.burndown jobs_per_s)" "$(get graphile.burndown jobs_per_s)"
awk -v o="$(get ours.burndown jobs_per_s)" -v g="$(get graphile.burndown jobs_per_s)" -v c="$(get ceiling.burndown jobs_per_s)" \
  -v op99="$(get ours.fire p99_ms)" -v gp99="$(get graphile.fire p99_ms)" -v q="$(get ours.notify ratio)" 'BEGIN {
  printf "burn-down: %.2fx graphile-worker (goal >= 2x), %.2fx the bare ceiling of %s jobs/s (goal >= 0.6x)\n", o / g, o / c, c
  printf "fire delay p99: ours %s ms, graphile-worker %s ms (goal < 20 ms, 100%% on time)\n", op99, gp99
  printf "a one-job insert transaction with NOTIFY runs at %.3fx the rate of one without\n", q
}'
