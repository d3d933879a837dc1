"""The pipeline's orchestration: prepare once, evaluate the profile's candidates, pick, pack and sign."""
from __future__ import annotations

import logging
from pathlib import Path

from ..errors import AccuracyError, EdgeoptError, InputError, SecurityError, UnsupportedError
from ..package import BenchmarkReport, CalibrationInfo, SourceModel as ManifestSource, load_private_key
from . import benchmark, data, golden, pack
from .evaluation import device_options, evaluate, pick
from .prepared import Prepared, candidates_for, prepare
from .progress import Progress
from .types import BuildResult, CandidateResult, PackageRequest

log = logging.getLogger(__name__)

def build_package(req: PackageRequest, progress: Progress) -> BuildResult:
    if req.output is None:
        raise InputError("no output path given", hint="pass -o model.eopkg")
    if req.sign_key is None and not req.unsigned:
        raise SecurityError("refusing to write an unsigned package",
                            hint="pass --sign-key KEY (create one with: edgeopt keygen --out keys/), or --no-sign "
                                 "to write an unsigned package on purpose")
    private_key = load_private_key(req.sign_key) if req.sign_key is not None else None
    output = Path(req.output)
    with prepare(req, progress) as prep:
        cands = candidates_for(prep)
        results = [evaluate(prep, c, progress) for c in cands]
        chosen = runoff_pick(prep, results, progress)
        decisions = list(prep.decisions)
        if chosen is None and _may_fall_back(prep, results):
            chosen, fallback_note = _float_fallback(prep, results, progress)
            if chosen is not None:
                decisions.append(fallback_note)
        if chosen is None:
            raise _failure(prep, results)
        decisions.extend(chosen.decisions)
        decisions.extend(_choice_notes(chosen, results))
        placement_line = _placement_note(prep, chosen)
        if placement_line:
            decisions.append(placement_line)
        if req.validate_on != "host":
            from .target import validate_on_target

            decisions.extend(validate_on_target(prep, chosen, req.validate_on, progress, sysroot=req.arm_sysroot,
                                                cpu=req.arm_cpu))
        if chosen.validation.float_layers:
            decisions.append(f"accuracy-aware: {len(chosen.validation.float_layers)} layer(s) kept in float: "
                             f"{', '.join(chosen.validation.float_layers[:20])}")
        with progress.stage("golden samples, manifest, sign"):
            result = _pack(prep, chosen, results, decisions, output, private_key)
    return result


def runoff_pick(prep: Prepared, results: list[CandidateResult], progress) -> CandidateResult | None:
    """The fastest result within the budget. Each candidate's benchmark ran at its own time, and on a shared
    host the load between them moved latencies more than the candidates differ: two or more in-budget
    candidates are re-timed side by side (interleaved rounds, as `edgeopt compare` does) and ranked by that."""
    good = [r for r in results if r.ok and r.passed and r.optimized is not None]
    if len(good) < 2:
        return pick(results)
    from ..compare import make_runoff

    with progress.stage(f"run-off: {len(good)} candidates within the budget, timed side by side"):
        times = make_runoff(prep)(good)
    for r in good:
        r.runoff_p50_ms = times.get(r.candidate.label)
    line = "run-off of the in-budget candidates, timed side by side: " + ", ".join(
        f"{r.candidate.label} {times.get(r.candidate.label, float('nan')):.3f} ms" for r in good)
    progress.note(line)
    prep.decisions.append(line)
    return min(good, key=lambda r: times.get(r.candidate.label, r.optimized.p50_ms))


FLOAT_ON_DEVICE = {"cpu": "fp32", "arm-cpu": "fp32"}  # other devices (NPU, iGPU, NVIDIA GPU) run float as fp16


def _may_fall_back(prep: Prepared, results: list[CandidateResult]) -> bool:
    """int8 missed the budget and the user did not insist on a precision: a float package is the honest one."""
    return (prep.request.precision is None and not prep.request.weight_only
            and any(r.ok and not r.passed and r.candidate.precision == "int8" for r in results))


