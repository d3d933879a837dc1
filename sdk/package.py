"""The `.eopkg` package: a tar archive with a signed `manifest.json` at its root.

Layout::

    manifest.json   the Manifest below (UTF-8 JSON)
    manifest.sig    {"alg": "ed25519", "key_id": ..., "signature": base64} over manifest.json's bytes
    <artifacts>     model files (model.xml + model.bin, model.onnx, model.tflite), golden.npz, ...

The manifest records the sha256 and size of every other file, so one Ed25519 signature covers the
whole package. Reading is defensive: no absolute paths, no `..`, no links or device files, size limits,
no unlisted or missing members. This module is pure Python (plus pydantic and cryptography): the agent
and the dashboard import it without any ML runtime.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import tempfile
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable

from packaging.version import InvalidVersion, Version
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import PackageError, SecurityError

FORMAT_VERSION = "1.1"  # 1.1 (all optional): validation.ran_on/target (--validate-on), host_profile, state, pruning
TEXT_FORMAT_VERSION = "1.2"  # language-model packages: 1.1 plus `text` (runtime openvino-genai)
SUPPORTED_MAJOR = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_MEMBER_BYTES = 4 * 1024**3
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024**3


from .stateful import StatePair  # noqa: E402  (pure pydantic, no runtime)

class _Model(BaseModel):
    # Readers ignore fields they do not know (a newer minor version may add some); writers are typed.
    model_config = ConfigDict(extra="ignore")


class TensorSpec(_Model):
    name: str = Field(description="Tensor name in the model graph.")
    dtype: str = Field(description="numpy dtype name, e.g. float32, int64, uint8.")
    shape: list[int | str] = Field(description="Dimensions; a string names a dynamic dimension.")
    layout: str | None = Field(None, description="Layout hint such as NCHW or NHWC.")


class FileEntry(_Model):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class SourceModel(_Model):
    filename: str
    format: str = Field(description="onnx, openvino-ir, tflite or torch.")
    sha256: str


class CalibrationInfo(_Model):
    source: str = Field(description="npz, images, random or none.")
    sha256: str | None = None
    samples: int = 0
    meaningful: bool = Field(True, description="False for random calibration: the accuracy check means nothing.")


class LayerError(_Model):
    layer: str
    error: float = Field(description="Relative error or 1-cosine of this layer's output vs fp32.")


class MetricResult(_Model):
    """One task metric of the fp32 original and the optimized model, and the budget rule it is held to."""

    name: str = Field(description="What is measured, e.g. 'mAP@0.5 vs fp32', 'top-1 agreement', 'accuracy'.")
    fp32: float = Field(description="The metric for the fp32 model (1.0 for agreement of fp32 with itself).")
    optimized: float = Field(description="The metric for the optimized model.")
    drop: float = Field(description="fp32 minus optimized (higher is better for every metric).")
    bound: float | None = Field(None, description="The budget: least value (rule 'min') or largest drop ('max_drop').")
    rule: str = Field("", description="'min': optimized >= bound; 'max_drop': drop <= bound; '': reported only.")
    passed: bool = True


class OutputFigures(_Model):
    """Each output judged on its own (never one cosine over concatenated outputs)."""

    name: str
    min_cosine: float
    mean_cosine: float
    min_snr_db: float = Field(description="Least signal-to-noise ratio over the samples, in dB (99 when exact).")
    max_abs_error: float


class TargetValidation(_Model):
    """The package's model run on the target's CPU architecture at package time (edgeopt package
    --validate-on aarch64): its outputs there decided the accuracy gate and are the golden samples."""

    arch: str = Field(description="CPU architecture the model ran on, e.g. aarch64.")
    emulated: bool = Field(description="True when that CPU was emulated (QEMU user mode): numerics, never speed.")
    emulator: str = Field("", description="The emulator and its version, when emulated.")
    cpu: str = Field("", description="The CPU model emulated (QEMU -cpu), e.g. max or cortex-a72.")
    runtime_version: str = Field(description="The runtime that ran there, e.g. onnxruntime 1.22.1.")
    samples: int = Field(description="Held-out samples run on the target.")
    wall_seconds: float = Field(description="Wall time of the emulated run (emulation: not a speed figure).")
    vs_host: list[OutputFigures] = Field(default_factory=list,
                                         description="Each output on the target vs the same package on the host.")


class ValidationReport(_Model):
    """Reference (fp32) vs optimized model on held-out samples, judged by the model's task."""

    samples: int
    max_abs_error: float
    min_cosine: float = Field(description="The least per-output cosine over every output and sample.")
    mean_cosine: float
    top1_agreement: float | None = None
    task: str = Field("generic", description="classify, detect, segment, embed, generic or custom.")
    task_reason: str = Field("", description="Why this task was chosen (metadata, output shapes, --task).")
    metric: MetricResult | None = Field(None, description="The metric that decides the gate.")
    checks: list[MetricResult] = Field(default_factory=list, description="Every budgeted metric, deciding one first.")
    figures: dict[str, float] = Field(default_factory=dict, description="Further task figures (reported only).")
    outputs: list[OutputFigures] = Field(default_factory=list)
    budget: dict[str, Any] = Field(default_factory=dict)
    passed: bool
    failures: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    sensitive_layers: list[LayerError] = Field(default_factory=list)
    sensitivity_basis: str = Field("", description="What sensitive_layers' figures mean: 'task metric gained in "
                                                   "float' (bypassed alone, re-judged) or 'error added vs fp32'.")
    float_layers: list[str] = Field(default_factory=list, description="Layers kept in float by --accuracy-aware.")
    ran_on: str = Field("host", description="Where the optimized outputs judged here were computed: 'host' (the "
                                            "build machine) or the target's arch, e.g. 'aarch64 (emulated)'.")
    target: TargetValidation | None = Field(None, description="The run on the target (--validate-on), if any.")


