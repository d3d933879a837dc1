"""Every real model of the test set through `edgeopt package --profile cpu`, judged by its task.

For each model (and, where int8 needs it, with --accuracy-aware too) this prints what was packaged, the task
and the metric that decided, each candidate's verdict under the task gate next to the verdict the old
whole-output cosine gate (min cosine >= 0.99) would have given, and the speed-up against ONNX Runtime fp32
measured in the same run (ratio of medians, interleaved rounds; never a lone absolute time).

    .venv/bin/python benchmarks/task_accuracy.py                       # every model, plain and accuracy-aware
    .venv/bin/python benchmarks/task_accuracy.py --models yolo --modes aa --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sdk_assets  # noqa: E402

OLD_GATE = 0.99  # the former rule: min cosine of the whole (concatenated) output on every held-out sample
AA_MODELS = ("yolo", "blazeface", "ocr_det", "orientation")  # int8 misses plain: accuracy-aware is the question


def run(key: str, mode: str, iterations: int) -> dict:
    from edgeopt.sdk.errors import EdgeoptError
    from edgeopt.sdk.pipeline import ImagePreprocessing, PackageRequest, build_package

    model = sdk_assets.get(key)
    prep = None
    if "mean" in model:
        prep = ImagePreprocessing(mean=model["mean"], std=model["std"])
    profile = sdk_assets.cpu_profile_for(model)
    out = Path("/tmp") / f"task-accuracy-{key}-{mode}.eopkg"
    req = PackageRequest(model=model["model"], profile=profile, calib=model["calib"], heldout=model["heldout"],
                         input_shapes={} if key in ("yolo", "blazeface") else {model["input"]: model["shape"]},
                         preprocessing=prep, unsigned=True, output=out, accuracy_aware=mode == "aa",
                         bench_iterations=iterations, task="generic" if key == "resnet18" else "auto")
    started = time.monotonic()
    try:
        result = build_package(req)
    except EdgeoptError as exc:
        return {"model": model["name"], "mode": mode, "error": exc.one_line(), "seconds": time.monotonic() - started}
    finally:
        out.unlink(missing_ok=True)
    v = result.validation
    rows = []
    # The side-by-side run-off (all in-budget candidates timed in interleaved rounds) is the fairest speed
    # comparison on a shared host: ratio against ONNX Runtime's own fp32 candidate in that run-off.
    ort_fp32 = next((r.runoff_p50_ms for r in result.tried if r.candidate.label.startswith("onnxruntime/fp32")
                     and r.runoff_p50_ms), None)
    for r in result.tried:
        rv = r.validation
        checks = {c.name: c.optimized for c in rv.checks} if rv else {}
        rows.append({"candidate": r.candidate.label, "passed": r.passed, "old_gate": bool(rv and rv.min_cosine >= OLD_GATE),
                     "min_cosine": rv.min_cosine if rv else None, "checks": checks, "speedup": r.speedup,
                     "float_layers": len(rv.float_layers) if rv else 0, "chosen": r is result.chosen,
                     "runoff_speedup": ort_fp32 / r.runoff_p50_ms if ort_fp32 and r.runoff_p50_ms else None})
    return {"model": model["name"], "mode": mode, "task": v.task, "metric": v.metric.name if v.metric else None,
            "value": v.metric.optimized if v.metric else None, "precision": result.manifest.precision,
            "runtime": result.manifest.runtime, "speedup": result.benchmark.speedup, "candidates": rows,
            "float_layers": len(v.float_layers), "seconds": time.monotonic() - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(sdk_assets.MODELS))
    ap.add_argument("--modes", default="plain,aa", help="plain and/or aa (accuracy-aware, only for int8-hard models)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    results = []
    for key in args.models.split(","):
        for mode in args.modes.split(","):
            if mode == "aa" and key not in AA_MODELS:
                continue
            print(f"{key} {mode} ...", file=sys.stderr, flush=True)
            results.append(run(key, mode, args.iterations))
    table = Table(title="cpu profile, judged by the task (speed-up vs ONNX Runtime fp32, same run)")
    for col in ("model", "mode", "task", "candidate", "task gate", "old cosine gate", "min cosine", "task metrics",
                "speed-up", "run-off speed-up", "float layers", "packaged"):
        table.add_column(col)
    for res in results:
        if "error" in res:
            table.add_row(res["model"], res["mode"], "", "", "", "", "", res["error"][:120], "", "", "", "no")
            continue
        for row in res["candidates"]:
            metrics = ", ".join(f"{k} {v:.3f}" for k, v in row["checks"].items())
            table.add_row(res["model"], res["mode"], res["task"], row["candidate"], "PASS" if row["passed"] else "FAIL",
                          "pass" if row["old_gate"] else "fail", f"{row['min_cosine']:.4f}" if row["min_cosine"] else "",
                          metrics, f"{row['speedup']:.2f}x" if row["speedup"] else "",
                          f"{row['runoff_speedup']:.2f}x" if row.get("runoff_speedup") else "", str(row["float_layers"]),
                          "<-" if row["chosen"] else "")
    Console(width=250).print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
