"""Stage 1, load and check: ONNX (checker, external data confined to the model's folder), OpenVINO IR,
TFLite (arm profile only), and PyTorch modules through :func:`export_torch`."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError, SecurityError, UnsupportedError, missing_extra
from ..package import sha256_file
from ..profile import HardwareProfile

log = logging.getLogger(__name__)

FORMATS = {".onnx": "onnx", ".xml": "openvino-ir", ".tflite": "tflite"}
_TFLITE_MAGIC = b"TFL3"


@dataclass
class SourceModel:
    """The model as the user gave it, checked."""

    path: Path
    format: str  # onnx | openvino-ir | tflite
    sha256: str
    size_bytes: int
    onnx: Any = None  # onnx.ModelProto for ONNX sources (external data loaded)
    opset: int | None = None
    nodes: int | None = None


def detect_format(path: Path) -> str:
    """onnx, openvino-ir or tflite, from the suffix (or the TFLite magic for odd names)."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt:
        return fmt
    with open(path, "rb") as fh:
        head = fh.read(8)
    return "tflite" if head[4:8] == _TFLITE_MAGIC else "onnx"


def load_source(path: str | Path, profile: HardwareProfile) -> SourceModel:
    """Read and check a model file; raise InputError / SecurityError / UnsupportedError with one line."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file {path} not found", hint="pass an .onnx, OpenVINO .xml or .tflite file")
    fmt = detect_format(path)
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path.name} is empty (0 bytes); expected an ONNX, OpenVINO IR or TFLite model")
    if fmt == "tflite":
        return _load_tflite(path, profile, size)
    if fmt == "openvino-ir":
        return _load_ir(path, size)
    return _load_onnx(path, size)


def _load_tflite(path: Path, profile: HardwareProfile, size: int) -> SourceModel:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:8] != _TFLITE_MAGIC:
        raise InputError(f"{path.name} is not a TFLite model (no 'TFL3' flatbuffer identifier)",
                         hint="pass a .tflite file exported by TensorFlow Lite / LiteRT")
    # LiteRT runs it as exported; OpenVINO reads TFLite directly (its TensorFlow Lite frontend) and quantizes it.
    if not any(rt.runtime in ("tflite", "openvino") for rt in profile.runtimes):
        raise UnsupportedError(f"a .tflite model can only be packaged for a profile with the tflite or openvino "
                               f"runtime (such as 'arm' or 'cpu'); profile {profile.name!r} runs "
                               f"{', '.join(rt.runtime for rt in profile.runtimes)}",
                               hint="pass --profile arm or --profile cpu, or give the ONNX model instead")
    return SourceModel(path=path, format="tflite", sha256=sha256_file(path), size_bytes=size)


def _load_ir(path: Path, size: int) -> SourceModel:
    bin_path = path.with_suffix(".bin")
    if not bin_path.is_file():
        raise InputError(f"{path.name}: OpenVINO IR weights {bin_path.name} not found next to it",
                         hint="keep the .xml and .bin files together")
    try:
        import openvino as ov
    except ImportError:
        raise missing_extra("openvino", "openvino") from None
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path.name} is not a readable OpenVINO IR: {_first_line(exc)}") from None
    return SourceModel(path=path, format="openvino-ir", sha256=sha256_file(path), size_bytes=size + bin_path.stat().st_size,
                       nodes=len(model.get_ops()))


def _load_onnx(path: Path, size: int) -> SourceModel:
    try:
        import onnx
        from google.protobuf.message import DecodeError
    except ImportError:
        raise missing_extra("onnx", "sdk") from None
    with open(path, "rb") as fh:
        head = fh.read(1)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError) as exc:
        # A serialized ModelProto starts with field 1 (ir_version, varint): tag byte 0x08.
        if head == b"\x08":
            raise InputError(f"{path.name}: ONNX file is truncated or corrupt ({_first_line(exc)})",
                             hint="export or download the model again") from None
        raise InputError(f"{path.name} is not an ONNX model (it does not parse as an ONNX protobuf)",
                         hint="pass an .onnx, OpenVINO .xml or .tflite file") from None
    if model.ir_version <= 0 or len(model.graph.node) == 0:
        raise InputError(f"{path.name} is not an ONNX model (no IR version or no graph nodes found)",
                         hint="pass an .onnx, OpenVINO .xml or .tflite file")
    _check_external_data(model, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path.name}: cannot read its external data: {_first_line(exc)}",
                         hint="keep the data files next to the model") from None
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise InputError(f"{path.name} fails the ONNX checker: {_first_line(exc)}",
                         hint="re-export the model with a current exporter") from None
    return SourceModel(path=path, format="onnx", sha256=sha256_file(path), size_bytes=size + _external_bytes(model, path),
                       onnx=model, opset=opset_of(model), nodes=len(model.graph.node))


def _external_locations(model) -> list[tuple[str, str]]:
    from onnx.external_data_helper import _get_all_tensors

    out = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == 1:  # TensorProto.EXTERNAL
            info = {e.key: e.value for e in tensor.external_data}
            out.append((tensor.name, info.get("location", "")))
    return out


def _check_external_data(model, path: Path) -> None:
    """External data must stay inside the model's folder: a model file must not read /etc/... or ../.."""
    base = path.parent.resolve()
    for tensor, location in _external_locations(model):
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise SecurityError(f"{path.name}: external data {location!r} of tensor {tensor!r} points outside the "
                                f"model's folder; refused",
                                hint="move the data file next to the model and re-save it with a relative location")
        if not target.is_file():
            raise InputError(f"{path.name}: external data file {location!r} (tensor {tensor!r}) not found next to "
                             f"the model", hint="copy the .data file into the model's folder")


def _external_bytes(model, path: Path) -> int:
    seen = {loc for _, loc in _external_locations(model)}
    return sum((path.parent / loc).stat().st_size for loc in seen if (path.parent / loc).is_file())


def opset_of(model) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else exc.__class__.__name__


def export_torch(module, example_inputs, path, *, input_names=None, output_names=None, opset: int = 17) -> Path:
    """Export a PyTorch module to ONNX with the TorchScript exporter, so it can be packaged.

    torch is optional (never a dependency of edgeopt): without it this raises MissingDependencyError.
    """
    try:
        import torch
    except ImportError:
        raise missing_extra("torch", "torch") from None
    path = Path(path)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    names = list(input_names or [f"input{i}" if len(example_inputs) > 1 else "input" for i in range(len(example_inputs))])
    import warnings

    module = module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export, which needs onnxscript (another
        # optional dependency); it still exports plain CNNs faithfully, and the accuracy check verifies it.
        # Its internals raise more DeprecationWarnings of their own; none is actionable by the caller.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, example_inputs, str(path), input_names=names,
                          output_names=list(output_names) if output_names else None, opset_version=opset,
                          dynamo=False, dynamic_axes={n: {0: "batch"} for n in names})
    log.info("exported %s to %s", type(module).__name__, path)
    return path
