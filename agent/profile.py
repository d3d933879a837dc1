"""On-device per-layer profile of an installed model (``edgeopt agent profile``, the dashboard's ``profile``
command): the same profiler as ``edgeopt bench --layers``, on the package's golden inputs, while the model
keeps serving.

Bounds, stated: at most :data:`MAX_RUNS` profiled runs and ``deadline_s`` seconds of profiling (the runtime
stops after the run that crosses it); the profile runs on its own second load of the model with
:data:`PROFILE_THREADS` inference thread, in a thread of its own at the lowest CPU priority (nice 19, Linux),
and pauses after each run for :data:`PAUSE_RATIO` times that run's duration: it takes at most half of one
core, and less whenever the service wants the CPU. The event's artifact (summary, comparison with the
manifest's host profile, gzip+base64 Chrome trace) is cut to fit :data:`ARTIFACT_BYTES`.
"""
from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..sdk.errors import InputError, PackageError
from ..sdk.layers import chrome_trace, compare, summary
from .config import AgentConfig
from .loader import load_options, read_golden
from .store import InstalledModel

log = logging.getLogger(__name__)

MAX_RUNS = 200
DEFAULT_RUNS = 30
DEFAULT_DEADLINE_S = 20.0
PROFILE_THREADS = 1
PAUSE_RATIO = 1.0
PROFILE_NICE = 19
# The event carrying the artifact must stay under the payload limit (256 KB) with its envelope.
ARTIFACT_BYTES = 160 * 1024


def profile_installed(installed: InstalledModel, config: AgentConfig, *, runs: int = DEFAULT_RUNS,
                      deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[dict[str, Any], Any]:
    """Profile ``installed`` on its first golden input; returns (profile document, raw records)."""
    from .runtimes.profiling import profile_model

    if not 1 <= runs <= MAX_RUNS:
        raise InputError(f"runs must be between 1 and {MAX_RUNS}, found {runs}")
    m = installed.manifest
    if m.golden is None:
        raise PackageError(f"{installed.name} {installed.version} has no golden samples to profile with")
    inputs, _ = read_golden(installed.path / m.golden.file)
    kwargs = load_options(m, Path(config.state_dir) / "cache")
    kwargs["threads"] = PROFILE_THREADS
    model = {"name": m.name, "version": m.version, "precision": m.precision, "target_device": m.device,
             "float_layers": list(m.validation.float_layers) if m.validation else []}
    doc, raw = _lowered(lambda: profile_model(
        m.runtime, installed.path / m.model_file, kwargs, inputs[0], runs=runs, warmup=2, deadline_s=deadline_s,
        model=model, between=lambda seconds: time.sleep(seconds * PAUSE_RATIO)))
    doc["bounds"] = {"runs": runs, "deadline_s": deadline_s, "threads": PROFILE_THREADS, "nice": PROFILE_NICE,
                     "pause_ratio": PAUSE_RATIO, "profiled_runs": doc["runs"]}
    return doc, raw


def _lowered(fn):
    """Run ``fn`` in a new thread at nice :data:`PROFILE_NICE` and return its result (or raise its error).

    Linux niceness is per thread: only this thread (and threads it creates) is lowered, never the service's;
    the thread ends with the profile, since an unprivileged process cannot raise a priority back."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PROFILE_NICE)
        except (OSError, AttributeError):  # not Linux, or not allowed: the pause still bounds the load
            log.info("could not lower the profile thread's priority")
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            out["error"] = exc

    worker = threading.Thread(target=target, name="edgeopt-profile", daemon=True)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def artifact(doc: dict[str, Any], raw: Any, host_profile: dict[str, Any] | None) -> dict[str, Any]:
    """The event details: summary, comparison with the host profile, and the trace, within ARTIFACT_BYTES."""
    out: dict[str, Any] = {"profile": summary(doc, top=15), "bounds": doc.get("bounds"),
                           "latency_ms_profiled_run": doc.get("profiled_run_ms")}
    if host_profile:
        c = compare(doc, host_profile)
        out["comparison"] = {k: c[k] for k in ("faster", "slower", "precision_changed", "silent_precision",
                                               "total_ms", "baseline_total_ms", "speedup", "only_in_profile",
                                               "only_in_baseline")}
        out["comparison"]["host_machine"] = (host_profile.get("machine") or {}).get("cpu")
    for source in (raw, None):  # every run first; the medians alone if that is too big
        trace = gzip.compress(json.dumps(chrome_trace(doc, source)).encode(), 6)
        encoded = base64.b64encode(trace).decode("ascii")
        if len(json.dumps(out)) + len(encoded) <= ARTIFACT_BYTES:
            out["trace_gz_b64"] = encoded
            out["trace_runs"] = "all" if source is not None else "median"
            break
    else:
        out["trace_note"] = "trace left out: over the event size limit"
    while len(json.dumps(out)) > ARTIFACT_BYTES and out["profile"]["layers"]:
        out["profile"]["layers"] = out["profile"]["layers"][: len(out["profile"]["layers"]) // 2]
    return out


def decode_trace(details: dict[str, Any], max_bytes: int = 64 * 1024 * 1024) -> bytes | None:
    """The Chrome trace JSON bytes of a profile event's details (bounded: a hostile artifact is refused)."""
    import zlib

    encoded = details.get("trace_gz_b64")
    if not isinstance(encoded, str):
        return None
    try:
        data = base64.b64decode(encoded, validate=True)
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out = inflater.decompress(data, max_bytes)
        if inflater.unconsumed_tail:
            raise InputError(f"profile trace inflates to more than {max_bytes} bytes")
        return out
    except (ValueError, zlib.error) as exc:
        raise InputError(f"profile trace is not valid gzip+base64: {exc}") from None
