"""Load an installed package with the runtime its manifest names, warm it up and self-test it.

Golden samples (``golden.npz``, described by ``manifest.golden``) are written by the SDK
(``edgeopt.sdk.pipeline.golden``): keys ``input/<i>/<tensor name>`` and ``output/<i>/<tensor name>`` for
sample ``i``, each array fed or compared as is. A sample passes when every output is within
``atol + rtol * |expected|`` elementwise or has cosine >= ``min_cosine`` to the expected one (the SDK's
rule: another device's kernels differ slightly). This module reads that layout itself rather than
importing the SDK pipeline, and imports no ML runtime at import time.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import numpy as np

from ..sdk.errors import AccuracyError, PackageError
from ..sdk.package import Manifest, TensorSpec
from .config import AgentConfig
from .runtimes import LoadedModel, get_runtime
from .store import CRASHES_BEFORE_SKIP, InstalledModel, crash_point

log = logging.getLogger(__name__)
T = TypeVar("T")


def write_golden(path: str | Path, inputs: Sequence[Mapping[str, np.ndarray]],
                 outputs: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """Write golden samples in the SDK's layout: one dict of input and one of output arrays per sample."""
    if not inputs or len(inputs) != len(outputs):
        raise ValueError("golden samples need as many output dicts as input dicts (at least one)")
    arrays: dict[str, np.ndarray] = {}
    for i, (feed, out) in enumerate(zip(inputs, outputs)):
        arrays.update({f"input/{i}/{k}": np.asarray(v) for k, v in feed.items()})
        arrays.update({f"output/{i}/{k}": np.asarray(v) for k, v in out.items()})
    path = Path(path)
    with open(path, "wb") as fh:  # np.savez on a path would append ".npz" to other names
        np.savez_compressed(fh, **arrays)
    return path


