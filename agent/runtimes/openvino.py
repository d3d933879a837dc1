"""OpenVINO runtime."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from ...sdk.errors import InputError, UnsupportedError
from ...sdk.package import TensorSpec
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


class OpenVINOModel(LoadedModel):
    def __init__(self, compiled: ov.CompiledModel, device: str):
        self.compiled = compiled
        self.device = device
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
        config.update(options or {})
        try:
            compiled = core().compile_model(str(model_path), device, config)
        except RuntimeError as exc:
            raise UnsupportedError(f"OpenVINO cannot compile {Path(model_path).name} for {device}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        return OpenVINOModel(compiled, device)
