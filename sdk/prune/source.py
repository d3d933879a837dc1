"""What the CLI prunes: a ``module:factory`` (or ``file.py:factory``) with a weights file, its example inputs,
its calibration inputs, and the ONNX files it becomes (pruned, and the unpruned reference)."""
from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, UnsupportedError, missing_extra

log = logging.getLogger(__name__)

_FACTORY = re.compile(r"^(?P<mod>[^:]+):(?P<fn>[A-Za-z_][A-Za-z0-9_]*)$")
MAX_WEIGHTS_BYTES = 8 * 1024**3


def is_factory(text: str) -> bool:
    """True for ``pkg.module:fn`` or ``path/file.py:fn`` (not an existing model file)."""
    return bool(_FACTORY.match(str(text))) and not Path(str(text)).is_file()


def build_module(spec: str, weights: Path | None):
    """Call the factory and load the weights (``state_dict``, read with ``weights_only=True``: no pickle code)."""
    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "torch") from None
    match = _FACTORY.match(spec)
    if not match:
        raise InputError(f"{spec!r} is not MODULE:FACTORY", hint="e.g. mypkg.models:build or models.py:build")
    mod_name, fn_name = match["mod"], match["fn"]
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            if not path.is_file():
                raise InputError(f"factory file {path} not found")
            name = f"edgeopt_user_factory_{abs(hash(str(path.resolve())))}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            sys.modules[name] = module
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot import {mod_name} ({exc.__class__.__name__}: {_one_line(exc)})",
                         hint="the module must be importable (PYTHONPATH) or a .py file path") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise InputError(f"{mod_name} has no callable {fn_name!r}")
    try:
        model = factory()
    except Exception as exc:
        raise InputError(f"{spec}() failed ({exc.__class__.__name__}: {_one_line(exc)})") from None
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{spec}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(torch, model, Path(weights))
    return model.eval()


def load_weights(torch, model, path: Path) -> None:
    if not path.is_file():
        raise InputError(f"weights file {path} not found")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise InputError(f"weights file {path} is larger than {MAX_WEIGHTS_BYTES >> 30} GiB")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"{path.name} is not a torch state_dict ({_one_line(exc)})",
                         hint="save it with torch.save(model.state_dict(), path)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InputError(f"{path.name} holds a {type(state).__name__}, not a state_dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise InputError(f"{path.name} does not fit {type(model).__name__} ({_one_line(exc)})") from None
    if missing or unexpected:
        raise InputError(f"{path.name} does not fit {type(model).__name__}: "
                         f"{len(missing)} missing key(s) {list(missing)[:3]}, "
                         f"{len(unexpected)} unexpected {list(unexpected)[:3]}")


@dataclass
class TorchInput:
    """One model input: its ONNX name and the example shape (batch 1 by default)."""

    name: str
    shape: tuple[int, ...]


def example_inputs(torch, inputs: list[TorchInput]) -> tuple:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.rand(*i.shape, generator=gen) for i in inputs)


def input_specs(inputs: list[TorchInput]):
    from ..pipeline.shapes import InputSpec

    return [InputSpec(i.name, "float32", tuple(i.shape)) for i in inputs]


def export_onnx(model, example: tuple, inputs: list[TorchInput], path: Path, output_names=None) -> Path:
    """ONNX export with a dynamic batch axis; a model torch cannot export fails with one line."""
    from ..pipeline.load import export_torch

    if output_names is None:
        output_names = _output_names(model, example)
    try:
        return export_torch(model, example, path, input_names=[i.name for i in inputs], output_names=output_names)
    except Exception as exc:
        raise UnsupportedError(f"torch cannot export {type(model).__name__} to ONNX ({_one_line(exc)})",
                               hint="the model must be traceable by torch.onnx.export") from None


def _output_names(model, example: tuple) -> list[str] | None:
    """``output0``, ``output1``, ... for a module returning several tensors, else None (torch's own name).

    torch names outputs after graph node numbers ('54', '57'), which differ between a model and its pruned copy;
    the accuracy check pairs a pruned model's outputs with the unpruned model's by name.
    """
    import torch

    try:
        with torch.no_grad():
            out = model(*example)
    except Exception:  # noqa: BLE001 - the export below reports what is wrong with the model in one line
        return None
    if isinstance(out, (tuple, list)) and len(out) > 1:
        return [f"output{i}" for i in range(len(out))]
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or exc.__class__.__name__
    return text[:200]