def _float_fallback(prep: Prepared, results: list[CandidateResult], progress) -> tuple[CandidateResult | None, str]:
    """Evaluate the profile's float precision on each usable runtime; the fastest within the budget wins."""
    from .types import Candidate

    precision = FLOAT_ON_DEVICE.get(prep.profile.target.device.value, "fp16")
    missed = [r for r in results if r.ok and not r.passed]
    why = "; ".join(f"{r.candidate.label}: {'; '.join(r.validation.failures)}" for r in missed)
    progress.warn(f"no int8 configuration held the accuracy budget ({why}); trying {precision}")
    tried = {r.candidate for r in results}
    floats = [Candidate(rt, precision, prep.request.graph_level or "all") for rt in prep.runtimes if rt != "tflite"]
    extra = [evaluate(prep, c, progress) for c in floats if c not in tried]
    results.extend(extra)
    chosen = runoff_pick(prep, [r for r in results if r.candidate.precision == precision], progress)
    if chosen is None:
        return None, ""
    note = (f"float fallback: no int8 configuration held the accuracy budget ({why}); packaged the fastest "
            f"{precision} configuration ({chosen.candidate.label}, {chosen.speedup:.2f}x vs fp32). "
            f"Try --accuracy-aware to keep only the sensitive layers in float")
    progress.warn(note)
    return chosen, note


def _failure(prep: Prepared, results: list[CandidateResult]) -> EdgeoptError:
    missed = [r for r in results if r.ok and not r.passed]
    if not missed:
        first = results[0]
        return getattr(first, "exception", None) or UnsupportedError(first.error or "no candidate could be built")
    r = missed[0]
    v = r.validation
    layers = ", ".join(f"{e.layer} ({e.error:.3g})" for e in v.sensitive_layers[:5])
    hint = ("rerun with --accuracy-aware to keep the most sensitive layers in float, or choose --precision fp16/fp32"
            if not r.candidate.accuracy_aware else "choose --precision fp16/fp32, or give better calibration data")
    return AccuracyError(f"{r.candidate.precision} on {r.candidate.runtime} misses the accuracy budget of profile {prep.profile.name!r}"
                         f": {'; '.join(v.failures)}"
                         + (f"; most sensitive layers ({v.sensitivity_basis or 'error added vs fp32'}): {layers}"
                            if layers else "")
                         + "; no package written", hint=hint)


def _choice_notes(chosen: CandidateResult, results: list[CandidateResult]) -> list[str]:
    if len(results) < 2:
        return [f"runtime {chosen.candidate.runtime} ({chosen.candidate.precision}): the profile's only candidate"]
    def what(r: CandidateResult) -> str:
        return f"runtime {r.candidate.runtime}" + ("" if len({x.candidate.runtime for x in results}) == len(results)
                                                   else f" {r.candidate.precision}")

    notes = [f"{what(chosen)} chosen: fastest within the accuracy budget, p50 "
             f"{chosen.optimized.p50_ms:.3f} ms ({chosen.speedup:.2f}x vs fp32)"]
    for r in results:
        if r is chosen:
            continue
        if not r.ok:
            notes.append(f"{what(r)} lost: could not build ({r.error})")
        elif not r.passed:
            notes.append(f"{what(r)} lost: missed the budget ({'; '.join(r.validation.failures)})")
        else:
            notes.append(f"{what(r)} lost: slower, p50 {r.optimized.p50_ms:.3f} ms ({r.speedup:.2f}x vs fp32)")
    return notes


def placement_line(assignment: dict[str, str], target: str) -> str | None:
    """One line naming the nodes ONNX Runtime assigned to another provider than the package's target."""
    off = sorted(node for node, provider in assignment.items() if provider != target)
    if not off:
        return None
    names = ", ".join(off[:8]) + (f" and {len(off) - 8} more" if len(off) > 8 else "")
    return f"placement: {len(off)} of {len(assignment)} nodes would not run on {target} ({names})"


def _placement_note(prep: Prepared, chosen: CandidateResult) -> str | None:
    """Where ONNX Runtime would run each node on the package's target provider (e.g. the CUDA provider): nodes it
    leaves to the CPU are reported now, and the agent checks again at install (profile ``placement``)."""
    art = chosen.artifact
    if art.runtime != "onnxruntime" or chosen.device in ("", "CPUExecutionProvider"):
        return None
    from ...agent.runtimes import get_runtime

    if chosen.device not in get_runtime(art.runtime).devices():
        return (f"placement not checked here: {chosen.device} is not on this host; the agent checks it at install "
                f"(profile placement = {getattr(prep.profile, 'placement', 'warn')})")
    import onnxruntime as ort

    from ..placement import RECORD_ASSIGNMENT, placement

    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    try:
        session = ort.InferenceSession(str(art.model_file), sess_options=so, providers=[chosen.device])
        line = placement_line(placement(session), chosen.device)
    except Exception as exc:  # noqa: BLE001 - reported, never fatal at package time
        return f"placement not checked: {' '.join(str(exc).split())[:200]}"
    if line and prep.progress:
        prep.progress.warn(line)
    return line or f"placement: every node on {chosen.device}"


