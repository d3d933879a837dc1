"""segment: mask IoU against fp32's masks.

Probability maps (values in [0, 1], ``[B, C, H, W]`` or ``[B, H, W]``): each channel thresholded at
``mask_threshold``, IoU summed over all held-out images per channel, the worst channel decides. A single-channel
logit map is thresholded at the same probability. Class-index maps (integer ``[B, H, W]``) and multi-channel
score maps (argmax over channels): mean IoU over the classes fp32 or the optimized model uses.
"""
from __future__ import annotations

import math

import numpy as np

from .base import TaskEvaluator, TaskResult, at_least


class SegmentEvaluator(TaskEvaluator):
    task = "segment"

    def __init__(self, *args, outputs: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs = outputs
        self.kinds: dict[str, str] = {}

    def _kind(self, arr: np.ndarray) -> str:
        if arr.dtype.kind in "iub":
            return "classes"
        lo, hi = float(np.min(arr)), float(np.max(arr))
        channels = arr.shape[1] if arr.ndim == 4 else 1
        if lo >= -1e-3 and hi <= 1 + 1e-3:
            return "probability"
        return "logit" if channels == 1 else "scores"

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        names = self.outputs or [n for n, v in reference[0].items() if np.asarray(v).ndim in (3, 4)]
        checks, figures = [], {}
        for name in names:
            if name not in self.kinds:
                self.kinds[name] = self._kind(np.asarray(reference[0][name]))
            kind = self.kinds[name]
            if kind in ("probability", "logit"):
                cut = self.budget.mask_threshold if kind == "probability" else math.log(
                    self.budget.mask_threshold / (1 - self.budget.mask_threshold))
                inter = union = None
                for r, o in zip(reference, optimized):
                    rm, om = _channels(r[name]) > cut, _channels(np.nan_to_num(o[name])) > cut
                    i, u = (rm & om).sum(axis=(0, 2, 3)), (rm | om).sum(axis=(0, 2, 3))
                    inter = i if inter is None else inter + i
                    union = u if union is None else union + u
                ious = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
                worst = int(np.argmin(ious))
                label = f"mask IoU of {name!r}" + (f" channel {worst}" if len(ious) > 1 else "")
                checks.append(at_least(label, float(ious[worst]), self.budget.min_mask_iou))
                figures[f"mask_iou_mean[{name}]"] = float(ious.mean())
            else:
                miou = _miou(reference, optimized, name, kind)
                checks.append(at_least(f"mIoU of {name!r}", miou, self.budget.min_mask_iou))
        checks.sort(key=lambda c: c.optimized)
        return TaskResult(checks=checks, figures=figures)


def _channels(arr) -> np.ndarray:
    arr = np.asarray(arr)
    return arr[:, None] if arr.ndim == 3 else arr


def _classes(arr, kind: str) -> np.ndarray:
    arr = np.asarray(arr)
    return arr.argmax(1) if kind == "scores" else arr


def _miou(reference, optimized, name: str, kind: str) -> float:
    inter: dict[int, int] = {}
    union: dict[int, int] = {}
    for r, o in zip(reference, optimized):
        rc, oc = _classes(r[name], kind), _classes(np.nan_to_num(o[name]), kind)
        for c in np.union1d(np.unique(rc), np.unique(oc)):
            a, b = rc == c, oc == c
            inter[int(c)] = inter.get(int(c), 0) + int((a & b).sum())
            union[int(c)] = union.get(int(c), 0) + int((a | b).sum())
    ious = [inter[c] / union[c] for c in union if union[c] > 0]
    return float(np.mean(ious)) if ious else 1.0
