"""The Open Inference Protocol codec on its own: request decoding, checks and response encoding."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgeopt.agent.kserve import (ApiError, check_requested_outputs, encode_infer_response, parse_infer_request,
                                  protocol_shape, tensor_metadata)
from edgeopt.sdk.package import TensorSpec

SPECS = [TensorSpec(name="ids", dtype="int64", shape=["batch", 4]),
         TensorSpec(name="mask", dtype="bool", shape=["batch", 4])]
OUTS = [TensorSpec(name="score", dtype="float16", shape=["batch"])]


def _doc(**overrides):
    doc = {"inputs": [{"name": "ids", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]},
                      {"name": "mask", "shape": [1, 4], "datatype": "BOOL", "data": [True, False, True, True]}]}
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_metadata_names_and_dynamic_dims():
    assert tensor_metadata(SPECS[0]) == {"name": "ids", "datatype": "INT64", "shape": [-1, 4]}
    assert protocol_shape(TensorSpec(name="x", dtype="float32", shape=[1, "h", 3])) == [1, -1, 3]


def test_json_inputs_of_several_dtypes():
    req = parse_infer_request(_doc(id="abc"), None, SPECS)
    assert req.id == "abc" and req.batch == 1
    assert req.inputs["ids"].dtype == np.int64 and req.inputs["mask"].dtype == np.bool_
    np.testing.assert_array_equal(req.inputs["mask"], [[True, False, True, True]])


def test_nested_json_data_is_accepted():
    doc = json.loads(_doc())
    doc["inputs"][0]["data"] = [[1, 2, 3, 4]]
    req = parse_infer_request(json.dumps(doc).encode(), None, SPECS)
    assert req.inputs["ids"].shape == (1, 4)


def test_binary_inputs_in_order():
    ids = np.arange(8, dtype=np.int64).reshape(2, 4)
    mask = np.ones((2, 4), dtype=bool)
    header = json.dumps({"inputs": [
        {"name": "ids", "shape": [2, 4], "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "mask", "shape": [2, 4], "datatype": "BOOL", "parameters": {"binary_data_size": mask.nbytes}}]}).encode()
    req = parse_infer_request(header + ids.tobytes() + mask.tobytes(), len(header), SPECS)
    np.testing.assert_array_equal(req.inputs["ids"], ids)
    assert req.batch == 2


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["inputs"].pop(1), "missing input(s) 'mask'; the model's inputs are ids, mask"),
    (lambda d: d["inputs"].append(dict(d["inputs"][0])), "input 'ids' is given twice"),
    (lambda d: d["inputs"][0].update(shape=[1, True, 2, 2]),
     "input 'ids': 'shape' must be a list of non-negative integers, found [1, True, 2, 2]"),
    (lambda d: d["inputs"][0].update(data=["a", "b", "c", "d"]),
     "input 'ids': data is not a list of INT64 values (found string values)"),
    (lambda d: d["inputs"][0].update(data=[1.5, 2, 3, 4]),
     "input 'ids': data is not a list of INT64 values (found floating-point values)"),
    (lambda d: d["inputs"][1].update(data=[1, 0, 1, 1]),
     "input 'mask': data is not a list of BOOL values (found integer values)"),
    (lambda d: d["inputs"][0].update(data=[2**70, 2, 3, 4]), "input 'ids': data is not a list of INT64 values"),
    (lambda d: d["inputs"][1].update(shape=[2, 4], data=[True] * 8), "inputs disagree on the batch dimension: [1, 2]"),
    (lambda d: d["inputs"][0].pop("data"), "input 'ids' has neither 'data' nor parameters.binary_data_size"),
    (lambda d: d.update(outputs="score"), "'outputs' must be a list"),
])
def test_bad_requests(mutate, message):
    doc = json.loads(_doc())
    mutate(doc)
    with pytest.raises(ApiError) as info:
        parse_infer_request(json.dumps(doc).encode(), None, SPECS)
    assert info.value.status == 400 and message in info.value.message


def test_binary_framing_errors():
    with pytest.raises(ApiError, match="Inference-Header-Content-Length is 99 but the body has 10 bytes"):
        parse_infer_request(b"0123456789", 99, SPECS)
    body = _doc()
    with pytest.raises(ApiError, match="3 bytes of binary data are not claimed by any input"):
        parse_infer_request(body + b"xyz", len(body), SPECS)


def test_unknown_requested_output():
    req = parse_infer_request(_doc(outputs=[{"name": "nope"}]), None, SPECS)
    with pytest.raises(ApiError, match="unknown output 'nope': the model's outputs are score"):
        check_requested_outputs(req, OUTS)


def test_response_json_and_binary():
    score = np.array([0.5, 1.5], dtype=np.float16)
    req = parse_infer_request(_doc(id="r"), None, SPECS)
    body, json_len = encode_infer_response("m", "2.0.0", req, {"score": score})
    assert json_len is None
    assert json.loads(body) == {"model_name": "m", "model_version": "2.0.0", "id": "r",
                                "outputs": [{"name": "score", "datatype": "FP16", "shape": [2], "data": [0.5, 1.5]}]}
    req = parse_infer_request(_doc(parameters={"binary_data_output": True}), None, SPECS)
    body, json_len = encode_infer_response("m", None, req, {"score": score})
    head = json.loads(body[:json_len])
    assert head["outputs"][0]["parameters"] == {"binary_data_size": 4} and "model_version" not in head
    np.testing.assert_array_equal(np.frombuffer(body[json_len:], np.float16), score)


def _binary_body(ids: np.ndarray, mask: np.ndarray, **extra) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [
        {"name": "ids", "shape": list(ids.shape), "datatype": "INT64", "parameters": {"binary_data_size": ids.nbytes}},
        {"name": "mask", "shape": list(mask.shape), "datatype": "BOOL",
         "parameters": {"binary_data_size": mask.nbytes}}], **extra}).encode()
    return header + ids.tobytes() + mask.tobytes(), len(header)


def test_repeated_binary_header_reads_each_body():
    """The second request with the same header bytes takes the remembered plan: its own tensors come back,
    and a body of the wrong length still gets the full parser's message."""
    rng = np.random.default_rng(0)
    mask = np.ones((1, 4), dtype=bool)
    for _ in range(3):
        ids = rng.integers(0, 100, (1, 4))
        body, hlen = _binary_body(ids, mask)
        req = parse_infer_request(body, hlen, SPECS)
        np.testing.assert_array_equal(req.inputs["ids"], ids)
        assert req.batch_signature == (("ids", "<i8", (4,)), ("mask", "|b1", (4,)))
    with pytest.raises(ApiError, match="input 'mask': binary data ends after 3 of 4 bytes"):
        parse_infer_request(body[:-1], hlen, SPECS)
    with pytest.raises(ApiError, match="1 bytes of binary data are not claimed by any input"):
        parse_infer_request(body + b"x", hlen, SPECS)