class LatencyStats(_Model):
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput_ips: float = Field(description="Inferences (samples) per second.")
    iterations: int
    runtime: str | None = None


class BenchmarkReport(_Model):
    """Host benchmark: fp32 original and optimized model, measured in the same run."""

    machine: dict[str, Any] = Field(default_factory=dict)
    batch_size: int
    threads: int | None = None
    fp32: LatencyStats
    optimized: LatencyStats
    speedup: float
    host_proxy: bool = Field(description="True when measured on the host CPU in place of the target device.")
    target_device: str
    note: str = ""


class GoldenSpec(_Model):
    file: str = "golden.npz"
    count: int
    atol: float
    rtol: float
    min_cosine: float


class PruningInfo(_Model):
    """Structured pruning applied before the pipeline (``edgeopt package --prune``, ``edgeopt prune``)."""

    ratio: float = Field(description="Fraction of channels removed per group (or overall, with global pruning).")
    global_pruning: bool = Field(False, description="Ratio applied across all layers by ranking, not per layer.")
    per_layer_ratios: dict[str, float] = Field(default_factory=dict, description="Layer name -> its own ratio.")
    importance: str = Field(description="Criterion that ranked channels: l2, l1, taylor or hessian.")
    round_to: int | None = Field(None, description="Channel counts rounded to multiples of this.")
    ignored_layers: list[str] = Field(default_factory=list, description="Layers kept whole (output layers included).")
    channels_before: int = Field(description="Output channels of all conv/linear layers, unpruned.")
    channels_after: int = Field(description="The same after pruning.")
    layer_channels: dict[str, list[int]] = Field(default_factory=dict, description="Layer -> [before, after].")
    params_before: int
    params_after: int
    flops_before: int = Field(description="FLOPs of one sample (2 x MACs of conv/linear layers), unpruned.")
    flops_after: int
    recovery: str = Field("none", description="distill (from the unpruned model, no labels), user, or none.")
    recovery_steps: int = 0
    recovery_samples: int = Field(0, description="Calibration samples the recovery trained on.")
    recovery_loss_first: float | None = Field(None, description="Mean loss over the first steps of recovery.")
    recovery_loss_last: float | None = Field(None, description="Mean loss over the last steps of recovery.")
    recovery_device: str | None = None
    torch_pruning_version: str = ""


