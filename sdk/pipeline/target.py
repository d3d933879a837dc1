"""Validate the chosen package on the target's CPU architecture (``edgeopt package --validate-on aarch64``).

The held-out samples run through the packaged model on an emulated aarch64 CPU (:mod:`edgeopt.sdk.emulation`),
with the runtime the agent has there. Those outputs, not the host's, then decide the accuracy gate and
become the golden samples, so the agent's self-test on an ARM board compares ARM kernels with ARM kernels.
The host benchmark is untouched (``host_proxy`` stays true): emulation says nothing about speed.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from ..emulation import EmulationError, find_emulator
from ..errors import AccuracyError, UnsupportedError
from ..package import TargetValidation
from . import accuracy
from .golden import golden_key, read_golden
from .prepared import Prepared
from .types import CandidateResult

log = logging.getLogger(__name__)

TARGETS = ("host", "aarch64")
DEFAULT_TIMEOUT_S = 1800.0
_MAX_OUTPUT_BYTES = 2 * 1024 ** 3  # the worker's outputs file; far above any held-out set here


def _write_inputs(samples: list[dict], path: Path) -> None:
    arrays = {golden_key("input", i, name): np.asarray(arr) for i, feed in enumerate(samples)
              for name, arr in feed.items()}
    np.savez(path, **arrays)


def _read_outputs(path: Path, count: int) -> list[dict]:
    if not path.is_file() or path.stat().st_size > _MAX_OUTPUT_BYTES:
        raise EmulationError(f"the aarch64 run wrote no usable outputs file ({path.name})")
    rows = [outs for _, outs in read_golden(path.read_bytes())]
    if len(rows) != count:
        raise EmulationError(f"the aarch64 run returned {len(rows)} samples, {count} were sent")
    return rows


def validate_on_target(prep: Prepared, chosen: CandidateResult, target: str, progress, *,
                       sysroot: Path | None = None, cpu: str | None = None,
                       timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Re-judge ``chosen`` with outputs computed on ``target``; update its validation and outputs in place.

    Returns the decision lines for the manifest. Raises :class:`AccuracyError` when the budget holds on
    the host but not on the target, and :class:`EmulationError` when the target cannot run at all.
    """
    if target == "host":
        return []
    if target not in TARGETS:
        raise UnsupportedError(f"--validate-on {target!r} is not one of {', '.join(TARGETS)}")
    arches = list(prep.profile.target.arch or [])
    if arches and target not in arches:
        raise UnsupportedError(f"profile {prep.profile.name!r} targets {'/'.join(arches)}; it cannot be validated "
                               f"on {target}", hint="use --validate-on with the arm profile (or a profile for aarch64)")
    emu = find_emulator(sysroot, cpu)
    art = chosen.artifact
    from .evaluation import device_options

    options = device_options(art.runtime_options, chosen.device) or {}
    work = prep.workdir / "target-aarch64"
    work.mkdir(parents=True, exist_ok=True)
    samples = prep.heldout.samples
    inputs, outputs = work / "inputs.npz", work / "outputs.npz"
    _write_inputs(samples, inputs)
    with progress.stage(f"validate on aarch64 (QEMU emulation): {len(samples)} held-out samples"):
        started = time.monotonic()
        with emu.session() as py:
            done = py.run(["-m", "edgeopt.sdk.target_worker", str(art.model_file), art.runtime, str(inputs),
                           str(outputs), "--options", json.dumps(options)], timeout=timeout_s)
        wall = time.monotonic() - started
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise EmulationError(f"{art.runtime} could not run {art.model_file.name} on the emulated aarch64 CPU: "
                             f"{last[:400]}", hint=f"check the sysroot with scripts/arm-sysroot.sh --check {emu.root}")
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        summary = {}
    target_outs = _read_outputs(outputs, len(samples))
    from .tasks import output_figures

    vs_host, _ = output_figures(chosen.outputs, target_outs)
    report = accuracy.compare(prep.reference_outputs, target_outs, prep.profile.accuracy, prep.heldout.labels,
                              prep.evaluator)
    info = emu.describe()
    version = str(summary.get("runtime_version", ""))
    if version[:1].isdigit():  # ONNX Runtime reports a bare number, LiteRT its package name too
        version = f"{art.runtime} {version}"
    where = f"aarch64 (emulated by {info.get('emulator') or 'QEMU'}, CPU {info['cpu']})"
    tv = TargetValidation(arch=str(summary.get("arch", "aarch64")), emulated=True, emulator=info.get("emulator", ""),
                          cpu=info["cpu"],
                          runtime_version=version, samples=len(samples),
                          wall_seconds=round(wall, 2), vs_host=vs_host)
    if tv.arch != "aarch64":
        raise EmulationError(f"the emulated run reported arch {tv.arch!r}, not aarch64")
    worst = max((f.max_abs_error for f in vs_host), default=0.0)
    figures = (f"{len(samples)} held-out samples, max abs error vs the host's outputs {worst:.3g}, least cosine "
               f"{min((f.min_cosine for f in vs_host), default=1.0):.6f} (emulated wall time {wall:.1f} s: "
               f"emulation, not a speed figure)")
    progress.note(f"ran on {where} with {tv.runtime_version}: {figures}")
    if not report.passed:
        raise AccuracyError(f"{chosen.candidate.label} holds the accuracy budget of profile {prep.profile.name!r} on "
                            f"the host but not on {where}: {'; '.join(report.failures)}; no package written",
                            hint="the ARM kernels compute differently from the host's; relax the budget or try "
                                 "--precision fp32 (the float fallback and --accuracy-aware search on the host)")
    chosen.validation = report.model_copy(update={
        "ran_on": "aarch64 (emulated)", "target": tv, "float_layers": chosen.validation.float_layers,
        "sensitive_layers": chosen.validation.sensitive_layers,
        "sensitivity_basis": chosen.validation.sensitivity_basis})
    chosen.outputs = target_outs
    return [f"validated on {where} with {tv.runtime_version}: {figures}; the accuracy gate and the golden samples "
            f"use the aarch64 outputs"]


__all__ = ["TARGETS", "validate_on_target", "EmulationError"]
