"""TFLite / LiteRT backend: packages a .tflite model as it is (arm profile).

Quantizing a .tflite file or converting ONNX to TFLite needs TensorFlow (or onnx2tf, which pins TensorFlow
and old numpy/onnx), which cannot share this environment; so a .tflite input is packaged at the precision
it was exported with, and ONNX inputs for the arm profile go to ONNX Runtime. The manifest says which.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedError
from ..pipeline.types import Artifact
from .base import Backend, BuildJob

RUNTIME = "tflite"


class TFLiteBackend(Backend):
    name: ClassVar[str] = RUNTIME
    extra: ClassVar[str] = "tflite"
    accepts: ClassVar[tuple[str, ...]] = ("tflite",)
    precisions: ClassVar[tuple[str, ...]] = ("as-exported",)

    @classmethod
    def check_importable(cls) -> None:
        from ...agent.runtimes import get_runtime

        get_runtime(RUNTIME)

    def check_ops(self, source: Path, source_format: str, display: str | None = None) -> None:
        from ...agent.runtimes import get_runtime

        if source_format != "tflite":
            raise UnsupportedError(f"the tflite runtime needs a .tflite model; {source.name} is {source_format}",
                                   hint="ONNX models for the arm profile are built with ONNX Runtime")
        get_runtime(RUNTIME).load(source, device="CPU", threads=1).close()

    def run_device(self, runtime_options: Any) -> tuple[str, str, bool]:
        import platform

        # The profile's target is an ARM CPU; on an x86 host the figures come from this CPU instead.
        proxy = platform.machine().lower() not in ("aarch64", "arm64", "armv7l")
        return "CPU", "CPU", proxy

    def build(self, job: BuildJob) -> Artifact:
        out = job.workdir / "model.tflite"
        shutil.copyfile(job.source, out)
        precision = detect_precision(out)
        return Artifact(model_file=out, files={"model.tflite": out}, runtime=RUNTIME, precision=precision,
                        notes=[f"packaged as exported ({precision}); re-quantizing a .tflite needs TensorFlow"])


def detect_precision(path: Path) -> str:
    """int8 when the model holds int8/uint8 weight tensors, fp16 for float16 weights, else fp32."""
    from ...agent.runtimes import get_runtime

    loaded = get_runtime(RUNTIME).load(path, device="CPU", threads=1)
    try:
        kinds = {np.dtype(d["dtype"]).name for d in loaded.interp.get_tensor_details()}
    finally:
        loaded.close()
    if kinds & {"int8", "uint8"}:
        return "int8"
    if "float16" in kinds:
        return "fp16"
    return "fp32"
