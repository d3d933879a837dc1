"""Stage 5, accuracy: the fp32 original vs the optimized model on held-out samples (never the
calibration samples), against the profile's budget; per-layer sensitivity when the budget is missed."""
from __future__ import annotations

import logging

import numpy as np

from ..package import LayerError, ValidationReport
from ..profile import AccuracyBudget

log = logging.getLogger(__name__)


def compare(reference: list[dict], optimized: list[dict], budget: AccuracyBudget, labels=None,
            evaluator=None) -> ValidationReport:
    """Judge ``optimized`` against ``reference`` with the model's task evaluator (generic when none is given).

    Every output also gets its own figures (cosine, SNR, max abs error): never one cosine over concatenated
    outputs, which lets box coordinates hide collapsed class scores.
    """
    from . import tasks

    if evaluator is None:  # callers without a prepared model: the task from the outputs alone
        evaluator = tasks.choose("auto", budget, tasks.ModelInfo(), tasks.TaskOptions(), reference)
    outputs, finite = tasks.output_figures(reference, optimized)
    result = evaluator.evaluate(reference, optimized, labels)
    failures = [tasks.failure_line(c) for c in result.checks if c.rule and not c.passed]
    if not finite:
        failures.insert(0, "the optimized model produced NaN or infinite values")
    budgeted = [c for c in result.checks if c.rule]
    rows = sum(_batch(r) for r in reference)
    return ValidationReport(
        samples=rows, max_abs_error=max((f.max_abs_error for f in outputs), default=0.0),
        min_cosine=min((f.min_cosine for f in outputs), default=1.0),
        mean_cosine=float(np.mean([f.mean_cosine for f in outputs])) if outputs else 1.0,
        top1_agreement=result.top1_agreement, task=evaluator.task, task_reason=evaluator.describe(),
        metric=budgeted[0] if budgeted else (result.checks[0] if result.checks else None),
        checks=result.checks, figures=result.figures, outputs=outputs, budget=_budget_doc(evaluator.task, budget),
        passed=not failures, failures=failures, notes=result.notes)


def _batch(outputs: dict) -> int:
    first = np.asarray(next(iter(outputs.values())))
    return int(first.shape[0]) if first.ndim else 1


_BUDGET_KEYS = {"classify": ("min_top1_agreement", "max_metric_drop"),
                "detect": ("min_map50", "min_f1", "detect_conf", "detect_nms_iou", "max_metric_drop"),
                "segment": ("min_mask_iou", "mask_threshold"),
                "embed": ("min_recall_at_1", "min_embedding_cosine"),
                "vad": ("min_frame_agreement", "min_segment_f1", "vad_threshold"),
                "generic": ("min_cosine",), "custom": ("max_metric_drop",)}


def _budget_doc(task: str, budget: AccuracyBudget) -> dict:
    doc = {k: getattr(budget, k) for k in _BUDGET_KEYS.get(task, ())}
    doc["task"] = task
    return doc


def score(report: ValidationReport) -> float:
    """One number per report, higher is better, for ranking configurations by the deciding metric:
    the least slack over the budgeted checks (value minus bound, or bound minus drop)."""
    slack = []
    for c in report.checks:
        if c.rule == "min":
            slack.append(c.optimized - c.bound)
        elif c.rule == "max_drop":
            slack.append(c.bound - c.drop)
    if not slack:
        return report.min_cosine
    value = min(slack)
    return value if np.isfinite(value) else -1e9


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
