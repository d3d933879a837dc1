"""Task evaluators: judge an optimized model by what its users judge (``--task``, default ``auto``).

| task | metric that decides | budget keys (profile ``[accuracy]``) |
|---|---|---|
| classify | top-1 agreement with fp32; accuracy drop when labels are given | min_top1_agreement, max_metric_drop |
| detect | mAP@0.5 of the optimized detections vs fp32's detections (pycocotools) | min_map50, detect_conf, detect_nms_iou, min_f1 |
| segment | mask IoU per channel (probability maps) or mIoU (class maps) vs fp32 | min_mask_iou, mask_threshold |
| embed | recall@1 of optimized embeddings in the fp32 space, per-vector cosine | min_recall_at_1, min_embedding_cosine |
| vad | per-frame speech decision agreement and speech-segment F1 over sequences | min_frame_agreement, min_segment_f1, vad_threshold |
| generic | each output's own cosine to fp32 (SNR reported) | min_cosine |
| custom | ``--metric module:fn`` (the task's own figures are then reported) | max_metric_drop |

``choose`` picks the evaluator once per model, on the fp32 outputs of the held-out data; the gate, the
accuracy-aware search and ``edgeopt compare`` all call the same evaluator.
"""
from __future__ import annotations

import ast
import logging
from typing import Callable

import numpy as np

from ...errors import InputError
from ...profile import AccuracyBudget
from .base import ModelInfo, TaskEvaluator, TaskOptions, TaskResult, failure_line, output_figures
from .classify import ClassifyEvaluator
from .custom import CustomEvaluator, load_metric
from .detect import DetectEvaluator
from .embed import EmbedEvaluator
from .generic import GenericEvaluator
from .segment import SegmentEvaluator
from .vad import VadEvaluator, speech_output

log = logging.getLogger(__name__)

TASKS = ("auto", "classify", "detect", "segment", "embed", "vad", "generic")
_EVALUATORS = {"classify": ClassifyEvaluator, "detect": DetectEvaluator, "segment": SegmentEvaluator,
               "embed": EmbedEvaluator, "vad": VadEvaluator, "generic": GenericEvaluator}
_EMBED_HINTS = ("emb", "feat", "descriptor", "vector", "pooler", "sentence")
_ULTRALYTICS_TASKS = {"detect": "detect", "pose": "detect", "segment": "detect", "classify": "classify",
                      "obb": "generic"}

__all__ = ["TASKS", "ModelInfo", "TaskOptions", "TaskEvaluator", "TaskResult", "choose", "failure_line",
           "output_figures", "load_metric", "class_names"]


def class_names(metadata: dict[str, str]) -> list[str] | None:
    """Class names from an Ultralytics-style ``names`` entry ("{0: 'person', ...}" or a list)."""
    raw = metadata.get("names")
    if not raw or len(raw) > 1_000_000:
        return None
    try:
        value = ast.literal_eval(raw)  # literals only: never eval model metadata
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(value, dict):
        try:
            return [str(value[k]) for k in sorted(value)]
        except TypeError:
            return None
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return None


def choose(task: str, budget: AccuracyBudget, info: ModelInfo, options: TaskOptions, reference: list[dict],
           metric: str | Callable | None = None, max_metric_drop: float | None = None) -> TaskEvaluator:
    """The evaluator for this model: ``task`` as asked, or (``auto``) from metadata and output shapes."""
    if task not in TASKS:
        raise InputError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    if task == "auto":
        task, reason = _auto(info, reference)
    else:
        reason = f"--task {task}"
    evaluator = _EVALUATORS[task](budget, info, options, reason)
    if task == "detect":
        evaluator.prepare(reference)
    if metric is not None:
        fn, name = load_metric(metric)
        bound = budget.max_metric_drop if max_metric_drop is None else max_metric_drop
        return _WithMetric(budget, info, options, f"--metric {name}", inner=evaluator, metric=fn, metric_name=name,
                           max_metric_drop=bound)
    return evaluator


