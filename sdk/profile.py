"""Hardware profiles: the typed, declarative description of one deployment target.

A profile file (TOML or YAML) is validated into :class:`HardwareProfile`; unknown keys are refused,
and every error names the file, the key path, the value found, what was expected and the fix.
The shipped profiles live in ``hardware_profiles/``; users pass a path to add their own.
"""
from __future__ import annotations

import difflib
import enum
import importlib.resources
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class DeviceKind(str, enum.Enum):
    """The class of silicon a profile targets; the agent refuses a package its device cannot run."""

    CPU = "cpu"
    INTEL_GPU = "intel-gpu"
    INTEL_NPU = "intel-npu"
    NVIDIA_GPU = "nvidia-gpu"
    ARM_CPU = "arm-cpu"


class Precision(str, enum.Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"  # static post-training quantization with calibration data
    INT8_WEIGHT_ONLY = "int8-weight-only"


class ShapePolicy(str, enum.Enum):
    DYNAMIC_ALLOWED = "dynamic-allowed"
    STATIC_PREFERRED = "static-preferred"
    STATIC_REQUIRED = "static-required"


class PerformanceHint(str, enum.Enum):
    LATENCY = "latency"
    THROUGHPUT = "throughput"


class OpenVINORuntime(_Strict):
    """OpenVINO runtime block."""

    runtime: Literal["openvino"] = Field(description="Runtime key.")
    device: Literal["CPU", "GPU", "NPU"] = Field(
        description="OpenVINO device name. AUTO is not accepted: it silently falls back to CPU."
    )
    model_cache: bool = Field(True, description="Enable OpenVINO's model cache on the device.")


class OnnxRuntimeRuntime(_Strict):
    """ONNX Runtime block."""

    runtime: Literal["onnxruntime"] = Field(description="Runtime key.")
    providers: tuple[str, ...] = Field(
        ("CPUExecutionProvider",),
        min_length=1,
        description="Execution providers in order of preference, e.g. CUDAExecutionProvider.",
    )
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = Field(
        "all", description="ONNX Runtime graph optimization level."
    )
    intra_op_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's intra-op threads spin-wait between calls on the device. Off: a spinning "
        "thread takes a core from the agent's API and the device's other work and burns power while idle; "
        "on suits a box that does nothing but inference.",
    )
    batch_sizes: tuple[int, ...] = Field(
        (),
        description="Batch sizes the agent runs the model at, with its inputs and outputs in buffers allocated "
        "once per size on the device (I/O binding). A batch is padded up to the nearest size, and one larger than "
        "the largest is split. The agent's dynamic batcher batches up to the largest. Empty: any batch, as sent.",
    )
    cuda_graph: bool = Field(
        False,
        description="CUDAExecutionProvider: capture one CUDA graph per batch size at load and replay it (needs "
        "batch_sizes, fixed shapes otherwise, and every node on the GPU: ONNX Runtime refuses the session if a "
        "node would run on the CPU).",
    )
    prefer_nhwc: bool = Field(
        False, description="CUDAExecutionProvider: NHWC convolution kernels (tensor cores without layout transposes)."
    )
    cudnn_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = Field(
        "EXHAUSTIVE",
        description="CUDAExecutionProvider: how cuDNN picks each convolution's algorithm. EXHAUSTIVE times them all "
        "at the first run of each shape (the agent does that at load, once per batch size).",
    )
    fp16_inputs: bool = Field(
        False,
        description="fp16 packages: inputs in float16 too (no Cast at the model's input edge; half the bytes copied "
        "to the device). Outputs stay float32. Clients send FP16; the agent's Python API converts float32 arrays.",
    )

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 or b > 4096 for b in v):
            raise ValueError("batch sizes must be between 1 and 4096")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _graph_needs_sizes(self):
        if self.cuda_graph and not self.batch_sizes:
            raise ValueError("cuda_graph needs batch_sizes (one graph is captured per size)")
        if self.cuda_graph and "CUDAExecutionProvider" not in self.providers:
            raise ValueError("cuda_graph applies to CUDAExecutionProvider only")
        return self


