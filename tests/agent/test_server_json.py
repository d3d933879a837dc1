"""JSON the protocol cannot carry, both ways, over real HTTP: requests nested absurdly deep are a 400 (they
were a 500 from RecursionError), and NaN/Inf outputs are never written as invalid JSON: binary output
carries them exactly (tritonclient's default), a JSON output holding them is a clear 422."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import InferenceServer, ModelRegistry


def _strict_json(data: bytes):
    """RFC 8259 JSON only: the bare words NaN/Infinity (Python's and Triton's extension) are refused."""
    def refuse(word):
        raise ValueError(f"{word} is not JSON")

    return json.loads(data, parse_constant=refuse)


@pytest.fixture(scope="module")
def log_model(tmp_path_factory):
    """A real ONNX model y = log(x): log(0) = -inf, log(-1) = NaN, log(inf) = inf."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("log-model") / "log.onnx"
    onnx.save(model, path)
    return path


@pytest.fixture
def server(digits_model, log_model):
    registry = ModelRegistry()
    cpu = "CPUExecutionProvider"
    registry.swap("digits", "1.0.0", get_runtime("onnxruntime").load(digits_model, device=cpu))
    registry.swap("log", "1", get_runtime("onnxruntime").load(log_model, device=cpu))
    srv = InferenceServer(registry, "127.0.0.1", 0).start()
    yield srv
    srv.stop()
    registry.close()


def _post(srv, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(*srv.address, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("body", [
    b"[" * 100_000 + b"]" * 100_000,
    b'{"inputs": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    b'{"inputs": [{"name": "images", "data": ' + b"[" * 100_000,  # deep and unterminated
])
def test_deeply_nested_json_is_400(server, body):
    status, out = _post(server, "/v2/models/digits/infer", body)
    assert status == 400
    assert _strict_json(out) == {"error": "request JSON nests deeper than 64 levels"}


def test_depth_check_ignores_brackets_inside_strings():
    from edgeopt.agent.kserve import ApiError, loads_bounded

    deep_text = '"' + "[" * 1000 + '\\"' + "{" * 1000 + '"'
    assert loads_bounded(f'{{"id": {deep_text}, "a": [[1]]}}'.encode())["a"] == [[1]]
    assert loads_bounded(b"[" * 64 + b"]" * 64) is not None  # exactly at the limit
    with pytest.raises(ApiError, match="nests deeper than 64 levels"):
        loads_bounded(b"[" * 65 + b"]" * 65)
    # many shallow brackets are fine, however many
    assert len(loads_bounded(b"[" + b",".join([b"[1]"] * 100_000) + b"]")) == 100_000


def test_nested_tensor_data_within_the_limit_is_served(server, digits_heldout):
    x = np.load(digits_heldout)["images"][:2]
    body = json.dumps({"inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                   "data": x.tolist()}]}).encode()  # nested 4 deep, 2*1*8 = 16 inner lists
    status, out = _post(server, "/v2/models/digits/infer", body)
    assert status == 200 and len(_strict_json(out)["outputs"][0]["data"]) == 20


_X = np.array([[0.0, -1.0, np.inf, 1.0]], np.float32)
_WANT = np.array([[-np.inf, np.nan, np.inf, 0.0]], np.float32)  # log of _X


def test_nan_output_as_json_is_a_clear_422_in_valid_json(server):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [0.0, -1.0, 1.0, 1.0]}]}).encode()
    status, out = _post(server, "/v2/models/log/infer", body)
    assert status == 422
    assert _strict_json(out) == {"error": "output 'y' holds NaN or infinite values, which JSON cannot carry; "
                                          "ask for it as binary data (parameters.binary_data: true)"}
    finite = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                     "data": [1.0, 2.0, 3.0, 4.0]}]}).encode()
    status, out = _post(server, "/v2/models/log/infer", finite)
    assert status == 200
    np.testing.assert_allclose(_strict_json(out)["outputs"][0]["data"], np.log([1, 2, 3, 4]), rtol=1e-6)


def test_json_input_out_of_the_datatype_range_is_400(server):
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                   "data": [0.0, -1.0, 1e39, 1.0]}]}).encode()  # 1e39 does not fit FP32
    status, out = _post(server, "/v2/models/log/infer", body)
    assert status == 400
    assert _strict_json(out) == {"error": "input 'x': data is not a list of FP32 values "
                                          "(overflow encountered in cast)"}


def test_tritonclient_gets_nan_and_inf_exactly_as_binary_and_a_clear_error_as_json(server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient("%s:%d" % server.address)
    try:
        inp = httpclient.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(_X, binary_data=True)
        result = client.infer("log", [inp])  # tritonclient asks for binary outputs by default
        np.testing.assert_array_equal(result.as_numpy("y"), _WANT)  # NaN == NaN here
        out = httpclient.InferRequestedOutput("y", binary_data=True)
        np.testing.assert_array_equal(client.infer("log", [inp], outputs=[out]).as_numpy("y"), _WANT)
        as_json = httpclient.InferRequestedOutput("y", binary_data=False)
        with pytest.raises(InferenceServerException, match=r"output 'y' holds NaN or infinite values, which JSON "
                                                           r"cannot carry; ask for it as binary data"):
            client.infer("log", [inp], outputs=[as_json])
    finally:
        client.close()
