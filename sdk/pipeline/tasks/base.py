"""What every task evaluator shares: the interface, the budget checks, and per-output figures.

An evaluator judges the optimized model the way the model's users do (detections, masks, rankings), against
the fp32 original's outputs on the same held-out samples. It is chosen once per model (``choose`` in this
package) and decides the gate, the accuracy-aware search and ``edgeopt compare``'s pick.

Outputs arrive as lists with one dict per held-out sample ({output name: array}); each array carries the
sample's batch on axis 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ...package import MetricResult, OutputFigures
from ...profile import AccuracyBudget

SNR_EXACT_DB = 99.0  # reported when the optimized output equals the reference exactly


@dataclass
class ModelInfo:
    """What the evaluators may know about the model besides its outputs."""

    input_shapes: dict[str, tuple] = field(default_factory=dict)  # concrete shapes of the held-out feeds
    output_names: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props (Ultralytics: task, names, imgsz)
    class_names: list[str] | None = None
    state_outputs: list[str] = field(default_factory=list)  # outputs that feed the next step (stateful models)


@dataclass
class TaskOptions:
    """User choices that shape the evaluation (CLI flags / PackageRequest fields)."""

    task: str = "auto"
    detect_format: str = "auto"
    labels_file: str | None = None  # COCO-format JSON for detection labels
    sample_names: list[str] | None = None  # image file name of each held-out image (for COCO labels)
    transforms: list[tuple[float, float, float]] | None = None  # (scale, pad_x, pad_y) per held-out image
    starts: list[int] | None = None  # held-out sequences: index of each sequence's first step


@dataclass
class TaskResult:
    """What an evaluator found: budgeted checks (the deciding one first), figures, notes."""

    checks: list[MetricResult]
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    top1_agreement: float | None = None


class TaskEvaluator:
    """Judge optimized outputs against fp32 outputs for one task."""

    task: ClassVar[str]

    def __init__(self, budget: AccuracyBudget, info: ModelInfo, options: TaskOptions, reason: str = ""):
        self.budget, self.info, self.options, self.reason = budget, info, options, reason

    def evaluate(self, reference: list[dict], optimized: list[dict], labels: Any = None) -> TaskResult:
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the output: the task and how it reads the model's outputs."""
        return f"task {self.task}: {self.reason}" if self.reason else f"task {self.task}"


def at_least(name: str, value: float, bound: float | None, reference: float = 1.0) -> MetricResult:
    """A metric whose optimized value must reach ``bound`` (agreement-style metrics: fp32 scores 1.0)."""
    value = float(value)
    ok = bound is None or (math.isfinite(value) and value >= bound)
    return MetricResult(name=name, fp32=reference, optimized=value, drop=reference - value, bound=bound,
                        rule="min" if bound is not None else "", passed=ok)


def max_drop(name: str, fp32: float, optimized: float, bound: float | None) -> MetricResult:
    """A metric whose drop from fp32 must stay within ``bound`` (labelled metrics, user callables)."""
    drop = float(fp32) - float(optimized)
    ok = bound is None or (math.isfinite(drop) and drop <= bound + 1e-12)
    return MetricResult(name=name, fp32=float(fp32), optimized=float(optimized), drop=drop, bound=bound,
                        rule="max_drop" if bound is not None else "", passed=ok)


def failure_line(check: MetricResult) -> str:
    if check.rule == "min":
        value = f"{check.optimized:.4f}"
        if float(value) >= check.bound:  # rounding would hide the miss: show the digits that matter
            value = f"{check.optimized:.8f}"
        return f"{check.name} {value} < {check.bound}"
    return (f"{check.name} dropped {check.drop:.4g} ({check.fp32:.4g} -> {check.optimized:.4g}), "
            f"budget {check.bound:g}")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def snr_db(ref: np.ndarray, opt: np.ndarray) -> float:
    noise = float(np.sum((ref - opt) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return SNR_EXACT_DB
    if signal == 0.0:
        return -SNR_EXACT_DB
    return min(SNR_EXACT_DB, 10.0 * math.log10(signal / noise))


def per_sample_rows(arr: np.ndarray) -> np.ndarray:
    """[batch, ...] -> [batch, features] as float64 (a scalar or 1-D output is one row)."""
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim <= 1:
        return arr.reshape(1, -1)
    return arr.reshape(arr.shape[0], -1)


def output_figures(reference: list[dict], optimized: list[dict]) -> tuple[list[OutputFigures], bool]:
    """Cosine, SNR and max abs error of each output on its own; and whether every optimized value is finite."""
    finite = True
    stats: dict[str, dict[str, Any]] = {}
    for ref, opt in zip(reference, optimized):
        for name, r in ref.items():
            o = opt.get(name)
            s = stats.setdefault(name, {"cos": [], "snr": [], "abs": 0.0})
            if o is None:
                s["cos"].append(0.0)
                s["snr"].append(-SNR_EXACT_DB)
                continue
            rr, oo = per_sample_rows(r), per_sample_rows(o)
            if rr.shape != oo.shape:
                s["cos"].append(0.0)
                s["snr"].append(-SNR_EXACT_DB)
                continue
            if not np.all(np.isfinite(oo)):
                finite = False
                oo = np.nan_to_num(oo, nan=0.0, posinf=0.0, neginf=0.0)
            if rr.size:
                s["abs"] = max(s["abs"], float(np.max(np.abs(rr - oo))))
            for a, b in zip(rr, oo):
                s["cos"].append(cosine(a, b))
                s["snr"].append(snr_db(a, b))
    figures = [OutputFigures(name=name, min_cosine=float(min(s["cos"])), mean_cosine=float(np.mean(s["cos"])),
                             min_snr_db=float(min(s["snr"])), max_abs_error=s["abs"])
               for name, s in stats.items() if s["cos"]]
    return figures, finite


def batch_items(outputs: list[dict], name: str) -> list[np.ndarray]:
    """Every batch entry of output ``name`` over all samples, in order (one per image)."""
    items = []
    for out in outputs:
        arr = np.asarray(out[name])
        items.extend(arr[i] for i in range(arr.shape[0])) if arr.ndim >= 1 else items.append(arr)
    return items
