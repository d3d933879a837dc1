"""The peak probe: its GEMM models compute the right thing, and the figures come back well-formed."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
from onnx import numpy_helper

from edgeopt.sdk.peak import _matmul_model, measure_peak


def _run(int8: bool, n: int = 16):
    import onnx

    blob = _matmul_model(n, int8)
    b = numpy_helper.to_array(onnx.load_from_string(blob).graph.initializer[0])
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (n, n), dtype=np.uint8) if int8 else rng.standard_normal((n, n)).astype(np.float32)
    return a, b, sess.run(None, {"A": a})[0]


def test_probe_models_compute_the_gemm():
    a, b, y = _run(int8=True)
    assert y.dtype == np.int32 and b.dtype == np.int8
    np.testing.assert_array_equal(y, a.astype(np.int32) @ b.astype(np.int32))
    a, b, y = _run(int8=False)
    np.testing.assert_allclose(y, a @ b, rtol=1e-4, atol=1e-4)


def test_measure_peak_reports_every_figure():
    p = measure_peak(size=64, seconds=0.01, threads=1)
    d = p.to_dict()
    for key in ("fp32_gops_1t", "int8_gops_1t", "fp32_gops_all", "int8_gops_all"):
        assert d[key] > 0
    assert d["threads_all"] == 1 and d["size"] == 64
    assert d["runtime"].startswith("onnxruntime ")
    assert d["int8_over_fp32_1t"] == round(p.int8_gops_1t / p.fp32_gops_1t, 3)
