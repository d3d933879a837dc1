#!/usr/bin/env bash
# Builds an emulated 64-bit ARM (aarch64) device on this x86-64 Debian/Ubuntu machine, for the `arm` profile:
#   CACHE/sysroot/  Debian bookworm's aarch64 CPython 3.11 and the C libraries it loads (arm64 .debs unpacked
#                   with dpkg -x: installing python3.11:arm64 with apt would conflict with the host's Python)
#   CACHE/site/     the agent's aarch64 site-packages (aarch64 wheels from PyPI, scripts/arm-requirements.txt)
#   CACHE/ready     written last; names what was built (its content decides whether a re-run rebuilds)
# and runs nothing but a smoke check. qemu-aarch64-static (Debian's qemu-user-static) runs the programs:
#   qemu-aarch64-static -L CACHE/sysroot CACHE/sysroot/usr/bin/python3.11 ...
# edgeopt.sdk.emulation does that for the SDK (edgeopt package --validate-on aarch64) and the tests.
#
# Usage: scripts/arm-sysroot.sh [--check] [CACHE]     (CACHE defaults to $EDGEOPT_ARM_SYSROOT or .cache/arm-sysroot)
# Idempotent: a second run with the same inputs does nothing; a changed pin rebuilds into a new folder and
# swaps it in, so an interrupted run never leaves a half-built sysroot behind. --check only reports.
# Needs root (or sudo) the first time: apt-get installs qemu-user-static, and `dpkg --add-architecture arm64`
# adds arm64 to this machine's apt configuration (only the package lists; nothing arm64 gets installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1

check_only=0
if [[ "${1:-}" == "--check" ]]; then check_only=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0; fi
CACHE=${1:-${EDGEOPT_ARM_SYSROOT:-.cache/arm-sysroot}}
REQS=scripts/arm-requirements.txt
PY=${PYTHON:-.venv/bin/python}
[[ -x $PY ]] || PY=python3

# Debian bookworm's packages, pinned to the release rather than to exact versions: the archive keeps only the
# current security update of each (libc6, libssl3, python3.11 move), so an exact pin would stop resolving.
# The release fixes what matters: CPython 3.11.2 (the wheels below are cp311) and glibc 2.36 (the wheels'
# manylinux tags up to 2_36 load). The versions taken are written to CACHE/ready.
DEBS=(python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libc6 libexpat1 zlib1g libssl3 libffi8
      libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1 libdb5.3
      libgdbm6 libstdc++6 libgcc-s1 libnsl2 libtirpc3
      # libnsl2/libtirpc3 load Kerberos (GSS-API) at start-up
      libgssapi-krb5-2 libkrb5-3 libk5crypto3 libkrb5support0 libcom-err2 libkeyutils1)
# pip expands no manylinux tag to older ones for --platform: list every glibc a wheel may be tagged for (<= 2.36).
PLATFORMS=(manylinux2014_aarch64 manylinux_2_17_aarch64 manylinux_2_24_aarch64 manylinux_2_26_aarch64
           manylinux_2_27_aarch64 manylinux_2_28_aarch64 manylinux_2_31_aarch64 manylinux_2_34_aarch64
           manylinux_2_35_aarch64 manylinux_2_36_aarch64)

