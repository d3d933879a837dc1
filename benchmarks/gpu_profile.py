"""The `gpu` profile on a real NVIDIA GPU: install a gpu package with the real agent, then measure each ONNX
Runtime option against the best path a PyTorch user gets (``torch.compile(mode="max-autotune")``).

Run on a machine with an NVIDIA GPU and onnxruntime-gpu (CUDAExecutionProvider):

    python benchmarks/gpu_profile.py --package resnet18-gpu.eopkg --public-key keys/edgeopt.pub \
        --fp32 resnet18.onnx --batches 1,8,32 [--torch resnet18] [--http-seconds 5] [--json OUT.json]

1. `edgeopt agent install` of the package (verify signature and hashes, capability check, load with the
   profile's options, golden-sample self-test through the same padded, graph-captured path, switch).
2. ONNX Runtime variants, each loaded through the agent's own runtime class (`OnnxRuntimeRuntime.load`), so an
   option is measured exactly as the agent runs it: the earlier package's plain session, then I/O binding at
   fixed batch sizes, NHWC kernels, CUDA graphs, cuDNN HEURISTIC instead of EXHAUSTIVE, fp16 inputs
   (the fp32 source converted with ``keep_io_types=False`` on the spot), and fp32 on CUDA for "fp16 never
   slower than fp32". "host" times ``infer()`` with numpy in and out (the copies an application pays);
   "device" times the bound run alone (inputs already on the GPU).
3. The agent's HTTP API under 16 closed-loop clients, batching on (up to the profile's largest batch size) vs
   off, two real agent daemons serving the installed package.
4. PyTorch (``--torch resnet18``: torchvision's architecture with random weights, the same shapes and work as
   the package's ResNet-18): eager fp16 channels-last and ``torch.compile(mode="max-autotune")`` fp16, device-
   resident and with host copies. Only run where torch and torchvision exist (never a dependency of edgeopt).

Interleaved rounds, medians; ratios are against the measurement of the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _lat(fn, n: int, warm: int = 10) -> float:
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


def install_package(package: str, public_key: str, state: Path) -> tuple[Path, dict, float]:
    cfg = state / "agent.toml"
    init = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "init", "--device-id", "h200-1",
                           "--fleet", "gpu-lab", "--state-dir", str(state / "state"),
                           "--trust-key", public_key], capture_output=True, text=True)
    if init.returncode:
        raise SystemExit(init.stderr)
    cfg.write_text(init.stdout)
    t0 = time.perf_counter()
    inst = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "install", package,
                           "--config", str(cfg), "--json"], capture_output=True, text=True)
    took = time.perf_counter() - t0
    print(f"agent install: exit {inst.returncode} in {took:.1f} s", flush=True)
    print((inst.stdout.strip() or inst.stderr.strip())[:1500], flush=True)
    if inst.returncode:
        raise SystemExit(1)
    installed = json.loads(inst.stdout)
    pkg_dir = Path(installed.get("path") or installed["installed"]["path"])
    return pkg_dir, json.loads((pkg_dir / "manifest.json").read_text()), took


def fallback_install(package: str, public_key: str, work: Path) -> dict:
    """Install a package with a node the CUDA provider has no kernel for: the agent must not serve it silently."""
    state = work / f"fb-{Path(package).stem}"
    state.mkdir()
    cfg = state / "agent.toml"
    init = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "init", "--device-id", "h200-1",
                           "--fleet", "gpu-lab", "--state-dir", str(state / "state"),
                           "--trust-key", str(Path(public_key).resolve())], capture_output=True, text=True)
    cfg.write_text(init.stdout)
    inst = subprocess.run([sys.executable, "-m", "edgeopt.sdk.cli", "agent", "install", package,
                           "--config", str(cfg), "--json"], capture_output=True, text=True)
    out = {"exit": inst.returncode, "stderr": inst.stderr.strip()[-600:]}
    try:
        out["events"] = [{k: e.get(k) for k in ("event", "ok", "message")} for e in json.loads(inst.stdout)["events"]]
    except (ValueError, KeyError):
        out["stdout"] = inst.stdout.strip()[-600:]
    print(f"fallback package {Path(package).name}: exit {inst.returncode}: {json.dumps(out)[:1200]}", flush=True)
    return out


def fp16_io_model(fp32: Path, out: Path) -> Path:
    """The SDK's fp16 build with the profile's ``fp16_inputs`` on: the same offline optimization, then float16
    inputs too (outputs stay float32)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgeopt.sdk.backends.onnxruntime import OnnxRuntimeBackend

    tmp = out.with_suffix(".fp32opt.onnx")
    OnnxRuntimeBackend()._optimize_offline(fp32, tmp, "all", [])
    model = onnx.load(str(tmp))
    onnx.save(convert_float_to_float16(model, keep_io_types=[o.name for o in model.graph.output]), str(out))
    return out


