"""classify: top-1 / top-5 agreement with fp32; accuracy against labels when the held-out data has them."""
from __future__ import annotations

import numpy as np

from .base import TaskEvaluator, TaskResult, at_least, max_drop


class ClassifyEvaluator(TaskEvaluator):
    task = "classify"

    def __init__(self, *args, output: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output = output

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        name = self.output or next(iter(reference[0]))
        ref = np.concatenate([_scores(r[name]) for r in reference])
        opt = np.concatenate([_scores(o[name]) for o in optimized])
        ref_top = ref.argmax(1)
        opt_top = np.nan_to_num(opt, nan=-np.inf).argmax(1)
        top1 = float(np.mean(ref_top == opt_top))
        k = min(5, ref.shape[1])
        top5 = float(np.mean([a in set(row) for a, row in zip(ref_top, np.argsort(-opt, axis=1)[:, :k])]))
        figures = {"top5_agreement": top5}
        agreement = at_least("top-1 agreement", top1, self.budget.min_top1_agreement)
        if labels is not None:
            truth = np.asarray(labels).reshape(-1)[: len(ref_top)]
            acc32 = 100.0 * float(np.mean(ref_top[: len(truth)] == truth))
            acc = 100.0 * float(np.mean(opt_top[: len(truth)] == truth))
            # With labels, what users judge is accuracy: it decides; agreement is reported.
            checks = [max_drop("accuracy", acc32, acc, self.budget.max_metric_drop),
                      agreement.model_copy(update={"bound": None, "rule": "", "passed": True})]
        else:
            checks = [agreement]
        return TaskResult(checks=checks, figures=figures, top1_agreement=top1)


def _scores(arr) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
