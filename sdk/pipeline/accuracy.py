"""Stage 5, accuracy: the fp32 original vs the optimized model on held-out samples (never the
calibration samples), against the profile's budget; per-layer sensitivity when the budget is missed."""
from __future__ import annotations

import logging

import numpy as np

from ..package import LayerError, MetricResult, ValidationReport
from ..profile import AccuracyBudget

log = logging.getLogger(__name__)


def _rows(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """One row per sample in the batch: all outputs flattened and concatenated."""
    parts = []
    for value in outputs.values():
        arr = np.asarray(value, dtype=np.float64)
        batch = arr.shape[0] if arr.ndim > 1 else 1
        parts.append(arr.reshape(batch, -1))
    batches = {p.shape[0] for p in parts}
    if len(batches) != 1:  # outputs disagree on the batch axis: treat the batch as one sample
        return np.concatenate([p.reshape(1, -1) for p in parts], axis=1)
    return np.concatenate(parts, axis=1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def is_classifier(outputs: dict[str, np.ndarray]) -> bool:
    """One output of shape [batch, classes] with classes > 1: top-1 agreement applies."""
    first = np.asarray(next(iter(outputs.values())))
    return len(outputs) == 1 and first.ndim == 2 and first.shape[1] > 1


def compare(reference: list[dict], optimized: list[dict], budget: AccuracyBudget,
            labels: np.ndarray | None = None) -> ValidationReport:
    """Cosine per sample (min/mean), max abs error, top-1 agreement (classifiers), accuracy (labels)."""
    cosines, max_abs, ref_top, opt_top = [], 0.0, [], []
    finite = True
    classifier = is_classifier(reference[0])
    for ref, opt in zip(reference, optimized):
        r, o = _rows(ref), _rows(opt)
        if not np.all(np.isfinite(o)):
            finite = False
            o = np.nan_to_num(o, nan=0.0, posinf=0.0, neginf=0.0)
        max_abs = max(max_abs, float(np.max(np.abs(r - o))) if r.size else 0.0)
        cosines.extend(cosine(a, b) for a, b in zip(r, o))
        if classifier:
            ref_top.extend(np.argmax(next(iter(ref.values())), axis=1).tolist())
            opt_top.extend(np.argmax(next(iter(opt.values())), axis=1).tolist())
    report = dict(samples=len(cosines), max_abs_error=max_abs, min_cosine=min(cosines), mean_cosine=float(np.mean(cosines)))
    failures: list[str] = []
    if not finite:
        failures.append("the optimized model produced NaN or infinite values")
    top1 = None
    if classifier:
        top1 = float(np.mean(np.asarray(ref_top) == np.asarray(opt_top)))
    metric = None
    if labels is not None and classifier:
        labels = np.asarray(labels).reshape(-1)[: len(ref_top)]
        acc32 = 100.0 * float(np.mean(np.asarray(ref_top) == labels))
        acc_opt = 100.0 * float(np.mean(np.asarray(opt_top) == labels))
        metric = MetricResult(name="accuracy", fp32=acc32, optimized=acc_opt, drop=acc32 - acc_opt)
    budget_doc = {"min_cosine": budget.min_cosine, "min_top1_agreement": budget.min_top1_agreement,
                  "max_metric_drop": budget.max_metric_drop}
    if metric is not None:
        # With labels the task metric decides (the budget: at most 1 point of drop).
        budget_doc["rule"] = "task metric drop"
        if metric.drop > budget.max_metric_drop:
            failures.append(f"accuracy dropped {metric.drop:.2f} points ({metric.fp32:.2f} -> {metric.optimized:.2f}),"
                            f" budget {budget.max_metric_drop:.2f}")
    else:
        budget_doc["rule"] = "cosine" + (" and top-1 agreement" if classifier else "")
        if report["min_cosine"] < budget.min_cosine:
            failures.append(f"min output cosine {report['min_cosine']:.6f} < {budget.min_cosine}")
        if top1 is not None and top1 < budget.min_top1_agreement:
            failures.append(f"top-1 agreement {top1:.2%} < {budget.min_top1_agreement:.0%}")
    return ValidationReport(**report, top1_agreement=top1, metric=metric, budget=budget_doc,
                            passed=not failures, failures=failures)


def layer_errors(layers, reference_probe, optimized_probe, feeds: list[dict]) -> list[LayerError]:
    """Error each layer adds: (1 - cosine of its output vs fp32) minus the worst one among its upstream layers.

    Errors accumulate through a network, so the raw per-layer error points at the last layers; the
    increase over the layers feeding it points at the layer that breaks the budget. Cosines are
    accumulated one feed at a time (dot products and norms), so memory stays at one sample's tensors.
    """
    dot: dict[str, float] = {}
    n_ref: dict[str, float] = {}
    n_opt: dict[str, float] = {}
    for feed in feeds:
        ref, opt = reference_probe(feed), optimized_probe(feed)
        for name, r in ref.items():
            o = opt.get(name)
            if o is None or o.shape != r.shape:
                continue
            r64, o64 = r.astype(np.float64).ravel(), np.nan_to_num(o.astype(np.float64).ravel())
            dot[name] = dot.get(name, 0.0) + float(r64 @ o64)
            n_ref[name] = n_ref.get(name, 0.0) + float(r64 @ r64)
            n_opt[name] = n_opt.get(name, 0.0) + float(o64 @ o64)
    raw: dict[str, float] = {}
    for name in dot:
        if n_ref[name] == 0.0 and n_opt[name] == 0.0:
            raw[name] = 0.0
        elif n_ref[name] == 0.0 or n_opt[name] == 0.0:
            raw[name] = 1.0
        else:
            raw[name] = max(0.0, 1.0 - dot[name] / np.sqrt(n_ref[name] * n_opt[name]))
    added = []
    for layer in layers:
        if layer.name not in raw:
            continue
        upstream = max((raw[u] for u in layer.upstream if u in raw), default=0.0)
        added.append(LayerError(layer=layer.name, error=max(0.0, raw[layer.name] - upstream)))
    added.sort(key=lambda e: e.error, reverse=True)
    # Layers whose output could not be compared (renamed or fused by the quantizer) go last, so that keeping
    # "every layer" in float really is the float model.
    seen = {e.layer for e in added}
    added.extend(LayerError(layer=l.name, error=0.0) for l in layers if l.name not in seen)
    return added
