"""Measure this machine's fp32 and int8 peak arithmetic rate, to put a model's achieved GFLOP/s in context.

The probe is one large matrix multiply through ONNX Runtime (MLAS kernels): ``MatMul`` in fp32 and
``MatMulInteger`` (uint8 x int8 -> int32) for int8, once on one thread and once on all cores. A GEMM of
this size runs close to the cores' arithmetic peak, so the figures are "what a well-tuned kernel reaches
here", which is the fair ceiling for a network made of convolutions and GEMMs. Ops = 2 x M x N x K.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from .errors import missing_extra

log = logging.getLogger(__name__)


@dataclass
class PeakFigures:
    """Peak GOP/s measured here (fastest of repeats)."""

    fp32_gops_1t: float
    int8_gops_1t: float
    fp32_gops_all: float
    int8_gops_all: float
    threads_all: int
    size: int  # M = N = K of the probe GEMM
    runtime: str
    machine: str

    @property
    def int8_over_fp32(self) -> float:
        return self.int8_gops_1t / self.fp32_gops_1t if self.fp32_gops_1t else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["int8_over_fp32_1t"] = round(self.int8_over_fp32, 3)
        return out


def _matmul_model(n: int, int8: bool):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        # 7-bit weights: exact on every x86 CPU (without VNNI, u8s8 kernels saturate full-range 16-bit sums;
        # edgeopt.sdk.cpu); the rate does not depend on the values.
        b = numpy_helper.from_array(rng.integers(-64, 64, size=(n, n), dtype=np.int8), "B")
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        b = numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "B")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
        a_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "peak", [helper.make_tensor_value_info("A", a_type, [n, n])],
                              [helper.make_tensor_value_info("Y", y_type, [n, n])], initializer=[b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8).SerializeToString()


def _rate(n: int, int8: bool, threads: int, seconds: float) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(_matmul_model(n, int8), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    a = (rng.integers(0, 256, size=(n, n), dtype=np.uint8) if int8
         else rng.standard_normal((n, n)).astype(np.float32))
    feeds = {"A": a}
    for _ in range(3):  # warm-up: page in weights, spin up the thread pool
        sess.run(None, feeds)
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    # A peak is what the cores reach undisturbed: on a shared machine the fastest repeat is the one other
    # processes interfered with least, so report it rather than a median or mean.
    return 2.0 * n ** 3 / min(times) / 1e9


def measure_peak(*, size: int = 1024, seconds: float = 1.0, threads: int | None = None) -> PeakFigures:
    """fp32 and int8 GOP/s of a ``size``-cube GEMM on one thread and on ``threads`` (default: all cores)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
    except ImportError as exc:
        raise missing_extra(exc.name or "onnxruntime", "sdk") from None
    all_threads = threads or os.cpu_count() or 1
    figures = PeakFigures(
        fp32_gops_1t=_rate(size, False, 1, seconds), int8_gops_1t=_rate(size, True, 1, seconds),
        fp32_gops_all=_rate(size, False, all_threads, seconds), int8_gops_all=_rate(size, True, all_threads, seconds),
        threads_all=all_threads, size=size, runtime=f"onnxruntime {ort.__version__}",
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
    )
    log.info("peak: %s", figures.to_dict())
    return figures
