"""The `gpu` profile on a real NVIDIA GPU: install a gpu package with the real agent, then measure it.

Run on a machine with an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider):

    python benchmarks/gpu_profile.py --package resnet18-gpu.eopkg --public-key keys/edgeopt.pub \
        --fp32 resnet18.onnx --batches 1,8

1. `edgeopt agent install` of the package (verify signature and hashes, capability check: the device must
   really list CUDAExecutionProvider, load on CUDA, golden-sample self-test, switch) into a temp state dir.
2. Latency of the fp32 source model on ONNX Runtime CPU and CUDA, and of the package's fp16 model on CUDA,
   interleaved rounds in the same run; prints a table of medians and ratios against CUDA fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _session(path, provider, threads=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    s = ort.InferenceSession(str(path), sess_options=so, providers=[provider])
    if s.get_providers()[0] != provider:
        raise SystemExit(f"error: {provider} requested but ONNX Runtime runs {s.get_providers()}")
    return s


def _time(sess, feeds, n):
    """Latency (ms) with host arrays: includes host-to-device copies, as an application sees it."""
    name = [o.name for o in sess.get_outputs()]
    for _ in range(5):
        sess.run(name, feeds)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run(name, feeds)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _time_bound(sess, feeds, n):
    """Latency (ms) with inputs and outputs resident on the GPU (IOBinding): the model's own execution."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for k, v in feeds.items():
        binding.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0))
    for o in sess.get_outputs():
        binding.bind_output(o.name, "cuda", 0)
    for _ in range(5):
        sess.run_with_iobinding(binding)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        sess.run_with_iobinding(binding)
        binding.synchronize_outputs()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--public-key", required=True)
    ap.add_argument("--fp32", required=True, help="the fp32 source ONNX model of the package")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; providers {ort.get_available_providers()}")
    try:
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        print("nvidia-smi not available")

    state = Path(tempfile.mkdtemp(prefix="edgeopt-gpu-"))
    cfg = state / "agent.toml"
    init = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "init", "--device-id", "h200-1",
                           "--fleet", "gpu-lab", "--state-dir", str(state / "state"),
                           "--trust-key", args.public_key], capture_output=True, text=True)
    if init.returncode:
        print(init.stderr)
        return 1
    cfg.write_text(init.stdout)
    t0 = time.perf_counter()
    inst = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "install", args.package,
                           "--config", str(cfg), "--json"], capture_output=True, text=True)
    print(f"agent install: exit {inst.returncode} in {time.perf_counter() - t0:.1f} s")
    print(inst.stdout.strip()[:2000] or inst.stderr.strip()[:2000])
    if inst.returncode:
        return 1
    installed = json.loads(inst.stdout)
    pkg_dir = Path(installed.get("path") or installed["installed"]["path"])
    manifest = json.loads((pkg_dir / "manifest.json").read_text())
    model = pkg_dir / manifest["model_file"]

    cpu32 = _session(args.fp32, "CPUExecutionProvider", threads=os.cpu_count())
    cuda32 = _session(args.fp32, "CUDAExecutionProvider")
    cuda16 = _session(model, "CUDAExecutionProvider")
    inp = cuda32.get_inputs()[0]
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        shape = [b if not isinstance(d, int) else d for d in inp.shape]
        shape[0] = b
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        in16 = cuda16.get_inputs()[0]
        x16 = x.astype(np.float16) if in16.type == "tensor(float16)" else x
        ref = cuda32.run(None, {inp.name: x})[0].ravel().astype(np.float64)
        got = cuda16.run(None, {in16.name: x16})[0].ravel().astype(np.float64)
        cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-30))
        med = {"cpu_fp32": [], "cuda_fp32": [], "cuda_fp16_pkg": [], "bound_fp32": [], "bound_fp16_pkg": []}
        n_cpu = max(5, args.iterations // 20)
        for _ in range(args.rounds):  # interleaved rounds: drift hits all of them alike
            med["cuda_fp32"].append(np.median(_time(cuda32, {inp.name: x}, args.iterations)))
            med["cuda_fp16_pkg"].append(np.median(_time(cuda16, {in16.name: x16}, args.iterations)))
            med["bound_fp32"].append(np.median(_time_bound(cuda32, {inp.name: x}, args.iterations)))
            med["bound_fp16_pkg"].append(np.median(_time_bound(cuda16, {in16.name: x16}, args.iterations)))
            med["cpu_fp32"].append(np.median(_time(cpu32, {inp.name: x}, n_cpu)))
        m = {k: float(np.median(v)) for k, v in med.items()}
        rows.append((b, m, cos))
    print()
    print(f"{'batch':>5} {'CPU fp32 ms':>12} {'CUDA fp32 ms':>13} {'CUDA fp16 pkg ms':>17} "
          f"{'fp16 vs CUDA fp32':>18} {'fp16 vs CPU fp32':>17} {'cosine':>8}")
    for b, m, cos in rows:
        print(f"{b:>5} {m['cpu_fp32']:>12.3f} {m['cuda_fp32']:>13.3f} {m['cuda_fp16_pkg']:>17.3f} "
              f"{m['cuda_fp32'] / m['cuda_fp16_pkg']:>17.2f}x {m['cpu_fp32'] / m['cuda_fp16_pkg']:>16.1f}x "
              f"{cos:>8.5f}")
    print()
    print("device-resident inputs/outputs (IOBinding): the model's own execution on the GPU")
    print(f"{'batch':>5} {'CUDA fp32 ms':>13} {'CUDA fp16 pkg ms':>17} {'fp16 vs fp32':>13}")
    for b, m, _ in rows:
        print(f"{b:>5} {m['bound_fp32']:>13.3f} {m['bound_fp16_pkg']:>17.3f} "
              f"{m['bound_fp32'] / m['bound_fp16_pkg']:>12.2f}x")
    import onnx

    g = onnx.load(str(model), load_external_data=False).graph
    kinds = {}
    for init in g.initializer:
        kinds[onnx.TensorProto.DataType.Name(init.data_type)] = kinds.get(
            onnx.TensorProto.DataType.Name(init.data_type), 0) + 1
    print(f"package model initializers by type: {kinds}; Cast nodes: {sum(n.op_type == 'Cast' for n in g.node)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
