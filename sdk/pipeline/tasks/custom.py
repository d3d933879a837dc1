"""The user's own metric: ``--metric my_module:my_fn`` (or a callable in the Python API).

The callable gets ``(fp32_outputs, optimized_outputs, labels)``: two lists with one dict per held-out sample
({output name: numpy array, batch on axis 0}) and the held-out labels (or None). It returns a number, higher
is better. The fp32 model's value is ``fn(fp32, fp32, labels)``, the optimized model's
``fn(fp32, optimized, labels)``; the drop between them is held to ``--max-metric-drop`` (the metric's units).
"""
from __future__ import annotations

import importlib
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable

from ...errors import InputError
from .base import TaskEvaluator, TaskResult, max_drop


def load_metric(spec: str | Callable) -> tuple[Callable, str]:
    """Import ``module:function`` (the current directory is importable, as with ``python -m``)."""
    if callable(spec):
        return spec, getattr(spec, "__qualname__", repr(spec))
    module, sep, attr = str(spec).partition(":")
    if not sep or not module or not attr:
        raise InputError(f"--metric {spec!r} must be MODULE:FUNCTION, e.g. my_metrics:map50")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # ImportError, and whatever the module raises while it is imported
        raise InputError(f"--metric {spec}: cannot import module {module!r} ({exc.__class__.__name__}: "
                         f"{' '.join(str(exc).split())[:160]})",
                         hint="run from the folder that holds the module, or put it on PYTHONPATH") from None
    fn: Any = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise InputError(f"--metric {spec}: module {module!r} has no callable {attr!r}")
    return fn, str(spec)


def call_metric(fn: Callable, name: str, reference, optimized, labels) -> float:
    try:
        value = fn(reference, optimized, labels)
    except Exception as exc:
        raise InputError(f"metric {name} raised {exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}",
                         hint="fix the metric: it gets (fp32_outputs, optimized_outputs, labels) and returns a "
                              "number, higher is better") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InputError(f"metric {name} returned {type(value).__name__} {str(value)[:60]!r}, not a finite number",
                         hint="return a float, higher is better")
    return float(value)


class CustomEvaluator(TaskEvaluator):
    task = "custom"

    def __init__(self, *args, metric: Callable, metric_name: str, max_metric_drop: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn, self.name, self.bound = metric, metric_name, max_metric_drop
        self._fp32: list[tuple[Any, float]] = []  # (reference list, its fp32 value): computed once per list

    def fp32_value(self, reference, labels) -> float:
        for ref, value in self._fp32:
            if ref is reference:
                return value
        value = call_metric(self.fn, self.name, reference, reference, labels)
        self._fp32 = [(reference, value)] + self._fp32[:3]
        return value

    def evaluate(self, reference: list[dict], optimized: list[dict], labels=None) -> TaskResult:
        fp32 = self.fp32_value(reference, labels)
        value = call_metric(self.fn, self.name, reference, optimized, labels)
        return TaskResult(checks=[max_drop(self.name, fp32, value, self.bound)])
