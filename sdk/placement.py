"""Placement: what the runtime actually did with a package's graph, compared with what its manifest says.

* ONNX Runtime: :func:`placement` returns ``{node name: execution provider}`` from the session's graph
  assignment record (ORT >= 1.23, session config ``session.record_ep_graph_assignment_info = 1``, which
  :data:`RECORD_ASSIGNMENT` names). It is generic over execution providers: with the CUDA or TensorRT EP,
  the nodes left on ``CPUExecutionProvider`` are the fallbacks.
* OpenVINO: :func:`openvino_layers` reads the compiled model's executed graph (``get_runtime_model()``):
  per layer its type, runtime precision and the original layers it was fused from, and the devices the
  compiled model executes on (``EXECUTION_DEVICES``).

:func:`check` compares such a list with the manifest: every node on the manifest's device, compute
layers in the manifest's precision (the layers listed in ``validation.float_layers`` may stay in float).
No runtime is imported here: the functions take the runtime's own objects.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UnsupportedError
from .layers import COMPUTE_OPS, precision_word

RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
_FLOATS = {"fp32", "bf16", "fp16"}


def placement(session) -> dict[str, str]:
    """``{node name: execution provider}`` of an ``onnxruntime.InferenceSession``.

    The session must have been created with ``SessionOptions.add_session_config_entry(RECORD_ASSIGNMENT,
    "1")``. Names are the graph's node names at partitioning (before ORT's own fusions), so they match the
    model file. Raises UnsupportedError on an ORT that cannot report it or a session without the entry.
    """
    getter = getattr(session, "get_provider_graph_assignment_info", None)
    if getter is None:
        raise UnsupportedError("this ONNX Runtime cannot report node placement "
                               "(get_provider_graph_assignment_info needs onnxruntime >= 1.23)")
    try:
        subgraphs = getter()
    except Exception as exc:  # ORT raises its pybind Fail when the config entry is missing
        raise UnsupportedError(f"ONNX Runtime did not record node placement: {' '.join(str(exc).split())[:200]}",
                               hint=f"create the session with the session config entry {RECORD_ASSIGNMENT}=1") \
            from None
    out: dict[str, str] = {}
    for sub in subgraphs:
        for node in sub.get_nodes():
            out[node.name] = sub.ep_name
    return out


def _rt(info, key: str) -> str:
    if key not in info:
        return ""
    value = info[key]
    return str(getattr(value, "value", value))


def openvino_layers(compiled) -> list[dict[str, Any]]:
    """The executed layers of an ``openvino.CompiledModel``: node, op type, device, runtime precision, fused
    original layers. Constants, parameters and results are left out."""
    try:
        devices = [str(d) for d in compiled.get_property("EXECUTION_DEVICES")]
    except Exception:  # noqa: BLE001 - a plugin without the property: the device is the one compiled for
        devices = []
    out = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        kind = _rt(info, "layerType")
        if kind in ("Input", "Output", "Const", "Constant", "Parameter", "Result", ""):
            continue
        original = [n for n in _rt(info, "originalLayersNames").split(",") if n]
        out.append({"node": op.get_friendly_name(), "op_type": kind, "device": ",".join(devices),
                    "precision": precision_word(_rt(info, "runtimePrecision")), "source_nodes": original})
    return out


@dataclass
class PlacementReport:
    """What :func:`check` found: ``ok`` when every node is where and in what precision the manifest says."""

    ok: bool
    expected_device: str
    expected_precision: str
    nodes: int
    off_device: dict[str, str] = field(default_factory=dict)  # node -> where it ran
    precision_mismatch: dict[str, str] = field(default_factory=dict)  # node -> precision it ran in
    devices: dict[str, int] = field(default_factory=dict)  # device -> node count
    precisions: dict[str, int] = field(default_factory=dict)  # compute-layer precision -> count
    message: str = ""

    def to_dict(self, limit: int = 50) -> dict[str, Any]:
        return {"ok": self.ok, "expected_device": self.expected_device, "expected_precision": self.expected_precision,
                "nodes": self.nodes, "devices": self.devices, "precisions": self.precisions,
                "off_device": dict(list(self.off_device.items())[:limit]),
                "off_device_count": len(self.off_device),
                "precision_mismatch": dict(list(self.precision_mismatch.items())[:limit]),
                "precision_mismatch_count": len(self.precision_mismatch), "message": self.message}


def _device_ok(expected: str, got: str) -> bool:
    if not got:
        return True  # the runtime did not say; nothing to hold against it
    return expected in [d.strip() for d in got.split(",")] or got.startswith(expected)


def check(observed: list[dict[str, Any]], *, device: str, precision: str,
          float_layers: list[str] | tuple[str, ...] = ()) -> PlacementReport:
    """Compare observed placement (``LoadedModel.placement()``) with the manifest's device and precision.

    A node on another device is a fallback. A compute layer (Conv, Gemm, MatMul, FullyConnected, ...) in
    another precision than the package's is a mismatch: for int8 packages a float compute layer whose
    source is not one of ``float_layers``; for fp32 packages a bf16 or fp16 one (the CPU plugin's silent
    bf16); for fp16 packages an fp32 or bf16 one. Precision is only judged where the runtime reports it.
    """
    want = precision.replace("int8-weight-only", "int8w")
    float_set = set(float_layers)
    report = PlacementReport(ok=True, expected_device=device, expected_precision=precision, nodes=len(observed))
    for node in observed:
        name, where = str(node.get("node")), str(node.get("device") or "")
        report.devices[where or "?"] = report.devices.get(where or "?", 0) + 1
        if not _device_ok(device, where):
            report.off_device[name] = where
        got = node.get("precision")
        if not got or got == "?" or node.get("op_type") not in COMPUTE_OPS:
            continue
        report.precisions[got] = report.precisions.get(got, 0) + 1
        sources = set(node.get("source_nodes") or []) | {name}
        if want == "int8":
            bad = got in _FLOATS and not (sources & float_set)
        elif want == "int8w":
            bad = False  # weight-only int8 computes in float by design
        elif want in _FLOATS:
            bad = got != want and got in _FLOATS
        else:
            bad = False
        if bad:
            report.precision_mismatch[name] = got
    report.ok = not report.off_device and not report.precision_mismatch
    parts = []
    if report.off_device:
        where = sorted(set(report.off_device.values()))
        parts.append(f"{len(report.off_device)} of {report.nodes} nodes not on {device} "
                     f"(on {', '.join(where)}: {', '.join(list(report.off_device)[:5])})")
    if report.precision_mismatch:
        got = sorted(set(report.precision_mismatch.values()))
        parts.append(f"{len(report.precision_mismatch)} compute layers ran in {', '.join(got)}, the package is "
                     f"{precision} ({', '.join(list(report.precision_mismatch)[:5])})")
    report.message = "; ".join(parts) if parts else (
        f"all {report.nodes} nodes on {device}" + (f", compute layers in {', '.join(sorted(report.precisions))}"
                                                  if report.precisions else ""))
    return report
