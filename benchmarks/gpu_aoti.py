"""The `gpu` profile's two runtimes against torch.compile, in one run on a real NVIDIA GPU (issue 13).

    python benchmarks/gpu_aoti.py --aoti-package resnet18-aoti.eopkg [--ort-package resnet18-gpu.eopkg] \
        --public-key edgeopt.pub --factory benchmarks/resnet18_torch.py:build --weights resnet18.pt \
        --batches 1,8,32 [--rounds 5] [--json OUT.json]

Every package is installed by the real agent (`edgeopt agent install`: signature, hashes, load with the profile's
options, golden self-test, switch) and then loaded the way the agent loads it (``agent.loader.load_options`` and
the runtime's ``load``): torch-aoti with its fixed batch sizes, device buffers and one CUDA graph per size; ONNX
Runtime with I/O binding, NHWC, CUDA graphs. The baseline is ``torch.compile(mode="max-autotune")`` in fp16
(channels-last) of the same PyTorch module with the same weights (benchmarks/resnet18_torch.py: the project's
ResNet-18, also the ONNX package's source).

"device" times a run whose inputs are already on the GPU (outputs stay there); "host" times numpy float32 in and
float32 out, the copies an application pays (pinned staging in torch-aoti and in the torch.compile baseline;
ONNX Runtime's Python API has no pinned memory). Rounds are interleaved (each path once per round, in turn), and
the figures are medians over rounds of per-round medians; ratios are against torch.compile of the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _median_ms(fn, n: int, warm: int = 5) -> float:
    for _ in range(warm):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(out))


def _cos(a, b) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def load_like_the_agent(package: str, public_key: str, work: Path):
    from gpu_profile import install_package

    from edgeopt.agent.loader import load_options
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.package import Manifest

    work.mkdir(parents=True, exist_ok=True)
    pkg_dir, manifest_doc, install_s = install_package(package, public_key, work)
    manifest = Manifest.model_validate(manifest_doc)
    kwargs = load_options(manifest, work / "cache")
    t0 = time.perf_counter()
    loaded = get_runtime(manifest.runtime).load(pkg_dir / manifest.model_file, **kwargs)
    return loaded, manifest, install_s, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aoti-package", required=True)
    ap.add_argument("--ort-package")
    ap.add_argument("--public-key", required=True)
    ap.add_argument("--factory", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--package-via-cli", action="store_true",
                    help="time the torch-aoti package with `edgeopt bench` in its own process (host path only) "
                         "instead of loading it here")
    args = ap.parse_args()
    if args.package_via_cli:
        return via_cli(args, [int(b) for b in args.batches.split(",")])
    batches = [int(b) for b in args.batches.split(",")]

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="edgeopt-aoti-"))
    figures: dict = {"batches": batches, "load": {}}
    # The packages are loaded first, exactly as the agent does (PyTorch imported by the runtime at load): with
    # PyTorch imported and CUDA initialised by this script before it, loading the .pt2 crashed (H200, torch 2.11).
    aoti, aoti_manifest, inst_s, load_s = load_like_the_agent(args.aoti_package, args.public_key, work / "aoti")
    figures["load"]["torch-aoti"] = {"install_s": inst_s, "load_s": load_s, "describe": aoti.describe()}
    print(f"torch-aoti package: install {inst_s:.1f} s, load {load_s:.1f} s, {aoti.describe()}", flush=True)
    ort_loaded = None
    if args.ort_package:
        ort_loaded, _, inst_s, load_s = load_like_the_agent(args.ort_package, args.public_key, work / "ort")
        figures["load"]["onnxruntime"] = {"install_s": inst_s, "load_s": load_s}
        print(f"onnxruntime package: install {inst_s:.1f} s, load {load_s:.1f} s", flush=True)

    import torch

    from edgeopt.sdk.prune.source import build_module

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    figures["torch"] = torch.__version__
    net32 = build_module(args.factory, Path(args.weights)).cuda()
    net = build_module(args.factory, Path(args.weights)).cuda().half().to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    paths: dict[int, dict] = {}
    compiled_at: dict[int, float] = {}
    with torch.inference_mode():
        for b in batches:
            x32 = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
            ref = net32(torch.from_numpy(x32).cuda()).float().cpu().numpy()
            t0 = time.perf_counter()
            torch._dynamo.reset()
            compiled = torch.compile(net, mode="max-autotune", dynamic=False)
            pinned = torch.from_numpy(x32).pin_memory()
            x_dev = pinned.cuda().half().contiguous(memory_format=torch.channels_last)
            for _ in range(3):
                compiled(x_dev)
            torch.cuda.synchronize()
            compiled_at[b] = time.perf_counter() - t0

            def tc_dev(compiled=compiled, x_dev=x_dev):
                compiled(x_dev)
                torch.cuda.synchronize()

            def tc_host(compiled=compiled, pinned=pinned, x32=x32):
                pinned.numpy()[:] = x32  # the application's array into the pinned buffer
                y = compiled(pinned.cuda(non_blocking=True).half().contiguous(memory_format=torch.channels_last))
                return y.float().cpu().numpy()

            slot_in = aoti._slots[min(s for s in aoti.batch_sizes if s >= b)]["in"][0]
            slot_in.copy_(torch.from_numpy(x32).half())

            def aoti_dev(b=b):
                aoti.run_resident(b)
                torch.cuda.synchronize()

            def aoti_host(x32=x32):
                return next(iter(aoti.infer({"images": x32}).values()))

            p = {"torch.compile max-autotune fp16": (tc_dev, tc_host),
                 "edgeopt torch-aoti package": (aoti_dev, aoti_host)}
            if ort_loaded is not None:
                ort_loaded.infer({ort_loaded.inputs[0].name: x32})

                def ort_dev(b=b):
                    ort_loaded._run_slot(min(s for s in ort_loaded.batch_sizes if s >= b))

                def ort_host(x32=x32):
                    return next(iter(ort_loaded.infer({ort_loaded.inputs[0].name: x32}).values()))

                p["edgeopt onnxruntime package"] = (ort_dev, ort_host)
            cos = {name: _cos(host(), ref) for name, (_, host) in p.items()}
            paths[b] = {"fns": p, "cos": cos, "dev": {n: [] for n in p}, "host": {n: [] for n in p}}
            print(f"batch {b}: torch.compile built in {compiled_at[b]:.0f} s; cosine vs fp32 eager "
                  + ", ".join(f"{n} {c:.5f}" for n, c in cos.items()), flush=True)
        for r in range(args.rounds):
            for b in batches:
                for name, (dev, host) in paths[b]["fns"].items():
                    paths[b]["dev"][name].append(_median_ms(dev, args.iters))
                    paths[b]["host"][name].append(_median_ms(host, args.iters))
    out = {}
    for b in batches:
        rows = {}
        for name in paths[b]["fns"]:
            rows[name] = {"device_ms": float(np.median(paths[b]["dev"][name])),
                          "host_ms": float(np.median(paths[b]["host"][name])), "cosine": paths[b]["cos"][name]}
        out[b] = rows
    figures["paths"] = out
    figures["compile_s"] = compiled_at
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    report(out, batches)
    return 0


def via_cli(args, batches: list[int]) -> int:
    """`edgeopt bench PKG --batch-size N` (the package's own load path, numpy in and out) for each batch, in its
    own process, then torch.compile of the same module here, host path with pinned staging and device-resident."""
    figures: dict = {"batches": batches, "package_host_ms": {}, "compile": {}}
    for b in batches:
        run = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "bench", args.aoti_package, "--batch-size",
                              str(b), "--iterations", "300", "--warmup", "20", "--public-key", args.public_key,
                              "--json"], capture_output=True, text=True, timeout=300)
        if run.returncode:
            print(f"edgeopt bench b{b}: exit {run.returncode}: {run.stderr.strip()[-500:]}", flush=True)
            continue
        figures["package_host_ms"][b] = json.loads(run.stdout)["latency"]["p50_ms"]
        print(f"edgeopt bench torch-aoti b{b}: p50 {figures['package_host_ms'][b]:.3f} ms", flush=True)
    import torch

    from edgeopt.sdk.prune.source import build_module

    figures["torch"] = torch.__version__
    net = build_module(args.factory, Path(args.weights)).cuda().half().to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for b in batches:
            x32 = rng.standard_normal((b, 3, 224, 224)).astype(np.float32)
            torch._dynamo.reset()
            compiled = torch.compile(net, mode="max-autotune", dynamic=False)
            pinned = torch.from_numpy(x32).pin_memory()
            x_dev = pinned.cuda().half().contiguous(memory_format=torch.channels_last)

            def dev():
                compiled(x_dev)
                torch.cuda.synchronize()

            def host():
                pinned.numpy()[:] = x32
                y = compiled(pinned.cuda(non_blocking=True).half().contiguous(memory_format=torch.channels_last))
                return y.float().cpu().numpy()

            figures["compile"][b] = {"device_ms": float(np.median([_median_ms(dev, 100) for _ in range(3)])),
                                     "host_ms": float(np.median([_median_ms(host, 100) for _ in range(3)]))}
    print(f"\n{'batch':>5} {'torch-aoti package host ms':>27} {'torch.compile host ms':>22} {'ratio':>6} "
          f"{'torch.compile device ms':>24}")
    for b in batches:
        c = figures["compile"][b]
        p = figures["package_host_ms"].get(b)
        ratio = f"{p / c['host_ms']:.2f}x" if p else "-"
        print(f"{b:>5} {p if p else float('nan'):>27.3f} {c['host_ms']:>22.3f} {ratio:>6} {c['device_ms']:>24.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0


def report(out: dict, batches: list[int]) -> None:
    base = "torch.compile max-autotune fp16"
    print(f"\n{'batch':>5} {'path':<34} {'device ms':>10} {'vs compile':>10} {'host ms':>9} {'vs compile':>10} "
          f"{'cosine':>8}")
    for b in batches:
        tc = out[b][base]
        for name, r in out[b].items():
            print(f"{b:>5} {name:<34} {r['device_ms']:>10.3f} {r['device_ms'] / tc['device_ms']:>9.2f}x "
                  f"{r['host_ms']:>9.3f} {r['host_ms'] / tc['host_ms']:>9.2f}x {r['cosine']:>8.5f}")


if __name__ == "__main__":
    sys.exit(main())
