"""Profile one model file layer by layer with its runtime: shared by ``edgeopt bench --layers`` (host) and
``edgeopt agent profile`` (device), so both measure the same way.

The profiler runs on a second load of the model (ORT's profiler and OpenVINO's PERF_COUNT are set at load),
never on the instance that serves: on a device, service continues on its own instance while the profile
runs, competing only for CPU.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.layers import RawProfile, build_profile
from . import get_runtime

log = logging.getLogger(__name__)

# Options that keep two loads of one model in one process from disturbing each other: ONNX Runtime's idle
# pool threads spin by default, and the spinning pool of one session slows the other one's runs (measured:
# whole-run times 10x the sum of the layers). Per runtime, so other runtimes get no unknown option.
QUIET_OPTIONS: dict[str, dict[str, Any]] = {"onnxruntime": {"intra_op_spinning": False}}


def quiet(runtime: str, load_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``load_kwargs`` with :data:`QUIET_OPTIONS` of ``runtime`` added to its options."""
    kwargs = dict(load_kwargs)
    kwargs["options"] = {**(kwargs.get("options") or {}), **QUIET_OPTIONS.get(runtime, {})} or None
    return kwargs


class Interleaved:
    """``between`` callback that times one plain (unprofiled) inference after each profiled run, so the
    whole-model latency and the layer times are measured in the same rounds, under the same machine load."""

    def __init__(self, runtime: str, model_path: Path, load_kwargs: dict[str, Any], feeds: dict[str, np.ndarray],
                 warmup: int = 3):
        self.loaded = get_runtime(runtime).load(Path(model_path), **quiet(runtime, load_kwargs))
        self.feeds = feeds
        self.times: list[float] = []
        for _ in range(warmup):
            self.loaded.infer(feeds)

    def __call__(self, _seconds: float) -> None:
        t0 = time.perf_counter()
        self.loaded.infer(self.feeds)
        self.times.append((time.perf_counter() - t0) * 1e3)

    def median_ms(self, skip: int = 0) -> float | None:
        kept = self.times[skip:]
        return float(np.median(kept)) if kept else None

    def close(self) -> None:
        self.loaded.close()


def profile_model(runtime: str, model_path: Path, load_kwargs: dict[str, Any], feeds: dict[str, np.ndarray], *,
                  runs: int = 50, warmup: int = 3, deadline_s: float | None = None,
                  latency_ms: float | None = None, macs_by_node: dict[str, int] | None = None,
                  peak: dict | None = None, batch: int = 1, model: dict | None = None,
                  between=None) -> tuple[dict[str, Any], RawProfile]:
    """Load ``model_path`` for profiling, run it, and return (profile document, raw per-run records).

    ``macs_by_node`` (source node -> MACs, from :mod:`edgeopt.sdk.flops`) replaces the runtime's own shape
    count for layers whose source nodes it knows (ORT pre-packs weights, so its records lack their shapes).
    """
    kwargs = quiet(runtime, load_kwargs)
    kwargs["options"] = {**(kwargs.get("options") or {}), "profile_layers": True}
    kwargs.pop("cache_dir", None)  # a cached blob must not stand in for a profiled compile
    loaded = get_runtime(runtime).load(Path(model_path), **kwargs)
    try:
        raw = loaded.profile_layers(feeds, runs, warmup=warmup, deadline_s=deadline_s, between=between)
    finally:
        loaded.close()
    if macs_by_node:
        for layer in raw.layers:
            counted = [macs_by_node[n] for n in layer.source_nodes if n in macs_by_node]
            if counted:
                layer.macs = sum(counted)
    doc = build_profile(raw, latency_ms=latency_ms, peak=peak, batch=batch, model=model)
    return doc, raw