def _pack(prep: Prepared, chosen: CandidateResult, results, decisions, output: Path, private_key) -> BuildResult:
    from ...agent.runtimes import get_runtime

    req, profile = prep.request, prep.profile
    art, v = chosen.artifact, chosen.validation
    # Sequences: only first steps, whose state is the data's own; a later step's feed holds fp32's carried state
    # while the optimized outputs were computed from the optimized model's own state.
    picks = (prep.heldout.starts if prep.heldout.starts is not None else range(len(prep.heldout)))
    picks = list(picks)[:req.golden_count]
    golden_bytes, golden_spec = golden.make_golden([prep.heldout.samples[i] for i in picks],
                                                   [chosen.outputs[i] for i in picks], v.max_abs_error,
                                                   profile.accuracy.min_cosine)
    note = ""
    if chosen.host_proxy:
        note = (f"measured on the host CPU as a proxy: the package targets {chosen.device} "
                f"({profile.target.device.value}), which this host does not have")
        if prep.progress:
            prep.progress.warn(note)
        decisions.append(note)
    bench = BenchmarkReport(machine=benchmark.machine(), batch_size=getattr(chosen, "batch", profile.batch_size),
                            threads=prep.threads, fp32=chosen.fp32, optimized=chosen.optimized,
                            speedup=chosen.speedup or 0.0, host_proxy=chosen.host_proxy,
                            target_device=chosen.device, note=note)
    inputs, outputs = chosen.tensors
    layout = None
    preprocessing: dict = {}
    if req.preprocessing is not None:
        preprocessing = req.preprocessing.model_dump(mode="json")
        layout = req.preprocessing.layout or data.guess_layout(prep.specs[0].shape)
        preprocessing["layout"] = layout
    name = req.name or prep.source.path.stem
    manifest = pack.build_manifest(
        name=_safe_name(name), version_=req.version, profile=profile.to_dict(), runtime=art.runtime,
        runtime_version=get_runtime(art.runtime).version(), device=chosen.device, precision=art.precision,
        model_file=art.model_file.name, inputs=pack.with_layout(inputs, layout), outputs=list(outputs),
        preprocessing=preprocessing,
        source=ManifestSource(filename=prep.source.path.name, format=prep.source.format, sha256=prep.source.sha256),
        calibration=prep.calibration_info or CalibrationInfo(source="none", samples=0),
        pruning=req.pruning, validation=v, benchmark=bench, golden=golden_spec, decisions=decisions,
        runtime_options=device_options(art.runtime_options, chosen.device) or {}, state=prep.state_pairs,
        host_profile=_host_profile(prep, chosen))
    written = pack.write(output, manifest, art.files, golden_bytes, private_key)
    return BuildResult(manifest=written, output=output, chosen=chosen, tried=results, benchmark=bench,
                       validation=v, signed=private_key is not None)


def _host_profile(prep: Prepared, chosen: CandidateResult) -> dict | None:
    """Per-layer profile summary of the chosen model on this host (the device-side profile's reference)."""
    from ...agent.runtimes import get_runtime
    from .layerbench import host_profile_summary

    art = chosen.artifact
    device = chosen.device if chosen.device in get_runtime(art.runtime).devices() else \
        {"onnxruntime": "CPUExecutionProvider"}.get(art.runtime, "CPU")
    options = device_options(art.runtime_options, device) or {}
    if art.runtime == "onnxruntime":
        options = {"providers": [device]}
    kwargs = {"device": device, "threads": prep.threads, "performance_hint": prep.profile.performance_hint.value,
              "options": options or None}
    try:
        feeds = prep.heldout.samples[0]
        summary = host_profile_summary(art.runtime, art.model_file, kwargs, feeds, runs=20)
    except Exception as exc:  # noqa: BLE001 - a reference profile is a nicety; the package is still valid
        log.warning("no host profile in the manifest: %s", exc)
        return None
    if summary is not None:
        summary["host_proxy"] = device != chosen.device
    return summary


def _safe_name(name: str) -> str:
    import re

    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", name).lstrip("._-") or "model"
    return cleaned[:128]
