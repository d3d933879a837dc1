#!/usr/bin/env bash
# Starts the services the tests use when they are not already running: Mosquitto on 127.0.0.1:1883 and,
# where installed, PostgreSQL on 127.0.0.1:5432. Prints what it found or started.
set -uo pipefail
cd "$(dirname "$0")/.."

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if port_open 1883; then
  echo "services: mosquitto already listening on 127.0.0.1:1883"
elif command -v mosquitto >/dev/null 2>&1; then
  mosquitto -d -p 1883 >/dev/null 2>&1 || mosquitto -d -c /etc/mosquitto/mosquitto.conf
  for _ in $(seq 50); do port_open 1883 && break; sleep 0.1; done
  port_open 1883 && echo "services: started mosquitto on 127.0.0.1:1883" || echo "services: mosquitto did not start"
fi

if port_open 5432; then
  echo "services: postgresql already listening on 127.0.0.1:5432"
elif command -v pg_ctlcluster >/dev/null 2>&1 && ls /etc/postgresql >/dev/null 2>&1; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start >/dev/null 2>&1 || true
  for _ in $(seq 50); do port_open 5432 && break; sleep 0.2; done
  port_open 5432 && echo "services: started postgresql on 127.0.0.1:5432" || echo "services: postgresql did not start"
fi
# A PostgreSQL that scripts/setup.sh installed itself has no `test` database and refuses password-less TCP
# logins: create both (a server that came with the machine is left as it is).
if [[ -f .venv-state/postgres-installed-by-setup ]] && port_open 5432; then
  su postgres -c "psql -qtAc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null 2>&1 || true
  su postgres -c "psql -qtAc \"SELECT 1 FROM pg_database WHERE datname = 'test'\"" 2>/dev/null | grep -q 1 \
    || su postgres -c "createdb test" >/dev/null 2>&1 || true
fi
exit 0
