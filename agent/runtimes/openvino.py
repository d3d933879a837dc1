"""OpenVINO runtime."""
from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.layers import LayerRun, RawProfile, precision_word
from ...sdk.package import TensorSpec
from ...sdk.placement import openvino_layers
from .base import LoadedModel, Runtime

import openvino as ov  # noqa: E402  (import error handled by the registry)

_core_lock = threading.Lock()
_core: ov.Core | None = None


def core() -> ov.Core:
    """One shared Core: creating one per model is slow and multiplies plugin memory."""
    global _core
    with _core_lock:
        if _core is None:
            _core = ov.Core()
        return _core


def _spec(port) -> TensorSpec:
    shape = [d.get_length() if d.is_static else f"d{i}" for i, d in enumerate(port.get_partial_shape())]
    name = port.get_any_name() if port.get_names() else str(port.get_node().get_friendly_name())
    return TensorSpec(name=name, dtype=np.dtype(port.get_element_type().to_dtype()).name, shape=shape)


def _dims(port) -> list[int] | None:
    shape = port.get_partial_shape()
    return [d.get_length() for d in shape] if shape.is_static else None


def _macs(kind: str, op) -> int | None:
    """MACs of a Convolution / FullyConnected / MatMul layer of the executed graph, from its port shapes."""
    try:
        out = _dims(op.output(0))
        x = _dims(op.input(0)) if op.get_input_size() > 0 else None
        w = _dims(op.input(1)) if op.get_input_size() > 1 else None
    except RuntimeError:
        return None
    if not out:
        return None
    if kind in ("Convolution", "Deconvolution") and w and len(w) >= 3:
        # Grouped weights are [G, M/G, C/G, k...]; plain ones [M, C, k...]: per output element C/G * prod(k).
        grouped = len(w) == len(out) + 1
        return math.prod(out) * math.prod(w[2:] if grouped else w[1:])
    if kind in ("FullyConnected", "MatMul", "FullyConnectedQuantizedLegacy", "FullyConnectedQuantized") and x:
        return math.prod(out) * x[-1]
    return None


def _bytes(op) -> int | None:
    total = 0
    try:
        ports = [op.input(i) for i in range(op.get_input_size())] + [op.output(i) for i in range(op.get_output_size())]
        for port in ports:
            dims = _dims(port)
            if dims is None:
                return None
            total += math.prod(dims) * max(port.get_element_type().bitwidth // 8, 1)
    except RuntimeError:
        return None
    return total or None


class OpenVINOModel(LoadedModel):
    def __init__(self, compiled: ov.CompiledModel, device: str, profiling: bool = False):
        self.compiled = compiled
        self.device = device
        self._profiling = profiling
        self.inputs = [_spec(p) for p in compiled.inputs]
        self.outputs = [_spec(p) for p in compiled.outputs]
        self._request = compiled.create_infer_request()

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            result = self._request.infer(feeds, share_inputs=False)
        except RuntimeError as exc:
            raise InputError(f"OpenVINO refused the inputs: {' '.join(str(exc).split())[:300]}") from None
        return {spec.name: np.asarray(result[port]).copy() for spec, port in zip(self.outputs, self.compiled.outputs)}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="openvino", device=self.device, version=ov.get_version())
        return out

    def placement(self) -> list[dict[str, Any]]:
        """The executed graph: device and runtime precision of every layer (``get_runtime_model()``)."""
        return openvino_layers(self.compiled)

    def profile_layers(self, feeds: dict[str, np.ndarray], runs: int, *, warmup: int = 2,
                       deadline_s: float | None = None, between=None) -> RawProfile:
        """``warmup`` + ``runs`` inferences, reading the per-layer counters (PERF_COUNT) after each."""
        if not self._profiling:
            raise UnsupportedError("this OpenVINO model was not compiled with PERF_COUNT "
                                   "(load it with options={'profile_layers': True})")
        self.check_feeds(feeds)
        end = time.monotonic() + deadline_s if deadline_s else None
        request = self.compiled.create_infer_request()
        times: dict[str, list[float]] = {}
        order: list[str] = []
        exec_types: dict[str, str] = {}
        run_ms = []
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            request.infer(feeds, share_inputs=False)
            elapsed = (time.perf_counter() - t0) * 1e3
            if between is not None:
                between(elapsed / 1e3)
            if i < warmup:
                continue
            run_ms.append(elapsed)
            for info in request.get_profiling_info():
                if info.status != info.Status.EXECUTED:
                    continue
                if info.node_name not in times:
                    times[info.node_name] = []
                    order.append(info.node_name)
                    exec_types[info.node_name] = info.exec_type
                times[info.node_name].append(info.real_time.total_seconds() * 1e6)
            if end is not None and time.monotonic() > end:
                break
        graph = {op.get_friendly_name(): op for op in self.compiled.get_runtime_model().get_ordered_ops()}
        layers = []
        for name in order:
            op = graph.get(name)
            info = op.get_rt_info() if op is not None else {}
            kind = str(info["layerType"].value) if "layerType" in info else ""
            precision = str(info["runtimePrecision"].value) if "runtimePrecision" in info else ""
            original = str(info["originalLayersNames"].value) if "originalLayersNames" in info else ""
            layers.append(LayerRun(
                name=name, op_type=kind, precision=precision_word(precision), times_us=times[name],
                device=self.device, exec_type=exec_types.get(name, ""),
                source_nodes=[n for n in original.split(",") if n],
                macs=_macs(kind, op) if op is not None else None, bytes_moved=_bytes(op) if op is not None else None))
        notes = ["OpenVINO per-layer counters (PERF_COUNT, get_profiling_info real_time) per run"]
        try:
            hint = str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))
            notes.append(f"INFERENCE_PRECISION_HINT of the compiled model: {hint}")
        except RuntimeError:
            pass
        return RawProfile(runtime="openvino", runtime_version=ov.get_version(), device=self.device, layers=layers,
                          runs=len(run_ms), run_ms=run_ms, notes=notes)


class OpenVINORuntime(Runtime):
    name = "openvino"
    extra = "openvino"

    @classmethod
    def version(cls) -> str:
        return ov.get_version()

    @classmethod
    def devices(cls) -> list[str]:
        return list(core().available_devices)

    @classmethod
    def load(cls, model_path: Path, *, device: str = "CPU", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> OpenVINOModel:
        available = cls.devices()
        # AUTO would silently run on CPU when the device is absent: check the list ourselves.
        if device not in available:
            raise UnsupportedError(f"OpenVINO device {device!r} is not present on this machine "
                                   f"(available: {', '.join(available) or 'none'})")
        config: dict[str, Any] = {"PERFORMANCE_HINT": performance_hint.upper()}
        if threads and device == "CPU":
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
            config["CACHE_DIR"] = str(cache_dir)
        options = dict(options or {})
        profiling = bool(options.pop("profile_layers", False))
        if profiling:
            config["PERF_COUNT"] = True
        config.update(options)
        try:
            compiled = core().compile_model(str(model_path), device, config)
        except RuntimeError as exc:
            raise UnsupportedError(f"OpenVINO cannot compile {Path(model_path).name} for {device}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        return OpenVINOModel(compiled, device, profiling)