class TFLiteRuntime(_Strict):
    """TFLite / LiteRT block."""

    runtime: Literal["tflite"] = Field(description="Runtime key.")
    use_xnnpack: bool = Field(True, description="Use the XNNPACK delegate (the default CPU kernels).")


class TorchAotiRuntime(_Strict):
    """PyTorch AOTInductor block: the PyTorch model compiled ahead of time into native code for one device,
    one ``.pt2`` per batch size (for devices that have PyTorch; the package needs the PyTorch release line and, on
    CUDA, the GPU architecture that built it)."""

    runtime: Literal["torch-aoti"] = Field(description="Runtime key.")
    device: Literal["cuda", "cpu"] = Field(description="Where the compiled code runs; it is compiled on this device.")
    batch_sizes: tuple[int, ...] = Field(
        (1,), min_length=1,
        description="One compiled model per batch size (fixed shapes, kernels autotuned at that size). The agent "
        "pads a batch up to the nearest size, splits one above the largest, and batches requests up to the largest.")
    max_autotune: bool = Field(
        True, description="TorchInductor's kernel autotuning (torch.compile's max-autotune): slower to build, faster "
        "to run.")
    cuda_graph: bool = Field(True, description="cuda: capture one CUDA graph per batch size at load and replay it.")
    fp16_inputs: bool = Field(
        False, description="fp16 packages: inputs in float16 (half the bytes copied to the device); outputs float32.")

    @field_validator("batch_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 or b > 4096 for b in v):
            raise ValueError("batch sizes must be between 1 and 4096")
        return tuple(sorted(set(v)))


RuntimeSpec = Annotated[
    Union[OpenVINORuntime, OnnxRuntimeRuntime, TFLiteRuntime, TorchAotiRuntime], Field(discriminator="runtime")
]


class TargetSpec(_Strict):
    device: DeviceKind = Field(description="Class of device that runs packages of this profile.")
    arch: tuple[Literal["x86_64", "aarch64", "armv7l"], ...] = Field(
        ("x86_64", "aarch64"), min_length=1, description="CPU architectures the package may run on."
    )
    cpu_flags: tuple[str, ...] = Field((), description="CPU flags the device must have (e.g. avx2).")


class PrecisionSpec(_Strict):
    mode: Precision = Field(description="Numeric precision of the optimized model.")
    per_layer_fp32_fallback: bool = Field(
        True, description="With --accuracy-aware, layers may stay in float to meet the budget."
    )
    per_channel: bool = Field(True, description="Per-channel weight quantization (int8).")
    reduce_range: bool | Literal["auto"] = Field(
        "auto",
        description="ONNX Runtime int8: weights in 7 bits, so x86-64 CPUs without VNNI cannot saturate their "
                    "16-bit u8s8 sums. auto: on where the profile admits x86-64 devices without a VNNI flag in "
                    "[target] cpu_flags, or where this host's CPU lacks VNNI (so the gate measures what ships).",
    )
    calibration_samples: int = Field(
        300, ge=1, le=100_000, description="Maximum calibration samples used for int8."
    )


class ShapeSpec(_Strict):
    policy: ShapePolicy = Field(description="Whether dynamic dimensions are allowed in the package.")


class ThreadsSpec(_Strict):
    policy: Literal["auto", "physical-cores", "fixed"] = Field(
        "auto", description="How many inference threads: runtime default, one per physical core, or a fixed count."
    )
    count: int | None = Field(None, ge=1, le=512, description="Thread count when policy is 'fixed'.")

    @model_validator(mode="after")
    def _count_matches_policy(self) -> "ThreadsSpec":
        if self.policy == "fixed" and self.count is None:
            raise ValueError("policy 'fixed' needs 'count' (set count = N or use policy = 'auto')")
        if self.policy != "fixed" and self.count is not None:
            raise ValueError(f"'count' is only used with policy 'fixed' (policy is {self.policy!r})")
        return self


class PruningSpec(_Strict):
    """How structured pruning (``edgeopt prune``, ``package --prune``) shapes channel counts for this target."""

    round_to: int | None = Field(
        None, ge=1, le=256,
        description="Round pruned channel counts to multiples of this (int8 / NPU kernels run full blocks of "
                    "8, 16 or 32 channels); none keeps exact counts.")


class LlmSpec(_Strict):
    """How language models (--task text-generation) are packaged for this profile (OpenVINO GenAI).

    The device keys say what the target's OpenVINO plugin runs: the NPU's LLM pipeline, for one, takes only
    symmetric 4-bit weights with all layers in int4 and static prompt/response lengths (OpenVINO GenAI on NPU
    guide); a request outside them is refused before anything is built."""

    device: Literal["CPU", "GPU", "NPU"] = Field("CPU", description="OpenVINO device the package is served on.")
    weights: Literal["int4", "int8"] = Field("int4", description="Default weight compression.")
    group_size: int | Literal["auto"] = Field(
        "auto", description="int4 group size: auto picks the largest of 128/64/32 (or of group_sizes) dividing "
                            "every layer; -1 per channel.")
    symmetric: bool = Field(False, description="Default weight symmetry (--sym / --asym override it).")
    allow_asymmetric: bool = Field(True, description="false: asymmetric weights are refused (the NPU).")
    group_sizes: tuple[int, ...] | None = Field(
        None, description="The int4 group sizes the device runs (-1: per channel); none: any.")
    mixed_int4: bool = Field(True, description="false: int4 needs every layer in int4 (ratio 1.0), so "
                                               "--ratio < 1 and --accuracy-aware are refused (the NPU).")
    inference_precision: Literal["f32", "f16", "bf16", "device"] = Field(
        "f32", description="INFERENCE_PRECISION_HINT the device runs with; device: not set (the plugin's own).")
    kv_cache_precision: Literal["u8", "u4", "f16", "f32", "bf16", "device"] = Field(
        "u8", description="KV cache element type (OpenVINO KV_CACHE_PRECISION); device: not set (the plugin's "
                          "own: the NPU's static pipeline has no such property).")
    kv_cache_gb: float = Field(1.0, gt=0, le=1024, description="KV cache memory budget of the serving pipeline.")
    max_prompt_len: int | None = Field(None, ge=16, le=131072,
                                       description="NPU MAX_PROMPT_LEN: the longest prompt the static pipeline "
                                                   "takes, in tokens (OpenVINO's default 1024).")
    min_response_len: int | None = Field(None, ge=1, le=131072,
                                         description="NPU MIN_RESPONSE_LEN: tokens always left for the answer "
                                                     "(OpenVINO's default 128).")

    @model_validator(mode="after")
    def _device_rules(self) -> "LlmSpec":
        if self.device != "NPU" and (self.max_prompt_len is not None or self.min_response_len is not None):
            raise ValueError("max_prompt_len / min_response_len are NPU properties (device = 'NPU')")
        if self.device == "GPU" and self.kv_cache_precision not in ("u8", "u4", "f16", "device"):
            raise ValueError(f"kv_cache_precision {self.kv_cache_precision!r}: the GPU plugin takes u8, u4 or f16")
        if not self.allow_asymmetric and not self.symmetric:
            raise ValueError("allow_asymmetric = false needs symmetric = true (the default must be runnable)")
        if (self.group_sizes is not None and self.group_size != "auto"
                and self.group_size not in self.group_sizes):
            raise ValueError(f"group_size {self.group_size} is not one of group_sizes {list(self.group_sizes)}")
        return self


class AccuracyBudget(_Strict):
    """How far the optimized model may move from fp32, judged by the model's task (see edgeopt.sdk.pipeline.tasks)."""

    min_cosine: float = Field(
        0.99, ge=0.0, le=1.0, description="generic task: least cosine to fp32 of each output, on every held-out sample."
    )
    min_top1_agreement: float = Field(
        0.99, ge=0.0, le=1.0, description="classify task: least top-1 agreement with fp32."
    )
    min_map50: float = Field(
        0.95, ge=0.0, le=1.0,
        description="detect task: least mAP@0.5 of the optimized model's detections against fp32's detections.",
    )
    min_f1: float | None = Field(
        0.9, ge=0.0, le=1.0,
        description="detect task: least F1 against fp32's detections, both cut at the deployment threshold "
                    "(what an application keeps); null/unset in YAML turns it off.",
    )
    detect_conf: float = Field(
        0.25, gt=0.0, lt=1.0, description="detect task: the deployment score threshold (what the application keeps)."
    )
    detect_nms_iou: float = Field(0.45, gt=0.0, le=1.0, description="detect task: NMS IoU threshold.")
    min_mask_iou: float = Field(
        0.95, ge=0.0, le=1.0, description="segment task: least mask IoU (each channel) or mIoU against fp32's masks."
    )
    mask_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="segment task: probability above which a pixel belongs to the mask."
    )
    min_recall_at_1: float = Field(
        0.99, ge=0.0, le=1.0,
        description="embed task: least share of optimized embeddings whose nearest fp32 embedding is their own.",
    )
    min_embedding_cosine: float = Field(
        0.98, ge=0.0, le=1.0, description="embed task: least cosine of each optimized embedding to its fp32 one."
    )
    min_frame_agreement: float = Field(
        0.99, ge=0.0, le=1.0,
        description="vad task: least share of frames (sequence steps) whose speech/non-speech decision equals fp32's.",
    )
    min_segment_f1: float = Field(
        0.9, ge=0.0, le=1.0,
        description="vad task: least F1 of the detected speech segments against fp32's (matched at IoU >= 0.5).",
    )
    vad_threshold: float = Field(
        0.5, gt=0.0, lt=1.0, description="vad task: speech probability at or above which a frame is speech.",
    )
    max_metric_drop: float = Field(
        1.0, ge=0.0, le=100.0,
        description="Largest drop of a labelled metric in points (accuracy, mAP x 100), or of a --metric callable "
                    "in its own units.",
    )
    held_out_samples: int = Field(
        64, ge=1, le=100_000, description="Held-out samples used for the accuracy check."
    )
    min_token_agreement: float = Field(
        0.85, ge=0.0, le=1.0,
        description="text-generation: least share of held-out positions where the compressed model's most likely "
                    "next token is the original's.")
    max_kl: float = Field(
        0.1, ge=0.0, le=100.0,
        description="text-generation: largest mean KL divergence (nats) of the next-token distributions, "
                    "original || compressed.")
    max_ppl_increase_pct: float = Field(
        10.0, ge=0.0, le=10_000.0, description="text-generation: largest perplexity increase on held-out text, %.")


