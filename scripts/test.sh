#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and property tests, and the integration suite
# against the real PostgreSQL and Redis (including the real binaries end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
scripts/test-tools.sh
# The Kafka API: tansu's first install (a cargo build of its own, 15 to 30 minutes on 2 cores)
# runs while the workspace is checked and built; the tests wait for it.
mkdir -p .run/logs
command -v tansu >/dev/null 2>&1 ||
  echo "== installing tansu in the background (log: .run/logs/tansu-install.log)"
scripts/kafka.sh --install >.run/logs/tansu-install.log 2>&1 &
kafka_install=$!
trap 'kill "$kafka_install" 2>/dev/null || true' EXIT

# databases left by earlier runs (each test makes its own, named bft_<uuid>; a scenario run,
# scenario_<run id>)
psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc \
  "select datname from pg_database where datname like 'bft\_%' or datname like 'scenario\_%'" |
  while read -r db; do psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "drop database if exists \"$db\" with (force)"; done
# and the roles of the least-privilege test (bft_mig_*, bft_app_*)
psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc \
  "select rolname from pg_roles where rolname like 'bft\_%'" |
  while read -r role; do psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "drop role if exists \"$role\""; done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# the oldest rustc the workspace says it builds with (rust-version; the Docker image's builder):
# a test keeps it in step with the lock file, this keeps the code building with it
msrv=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
if rustup toolchain install "$msrv" --profile minimal >.run/logs/rustup-msrv.log 2>&1; then
  echo "== cargo +$msrv check (the workspace's rust-version)"
  cargo "+$msrv" check --workspace --all-targets --locked
else
  echo "== rustc $msrv cannot be installed here (see .run/logs/rustup-msrv.log): the workspace is not built with its rust-version"
fi
echo "== build binaries (the end-to-end test runs them)"
cargo build --workspace --bins --locked
waited=0
while kill -0 "$kafka_install" 2>/dev/null; do
  if [ $((waited % 30)) = 0 ]; then
    echo "== waiting for tansu's install: $(grep -a Compiling .run/logs/tansu-install.log | tail -n 1 | sed 's/^ *//')"
  fi
  sleep 1
  waited=$((waited + 1))
done
if ! wait "$kafka_install"; then
  echo "kafka: installing tansu failed:" >&2
  tail -n 30 .run/logs/tansu-install.log >&2
  exit 1
fi
scripts/kafka.sh
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
