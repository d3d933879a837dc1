"""One pruning run as the CLI does it: build the module, read calibration inputs, prune, recover, export.

Shared by ``edgeopt prune`` (writes the pruned ONNX) and ``edgeopt package --prune`` (hands the pruned ONNX
and the unpruned reference ONNX to the normal pipeline, which gates against the unpruned model).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

log = logging.getLogger(__name__)

RECOVER_SAMPLES = 4096  # cap on calibration samples held in memory for recovery


@dataclass
class PruneJob:
    """Everything one pruning run needs (CLI flags)."""

    factory: str
    weights: Path | None
    inputs: list  # [TorchInput]
    ratio: float
    per_layer: dict[str, float] = field(default_factory=dict)
    global_pruning: bool = False
    importance: str = "l2"
    ignore: list[str] = field(default_factory=list)
    round_to: int | None = None
    steps: int = 300  # 0: no recovery
    train_fn: str | None = None  # MODULE:FUNCTION, the user's recovery
    calib: Path | None = None
    preprocessing: Any = None
    lr: float = 1e-3
    batch_size: int = 32
    device: str | None = None
    # The pipeline holds the last samples of --calib out for its accuracy check when no --heldout is given:
    # recovery then trains only on the calibration part, never on what the gate judges.
    # ("tail", calibration n, held-out n): int8, the held-out samples are the last of the first n + n;
    # ("head", 0, held-out n): no calibration, the held-out samples are the first n.
    holdout: tuple[str, int, int] | None = None


@dataclass
class PruneOutcome:
    pruned_onnx: Path
    unpruned_onnx: Path | None
    result: Any  # PruneResult


def calibration_inputs(job: PruneJob) -> list[tuple]:
    """Calibration samples as input tuples (batch axis 1 each); [] without --calib."""
    if job.calib is None:
        return []
    from ..pipeline import data
    from .source import input_specs

    specs = input_specs(job.inputs)
    if job.holdout is not None and job.holdout[0] == "tail":
        _, calib_n, held_n = job.holdout
        loaded = data.load_any(Path(job.calib), specs, job.preprocessing, "calibration", 1, calib_n + held_n)
        loaded, _ = data.split_heldout(loaded, held_n)
    elif job.holdout is not None:
        # the pipeline judges on the first held_n samples of --calib (no int8 calibration): skip them
        _, _, held_n = job.holdout
        loaded = data.load_any(Path(job.calib), specs, job.preprocessing, "calibration", 1, RECOVER_SAMPLES + held_n)
        loaded.samples = loaded.samples[held_n:]
        if not loaded.samples:
            raise InputError(f"--calib has no samples left for recovery after the {held_n} the accuracy check "
                             f"holds out", hint="give more samples, or a separate --heldout file")
    else:
        loaded = data.load_any(Path(job.calib), specs, job.preprocessing, "calibration", 1, RECOVER_SAMPLES)
    return [tuple(sample[i.name] for i in job.inputs) for sample in loaded.samples]


def run_job(job: PruneJob, workdir: Path, progress, *, export_reference: bool = False) -> PruneOutcome:
    """Prune and recover; export the pruned model (and the unpruned one, for the pipeline) into ``workdir``."""
    from . import prune_model
    from .core import require_torch
    from .source import build_module, example_inputs, export_onnx

    torch, _ = require_torch()
    if job.steps and job.train_fn is None and job.calib is None:
        raise InputError("recovery by distillation needs calibration images and none were given",
                         hint="pass --calib IMAGE_FOLDER or .npz, or --no-recover")
    with progress.stage("load the PyTorch model"):
        model = build_module(job.factory, job.weights)
        example = example_inputs(torch, job.inputs)
        progress.note(f"{job.factory}: {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} "
                      f"parameters" + (f", weights {job.weights.name}" if job.weights else ""))
    with progress.stage("calibration data for recovery"):
        data = calibration_inputs(job)
        if data:
            progress.note(f"{len(data)} calibration samples (no labels)")
    recover: Any = None
    if job.steps:
        recover = _load_train_fn(job.train_fn) if job.train_fn else "distill"
    with progress.stage(f"prune {job.ratio:.0%} ({job.importance})"):
        result = prune_model(model, example, ratio=job.ratio, per_layer=job.per_layer,
                             global_pruning=job.global_pruning, importance=job.importance, ignored_layers=job.ignore,
                             round_to=job.round_to, recover=None, data=data)
        info = result.info
        progress.note(f"channels {info.channels_before:,} -> {info.channels_after:,}, parameters "
                      f"{info.params_before:,} -> {info.params_after:,}, FLOPs {info.flops_before:,} -> "
                      f"{info.flops_after:,}" + (f", rounded to multiples of {info.round_to}" if info.round_to else ""))
    if recover is not None:
        result = _recover(result, recover, data, job, progress)
    with progress.stage("export to ONNX"):
        pruned = export_onnx(result.model, example, job.inputs, Path(workdir) / "pruned.onnx")
        unpruned = export_onnx(result.teacher, example, job.inputs, Path(workdir) / "unpruned.onnx") \
            if export_reference else None
    return PruneOutcome(pruned_onnx=pruned, unpruned_onnx=unpruned, result=result)


def _recover(result, recover, data, job: PruneJob, progress):
    from . import _with_recovery
    from .recover import distill, user_train

    if recover == "distill":
        with progress.stage(f"recover: distill from the unpruned model, {job.steps} steps"):
            rec = distill(result.model, result.teacher, data, steps=job.steps, batch_size=job.batch_size,
                          lr=job.lr, device=job.device, progress=progress)
        kind = "distill"
    else:
        with progress.stage(f"recover: {job.train_fn}, {job.steps} steps"):
            rec = user_train(result.model, result.teacher, recover, data, job.steps)
            result.model = rec.pop("model") or result.model
        kind = "user"
    result.info = _with_recovery(result.info, kind, rec)
    result.losses = rec["losses"]
    if rec.get("loss_first") is not None:
        progress.note(f"loss {rec['loss_first']:.4f} (first {min(20, len(rec['losses']))} steps) -> "
                      f"{rec['loss_last']:.4f} (last)")
    result.model.eval()
    return result


def _load_train_fn(spec: str):
    import importlib

    from .source import _FACTORY

    match = _FACTORY.match(spec)
    if not match:
        raise InputError(f"--train-fn {spec!r} is not MODULE:FUNCTION")
    try:
        if match["mod"].endswith(".py"):
            import importlib.util

            loader = importlib.util.spec_from_file_location("edgeopt_user_train_fn", match["mod"])
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(match["mod"])
    except Exception as exc:
        raise InputError(f"--train-fn: cannot import {match['mod']} ({exc.__class__.__name__}: {exc})") from None
    fn = getattr(module, match["fn"], None)
    if not callable(fn):
        raise InputError(f"--train-fn: {match['mod']} has no callable {match['fn']!r}")
    return fn
