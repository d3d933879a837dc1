"""Stage 7, golden samples: a few held-out inputs with the optimized model's outputs, for the agent's
self-test after install.

``golden.npz`` layout: ``input/<i>/<tensor name>`` and ``output/<i>/<tensor name>`` for i = 0..count-1.
A device passes when every output has cosine >= ``min_cosine`` to the expected one, or is within
``atol`` + ``rtol`` * |expected| elementwise (``numpy.allclose``).
"""
from __future__ import annotations

import io

import numpy as np

from ..package import GoldenSpec

GOLDEN_FILE = "golden.npz"


def golden_key(kind: str, index: int, name: str) -> str:
    return f"{kind}/{index}/{name}"


def make_golden(inputs: list[dict], outputs: list[dict], max_abs_error: float, min_cosine: float) -> tuple[bytes, GoldenSpec]:
    """The golden.npz bytes and the manifest's GoldenSpec."""
    arrays = {}
    for i, (feed, out) in enumerate(zip(inputs, outputs)):
        for name, arr in feed.items():
            arrays[golden_key("input", i, name)] = np.asarray(arr)
        for name, arr in out.items():
            arrays[golden_key("output", i, name)] = np.asarray(arr)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    # Another device computes slightly differently (other kernels, fp16 on a GPU/NPU): allow the error the
    # optimized model already shows against fp32, with a floor for tiny outputs.
    atol = float(max(2.0 * max_abs_error, 1e-4))
    return buf.getvalue(), GoldenSpec(file=GOLDEN_FILE, count=len(inputs), atol=atol, rtol=1e-2,
                                      min_cosine=float(min(min_cosine, 0.999)))


def read_golden(data: bytes) -> list[tuple[dict, dict]]:
    """Inverse of make_golden: [(inputs, expected outputs)]."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        samples: dict[int, tuple[dict, dict]] = {}
        for key in npz.files:
            kind, index, name = key.split("/", 2)
            pair = samples.setdefault(int(index), ({}, {}))
            (pair[0] if kind == "input" else pair[1])[name] = npz[key]
    return [samples[i] for i in sorted(samples)]