class _WithMetric(CustomEvaluator):
    """The user's metric decides; the task evaluator's own figures are reported beside it."""

    def __init__(self, *args, inner: TaskEvaluator, **kwargs):
        super().__init__(*args, **kwargs)
        self.inner = inner

    def describe(self) -> str:
        return f"task custom ({self.reason}); {self.inner.describe()} reported"

    def evaluate(self, reference, optimized, labels=None) -> TaskResult:
        mine = super().evaluate(reference, optimized, labels)
        theirs = self.inner.evaluate(reference, optimized, labels)
        reported = [c.model_copy(update={"bound": None, "rule": "", "passed": True}) for c in theirs.checks]
        return TaskResult(checks=mine.checks + reported, figures=theirs.figures, notes=theirs.notes,
                          top1_agreement=theirs.top1_agreement)


def _auto(info: ModelInfo, reference: list[dict]) -> tuple[str, str]:
    meta_task = info.metadata.get("task")
    if meta_task in _ULTRALYTICS_TASKS:
        return _ULTRALYTICS_TASKS[meta_task], f"model metadata says task={meta_task!r} (Ultralytics export)"
    if info.state_outputs:
        name = speech_output(reference, info.state_outputs)
        if name is not None:
            return "vad", (f"a stateful model with one probability per step ({name!r}): judged as voice activity "
                           f"(pass --task generic to judge each output's cosine instead)")
        states = set(info.state_outputs)
        return "generic", (f"a stateful model (state outputs {sorted(states)}): each output judged by its own "
                           f"cosine over the sequences")
    first = {n: np.asarray(v) for n, v in reference[0].items()}
    shapes = {n: v.shape for n, v in first.items()}
    lowered = {n: n.lower() for n in first}
    described = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    if any(k in l for l in lowered.values() for k in ("box", "regressor", "bbox")) and \
            any(k in l for l in lowered.values() for k in ("score", "classificator", "conf")):
        return "detect", f"outputs named like boxes and scores ({described})"
    three = [n for n, s in shapes.items() if len(s) == 3]
    if len(three) >= 2 and len({shapes[n][1] for n in three}) == 1 and any(shapes[n][2] >= 4 for n in three) \
            and shapes[three[0]][1] >= 100:
        return "detect", f"two outputs with one row per anchor ({described}): SSD-style boxes and scores"
    if len(first) == 1 and len(three) == 1 and _looks_like_yolo(first[three[0]]):
        return "detect", f"one output of box rows ({described}): YOLO-style detections"
    maps = [n for n, s in shapes.items() if len(s) == 4 and s[2] >= 8 and s[3] >= 8 and s[1] <= 256]
    int_maps = [n for n, v in first.items() if v.ndim == 3 and v.dtype.kind in "iu" and min(v.shape[1:]) >= 8]
    if maps or int_maps:
        return "segment", f"spatial output map(s) ({described})"
    if len(first) == 1:
        name, arr = next(iter(first.items()))
        if arr.ndim == 2 and arr.shape[1] > 1:
            if any(h in name.lower() for h in _EMBED_HINTS):
                return "embed", f"one vector output named {name!r} {list(arr.shape)}"
            return "classify", f"one score vector per sample ({described})"
    return "generic", f"no task pattern in the outputs ({described}): each output judged by its own cosine"


def _looks_like_yolo(arr: np.ndarray) -> bool:
    """[B, 4+C, N] or [B, N, 5+C] whose box rows are non-negative and whose scores lie in [0, 1]."""
    _, a, b = arr.shape
    rows = arr[0].T if a < b else arr[0]
    width, n = rows.shape[1], rows.shape[0]
    if not (5 <= width <= 1024 and n >= 100):
        return False
    boxes, scores = rows[:, :4], rows[:, 4:]
    return bool(boxes.min() >= -1.0 and rows[:, 2:4].min() >= 0 and scores.min() >= -1e-3 and scores.max() <= 1 + 1e-3)
