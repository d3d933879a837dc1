"""Stage 6, benchmark on this host: the fp32 original (ONNX Runtime, all graph optimizations) and the
optimized model, interleaved in rounds in the same run so both see the same machine state."""
from __future__ import annotations

import logging
import os
import platform
import time

import numpy as np

from ..package import LatencyStats
from ..profile import HardwareProfile

log = logging.getLogger(__name__)


def profile_threads(profile: HardwareProfile) -> int | None:
    """Inference threads from the profile's policy (None: the runtime's default)."""
    policy = profile.threads.policy
    if policy == "fixed":
        return profile.threads.count
    if policy == "physical-cores":
        try:
            import psutil

            return psutil.cpu_count(logical=False) or os.cpu_count()
        except ImportError:
            return os.cpu_count()
    return None


def machine() -> dict:
    """What ran the benchmark."""
    info = {"machine": platform.machine(), "system": platform.system(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                         "fma", "f16c", "neon", "asimd"})
                    break
    except OSError:
        pass
    return info


def batch_feeds(feeds: dict[str, np.ndarray], batch: int, static_batch: bool) -> dict[str, np.ndarray]:
    """Feeds at the benchmark batch size: rows repeated (or cut) along axis 0 unless the batch is fixed."""
    if static_batch:
        return feeds
    out = {}
    for name, arr in feeds.items():
        reps = int(np.ceil(batch / max(arr.shape[0], 1)))
        out[name] = np.concatenate([arr] * reps, axis=0)[:batch] if arr.ndim else arr
    return out


def measure(models: dict, feeds: dict, batch: int, iterations: int, warmup: int = 3, rounds: int = 5,
            runtimes: dict | None = None) -> dict[str, LatencyStats]:
    """Latency of each model in ``models`` (label -> LoadedModel), interleaved over ``rounds``.

    ``feeds`` maps label -> that model's feeds (the models may differ in input dtype or layout).
    """
    lat: dict[str, list[float]] = {k: [] for k in models}
    for label, model in models.items():
        for _ in range(warmup):
            model.infer(feeds[label])
    per_round = max(1, iterations // rounds)
    for _ in range(rounds):
        for label, model in models.items():
            f = feeds[label]
            for _ in range(per_round):
                t0 = time.perf_counter()
                model.infer(f)
                lat[label].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for label, values in lat.items():
        arr = np.asarray(values)
        out[label] = LatencyStats(p50_ms=float(np.percentile(arr, 50)), p90_ms=float(np.percentile(arr, 90)),
                                  p99_ms=float(np.percentile(arr, 99)), mean_ms=float(arr.mean()),
                                  throughput_ips=float(batch * 1000.0 / arr.mean()), iterations=len(arr),
                                  runtime=(runtimes or {}).get(label))
    return out
