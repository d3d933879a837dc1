"""Small ONNX models built with onnx.helper for unit tests (no files committed, no training)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_cnn(path: Path, *, opset: int = 17, batch="N", seed: int = 0, classes: int = 10, size: int = 8,
             input_name: str = "input") -> Path:
    """Conv(3x3, 8) -> Relu -> Conv(3x3, 8) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(classes).

    Weights are random but scaled so outputs are well spread (top-1 is meaningful)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((8, 1, 3, 3)) * 0.5).astype(np.float32)
    b1 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32)
    b2 = (rng.standard_normal(8) * 0.1).astype(np.float32)
    w3 = (rng.standard_normal((classes, 8)) * 1.0).astype(np.float32)
    b3 = np.zeros(classes, np.float32)
    nodes = [
        helper.make_node("Conv", [input_name, "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "w3", "b3"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_cnn",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgeopt-tests")
    model.ir_version = 7 if opset <= 13 else 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def calib_npz(path: Path, n: int = 40, size: int = 8, seed: int = 1, name: str = "input", labels_from=None) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, size, size), dtype=np.float32)
    arrays = {name: x}
    if labels_from is not None:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(labels_from), providers=["CPUExecutionProvider"])
        arrays["labels"] = sess.run(None, {name: x})[0].argmax(1)
    np.savez(path, **arrays)
    return path


def custom_op_model(path: Path) -> Path:
    """A model with an op from a domain no runtime knows."""
    node = helper.make_node("FancyOp", ["x"], ["y"], domain="com.example", name="fancy")
    graph = helper.make_graph([node], "custom", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