class TextGenerationInfo(_Model):
    """A language-model package (task text-generation, format 1.2): how it was compressed, how the text gate
    judged it, and the golden prompts the agent's self-test replays."""

    architecture: str
    context_length: int = Field(0, ge=0, description="The model's maximum positions (config.json).")
    weights: str = Field(description="int4 or int8 weight compression (NNCF); activations stay float.")
    group_size: int | None = Field(None, description="int4 group size; -1 per channel; None for int8.")
    symmetric: bool = False
    int4_ratio: float | None = Field(None, description="Share of layers in int4, the rest in int8 (int4 only).")
    data_aware: bool = Field(False, description="AWQ and scale estimation on calibration text.")
    kv_cache_precision: str = Field("u8", description="KV cache element type the runtime is set to.")
    budget: dict[str, float] = Field(default_factory=dict)
    figures: dict[str, Any] = Field(default_factory=dict, description="edgeopt.sdk.llm.gate.TextFigures.")
    golden: list[dict[str, Any]] = Field(default_factory=list,
                                         description="{prompt, max_new_tokens, expected}: greedy continuations.")
    host_perf: dict[str, Any] = Field(default_factory=dict, description="TTFT / TPOT / tokens/s on the build host.")
    chat_template: bool = False
    eos_token_id: int | None = None


class Manifest(_Model):
    """Everything the agent and the dashboard need to know about a package."""

    format_version: str = FORMAT_VERSION
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    version: str
    profile: dict[str, Any] = Field(description="Full content of the hardware profile used.")
    runtime: str = Field(description="openvino, onnxruntime or tflite.")
    runtime_version: str
    device: str = Field(description="Runtime device, e.g. CPU, NPU, CUDAExecutionProvider.")
    precision: str
    model_file: str = Field(description="The artifact the runtime loads (e.g. model.xml).")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    source_model: SourceModel
    files: dict[str, FileEntry] = Field(default_factory=dict)
    calibration: CalibrationInfo | None = None
    pruning: PruningInfo | None = Field(None, description="Structured pruning before export (format 1.1).")
    validation: ValidationReport | None = None
    benchmark: BenchmarkReport | None = None
    golden: GoldenSpec | None = None
    toolchain: dict[str, str] = Field(default_factory=dict)
    decisions: list[str] = Field(default_factory=list, description="Choices the pipeline made, and why.")
    runtime_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options to load the model with (Runtime.load(options=...)), e.g. OpenVINO "
                    "INFERENCE_PRECISION_HINT=f32: the precision the package was validated at.")
    host_profile: dict[str, Any] | None = Field(
        None, description="Per-layer profile summary of the packaged model on the build host (edgeopt.sdk.layers."
                          "summary): the reference a device's profile is compared with. None where the runtime "
                          "exposes no per-layer times (LiteRT).")
    text: TextGenerationInfo | None = Field(None, description="Language-model packages (format 1.2).")
    state: list[StatePair] = Field(
        default_factory=list,
        description="Stateful models: state inputs fed the state outputs of the previous call (the agent keeps "
                    "them per sequence).")
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @field_validator("format_version")
    @classmethod
    def _major_supported(cls, v: str) -> str:
        try:
            major = int(v.split(".", 1)[0])
        except ValueError:
            raise ValueError(f"format_version must look like '1.0', found {v!r}") from None
        if major != SUPPORTED_MAJOR:
            raise ValueError(f"package format {v} is not supported (this edgeopt reads {SUPPORTED_MAJOR}.x)")
        return v

    @field_validator("version")
    @classmethod
    def _version_parses(cls, v: str) -> str:
        try:
            Version(v)
        except InvalidVersion:
            raise ValueError(f"version {v!r} is not a PEP 440 / semantic version such as 1.2.0") from None
        return v

    @property
    def parsed_version(self) -> Version:
        return Version(self.version)

    @property
    def profile_name(self) -> str:
        return str(self.profile.get("name", "?"))

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True).encode("utf-8")


