"""Structured channel pruning through Torch-Pruning's dependency graph (DepGraph), never by hand.

DepGraph traces the module once and groups every tensor dimension that must lose the same channels (a
residual add ties the convolutions on both sides of it; a concat offsets indices; a grouped convolution
ties its groups). We choose the groups' ratio, importance and rounding, keep the layers that produce the
model's outputs, and count channels, parameters and MACs before and after.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError, UnsupportedError, missing_extra
from ..package import PruningInfo

log = logging.getLogger(__name__)

IMPORTANCES = ("l2", "l1", "taylor", "hessian")
# Gradient-based criteria see this many calibration samples (Hessian: one backward pass each).
IMPORTANCE_SAMPLES = {"taylor": 64, "hessian": 32}


def require_torch():
    """(torch, torch_pruning), or MissingDependencyError naming the extra."""
    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "prune") from None
    try:
        import torch_pruning
    except ImportError:
        raise missing_extra("torch-pruning", "prune") from None
    return torch, torch_pruning


@dataclass
class PruneResult:
    """The pruned (and recovered) module and what was done to it."""

    model: Any
    info: PruningInfo
    teacher: Any = None  # the unpruned module (a copy), kept for export as the accuracy reference
    losses: list[float] = field(default_factory=list)


def check_ratio(ratio: float, what: str = "pruning ratio") -> float:
    """A ratio strictly between 0 and 1 (0 prunes nothing, 1 removes every channel)."""
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise InputError(f"{what} {ratio!r} is not a number", hint="give a fraction of channels, e.g. 0.4") from None
    if not 0.0 < value < 1.0:
        raise InputError(f"{what} {ratio!r} is outside (0, 1)",
                         hint="give the fraction of channels to remove, e.g. 0.4 removes 40%")
    return value


def resolve_layers(model, layers, what: str) -> list:
    """Modules from names (as in ``model.named_modules()``) or modules; unknown names fail with suggestions."""
    named = dict(model.named_modules())
    out = []
    for layer in layers or ():
        if isinstance(layer, str):
            if layer not in named or not layer:
                close = difflib.get_close_matches(layer, [n for n in named if n], n=3)
                hint = (f"did you mean {', '.join(close)}?" if close
                        else "names are those of model.named_modules(), e.g. " + ", ".join(list(named)[1:4]))
                raise InputError(f"{what}: layer {layer!r} does not exist in {type(model).__name__}", hint=hint)
            out.append(named[layer])
        else:
            if not any(layer is m for m in named.values()):
                raise InputError(f"{what}: {type(layer).__name__} module is not part of {type(model).__name__}")
            out.append(layer)
    return out


def _prunable(torch, model) -> dict[str, Any]:
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds)}


def channel_counts(torch, model) -> dict[str, int]:
    """Output channels (features) of every convolution and linear layer, by name."""
    return {n: int(m.out_channels if hasattr(m, "out_channels") else m.out_features)
            for n, m in _prunable(torch, model).items()}


def _flatten(out) -> list:
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _flatten(v)]
    return [out]


def run(model, inputs: tuple):
    return model(*inputs)


def output_layers(torch, model, example_inputs: tuple) -> list[str]:
    """Convolutions / linears whose output is a model output: their channels are the model's contract."""
    seen: dict[int, str] = {}
    hooks = [m.register_forward_hook(lambda mod, _i, o, n=n: seen.__setitem__(id(o), n))
             for n, m in _prunable(torch, model).items()]
    try:
        with torch.no_grad():
            outs = _flatten(run(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return sorted({seen[id(o)] for o in outs if id(o) in seen})


def _shapes(torch, model, example_inputs) -> list[tuple]:
    with torch.no_grad():
        return [tuple(t.shape) for t in _flatten(run(model, example_inputs)) if hasattr(t, "shape")]


def measure(tp, model, example_inputs) -> tuple[int, int]:
    """(MACs, parameters) of one forward pass on the example inputs."""
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs), int(params)


def make_importance(tp, name: str):
    if name not in IMPORTANCES:
        close = difflib.get_close_matches(str(name), IMPORTANCES, n=1)
        raise InputError(f"importance {name!r} is not one of {', '.join(IMPORTANCES)}",
                         hint=f"did you mean {close[0]}?" if close else "l2 (weight magnitude) is the default")
    if name in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupHessianImportance()


def label_free_loss(torch, outputs) -> Any:
    """A loss with no labels, for the gradient-based criteria: a classifier's cross-entropy against its own
    top-1 (the pseudo-label), any other output's mean square (its energy). Both are what the network would
    lose by changing what it says now."""
    total = 0.0
    for out in _flatten(outputs):
        if not torch.is_tensor(out) or not out.is_floating_point():
            continue
        if out.dim() == 2 and out.shape[1] > 1:
            total = total + torch.nn.functional.cross_entropy(out, out.detach().argmax(1))
        else:
            total = total + 0.5 * out.pow(2).mean()
    return total


def _accumulate_gradients(torch, model, importance, name: str, batches: list[tuple]) -> None:
    """Gradients the Taylor / Hessian criteria read (label-free loss on calibration samples)."""
    model.zero_grad()
    if name == "taylor":
        for batch in batches:
            label_free_loss(torch, run(model, batch)).backward()
        return
    importance.zero_grad()
    for batch in batches:
        for i in range(batch[0].shape[0]):  # per sample: the criterion sums squared per-sample gradients
            model.zero_grad()
            label_free_loss(torch, run(model, tuple(t[i:i + 1] for t in batch))).backward()
            importance.accumulate_grad(model)


def prune_graph(model, example_inputs: tuple, *, ratio: float, per_layer: dict | None, global_pruning: bool,
                importance: str, ignored_layers, round_to: int | None, batches: list[tuple] | None) -> PruningInfo:
    """Prune ``model`` in place; return the figures (recovery fields left empty)."""
    torch, tp = require_torch()
    ratio = check_ratio(ratio)
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise InputError(f"channel rounding {round_to!r} is not a positive integer", hint="e.g. 8, 16 or 32")
    per_layer = dict(per_layer or {})
    for key, value in per_layer.items():
        check_ratio(value, f"pruning ratio of layer {key}")
    ratio_modules = dict(zip(resolve_layers(model, list(per_layer), "per-layer ratio"), per_layer.values()))
    ignored = resolve_layers(model, ignored_layers, "layers to keep")
    imp = make_importance(tp, importance)
    if importance in IMPORTANCE_SAMPLES and not batches:
        raise InputError(f"importance {importance!r} needs calibration data (it reads gradients)",
                         hint="pass --calib, or use --importance l2")
    model.eval()
    try:
        shapes_before = _shapes(torch, model, example_inputs)
        heads = output_layers(torch, model, example_inputs)
    except Exception as exc:
        raise UnsupportedError(f"torch cannot run {type(model).__name__} on the example inputs "
                               f"({_one_line(exc)})", hint="check --input-shape and the factory") from None
    named = dict(model.named_modules())
    ignored_names = sorted({n for n, m in named.items() if any(m is i for i in ignored)} | set(heads))
    before = channel_counts(torch, model)
    macs0, params0 = measure(tp, model, example_inputs)
    try:
        pruner = tp.pruner.BasePruner(
            model, example_inputs, importance=imp, global_pruning=global_pruning, pruning_ratio=ratio,
            pruning_ratio_dict=ratio_modules or None, ignored_layers=[named[n] for n in ignored_names],
            round_to=round_to, forward_fn=lambda m, x: run(m, x if isinstance(x, tuple) else (x,)))
    except Exception as exc:
        raise UnsupportedError(f"torch-pruning cannot trace {type(model).__name__} ({_one_line(exc)})",
                               hint="the model must run as plain torch ops on the example inputs; "
                                    "keep the layers it fails on with --ignore") from None
    if importance in IMPORTANCE_SAMPLES:
        model.train(False)
        _accumulate_gradients(torch, model, imp, importance, batches)
    pruner.step()
    model.zero_grad(set_to_none=True)
    shapes_after = _shapes(torch, model, example_inputs)
    if shapes_after != shapes_before:
        raise UnsupportedError(f"pruning changed the model's output shapes from {shapes_before} to {shapes_after}",
                               hint="name the layers that produce the outputs with --ignore")
    after = channel_counts(torch, model)
    if after == before:
        raise UnsupportedError(f"torch-pruning found no channels it can remove in {type(model).__name__}",
                               hint="every group is kept (--ignore, output layers) or the forward pass leaves "
                                    "torch (numpy, Python numbers), which the dependency graph cannot follow")
    macs1, params1 = measure(tp, model, example_inputs)
    return PruningInfo(
        ratio=ratio, global_pruning=global_pruning, per_layer_ratios={str(k): float(v) for k, v in per_layer.items()},
        importance=importance, round_to=round_to, ignored_layers=ignored_names,
        channels_before=sum(before.values()), channels_after=sum(after.values()),
        layer_channels={n: [before[n], after.get(n, 0)] for n in before},
        params_before=params0, params_after=params1, flops_before=2 * macs0, flops_after=2 * macs1,
        torch_pruning_version=getattr(tp, "__version__", ""))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:200]


TrainFn = Callable[..., Any]
