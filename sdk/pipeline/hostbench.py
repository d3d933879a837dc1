"""Benchmark an existing package on this host (``edgeopt bench``)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..package import PackageReader, load_public_key
from . import benchmark
from .golden import GOLDEN_FILE, read_golden

_CPU = {"openvino": "CPU", "onnxruntime": "CPUExecutionProvider", "tflite": "CPU"}


def verified_extract(path: str | Path, dest: Path, public_keys: list | None = None):
    """(manifest, extracted folder, signer key id or None): hashes always verified, the signature too when
    keys are given."""
    with PackageReader(path) as pkg:
        if public_keys:
            signer = pkg.verify([load_public_key(k) for k in public_keys])
        else:
            pkg.verify_hashes()
            signer = None
        return pkg.manifest, pkg.extract_to(dest), signer


def open_package(path: str | Path, tmp: Path, public_keys: list | None = None) -> dict[str, Any]:
    """Verify hashes (and the signature when keys are given), extract into ``tmp`` and work out how to load
    the package here: ``manifest``, ``root``, ``runtime`` class, ``device``, ``proxy``, ``load_kwargs``.

    A device this host lacks is replaced by the host CPU, and ``proxy`` says so.
    """
    from ...agent.runtimes import get_runtime

    m, root, signer = verified_extract(path, tmp / "pkg", public_keys)
    runtime = get_runtime(m.runtime)
    devices = runtime.devices()
    proxy = m.device not in devices
    device = _CPU.get(m.runtime, "CPU") if proxy else m.device
    threads = m.benchmark.threads if m.benchmark else None
    hint = str(m.profile.get("performance_hint", "latency"))
    options = dict(getattr(m, "runtime_options", None) or {}) if device in ("CPU", m.device) else {}
    if m.runtime == "openvino" and device == "CPU" and proxy and m.precision != "fp16":
        options.setdefault("INFERENCE_PRECISION_HINT", "f32")  # as the SDK validated it on the host
    where = (f"measured on the host CPU as a proxy: the package targets {m.device}, which this host does not "
             f"have (available: {', '.join(devices)})" if proxy else f"measured on {device} of this host")
    return {"manifest": m, "root": root, "runtime": runtime, "device": device, "proxy": proxy, "signer": signer,
            "threads": threads, "where": where,
            "load_kwargs": {"device": device, "threads": threads, "performance_hint": hint,
                            "options": options or None}}


def bench_package(path: str | Path, *, iterations: int = 200, batch_size: int | None = None, warmup: int = 5,
                  public_keys: list | None = None) -> dict[str, Any]:
    """Verify hashes (and the signature when keys are given), load with the package's runtime, measure.

    A device this host lacks is replaced by the host CPU, and the result says so (``host_proxy``).
    """
    tmp = Path(tempfile.mkdtemp(prefix="edgeopt-bench-"))
    try:
        opened = open_package(path, tmp, public_keys)
        m, root, runtime, device = opened["manifest"], opened["root"], opened["runtime"], opened["device"]
        loaded = runtime.load(root / m.model_file, **opened["load_kwargs"])
        try:
            feeds, batch = bench_feeds(root, m, loaded, batch_size)
            stats = benchmark.measure({"pkg": loaded}, {"pkg": feeds}, batch, iterations, warmup=warmup, rounds=1,
                                      runtimes={"pkg": m.runtime})["pkg"]
        finally:
            loaded.close()
        return {"name": m.name, "version": m.version, "runtime": m.runtime, "runtime_version": runtime.version(),
                "precision": m.precision, "target_device": m.device, "run_device": device,
                "host_proxy": opened["proxy"], "batch_size": batch, "threads": opened["threads"],
                "latency": stats.model_dump(mode="json"), "machine": benchmark.machine(), "where": opened["where"],
                "signer_key_id": opened["signer"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_feeds(root: Path, manifest, loaded, batch_size: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """Inputs at the benchmark batch (the package's profile batch unless the model's batch dim is fixed)."""
    feeds = _feeds(root, manifest, loaded)
    first = loaded.inputs[0].shape[0] if loaded.inputs and loaded.inputs[0].shape else 1
    static = isinstance(first, int)
    batch = batch_size or int(manifest.profile.get("batch_size", 1))
    if static and batch != first:
        batch = first  # a fixed batch dim cannot change at run time
    return benchmark.batch_feeds(feeds, batch, static_batch=static), batch


def _feeds(root: Path, manifest, loaded) -> dict[str, np.ndarray]:
    """The first golden sample's inputs; random inputs of the right shape when there are none."""
    if manifest.golden and (root / GOLDEN_FILE).is_file():
        samples = read_golden((root / GOLDEN_FILE).read_bytes())
        if samples:
            return samples[0][0]
    rng = np.random.default_rng(0)
    out = {}
    for spec in loaded.inputs:
        shape = [d if isinstance(d, int) else 1 for d in spec.shape]
        out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out