class HardwareProfile(_Strict):
    """One deployment target: runtime, device, precision, shapes and budgets."""

    schema_version: Literal[1] = Field(1, description="Profile schema version.")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$", description="Profile name (file stem).")
    description: str = Field("", description="One line for `edgeopt profiles list`.")
    target: TargetSpec = Field(description="The device class and architectures.")
    runtimes: tuple[RuntimeSpec, ...] = Field(
        min_length=1,
        description="Candidate runtimes; with more than one, the SDK measures each and records the faster.",
    )
    precision: PrecisionSpec = Field(description="Numeric precision.")
    shapes: ShapeSpec = Field(description="Shape policy.")
    batch_size: int = Field(1, ge=1, le=4096, description="Batch size for benchmarks and the agent's max batch.")
    performance_hint: PerformanceHint = Field(PerformanceHint.LATENCY, description="Latency or throughput.")
    threads: ThreadsSpec = Field(default_factory=ThreadsSpec, description="Inference thread policy.")
    accuracy: AccuracyBudget = Field(default_factory=AccuracyBudget, description="Accuracy budget vs fp32.")
    fallback: str | None = Field(None, description="Profile to use when this one cannot run the model.")
    placement: Literal["warn", "strict"] = Field(
        "warn", description="What the agent does when the runtime did not run the package as its manifest says "
                            "(nodes off the device, compute layers in another precision): 'warn' raises an event "
                            "and a dashboard alert and switches; 'strict' also refuses to switch.")
    pruning: PruningSpec = Field(default_factory=PruningSpec, description="Channel rounding for pruning.")
    llm: LlmSpec | None = Field(None, description="Language models (--task text-generation); none: not offered.")

    @model_validator(mode="after")
    def _cross_checks(self) -> "HardwareProfile":
        for rt in self.runtimes:
            if isinstance(rt, OpenVINORuntime):
                wanted = {DeviceKind.CPU: "CPU", DeviceKind.INTEL_GPU: "GPU", DeviceKind.INTEL_NPU: "NPU",
                          DeviceKind.ARM_CPU: "CPU"}.get(self.target.device)
                if wanted is None or rt.device != wanted:
                    raise ValueError(
                        f"OpenVINO device {rt.device!r} does not match target device "
                        f"{self.target.device.value!r}"
                    )
            if isinstance(rt, TorchAotiRuntime):
                wanted_kinds = ((DeviceKind.NVIDIA_GPU,) if rt.device == "cuda"
                                else (DeviceKind.CPU, DeviceKind.ARM_CPU))
                if self.target.device not in wanted_kinds:
                    raise ValueError(f"torch-aoti device {rt.device!r} does not match target device "
                                     f"{self.target.device.value!r}")
        if self.fallback == self.name:
            raise ValueError("a profile cannot fall back to itself")
        return self

    @property
    def requires_static_shapes(self) -> bool:
        return self.shapes.policy is ShapePolicy.STATIC_REQUIRED

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready content, as stored in a package manifest."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _read_document(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile file: {exc}") from None
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: unknown profile file type {suffix!r}", hint="use .toml, .yaml or .yml")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except ConfigError:
        raise
    except Exception as exc:  # yaml.YAMLError carries its own line/column
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a table/mapping at the top level, found {type(data).__name__}")
    return data


