"""SDK backends: compile / quantize a model for one runtime. Lazy registry, like ``edgeopt.agent.runtimes``."""
from __future__ import annotations

import importlib

from ..errors import MissingDependencyError, UnsupportedError
from .base import Backend, BuildJob, Layer

REGISTRY: dict[str, tuple[str, str]] = {
    # runtime name: ("module:Class", extra that installs it)
    "openvino": ("edgeopt.sdk.backends.openvino:OpenVINOBackend", "sdk"),
    "onnxruntime": ("edgeopt.sdk.backends.onnxruntime:OnnxRuntimeBackend", "sdk"),
    "tflite": ("edgeopt.sdk.backends.tflite:TFLiteBackend", "tflite"),
}


def get_backend(name: str) -> Backend:
    """An instance of the backend registered under ``name``; imports it on first use."""
    try:
        target, extra = REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"unknown runtime {name!r}; known: {', '.join(REGISTRY)}") from None
    module, cls = target.split(":")
    try:
        backend = getattr(importlib.import_module(module), cls)
        backend.check_importable()
    except ImportError as exc:
        raise MissingDependencyError(
            f"runtime {name!r} is not installed ({exc.name or exc} cannot be imported)",
            hint=f"install it with: pip install 'edgeopt[{extra}]'",
        ) from None
    return backend()


__all__ = ["REGISTRY", "get_backend", "Backend", "BuildJob", "Layer"]