if [[ $(id -u) == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
# As root, apt's download sandbox user (_apt) cannot write into the cache folder: download as the caller.
APT=(apt-get -o DPkg::Lock::Timeout=600 -o Acquire::Retries=3 -o APT::Sandbox::User=root)
inputs_hash=$( { cat "$0" "$REQS"; } | sha256sum | cut -c1-16)

ready_ok() { [[ -f $CACHE/ready ]] && grep -qx "inputs $inputs_hash" "$CACHE/ready" && [[ -x $CACHE/sysroot/usr/bin/python3.11 ]]; }

if ((check_only)); then
  if ready_ok && command -v qemu-aarch64-static >/dev/null; then echo "arm-sysroot: ready in $CACHE"; exit 0; fi
  echo "arm-sysroot: not built (or built from other pins) in $CACHE; run scripts/arm-sysroot.sh" >&2; exit 1
fi

if ! command -v qemu-aarch64-static >/dev/null 2>&1; then
  echo "arm-sysroot: installing qemu-user-static"
  $SUDO "${APT[@]}" update -qq
  # no binfmt-support: the emulator is always called by name, never registered for every aarch64 binary
  $SUDO "${APT[@]}" install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi

if ready_ok; then
  echo "arm-sysroot: up to date in $CACHE ($(grep -m1 '^qemu ' "$CACHE/ready" | cut -d' ' -f2-))"
else
  started=$SECONDS
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "arm-sysroot: adding arm64 to apt's architectures (package lists only)"
    $SUDO dpkg --add-architecture arm64
  fi
  if ! apt-cache show libc6:arm64 >/dev/null 2>&1; then
    $SUDO "${APT[@]}" update -qq
  fi
  mkdir -p "$CACHE"
  build=$(mktemp -d "$CACHE/.build.XXXXXX")
  trap 'rm -rf "$build"' EXIT
  mkdir -p "$build/debs" "$build/sysroot"
  echo "arm-sysroot: downloading ${#DEBS[@]} arm64 packages"
  # Stale package lists name versions the mirror no longer has (security updates replace them): refresh
  # the lists and try once more.
  if ! (cd "$build/debs" && "${APT[@]}" download -qq "${DEBS[@]/%/:arm64}"); then
    echo "arm-sysroot: download failed; refreshing apt's package lists and retrying once"
    $SUDO "${APT[@]}" update -qq
    (cd "$build/debs" && "${APT[@]}" download -qq "${DEBS[@]/%/:arm64}")
  fi
  for deb in "$build"/debs/*.deb; do dpkg -x "$deb" "$build/sysroot"; done
  # Debian's site.py adds /usr/lib/python3/dist-packages and /usr/local/lib/python3.11/dist-packages; under
  # qemu -L a path missing from the sysroot falls through to the host's, whose x86 modules must never load.
  mkdir -p "$build/sysroot/usr/lib/python3/dist-packages" "$build/sysroot/usr/local/lib/python3.11/dist-packages"
  echo "arm-sysroot: installing the agent's aarch64 wheels ($REQS)"
  plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
  # --no-warn-conflicts: the host venv's packages are another environment, not this one's
  "$PY" -m pip install -q --no-warn-conflicts --only-binary=:all: "${plat[@]}" --python-version 3.11 --implementation cp \
      --target "$build/site" -r "$REQS" 2> >(grep -v "is ignored: it is neither" >&2)
  {
    echo "inputs $inputs_hash"
    echo "qemu $(qemu-aarch64-static --version | head -1)"
    for deb in "$build"/debs/*.deb; do echo "deb $(dpkg-deb --show --showformat='${Package} ${Version}' "$deb")"; done
    "$PY" -m pip list --path "$build/site" --format freeze 2>/dev/null | sed 's/^/wheel /'
    echo "built_seconds $((SECONDS - started))"
  } >"$build/ready.tmp"
  rm -rf "$build/debs"
  # swap in: the old tree goes only after the new one is complete
  rm -rf "$CACHE/sysroot.old" "$CACHE/site.old"
  [[ -d $CACHE/sysroot ]] && mv "$CACHE/sysroot" "$CACHE/sysroot.old"
  [[ -d $CACHE/site ]] && mv "$CACHE/site" "$CACHE/site.old"
  rm -f "$CACHE/ready"
  mv "$build/sysroot" "$CACHE/sysroot" && mv "$build/site" "$CACHE/site"
  mv "$build/ready.tmp" "$CACHE/ready"
  rm -rf "$CACHE/sysroot.old" "$CACHE/site.old" "$build"
  trap - EXIT
  echo "arm-sysroot: built in $((SECONDS - started)) s"
fi

# Smoke check: the emulated interpreter is aarch64 and imports both runtimes of the `arm` profile.
env -i PATH=/usr/bin:/bin PYTHONPATH="$CACHE/site" PYTHONNOUSERSITE=1 \
  qemu-aarch64-static -L "$CACHE/sysroot" "$CACHE/sysroot/usr/bin/python3.11" -c '
import platform, onnxruntime, ai_edge_litert.interpreter
from importlib.metadata import version
litert = version("ai-edge-litert")
print(f"arm-sysroot: {platform.machine()} CPython {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
      f"ai-edge-litert {litert}")
assert platform.machine() == "aarch64", platform.machine()'
