"""The pipeline's public data types: what a caller asks for and what it gets back."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..package import BenchmarkReport, LatencyStats, Manifest, PruningInfo, ValidationReport
from ..profile import HardwareProfile

GraphLevel = Literal["none", "basic", "all"]
PRECISIONS = ("fp32", "fp16", "int8", "int8-weight-only")


class ImagePreprocessing(BaseModel):
    """How a folder of images becomes model inputs (calibration, held-out data, and the package's hint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: tuple[int, int] | None = Field(None, description="Resize to (height, width); default: the model's input size.")
    mean: tuple[float, ...] = Field((0.0, 0.0, 0.0), description="Per-channel mean subtracted after scaling.")
    std: tuple[float, ...] = Field((1.0, 1.0, 1.0), description="Per-channel std the result is divided by.")
    scale: float = Field(1.0 / 255.0, description="Pixel values (0..255) are multiplied by this first.")
    layout: Literal["NCHW", "NHWC"] | None = Field(None, description="Tensor layout; default: guessed from the model.")
    channel_order: Literal["RGB", "BGR"] = Field("RGB", description="Channel order the model expects.")
    resize: Literal["stretch", "letterbox"] | None = Field(
        None, description="stretch to the input size, or letterbox: keep the aspect ratio and pad (detectors); "
                          "default: letterbox when the model's metadata says it is a detector export, else stretch.")
    pad_value: int = Field(114, ge=0, le=255, description="Letterbox padding grey level (Ultralytics: 114).")

    @model_validator(mode="after")
    def _lengths(self) -> "ImagePreprocessing":
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values but std has {len(self.std)}; give one per channel")
        if any(s == 0 for s in self.std):
            raise ValueError("std values must not be 0")
        return self


class TorchSource(BaseModel):
    """A PyTorch model as ``MODULE:FACTORY`` with an optional ``state_dict`` file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    factory: str = Field(description="MODULE:FACTORY (or file.py:FACTORY) returning a torch.nn.Module.")
    weights: Path | None = Field(None, description="state_dict file loaded into the module.")


class PackageRequest(BaseModel):
    """Everything `edgeopt package` (and `edgeopt compare`) needs to know. Paths may be str or Path."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    model: Path = Field(description="Model file: .onnx, OpenVINO IR .xml, or .tflite (arm profile only).")
    profile: Union[str, HardwareProfile] = Field("cpu", description="Shipped profile name, profile file, or a loaded profile.")
    output: Path | None = Field(None, description="The .eopkg to write (build_package only).")
    calib: Union[Path, Literal["random"], None] = Field(
        None, description="Calibration data: .npz keyed by input name, a folder of images, or 'random'.")
    preprocessing: ImagePreprocessing | None = Field(None, description="Image folder preprocessing.")
    input_shapes: dict[str, list[int]] = Field(default_factory=dict, description="Fix input dims, e.g. {'images': [1,3,224,224]}.")
    states: dict[str, str] = Field(default_factory=dict, description="State input -> state output pairs of a "
                                   "stateful model, e.g. {'state': 'stateN'}; default: detected by name and shape.")
    sign_key: Path | None = Field(None, description="Ed25519 private key (PEM) that signs the manifest.")
    unsigned: bool = Field(False, description="Write an unsigned package (explicit --no-sign).")
    accuracy_aware: bool = Field(False, description="Keep the most sensitive layers in float until the budget holds.")
    weight_only: bool = Field(False, description="int8 weights only (activations stay float); no calibration needed.")
    name: str | None = Field(None, description="Package name; default: the model file's stem.")
    version: str = Field("1.0.0", description="Package version (PEP 440).")
    heldout: Path | None = Field(None, description="Held-out .npz (inputs keyed by name, optional 'labels') or image folder.")
    runtime: str | None = Field(None, description="Override: one of the profile's runtimes.")
    precision: str | None = Field(None, description="Override: fp32, fp16, int8 or int8-weight-only.")
    graph_level: GraphLevel | None = Field(None, description="Override: none, basic (onnxslim) or all (+ runtime optimizer).")
    calib_samples: int | None = Field(None, ge=1, description="Cap on calibration samples (default: the profile's).")
    heldout_samples: int | None = Field(None, ge=1, description="Cap on held-out samples (default: the profile's).")
    bench_iterations: int = Field(100, ge=5, description="Timed iterations per model in the host benchmark.")
    golden_count: int = Field(4, ge=1, le=64, description="Golden samples stored for the agent's self-test.")
    seed: int = Field(0, description="Seed for random calibration / random held-out data.")
    task: str = Field("auto", description="How accuracy is judged: auto, classify, detect, segment, embed, vad, generic.")
    metric: Any = Field(None, description="The user's metric: 'module:function' or a callable "
                                         "(fp32_outputs, optimized_outputs, labels) -> number, higher is better.")
    max_metric_drop: float | None = Field(None, ge=0.0, description="Budget for --metric: largest drop, its units.")
    labels: Path | None = Field(None, description="COCO-format JSON labels of the held-out images (detect).")
    validate_on: Literal["host", "aarch64"] = Field(
        "host", description="Where the optimized model's held-out outputs are computed for the accuracy gate and "
                            "the golden samples: 'host', or 'aarch64' (an emulated ARM CPU, scripts/arm-sysroot.sh).")
    arm_sysroot: Path | None = Field(None, description="The emulated aarch64 environment (default "
                                                       "$EDGEOPT_ARM_SYSROOT or .cache/arm-sysroot).")
    arm_cpu: str | None = Field(None, description="QEMU CPU model for --validate-on aarch64 (default max; e.g. "
                                                  "cortex-a72 for a Raspberry Pi 4).")
    detect_format: str = Field("auto", description="Detection head format: auto, yolov8, yolov8t, yolov5, nms, "
                                                    "tuple, ssd.")
    reference_model: Path | None = Field(
        None, description="ONNX model the accuracy gate and the fp32 baseline use instead of ``model`` itself: the "
                          "unpruned model when ``model`` was pruned (same inputs and outputs).")
    pruning: PruningInfo | None = Field(None, description="PruningInfo recorded in the manifest when ``model`` was pruned.")
    torch_source: TorchSource | None = Field(
        None, description="The PyTorch model ``model`` was exported from, for runtimes that compile PyTorch itself "
                          "(torch-aoti); ``model`` stays the fp32 reference and names the tensors.")

    @model_validator(mode="after")
    def _checks(self) -> "PackageRequest":
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.weight_only and self.precision not in (None, "int8-weight-only"):
            raise ValueError(f"weight_only conflicts with precision {self.precision!r}")
        return self


@dataclass(frozen=True)
class Candidate:
    """One configuration to try: runtime, precision, graph level (and whether to search float fallbacks)."""

    runtime: str
    precision: str
    graph_level: GraphLevel = "all"
    accuracy_aware: bool = False
    # `edgeopt compare --prune-ratios`: the model this candidate was built from was pruned by this ratio first
    # (None: the model as given). It only names the row; the pruned ONNX is the prepared model itself.
    prune_ratio: float | None = None

    @property
    def label(self) -> str:
        extra = "+aa" if self.accuracy_aware else ""
        pruned = f"prune{self.prune_ratio:g}/" if self.prune_ratio else ""
        return f"{pruned}{self.runtime}/{self.precision}/{self.graph_level}{extra}"


@dataclass
class Artifact:
    """What a backend produced: files in a work directory, and how to load them."""

    model_file: Path  # the file the runtime loads (model.xml, model.onnx, model.tflite)
    files: dict[str, Path]  # archive name -> file (e.g. model.xml + model.bin)
    runtime: str
    precision: str
    float_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Runtime.load options the model was validated with; recorded in the manifest for the agent.
    runtime_options: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


@dataclass
class CandidateResult:
    """One evaluated configuration (compare prints one row per result)."""

    candidate: Candidate
    ok: bool  # built, validated and benchmarked (budget may still be missed: see passed)
    passed: bool  # within the accuracy budget
    artifact: Artifact | None = None
    validation: ValidationReport | None = None
    fp32: LatencyStats | None = None  # ONNX Runtime fp32 baseline, measured in the same run
    optimized: LatencyStats | None = None
    speedup: float | None = None
    size_bytes: int | None = None
    source_size_bytes: int | None = None
    device: str = ""  # device the package targets (NPU, GPU, CPU, CUDAExecutionProvider, ...)
    run_device: str = ""  # device it was measured on here
    host_proxy: bool = False
    error: str | None = None  # one line when ok is False
    decisions: list[str] = field(default_factory=list)
    batch: int | None = None  # batch size the benchmark ran at
    outputs: list | None = field(default=None, repr=False)  # optimized outputs on the held-out samples
    tensors: tuple | None = field(default=None, repr=False)  # (inputs, outputs) TensorSpecs of the built model
    exception: Exception | None = field(default=None, repr=False)  # the EdgeoptError behind ``error``
    runoff_p50_ms: float | None = None  # p50 in the side-by-side run-off of the in-budget candidates

    def row(self) -> dict[str, Any]:
        """Flat, JSON-ready summary."""
        v = self.validation
        return {
            "candidate": self.candidate.label, "runtime": self.candidate.runtime,
            "precision": self.candidate.precision, "graph_level": self.candidate.graph_level,
            "accuracy_aware": self.candidate.accuracy_aware, "prune_ratio": self.candidate.prune_ratio,
            "ok": self.ok, "passed": self.passed, "size_bytes": self.size_bytes, "source_size_bytes": self.source_size_bytes,
            "p50_ms": self.optimized.p50_ms if self.optimized else None,
            "fp32_p50_ms": self.fp32.p50_ms if self.fp32 else None,
            "runoff_p50_ms": self.runoff_p50_ms,
            "speedup": self.speedup,
            "min_cosine": v.min_cosine if v else None, "mean_cosine": v.mean_cosine if v else None,
            "max_abs_error": v.max_abs_error if v else None,
            "top1_agreement": v.top1_agreement if v else None,
            "metric_drop": v.metric.drop if v and v.metric else None,
            "task": v.task if v else None,
            "metric_name": v.metric.name if v and v.metric else None,
            "metric_value": v.metric.optimized if v and v.metric else None,
            "metric_bound": v.metric.bound if v and v.metric and v.metric.rule == "min" else None,
            "float_layers": list(v.float_layers) if v else [],
            "device": self.device, "run_device": self.run_device, "host_proxy": self.host_proxy,
            "error": self.error,
        }


@dataclass
class BuildResult:
    """What build_package returns."""

    manifest: Manifest
    output: Path
    chosen: CandidateResult
    tried: list[CandidateResult]
    benchmark: BenchmarkReport
    validation: ValidationReport

    def summary(self) -> dict[str, Any]:
        """The JSON summary `edgeopt package --json` prints."""
        m = self.manifest
        return {
            "output": str(self.output), "name": m.name, "version": m.version, "profile": m.profile_name,
            "runtime": m.runtime, "runtime_version": m.runtime_version, "device": m.device,
            "precision": m.precision, "size_bytes": self.chosen.size_bytes,
            "source_size_bytes": self.chosen.source_size_bytes,
            "validation": self.validation.model_dump(mode="json"),
            "benchmark": self.benchmark.model_dump(mode="json"),
            "calibration": m.calibration.model_dump(mode="json") if m.calibration else None,
            "decisions": list(m.decisions), "signed": self.signed,
            "candidates": [r.row() for r in self.tried],
        }

    signed: bool = False
