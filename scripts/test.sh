#!/usr/bin/env bash
# Runs every test: formatting, lints, unit and property tests, and the integration suite
# against the real PostgreSQL and Redis (including the real binaries end to end).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh

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
cargo test --workspace --locked
