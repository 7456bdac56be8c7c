#!/usr/bin/env bash
# Makes sure a Kafka API answers on 127.0.0.1:9092 for the local stack and the tests: tansu
# (an Apache Kafka-compatible broker from crates.io; Apache Kafka itself is what
# docker-compose.yml runs), installed with cargo when missing (about 15 minutes the first
# time on 2 cores) and started when not answering. Its storage is in memory: a restart
# empties it. Logs: .run/logs/tansu.log.
#   scripts/kafka.sh            installs tansu if missing, starts it if not answering
#   scripts/kafka.sh --install  only installs it (test.sh and dev-up.sh run this in the
#                               background while they build the workspace)
set -euo pipefail
cd "$(dirname "$0")/.."

port=${KAFKA_PORT:-9092}
answering() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if [ "${1:-}" != --install ] && answering; then
  exit 0
fi
if ! command -v tansu >/dev/null 2>&1; then
  echo "kafka: installing tansu 0.6 (cargo install; 15 to 30 minutes the first time)"
  cargo install tansu --version '^0.6' --locked --features dynostore
fi
[ "${1:-}" = --install ] && exit 0
mkdir -p .run/logs .run/pids
echo "kafka: starting tansu on 127.0.0.1:$port"
nohup tansu broker \
  --listener-url "tcp://127.0.0.1:$port" \
  --advertised-listener-url "tcp://127.0.0.1:$port" \
  --storage-engine memory://tansu/ >.run/logs/tansu.log 2>&1 &
echo $! >.run/pids/tansu.pid
for _ in $(seq 1 100); do
  answering && exit 0
  sleep 0.2
done
echo "kafka: tansu did not answer on $port; see .run/logs/tansu.log" >&2
tail -n 20 .run/logs/tansu.log >&2 || true
exit 1
