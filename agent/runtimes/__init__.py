"""Inference runtimes behind one small interface (load / infer / describe).

The registry maps a runtime name to ``"module:Class"`` and imports lazily, so the agent runs with only the
runtimes that are installed; asking for a missing one raises an error that names the extra to install.
The SDK uses the same runtimes to validate and benchmark what it builds.
"""
from __future__ import annotations

from ...sdk.errors import MissingDependencyError, UnsupportedError
from ...sdk.plugins import load_registered
from .base import LoadedModel, Runtime

REGISTRY: dict[str, tuple[str, str]] = {
    # name: ("module:Class", extra that installs it): a device installs the agent with one runtime, so the
    # hint names the agent's extra for it (the SDK's own extras install the runtimes too).
    "openvino": ("edgeopt.agent.runtimes.openvino:OpenVINORuntime", "agent-openvino"),
    "onnxruntime": ("edgeopt.agent.runtimes.onnxruntime:OnnxRuntimeRuntime", "agent-onnxruntime"),
    "tflite": ("edgeopt.agent.runtimes.tflite:TFLiteRuntime", "agent-tflite"),
    # PyTorch AOTInductor packages, for devices that have PyTorch (the device brings its own build of it).
    "torch-aoti": ("edgeopt.agent.runtimes.torch_aoti:TorchAotiRuntime", "agent-torch"),
    # Language models (task text-generation): OpenVINO GenAI's continuous-batching pipeline.
    "openvino-genai": ("edgeopt.agent.runtimes.openvino_genai:OpenVinoGenAiRuntime", "agent-llm"),
}


def get_runtime(name: str) -> type[Runtime]:
    """The runtime class registered under ``name``; imports it on first use."""
    return load_registered(REGISTRY, name)


def available_runtimes() -> dict[str, dict]:
    """What each registered runtime reports on this machine (for the hardware probe)."""
    out: dict[str, dict] = {}
    for name in REGISTRY:
        try:
            rt = get_runtime(name)
            out[name] = {"available": True, "version": rt.version(), "devices": rt.devices()}
        except (MissingDependencyError, UnsupportedError) as exc:
            out[name] = {"available": False, "reason": exc.one_line()}
    return out


__all__ = ["REGISTRY", "get_runtime", "available_runtimes", "Runtime", "LoadedModel"]
