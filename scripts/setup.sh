#!/usr/bin/env bash
# Installs what edgeopt needs from nothing: system packages (apt-get, only when missing), then a virtual
# environment in .venv with the project and its extras. Safe to run again; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

want=()
command -v mosquitto >/dev/null 2>&1 || want+=(mosquitto mosquitto-clients)
# systemd-analyze checks the agent's unit file in tests/agent/test_config.py
command -v systemd-analyze >/dev/null 2>&1 || want+=(systemd)
if [[ "${EDGEOPT_SETUP_BROWSER:-1}" == 1 ]]; then
  command -v chromium >/dev/null 2>&1 || want+=(chromium)
fi
if [[ "${EDGEOPT_SETUP_POSTGRES:-0}" == 1 ]]; then
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    want+=(postgresql)
    # scripts/services.sh then creates the `test` database and a password for TCP logins
    mkdir -p .venv-state && touch .venv-state/postgres-installed-by-setup
  fi
fi
if ((${#want[@]})); then
  if [[ $(id -u) == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
  echo "setup: installing system packages: ${want[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.edgeopt-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp || setup.py -nt $stamp ]]; then
  echo "setup: installing edgeopt[all,test] into .venv (first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[all,test]'
  touch "$stamp"
fi
# PyTorch is an optional extra (the SDK's torch.nn.Module input, the PyTorch-eager benchmark baseline); the
# test set-up installs the CPU build so those paths are tested, never skipped. Runtime code never needs it.
if [[ "${EDGEOPT_SETUP_TORCH:-0}" == 1 ]] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch==2.13.0 (CPU build) for the tests"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
# The emulated 64-bit ARM device for the `arm` profile's tests (tests/integration/test_arm_emulated.py):
# qemu-user-static, an aarch64 sysroot and the agent's aarch64 wheels in .cache/arm-sysroot. Cached and
# idempotent; about a minute from nothing. scripts/test.sh asks for it.
if [[ "${EDGEOPT_SETUP_ARM:-0}" == 1 ]]; then
  scripts/arm-sysroot.sh
fi
# Language models (package --task text-generation) need the [llm] extra and optimum-intel without its
# dependencies (they name torchvision, whose PyPI wheel is a CUDA build that fails beside the CPU torch).
if [[ "${EDGEOPT_SETUP_TORCH:-0}" == 1 ]] && ! .venv/bin/python -c "import optimum.intel, openvino_genai, gguf" \
    >/dev/null 2>&1; then
  echo "setup: installing the [llm] extra and optimum-intel (--no-deps)"
  .venv/bin/python -m pip install -q -e '.[llm]'
  .venv/bin/python -m pip install -q --no-deps "optimum-intel==2.2.0"
fi
# Pruning (edgeopt prune, package --prune) needs the [prune] extra; with torch already there it adds only
# torch-pruning (pip keeps the CPU build of torch installed above).
if [[ "${EDGEOPT_SETUP_TORCH:-0}" == 1 ]] && ! .venv/bin/python -c "import torch_pruning" >/dev/null 2>&1; then
  echo "setup: installing the [prune] extra (torch-pruning)"
  .venv/bin/python -m pip install -q -e '.[prune]'
fi
