#!/usr/bin/env bash
# Brings the whole local stack up: PostgreSQL and Redis (started if not answering), a Kafka
# API (tansu, installed and started if missing), the database (owned by bar_migrator, which
# db-migrate runs the migrations as), the binaries (as bar_app: rows only, no DDL), and
# prints the URLs.
# Stop it with scripts/dev-down.sh. Logs: .run/logs/, pids: .run/pids/.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh
DB=${DB_NAME:-bar_fulfillment}
psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc "select 1 from pg_database where datname = '$DB'" | grep -q 1 ||
  psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "create database $DB owner bar_migrator"

mkdir -p .run/logs .run/pids
# the Kafka API (tansu): its first install builds while the workspace does
command -v tansu >/dev/null 2>&1 ||
  echo "installing tansu in the background (15 to 30 minutes the first time; log: .run/logs/tansu-install.log)"
scripts/kafka.sh --install >.run/logs/tansu-install.log 2>&1 &
kafka_install=$!
echo "building (release)..."
cargo build --release --bins --locked -q
if ! wait "$kafka_install"; then
  echo "installing tansu failed:" >&2
  tail -n 30 .run/logs/tansu-install.log >&2
  exit 1
fi
scripts/dev-down.sh >/dev/null 2>&1 || true
scripts/kafka.sh

# migrations as the database's owner (bar_migrator for a database this script made), then
# the services as the application role, which cannot change the schema
owner=$(psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc "select pg_get_userbyid(datdba) from pg_database where datname = '$DB'")
MIGRATION_DATABASE_URL=${MIGRATION_DATABASE_URL:-postgres://$owner@127.0.0.1:5432/$DB} \
  APP_DB_ROLE=${APP_DB_ROLE:-bar_app} target/release/db-migrate >.run/logs/db-migrate.log 2>&1 ||
  { echo "db-migrate failed; see .run/logs/db-migrate.log" >&2; tail -n 20 .run/logs/db-migrate.log >&2; exit 1; }
export DATABASE_URL=${DATABASE_URL:-postgres://bar_app@127.0.0.1:5432/$DB}
export RUN_MIGRATIONS=false
export REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
# the local stack runs on the documented development secrets, which the services refuse
# unless told this is development
export ALLOW_DEV_SECRETS=${ALLOW_DEV_SECRETS:-true}
start() { # name
  nohup "target/release/$1" >".run/logs/$1.log" 2>&1 &
  echo $! >".run/pids/$1.pid"
}
wait_ready() { # name url
  for _ in $(seq 1 100); do
    curl -fsS "$2/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$(cat ".run/pids/$1.pid")" 2>/dev/null || { echo "$1 exited; see .run/logs/$1.log" >&2; tail -n 20 ".run/logs/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  echo "$1 not ready; see .run/logs/$1.log" >&2; exit 1
}
start prelock-service;      wait_ready prelock-service http://127.0.0.1:8081
start payment-gateway-sim;  wait_ready payment-gateway-sim http://127.0.0.1:8090
start order-api;            wait_ready order-api http://127.0.0.1:8080
start scheduler;            wait_ready scheduler http://127.0.0.1:8082
start compensation-worker;  wait_ready compensation-worker http://127.0.0.1:8083
start event-relay;          wait_ready event-relay http://127.0.0.1:8084

cat <<MSG
bar-fulfillment is up:
  order-api            http://127.0.0.1:8080   (OpenAPI: http://127.0.0.1:8080/openapi.json)
  prelock-service      http://127.0.0.1:8081
  scheduler            http://127.0.0.1:8082   (runs the follow-up jobs: expiry, stock, voucher, notify)
  compensation-worker  http://127.0.0.1:8083   (finds paid payments whose callback was lost; console: /ops/)
  event-relay          http://127.0.0.1:8084   (outbox -> Kafka bar.order.events.v1; the bar-dashboard projection)
  kafka (tansu)        127.0.0.1:9092
  payment-gateway-sim  http://127.0.0.1:8090
  metrics              each service's /metrics; health /healthz, /readyz
  database             $DATABASE_URL
Credentials (development secrets; each kind opens only its own routes):
  buyer     target/release/loadgen token alice                    (AUTH_JWT_SECRET)
  operator  target/release/loadgen token --operator dora          (STAFF_JWT_SECRET; stock admin,
            consoles, schedules; the audit records "dora")
  bar staff target/release/loadgen token --store bar-1 barkeep    (STAFF_JWT_SECRET; redeems
            bar-1's vouchers only)
  services  SERVICE_TOKEN=dev-service-token                       (service-to-service only)
Try it:
  OPS=\$(target/release/loadgen token --operator dora)
  curl -X PUT localhost:8081/v1/skus/sku-1 -H "Authorization: Bearer \$OPS" \\
       -H 'Content-Type: application/json' -d '{"store_id":"bar-1","price_cents":9900,"stock":100}'
  TOKEN=\$(target/release/loadgen token alice)
  curl -X POST localhost:8080/v1/orders -H "Authorization: Bearer \$TOKEN" -H 'Idempotency-Key: k1' \\
       -H 'Content-Type: application/json' -d '{"sku_id":"sku-1","store_id":"bar-1","quantity":2}'
Stop: scripts/dev-down.sh
MSG
