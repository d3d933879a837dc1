"""Does `edgeopt compare` pick a configuration within 5% of the fastest one that meets the budget?

Run:  taskset -c 0,1 .venv/bin/python benchmarks/sdk_compare_pick.py [--models resnet18,digits] [--iterations 200]

For each model and the `cpu` profile this runs the code path of `edgeopt compare` (candidate enumeration, the
pipeline's ``prepare``/``evaluate`` per candidate, ``select``), then, in the same process and while the built
candidates still exist, re-measures every candidate that holds the budget, interleaved in rounds with the same
thread count, and reports the pick's re-measured p50 against the fastest re-measured p50. Target: <= 1.05.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sdk_assets  # noqa: E402
from sdk_speed import interleaved  # noqa: E402


def check(key: str, args, con) -> dict:
    from rich.table import Table

    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.compare import compare_profile, eligible, fit_iterations, make_runoff
    from edgeopt.sdk.pipeline import PackageRequest, evaluate, prepare

    model = sdk_assets.get(key)
    profile = sdk_assets.cpu_profile_for(model)
    req = PackageRequest(model=model["model"], profile=profile, calib=model["calib"], heldout=model["heldout"],
                         input_shapes={model["input"]: model["shape"]}, precision="int8",
                         bench_iterations=50)
    t0 = time.perf_counter()
    with prepare(req) as prep:
        fit_iterations(prep, args.compare_iterations)  # as `edgeopt compare` does
        pc = compare_profile(profile, lambda c: evaluate(prep, c), model_format=prep.source.format,
                             precisions=args.precisions.split(",") if args.precisions else None,
                             runoff=make_runoff(prep))
        compare_s = time.perf_counter() - t0
        good = eligible(pc.results)
        if pc.pick is None:
            con.print(f"{model['name']}: no candidate within budget; nothing to check")
            return {"model": model["name"], "ratio": None}
        feed = sdk_assets.heldout_feeds(model, limit=1)[0]
        loaded = {}
        for r in good:
            # Same thread setting as compare's own measurement (the profile's policy), unless --threads says.
            loaded[r.candidate.label] = get_runtime(r.candidate.runtime).load(
                r.artifact.model_file, device=r.run_device, threads=args.threads or prep.threads,
                performance_hint="latency")
        try:
            fns = {label: (lambda m=m: m.infer(feed)) for label, m in loaded.items()}
            lat = interleaved(fns, args.iterations, args.rounds)
        finally:
            for m in loaded.values():
                m.close()
    p50 = {k: float(np.median(v)) for k, v in lat.items()}
    fastest_label = min(p50, key=p50.get)
    pick = pc.pick.candidate.label
    ratio = p50[pick] / p50[fastest_label]
    t = Table(title=f"{model['name']} (cpu profile, budget min cosine {profile.accuracy.min_cosine}): compare "
                    f"{compare_s:.0f} s, pick {pick}")
    for c in ("configuration", "compare p50 ms", "compare speedup", "compare run-off ms", "re-measured p50 ms",
              "vs fastest", ""):
        t.add_column(c, justify="left" if c in ("configuration", "") else "right")
    for r in pc.results:
        label = r.candidate.label
        in_budget = r in good
        t.add_row(label, f"{r.optimized.p50_ms:.3f}" if r.optimized else "–",
                  f"{r.speedup:.2f}x" if r.speedup else "–",
                  f"{pc.runoff_ms[label]:.3f}" if label in pc.runoff_ms else "–",
                  f"{p50[label]:.3f}" if in_budget else "–",
                  f"{p50[label] / p50[fastest_label]:.3f}" if in_budget else "–",
                  ("PICK" if label == pick else "") + ("" if in_budget else ("over budget" if r.ok else "failed")))
    con.print(t)
    verdict = "PASS" if ratio <= 1.05 else "MISS"
    con.print(f"{model['name']}: pick {pick} re-measured at {ratio:.3f}x the fastest in-budget candidate "
              f"({fastest_label}) -> {verdict} (target <= 1.05)")
    return {"model": model["name"], "ratio": ratio, "pick": pick, "fastest": fastest_label, "verdict": verdict}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="resnet18,digits")
    ap.add_argument("--precisions", default=None, help="limit candidate precisions (compare's names)")
    ap.add_argument("--compare-iterations", type=int, default=None,
                    help="iterations of compare's own benchmark (default: compare's automatic count)")
    ap.add_argument("--iterations", type=int, default=200, help="iterations of the re-measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for the re-measurement (default: the profile's policy, as compare used)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    from rich.console import Console

    con = Console(width=200)
    con.print(f"threads={args.threads or 'profile policy'} affinity={sorted(os.sched_getaffinity(0))}")
    results = [check(k, args, con) for k in args.models.split(",") if k]
    for r in results:
        if r["ratio"] is not None:
            con.print(f"summary: {r['model']}: {r['ratio']:.3f}x ({r['verdict']})")


if __name__ == "__main__":
    main()
