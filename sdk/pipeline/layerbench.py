"""Per-layer profile of a package on this host (``edgeopt bench --layers``) and the host profile summary that
``edgeopt package`` stores in the manifest."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..layers import RawProfile, summary
from . import benchmark
from .hostbench import bench_feeds, open_package

log = logging.getLogger(__name__)


def macs_by_node(model_path: Path) -> dict[str, int]:
    """Source node -> MACs (edgeopt.sdk.flops) of an ONNX model; empty for other formats or without onnx."""
    if Path(model_path).suffix != ".onnx":
        return {}
    try:
        from ..flops import count_file

        return {name: macs for name, _, macs in count_file(model_path).nodes}
    except Exception as exc:  # noqa: BLE001 - FLOPs are a column, not a reason to fail the profile
        log.info("no FLOP count for %s: %s", model_path, exc)
        return {}


def profile_file(runtime: str, model_path: Path, load_kwargs: dict[str, Any], feeds: dict, *, runs: int,
                 warmup: int, batch: int, peak: dict | None, model: dict) -> tuple[dict[str, Any], RawProfile]:
    """The per-layer profile, with the whole-model latency without the profiler measured in the same rounds
    (one plain inference on a second load after each profiled run)."""
    from ...agent.runtimes.profiling import Interleaved, profile_model

    plain = Interleaved(runtime, model_path, load_kwargs, feeds, warmup=warmup)
    try:
        doc, raw = profile_model(runtime, model_path, load_kwargs, feeds, runs=runs, warmup=warmup,
                                 macs_by_node=macs_by_node(model_path), peak=peak, batch=batch, model=model,
                                 between=plain)
        latency = plain.median_ms(skip=warmup)
        plain_min = min(plain.times[warmup:]) if plain.times[warmup:] else None
    finally:
        plain.close()
    if latency:
        doc["latency_ms"] = round(latency, 4)
        doc["layer_sum_vs_latency"] = round(doc["layer_sum_ms"] / latency, 4)
        doc["latency_min_ms"] = round(plain_min, 4)
    # How much of each profiled run's wall time its layers account for (median over runs): independent of
    # the medians, it shows time the profiler does not attribute to any layer.
    sums = [sum(layer.times_us[i] for layer in raw.layers) / 1e3 for i in range(len(raw.run_ms))
            if all(len(layer.times_us) > i for layer in raw.layers)]
    if sums:
        import numpy as np

        doc["accounted_share"] = round(float(np.median([t / w for t, w in zip(sums, raw.run_ms) if w > 0])), 4)
    return doc, raw


def profile_package(path: str | Path, *, runs: int = 50, warmup: int = 3, batch_size: int | None = None,
                    public_keys: list | None = None, peak: dict | None = None,
                    threads: int | None = None) -> tuple[dict[str, Any], RawProfile]:
    """Verify and load ``path`` as ``edgeopt bench`` does, and profile it layer by layer (``threads``
    overrides the package's inference threads)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-layers-"))
    try:
        opened = open_package(path, tmp, public_keys)
        if threads:
            opened["load_kwargs"]["threads"] = threads
        m, root = opened["manifest"], opened["root"]
        loaded = opened["runtime"].load(root / m.model_file, **opened["load_kwargs"])
        try:
            feeds, batch = bench_feeds(root, m, loaded, batch_size)
        finally:
            loaded.close()
        model = {"name": m.name, "version": m.version, "precision": m.precision, "target_device": m.device,
                 "host_proxy": opened["proxy"], "where": opened["where"],
                 "float_layers": list(m.validation.float_layers) if m.validation else [],
                 "runtime_options": dict(m.runtime_options or {})}
        doc, raw = profile_file(m.runtime, root / m.model_file, opened["load_kwargs"], feeds, runs=runs,
                                warmup=warmup, batch=batch, peak=peak, model=model)
        doc["machine"] = benchmark.machine()
        return doc, raw
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def host_profile_summary(runtime: str, model_path: Path, load_kwargs: dict[str, Any], feeds: dict, *,
                         runs: int = 20, batch: int = 1) -> dict[str, Any] | None:
    """The manifest's ``host_profile``: a short per-layer profile of the packaged model on this host, the
    reference a device's profile is compared with. None (with a log line) where the runtime exposes no
    per-layer times (LiteRT)."""
    from ..errors import EdgeoptError

    try:
        doc, _ = profile_file(runtime, model_path, load_kwargs, feeds, runs=runs, warmup=2, batch=batch, peak=None,
                              model={})
    except EdgeoptError as exc:
        log.info("no host profile: %s", exc.one_line())
        return None
    out = summary(doc, top=10)
    out["machine"] = benchmark.machine()
    return out
