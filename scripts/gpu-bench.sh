#!/usr/bin/env bash
# On a lent NVIDIA machine (the `device` tool's nvidia-h200): install onnxruntime-gpu from the chunks that
# ../shared/tools/gpu-wheel-chunks made (assembled in /tmp/gw), edgeopt's own dependencies from .whl/, edgeopt
# itself, then run benchmarks/gpu_profile.py on the package in .whl/. Figures go to $OUT (or /tmp/out).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [[ ! -d /tmp/site/onnxruntime ]]; then
  cat /tmp/gw/part* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    /tmp/onnxruntime_gpu-*.whl .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
N=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
LD_LIBRARY_PATH=$(ls -d $N/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
[[ -f /tmp/resnet18.onnx ]] || python3 tests/assets/make_resnet18.py /tmp/resnet18.onnx >/dev/null
python3 benchmarks/gpu_profile.py --package .whl/resnet18-gpu.eopkg --public-key .whl/edgeopt.pub \
  --fp32 /tmp/resnet18.onnx $(for f in .whl/fallback-*.eopkg; do [[ -f $f ]] && echo --fallback-package $f; done) --batches "${BATCHES:-1,8,32}" --json "$OUT/gpu_profile.json" "$@" 2>&1 | tee "$OUT/gpu_profile.log"