# --------------------------------------------------------------------------- keys and signatures


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def generate_keypair(out_dir: str | Path, name: str = "edgeopt", overwrite: bool = False) -> tuple[Path, Path]:
    """Write an Ed25519 private key (PKCS8 PEM, mode 0600) and its public key (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise PackageError(f"{p} already exists", hint="pass --force to replace it, or choose another --out")
    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    _atomic_write(priv_path, priv, mode=0o600)
    _atomic_write(pub_path, pub, mode=0o644)
    return priv_path, pub_path


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise PackageError(f"signing key {path} not found", hint="create one with: edgeopt keygen --out keys/") from None
    except (ValueError, TypeError) as exc:
        raise PackageError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"{path} is not an Ed25519 key", hint="create one with: edgeopt keygen")
    return key


def load_public_key(path_or_pem: str | Path | bytes):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(path_or_pem, bytes):
        data, label = path_or_pem, "public key"
    else:
        label = str(path_or_pem)
        try:
            data = Path(path_or_pem).read_bytes()
        except FileNotFoundError:
            raise PackageError(f"public key {label} not found") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise PackageError(f"{label} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PackageError(f"{label} is not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """Short fingerprint of a public key: first 16 hex digits of sha256 of its raw bytes."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_bytes(raw)[:16]


def sign_manifest(manifest_bytes: bytes, private_key) -> bytes:
    sig = private_key.sign(manifest_bytes)
    doc = {"alg": "ed25519", "key_id": key_id(private_key.public_key()),
           "signature": base64.b64encode(sig).decode("ascii")}
    return json.dumps(doc, indent=2).encode("utf-8")


def verify_signature(manifest_bytes: bytes, signature_doc: bytes | None, public_keys: Iterable) -> str:
    """Check the detached signature against any of the trusted keys; return the signer's key id."""
    from cryptography.exceptions import InvalidSignature

    if signature_doc is None:
        raise SecurityError("package is not signed (no manifest.sig)",
                            hint="sign it with: edgeopt package ... --sign-key KEY")
    try:
        doc = json.loads(signature_doc)
        if doc.get("alg") != "ed25519":
            raise SecurityError(f"unsupported signature algorithm {doc.get('alg')!r}; expected 'ed25519'")
        sig = base64.b64decode(doc["signature"], validate=True)
    except SecurityError:
        raise
    except Exception:
        raise SecurityError("manifest.sig is malformed") from None
    keys = list(public_keys)
    if not keys:
        raise SecurityError("no trusted public key given", hint="pass --public-key FILE")
    for pub in keys:
        try:
            pub.verify(sig, manifest_bytes)
            return key_id(pub)
        except InvalidSignature:
            continue
    raise SecurityError(
        f"signature does not match any trusted key (signed by key {doc.get('key_id', '?')}, "
        f"trusted: {', '.join(key_id(k) for k in keys)})",
        hint="the package was signed with another key, or its manifest was changed",
    )


# --------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_package(out_path: str | Path, manifest: Manifest, artifacts: dict[str, Path | bytes],
                  private_key=None) -> Manifest:
    """Hash the artifacts into the manifest, sign it, and write the archive atomically.

    ``artifacts`` maps archive names (plain relative names) to files or bytes. On any failure no file is
    left at ``out_path``.
    """
    out_path = Path(out_path)
    files: dict[str, FileEntry] = {}
    for arc, src in artifacts.items():
        _check_member_name(arc)
        if arc in (MANIFEST_NAME, SIGNATURE_NAME):
            raise PackageError(f"artifact name {arc!r} is reserved")
        if isinstance(src, (bytes, bytearray)):
            files[arc] = FileEntry(sha256=sha256_bytes(bytes(src)), size=len(src))
        else:
            files[arc] = FileEntry(sha256=sha256_file(src), size=Path(src).stat().st_size)
    manifest = manifest.model_copy(update={"files": files})
    manifest_bytes = manifest.to_json_bytes()
    signature = sign_manifest(manifest_bytes, private_key) if private_key is not None else None

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, MANIFEST_NAME, manifest_bytes)
            if signature is not None:
                _add_bytes(tar, SIGNATURE_NAME, signature)
            for arc, src in sorted(artifacts.items()):
                if isinstance(src, (bytes, bytearray)):
                    _add_bytes(tar, arc, bytes(src))
                else:
                    info = tarfile.TarInfo(arc)
                    info.size = Path(src).stat().st_size
                    info.mode = 0o644
                    info.mtime = int(manifest.created_at.timestamp())
                    with open(src, "rb") as fh:
                        tar.addfile(info, fh)
        os.chmod(tmp, 0o644 & ~_umask())  # mkstemp makes 0600; a package is shared like any built file
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return manifest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


