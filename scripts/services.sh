#!/usr/bin/env bash
# Makes sure PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379) are answering: installs
# them from Debian's packages if they are missing, starts them if they are down, and waits.
set -euo pipefail

need_install=()
command -v pg_ctlcluster >/dev/null 2>&1 || need_install+=(postgresql)
command -v redis-server >/dev/null 2>&1 || need_install+=(redis-server)
if [ ${#need_install[@]} -gt 0 ]; then
  echo "services: installing ${need_install[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_install[@]}" >/dev/null
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "services: starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi

for _ in $(seq 1 60); do
  if pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    # trust auth for the local role the tests use (a fresh Debian cluster asks for passwords
    # over TCP); only touched when a password would be needed
    if ! psql "postgres://postgres@127.0.0.1:5432/postgres" -Atc 'select 1' >/dev/null 2>&1; then
      echo "services: PostgreSQL refuses passwordless TCP logins for 'postgres'; see README.md" >&2
      exit 1
    fi
    # least privilege: bar_migrator owns the schema and runs the migrations (db-migrate);
    # the services connect as bar_app, which may only read and write rows
    psql -q "postgres://postgres@127.0.0.1:5432/postgres" -c "DO \$\$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bar_migrator') THEN CREATE ROLE bar_migrator LOGIN; END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bar_app') THEN CREATE ROLE bar_app LOGIN; END IF;
      END \$\$" 2>/dev/null || true
    exit 0
  fi
  sleep 1
done
echo "services: PostgreSQL or Redis did not come up within 60 s" >&2
exit 1
