#!/usr/bin/env bash
# Mutation testing of the critical modules (docs/mutation.md). Not part of every CI run: it takes a while.
#   scripts/mutation.sh                      every module in scripts/mutation.py's MODULES
#   scripts/mutation.sh accuracy security    some modules
#   scripts/mutation.sh --tests-from REV     the same with the tests of an older revision ("before" score)
# Writes test-artifacts/mutation/REPORT.md. Works from a clean checkout: it runs scripts/setup.sh when there is
# no .venv yet, and installs its pinned tool into .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
MUTMUT_VERSION=2.5.1
if [[ ! -x .venv/bin/python ]]; then
  EDGEOPT_SETUP_BROWSER=0 scripts/setup.sh
fi
if [[ "$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("mutmut"))' 2>/dev/null)" != "$MUTMUT_VERSION" ]]; then
  echo "mutation: installing mutmut==$MUTMUT_VERSION into .venv"
  .venv/bin/python -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
exec .venv/bin/python scripts/mutation.py "$@"
