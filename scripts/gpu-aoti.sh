#!/usr/bin/env bash
# On a lent NVIDIA machine (the `device` tool's nvidia-h200): the gpu profile's torch-aoti package built there
# (AOTInductor compiles for the GPU it runs on), then benchmarks/gpu_aoti.py against torch.compile and the ONNX
# Runtime package. onnxruntime-gpu comes from the chunks ../shared/tools/gpu-wheel-chunks made (assembled in
# /tmp/gw); edgeopt's own dependencies, a signing key and the ONNX Runtime package from .whl/.
#   scripts/gpu-aoti.sh package     # build /tmp/r18/resnet18-aoti.eopkg (the summary JSON goes to $OUT);
#                                   # AOTI_BATCHES=1 (or 1,8) builds only those batch sizes
#   scripts/gpu-aoti.sh bench       # measure against torch.compile; figures to $OUT
#   scripts/gpu-aoti.sh http        # 16 HTTP clients, two agents serving the package: batching on vs off
#   scripts/gpu-aoti.sh probe       # which fresh processes can load a CUDA .pt2 (benchmarks/gpu_aoti_probe.py)
# The test model has random (seeded) weights: its logits are near-tied, so top-1 agreement is no judge of it
# (one flip in 16 samples); the package is gated on each output's cosine to fp32 (--task generic).
set -euo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/r18
if [[ ! -d /tmp/site/edgeopt ]]; then
  # onnxruntime-gpu only where its chunks were carried (the ONNX Runtime package's figures); packaging for
  # torch-aoti needs only the machine's own CPU onnxruntime (the fp32 reference).
  [[ -d /tmp/gw ]] && cat /tmp/gw/part* > /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls /tmp/onnxruntime_gpu-*.whl 2>/dev/null) .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/dev/null
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
N=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
LD_LIBRARY_PATH=$(ls -d $N/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export LD_LIBRARY_PATH
edgeopt() { python3 -m edgeopt.sdk.cli "$@"; }
case "${1:-}" in
  package)
    # AOTI_BATCHES=1 builds only those sizes (max-autotune per size costs minutes of a short device lease)
    profile=hardware_profiles/gpu.toml
    if [[ -n "${AOTI_BATCHES:-}" ]]; then
      profile=/tmp/r18/gpu.toml
      awk -v b="[${AOTI_BATCHES}]" '/^runtime = "torch-aoti"/ {a = 1} a && /^batch_sizes/ {$0 = "batch_sizes = " b; a = 0} 1' \
        hardware_profiles/gpu.toml > "$profile"
    fi
    [[ -f /tmp/r18/resnet18.onnx ]] || python3 tests/assets/make_resnet18.py /tmp/r18/resnet18.onnx --inputs /tmp/r18/in
    [[ -f /tmp/r18/resnet18.pt ]] || python3 benchmarks/resnet18_torch.py weights /tmp/r18/resnet18.onnx /tmp/r18/resnet18.pt
    edgeopt package benchmarks/resnet18_torch.py:build --weights /tmp/r18/resnet18.pt --profile "$profile" \
      --runtime torch-aoti --task generic --input-shape images:1,3,224,224 --heldout /tmp/r18/in/resnet18_v1_heldout.npz \
      --sign-key .whl/keys/edgeopt.key --name resnet18 --iterations 50 -o /tmp/r18/resnet18-aoti.eopkg --json \
      > "$OUT/package-aoti.json" 2> >(tee "$OUT/package-aoti.log" >&2)
    python3 -c "import json; d=json.load(open('$OUT/package-aoti.json')); print(d['runtime'], d['precision'], d['validation']['passed'], d.get('benchmark', {}).get('optimized'))"
    ;;
  bench|http)
    extra=()
    [[ $1 == http ]] && extra=(--rounds 0 --http-seconds "${HTTP_SECONDS:-4}" --http-rounds "${HTTP_ROUNDS:-3}")
    python3 benchmarks/gpu_aoti.py --aoti-package /tmp/r18/resnet18-aoti.eopkg \
      --public-key .whl/keys/edgeopt.pub --factory benchmarks/resnet18_torch.py:build --weights /tmp/r18/resnet18.pt \
      --batches "${BATCHES:-1,8,32}" --rounds "${ROUNDS:-5}" ${BENCH_ARGS:-} "${extra[@]}" \
      --json "$OUT/gpu_aoti_$1.json" 2>&1 | tee "$OUT/gpu_aoti_$1.log"
    ;;
  probe)
    python3 benchmarks/gpu_aoti_probe.py 2>&1 | tee "$OUT/gpu_aoti_probe.log"
    ;;
  *) echo "usage: $0 package|bench|http|probe" >&2; exit 2 ;;
esac
