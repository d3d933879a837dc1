"""Sensitivity scan (``edgeopt prune --scan``): each layer group pruned alone at several ratios, no recovery.

A group is what DepGraph ties together (a convolution, the BatchNorm after it, the layers reading its
channels, and across a residual add every layer on both sides). Each (group, ratio) is pruned on a fresh copy
of the model through Torch-Pruning's own group API, then judged against the unpruned model on the calibration
inputs (top-1 agreement for classifier outputs, else the worst per-sample output cosine) and timed with ONNX
Runtime fp32 at batch 1, interleaved with the unpruned model in the same run, so a user sees which layers can
lose channels and what each saves.
"""
from __future__ import annotations

import copy
import html
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

from .core import _flatten, check_ratio, measure, output_layers, require_torch, run

log = logging.getLogger(__name__)


def scan(model, example: tuple, data: list[tuple], ratios=(0.25, 0.5, 0.75), *, input_names: list[str],
         round_to: int | None = None, samples: int = 64, iterations: int = 60, progress=None) -> list[dict]:
    """One row per (layer group, ratio): {group, layers, channels, ratio, kept, metric_name, metric,
    flops_ratio, latency_ratio, p50_ms, base_p50_ms}. ``data``: calibration input tuples (judging inputs)."""
    torch, tp = require_torch()
    from ...agent.runtimes import get_runtime
    from ..errors import InputError
    from ..pipeline.benchmark import measure as time_models
    from ..pipeline.load import export_torch

    ratios = [check_ratio(r, "scan ratio") for r in ratios]
    if not data:
        raise InputError("the sensitivity scan judges each pruned variant on calibration inputs; none were given",
                         hint="pass --calib IMAGE_FOLDER or .npz")
    model = copy.deepcopy(model).eval()
    feeds = [tuple(torch.as_tensor(t).float() for t in item) for item in data[:samples]]
    with torch.no_grad():
        reference = [_outputs(torch, model, f) for f in feeds]
    heads = output_layers(torch, model, example)
    base_macs, _ = measure(tp, model, example)
    groups = _groups(tp, torch, model, example, heads)
    work = Path(tempfile.mkdtemp(prefix="edgeopt-scan-"))
    ort = get_runtime("onnxruntime")
    base_path = export_torch(model, example, work / "base.onnx", input_names=input_names)
    base = ort.load(base_path, device="CPUExecutionProvider")
    feed = {n: example[i].numpy() for i, n in enumerate(input_names)}
    rows: list[dict] = []
    bar = progress.steps("sensitivity scan", len(groups) * len(ratios)) if hasattr(progress, "steps") else None
    try:
        for gi, (_, group, layers) in enumerate(groups):
            root = group[0].dep.target.module
            channels = int(root.out_channels if hasattr(root, "out_channels") else root.out_features)
            for ratio in ratios:
                keep = _kept(channels, ratio, round_to)
                variant = copy.deepcopy(model)
                if keep < channels:
                    vgroup = _groups(tp, torch, variant, example, heads)[gi][1]
                    scores = tp.importance.GroupMagnitudeImportance(p=2)(vgroup)
                    vgroup.prune(idxs=sorted(scores.argsort()[: channels - keep].tolist()))
                variant.eval()
                with torch.no_grad():
                    outs = [_outputs(torch, variant, f) for f in feeds]
                name, value = _judge(reference, outs)
                macs, _ = measure(tp, variant, example)
                path = export_torch(variant, example, work / f"v{gi}-{ratio}.onnx", input_names=input_names)
                loaded = ort.load(path, device="CPUExecutionProvider")
                try:
                    stats = time_models({"base": base, "variant": loaded}, {"base": feed, "variant": feed}, batch=1,
                                        iterations=iterations, warmup=3, rounds=5)
                finally:
                    loaded.close()
                rows.append({"group": gi, "layers": layers, "channels": channels, "ratio": ratio, "kept": keep,
                             "metric_name": name, "metric": value, "flops_ratio": macs / base_macs,
                             "latency_ratio": stats["variant"].p50_ms / stats["base"].p50_ms,
                             "p50_ms": stats["variant"].p50_ms, "base_p50_ms": stats["base"].p50_ms})
                if bar:
                    bar(value)
    finally:
        if bar:
            bar.close()
        base.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return rows


