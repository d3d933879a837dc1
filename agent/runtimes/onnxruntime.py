"""ONNX Runtime.

Its own log lines go through logging, never raw onto the terminal: sessions log at FATAL only (a refusal
comes back in the exception, which is turned into a one-line error), and with debug logging on (``-v``) the
lines it writes while a session loads are captured from file descriptor 2 and logged at DEBUG.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.package import TensorSpec
from .base import LoadedModel, Runtime

import onnxruntime as ort  # noqa: E402

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32",
    "tensor(int64)": "int64", "tensor(bool)": "bool",
}
_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _spec(arg) -> TensorSpec:
    shape = [d if isinstance(d, int) else (d or f"d{i}") for i, d in enumerate(arg.shape)]
    return TensorSpec(name=arg.name, dtype=_ORT_TYPES.get(arg.type, arg.type), shape=shape)


log = logging.getLogger(__name__)
_CAPTURE = threading.Lock()
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_CAPTURED = 64 * 1024


@contextlib.contextmanager
def _runtime_log_to_logging():
    """With DEBUG on for this logger: what ONNX Runtime writes to fd 2 meanwhile becomes DEBUG records."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    with _CAPTURE, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read(_MAX_CAPTURED).decode(errors="replace").splitlines():
                if line.strip():
                    log.debug("onnxruntime: %s", _ANSI.sub("", line).strip())


class OnnxRuntimeModel(LoadedModel):
    def __init__(self, session: ort.InferenceSession):
        self.session = session
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._names = [o.name for o in self.outputs]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_feeds(feeds)
        try:
            values = self.session.run(self._names, feeds)
        except (ort.capi.onnxruntime_pybind11_state.InvalidArgument, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            log.debug("onnxruntime refused a run: %s", exc)
            raise InputError(f"ONNX Runtime refused the inputs: {' '.join(str(exc).split())[:300]}") from None
        return dict(zip(self._names, values))

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out.update(runtime="onnxruntime", providers=self.session.get_providers(), version=ort.__version__)
        return out


class OnnxRuntimeRuntime(Runtime):
    name = "onnxruntime"
    extra = "onnxruntime"

    @classmethod
    def version(cls) -> str:
        return ort.__version__

    @classmethod
    def devices(cls) -> list[str]:
        return list(ort.get_available_providers())

    @classmethod
    def load(cls, model_path: Path, *, device: str = "CPUExecutionProvider", threads: int | None = None,
             performance_hint: str = "latency", cache_dir: Path | None = None,
             options: dict[str, Any] | None = None) -> OnnxRuntimeModel:
        options = dict(options or {})
        providers = options.pop("providers", None) or [device]
        available = cls.devices()
        # ORT silently falls back to CPU for an absent provider: refuse instead, naming what exists.
        absent = [p for p in providers if p not in available]
        if absent:
            raise UnsupportedError(f"ONNX Runtime execution provider(s) {', '.join(absent)} not available here "
                                   f"(available: {', '.join(available)})")
        so = ort.SessionOptions()
        so.graph_optimization_level = _LEVELS[options.pop("graph_optimization_level", "all")]
        # FATAL only: errors come back in exceptions; its warnings and infos are logged with -v (see above).
        so.log_severity_level = 2 if log.isEnabledFor(logging.DEBUG) else 4
        # Spinning is ONNX Runtime's default; the agent passes False unless the profile asks for it
        # (BENCHMARKS.md: the same batching-on throughput for 43% less agent CPU on 2 cores, 90% on 16).
        if not options.pop("intra_op_spinning", True):
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            so.intra_op_num_threads = int(threads)
        try:
            with _runtime_log_to_logging():
                session = ort.InferenceSession(str(model_path), sess_options=so, providers=providers)
        except Exception as exc:  # ORT raises several pybind exception types
            raise UnsupportedError(f"ONNX Runtime cannot load {Path(model_path).name}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        return OnnxRuntimeModel(session)
