"""SDK backends: compile / quantize a model for one runtime. Lazy registry, like ``edgeopt.agent.runtimes``."""
from __future__ import annotations

from ..plugins import load_registered
from .base import Backend, BuildJob, Layer

REGISTRY: dict[str, tuple[str, str]] = {
    # runtime name: ("module:Class", extra that installs it)
    "openvino": ("edgeopt.sdk.backends.openvino:OpenVINOBackend", "sdk"),
    "onnxruntime": ("edgeopt.sdk.backends.onnxruntime:OnnxRuntimeBackend", "sdk"),
    "tflite": ("edgeopt.sdk.backends.tflite:TFLiteBackend", "tflite"),
    "torch-aoti": ("edgeopt.sdk.backends.torch_aoti:TorchAotiBackend", "torch"),
}


def get_backend(name: str) -> Backend:
    """An instance of the backend registered under ``name``; imports it on first use."""
    return load_registered(REGISTRY, name)()


__all__ = ["REGISTRY", "get_backend", "Backend", "BuildJob", "Layer"]
