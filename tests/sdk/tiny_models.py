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


def _save(model, path: Path, opset: int = 17) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def stateful_model(path: Path) -> Path:
    """A streaming accumulator with the voice-activity model's layout: ``x`` float [N, 4], ``state`` float
    [2, N, 4] (batch on axis 1), ``sr`` int64 scalar -> ``y`` [N, 4] = (x + sum over axis 0 of state) * sr / 1000,
    ``stateN`` = state + x (each step adds its input: the output depends on every earlier step)."""
    w = numpy_helper.from_array(np.array([0], np.int64), "axis0")
    k = numpy_helper.from_array(np.array(1000.0, np.float32), "k")
    nodes = [
        helper.make_node("Unsqueeze", ["x", "axis0"], ["x3"]),
        helper.make_node("Add", ["state", "x3"], ["stateN"]),
        helper.make_node("ReduceSum", ["state", "axis0"], ["acc"], keepdims=0),
        helper.make_node("Add", ["x", "acc"], ["s"]),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "k"], ["scale"]),
        helper.make_node("Mul", ["s", "scale"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "accumulator",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", 4])], [w, k])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def min_length_model(path: Path, multiple_of: int | None = None) -> Path:
    """``x`` float [1, L] -> reflect-padded by 8 on each side (needs L > 8), summed: the shape of an STFT's
    padding. With ``multiple_of``, also reshaped to [-1, multiple_of] (only lengths that divide run)."""
    pads = numpy_helper.from_array(np.array([0, 8, 0, 8], np.int64), "pads")
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect")]
    inits = [pads]
    last = "p"
    if multiple_of:
        inits.append(numpy_helper.from_array(np.array([-1, multiple_of], np.int64), "shape"))
        nodes.append(helper.make_node("Slice", ["p", "s0", "s1", "ax"], ["core"]))
        inits += [numpy_helper.from_array(np.array([8], np.int64), "s0"),
                  numpy_helper.from_array(np.array([-8], np.int64), "s1"),
                  numpy_helper.from_array(np.array([1], np.int64), "ax")]
        nodes.append(helper.make_node("Reshape", ["core", "shape"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("ReduceSum", [last], ["y"], keepdims=1))
    graph = helper.make_graph(nodes, "min_length", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "L"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])], inits)
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def control_flow_model(path: Path) -> Path:
    """``x`` float [N, 8] and ``flag`` bool scalar: an If (then: x * 2, else: x - 1) whose result a Loop
    runs through 3 iterations of (v * 0.5 + MatMul(v, W)), then a Relu. Sub-graphs use outer-scope values."""
    rng = np.random.default_rng(3)
    wm = numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "W")
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    trips = numpy_helper.from_array(np.array(3, np.int64), "trips")
    cond = numpy_helper.from_array(np.array(True), "cond")
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    body = helper.make_graph(
        [helper.make_node("Mul", ["v_in", "half"], ["hv"]), helper.make_node("MatMul", ["v_in", "W"], ["mv"]),
         helper.make_node("Add", ["hv", "mv"], ["v_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["flag"], ["chosen"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trips", "cond", "chosen"], ["looped"], body=body),
             helper.make_node("Relu", ["looped"], ["y"])]
    graph = helper.make_graph(nodes, "control_flow",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                              [wm, two, one, half, trips, cond])
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