def ort_variants(model: Path, fp32: Path, work: Path, batches: list[int], block: dict) -> dict:
    from edgeopt.agent.runtimes.onnxruntime import OnnxRuntimeRuntime

    cuda = {"providers": ["CUDAExecutionProvider"]}
    sizes = sorted(set(block.get("batch_sizes") or []) | set(batches))
    bound = {**cuda, "batch_sizes": sizes}
    io16 = fp16_io_model(fp32, work / "fp16io.onnx")
    variants = {
        "plain session (earlier package)": (model, dict(cuda)),
        "I/O binding, fixed sizes": (model, dict(bound)),
        "+ NHWC": (model, {**bound, "prefer_nhwc": True}),
        "+ CUDA graphs": (model, {**bound, "cuda_graph": True}),
        "+ NHWC + CUDA graphs": (model, {**bound, "prefer_nhwc": True, "cuda_graph": True}),
        "+ NHWC + graphs, cuDNN HEURISTIC": (model, {**bound, "prefer_nhwc": True, "cuda_graph": True,
                                                     "cudnn_conv_algo_search": "HEURISTIC"}),
        "+ NHWC + graphs + fp16 inputs": (io16, {**bound, "prefer_nhwc": True, "cuda_graph": True}),
        "fp32 source, plain": (fp32, dict(cuda)),
        "fp32 source, binding + graphs": (fp32, {**bound, "cuda_graph": True}),
    }
    loaded, load_s = {}, {}
    for name, (path, opts) in variants.items():
        t0 = time.perf_counter()
        try:
            loaded[name] = OnnxRuntimeRuntime.load(path, options=dict(opts))
        except Exception as exc:  # noqa: BLE001 - reported in the table
            print(f"{name}: cannot load: {exc}", flush=True)
            continue
        load_s[name] = time.perf_counter() - t0
    inp = next(iter(loaded.values())).inputs[0]
    results: dict = {}
    rng = np.random.default_rng(0)
    for b in batches:
        x = rng.standard_normal([b, *inp.shape[1:]]).astype(np.float32)
        ref = loaded["fp32 source, plain"].infer({inp.name: x}) if "fp32 source, plain" in loaded else None
        rows, feeds = {}, {}
        for name, m in loaded.items():
            # A float16-input model gets float16 from its client (converting here would time numpy's cast)
            feeds[name] = {inp.name: x.astype(np.float16) if m.inputs[0].dtype == "float16" else x}
            out = m.infer(feeds[name])
            first = next(iter(out.values()))
            rows[name] = {"host": [], "device": [], "load_s": load_s[name],
                          "cosine": _cos(next(iter(ref.values())), first) if ref else None}
        for _ in range(5):  # interleaved rounds
            for name, m in loaded.items():
                rows[name]["host"].append(_lat(lambda: m.infer(feeds[name]), 100))
                if hasattr(m, "_run_slot"):
                    rows[name]["device"].append(_lat(lambda: m._run_slot(b), 200))
        results[b] = {k: {"host_ms": float(np.median(v["host"])),
                          "device_ms": float(np.median(v["device"])) if v["device"] else None,
                          "load_s": v["load_s"], "cosine": v["cosine"]} for k, v in rows.items()}
        print(f"batch {b}: " + ", ".join(f"{k} {v['host_ms']:.3f}" for k, v in results[b].items()), flush=True)
    for m in loaded.values():
        m.close()
    return results


def pinned_probe() -> None:
    """Can ONNX Runtime's Python API give page-locked host memory for the agent's staging buffers?"""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((32, 3, 224, 224)).astype(np.float32)
    dev = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    print(f"pageable -> device, 19 MB: {_lat(lambda: dev.update_inplace(x), 50):.3f} ms", flush=True)
    try:
        pin = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), np.float32, "cuda_pinned", 0)
        view = pin.numpy()
        view[...] = x
        shares = np.shares_memory(view, pin.numpy()) if hasattr(np, "shares_memory") else None
        print(f"cuda_pinned OrtValue: ok, numpy() is a view: {shares}; device {pin.device_name()}", flush=True)
        print(f"pinned numpy -> device: {_lat(lambda: dev.update_inplace(view), 50):.3f} ms", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"cuda_pinned OrtValue: not available ({type(exc).__name__}: {str(exc)[:200]})", flush=True)


