#!/usr/bin/env bash
# Sets up (scripts/setup.sh), starts the services (scripts/services.sh) and runs the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/sdk -k profile
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEOPT_SETUP_TORCH=${EDGEOPT_SETUP_TORCH:-1} EDGEOPT_SETUP_ARM=${EDGEOPT_SETUP_ARM:-1} scripts/setup.sh
scripts/services.sh
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -z "${EDGEOPT_TEST_POSTGRES_URL:-}" ]] && port_open 5432; then
  # the password only matters where setup.sh installed PostgreSQL itself (trust auth ignores it)
  export EDGEOPT_TEST_POSTGRES_URL="postgresql+psycopg://postgres:postgres@127.0.0.1:5432/test"
fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [[ $rc == 5 ]]; then
  echo "error: pytest collected no tests; failing on purpose (exit 5 must not pass silently)" >&2
  exit 1
fi
exit $rc
