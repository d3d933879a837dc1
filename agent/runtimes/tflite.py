"""TFLite / LiteRT runtime: ai-edge-litert (numpy 2) or, where it is the one installed, tflite-runtime."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.layers import precision_word
from ...sdk.native_log import native_stderr_to_log
from ...sdk.package import TensorSpec
from .base import LoadedModel, Runtime

try:
    from ai_edge_litert.interpreter import Interpreter

    _PACKAGE = "ai-edge-litert"
except ImportError:  # tflite-runtime 2.14 has the same Interpreter API
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

    _PACKAGE = "tflite-runtime"


log = logging.getLogger(__name__)


def _spec(d: dict) -> TensorSpec:
    sig = d.get("shape_signature")
    dims = list(sig) if sig is not None and len(sig) else list(d["shape"])
    shape = [int(x) if x >= 0 else f"d{i}" for i, x in enumerate(dims)]
    return TensorSpec(name=d["name"], dtype=np.dtype(d["dtype"]).name, shape=shape)


class TFLiteModel(LoadedModel):
    def __init__(self, interpreter: Interpreter):
        self.interp = interpreter
        self.interp.allocate_tensors()
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [_spec(d) for d in self._in]
        self.outputs = [_spec(d) for d in self._out]
        self._shapes = {d["name"]: tuple(d["shape"]) for d in self._in}

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        resized = False
        for d in self._in:
            arr = feeds[d["name"]]
            if tuple(arr.shape) != self._shapes[d["name"]]:
                self.interp.resize_tensor_input(d["index"], list(arr.shape))
                self._shapes[d["name"]] = tuple(arr.shape)
                resized = True
        if resized:
            with native_stderr_to_log(log, "litert"):
                self.interp.allocate_tensors()
        try:
            for d in self._in:
                self.interp.set_tensor(d["index"], np.ascontiguousarray(feeds[d["name"]]))
            self.interp.invoke()
        except (ValueError, RuntimeError) as exc:
            raise InputError(f"TFLite refused the inputs: {' '.join(str(exc).split())[:300]}") from None
        return {d["name"]: self.interp.get_tensor(d["index"]).copy() for d in self._out}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="tflite", package=_PACKAGE, version=TFLiteRuntime.version())
        return out

    def placement(self) -> list[dict[str, Any]] | None:
        """The interpreter's ops and the dtype of each op's first input (what LiteRT's Python API exposes;
        which ops XNNPACK took over is not exposed)."""
        try:
            ops = self.interp._get_ops_details()  # the only op listing the Python Interpreter has
            dtypes = {d["index"]: np.dtype(d["dtype"]).name for d in self.interp.get_tensor_details()}
        except (AttributeError, ValueError, RuntimeError):
            return None
        out = []
        for op in ops:
            first = next((int(i) for i in op.get("inputs", []) if int(i) >= 0), None)
            out.append({"node": f"{op.get('op_name')}:{op.get('index')}", "op_type": str(op.get("op_name", "")),
                        "device": "CPU", "precision": precision_word(dtypes.get(first)) if first is not None else None,
                        "source_nodes": []})
        return out

    def profile_layers(self, feeds, runs, *, warmup=2, deadline_s=None, between=None):
        raise UnsupportedError(
            "LiteRT (TFLite) exposes no per-op timing to Python: its Interpreter has no profiler API, so "
            "edgeopt can show whole-model latency and the op list with precisions only; per-op times need "
            "LiteRT's C++ benchmark_model tool (--enable_op_profiling=true) on the device")


class TFLiteRuntime(Runtime):
    name = "tflite"
    extra = "tflite"

    @classmethod
    def version(cls) -> str:
        from importlib.metadata import version

        return f"{_PACKAGE} {version(_PACKAGE)}"

    @classmethod
    def devices(cls) -> list[str]:
        return ["CPU"]

    @classmethod
    def load(cls, model_path: Path, *, device: str = "CPU", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> TFLiteModel:
        if device != "CPU":
            raise UnsupportedError(f"TFLite runs on CPU here; device {device!r} is not supported")
        # LiteRT prints "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to fd 2 at load: a DEBUG record
        try:
            with native_stderr_to_log(log, "litert"):
                interp = Interpreter(model_path=str(model_path), num_threads=threads or os.cpu_count() or 1)
                return TFLiteModel(interp)
        except (ValueError, RuntimeError) as exc:
            raise UnsupportedError(f"TFLite cannot load {Path(model_path).name}: {' '.join(str(exc).split())[:300]}") from None
