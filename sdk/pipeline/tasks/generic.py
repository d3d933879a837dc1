"""generic: each output judged on its own by its cosine to fp32 (SNR reported), never one concatenated cosine."""
from __future__ import annotations

from .base import TaskEvaluator, TaskResult, at_least, output_figures


class GenericEvaluator(TaskEvaluator):
    task = "generic"

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        figures, _ = output_figures(reference, optimized)
        checks = sorted((at_least(f"cosine of {f.name!r}", f.min_cosine, self.budget.min_cosine) for f in figures),
                        key=lambda c: c.optimized)
        return TaskResult(checks=checks, figures={f"snr_db[{f.name}]": f.min_snr_db for f in figures})
