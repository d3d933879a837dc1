"""The SDK side of a runtime: compile / quantize a checked fp32 model for a profile.

One file per runtime (Frigate's detector plugins): each holds its key, what it accepts and its
implementation. The agent side (load / infer) lives in ``edgeopt.agent.runtimes``; backends use it to run
what they build, so there is one way to run a model.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..profile import HardwareProfile


@dataclass
class BuildJob:
    """One build: the fp32 model (after load/optimize/shapes), what precision, and where to write."""

    source: Path  # fp32 model: .onnx (checked, simplified) or OpenVINO .xml or .tflite
    source_format: str  # onnx | openvino-ir | tflite
    precision: str  # fp32 | fp16 | int8 | int8-weight-only
    graph_level: str  # none | basic | all
    workdir: Path
    profile: HardwareProfile
    runtime_options: Any  # the profile's runtime block (OpenVINORuntime, OnnxRuntimeRuntime, TFLiteRuntime)
    calibration: list[dict] | None = None  # model feeds, for int8
    float_layers: list[str] = field(default_factory=list)  # layers to keep in float (accuracy-aware)
    torch_source: Any = None  # pipeline.types.TorchSource: the PyTorch model, for backends that compile it


@dataclass
class Layer:
    """A quantizable layer: its name (as the backend's quantizer names it), the tensor it produces, and the
    nearest quantizable layers upstream (used to rank layers by the error they add)."""

    name: str
    output: str
    upstream: list[str]


class Backend(abc.ABC):
    """Compile/quantize for one runtime."""

    name: ClassVar[str]  # runtime key, the same as the agent runtime's
    extra: ClassVar[str]  # pip extra that installs it
    accepts: ClassVar[tuple[str, ...]]  # source formats it can build from
    precisions: ClassVar[tuple[str, ...]]

    @classmethod
    def check_importable(cls) -> None:
        """Raise ImportError when the backend's libraries are missing (the registry turns it into the fix)."""

    def check_request(self, request, runtime_options) -> None:
        """Raise UnsupportedError when this backend cannot build what ``request`` gives on this host (most
        backends build from the model file alone and accept every request)."""

    @abc.abstractmethod
    def check_ops(self, source: Path, source_format: str, display: str | None = None) -> None:
        """Raise UnsupportedError naming the ops this runtime cannot run (``display``: the user's file name)."""

    @abc.abstractmethod
    def build(self, job: BuildJob) -> "Artifact":  # noqa: F821 (Artifact from pipeline.types)
        """Write the optimized model into ``job.workdir`` and return the Artifact."""

    def layers(self, reference: Path) -> list[Layer]:
        """Quantizable layers of the fp32 reference the quantizer works on (for sensitivity); [] if unknown."""
        return []

    def layer_reference(self, job: BuildJob) -> Path | None:
        """The fp32 model whose layer names the quantizer uses (after the backend's own pre-processing)."""
        return None

    def layer_probe(self, model_file: Path, layers: list[Layer]):
        """A function feed -> {layer name: its output} for ``model_file`` (runs on the host CPU); None if
        the backend cannot look inside its models. Outputs are consumed one feed at a time: intermediate
        tensors of a whole network are too large to keep for many samples."""
        return None

    def run_device(self, runtime_options: Any) -> tuple[str, str, bool]:
        """(target device, device to run on here, host_proxy)."""
        raise NotImplementedError
