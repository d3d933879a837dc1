"""The `gpu` profile's two runtimes against torch.compile, in one run on a real NVIDIA GPU (issue 13).

    python benchmarks/gpu_aoti.py --aoti-package resnet18-aoti.eopkg --public-key edgeopt.pub \
        --factory benchmarks/resnet18_torch.py:build --weights resnet18.pt \
        --batches 1,8,32 [--rounds 5] [--http-seconds 4] [--json OUT.json]

The torch-aoti package is installed by the real agent (`edgeopt agent install`: signature, hashes, load with the
profile's options, capture, golden self-test, switch) and the installed copy is then loaded the way the agent loads
it (``agent.loader.load_options`` and the runtime's ``load``: fixed batch sizes, device buffers, one CUDA graph per
size, pinned staging) in a worker process of its own, which this script asks for each timing in turn (the .pt2
crashed in native code when loaded in the process that also ran torch.compile: H200, PyTorch 2.11). The baseline
is ``torch.compile(mode="max-autotune")`` in fp16 (channels-last) of the same PyTorch module with the same weights
(benchmarks/resnet18_torch.py: the project's ResNet-18) on the same inputs. The ONNX Runtime package's figures
come from benchmarks/gpu_profile.py (BENCHMARKS.md).

"device" times a run whose inputs are already on the GPU (outputs stay there); "host" times numpy float32 in and
float32 out, the copies an application pays (pinned staging in both). Rounds are interleaved (each path once per
round, in turn), and the figures are medians over rounds of per-round medians; ratios are against torch.compile
of the same run. ``--http-seconds`` adds 16 HTTP clients against two agents serving the package, batching on
(the profile's sizes) vs off.
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


def _inputs(b: int) -> np.ndarray:
    # The same input in the parent (torch.compile) and in the worker (the package): seeded by the batch size.
    return np.random.default_rng(b).standard_normal((b, 3, 224, 224)).astype(np.float32)


def worker(pkg_dir: str, iters: int) -> int:
    """The package loaded the way the agent loads it, in a process of its own (no PyTorch state of the parent's:
    loading the .pt2 in a process that had compiled with torch.compile crashed in native code, H200, torch 2.11).
    Reads one JSON request a line from stdin, answers one JSON line on stdout."""
    from edgeopt.agent.loader import load_options
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.package import Manifest

    pkg = Path(pkg_dir)
    manifest = Manifest.model_validate(json.loads((pkg / "manifest.json").read_text()))
    t0 = time.perf_counter()
    import torch

    torch.cuda.init()
    t1 = time.perf_counter()
    loaded = get_runtime(manifest.runtime).load(pkg / manifest.model_file, **load_options(manifest, pkg / "cache"))
    hello = {"load_s": time.perf_counter() - t0, "import_torch_and_cuda_init_s": t1 - t0,
             "describe": loaded.describe(), "torch": torch.__version__}
    print(json.dumps(hello, default=str), flush=True)
    name = loaded.inputs[0].name
    for line in sys.stdin:
        req = json.loads(line)
        b = int(req["batch"])
        x32 = _inputs(b)
        size = min(s for s in loaded.batch_sizes if s >= b)
        with torch.inference_mode():  # the slot buffers are inference tensors (made at load under it)
            loaded._slots[size]["in"][0].copy_(torch.from_numpy(x32).to(loaded._slots[size]["in"][0].dtype))

        def dev(size=size):
            loaded.run_resident(size)
            torch.cuda.synchronize()

        def host(x32=x32):
            return next(iter(loaded.infer({name: x32}).values()))

        x16 = x32.astype(np.float16)

        def host16(x16=x16):  # what an HTTP client of the package sends (its input is float16)
            return next(iter(loaded.infer({name: x16}).values()))

        slot = loaded._slots[size]
        wide = slot["wide"][0]

        def stage():  # numpy float32 into the pinned staging buffer
            wide[0].numpy()[:b] = x32

        def h2d():  # the float32 rows to the GPU and the cast there
            with torch.inference_mode():
                wide[1][:b].copy_(wide[0][:b], non_blocking=True)
                slot["in"][0][:b].copy_(wide[1][:b])
            torch.cuda.synchronize()

        def d2h():
            with torch.inference_mode():
                for d, h in zip(slot["out"], slot["host_out"]):
                    h[:b].copy_(d[:b], non_blocking=True)
            torch.cuda.synchronize()

        reply = {"device_ms": _median_ms(dev, iters), "host_ms": _median_ms(host, iters),
                 "host_fp16_in_ms": _median_ms(host16, iters)}
        if req.get("stages") and wide is not None:
            reply["stages_ms"] = {"numpy_cast_fp16": _median_ms(lambda: x32.astype(np.float16), iters),
                                  "stage_fp32_pinned": _median_ms(stage, iters), "h2d_and_gpu_cast": _median_ms(h2d, iters),
                                  "run_resident": reply["device_ms"], "d2h": _median_ms(d2h, iters)}
        if req.get("output"):
            np.save(req["output"], host())
        print(json.dumps(reply), flush=True)
    return 0


class Worker:
    def __init__(self, pkg_dir: Path, iters: int):
        self.proc = subprocess.Popen([sys.executable, "-X", "faulthandler", __file__, "--worker", str(pkg_dir),
                                      "--iters", str(iters), "--aoti-package", "-", "--public-key", "-",
                                      "--factory", "-", "--weights", "-"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the package's worker process ended (exit {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aoti-package", required=True)
    ap.add_argument("--public-key", required=True)
    ap.add_argument("--factory", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--json")
    ap.add_argument("--http-seconds", type=float, default=0,
                    help="also 16 HTTP clients against two agents serving the package, batching on vs off (0: skip)")
    ap.add_argument("--http-rounds", type=int, default=3)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--package-via-cli", action="store_true",
                    help="time the torch-aoti package with `edgeopt bench` in its own process (host path only)")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.iters)
    batches = [int(b) for b in args.batches.split(",")]
    if args.package_via_cli:
        return via_cli(args, batches)

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="edgeopt-aoti-"))
    figures: dict = {"batches": batches, "load": {}}
    if args.rounds > 0:
        timing(args, batches, work, figures)
    if args.http_seconds > 0:
        from gpu_profile import http_batching

        figures["http"] = http_batching(args.aoti_package, args.public_key, work / "http", 16, args.http_seconds,
                                        args.http_rounds, [1, 3, 224, 224], "float16")
        for mode, r in figures["http"].items():
            print(f"HTTP 16 clients, {mode}: {r['throughput']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                  f"p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", flush=True)
        modes = list(figures["http"].values())
        print(f"batching on vs off: {modes[1]['throughput'] / modes[0]['throughput']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    return 0


def timing(args, batches: list[int], work: Path, figures: dict) -> None:
    from gpu_profile import install_package

    # The real agent installs the package (verify, load, capture, golden self-test, switch); the worker then loads
    # the installed copy as the agent does, in its own process.
    (work / "aoti").mkdir(parents=True, exist_ok=True)
    pkg_dir, _, inst_s = install_package(args.aoti_package, args.public_key, work / "aoti")
    wk = Worker(pkg_dir, args.iters)
    figures["load"]["torch-aoti"] = {"install_s": inst_s} | wk.hello
    print(f"torch-aoti package: agent install {inst_s:.1f} s, load in the worker {wk.hello['load_s']:.1f} s, "
          f"{wk.hello['describe']}", flush=True)

    import torch

    from edgeopt.sdk.prune.source import build_module

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
    figures["torch"] = torch.__version__
    net32 = build_module(args.factory, Path(args.weights)).cuda().eval()
    net = build_module(args.factory, Path(args.weights)).cuda().eval().half().to(memory_format=torch.channels_last)
    paths: dict[int, dict] = {}
    compiled_at: dict[int, float] = {}
    base, pkg = "torch.compile max-autotune fp16", "edgeopt torch-aoti package"
    with torch.inference_mode():
        for b in batches:
            x32 = _inputs(b)
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

            out_file = work / f"aoti_b{b}.npy"
            wk.ask(batch=b, output=str(out_file))
            cos = {base: _cos(tc_host(), ref), pkg: _cos(np.load(out_file), ref)}
            paths[b] = {"tc": (tc_dev, tc_host), "cos": cos, "dev": {base: [], pkg: []}, "host": {base: [], pkg: []},
                        "host16": []}
            print(f"batch {b}: torch.compile built in {compiled_at[b]:.0f} s; cosine vs fp32 eager "
                  + ", ".join(f"{n} {c:.5f}" for n, c in cos.items()), flush=True)
        for r in range(args.rounds):
            for b in batches:
                tc_dev, tc_host = paths[b]["tc"]
                paths[b]["dev"][base].append(_median_ms(tc_dev, args.iters))
                paths[b]["host"][base].append(_median_ms(tc_host, args.iters))
                rep = wk.ask(batch=b, stages=r == 0)
                paths[b]["dev"][pkg].append(rep["device_ms"])
                paths[b]["host"][pkg].append(rep["host_ms"])
                paths[b]["host16"].append(rep["host_fp16_in_ms"])
                if "stages_ms" in rep:
                    paths[b]["stages_ms"] = rep["stages_ms"]
                    print(f"batch {b} host path stages (ms): {rep['stages_ms']}", flush=True)
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    wk.close()
    out = {}
    for b in batches:
        out[b] = {name: {"device_ms": float(np.median(paths[b]["dev"][name])),
                         "host_ms": float(np.median(paths[b]["host"][name])), "cosine": paths[b]["cos"][name],
                         "rounds_device_ms": paths[b]["dev"][name], "rounds_host_ms": paths[b]["host"][name]}
                  for name in (base, pkg)}
        out[b][pkg]["host_fp16_in_ms"] = float(np.median(paths[b]["host16"]))
        out[b][pkg]["stages_ms"] = paths[b].get("stages_ms")
    figures["paths"] = out
    figures["compile_s"] = compiled_at
    report(out, batches)


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
            if "host_fp16_in_ms" in r:
                print(f"{b:>5} {'  same, the client sends float16':<34} {'':>10} {'':>10} {r['host_fp16_in_ms']:>9.3f} "
                      f"{r['host_fp16_in_ms'] / tc['host_ms']:>9.2f}x")


if __name__ == "__main__":
    sys.exit(main())
