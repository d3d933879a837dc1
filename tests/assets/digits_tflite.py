"""The digits CNN (digits/digits_cnn.onnx) as a LiteRT model, float32 and int8, for the `arm` profile's LiteRT
path on real weights.

Converting ONNX to TFLite needs TensorFlow, which cannot share the test environment; this graph is six
layer kinds, so :func:`float_tflite` writes the flatbuffer itself with LiteRT's own schema classes
(``ai_edge_litert.schema_py_generated``), weights copied from the ONNX file: NCHW -> NHWC for the
convolutions, and the first dense layer's columns permuted from (C,H,W) to (H,W,C) flatten order. Its
outputs equal the ONNX model's to float rounding (checked). :func:`int8_tflite` then quantizes it with
Google's ai-edge-quantizer (static int8 weights and activations, min/max calibration on the digits
calibration set): a real int8 TFLite model, the kind a LiteRT user ships.

The input stays ``images`` [1,1,8,8] (a RESHAPE to [1,8,8,1] is the first op: with one channel both
layouts hold the same bytes), so the digits .npz files feed it unchanged; the output is ``logits`` [1,10].
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import numpy as np


def _onnx_weights(onnx_path: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    w = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    gemms = [n for n in model.graph.node if n.op_type == "Gemm"]
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "Conv", "Relu", "MaxPool", "Conv", "Relu",
                                                     "MaxPool", "Flatten", "Gemm", "Relu", "Gemm"], \
        "digits_cnn.onnx changed shape; update tests/assets/digits_tflite.py"
    out = {}
    for i, n in enumerate(convs):
        out[f"conv{i}/w"] = np.ascontiguousarray(w[n.input[1]].transpose(0, 2, 3, 1))  # OIHW -> OHWI
        out[f"conv{i}/b"] = w[n.input[2]]
    fc0 = w[gemms[0].input[1]]  # [128, 256], columns in (C=64, H=2, W=2) order
    out["fc0/w"] = np.ascontiguousarray(fc0.reshape(-1, 64, 2, 2).transpose(0, 2, 3, 1).reshape(fc0.shape[0], -1))
    out["fc0/b"] = w[gemms[0].input[2]]
    out["fc1/w"] = w[gemms[1].input[1]]
    out["fc1/b"] = w[gemms[1].input[2]]
    return {k: v.astype(np.float32) for k, v in out.items()}


def float_tflite(onnx_path: Path, out: Path) -> Path:
    """Write the float32 TFLite twin of the digits CNN to ``out``."""
    from ai_edge_litert import schema_py_generated as s
    from ai_edge_litert.tools import flatbuffer_utils

    weights = _onnx_weights(onnx_path)
    model = s.ModelT()
    model.version = 3
    model.description = "digits CNN (edgeopt tests), converted from digits_cnn.onnx"
    model.buffers = [s.BufferT()]  # buffer 0: the empty sentinel
    sg = s.SubGraphT()
    sg.tensors, sg.operators = [], []
    model.operatorCodes = []
    codes: dict[int, int] = {}

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None, dtype=s.TensorType.FLOAT32) -> int:
        t = s.TensorT()
        t.name, t.shape, t.type = name.encode(), list(shape), dtype
        if data is not None:
            b = s.BufferT()
            b.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), np.uint8)
            model.buffers.append(b)
            t.buffer = len(model.buffers) - 1
        else:
            t.buffer = 0
        sg.tensors.append(t)
        return len(sg.tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int], options_type=0, options=None) -> None:
        if code not in codes:
            c = s.OperatorCodeT()
            c.builtinCode = code
            c.deprecatedBuiltinCode = min(code, 127)
            c.version = 1
            model.operatorCodes.append(c)
            codes[code] = len(model.operatorCodes) - 1
        o = s.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes[code], inputs, outputs
        o.builtinOptionsType, o.builtinOptions = options_type, options
        sg.operators.append(o)

    def reshape(src: int, shape: list[int], name: str) -> int:
        dst = tensor(name, shape)
        shp = tensor(name + "/shape", [len(shape)], np.asarray(shape, np.int32), s.TensorType.INT32)
        opts = s.ReshapeOptionsT()
        opts.newShape = list(shape)
        op(s.BuiltinOperator.RESHAPE, [src, shp], [dst], s.BuiltinOptions.ReshapeOptions, opts)
        return dst

    def conv(src: int, i: int, hw: int, cout: int) -> int:
        w, b = weights[f"conv{i}/w"], weights[f"conv{i}/b"]
        dst = tensor(f"conv{i}", [1, hw, hw, cout])
        opts = s.Conv2DOptionsT()
        opts.padding, opts.strideW, opts.strideH = s.Padding.SAME, 1, 1
        opts.dilationWFactor = opts.dilationHFactor = 1
        opts.fusedActivationFunction = s.ActivationFunctionType.RELU
        op(s.BuiltinOperator.CONV_2D, [src, tensor(f"conv{i}/w", list(w.shape), w), tensor(f"conv{i}/b", list(b.shape), b)],
           [dst], s.BuiltinOptions.Conv2DOptions, opts)
        return dst

    def pool(src: int, name: str, hw: int, c: int) -> int:
        dst = tensor(name, [1, hw, hw, c])
        opts = s.Pool2DOptionsT()
        opts.padding, opts.strideW, opts.strideH, opts.filterWidth, opts.filterHeight = s.Padding.VALID, 2, 2, 2, 2
        op(s.BuiltinOperator.MAX_POOL_2D, [src], [dst], s.BuiltinOptions.Pool2DOptions, opts)
        return dst

    def dense(src: int, name: str, relu: bool, out_name: str | None = None) -> int:
        w, b = weights[f"{name}/w"], weights[f"{name}/b"]
        dst = tensor(out_name or name, [1, w.shape[0]])
        opts = s.FullyConnectedOptionsT()
        opts.fusedActivationFunction = s.ActivationFunctionType.RELU if relu else s.ActivationFunctionType.NONE
        op(s.BuiltinOperator.FULLY_CONNECTED, [src, tensor(f"{name}/w", list(w.shape), w),
                                               tensor(f"{name}/b", list(b.shape), b)],
           [dst], s.BuiltinOptions.FullyConnectedOptions, opts)
        return dst

    images = tensor("images", [1, 1, 8, 8])
    x = reshape(images, [1, 8, 8, 1], "images_nhwc")
    x = conv(x, 0, 8, 16)
    x = conv(x, 1, 8, 32)
    x = pool(x, "pool0", 4, 32)
    x = conv(x, 2, 4, 64)
    x = pool(x, "pool1", 2, 64)
    x = reshape(x, [1, 256], "flatten")
    x = dense(x, "fc0", relu=True)
    logits = dense(x, "fc1", relu=False, out_name="logits")
    sg.inputs, sg.outputs, sg.name = [images], [logits], b"main"
    model.subgraphs = [sg]
    # ai-edge-quantizer reads models through their signature
    sig = s.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs, sig.outputs = [s.TensorMapT(), ], [s.TensorMapT()]
    sig.inputs[0].name, sig.inputs[0].tensorIndex = "images", images
    sig.outputs[0].name, sig.outputs[0].tensorIndex = "logits", logits
    model.signatureDefs = [sig]
    _atomic(out, lambda tmp: flatbuffer_utils.write_model(model, str(tmp)))
    return out


def int8_tflite(float_model: Path, calib_npz: Path, out: Path, samples: int = 64) -> Path:
    """Static int8 (weights and activations) with ai-edge-quantizer, calibrated on ``samples`` digits."""
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer, recipe

    images = np.load(calib_npz)["images"][:samples].astype(np.float32)
    qt = quantizer.Quantizer(str(float_model))
    qt.load_quantization_recipe(recipe.static_wi8_ai8())
    # float32 in and out (QUANTIZE / DEQUANTIZE at the edges), so clients and the held-out data stay float
    for io_op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT):
        qt.update_quantization_recipe(".*", io_op, algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE)
    with warnings.catch_warnings():
        # the calibrator keeps every intermediate tensor on purpose and warns that this is a debugging mode
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors", category=UserWarning)
        calibration = qt.calibrate({"serving_default": [{"images": images[i:i + 1]} for i in range(len(images))]})
        result = qt.quantize(calibration)
    _atomic(out, lambda tmp: Path(tmp).write_bytes(bytes(result.quantized_model)))
    return out


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
