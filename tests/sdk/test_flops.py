"""FLOP counting against hand-computed MACs on small graphs."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeopt.sdk.errors import InputError
from edgeopt.sdk.flops import count_file, count_model


def _model(nodes, inputs, outputs, inits=(), opset=13):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _w(name, shape, dtype=np.float32):
    return numpy_helper.from_array(np.zeros(shape, dtype=dtype), name)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_conv_with_stride_padding_and_groups():
    # x [1,8,10,10]; conv 16 out, 3x3, stride 2, pad 1, group 2 -> y [1,16,5,5]
    # MACs = N*M*Ho*Wo * (C/group)*kh*kw = 1*16*25 * 4*9 = 14400
    conv = helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], group=2)
    m = _model([conv], [_vi("x", [1, 8, 10, 10])], [_vi("y", None)], [_w("w", [16, 4, 3, 3])])
    c = count_model(m)
    assert c.macs == 14400
    assert c.flops == 28800
    assert c.by_op_type == {"Conv": 14400}


def test_depthwise_conv_and_dynamic_batch():
    # depthwise: 32 channels, group 32, 3x3, same padding on 7x7 -> MACs = 32*49*9 per sample
    conv = helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], group=32)
    m = _model([conv], [_vi("x", ["N", 32, 7, 7])], [_vi("y", None)], [_w("w", [32, 1, 3, 3])])
    assert count_model(m).macs == 32 * 49 * 9
    assert count_model(m, batch=4).macs == 4 * 32 * 49 * 9
    assert count_model(m, input_shapes={"x": [2, 32, 7, 7]}).macs == 2 * 32 * 49 * 9


def test_gemm_transposed_and_batched_matmul_broadcast():
    # Gemm: A [3,5], B^T stored as [7,5] -> M=3, K=5, N=7 -> 105 MACs
    gemm = helper.make_node("Gemm", ["a", "b"], ["g"], transB=1)
    # MatMul: [2,4,3,5] x [5,6] -> batch 8, 3x6 outputs of K=5 -> 8*3*6*5 = 720
    mm = helper.make_node("MatMul", ["c", "d"], ["h"])
    m = _model([gemm, mm], [_vi("a", [3, 5]), _vi("c", [2, 4, 3, 5])], [_vi("g", None), _vi("h", None)],
               [_w("b", [7, 5]), _w("d", [5, 6])])
    c = count_model(m)
    assert c.by_op_type == {"Gemm": 105, "MatMul": 720}
    assert c.macs == 825


def test_quantized_ops_count_like_their_float_forms():
    # QLinearConv: x [1,3,8,8] uint8, w [4,3,3,3] int8, no padding -> y [1,4,6,6]: 4*36*27 = 3888
    qconv = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"])
    # MatMulInteger: [4,16] x [16,8] -> 512 MACs
    mmi = helper.make_node("MatMulInteger", ["a", "b"], ["z"])
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), n) for n in ("xs", "ws", "ys")]
    inits += [numpy_helper.from_array(np.array(0, np.uint8), n) for n in ("xz", "yz")]
    inits += [numpy_helper.from_array(np.array(0, np.int8), "wz"), _w("w", [4, 3, 3, 3], np.int8),
              _w("b", [16, 8], np.int8)]
    m = _model([qconv, mmi], [_vi("x", [1, 3, 8, 8], TensorProto.UINT8), _vi("a", [4, 16], TensorProto.UINT8)],
               [_vi("y", None, TensorProto.UINT8), _vi("z", None, TensorProto.INT32)], inits)
    c = count_model(m)
    assert c.by_op_type == {"QLinearConv": 3888, "MatMulInteger": 512}


def test_qdq_conv_counts_through_dequantize_linear():
    dq = helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"])
    conv = helper.make_node("Conv", ["x", "w"], ["y"])
    inits = [_w("wq", [2, 1, 2, 2], np.int8), numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    m = _model([dq, conv], [_vi("x", [1, 1, 3, 3])], [_vi("y", None)], inits)
    assert count_model(m).macs == 2 * 4 * 4  # y [1,2,2,2], 4 MACs each


def test_conv_transpose():
    # x [1,4,5,5], w [4,2,3,3] (C_in, M, k, k): each input pixel scatters 2*9 MACs -> 4*25*18 = 1800
    ct = helper.make_node("ConvTranspose", ["x", "w"], ["y"])
    m = _model([ct], [_vi("x", [1, 4, 5, 5])], [_vi("y", None)], [_w("w", [4, 2, 3, 3])])
    assert count_model(m).macs == 1800


def test_digits_model_file(digits_model):
    c = count_file(digits_model)
    assert c.macs > 0 and not c.uncounted
    assert set(c.by_op_type) <= {"Conv", "Gemm", "MatMul"}
    assert c.achieved_gflops(1.0) == pytest.approx(c.flops / 1e-3 / 1e9)


def test_bad_files_one_line(tmp_path):
    with pytest.raises(InputError) as exc:
        count_file(tmp_path / "nope.onnx")
    assert exc.value.one_line() == f"{tmp_path / 'nope.onnx'}: model file not found"
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00not a model at all")
    with pytest.raises(InputError) as exc:
        count_file(bad)
    assert exc.value.one_line().startswith(f"{bad}: not a readable ONNX model")
    m = _model([], [_vi("x", [1, 2])], [_vi("x", [1, 2])])
    with pytest.raises(InputError) as exc:
        count_model(m, input_shapes={"x": [1, 2, 3]})
    assert exc.value.one_line() == "input shape for 'x' has 3 dims, the model has 2"
