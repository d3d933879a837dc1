"""Stage 8, pack and sign: the manifest, golden samples and artifacts into one ``.eopkg`` (atomic)."""
from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..package import (BenchmarkReport, CalibrationInfo, Manifest, SourceModel as ManifestSource, TensorSpec,
                       ValidationReport, write_package)
from .golden import GOLDEN_FILE

log = logging.getLogger(__name__)

TOOLCHAIN = ("edgeopt", "onnx", "onnxruntime", "openvino", "nncf", "onnxslim", "numpy", "ai-edge-litert",
             "tflite-runtime")


def toolchain() -> dict[str, str]:
    out = {}
    for dist in TOOLCHAIN:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out


def with_layout(specs: list[TensorSpec], layout: str | None) -> list[TensorSpec]:
    if not layout:
        return list(specs)
    return [s.model_copy(update={"layout": layout}) if len(s.shape) == 4 else s for s in specs]


def build_manifest(*, name: str, version_: str, profile: dict, runtime: str, runtime_version: str, device: str,
                   precision: str, model_file: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                   preprocessing: dict, source: ManifestSource, calibration: CalibrationInfo | None,
                   validation: ValidationReport, benchmark: BenchmarkReport, golden, decisions: list[str],
                   runtime_options: dict | None = None, host_profile: dict | None = None,
                   state: list | None = None, pruning=None) -> Manifest:
    return Manifest(name=name, version=version_, profile=profile, runtime=runtime, runtime_version=runtime_version,
                    device=device, precision=precision, model_file=model_file, inputs=inputs, outputs=outputs,
                    preprocessing=preprocessing, source_model=source, calibration=calibration,
                    validation=validation, benchmark=benchmark, golden=golden, toolchain=toolchain(),
                    decisions=decisions, runtime_options=dict(runtime_options or {}), host_profile=host_profile,
                    state=list(state or []), pruning=pruning)


def write(output: Path, manifest: Manifest, files: dict[str, Path], golden_bytes: bytes, private_key) -> Manifest:
    """Hash, sign and write atomically: on any failure no file is left at ``output``."""
    artifacts: dict[str, Path | bytes] = dict(files)
    artifacts[GOLDEN_FILE] = golden_bytes
    written = write_package(output, manifest, artifacts, private_key=private_key)
    log.info("wrote %s (%d files)", output, len(artifacts))
    return written