def format_validation_error(path: Path | str, exc: ValidationError) -> str:
    """One line per problem: file, key path, value found, what was expected."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or True)
        value = err.get("input")
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif kind == "missing":
            msg = f"required key is missing (add it: see `edgeopt profile show cpu` for a complete profile)"
            value = None
        elif kind in ("literal_error", "enum"):
            msg = f"{err['msg']} (use one of those values)"
        elif kind.endswith("_parsing") or kind.endswith("_type"):
            msg = f"{err['msg']} (write the value without quotes if it is a number or a boolean)"
        else:
            msg = err["msg"]  # pydantic's text already says what is expected (a bound, a pattern)
        shown = "" if value is None or isinstance(value, dict) else f" (found {value!r})"
        lines.append(f"{path}: {loc or '<top>'}: {msg}{shown}")
    return "; ".join(lines)


def load_profile_file(path: str | Path) -> HardwareProfile:
    """Validate one profile file. Raises :class:`ConfigError` naming file, key, value and fix."""
    path = Path(path)
    data = _read_document(path)
    data.setdefault("name", path.stem)
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(path, exc)) from None


def builtin_profile_paths() -> dict[str, Path]:
    """Shipped profiles by name."""
    root = importlib.resources.files("edgeopt.hardware_profiles")
    out: dict[str, Path] = {}
    for entry in root.iterdir():
        if entry.name.endswith((".toml", ".yaml", ".yml")):
            out[entry.name.rsplit(".", 1)[0]] = Path(str(entry))
    return dict(sorted(out.items()))


def load_profile(name_or_path: str | Path) -> HardwareProfile:
    """A shipped profile by name, or a user's profile file by path."""
    text = str(name_or_path)
    candidate = Path(text)
    if candidate.suffix.lower() in (".toml", ".yaml", ".yml") or candidate.exists():
        return load_profile_file(candidate)
    shipped = builtin_profile_paths()
    if text in shipped:
        return load_profile_file(shipped[text])
    close = difflib.get_close_matches(text, list(shipped), n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(shipped)}, or pass a profile file"
    raise ConfigError(f"unknown profile {text!r}", hint=hint)
