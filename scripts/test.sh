#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and property tests, and the integration suite
# against the real PostgreSQL and Redis (including the real binaries end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/browser.sh
scripts/kafka.sh

# databases left by earlier runs (each test makes its own, named bft_<uuid>)
psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc \
  "select datname from pg_database where datname like 'bft\_%'" |
  while read -r db; do psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "drop database if exists \"$db\" with (force)"; done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== build binaries (the end-to-end test runs them)"
cargo build --workspace --bins --locked
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked 2>&1 | tee "$log" || status=$?
# cargo prints one "test result" line per test binary, the last often an empty doc-test run;
# close with the total so the summary is unambiguous
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
