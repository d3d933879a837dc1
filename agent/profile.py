"""On-device per-layer profile of an installed model (``edgeopt agent profile``, the dashboard's ``profile``
command): the same profiler as ``edgeopt bench --layers``, on the package's golden inputs, while the model
keeps serving.

Bounds, stated: at most :data:`MAX_RUNS` profiled runs and ``deadline_s`` seconds of profiling (the runtime
stops after the run that crosses it); the profile runs on its own load of the model with
:data:`PROFILE_THREADS` inference thread, in a child process at the lowest CPU priority (nice 19), and
pauses after each run for :data:`PAUSE_RATIO` times that run's duration: it takes at most half of one core,
and less whenever the service wants the CPU. The event's artifact (summary, comparison with the
manifest's host profile, gzip+base64 Chrome trace) is cut to fit :data:`ARTIFACT_BYTES`.
"""
from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..sdk.errors import EdgeoptError, InputError, PackageError, UnavailableError
from ..sdk.layers import LayerRun, RawProfile, chrome_trace, compare, summary
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
CHILD_GRACE_S = 120.0  # loading and compiling the model in the child, on top of the profiling deadline
MAX_CHILD_OUTPUT = 64 * 1024 * 1024
# The event carrying the artifact must stay under the payload limit (256 KB) with its envelope.
ARTIFACT_BYTES = 160 * 1024


def profile_installed(installed: InstalledModel, config: AgentConfig, *, runs: int = DEFAULT_RUNS,
                      deadline_s: float = DEFAULT_DEADLINE_S) -> tuple[dict[str, Any], RawProfile]:
    """Profile ``installed`` on its first golden input in a child process at nice :data:`PROFILE_NICE`;
    returns (profile document, raw records).

    A process, not a thread: a low-priority thread of the agent would hold the GIL while the scheduler
    starves it, and the serving threads would wait behind it (priority inversion, measured: serving p99 x4.7
    on a loaded 2-core host). A crash of a runtime's profiler cannot take the agent down either.
    """
    if not 1 <= runs <= MAX_RUNS:
        raise InputError(f"runs must be between 1 and {MAX_RUNS}, found {runs}")
    if installed.manifest.golden is None:
        raise PackageError(f"{installed.name} {installed.version} has no golden samples to profile with")
    cmd = [sys.executable, "-m", "edgeopt.agent.profile", str(installed.path), "--state-dir", str(config.state_dir),
           "--runs", str(runs), "--deadline", str(deadline_s)]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=deadline_s + CHILD_GRACE_S,
                              preexec_fn=_lower_priority)  # noqa: PLW1509 - only os.nice, no locks taken
    except subprocess.TimeoutExpired:
        raise UnavailableError(f"profile of {installed.name} did not finish within {deadline_s + CHILD_GRACE_S:g} s"
                               ) from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        message = lines[-1][:400] if lines else f"exit status {done.returncode}"
        raise EdgeoptError(f"profile of {installed.name} {installed.version} failed: "
                           f"{message.removeprefix('error: ')}")
    if len(done.stdout) > MAX_CHILD_OUTPUT:
        raise EdgeoptError(f"profile output over {MAX_CHILD_OUTPUT} bytes; refused")
    out = json.loads(done.stdout)
    raw = out["raw"]
    raw["layers"] = [LayerRun(**layer) for layer in raw["layers"]]
    return out["doc"], RawProfile(**raw)


def _lower_priority() -> None:
    try:
        os.nice(PROFILE_NICE)
    except OSError:  # not allowed: the pause still bounds the load
        pass


def _profile_here(package_dir: Path, state_dir: Path, runs: int, deadline_s: float) -> tuple[dict, RawProfile]:
    """The child's work: load the installed package's model for profiling and run it (see the module doc)."""
    from ..sdk.package import Manifest
    from .runtimes.profiling import profile_model

    m = Manifest.model_validate_json((package_dir / "manifest.json").read_bytes())
    inputs, _ = read_golden(package_dir / m.golden.file)
    kwargs = load_options(m, Path(state_dir) / "cache")
    kwargs["threads"] = PROFILE_THREADS
    model = {"name": m.name, "version": m.version, "precision": m.precision, "target_device": m.device,
             "float_layers": list(m.validation.float_layers) if m.validation else []}
    doc, raw = profile_model(m.runtime, package_dir / m.model_file, kwargs, inputs[0], runs=runs, warmup=2,
                             deadline_s=deadline_s, model=model,
                             between=lambda seconds: time.sleep(seconds * PAUSE_RATIO))
    doc["bounds"] = {"runs": runs, "deadline_s": deadline_s, "threads": PROFILE_THREADS, "nice": os.nice(0),
                     "pause_ratio": PAUSE_RATIO, "profiled_runs": doc["runs"], "process": "child"}
    return doc, raw


def _main(argv: list[str] | None = None) -> int:
    """``python -m edgeopt.agent.profile PACKAGE_DIR --state-dir D --runs N --deadline S``: JSON on stdout."""
    import argparse

    ap = argparse.ArgumentParser(prog="edgeopt.agent.profile", description=_main.__doc__)
    ap.add_argument("package_dir", type=Path)
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--runs", type=int, required=True)
    ap.add_argument("--deadline", type=float, required=True)
    args = ap.parse_args(argv)
    try:
        doc, raw = _profile_here(args.package_dir, args.state_dir, args.runs, args.deadline)
    except EdgeoptError as exc:
        sys.stderr.write(f"error: {exc.one_line()}\n")
        return 1
    raw_doc = {k: v for k, v in raw.__dict__.items() if k != "layers"}
    raw_doc["layers"] = [layer.__dict__ for layer in raw.layers]
    sys.stdout.write(json.dumps({"doc": doc, "raw": raw_doc}))
    return 0


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


if __name__ == "__main__":
    sys.exit(_main())