def test_remembered_header_is_checked_again_for_another_model():
    """The same header bytes sent to a model whose input has another dtype are refused, not replayed."""
    body, hlen = _binary_body(np.zeros((1, 4), np.int64), np.ones((1, 4), bool))
    parse_infer_request(body, hlen, SPECS)
    other = [TensorSpec(name="ids", dtype="int32", shape=["batch", 4]), SPECS[1]]
    with pytest.raises(ApiError, match="input 'ids': expected datatype INT32, found 'INT64'"):
        parse_infer_request(body, hlen, other)


def test_requests_with_ids_keep_their_ids():
    for rid in ("a", "b"):
        body, hlen = _binary_body(np.zeros((1, 4), np.int64), np.ones((1, 4), bool), id=rid)
        assert parse_infer_request(body, hlen, SPECS).id == rid


def test_binary_response_header_follows_the_output_shape():
    req = parse_infer_request(_doc(parameters={"binary_data_output": True}), None, SPECS)
    for n in (1, 3, 1):
        score = np.arange(n, dtype=np.float16)
        body, json_len = encode_infer_response("m", "1", req, {"score": score})
        head = json.loads(body[:json_len])
        assert head["outputs"][0]["shape"] == [n]
        assert head["outputs"][0]["parameters"] == {"binary_data_size": 2 * n}
        np.testing.assert_array_equal(np.frombuffer(body[json_len:], np.float16), score)


def test_long_binary_headers_are_not_remembered():
    """A client cannot pin large JSON headers in memory: only headers up to 4 KiB are remembered."""
    from edgeopt.agent import kserve

    ids, mask = np.zeros((1, 4), np.int64), np.ones((1, 4), bool)
    kserve._BINARY_PLANS.clear()
    body, hlen = _binary_body(ids, mask, parameters={"pad": "x" * 5000})
    np.testing.assert_array_equal(parse_infer_request(body, hlen, SPECS).inputs["ids"], ids)
    assert not kserve._BINARY_PLANS
    body, hlen = _binary_body(ids, mask)
    parse_infer_request(body, hlen, SPECS)
    assert len(kserve._BINARY_PLANS) == 1


def test_empty_outputs_list_answers_json():
    req = parse_infer_request(_doc(outputs=[]), None, SPECS)
    body, json_len = encode_infer_response("m", None, req, {"score": np.ones(1, np.float16)})
    assert json_len is None and json.loads(body) == {"model_name": "m", "outputs": []}


def test_parse_once_caches_stay_bounded():
    from edgeopt.agent.caches import BoundedCache

    cache = BoundedCache(3)
    for i in range(10):
        cache.put(i, str(i))
        assert len(cache) <= 3 and cache.get(i) == str(i)