# --------------------------------------------------------------------------- reading


def _check_member_name(name: str) -> None:
    p = PurePosixPath(name)
    if not name or name.startswith("/") or p.is_absolute() or "\\" in name or ":" in name.split("/", 1)[0]:
        raise PackageError(f"unsafe path in package: {name!r} (absolute paths are refused)")
    if any(part in ("..", "") for part in name.split("/")) or name.startswith("./"):
        raise PackageError(f"unsafe path in package: {name!r} ('..' and empty components are refused)")


def check_file_references(manifest: Manifest, source: str = "manifest") -> None:
    """Refuse a manifest that names a file outside the package (``model_file``, ``golden.file``).

    A valid signature only proves who wrote the manifest, not that its names are safe: a loader that
    opened ``model_file: ../../../../etc/passwd`` relative to the package folder would read outside it.
    Every name must be a safe member name listed in ``files`` (whose members the hash check matched).
    """
    for name in manifest.files:
        _check_member_name(name)
    named = [("model_file", manifest.model_file)]
    if manifest.golden is not None:
        named.append(("golden.file", manifest.golden.file))
    for key, name in named:
        if name not in manifest.files:
            raise PackageError(f"{source}: manifest {key} {name!r} is not one of the package's files "
                               f"({', '.join(sorted(manifest.files)) or 'none'}); refused",
                               hint="a manifest may only name files inside its own package")


