"""Pruning benchmark (issue 11): pruned + int8 vs unpruned int8 on the same runtime, batch 1, digits ResNet.

Run (2 cores here; pin them so every model sees the same CPUs):

    taskset -c 0,1 .venv/bin/python benchmarks/prune_bench.py                    # ratio 0.5, 300 recovery steps
    taskset -c 0,1 .venv/bin/python benchmarks/prune_bench.py --ratios 0.3,0.5 --steps 150 --iterations 300

The model is the residual network the tests train on scikit-learn's digits (tests/assets/digits_resnet; weights
cached in .cache/assets/digits_resnet_v1/, trained once if missing). For each ratio: prune through Torch-Pruning
(l2, channels rounded to the cpu profile's multiple), recover by distillation from the unpruned model on the
unlabelled training split, export to ONNX; then each model (unpruned and pruned) is quantized to int8 by the
real pipeline (``prepare`` + ``evaluate`` of the cpu profile on the chosen runtime, ONNX Runtime by default),
and all int8 models and the unpruned fp32 model are timed interleaved in rounds in this one run (medians).
Accuracy is against the held-out labels (450 images never trained on), compared with the unpruned fp32 model.

Target: pruned 50% + int8 >= 1.6x faster than unpruned int8 at batch 1, accuracy within 1 point of the unpruned
fp32 model. Timing is not asserted: this prints the table. The machine is shared and noisy: compare ratios of
one run, not absolute milliseconds across runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "assets" / "digits_resnet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ratios", default="0.5", help="Comma-separated pruning ratios (default 0.5).")
    parser.add_argument("--steps", type=int, default=300, help="Distillation steps per ratio (default 300).")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    parser.add_argument("--iterations", type=int, default=500, help="Timed iterations per model (default 500).")
    parser.add_argument("--json", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import torch

    import digits_resnet as dr
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.pipeline import PackageRequest, candidates_for, evaluate, prepare
    from edgeopt.sdk.pipeline.benchmark import measure
    from edgeopt.sdk.pipeline.evaluation import device_options
    from edgeopt.sdk.profile import load_profile
    from edgeopt.sdk.prune import prune_model
    from edgeopt.sdk.prune.source import TorchInput, export_onnx

    folder = ROOT / ".cache" / "assets" / "digits_resnet_v1"
    weights = folder / "weights.pt"
    if not weights.exists():
        print("training the digits ResNet (once; cached)...", file=sys.stderr)
        (folder / "metrics.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(dr.train(weights)))
    data = dr.inputs(folder)
    calib = np.load(data["calib"])["images"]
    held = np.load(data["heldout"])
    x_te, y_te = held["images"], held["labels"]
    profile = load_profile("cpu")
    inputs = [TorchInput("images", (1, 1, 24, 24))]
    model = dr.build()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    example = (torch.from_numpy(x_te[:1]),)
    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    unpruned = export_onnx(model, example, inputs, work / "unpruned.onnx")
    samples = [(calib[i:i + 1],) for i in range(len(calib))]

    rows, preps, loaded, sizes = [], [], {}, {"fp32": unpruned.stat().st_size}
    try:
        def int8(path: Path, label: str, extra: dict):
            req = PackageRequest(model=path, profile=profile, calib=data["calib"], heldout=data["heldout"],
                                 runtime=args.runtime, precision="int8", **extra)
            prep = prepare(req)
            preps.append(prep)
            result = evaluate(prep, candidates_for(prep)[0])
            if not result.ok:
                raise SystemExit(f"{label}: int8 build failed: {result.error}")
            sizes[label] = result.artifact.size_bytes
            loaded[label] = get_runtime(args.runtime).load(result.artifact.model_file, device=result.run_device or result.device,
                                                           threads=prep.threads,
                                                           options=device_options(result.artifact.runtime_options,
                                                                                  result.run_device))
            return result

        fp32_acc = _accuracy(get_runtime("onnxruntime").load(unpruned, device="CPUExecutionProvider"), x_te, y_te)
        loaded["fp32"] = get_runtime("onnxruntime").load(unpruned, device="CPUExecutionProvider")
        base = int8(unpruned, "int8", {})
        infos = {}
        for ratio in [float(r) for r in args.ratios.split(",")]:
            res = prune_model(model, example, ratio=ratio, round_to=profile.pruning.round_to, steps=args.steps,
                              data=samples, lr=args.lr)
            path = export_onnx(res.model, example, inputs, work / f"pruned-{ratio}.onnx")
            label = f"pruned {ratio:.0%} + int8"
            int8(path, label, {"reference_model": unpruned})
            infos[label] = (res.info, path)
        feed = {"images": x_te[:1]}
        stats = measure(loaded, {k: feed for k in loaded}, batch=1, iterations=args.iterations, warmup=20,
                        rounds=10)
        base_ms = stats["int8"].p50_ms
        for label in loaded:
            acc = _accuracy(loaded[label], x_te, y_te)
            info = infos.get(label, (None,))[0]
            row = {"model": label, "p50_ms": stats[label].p50_ms, "speedup_vs_unpruned_int8": base_ms / stats[label].p50_ms,
                   "accuracy": acc, "drop_vs_fp32_points": 100 * (fp32_acc - acc), "size_bytes": sizes[label]}
            if info is not None:
                row.update(params=info.params_after, flops=info.flops_after, recovery_loss=[info.recovery_loss_first,
                                                                                            info.recovery_loss_last])
            else:
                row.update(params=infos and next(iter(infos.values()))[0].params_before,
                           flops=infos and next(iter(infos.values()))[0].flops_before)
            rows.append(row)
    finally:
        for m in loaded.values():
            m.close()
        for p in preps:
            p.close()
    _print(rows, args)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def _accuracy(loaded, x, y) -> float:
    preds = np.concatenate([next(iter(loaded.infer({"images": x[i:i + 1]}).values())).argmax(1)
                            for i in range(len(x))])
    return float((preds == y).mean())


def _print(rows, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"digits ResNet, batch 1, {args.runtime}, {args.iterations} iterations each (medians)")
    for col in ("model", "p50 ms", "x vs unpruned int8", "held-out acc", "drop vs fp32 (pt)", "params", "FLOPs", "size"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in rows:
        table.add_row(r["model"], f"{r['p50_ms']:.3f}", f"{r['speedup_vs_unpruned_int8']:.2f}x",
                      f"{100 * r['accuracy']:.2f}%", f"{r['drop_vs_fp32_points']:+.2f}",
                      f"{r['params']:,}" if r.get("params") else "-", f"{r['flops']:,}" if r.get("flops") else "-",
                      f"{r['size_bytes'] / 1024:.0f} KiB")
    Console(width=150).print(table)


if __name__ == "__main__":
    main()