def torch_baselines(batches: list[int], seconds_cap: float, compile_batches: list[int] | None = None) -> dict:
    """torchvision ResNet-18 (random weights): eager fp16 channels-last, and torch.compile max-autotune."""
    import torch
    import torchvision

    torch.backends.cudnn.benchmark = True
    net = torchvision.models.resnet18().eval().cuda().half().to(memory_format=torch.channels_last)
    out: dict = {}
    start = time.perf_counter()

    def timed(fn, x_dev, x_host):
        def dev():
            fn(x_dev)
            torch.cuda.synchronize()

        def host():
            y = fn(x_host.cuda(non_blocking=True).half().contiguous(memory_format=torch.channels_last))
            y.float().cpu()

        x_pageable = x_host.clone()  # what an application holds after reading a request: not page-locked

        def host_pageable():
            y = fn(x_pageable.cuda().half().contiguous(memory_format=torch.channels_last))
            y.float().cpu()
        return _lat(dev, 200, 20), _lat(host, 100, 10), _lat(host_pageable, 100, 10)

    with torch.inference_mode():
        for b in batches:
            x_host = torch.randn(b, 3, 224, 224).pin_memory()
            x_dev = x_host.cuda().half().contiguous(memory_format=torch.channels_last)
            e_dev, e_host, e_page = timed(net, x_dev, x_host)
            out.setdefault(b, {})["torch eager fp16 channels-last"] = {"device_ms": e_dev, "host_ms": e_host,
                                                                       "host_pageable_ms": e_page}
            print(f"torch eager b{b}: device {e_dev:.3f} ms, host {e_host:.3f} ms", flush=True)
        for b in compile_batches or batches:
            if time.perf_counter() - start > seconds_cap:
                print(f"torch.compile b{b}: skipped, over the {seconds_cap:.0f} s cap", flush=True)
                continue
            torch._dynamo.reset()
            compiled = torch.compile(net, mode="max-autotune", dynamic=False)
            x_host = torch.randn(b, 3, 224, 224).pin_memory()
            x_dev = x_host.cuda().half().contiguous(memory_format=torch.channels_last)
            t0 = time.perf_counter()
            for _ in range(3):
                compiled(x_dev)
            torch.cuda.synchronize()
            c_dev, c_host, c_page = timed(compiled, x_dev, x_host)
            out[b]["torch.compile max-autotune fp16"] = {"device_ms": c_dev, "host_ms": c_host,
                                                         "host_pageable_ms": c_page,
                                                         "compile_s": time.perf_counter() - t0}
            print(f"torch.compile b{b}: device {c_dev:.3f} ms, host {c_host:.3f} ms "
                  f"(compile {time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def http_batching(package: str, public_key: str, work: Path, clients: int, seconds: float, rounds: int,
                  shape: list[int], dtype: str) -> dict:
    from agent_batching import load_test
    from agent_common import Daemon, binary_request, free_port, install, write_config

    modes = {"batching off": {"enabled": False}, "batching on (profile sizes)": {"max_delay_ms": 2.0}}
    cfgs, ports = {}, {}
    for mode, limits in modes.items():
        d = work / mode.split()[1]
        d.mkdir(parents=True)
        ports[mode] = free_port()
        cfgs[mode] = write_config(d, Path(public_key).resolve(), api_port=ports[mode], batching=limits,
                                  broker_port=free_port())
        install(cfgs[mode], Path(package).resolve())
    x = np.random.default_rng(1).standard_normal([1, *shape[1:]]).astype(dtype)
    body, headers = binary_request(x)
    from edgeopt.sdk.package import read_manifest

    name = read_manifest(package).name
    runs: dict = {m: [] for m in modes}
    with contextlib.ExitStack() as stack:
        pids = {m: stack.enter_context(Daemon(cfgs[m], ports[m])).pid for m in modes}
        for _ in range(rounds):
            for m in modes:
                runs[m].append(load_test(ports[m], name, body, headers, clients, seconds, "epoll",
                                         agent_pid=pids[m]))
    return {m: {k: float(np.median([r[k] for r in v])) for k in ("throughput", "p50_ms", "p99_ms")}
            | {"errors": int(sum(r["errors"] for r in v))} for m, v in runs.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--public-key", required=True)
    ap.add_argument("--fp32", required=True, help="the fp32 source ONNX model of the package")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--torch", choices=["resnet18"], help="also measure PyTorch on torchvision's architecture")
    ap.add_argument("--torch-cap-s", type=float, default=300, help="stop compiling new batch sizes after this")
    ap.add_argument("--torch-compile-batches", help="compile only these batch sizes (default: --batches)")
    ap.add_argument("--http-seconds", type=float, default=0, help="HTTP load test per round (0: skip)")
    ap.add_argument("--http-rounds", type=int, default=3)
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("--skip-variants", action="store_true", help="only install, fallback packages and HTTP")
    ap.add_argument("--fallback-package", action="append",
                    help="also install this package, whose model has a node the CUDA provider lacks (repeatable)")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    import onnxruntime as ort

    print(f"onnxruntime {ort.__version__}; providers {ort.get_available_providers()}", flush=True)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="edgeopt-gpu-"))
    pkg_dir, manifest, install_s = install_package(args.package, args.public_key, work)
    block = next((b for b in manifest["profile"].get("runtimes", []) if b.get("runtime") == "onnxruntime"), {})
    print(f"profile onnxruntime block: {json.dumps(block)}", flush=True)
    figures: dict = {"install_s": install_s, "block": block, "onnxruntime": ort.__version__}
    for extra in args.fallback_package or []:
        figures.setdefault("fallback", {})[Path(extra).name] = fallback_install(extra, args.public_key, work)
    if args.skip_variants:
        batches = []
    figures["ort"] = {} if args.skip_variants else ort_variants(pkg_dir / manifest["model_file"], Path(args.fp32), work, batches, block)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    report(figures, batches)
    pinned_probe()
    if args.http_seconds:
        inp = manifest["inputs"][0]
        shape = [d if isinstance(d, int) else 1 for d in inp["shape"]]
        figures["http"] = http_batching(args.package, args.public_key, work / "http", 16, args.http_seconds,
                                        args.http_rounds, shape, inp["dtype"])
    if args.torch:
        try:
            figures["torch"] = torch_baselines(batches, args.torch_cap_s,
                                               [int(b) for b in args.torch_compile_batches.split(",")]
                                               if args.torch_compile_batches else None)
        except Exception as exc:  # noqa: BLE001 - reported; the ONNX Runtime figures stand
            print(f"torch baselines not measured: {type(exc).__name__}: {exc}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))
    report(figures, batches)
    return 0


def report(f: dict, batches: list[int]) -> None:
    torch_f = f.get("torch", {})
    for b in batches:
        rows = f["ort"][b]
        tc = torch_f.get(b, {}).get("torch.compile max-autotune fp16") or torch_f.get(str(b), {}).get(
            "torch.compile max-autotune fp16")
        base = rows.get("plain session (earlier package)", {}).get("host_ms")
        print(f"\nbatch {b}" + (f"  (torch.compile: device {tc['device_ms']:.3f} ms, host {tc['host_ms']:.3f} ms)"
                               if tc else ""))
        print(f"{'path':<36} {'host ms':>9} {'vs earlier':>10} {'device ms':>10} {'vs compile (dev)':>17} "
              f"{'load s':>7} {'cosine':>8}")
        for name, r in rows.items():
            dev = r["device_ms"]
            vs_tc = f"{dev / tc['device_ms']:.2f}x" if (tc and dev) else "-"
            dev_s = f"{dev:.3f}" if dev else "-"
            cos_s = f"{r['cosine']:.5f}" if r["cosine"] is not None else "-"
            print(f"{name:<36} {r['host_ms']:>9.3f} {base / r['host_ms']:>9.2f}x {dev_s:>10} {vs_tc:>17} "
                  f"{r['load_s']:>7.1f} {cos_s:>8}")
        for name, r in (torch_f.get(b) or torch_f.get(str(b)) or {}).items():
            print(f"{name:<36} {r['host_ms']:>9.3f} {base / r['host_ms']:>9.2f}x {r['device_ms']:>10.3f}"
                  f"   (host, pageable input: {r.get('host_pageable_ms', float('nan')):.3f} ms)")
    if "http" in f:
        print("\nagent HTTP API, 16 clients, batch-1 requests")
        off = f["http"]["batching off"]["throughput"]
        for m, r in f["http"].items():
            print(f"{m:<28} {r['throughput']:>9.0f} req/s {r['throughput'] / off:>6.2f}x  p50 {r['p50_ms']:.2f} ms "
                  f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}")


if __name__ == "__main__":
    sys.exit(main())
