"""Structured pruning with label-free recovery (``edgeopt prune``, ``edgeopt package --prune``).

Python API::

    from edgeopt.sdk.prune import prune, prune_model

    small = prune(model, example_inputs, ratio=0.4, importance="l2",        # or "l1", "taylor", "hessian"
                  ignored_layers=[model.fc], recover="distill", steps=300, data=calib_batches)
    result = prune_model(model, example_inputs, ratio=0.4, data=calib_batches)   # PruneResult
    result.model, result.info          # the pruned module; PruningInfo (channels, params, FLOPs, recovery)

Whole channels and filters are removed through Torch-Pruning's dependency graph (``core``), so the result is
a smaller dense model every runtime runs faster, and int8 / fp16 after it still apply. Recovery
(``recover``) is distillation from the unpruned model on unlabelled calibration inputs by default, or the
user's training function. torch and torch-pruning are optional: ``pip install 'edgeopt[prune]'``
(without them every entry point raises MissingDependencyError naming that extra).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Iterable, Union

from ..errors import InputError
from ..package import PruningInfo
from .core import IMPORTANCES, PruneResult, check_ratio, require_torch

log = logging.getLogger(__name__)

Recover = Union[str, Callable, None]


def prune_model(model, example_inputs, *, ratio: float = 0.5, per_layer: dict | None = None,
                global_pruning: bool = False, importance: str = "l2", ignored_layers: Iterable = (),
                round_to: int | None = None, recover: Recover = "distill", steps: int = 300,
                data: Iterable | None = None, batch_size: int = 32, lr: float = 1e-3, device: str | None = None,
                seed: int = 0, progress=None) -> PruneResult:
    """Prune ``model`` (a ``torch.nn.Module``; a pruned copy is returned, the argument is not changed) and
    recover its accuracy.

    ratio: fraction of channels removed from every prunable group (``global_pruning``: removed overall,
    ranked across layers). per_layer: {layer name: ratio} overrides. importance: l2 / l1 (weight magnitude),
    taylor or hessian (gradients of a label-free loss on ``data``). ignored_layers: names or modules kept
    whole (layers that produce the model's outputs are always kept). round_to: channel counts become
    multiples of it (8/16/32 for int8 and NPU kernels; see :func:`round_to_for`). recover: "distill"
    (default, from the unpruned model on ``data``, no labels), a function
    ``fn(model, teacher=, data=, steps=)``, or None. data: input tuples (or tensors/arrays) with a batch axis.
    """
    torch, _ = require_torch()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"prune() takes a torch.nn.Module, found {type(model).__name__}")
    check_ratio(ratio)
    if recover not in (None, "distill", "none") and not callable(recover):
        raise InputError(f"recover {recover!r} is not 'distill', a training function or None")
    data = _inputs_list(data)
    if recover == "distill" and steps > 0 and not data:
        raise InputError("recovery by distillation needs calibration images and none were given",
                         hint="pass calibration data (data=... / --calib), or recover=None (--no-recover)")
    example = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    from .core import IMPORTANCE_SAMPLES, prune_graph

    batches = _importance_batches(torch, data, IMPORTANCE_SAMPLES.get(importance, 0))
    info = prune_graph(student, example, ratio=ratio, per_layer=per_layer, global_pruning=global_pruning,
                       importance=importance, ignored_layers=_same_in(student, model, ignored_layers),
                       round_to=round_to, batches=batches)
    losses: list[float] = []
    if recover == "distill" and steps > 0:
        from .recover import distill

        rec = distill(student, teacher, data, steps=steps, batch_size=batch_size, lr=lr, device=device, seed=seed,
                      progress=progress)
        info = _with_recovery(info, "distill", rec)
        losses = rec["losses"]
    elif callable(recover):
        from .recover import user_train

        rec = user_train(student, teacher, recover, data, steps)
        student = rec.pop("model") or student
        info = _with_recovery(info, "user", rec)
        losses = rec["losses"]
    student.eval()
    return PruneResult(model=student, info=info, teacher=teacher, losses=losses)


def prune(model, example_inputs, **kwargs) -> Any:
    """:func:`prune_model`, returning only the pruned module (its figures are in ``module.edgeopt_pruning``)."""
    result = prune_model(model, example_inputs, **kwargs)
    result.model.edgeopt_pruning = result.info
    return result.model


def round_to_for(profile) -> int | None:
    """The channel multiple a hardware profile's kernels like (``pruning.round_to`` in the profile file)."""
    return profile.pruning.round_to if getattr(profile, "pruning", None) else None


def _with_recovery(info: PruningInfo, kind: str, rec: dict) -> PruningInfo:
    return info.model_copy(update={"recovery": kind, "recovery_steps": int(rec["steps"]),
                                   "recovery_samples": int(rec.get("samples") or 0),
                                   "recovery_loss_first": rec.get("loss_first"),
                                   "recovery_loss_last": rec.get("loss_last"),
                                   "recovery_device": rec.get("device")})


def _inputs_list(data) -> list[tuple]:
    if data is None:
        return []
    return [item if isinstance(item, tuple) else (tuple(item) if isinstance(item, list) else (item,))
            for item in data]


def _importance_batches(torch, data: list[tuple], samples: int) -> list[tuple]:
    """The first ``samples`` calibration samples, in batches of 16, for the gradient-based criteria."""
    if not samples or not data:
        return []
    cols = [torch.cat([torch.as_tensor(item[k]).float() for item in data], 0)[:samples]
            for k in range(len(data[0]))]
    n = cols[0].shape[0]
    return [tuple(c[i:i + 16] for c in cols) for i in range(0, n, 16)]


def _same_in(copy_, original, layers) -> list:
    """Layers given as modules of the original model, mapped to the same-named modules of its copy."""
    names = {id(m): n for n, m in original.named_modules()}
    out = []
    for layer in layers or ():
        if isinstance(layer, str):
            out.append(layer)
        elif id(layer) in names:
            out.append(names[id(layer)])
        else:
            out.append(layer)  # resolve_layers reports it
    return out


__all__ = ["prune", "prune_model", "PruneResult", "PruningInfo", "IMPORTANCES", "round_to_for"]
