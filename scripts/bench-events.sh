#!/usr/bin/env bash
# The event relay's benchmark (called as `scripts/bench.sh events`), on the local Postgres and
# Kafka API (tansu) in one run: a bare rdkafka producer sending the outbox's messages against
# the relay publishing the same rows (read, send, record its position), and the outbox lag
# while writers insert outbox rows at full speed. Prints the figures and the ratio.
#   scripts/bench.sh events [--events 200000] [--repeat 7] [--writers 8] [--secs 20]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/services.sh
scripts/kafka.sh
cargo build --release -p event-relay --locked -q
admin=postgres://postgres@127.0.0.1:5432/postgres
db=bench_events
psql -q "$admin" -c "drop database if exists $db with (force)" -c "create database $db"
DATABASE_URL=postgres://postgres@127.0.0.1:5432/$db PG_MAX_CONNECTIONS=24 PG_STATEMENT_TIMEOUT_MS=300000 \
  target/release/relay-bench "$@"