def read_golden(path: str | Path) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """The samples of a golden file as (inputs, outputs) lists of per-sample dicts."""
    name = Path(path).name
    samples: dict[int, tuple[dict, dict]] = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for key in data.files:
                kind, _, rest = key.partition("/")
                index, _, tensor = rest.partition("/")
                if kind not in ("input", "output") or not index.isdigit() or not tensor:
                    raise PackageError(f"golden samples {name}: unexpected key {key!r} "
                                       f"(expected input/<i>/<tensor> or output/<i>/<tensor>)")
                pair = samples.setdefault(int(index), ({}, {}))
                (pair[0] if kind == "input" else pair[1])[tensor] = data[key]
    except (OSError, ValueError) as exc:
        raise PackageError(f"golden samples {name} are unreadable: {exc}") from None
    if not samples or any(not ins or not outs for ins, outs in samples.values()):
        raise PackageError(f"golden samples {name} need inputs and outputs for every sample")
    order = sorted(samples)
    return [samples[i][0] for i in order], [samples[i][1] for i in order]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def self_test(loaded: LoadedModel, package_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """Run the golden samples and compare within the manifest's tolerance; raise AccuracyError if not.

    Every output of every sample must be ``allclose(atol, rtol)`` to the expected one or have cosine >=
    ``min_cosine`` (the rule the SDK documents in ``edgeopt.sdk.pipeline.golden``).
    """
    if getattr(loaded, "task", None) == "text-generation":  # golden prompts and their greedy answers
        return loaded.self_test(list(manifest.text.golden) if manifest.text else [])
    spec = manifest.golden
    if spec is None:
        return {"samples": 0, "skipped": "the package has no golden samples"}
    inputs, outputs = read_golden(package_dir / spec.file)
    worst_abs, worst_cos = 0.0, 1.0
    for i, (feeds, expected) in enumerate(zip(inputs, outputs)):
        got = loaded.infer(feeds)
        for name, want in expected.items():
            if name not in got:
                raise AccuracyError(f"self-test: the model has no output {name!r} named in the golden samples")
            have = np.asarray(got[name])
            if have.shape != want.shape:
                raise AccuracyError(f"self-test sample {i}, output {name!r}: shape {list(have.shape)}, "
                                    f"expected {list(want.shape)}")
            abs_err = float(np.max(np.abs(have.astype(np.float64) - want.astype(np.float64)))) if have.size else 0.0
            cos = _cosine(have, want)
            worst_abs, worst_cos = max(worst_abs, abs_err), min(worst_cos, cos)
            if not np.allclose(have, want, atol=spec.atol, rtol=spec.rtol) and cos < spec.min_cosine:
                shown = f"{cos:.6f}"
                if float(shown) >= spec.min_cosine:  # never print "1.000000 (min 1)" for a failing cosine
                    shown = repr(cos)
                raise AccuracyError(
                    f"self-test failed on golden sample {i}, output {name!r}: max abs error {abs_err:.3g} "
                    f"(atol {spec.atol:g}, rtol {spec.rtol:g}), cosine {shown} (min {spec.min_cosine:g})",
                    hint="this device computes different results than the package's builder; not switched")
    return {"samples": len(inputs), "max_abs_error": worst_abs, "min_cosine": worst_cos}


# --------------------------------------------------------------------------- loading


def _threads(profile: dict[str, Any]) -> int | None:
    policy = (profile.get("threads") or {}).get("policy", "auto")
    if policy == "fixed":
        return int(profile["threads"]["count"])
    if policy == "physical-cores":
        try:
            import psutil

            return psutil.cpu_count(logical=False) or os.cpu_count()
        except ImportError:
            return os.cpu_count()
    return None  # the runtime's own default


def _runtime_block(manifest: Manifest) -> dict[str, Any]:
    for block in (manifest.profile or {}).get("runtimes") or []:
        if isinstance(block, dict) and block.get("runtime") == manifest.runtime:
            return block
    return {}


def load_options(manifest: Manifest, cache_root: Path) -> dict[str, Any]:
    """Keyword arguments for ``Runtime.load`` from the manifest and its profile."""
    profile = manifest.profile or {}
    block = _runtime_block(manifest)
    kwargs: dict[str, Any] = {
        "device": manifest.device,
        "threads": _threads(profile),
        "performance_hint": str(profile.get("performance_hint", "latency")),
        "options": {},
    }
    if manifest.runtime == "openvino":
        if block.get("model_cache", True):
            # Compiled blobs survive restarts: the second start of the same package skips compilation.
            kwargs["cache_dir"] = cache_root / "openvino"
        # The precision the package was validated at (e.g. INFERENCE_PRECISION_HINT=f32): without it, OpenVINO
        # runs float parts in bf16 on CPUs that have it, and the golden self-test can fail.
        kwargs["options"] = dict(manifest.runtime_options or {})
    if manifest.runtime == "onnxruntime":
        kwargs["options"] = {"providers": [manifest.device],
                             "graph_optimization_level": block.get("graph_optimization_level", "all"),
                             "intra_op_spinning": block.get("intra_op_spinning") is True}
        # The GPU path (hardware_profiles/gpu.toml): fixed batch sizes in device buffers, CUDA graphs, NHWC,
        # cuDNN's algorithm search. Absent keys keep ONNX Runtime's behaviour of earlier packages.
        for key in ("batch_sizes", "cuda_graph", "prefer_nhwc", "cudnn_conv_algo_search"):
            if key in block:
                kwargs["options"][key] = block[key]
    if manifest.runtime == "openvino-genai":
        # A language model: the validated KV cache and compute precisions, the profile's KV cache budget.
        text = manifest.text
        kwargs["options"] = {"runtime_options": dict(manifest.runtime_options or {}),
                             "kv_cache_gb": ((profile.get("llm") or {}).get("kv_cache_gb")),
                             "context_length": text.context_length if text else 0,
                             "eos_token_id": text.eos_token_id if text else None,
                             "name": manifest.name, "version": manifest.version}
    if manifest.runtime == "torch-aoti":
        # The batch sizes are the package's own (aoti-io.json); whether to replay CUDA graphs is the profile's.
        kwargs["options"] = {"cuda_graph": block.get("cuda_graph", True) is True}
    return kwargs


def load_installed(installed: InstalledModel, config: AgentConfig) -> LoadedModel:
    """Load the installed package with its manifest's runtime and device (no fallback to another device)."""
    manifest = installed.manifest
    model_path = installed.path / manifest.model_file
    if not model_path.is_file():
        raise PackageError(f"{installed.name} {installed.version}: model file {manifest.model_file} is missing")
    runtime = get_runtime(manifest.runtime)
    kwargs = load_options(manifest, Path(config.state_dir) / "cache")
    if manifest.runtime == "openvino-genai":
        kwargs["options"]["serving"] = config.text_generation.model_dump()
    log.info("loading %s %s with %s on %s (threads %s)", installed.name, installed.version, manifest.runtime,
             manifest.device, kwargs["threads"] or "auto")
    return runtime.load(model_path, **kwargs)


def placement_check(loaded: LoadedModel, manifest: Manifest) -> dict[str, Any] | None:
    """Compare what the runtime did with the graph (``LoadedModel.placement()``) with the manifest's device,
    precision and float layers (:func:`edgeopt.sdk.placement.check`). None where the runtime does not say.
    The result's ``strict`` is the profile's ``placement`` policy."""
    from ..sdk.errors import UnsupportedError
    from ..sdk.placement import check

    try:
        observed = loaded.placement()
    except UnsupportedError as exc:
        return {"ok": True, "checked": False, "message": f"placement not checked: {exc.one_line()}"}
    if observed is None:
        return None
    float_layers = list(manifest.validation.float_layers) if manifest.validation else []
    report = check(observed, device=manifest.device, precision=manifest.precision, float_layers=float_layers)
    out = report.to_dict()
    out["checked"] = True
    out["strict"] = (manifest.profile or {}).get("placement") == "strict"
    return out


def _zeros_for(spec: TensorSpec) -> np.ndarray:
    shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
    return np.zeros(shape, dtype=np.dtype(spec.dtype))


def warm_up(loaded: LoadedModel, runs: int = 2, package_dir: Path | None = None,
            manifest: Manifest | None = None) -> None:
    """A few inferences, so the first real request does not pay for lazy initialisation: on the package's first
    golden input when it has one (its shapes are ones the model runs: a voice-activity model refuses a
    1-sample input), else on zeros with dynamic dims set to 1."""
    if getattr(loaded, "task", None) == "text-generation":
        loaded.warm_up()
        return
    feeds = None
    if package_dir is not None and manifest is not None and manifest.golden is not None:
        try:
            inputs, _ = read_golden(Path(package_dir) / manifest.golden.file)
            feeds = inputs[0] if inputs else None
        except Exception:  # the self-test reports an unreadable golden file with its own message
            log.debug("golden samples unreadable for the warm-up", exc_info=True)
    if feeds is None:
        feeds = {spec.name: _zeros_for(spec) for spec in loaded.inputs}
    for _ in range(runs):
        loaded.infer(feeds)


def skipped_at_start(store, name: str, version: str) -> str | None:
    """Why ``version`` of ``name`` must not be loaded by this process (its load killed the agent at the last
    CRASHES_BEFORE_SKIP starts), or None."""
    crashes = store.load_crashes(name, version)
    if crashes < CRASHES_BEFORE_SKIP:
        return None
    return (f"not loaded: the agent died while loading it at its last {crashes} starts (a crash in the runtime's "
            f"native code?); install a newer version, or delete {store.load_guard_path} to try it again")


def guarded_load(store, name: str, version: str, load: Callable[[], T]) -> T:
    """``load()`` with the start-up crash guard around it: marked before and cleared after, so a process that
    dies in between (a native crash) leaves the mark, and the next start counts it
    (Store.note_unfinished_load). Every load of an installed version the daemon makes goes through here."""
    store.begin_load(name, version)
    crash_point(f"start_load {name} {version}")
    loaded_ok = False
    try:
        result = load()
        loaded_ok = True
        return result
    finally:
        store.end_load(name, version, loaded_ok)


def load_serving(store, config: AgentConfig, on_event=None, *,
                 recover: bool = True) -> dict[str, tuple[InstalledModel, LoadedModel]]:
    """At daemon start: recover the store (unless the caller did), then load and warm up every model's current
    version.

    A current version that no longer loads (a runtime was removed, a device vanished) falls back to the
    previous version for this run, with an ``error`` event; the pointer is left alone so a fixed host
    serves the newer version again at the next start. A version whose load killed the agent at its last two
    starts is skipped the same way (:func:`skipped_at_start`).
    """
    if recover:
        store.recover()
    store.note_unfinished_load()
    serving: dict[str, tuple[InstalledModel, LoadedModel]] = {}
    for name, installed in store.installed().items():
        candidates = [installed]
        if installed.previous_version and installed.previous_version in store.versions(name):
            prev = store.read_manifest(name, installed.previous_version)
            candidates.append(InstalledModel(name=name, version=installed.previous_version,
                                             path=store.package_dir(name, installed.previous_version),
                                             manifest=prev, previous_version=None))
        for candidate in candidates:
            skip = skipped_at_start(store, name, candidate.version)
            if skip is not None:
                log.error("%s %s %s", name, candidate.version, skip)
                if on_event is not None:
                    on_event({"event": "error", "ok": False, "model": name, "version": candidate.version,
                              "from_version": None, "message": skip, "command_id": None, "deployment_id": None,
                              "details": {"stage": "start",
                                          "crashes": store.load_crashes(name, candidate.version)}})
                continue

            def load(candidate=candidate) -> LoadedModel:
                loaded = load_installed(candidate, config)
                report = placement_check(loaded, candidate.manifest)
                if report is not None and on_event is not None and not report["ok"]:
                    # At start a mismatch is reported, never refused: the device keeps serving what it has.
                    on_event({"event": "placement", "ok": False, "model": name, "version": candidate.version,
                              "from_version": None, "message": report["message"], "command_id": None,
                              "deployment_id": None, "details": report})
                warm_up(loaded, package_dir=candidate.path, manifest=candidate.manifest)
                return loaded

            try:
                serving[name] = (candidate, guarded_load(store, name, candidate.version, load))
                break
            except Exception as exc:  # noqa: BLE001 - reported as an event, then the next candidate
                message = exc.one_line() if hasattr(exc, "one_line") else f"{type(exc).__name__}: {exc}"
                log.error("cannot load %s %s: %s", name, candidate.version, message)
                if on_event is not None:
                    on_event({"event": "error", "ok": False, "model": name, "version": candidate.version,
                              "from_version": None, "message": f"cannot load at start: {message}",
                              "command_id": None, "deployment_id": None, "details": {"stage": "start"}})
    return serving