def _kept(channels: int, ratio: float, round_to: int | None) -> int:
    keep = max(1, channels - int(channels * ratio))
    if round_to and round_to > 1:
        keep = min(channels, max(round_to, int(round(keep / round_to)) * round_to))
    return keep


def _outputs(torch, model, feed: tuple) -> list[np.ndarray]:
    return [t.detach().numpy() for t in _flatten(run(model, feed)) if torch.is_tensor(t)]


def _judge(reference: list[list[np.ndarray]], outs: list[list[np.ndarray]]) -> tuple[str, float]:
    """Top-1 agreement when the first output is classifier logits ([N, C]), else the worst output cosine."""
    first = reference[0][0]
    if first.ndim == 2 and first.shape[1] > 1:
        agree = [np.argmax(r[0], 1) == np.argmax(o[0], 1) for r, o in zip(reference, outs)]
        return "top-1 agreement", float(np.mean(np.concatenate(agree)))
    worst = 1.0
    for r, o in zip(reference, outs):
        for a, b in zip(r, o):
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            denom = np.linalg.norm(a) * np.linalg.norm(b)
            worst = min(worst, float(a @ b / denom) if denom else 1.0)
    return "min cosine", worst


def render_html(rows: list[dict], title: str) -> str:
    """A self-contained page: the metric-vs-ratio plot per group (inline SVG, matplotlib) and the table."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..errors import missing_extra

        raise missing_extra("matplotlib", "sdk") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for gi in sorted({r["group"] for r in rows}):
        mine = [r for r in rows if r["group"] == gi]
        label = f"{gi}: {mine[0]['layers'][0] if mine[0]['layers'] else '?'} ({mine[0]['channels']} ch)"
        ax1.plot([r["ratio"] for r in mine], [r["metric"] for r in mine], marker="o", label=label)
        ax2.plot([r["ratio"] for r in mine], [r["latency_ratio"] for r in mine], marker="o", label=label)
    ax1.set_xlabel("ratio of the group's channels removed")
    ax1.set_ylabel(rows[0]["metric_name"] if rows else "metric")
    ax2.set_xlabel("ratio of the group's channels removed")
    ax2.set_ylabel("latency vs unpruned (ONNX Runtime fp32, batch 1)")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    head = ("<tr><th>group</th><th>layers</th><th>channels</th><th>ratio</th><th>kept</th><th>metric</th>"
            "<th>FLOPs vs unpruned</th><th>latency vs unpruned</th></tr>")
    body = "".join(
        f"<tr><td>{r['group']}</td><td>{html.escape(', '.join(r['layers']))}</td><td>{r['channels']}</td>"
        f"<td>{r['ratio']:.2f}</td><td>{r['kept']}</td><td>{r['metric']:.4f}</td><td>{r['flops_ratio']:.3f}</td>"
        f"<td>{r['latency_ratio']:.3f}</td></tr>" for r in rows)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:2px 6px;text-align:right}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Each layer group pruned alone (l2), no recovery; metric against the "
            f"unpruned model on the calibration inputs; latency measured interleaved with the unpruned model in "
            f"the same run (medians).</p>{svg}<table>{head}{body}</table></body></html>")


def _groups(tp, torch, model, example, heads):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example,
                                               forward_fn=lambda m, x: run(m, x if isinstance(x, tuple) else (x,)))
    named = {m: n for n, m in model.named_modules()}
    ignored = [m for n, m in model.named_modules() if n in heads]
    out = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.modules.conv._ConvNd,
                                                                             torch.nn.Linear]):
        layers = sorted({named[d.target.module] for d, _ in group
                         if isinstance(d.target.module, (torch.nn.modules.conv._ConvNd, torch.nn.Linear))
                         and d.target.module in named})
        out.append((dg, group, layers))
    return out
