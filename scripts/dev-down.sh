#!/usr/bin/env bash
# Stops the binaries started by scripts/dev-up.sh (SIGTERM: they drain and exit).
set -uo pipefail
cd "$(dirname "$0")/.."
for f in .run/pids/*.pid; do
  [ -e "$f" ] || continue
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null && echo "stopping $(basename "$f" .pid) ($pid)"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$f"
done
