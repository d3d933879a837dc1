"""Count the multiply-accumulates of an ONNX model from its shapes, so reports can show achieved GFLOP/s.

Only the ops that carry nearly all the arithmetic of vision and speech networks are counted: Conv,
ConvTranspose, Gemm, MatMul and their quantized forms (QLinearConv, ConvInteger, QLinearMatMul,
MatMulInteger). A QDQ model is counted through its float Conv/MatMul nodes, whose weight shapes come from
the DequantizeLinear in front of them, so fp32 and int8 versions of one network count the same.
Convention: FLOPs = 2 x MACs; bias adds, activations, pooling and normalization are not counted
(they are a few percent of a CNN and run memory-bound anyway).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError, missing_extra

log = logging.getLogger(__name__)

# op type -> (data input index, weight input index)
_CONV_OPS = {"Conv": (0, 1), "ConvInteger": (0, 1), "QLinearConv": (0, 3)}
_MATMUL_OPS = {"MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3)}


@dataclass
class FlopCount:
    """MACs of one model at one set of input shapes."""

    macs: int = 0
    by_op_type: dict[str, int] = field(default_factory=dict)
    nodes: list[tuple[str, str, int]] = field(default_factory=list)  # (node name, op type, macs)
    uncounted: list[str] = field(default_factory=list)  # counted-op nodes whose shapes were unknown

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def gflops(self) -> float:
        return self.flops / 1e9

    def achieved_gflops(self, latency_ms: float, batch: int = 1) -> float:
        """GFLOP/s reached when one inference of ``batch`` samples takes ``latency_ms``.

        ``macs`` is taken to be counted at batch 1; pass the batch the latency was measured at.
        """
        if latency_ms <= 0:
            return 0.0
        return self.flops * batch / (latency_ms / 1e3) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"macs": self.macs, "flops": self.flops, "gflops": round(self.gflops, 6),
                "by_op_type": dict(self.by_op_type), "uncounted": list(self.uncounted)}


def _dims(type_proto) -> list[int | None] | None:
    t = type_proto.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _fix_inputs(model, input_shapes: dict[str, list[int]] | None, batch: int) -> None:
    """Give every graph input concrete dims: the user's shape, else ``batch`` for the first dim, else 1."""
    init_names = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        wanted = (input_shapes or {}).get(inp.name)
        if wanted is not None:
            if len(wanted) != len(dims):
                raise InputError(f"input shape for {inp.name!r} has {len(wanted)} dims, the model has {len(dims)}")
            for d, v in zip(dims, wanted):
                d.Clear()
                d.dim_value = int(v)
            continue
        for i, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value <= 0:
                d.Clear()
                d.dim_value = batch if i == 0 else 1


def _shape_table(model) -> dict[str, list[int | None]]:
    shapes: dict[str, list[int | None]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        dims = _dims(vi.type)
        if dims is not None:
            shapes[vi.name] = dims
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _attr(node, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _known(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def _conv_macs(node, shapes, w_idx: int, transpose: bool = False) -> int | None:
    w = shapes.get(node.input[w_idx]) if len(node.input) > w_idx else None
    y = shapes.get(node.output[0])
    group = int(_attr(node, "group", 1))
    if transpose:
        # ConvTranspose weight is [C_in, M/group, k...]: every input pixel scatters a (M/group x k) patch.
        x = shapes.get(node.input[0])
        if not (_known(w) and _known(x)):
            return None
        return x[0] * w[0] * math.prod(x[2:]) * w[1] * math.prod(w[2:])
    if not (_known(w) and _known(y)):
        return None
    # weight [M, C/group, k...], output [N, M, spatial...]: each output element is C/group * prod(k) MACs.
    return y[0] * y[1] * math.prod(y[2:]) * w[1] * math.prod(w[2:])


def _matmul_macs(a, b) -> int | None:
    if not (_known(a) and _known(b)):
        return None
    a, b = list(a), list(b)
    if len(a) == 1:
        a = [1] + a
    if len(b) == 1:
        b = b + [1]
    m, k = a[-2], a[-1]
    n = b[-1]
    batch_a, batch_b = a[:-2], b[:-2]
    width = max(len(batch_a), len(batch_b))
    batch_a = [1] * (width - len(batch_a)) + batch_a
    batch_b = [1] * (width - len(batch_b)) + batch_b
    batch = math.prod(max(x, y) for x, y in zip(batch_a, batch_b))
    return batch * m * n * k


def _gemm_macs(node, shapes) -> int | None:
    a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not (_known(a) and _known(b)):
        return None
    m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
    n = b[0] if _attr(node, "transB", 0) else b[1]
    return m * n * k


def count_model(model, *, input_shapes: dict[str, list[int]] | None = None, batch: int = 1) -> FlopCount:
    """MACs of an in-memory ``onnx.ModelProto`` (a copy is shape-inferred; the argument is not changed)."""
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    _fix_inputs(work, input_shapes, batch)
    try:
        work = onnx.shape_inference.infer_shapes(work, strict_mode=False, data_prop=True)
    except Exception as exc:  # shape inference fails on some custom-domain ops; count what is known
        log.warning("ONNX shape inference failed (%s); counting only nodes with known shapes", exc)
    shapes = _shape_table(work)
    out = FlopCount()
    for node in work.graph.node:
        op = node.op_type
        macs: int | None
        if op in _CONV_OPS:
            macs = _conv_macs(node, shapes, _CONV_OPS[op][1])
        elif op == "ConvTranspose":
            macs = _conv_macs(node, shapes, 1, transpose=True)
        elif op in _MATMUL_OPS:
            ia, ib = _MATMUL_OPS[op]
            macs = _matmul_macs(shapes.get(node.input[ia]), shapes.get(node.input[ib]))
        elif op == "Gemm":
            macs = _gemm_macs(node, shapes)
        else:
            continue
        name = node.name or f"{op}:{node.output[0]}"
        if macs is None:
            out.uncounted.append(name)
            continue
        out.macs += macs
        out.by_op_type[op] = out.by_op_type.get(op, 0) + macs
        out.nodes.append((name, op, macs))
    if out.uncounted:
        log.info("%d compute nodes had unknown shapes and were not counted", len(out.uncounted))
    return out


def count_file(path: str | Path, *, input_shapes: dict[str, list[int]] | None = None, batch: int = 1) -> FlopCount:
    """MACs of the ONNX file at ``path`` (weights are not loaded: only shapes are needed)."""
    try:
        import onnx
    except ImportError:
        raise missing_extra("onnx", "sdk") from None
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise InputError(f"{path}: model file not found") from None
    except Exception as exc:
        raise InputError(f"{path}: not a readable ONNX model ({' '.join(str(exc).split())[:200]})",
                         hint="pass an .onnx file") from None
    return count_model(model, input_shapes=input_shapes, batch=batch)
