"""`edgeopt compare`: try the candidate configurations of each profile, measure them, pick one per profile.

The measuring is the pipeline's job (:func:`edgeopt.sdk.pipeline.evaluate` optimizes, validates and
benchmarks one candidate without writing a package); this module only decides *what* to try
(:func:`enumerate_candidates`), *which* result wins (:func:`select`, a pure function) and collects everything
into a :class:`CompareReport` that the CLI prints and :mod:`edgeopt.sdk.report` renders as HTML.

Selection rule: among the candidates that ran and hold the profile's accuracy budget, the fastest one; when
several are within ``noise`` of the fastest (a tie on a shared, noisy machine), the smallest of those.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import EdgeoptError, InputError
from .pipeline.types import Candidate, CandidateResult
from .profile import DeviceKind, HardwareProfile, OnnxRuntimeRuntime, Precision

log = logging.getLogger(__name__)

DEFAULT_NOISE = 0.03  # relative latency difference treated as a tie (p50 repeat spread here is ~1-3%)

Evaluator = Callable[[Candidate], CandidateResult]
"""Measures one candidate for the profile being compared: ``lambda c: pipeline.evaluate(prepared, c)``,
or a fake in unit tests."""

ALL_PRECISIONS = ("fp32", "fp16", "int8", "int8-aa", "int8-weight-only", "as-exported")
_NO_TF = "ONNX to TFLite conversion needs TensorFlow, which cannot share this environment"


# --------------------------------------------------------------------------- enumeration


@dataclass(frozen=True)
class Planned:
    """A candidate to measure, or one listed but not run (``skip`` says why)."""

    candidate: Candidate
    skip: str | None = None


def backend_accepts(runtime: str) -> tuple[str, ...] | None:
    """Model formats the SDK backend of ``runtime`` builds from (None when that runtime is not installed)."""
    import importlib

    from .backends import REGISTRY

    if runtime not in REGISTRY:
        return None
    module, cls = REGISTRY[runtime][0].split(":")
    try:
        return tuple(getattr(importlib.import_module(module), cls).accepts)
    except ImportError:
        return None


def backend_precisions(runtime: str) -> tuple[str, ...] | None:
    """Precisions the SDK backend of ``runtime`` builds (None when unknown: every precision is planned)."""
    import importlib

    from .backends import REGISTRY

    if runtime not in REGISTRY:
        return None
    module, cls = REGISTRY[runtime][0].split(":")
    try:
        return tuple(getattr(importlib.import_module(module), cls).precisions)
    except (ImportError, AttributeError):
        return None


def _wants_fp16(profile: HardwareProfile, runtime: str) -> bool:
    # fp16 is the native precision of GPUs; on a CPU without fp16 arithmetic it only adds conversions.
    if profile.precision.mode is Precision.FP16:
        return True
    return runtime == "openvino" and profile.target.device in (DeviceKind.INTEL_GPU, DeviceKind.INTEL_NPU)


def enumerate_candidates(profile: HardwareProfile, *, model_format: str = "onnx",
                         precisions: Iterable[str] | None = None, calibration: bool = True,
                         accepts: Callable[[str], tuple[str, ...] | None] = backend_accepts,
                         precisions_of: Callable[[str], tuple[str, ...] | None] = backend_precisions) -> list[Planned]:
    """The configurations `compare` tries for ``profile``, in the order they are measured.

    Per runtime the profile lists: fp32 (for ONNX Runtime at graph levels ``all`` and ``basic``), fp16 where the
    device computes in fp16, int8 static, int8 with accuracy-aware float fallback (measured only when plain int8
    misses the budget: otherwise it is the same model), and weight-only int8. A .tflite model runs on LiteRT as
    exported. ``precisions`` limits the set (names from :data:`ALL_PRECISIONS`); without ``calibration`` data the
    int8 static candidates are listed as not run.
    """
    wanted = set(precisions) if precisions is not None else set(ALL_PRECISIONS)
    unknown = wanted - set(ALL_PRECISIONS)
    if unknown:
        raise InputError(f"unknown precision(s) {', '.join(sorted(unknown))}",
                         hint=f"choose from {', '.join(ALL_PRECISIONS)}")
    out: list[Planned] = []
    for spec in profile.runtimes:
        name = spec.runtime
        formats = accepts(name)
        if formats is None:
            out.append(Planned(Candidate(name, "fp32"), skip=f"runtime {name} is not installed here"))
            continue
        if model_format not in formats:
            why = f"{name} does not take {model_format} models"
            if name == "tflite":
                why = f"LiteRT runs .tflite models only ({_NO_TF})"
            out.append(Planned(Candidate(name, "as-exported" if name == "tflite" else "fp32"), skip=why))
            continue
        if name == "tflite":
            if wanted & {"fp32", "as-exported"}:
                # A .tflite file is measured as given: its precision was fixed when it was converted.
                out.append(Planned(Candidate("tflite", "as-exported")))
            continue
        levels = ("all", "basic") if isinstance(spec, OnnxRuntimeRuntime) else ("all",)
        builds = precisions_of(name)
        if builds is not None:  # e.g. torch-aoti builds fp32 and fp16 only: no int8 rows to fail
            here = {p for p in wanted if (p[:-3] if p == "int8-aa" else p) in builds}
        else:
            here = wanted
        if "fp32" in here:
            out.extend(Planned(Candidate(name, "fp32", lvl)) for lvl in levels)
        if "fp16" in here and _wants_fp16(profile, name):
            out.append(Planned(Candidate(name, "fp16")))
        no_calib = None if calibration else "int8 static needs calibration data: pass --calib"
        if "int8" in here:
            out.append(Planned(Candidate(name, "int8"), skip=no_calib))
        if "int8-aa" in here:
            out.append(Planned(Candidate(name, "int8", accuracy_aware=True), skip=no_calib))
        if "int8-weight-only" in here:
            out.append(Planned(Candidate(name, "int8-weight-only")))
    return out


def auto_iterations(latency_ms: float, seconds: float = 1.0, low: int = 20, high: int = 2000) -> int:
    """Timed iterations for a model whose fp32 inference takes ``latency_ms``: about ``seconds`` of timing each.

    A fixed count is wrong at both ends: 50 runs of a 30 µs model are 1.5 ms of timing, all noise, while 50 runs
    of a 100 ms model are 5 s per candidate and baseline.
    """
    if latency_ms <= 0:
        return high
    return int(min(high, max(low, round(seconds * 1000.0 / latency_ms))))


def fit_iterations(prepared, iterations: int | None = None) -> int:
    """Set the pipeline's benchmark length for a prepared model: ``iterations``, or about 1 s of timing.

    ``prepared`` is :func:`edgeopt.sdk.pipeline.prepare`'s result; its fp32 baseline is probed once.
    """
    if iterations is None:
        lat = probe_latency_ms(prepared.baseline, prepared.heldout.samples[0])
        iterations = auto_iterations(lat)
        log.info("fp32 probe %.3f ms -> %d timed iterations per model", lat, iterations)
    prepared.request = prepared.request.model_copy(update={"bench_iterations": iterations})
    return iterations


def probe_latency_ms(model, feeds: dict, runs: int = 5) -> float:
    """Median latency of a loaded model over a few runs, after two warm-up runs (to size the benchmark)."""
    import time

    for _ in range(2):
        model.infer(feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model.infer(feeds)
        times.append((time.perf_counter() - t0) * 1000.0)
    return sorted(times)[len(times) // 2]


def time_interleaved(models: dict[str, Any], feeds: dict[str, dict], iterations: int, rounds: int = 5) -> dict[str, float]:
    """p50 latency (ms) of each loaded model, timed in interleaved blocks; the first run of each block is untimed.

    The untimed run absorbs what the previous model left behind: ONNX Runtime's thread pool keeps spinning for a
    while after a run, and on a 2-core host that slowed the next model's first iterations several-fold.
    """
    import time

    for label, model in models.items():
        model.infer(feeds[label])
    samples: dict[str, list[float]] = {k: [] for k in models}
    per_round = max(2, iterations // rounds)
    for _ in range(rounds):
        for label, model in models.items():
            model.infer(feeds[label])
            for _ in range(per_round):
                t0 = time.perf_counter()
                model.infer(feeds[label])
                samples[label].append((time.perf_counter() - t0) * 1000.0)
    out = {}
    for label, values in samples.items():
        values.sort()
        mid = len(values) // 2
        out[label] = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return out


# --------------------------------------------------------------------------- selection (pure)


def latency_ms(result: CandidateResult) -> float | None:
    """The measured p50 latency of a result, or None when it did not run."""
    if not result.ok or result.optimized is None:
        return None
    return result.optimized.p50_ms


def eligible(results: Iterable[CandidateResult]) -> list[CandidateResult]:
    """Results that ran and hold the accuracy budget."""
    return [r for r in results if r.ok and r.passed and latency_ms(r) is not None]


def select(results: Sequence[CandidateResult], noise: float = DEFAULT_NOISE,
           latency: Callable[[CandidateResult], float | None] = latency_ms) -> CandidateResult | None:
    """The result `compare` picks: fastest within budget; within ``noise`` of the fastest, the smallest.

    Over-budget and failed results are never picked. Returns None when no result holds the budget.
    ``latency`` is what "fastest" means (default: the p50 measured by the pipeline).
    """
    ok = eligible(results)
    if not ok:
        return None
    fastest = min(latency(r) for r in ok)
    tied = [r for r in ok if latency(r) <= fastest * (1.0 + noise)]
    # Among ties the smaller package wins (less to ship to devices); then the faster; then the earlier.
    return min(tied, key=lambda r: (r.size_bytes if r.size_bytes is not None else float("inf"), latency(r)))


def explain(result: CandidateResult, pick: CandidateResult | None, results: Sequence[CandidateResult],
            noise: float = DEFAULT_NOISE, latency: Callable[[CandidateResult], float | None] = latency_ms) -> str:
    """One short phrase: why ``result`` was, or was not, picked among ``results``."""
    text = _explain(result, pick, results, noise, latency)
    kept = result.validation.float_layers if result.ok and result.validation else []
    if kept:
        text += f"; {len(kept)} layer(s) kept in float"
    return text


def _explain(result: CandidateResult, pick: CandidateResult | None, results: Sequence[CandidateResult],
             noise: float, latency: Callable[[CandidateResult], float | None]) -> str:
    if not result.ok:
        return f"failed: {result.error or 'unknown error'}"
    if not result.passed:
        failures = result.validation.failures if result.validation else []
        text = "; ".join(failures[:2]) if failures else "accuracy budget missed"
        layers = result.validation.sensitive_layers[:3] if result.validation else []
        if layers:
            text += " (most sensitive layers: " + ", ".join(le.layer for le in layers) + ")"
        return f"over budget: {text}"
    if pick is None:
        return ""
    fastest = min(latency(r) for r in eligible(results))
    mine, best = latency(result), latency(pick)
    if result is pick:
        if best > fastest:
            return f"picked: smallest of those within {noise:.0%} of the fastest"
        return "picked: fastest within budget"
    if mine <= fastest * (1.0 + noise):
        return f"tied within {noise:.0%} of the fastest; larger package than the pick"
    return f"slower: {mine / best:.2f}x the pick's latency"


# --------------------------------------------------------------------------- the report


def host_proxy_note(profile: HardwareProfile, devices: dict[str, list[str]] | None = None) -> str | None:
    """A plain sentence when this host cannot run the profile's device, else None.

    ``devices`` maps runtime name to the devices it really has here (see the agent's runtime registry);
    probed when not given.
    """
    arch = platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")
    kind = profile.target.device
    if kind is DeviceKind.CPU:
        return None if arch in profile.target.arch else (
            f"this host is {arch}, the profile targets {', '.join(profile.target.arch)}: host-CPU proxy figures")
    if kind is DeviceKind.ARM_CPU:
        if arch in ("aarch64", "armv7l"):
            return None
        return (f"no ARM CPU here: figures measured on this {arch} host CPU as a proxy; "
                "latency on a Cortex-A device will be several times higher")
    devices = devices if devices is not None else _probe_devices()
    if kind in (DeviceKind.INTEL_GPU, DeviceKind.INTEL_NPU):
        want = "GPU" if kind is DeviceKind.INTEL_GPU else "NPU"
        if any(d.startswith(want) for d in devices.get("openvino", [])):
            return None
        label = "Intel iGPU" if want == "GPU" else "Intel NPU"
        return f"no {label} on this host (OpenVINO devices: {', '.join(devices.get('openvino', [])) or 'none'}): " \
               f"figures are host-CPU proxies, not {label} measurements"
    if kind is DeviceKind.NVIDIA_GPU:
        if "CUDAExecutionProvider" in devices.get("onnxruntime", []):
            return None
        return "no NVIDIA GPU / CUDA execution provider on this host: figures are host-CPU proxies, not GPU " \
               "measurements"
    return None


def _probe_devices() -> dict[str, list[str]]:
    from ..agent.runtimes import available_runtimes

    return {name: info.get("devices", []) for name, info in available_runtimes().items() if info.get("available")}


@dataclass
class ProfileComparison:
    """Every candidate measured for one profile, and the pick."""

    profile: HardwareProfile
    results: list[CandidateResult] = field(default_factory=list)
    skipped: list[Planned] = field(default_factory=list)
    pick: CandidateResult | None = None
    proxy_note: str | None = None
    notes: list[str] = field(default_factory=list)
    runoff_ms: dict[str, float] = field(default_factory=dict)  # candidate label -> run-off p50

    def latency(self, result: CandidateResult) -> float | None:
        """What the pick ranks by: the run-off p50 when the candidate took part in it, else the pipeline's p50."""
        if result.ok and result.candidate.label in self.runoff_ms:
            return self.runoff_ms[result.candidate.label]
        return latency_ms(result)

    def baseline_p50_ms(self) -> float | None:
        """Median of the fp32 ONNX Runtime baselines measured beside each candidate."""
        values = sorted(r.fp32.p50_ms for r in self.results if r.fp32 is not None)
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


@dataclass
class CompareReport:
    """What `edgeopt compare` measured, ready for the table, --json and --html."""

    model: Path
    profiles: list[ProfileComparison]
    noise: float = DEFAULT_NOISE
    flops: Any = None  # edgeopt.sdk.flops.FlopCount of the source model at batch 1, when countable
    peak: dict[str, Any] | None = None  # edgeopt.sdk.peak figures when measured
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def achieved_gflops(self, result: CandidateResult, batch: int) -> float | None:
        lat = latency_ms(result)
        if self.flops is None or lat is None or not self.flops.macs:
            return None
        return self.flops.achieved_gflops(lat, batch)

    def to_dict(self) -> dict[str, Any]:
        """The --json document."""
        out = {
            "model": str(self.model), "created_at": self.created_at.isoformat(), "noise": self.noise,
            "machine": {"arch": platform.machine(), "processor": platform.processor() or None,
                        "python": platform.python_version()},
            "flops": self.flops.to_dict() if self.flops is not None else None,
            "peak": self.peak, "profiles": [],
        }
        for pc in self.profiles:
            batch = pc.profile.batch_size
            rows = []
            for index, r in enumerate(pc.results, start=1):
                row = r.row()
                gf = self.achieved_gflops(r, getattr(r, "batch", None) or batch)
                row.update(index=index, picked=r is pc.pick,
                           reason=explain(r, pc.pick, pc.results, self.noise, pc.latency),
                           runoff_p50_ms=pc.runoff_ms.get(r.candidate.label) if r.ok else None,
                           status="measured" if r.ok else "failed",
                           achieved_gflops=round(gf, 3) if gf is not None else None)
                rows.append(row)
            for p in pc.skipped:
                rows.append({"candidate": p.candidate.label, "runtime": p.candidate.runtime,
                             "precision": p.candidate.precision, "graph_level": p.candidate.graph_level,
                             "accuracy_aware": p.candidate.accuracy_aware, "ok": False, "passed": False,
                             "picked": False, "status": "skipped", "reason": p.skip})
            out["profiles"].append({
                "profile": pc.profile.name, "target_device": pc.profile.target.device.value,
                "batch_size": batch, "budget": pc.profile.accuracy.model_dump(mode="json"),
                "host_proxy": pc.proxy_note is not None, "proxy_note": pc.proxy_note,
                # fp32 on ONNX Runtime (all graph optimizations), or on the model's own runtime where ONNX
                # Runtime cannot run it (the pipeline records which in each LatencyStats).
                "baseline": {"runtime": next((r.fp32.runtime for r in pc.results if r.fp32 and r.fp32.runtime),
                                             "onnxruntime"), "precision": "fp32", "p50_ms": pc.baseline_p50_ms()},
                "pick": pc.pick.candidate.label if pc.pick else None, "notes": list(pc.notes), "candidates": rows,
            })
        return out


ProgressHook = Callable[[str, str, int, int], None]  # (profile, candidate label, index, total)
Runoff = Callable[[list[CandidateResult]], dict[str, float]]
"""Re-times the given results' built models side by side; returns candidate label -> p50 ms."""


def compare_profile(profile: HardwareProfile, evaluate: Evaluator, *, model_format: str = "onnx",
                    precisions: Iterable[str] | None = None, calibration: bool = True, noise: float = DEFAULT_NOISE,
                    progress: ProgressHook | None = None, devices: dict[str, list[str]] | None = None,
                    runoff: Runoff | None = None) -> ProfileComparison:
    """Measure every planned candidate of ``profile`` with ``evaluate`` and pick one.

    With ``runoff``, the candidates that hold the budget are timed again side by side, without the fp32 baseline
    between them, and the pick ranks by those figures: each candidate's own benchmark runs next to an ONNX
    Runtime baseline whose spinning threads slow some runtimes more than others on a small, busy host.
    """
    plan = enumerate_candidates(profile, model_format=model_format, precisions=precisions, calibration=calibration)
    pc = ProfileComparison(profile=profile, proxy_note=host_proxy_note(profile, devices))
    to_run = [p for p in plan if p.skip is None]
    pc.skipped = [p for p in plan if p.skip is not None]
    plain_int8: dict[str, CandidateResult] = {}
    for i, planned in enumerate(to_run):
        cand = planned.candidate
        if progress:
            progress(profile.name, cand.label, i, len(to_run))
        if cand.accuracy_aware and cand.runtime in plain_int8 and plain_int8[cand.runtime].passed:
            # Plain int8 already holds the budget: the accuracy-aware search would return the same model.
            pc.skipped.append(Planned(cand, skip="plain int8 already within budget (same model)"))
            continue
        try:
            result = evaluate(cand)
        except EdgeoptError as exc:  # one candidate failing must not stop the comparison
            log.info("candidate %s failed for profile %s: %s", cand.label, profile.name, exc.one_line())
            result = CandidateResult(candidate=cand, ok=False, passed=False, error=exc.one_line())
        if cand.precision == "int8" and not cand.accuracy_aware:
            plain_int8[cand.runtime] = result
        pc.results.append(result)
        if result.host_proxy and pc.proxy_note is None:
            pc.proxy_note = f"measured on the host CPU as a proxy for {result.device or profile.target.device.value}"
    if progress:
        progress(profile.name, "done", len(to_run), len(to_run))
    good = eligible(pc.results)
    if runoff is not None and len(good) > 1:
        if progress:
            progress(profile.name, f"run-off of {len(good)} candidates", len(to_run), len(to_run))
        try:
            pc.runoff_ms = dict(runoff(good))
        except EdgeoptError as exc:
            pc.notes.append(f"run-off skipped ({exc.one_line()}); picked on each candidate's own benchmark")
    pc.pick = select(pc.results, noise, pc.latency)
    if pc.pick is None:
        pc.notes.append("no candidate holds the accuracy budget: nothing would be packaged for this profile")
    return pc


def make_runoff(prepared) -> Runoff:
    """The run-off for :func:`compare_profile` on a prepared model (the pipeline's ``prepare`` result): reload each
    in-budget candidate's built model and time them side by side, at the profile's threads and batch size."""
    import numpy as np

    from ..agent.runtimes import get_runtime
    from .pipeline.evaluation import device_options

    def runoff(results) -> dict[str, float]:
        sample = prepared.heldout.samples[0]
        loaded, feeds = {}, {}
        try:
            for r in results:
                # With the options the candidate was validated and benchmarked with (OpenVINO's f32 precision
                # hint): without them OpenVINO runs bf16 on CPUs that have it, faster than what ships.
                model = get_runtime(r.candidate.runtime).load(
                    r.artifact.model_file, device=r.run_device, threads=prepared.threads,
                    performance_hint=prepared.profile.performance_hint.value,
                    options=device_options(r.artifact.runtime_options, r.run_device))
                loaded[r.candidate.label] = model
                batch = getattr(r, "batch", 1) or 1
                fixed = all(isinstance(t.shape[0], int) and t.shape[0] > 0 for t in model.inputs if t.shape)
                # Same batch as the candidate's own benchmark: rows repeated unless the model's batch is fixed.
                feeds[r.candidate.label] = sample if batch == 1 or fixed else {
                    k: np.concatenate([v] * batch, axis=0)[:batch] for k, v in sample.items()}
            return time_interleaved(loaded, feeds, prepared.request.bench_iterations)
        finally:
            for model in loaded.values():
                model.close()

    return runoff


def merge_pruned(profile: HardwareProfile, groups: Sequence[tuple[float, ProfileComparison]], *,
                 noise: float = DEFAULT_NOISE, runoff: Runoff | None = None) -> ProfileComparison:
    """One comparison for ``profile`` out of one per pruning ratio (``compare --prune-ratios``).

    Each group was measured on its own prepared model (pruned by that ratio, judged against the unpruned fp32
    model); its rows are renamed ``prune<ratio>/...`` (ratio 0 keeps its plain names) and the pick is made over
    all of them with the usual rule, after one run-off across ratios, so a pruned int8 model competes with the
    unpruned int8 one on the same speed/accuracy frontier.
    """
    import dataclasses

    def tag(candidate: Candidate, ratio: float) -> Candidate:
        return dataclasses.replace(candidate, prune_ratio=ratio or None)

    pc = ProfileComparison(profile=profile)
    for ratio, group in groups:
        for r in group.results:
            pc.results.append(dataclasses.replace(r, candidate=tag(r.candidate, ratio)))
        pc.skipped.extend(Planned(tag(p.candidate, ratio), p.skip) for p in group.skipped)
        pc.proxy_note = pc.proxy_note or group.proxy_note
        pc.notes.extend(n for n in group.notes if n not in pc.notes and not n.startswith("no candidate holds"))
    good = eligible(pc.results)
    if runoff is not None and len(good) > 1:
        try:
            pc.runoff_ms = dict(runoff(good))
        except EdgeoptError as exc:
            pc.notes.append(f"run-off skipped ({exc.one_line()}); picked on each candidate's own benchmark")
    pc.pick = select(pc.results, noise, pc.latency)
    if pc.pick is None:
        pc.notes.append("no candidate holds the accuracy budget: nothing would be packaged for this profile")
    return pc
