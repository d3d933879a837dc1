"""SDK speed benchmark: the `cpu` profile package vs ONNX Runtime fp32 and PyTorch eager, batch 1.

Run (2 cores here; pin them so every model sees the same CPUs):

    taskset -c 0,1 .venv/bin/python benchmarks/sdk_speed.py                  # ResNet-18 + digits + real models
    taskset -c 0,1 .venv/bin/python benchmarks/sdk_speed.py --models resnet18 --iterations 60   # quicker

Part 1, per model (ResNet-18-class network, digits CNN): build the `cpu` package through the real
`edgeopt package` pipeline (build_package, --accuracy-aware), extract it, and time, interleaved in rounds in one
run with the same thread count: the package (its runtime, as the agent loads it), ONNX Runtime fp32 with all graph
optimizations, and PyTorch eager fp32 (same weights; skipped with a note when torch is absent). Medians of all
timed iterations. Also: output cosine of the package to fp32 on held-out real inputs, package size vs the fp32
model, achieved GFLOP/s against this machine's peak measured in the same run.

Part 2, real pretrained models: every candidate configuration of the `cpu` profile (what `edgeopt compare`
tries), the fastest one within the budget whatever its precision, and why each other one lost.

Targets (issue 2): >= 1.8x vs ONNX Runtime fp32 on ResNet-18 at cosine >= 0.98; >= 2.5x vs PyTorch eager;
package <= 30% of the fp32 model. Timing is not asserted: this prints the table.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdk_assets  # noqa: E402

from edgeopt.sdk.errors import EdgeoptError  # noqa: E402


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom else 1.0


def interleaved(fns: dict, iterations: int, rounds: int, warmup: int = 5) -> dict[str, np.ndarray]:
    """Latency samples (ms) of each callable, interleaved in ``rounds`` so all share machine state.

    A value is a zero-argument callable, or ``(setup, callable)`` where ``setup`` runs untimed before each block
    (e.g. ``torch.set_num_threads``, a process-wide setting).
    """
    pairs = {k: v if isinstance(v, tuple) else (None, v) for k, v in fns.items()}
    for setup, fn in pairs.values():
        if setup:
            setup()
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for label, (setup, fn) in pairs.items():
            if setup:
                setup()
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                samples[label].append((time.perf_counter() - t0) * 1e3)
    return {k: np.asarray(v) for k, v in samples.items()}


def build_cpu_package(model: dict, out: Path, iterations: int):
    from edgeopt.sdk.pipeline import PackageRequest, build_package

    req = PackageRequest(model=model["model"], profile=sdk_assets.cpu_profile_for(model), calib=model["calib"],
                         heldout=model["heldout"],
                         input_shapes={model["input"]: model["shape"]}, output=out, unsigned=True,
                         accuracy_aware=True, bench_iterations=iterations)
    t0 = time.perf_counter()
    result = build_package(req)
    return result, time.perf_counter() - t0


def part1(key: str, args, peak) -> dict:
    import onnxruntime as ort

    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.flops import count_file
    from edgeopt.sdk.package import PackageReader

    model = sdk_assets.get(key)
    # Each model is timed on 1 thread and on all threads: on this shared 2-core host an oversubscribed thread pool
    # (OpenMP in torch, ORT's spinning pool) can be 3-6x slower on 2 threads than on 1, and a baseline must not be
    # handicapped by a thread count that does not suit it. Ratios are best-vs-best, and also at each fixed count.
    counts = sorted({1, args.threads})
    with tempfile.TemporaryDirectory(prefix="sdk-speed-") as tmp:
        tmp = Path(tmp)
        built, build_s = build_cpu_package(model, tmp / f"{key}.eopkg", args.iterations)
        m = built.manifest
        with PackageReader(built.output) as reader:
            reader.verify(None, allow_unsigned=True)
            root = reader.extract_to(tmp / "pkg")
        pkgs, sessions = {}, {}
        for t in counts:
            pkgs[t] = get_runtime(m.runtime).load(root / m.model_file, device=m.device, threads=t,
                                                  performance_hint="latency")
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = t
            so.inter_op_num_threads = 1
            so.log_severity_level = 3
            sessions[t] = ort.InferenceSession(str(model["model"]), so, providers=["CPUExecutionProvider"])
        pkg, fp32 = pkgs[counts[-1]], sessions[counts[-1]]
        feeds = sdk_assets.heldout_feeds(model)
        # Accuracy of what was packaged, checked here independently of the pipeline's own report.
        cosines = [cosine(pkg.infer(f)[m.outputs[0].name], fp32.run(None, f)[0]) for f in feeds]
        feed = feeds[0]
        fns = {}
        for t in counts:
            fns[f"package@{t}"] = (lambda p=pkgs[t]: p.infer(feed))
            fns[f"ort_fp32@{t}"] = (lambda s_=sessions[t]: s_.run(None, feed))
        torch_note = ""
        try:
            import torch

            from sdk_torch_eager import build_module

            tmod = build_module(model["model"])
            tin = torch.from_numpy(feed[model["input"]])

            def run_torch():
                with torch.inference_mode():
                    return tmod(tin)

            with torch.inference_mode():
                torch_cos = cosine(tmod(tin).numpy(), fp32.run(None, feed)[0])
            for t in counts:
                fns[f"torch_eager@{t}"] = (lambda t=t: torch.set_num_threads(t), run_torch)
            torch_note = f"torch {torch.__version__} (cosine to ORT fp32 {torch_cos:.6f})"
        except ImportError:
            torch_note = "torch not installed: PyTorch eager column skipped (pip install torch==2.13.0)"
        lat = interleaved(fns, args.iterations, args.rounds)
        for p in pkgs.values():
            p.close()
        eopkg_bytes = built.output.stat().st_size
    flops = count_file(model["model"], input_shapes={model["input"]: model["shape"]})
    raw = {k: float(np.median(v)) for k, v in lat.items()}
    p50, best_threads = {}, {}
    for name in ("package", "ort_fp32", "torch_eager"):
        runs = {t: raw[f"{name}@{t}"] for t in counts if f"{name}@{t}" in raw}
        if runs:
            best_threads[name] = min(runs, key=runs.get)
            p50[name] = runs[best_threads[name]]
    model_bytes = sum(e.size for name, e in m.files.items() if name != "golden.npz")
    int8 = m.precision.startswith("int8")
    gfs = flops.achieved_gflops(p50["package"])
    peak_ref = None
    if peak:
        one = peak.int8_gops_1t if int8 else peak.fp32_gops_1t
        peak_ref = one if best_threads["package"] == 1 else (peak.int8_gops_all if int8 else peak.fp32_gops_all)
    return {
        "model": model["name"], "runtime": m.runtime, "precision": m.precision, "build_s": build_s,
        "float_layers": len(m.validation.float_layers) if m.validation else 0,
        "pipeline_min_cos": m.validation.min_cosine if m.validation else None, "min_cos": min(cosines),
        "heldout": len(cosines), "p50": p50, "threads": best_threads, "raw": raw,
        "iters": {k: len(v) for k, v in lat.items()},
        "size_ratio": model_bytes / Path(model["model"]).stat().st_size, "eopkg_bytes": eopkg_bytes,
        "fp32_bytes": Path(model["model"]).stat().st_size, "model_bytes": model_bytes, "gflop": flops.gflops,
        "budget": m.profile.get("accuracy", {}), "gflops_pkg": gfs, "gflops_fp32": flops.achieved_gflops(p50["ort_fp32"]),
        "peak_pct": 100 * gfs / peak_ref if peak_ref else None, "torch_note": torch_note,
        "decisions": list(m.decisions),
    }


def part2(key: str, args) -> dict:
    """Every cpu-profile candidate on a real model; the winner and why the others lost."""
    from edgeopt.sdk.compare import CompareReport, compare_profile, fit_iterations, make_runoff
    from edgeopt.sdk.pipeline import PackageRequest, evaluate, prepare
    model = sdk_assets.get(key)
    profile = sdk_assets.cpu_profile_for(model)
    req = PackageRequest(model=model["model"], profile=profile, calib=model["calib"], heldout=model["heldout"],
                         input_shapes={model["input"]: model["shape"]}, precision="int8",
                         bench_iterations=args.iterations)
    t0 = time.perf_counter()
    with prepare(req) as prep:
        fit_iterations(prep)  # as `edgeopt compare` does: about 1 s of timing per model
        pc = compare_profile(profile, lambda c: evaluate(prep, c), model_format=prep.source.format,
                             precisions=args.precisions.split(",") if args.precisions else None,
                             runoff=make_runoff(prep))
    doc = CompareReport(model=model["model"], profiles=[pc]).to_dict()["profiles"][0]
    return {"model": model["name"], "seconds": time.perf_counter() - t0, "doc": doc}


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,digits", help="part 1 models (resnet18, digits)")
    ap.add_argument("--real", default="ocr_det,ocr_cls,orientation",
                    help="part 2 real models (ocr_det, ocr_cls, orientation); empty to skip")
    ap.add_argument("--precisions", default=None, help="part 2: limit candidate precisions (compare's names)")
    ap.add_argument("--iterations", type=int, default=200, help="timed iterations per model (part 1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-peak", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)

    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    con.print(f"threads={args.threads}  affinity={sorted(os.sched_getaffinity(0))}  "
              f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')} (numpy is not on the timed path)")
    peak = None
    if not args.no_peak:
        from edgeopt.sdk.peak import measure_peak

        peak = measure_peak(seconds=1.5, threads=args.threads)
        con.print(f"peak (ORT GEMM 1024^3): fp32 {peak.fp32_gops_1t:.0f} GOP/s/core, int8 {peak.int8_gops_1t:.0f} "
                  f"GOP/s/core (int8/fp32 {peak.int8_over_fp32:.2f}x); {args.threads} threads: fp32 "
                  f"{peak.fp32_gops_all:.0f}, int8 {peak.int8_gops_all:.0f} GOP/s")

    rows = []
    for key in [k for k in args.models.split(",") if k]:
        try:
            rows.append(part1(key, args, peak))
        except EdgeoptError as exc:
            con.print(f"[red]{key}: {exc.one_line()}[/]")
    if rows:
        t = Table(title="Part 1: cpu package vs baselines, batch 1 (p50 ms, medians of interleaved rounds; "
                        "each at its faster thread count, shown @N)")
        for c in ("model", "package", "pkg ms", "ORT fp32 ms", "torch ms", "vs ORT fp32", "vs torch", "min cos",
                  "size vs fp32", "GFLOP", "GFLOP/s pkg", "GFLOP/s fp32", "% peak"):
            t.add_column(c, justify="left" if c in ("model", "package") else "right")
        for r in rows:
            p, th = r["p50"], r["threads"]
            tor = p.get("torch_eager")
            t.add_row(r["model"], f"{r['runtime']} {r['precision']}" + (f" ({r['float_layers']} float)"
                                                                       if r["float_layers"] else ""),
                      f"{p['package']:.3f} @{th['package']}", f"{p['ort_fp32']:.3f} @{th['ort_fp32']}",
                      f"{tor:.3f} @{th['torch_eager']}" if tor else "–",
                      f"{p['ort_fp32'] / p['package']:.2f}x", _fmt(tor / p["package"] if tor else None, ".2f") + "x",
                      f"{r['min_cos']:.4f}", f"{r['size_ratio']:.1%}", f"{r['gflop']:.3f}",
                      f"{r['gflops_pkg']:.1f}", f"{r['gflops_fp32']:.1f}", _fmt(r["peak_pct"], ".0f"))
        con.print(t)
        for r in rows:
            raw = r["raw"]
            fixed = []
            for tcount in sorted({int(k.split("@")[1]) for k in raw}):
                pk = raw[f"package@{tcount}"]
                part = f"@{tcount} thread(s): package {pk:.3f} ms, ORT fp32 {raw[f'ort_fp32@{tcount}'] / pk:.2f}x"
                if f"torch_eager@{tcount}" in raw:
                    part += f", torch {raw[f'torch_eager@{tcount}'] / pk:.2f}x"
                fixed.append(part)
            con.print(f"{r['model']} at fixed thread counts: " + "; ".join(fixed))
        for r in rows:
            con.print(f"{r['model']}: build {r['build_s']:.0f} s; held-out {r['heldout']} samples, pipeline min cos "
                      f"{_fmt(r['pipeline_min_cos'], '.4f')}; model files {r['model_bytes']} B vs fp32 "
                      f"{r['fp32_bytes']} B (.eopkg {r['eopkg_bytes']} B); iterations {r['iters']}; {r['torch_note']}")
            for d in r["decisions"]:
                if "chosen" in d or "lost" in d or "float" in d:
                    con.print(f"   decision: {d}", highlight=False)
            p = r["p50"]
            checks = [("vs ORT fp32 >= 1.8x", p["ort_fp32"] / p["package"] >= 1.8),
                      ("min cosine >= 0.98", r["min_cos"] >= 0.98), ("size <= 30%", r["size_ratio"] <= 0.30)]
            if "torch_eager" in p:
                checks.append(("vs torch eager >= 2.5x", p["torch_eager"] / p["package"] >= 2.5))
            con.print("   targets: " + ", ".join(f"{name} {'PASS' if ok else 'MISS'}" for name, ok in checks))

    for key in [k for k in args.real.split(",") if k]:
        try:
            res = part2(key, args)
        except EdgeoptError as exc:
            con.print(f"[red]{key}: {exc.one_line()}[/]")
            continue
        doc = res["doc"]
        t = Table(title=f"Part 2: {res['model']} — cpu profile candidates ({res['seconds']:.0f} s); "
                        f"pick: {doc['pick']}")
        for c in ("configuration", "status", "p50 ms", "run-off ms", "speedup", "min cos", "top-1", "metric Δ", "size",
                  "why"):
            t.add_column(c, justify="left" if c in ("configuration", "status", "why") else "right")
        for r in doc["candidates"]:
            t.add_row(("★ " if r.get("picked") else "") + r["candidate"], r["status"] + (
                "" if r["status"] != "measured" else (" ok" if r["passed"] else " over")),
                _fmt(r.get("p50_ms"), ".3f"), _fmt(r.get("runoff_p50_ms"), ".3f"), _fmt(r.get("speedup"), ".2f"),
                _fmt(r.get("min_cosine"), ".4f"),
                _fmt(r.get("top1_agreement"), ".3f"), _fmt(r.get("metric_drop"), "+.2f"),
                _fmt(r.get("size_bytes"), ",d"), r.get("reason") or "")
        con.print(t)


if __name__ == "__main__":
    main()
