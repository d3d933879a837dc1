"""embed: cosine of each optimized embedding to its fp32 one, and nearest-neighbour agreement (recall@1).

recall@1: for every held-out sample, the fp32 embedding nearest (by cosine) to its optimized embedding must
be its own fp32 embedding: a retrieval or re-identification system ranks with the optimized model against a
gallery that may hold fp32 embeddings.
"""
from __future__ import annotations

import numpy as np

from .base import TaskEvaluator, TaskResult, at_least


class EmbedEvaluator(TaskEvaluator):
    task = "embed"

    def __init__(self, *args, output: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.output = output

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        name = self.output or next(iter(reference[0]))
        ref = _unit(np.concatenate([_rows(r[name]) for r in reference]))
        opt = _unit(np.nan_to_num(np.concatenate([_rows(o[name]) for o in optimized])))
        own = np.sum(ref * opt, axis=1)
        sims = opt @ ref.T
        recall = float(np.mean(sims.argmax(1) == np.arange(len(ref))))
        checks = [at_least("recall@1 in fp32 space", recall, self.budget.min_recall_at_1),
                  at_least("embedding cosine (min)", float(own.min()), self.budget.min_embedding_cosine)]
        notes = []
        if len(ref) < 8:
            notes.append(f"recall@1 over {len(ref)} embeddings only: give more held-out samples")
        return TaskResult(checks=checks, figures={"embedding_cosine_mean": float(own.mean())}, notes=notes)


def _rows(arr) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    return arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)