class PackageReader:
    """Opens a package defensively and verifies it. Use as a context manager.

    >>> with PackageReader("m.eopkg") as pkg:
    ...     pkg.verify([public_key])
    ...     pkg.extract_to(staging_dir)
    """

    def __init__(self, path: str | Path, *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES):
        self.path = Path(path)
        self.max_member_bytes = max_member_bytes
        self.max_total_bytes = max_total_bytes
        self._tar: tarfile.TarFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self.manifest_bytes: bytes = b""
        self.signature_bytes: bytes | None = None
        self.manifest: Manifest

    def __enter__(self) -> "PackageReader":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        if not self.path.is_file():
            raise PackageError(f"{self.path}: package file not found")
        try:
            self._tar = tarfile.open(self.path, mode="r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
            self.close()
            # tarfile's own message lists every compression it tried; the first line of it says enough.
            reason = "not a tar archive" if isinstance(exc, tarfile.ReadError) else f"{exc.__class__.__name__}: {exc}"
            raise PackageError(f"{self.path}: not a valid .eopkg archive ({reason})",
                               hint="the file may be truncated or not a package") from None
        total = 0
        for m in members:
            _check_member_name(m.name)
            if m.issym() or m.islnk():
                raise PackageError(f"{self.path}: link member {m.name!r} refused (packages hold plain files only)")
            if not m.isfile():
                raise PackageError(f"{self.path}: member {m.name!r} is not a regular file (type {m.type!r}); refused")
            if m.name in self._members:
                raise PackageError(f"{self.path}: duplicate member {m.name!r}")
            if m.size > self.max_member_bytes:
                raise PackageError(f"{self.path}: member {m.name!r} is {m.size} bytes, over the "
                                   f"{self.max_member_bytes}-byte limit")
            total += m.size
            if total > self.max_total_bytes:
                raise PackageError(f"{self.path}: package content is over the {self.max_total_bytes}-byte limit")
            self._members[m.name] = m
        if MANIFEST_NAME not in self._members:
            raise PackageError(f"{self.path}: no {MANIFEST_NAME} at the archive root; not an edgeopt package")
        if self._members[MANIFEST_NAME].size > MAX_MANIFEST_BYTES:
            raise PackageError(f"{self.path}: {MANIFEST_NAME} is too large")
        self.manifest_bytes = self.read(MANIFEST_NAME)
        if SIGNATURE_NAME in self._members:
            self.signature_bytes = self.read(SIGNATURE_NAME)
        self.manifest = parse_manifest(self.manifest_bytes, source=str(self.path))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    @property
    def names(self) -> list[str]:
        return list(self._members)

    def read(self, name: str) -> bytes:
        assert self._tar is not None, "package is not open"
        member = self._members.get(name)
        if member is None:
            raise PackageError(f"{self.path}: member {name!r} not found")
        fh = self._tar.extractfile(member)
        try:
            return fh.read() if fh is not None else b""
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
            raise PackageError(f"{self.path}: cannot read {name!r}: truncated or corrupt ({exc})") from None

    def _stream(self, name: str, chunk: int = 1 << 20):
        """Yield a member's bytes in chunks, so multi-GB models never sit in memory whole."""
        assert self._tar is not None, "package is not open"
        member = self._members.get(name)
        if member is None:
            raise PackageError(f"{self.path}: member {name!r} not found")
        fh = self._tar.extractfile(member)
        if fh is None:
            return
        try:
            while block := fh.read(chunk):
                yield block
        except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
            raise PackageError(f"{self.path}: cannot read {name!r}: truncated or corrupt ({exc})") from None

    def verify_hashes(self) -> None:
        """Every listed file present with its size and sha256; no unlisted member."""
        listed = set(self.manifest.files)
        present = set(self._members) - {MANIFEST_NAME, SIGNATURE_NAME}
        if present - listed:
            raise SecurityError(f"{self.path}: members not listed in the manifest: {sorted(present - listed)}")
        if listed - present:
            raise PackageError(f"{self.path}: files listed in the manifest are missing: {sorted(listed - present)}")
        for name, entry in self.manifest.files.items():
            h = hashlib.sha256()
            size = 0
            for block in self._stream(name):
                h.update(block)
                size += len(block)
            if size != entry.size or h.hexdigest() != entry.sha256:
                raise SecurityError(f"{self.path}: {name} does not match its sha256 in the manifest "
                                    f"(file was changed after signing)")

    def verify(self, public_keys: Iterable | None, *, allow_unsigned: bool = False) -> str | None:
        """Check the signature (unless allowed unsigned and no keys given), every file's hash, and that
        every file the manifest names is one of the package's own files."""
        signer = None
        keys = list(public_keys or [])
        if keys or not allow_unsigned:
            signer = verify_signature(self.manifest_bytes, self.signature_bytes, keys)
        self.verify_hashes()
        check_file_references(self.manifest, str(self.path))
        return signer

    def extract_to(self, dest: str | Path) -> Path:
        """Write every listed file under ``dest`` (which must not exist yet), never following links."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=False)
        root = dest.resolve()
        for name in [MANIFEST_NAME, SIGNATURE_NAME, *self.manifest.files]:
            if name not in self._members:
                continue
            target = (dest / name)
            if not target.resolve().is_relative_to(root):
                raise PackageError(f"{self.path}: member {name!r} would land outside the target folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as fh:
                for block in self._stream(name):
                    fh.write(block)
        return dest


def zlib_error():
    import zlib

    return zlib.error


def parse_manifest(data: bytes, source: str = "manifest") -> Manifest:
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{source}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise PackageError(f"{source}: manifest.json must be a JSON object")
    try:
        return Manifest.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top>"
        raise PackageError(f"{source}: invalid manifest at {loc}: {first['msg']}") from None


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of a package, without verifying it (for `inspect`)."""
    with PackageReader(path) as pkg:
        return pkg.manifest
