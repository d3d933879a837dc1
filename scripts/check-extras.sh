#!/usr/bin/env bash
# Installs edgeopt with each extra ALONE in a fresh virtual environment (non-editable, from the wheel
# `pip wheel .` builds) and starts its entry points (scripts/extras_smoke.py says what each must do):
#   core                 edgeopt --help, verify (the pure-Python contracts), package names [sdk]
#   sdk                  edgeopt package (cpu, int8) and inspect
#   agent                edgeopt-agent starts with no runtime; probe and install name the agent-<runtime> extra
#   agent-<runtime>      the agent starts with that one runtime, installs and serves its package; others named
#   dashboard            init-db, create-user, create_app: healthz, login, verified package upload
#   all                  sdk, dashboard and the agent with all three runtimes
# Nothing is skipped; a failure names the extra and the step. Every wheel the extras need is kept in
# .cache/pip/extras-wheelhouse (`pip download` fetches only what is missing there; pip's own HTTP cache
# does not keep these downloads here), and the venvs install from it with --no-index: after the first run
# this is install time only. The wall time is printed at the end.
# Usage: scripts/check-extras.sh [EXTRA ...]   (default: all of the above; needs .venv from scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_CACHE_DIR="$PWD/.cache/pip" PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
started=$(date +%s)
extras=("$@")
((${#extras[@]})) || extras=(core sdk agent agent-onnxruntime agent-openvino agent-tflite dashboard all)

work=$(mktemp -d "${TMPDIR:-/tmp}/edgeopt-extras.XXXXXX")
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/edgeopt-*.whl)
wheelhouse=.cache/pip/extras-wheelhouse
mkdir -p "$wheelhouse"
t0=$(date +%s)
# `all` holds every other extra, so one resolution brings every wheel any extra alone needs.
.venv/bin/python -m pip download -q -d "$wheelhouse" "$wheel[all]" 2>"$work/download.log" || {
  echo "check-extras: pip download failed:"; grep -v "^WARNING: Location" "$work/download.log" | tail -20; exit 1; }
echo "check-extras: wheelhouse ready in $(($(date +%s) - t0)) s ($(du -sm "$wheelhouse" | cut -f1) MB)"
# The test packages are built once with the full dev environment: an agent-only venv has no SDK to build them.
.venv/bin/python scripts/extras_smoke.py make-packages "$work/pkgs" >/dev/null

failed=()
for extra in "${extras[@]}"; do
  t0=$(date +%s)
  venv="$work/venv-$extra"
  .venv/bin/python -m venv "$venv"
  spec="$wheel[$extra]"
  [[ $extra == core ]] && spec="$wheel"
  # --no-compile: byte-compiling every module of the big wheels costs more than the imports save here.
  if ! "$venv/bin/python" -m pip install -q --no-compile --no-index --find-links "$wheelhouse" "$spec" \
      2>"$work/pip-$extra.log"; then
    echo "check-extras: [$extra] pip install failed:"; grep -v "^WARNING: Location" "$work/pip-$extra.log" | tail -20
    failed+=("$extra"); continue
  fi
  t1=$(date +%s)
  echo "check-extras: [$extra] installed alone in $((t1 - t0)) s ($(du -sm "$venv" | cut -f1) MB); starting its entry points"
  if ! "$venv/bin/python" scripts/extras_smoke.py check "$extra" "$work/pkgs"; then
    failed+=("$extra")
  fi
  echo "check-extras: [$extra] done in $(($(date +%s) - t0)) s"
  rm -rf "$venv"
done
echo "check-extras: ${#extras[@]} extras in $(($(date +%s) - started)) s wall time"
if ((${#failed[@]})); then
  echo "check-extras: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "check-extras: all passed"
