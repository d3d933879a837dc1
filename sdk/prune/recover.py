"""Recovery after pruning: distillation from the unpruned model (no labels), or the user's training function.

Distillation needs only inputs: the teacher (the unpruned model, frozen, eval mode) labels each calibration
batch with its outputs and the student (the pruned model) learns to say the same: every output by a mean square
error scaled by the teacher's own variance (so outputs of different magnitudes weigh alike), plus, for 2-D
outputs that may be a classifier's, a temperature-softened KL divergence (Hinton et al., 2015); see
:func:`distill_loss`.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

from ..errors import InputError
from .core import _flatten, require_torch, run

log = logging.getLogger(__name__)

TEMPERATURE = 4.0
WINDOW = 20  # steps averaged into the first / last loss figures


def pick_device(torch, device: str | None) -> str:
    """The device to train on: the one asked for, else CUDA when present, else CPU."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _is_probability(torch, t) -> bool:
    """Rows of non-negative numbers summing to 1: a softmax output (MTCNN's face / not-face head)."""
    return bool((t >= 0).all()) and bool(torch.allclose(t.sum(dim=1), torch.ones_like(t[:, 0]), atol=1e-3))


def distill_loss(torch, student_out, teacher_out):
    """Every float output is matched by its mean square error scaled by the teacher's variance (regression heads:
    boxes, landmarks, embeddings; logits too, which is logit matching). A 2-D output with more than one column
    may be a classifier's, so its temperature-softened KL divergence is added; for an output that already holds
    probabilities (a softmax inside the model) the KL is taken on their logs, and the MSE is left out.

    A box head [N, 4] is also 2-D: KL alone (softmax of the offsets) is blind to a shift of all four, which is
    why MTCNN's box error did not recover when KL was the only term for such outputs."""
    total = 0.0
    for s, t in zip(_flatten(student_out), _flatten(teacher_out)):
        if not torch.is_tensor(s) or not s.is_floating_point():
            continue
        prob = False
        if s.dim() == 2 and s.shape[1] > 1:
            prob = _is_probability(torch, t)
            s_log, t_log = (torch.log(s.clamp_min(1e-8)), torch.log(t.clamp_min(1e-8))) if prob else (s, t)
            log_p = torch.log_softmax(s_log / TEMPERATURE, dim=1)
            q = torch.softmax(t_log / TEMPERATURE, dim=1)
            total = total + torch.nn.functional.kl_div(log_p, q, reduction="batchmean") * TEMPERATURE ** 2
        if not prob:
            total = total + torch.nn.functional.mse_loss(s, t) / (t.var() + 1e-6)
    return total


def distill(student, teacher, data: list[tuple], *, steps: int, batch_size: int = 32, lr: float = 1e-3,
            device: str | None = None, seed: int = 0, progress=None) -> dict[str, Any]:
    """Train ``student`` in place to match ``teacher`` on ``data`` (a list of input tuples, one sample each
    or batches) for ``steps`` optimizer steps; returns {steps, samples, loss_first, loss_last, device, losses}."""
    torch, _ = require_torch()
    if steps < 1:
        raise InputError(f"recovery steps must be at least 1, found {steps}", hint="or turn recovery off")
    inputs = _stack(torch, data)
    if inputs is None:
        raise InputError("recovery by distillation needs calibration images and none were given",
                         hint="pass --calib IMAGE_FOLDER or .npz, or --no-recover")
    n = inputs[0].shape[0]
    device = pick_device(torch, device)
    student.to(device)
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = _bar(progress, steps)
    student.train()
    try:
        for _step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
            batch = tuple(t[idx].to(device) for t in inputs)
            with torch.no_grad():
                target = run(teacher, batch)
            loss = distill_loss(torch, run(student, batch), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise InputError(f"distillation diverged at step {_step + 1} (loss {value})",
                                 hint="lower --lr, or prune less")
            losses.append(value)
            bar(value)
    finally:
        getattr(bar, "close", lambda: None)()
        student.eval()
        student.to("cpu")
        teacher.to("cpu")
    return {"steps": steps, "samples": n, "device": device, "losses": losses,
            "loss_first": _mean(losses[:WINDOW]), "loss_last": _mean(losses[-WINDOW:])}


def user_train(student, teacher, train_fn: Callable, data, steps: int) -> dict[str, Any]:
    """Call the user's ``train_fn(model, teacher=..., data=..., steps=...)``; it trains ``model`` in place
    (or returns the trained module) and may return a list of losses."""
    returned = train_fn(student, teacher=teacher, data=data, steps=steps)
    losses = [float(v) for v in returned] if isinstance(returned, (list, tuple)) else []
    return {"steps": steps, "samples": len(data) if hasattr(data, "__len__") else 0, "device": None,
            "losses": losses, "loss_first": _mean(losses[:WINDOW]), "loss_last": _mean(losses[-WINDOW:]),
            "model": returned if _is_module(returned) else None}


def _is_module(obj) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(obj, torch.nn.Module)


def _stack(torch, data) -> tuple | None:
    """Concatenate input tuples (numpy or torch, each with a batch axis) into one tensor per input."""
    if data is None:
        return None
    items = list(data)
    if not items:
        return None
    items = [item if isinstance(item, tuple) else (item,) for item in items]
    cols = []
    for k in range(len(items[0])):
        cols.append(torch.cat([torch.as_tensor(item[k]).float() for item in items], 0))
    return tuple(cols)


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _bar(progress, steps: int):
    """A per-step callback: the progress object's ``steps`` bar when it has one, else a bar that only logs."""
    maker = getattr(progress, "steps", None)
    if maker is not None:
        return maker("recovery (distillation)", steps)
    from ..pipeline.progress import StepBar

    return StepBar("recovery (distillation)", steps, None)
