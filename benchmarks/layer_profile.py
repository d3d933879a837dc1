"""Per-layer profiles (issue 12): do the layer times add up, and does an on-device profile hurt serving?

Run:  taskset -c 0,1 .venv/bin/python benchmarks/layer_profile.py [--runs 50] [--serve-s 10] [--rate 20]

1. Sum of per-layer medians vs whole-model latency. ResNet-18 (tests/assets/make_resnet18.py) is packaged by
   the real pipeline four ways (ONNX Runtime and OpenVINO, int8 and fp32, `cpu` profile). For each, in one
   run: the whole-model median latency without any profiler (measured before and after the profile; their
   mean is the baseline), then the per-layer profile (`edgeopt bench --layers`' code path). Target: the sum
   of the layer medians within 15% of the baseline (ratio 0.85..1.15).
2. Serving p99 during an on-device profile. The ONNX Runtime int8 package is installed into a real agent
   store; a serving instance loaded as the agent loads it answers a paced client (``--rate`` requests/s,
   open loop, each request timed from its scheduled start) for ``--serve-s`` seconds without a profile, then
   while `edgeopt agent profile`'s code path runs (its bounds: 1 inference thread, --runs runs, 20 s), then
   again without. Target: p99 during the profile <= 2x the p99 of the two windows without. (The profile runs
   in a child process at nice 19: an earlier version ran it in a niced thread of the agent and p99 rose 4.7x,
   the starved thread holding the GIL that the serving thread waited for.)
   The client calls the loaded model in-process (no HTTP): the ratio isolates the CPU contention a profile
   adds; the HTTP path's own overhead is measured in benchmarks/agent_request_path.py.
Prints a table of ratios; the machine is shared and noisy, so read ratios, not absolute times.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdk_assets  # noqa: E402

BIN = Path(sys.executable).parent


def build(model: dict, runtime: str, precision: str, out: Path) -> Path:
    path = out / f"r18-{runtime}-{precision}.eopkg"
    cmd = [BIN / "edgeopt", "package", model["model"], "--calib", model["calib"], "--heldout", model["heldout"],
           "--runtime", runtime, "--precision", precision, "--name", "r18", "--iterations", "5", "--no-sign",
           "--task", "generic",  # random weights: near-tied logits make top-1 meaningless (BENCHMARKS.md, issue 2)
           "--calib-samples", "16", "--heldout-samples", "4", "-o", path]
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"packaging {runtime} {precision} failed: {done.stderr[-1500:]}")
    return path


def layer_sums(packages: dict, runs: int, threads: int | None) -> list[dict]:
    from edgeopt.sdk.pipeline.layerbench import profile_package

    rows = []
    for (runtime, precision), path in packages.items():
        doc, _ = profile_package(path, runs=runs, warmup=3, threads=threads)
        top = sorted(doc["layers"], key=lambda r: -r["median_us"])[:3]
        rows.append({"package": f"{runtime} {precision}", "latency_ms": doc["latency_ms"],
                     "profiled_run_ms": doc["profiled_run_ms"], "layer_sum_ms": doc["layer_sum_ms"],
                     "ratio": doc["layer_sum_vs_latency"], "layers": len(doc["layers"]),
                     "accounted": doc.get("accounted_share"),
                     "compute_precisions": doc["compute_precisions"], "by_op_type": doc["by_op_type"][:4],
                     "top": [(r["name"], r["precision"], r["median_us"]) for r in top]})
    return rows


def _paced(loaded, feeds, seconds: float, rate: float) -> list[float]:
    """Open-loop client: request i is due at t0 + i/rate; its latency counts from when it was due."""
    lat = []
    period = 1.0 / rate
    t0 = time.perf_counter()
    i = 0
    while True:
        due = t0 + i * period
        now = time.perf_counter()
        if due - t0 > seconds:
            break
        if due > now:
            time.sleep(due - now)
        loaded.infer(feeds)
        lat.append((time.perf_counter() - due) * 1e3)
        i += 1
    return lat


def serving_during_profile(package: Path, seconds: float, rate: float, runs: int) -> dict:
    from edgeopt.agent.config import AgentConfig
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.loader import load_installed, read_golden, warm_up
    from edgeopt.agent.profile import DEFAULT_DEADLINE_S, profile_installed
    from edgeopt.agent.store import Store

    state = Path(tempfile.mkdtemp(prefix="lp-agent-"))
    try:
        config = AgentConfig.model_validate({"device_id": "bench", "fleet": "bench", "state_dir": str(state),
                                             "broker": {"url": "mqtt://127.0.0.1:1883"},
                                             "allow_unsigned": True})
        store = Store(state)
        installed = Installer(store, config, capabilities=None).install_file(package)
        serving = load_installed(installed, config)
        warm_up(serving, 5)
        feeds = read_golden(installed.path / installed.manifest.golden.file)[0][0]
        quiet1 = _paced(serving, feeds, seconds, rate)
        result: dict = {}

        def profile():
            t = time.perf_counter()
            doc, _ = profile_installed(installed, config, runs=runs, deadline_s=DEFAULT_DEADLINE_S)
            result.update(seconds=time.perf_counter() - t, runs=doc["runs"])

        worker = threading.Thread(target=profile)
        worker.start()
        busy = []
        while worker.is_alive():  # the profiled window lasts exactly as long as the profile
            busy += _paced(serving, feeds, 1.0, rate)
        worker.join()
        quiet2 = _paced(serving, feeds, seconds, rate)
        serving.close()
    finally:
        shutil.rmtree(state, ignore_errors=True)
    p99 = lambda v: float(np.percentile(v, 99))  # noqa: E731
    base = (p99(quiet1) + p99(quiet2)) / 2
    return {"p99_without_ms": base, "p99_before_ms": p99(quiet1), "p99_after_ms": p99(quiet2),
            "p99_during_ms": p99(busy), "ratio": p99(busy) / base, "p50_without_ms": float(np.median(quiet1 + quiet2)),
            "p50_during_ms": float(np.median(busy)), "requests_during": len(busy), "profile_s": result.get("seconds"),
            "profile_runs": result.get("runs")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50, help="profiled runs (and plain-latency runs) per package")
    ap.add_argument("--serve-s", type=float, default=10.0, help="seconds of each window without a profile")
    ap.add_argument("--rate", type=float, default=20.0, help="serving requests per second")
    ap.add_argument("--threads", type=int, default=0,
                    help="inference threads for part 1 (0: the package's own, i.e. all cores)")
    ap.add_argument("--skip-serving", action="store_true", help="part 1 only")
    ap.add_argument("--serving-only", action="store_true", help="part 2 only")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200)
    model = sdk_assets.resnet18()
    out = Path(tempfile.mkdtemp(prefix="lp-pkgs-"))
    try:
        if args.serving_only:
            packages = {("onnxruntime", "int8"): build(model, "onnxruntime", "int8", out)}
            rows = []
        else:
            packages = {(rt, p): build(model, rt, p, out) for rt in ("onnxruntime", "openvino")
                        for p in ("int8", "fp32")}
            rows = layer_sums(packages, args.runs, args.threads or None)
        table = Table(title=f"ResNet-18: sum of layer medians vs whole-model median ({args.runs} runs each, "
                            f"{args.threads or 'default'} threads)")
        for col in ("package", "latency ms (no profiler)", "profiled run ms", "layer sum ms", "ratio", "target",
                    "run accounted", "layers"):
            table.add_column(col, justify="left" if col in ("package", "compute precisions (µs)") else "right")
        for r in rows:
            ok = 0.85 <= r["ratio"] <= 1.15
            table.add_row(r["package"], f"{r['latency_ms']:.2f}", f"{r['profiled_run_ms']:.2f}",
                          f"{r['layer_sum_ms']:.2f}", f"{r['ratio']:.3f}", "0.85-1.15 " + ("met" if ok else "MISSED"),
                          f"{r['accounted']:.1%}", str(r["layers"]))
        con.print(table)
        for r in rows:
            con.print(f"{r['package']}: compute precisions (µs) {json.dumps(r['compute_precisions'])}; top op types "
                      + ", ".join(f"{g['op_type']} {g['precision']} {g['share']:.0%}" for g in r["by_op_type"]),
                      highlight=False)
        if args.skip_serving:
            if args.json:
                args.json.write_text(json.dumps({"layer_sums": rows}, indent=1, default=str))
            return
        serve = serving_during_profile(packages[("onnxruntime", "int8")], args.serve_s, args.rate, args.runs)
        t2 = Table(title=f"Serving p99 during an on-device profile (ONNX Runtime int8, {args.rate:g} req/s)")
        for col in ("p99 without (before/after) ms", "p99 during ms", "ratio", "target", "p50 without/during ms",
                    "profile"):
            t2.add_column(col, justify="right")
        t2.add_row(f"{serve['p99_without_ms']:.2f} ({serve['p99_before_ms']:.2f}/{serve['p99_after_ms']:.2f})",
                   f"{serve['p99_during_ms']:.2f}", f"{serve['ratio']:.2f}",
                   "<= 2 " + ("met" if serve["ratio"] <= 2 else "MISSED"),
                   f"{serve['p50_without_ms']:.2f}/{serve['p50_during_ms']:.2f}",
                   f"{serve['profile_runs']} runs, {serve['profile_s']:.1f} s with load")
        con.print(t2)
        if args.json:
            args.json.write_text(json.dumps({"layer_sums": rows, "serving": serve}, indent=1, default=str))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
