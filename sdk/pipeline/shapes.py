"""Stage 3, shapes: fix dynamic dims from --input-shape and enforce the profile's shape policy."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, UnsupportedError
from ..profile import HardwareProfile

log = logging.getLogger(__name__)

# One input tensor of one batch may hold at most this much. Calibration, held-out and random data are
# built from these shapes, so a typo (or a hostile flag) like images:1000000000,3,224,224 must be refused
# here, naming the input, instead of ending in an allocation of hundreds of GiB and a MemoryError.
MAX_INPUT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype, and dims (int, or str/None for a dynamic dim)."""

    name: str
    dtype: str
    shape: tuple

    @property
    def dynamic_dims(self) -> list[tuple[int, str]]:
        return [(i, str(d) if d not in (None, "") else "?") for i, d in enumerate(self.shape) if not isinstance(d, int)]

    @property
    def is_static(self) -> bool:
        return not self.dynamic_dims


def parse_input_shape(text: str) -> tuple[str, list[int]]:
    """'images:1,3,224,224' -> ('images', [1, 3, 224, 224]). The name may itself contain ':'."""
    name, sep, dims = text.rpartition(":")
    try:
        values = [int(d) for d in dims.split(",")] if sep and name else None
    except ValueError:
        values = None
    if not values or any(v <= 0 for v in values):
        raise InputError(f"--input-shape {text!r} is not NAME:D1,D2,...", hint="e.g. --input-shape images:1,3,224,224")
    # The dtype is not known yet: bound the element count at one byte each; _check_request then bounds the
    # real size with the input's dtype.
    check_input_size(name, values)
    return name, values


def check_input_size(name: str, dims, dtype: str | None = None) -> None:
    """Refuse an input shape whose tensor would exceed :data:`MAX_INPUT_BYTES`, before anything is allocated.

    Without ``dtype`` every element counts one byte (the least any dtype takes)."""
    elements = math.prod(int(d) for d in dims)  # Python ints: no overflow however large the dims
    size = elements * (np.dtype(dtype).itemsize if dtype else 1)
    if size > MAX_INPUT_BYTES:
        how = f"as {np.dtype(dtype).name}" if dtype else "even at one byte per element"
        raise InputError(f"--input-shape {name}:{','.join(str(d) for d in dims)} is {elements:,} elements, "
                         f"{_fmt_bytes(size)} {how}: over the {_fmt_bytes(MAX_INPUT_BYTES)} limit for one input",
                         hint="check the dims (batch first); calibration and validation data are built from them")


def _fmt_bytes(n: int) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def onnx_input_specs(model) -> list[InputSpec]:
    """Graph inputs that are not initializers."""
    from onnx import helper

    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def _check_request(specs: list[InputSpec], shapes: dict[str, list[int]], model_name: str) -> None:
    by_name = {s.name: s for s in specs}
    for name, dims in shapes.items():
        spec = by_name.get(name)
        if spec is None:
            raise InputError(f"--input-shape names input {name!r}, but {model_name} has inputs "
                             f"{', '.join(repr(n) for n in by_name)}")
        if len(dims) != len(spec.shape):
            raise InputError(f"--input-shape {name}: gives {len(dims)} dims, but the input has rank "
                             f"{len(spec.shape)} (shape {_fmt(spec.shape)})")
        for i, (want, got) in enumerate(zip(spec.shape, dims)):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(f"--input-shape {name}: dim {i} is fixed to {want} in the model, found {got}",
                                 hint=f"use {name}:{_suggest(spec, None)}")
        check_input_size(name, dims, spec.dtype)


def fix_onnx_shapes(model, shapes: dict[str, list[int]], model_name: str = "the model") -> list[str]:
    """Set the requested input dims in place; return notes. Shape inference later propagates them."""
    specs = onnx_input_specs(model)
    _check_request(specs, shapes, model_name)
    notes = []
    for vi in model.graph.input:
        if vi.name in shapes:
            for d, v in zip(vi.type.tensor_type.shape.dim, shapes[vi.name]):
                d.Clear()
                d.dim_value = int(v)
            notes.append(f"input {vi.name} fixed to {_fmt(shapes[vi.name])}")
    if shapes:
        # Stale intermediate shapes would contradict the new input dims; shape inference recomputes them.
        del model.graph.value_info[:]
    return notes


def fix_ir_shapes(ov_model, shapes: dict[str, list[int]], model_name: str = "the model") -> list[str]:
    """Reshape an OpenVINO model's inputs (in place)."""
    import openvino as ov

    specs = ir_input_specs(ov_model)
    _check_request(specs, shapes, model_name)
    if shapes:
        ov_model.reshape({name: ov.PartialShape(dims) for name, dims in shapes.items()})
    return [f"input {n} fixed to {_fmt(d)}" for n, d in shapes.items()]


def ir_input_specs(ov_model) -> list[InputSpec]:
    out = []
    for port in ov_model.inputs:
        dims = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        out.append(InputSpec(port.get_any_name(), np.dtype(port.get_element_type().to_dtype()).name, dims))
    return out


def enforce_policy(specs: list[InputSpec], profile: HardwareProfile) -> list[str]:
    """Refuse dynamic dims for static-required profiles, naming each dim and the flag that fixes it."""
    dynamic = [s for s in specs if not s.is_static]
    if not dynamic:
        return []
    if profile.requires_static_shapes:
        parts = []
        for s in dynamic:
            dims = ", ".join(f"dim {i} ({name})" for i, name in s.dynamic_dims)
            parts.append(f"input {s.name!r} {_fmt(s.shape)}: {dims}")
        fixes = " ".join(f"--input-shape {s.name}:{_suggest(s, profile.batch_size)}" for s in dynamic)
        raise UnsupportedError(f"profile {profile.name!r} needs static shapes, but the model has dynamic dims: "
                               f"{'; '.join(parts)}", hint=f"fix them with {fixes}")
    return [f"input {s.name} keeps dynamic dims {_fmt(s.shape)} (profile {profile.name} allows them)" for s in dynamic]


def _fmt(shape) -> str:
    return "[" + ",".join(str(d) if d not in (None, "") else "?" for d in shape) + "]"


def _suggest(spec: InputSpec, batch: int | None) -> str:
    out = []
    for i, d in enumerate(spec.shape):
        if isinstance(d, int) and d > 0:
            out.append(str(d))
        elif i == 0 and batch:
            out.append(str(batch))
        else:
            out.append(str(d).upper() if d else "N")
    return ",".join(out)


def concrete_shape(spec: InputSpec, batch: int = 1, default: int = 1) -> tuple[int, ...]:
    """A runnable shape for an input: dynamic batch -> ``batch``, other dynamic dims -> ``default``."""
    return tuple(d if isinstance(d, int) and d > 0 else (batch if i == 0 else default) for i, d in enumerate(spec.shape))
