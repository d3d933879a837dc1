"""The local inference API over real HTTP with the real digits CNN (ONNX Runtime).

Covers the Open Inference Protocol endpoints, JSON and binary tensors, every 400/404/503 message,
Prometheus metrics and a hot swap under concurrent load with zero failed requests.
"""
from __future__ import annotations

import http.client
import json
import struct
import threading

import numpy as np
import pytest

from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import BatchLimits, InferenceServer, ModelRegistry


@pytest.fixture(scope="module")
def images(digits_heldout):
    return np.load(digits_heldout)["images"][:32]


def _load(digits_model):
    return get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider", threads=1)


@pytest.fixture
def served(digits_model):
    registry = ModelRegistry(limits=BatchLimits(max_batch=8, max_delay_ms=2, max_queue=64))
    model = _load(digits_model)
    registry.swap("digits", "1.0.0", model)
    server = InferenceServer(registry, "127.0.0.1", 0).start()
    yield server, registry, model
    server.stop()
    registry.close()


def _request(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def _json_infer(x: np.ndarray, name="images", datatype="FP32", shape=None):
    return json.dumps({"inputs": [{"name": name, "shape": list(shape or x.shape), "datatype": datatype,
                                   "data": x.ravel().tolist()}]}).encode()


def test_health_server_and_model_metadata(served):
    server, _, _ = served
    assert _request(server, "GET", "/v2/health/live")[0] == 200
    assert _request(server, "GET", "/v2/health/ready")[0] == 200
    status, _, body = _request(server, "GET", "/v2")
    assert status == 200 and "binary_tensor_data" in json.loads(body)["extensions"]
    status, _, body = _request(server, "GET", "/v2/models/digits")
    meta = json.loads(body)
    assert status == 200
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["versions"] == ["1.0.0"] and meta["platform"] == "onnxruntime"
    assert _request(server, "GET", "/v2/models/digits/versions/1.0.0/ready")[0] == 200
    server.set_ready(False)
    assert _request(server, "GET", "/v2/health/ready")[0] == 503


def test_json_inference_matches_the_runtime(served, images):
    server, _, model = served
    x = images[:3]
    status, headers, body = _request(server, "POST", "/v2/models/digits/infer", _json_infer(x))
    assert status == 200, body
    out = json.loads(body)["outputs"][0]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [3, 10]
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(3, 10), model.infer({"images": x})["logits"],
                               rtol=1e-5, atol=1e-5)


def test_binary_tensor_extension_both_ways(served, images):
    server, _, model = served
    x = images[:2]
    header = json.dumps({"id": "r1", "inputs": [{"name": "images", "shape": [2, 1, 8, 8], "datatype": "FP32",
                                                 "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    status, headers, body = _request(server, "POST", "/v2/models/digits/infer", header + x.tobytes(),
                                     {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"})
    assert status == 200, body
    json_len = int(headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:json_len])
    assert doc["id"] == "r1" and doc["outputs"][0]["parameters"]["binary_data_size"] == 2 * 10 * 4
    got = np.frombuffer(body[json_len:], np.float32).reshape(2, 10)
    np.testing.assert_allclose(got, model.infer({"images": x})["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("body, message", [
    (lambda x: _json_infer(x, name="pixels"), "unexpected input 'pixels': the model's inputs are images"),
    (lambda x: _json_infer(x.astype(np.int64), datatype="INT64"), "input 'images': expected datatype FP32, found 'INT64'"),
    (lambda x: _json_infer(x[0]), "input 'images': expected shape [-1, 1, 8, 8], found [1, 8, 8]"),
    (lambda x: _json_infer(x, shape=[1, 1, 4, 4]), "input 'images': expected shape [-1, 1, 8, 8], found [1, 1, 4, 4]"),
    (lambda x: _json_infer(x[:, :, :, :4], shape=[1, 1, 8, 8]), "input 'images': shape [1, 1, 8, 8] needs 64 values, found 32"),
    (lambda x: b"{not json", "request is not valid JSON"),
    (lambda x: b'{"inputs": []}', "request must have a non-empty 'inputs' list"),
])
def test_bad_requests_get_400_naming_input_expected_and_found(served, images, body, message):
    server, _, _ = served
    status, headers, raw = _request(server, "POST", "/v2/models/digits/infer", body(images[:1]))
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    assert message in json.loads(raw)["error"]


def test_binary_size_mismatch_is_400(served, images):
    server, _, _ = served
    x = images[:1]
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    status, _, raw = _request(server, "POST", "/v2/models/digits/infer", header + x.tobytes(),
                              {"Inference-Header-Content-Length": str(len(header))})
    assert status == 400
    assert json.loads(raw)["error"] == ("input 'images': shape [1, 1, 8, 8] of FP32 needs 256 bytes, "
                                        "binary_data_size is 100")


def test_unknown_model_and_version_are_404(served, images):
    server, _, _ = served
    status, _, raw = _request(server, "POST", "/v2/models/cats/infer", _json_infer(images[:1]))
    assert status == 404 and json.loads(raw) == {"error": "unknown model 'cats' (served models: digits)"}
    status, _, raw = _request(server, "GET", "/v2/models/digits/versions/9.9.9")
    assert status == 404
    assert json.loads(raw)["error"] == "model 'digits' version '9.9.9' is not served (serving 1.0.0)"
    assert _request(server, "GET", "/nope")[0] == 404


class _SlowModel:
    """Wraps the real model but holds each call until released, so the queue can be filled."""

    def __init__(self, model):
        self.model, self.inputs, self.outputs = model, model.inputs, model.outputs
        self.gate, self.entered = threading.Event(), threading.Event()

    def infer(self, feeds):
        self.entered.set()
        self.gate.wait(20)
        return self.model.infer(feeds)

    def describe(self):
        return self.model.describe()

    def close(self):
        pass


def test_full_queue_answers_503_with_retry_after(digits_model, images):
    slow = _SlowModel(_load(digits_model))
    registry = ModelRegistry(limits=BatchLimits(max_batch=1, max_queue=1))
    registry.swap("digits", "1.0.0", slow)
    server = InferenceServer(registry, "127.0.0.1", 0).start()
    results: list[int] = []
    try:
        def client():
            results.append(_request(server, "POST", "/v2/models/digits/infer", _json_infer(images[:1]))[0])

        first = threading.Thread(target=client)
        first.start()
        assert slow.entered.wait(10)
        second = threading.Thread(target=client)  # waits in the queue (max_queue 1)
        second.start()
        for _ in range(200):
            if registry.get("digits").batcher.queue_depth == 1:
                break
            threading.Event().wait(0.01)
        status, headers, raw = _request(server, "POST", "/v2/models/digits/infer", _json_infer(images[:1]))
        assert status == 503
        assert int(headers["Retry-After"]) >= 1
        assert json.loads(raw)["error"] == "model 'digits' is busy: 1 requests queued (max_queue 1); retry later"
        slow.gate.set()
        first.join(10)
        second.join(10)
        assert results == [200, 200]
        metrics = _request(server, "GET", "/metrics")[2].decode()
        assert 'edgeopt_requests_busy_total{model="digits"} 1' in metrics
    finally:
        slow.gate.set()
        server.stop()
        registry.close()


def test_prometheus_metrics(served, images):
    server, _, _ = served
    for _ in range(3):
        assert _request(server, "POST", "/v2/models/digits/infer", _json_infer(images[:1]))[0] == 200
    _request(server, "POST", "/v2/models/digits/infer", _json_infer(images[:1], name="bad"))
    status, headers, raw = _request(server, "GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert 'edgeopt_requests_total{model="digits"} 3' in text
    assert 'edgeopt_request_errors_total{model="digits"} 1' in text
    assert 'edgeopt_request_latency_ms_count{model="digits"} 3' in text
    assert 'edgeopt_request_latency_ms_bucket{model="digits",le="+Inf"} 3' in text
    assert 'edgeopt_model_info{model="digits",version="1.0.0"} 1' in text


def test_keep_alive_serves_many_requests_on_one_connection(served, images):
    server, _, _ = served
    conn = http.client.HTTPConnection(*server.address, timeout=30)
    try:
        for _ in range(20):
            conn.request("POST", "/v2/models/digits/infer", body=_json_infer(images[:1]))
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
    finally:
        conn.close()


def test_hot_swap_under_concurrent_load_fails_no_request(served, digits_model, images):
    """Eight clients hammer the API while the model is swapped 6 times: every request succeeds and the
    served version moves forward."""
    server, registry, _ = served
    stop = threading.Event()
    failures: list[str] = []
    versions: set[str] = set()
    counts = [0] * 8

    def client(k: int):
        conn = http.client.HTTPConnection(*server.address, timeout=30)
        body = _json_infer(images[k:k + 1])
        while not stop.is_set():
            conn.request("POST", "/v2/models/digits/infer", body=body)
            resp = conn.getresponse()
            raw = resp.read()
            if resp.status != 200:
                failures.append(f"{resp.status} {raw[:200]!r}")
            else:
                versions.add(json.loads(raw)["model_version"])
                counts[k] += 1
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        for v in range(2, 8):
            threading.Event().wait(0.15)
            registry.swap("digits", f"{v}.0.0", _load(digits_model))
        for _ in range(500):  # until the last version has answered (bounded: 10 s)
            if "7.0.0" in versions:
                break
            threading.Event().wait(0.02)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert all(c > 0 for c in counts)
    assert "7.0.0" in versions and len(versions) >= 2
    assert registry.get("digits").version == "7.0.0"


def test_tritonclient_http_works_unchanged(served, images):
    """The stock Triton HTTP client (tritonclient[http]) talks to the agent without changes."""
    import tritonclient.http as httpclient  # in the `test` extra

    server, _, model = served
    host, port = server.address
    client = httpclient.InferenceServerClient(f"{host}:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("digits")
        meta = client.get_model_metadata("digits")
        assert meta["inputs"][0]["shape"] == [-1, 1, 8, 8]
        x = images[:4]
        want = model.infer({"images": x})["logits"]
        for binary in (True, False):
            inp = httpclient.InferInput("images", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            out = httpclient.InferRequestedOutput("logits", binary_data=binary)
            result = client.infer("digits", [inp], outputs=[out], request_id="t1")
            np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-5)
        bad = httpclient.InferInput("images", [1, 8, 8], "FP32")
        bad.set_data_from_numpy(x[0])
        with pytest.raises(Exception, match=r"expected shape \[-1, 1, 8, 8\], found \[1, 8, 8\]"):
            client.infer("digits", [bad])
    finally:
        client.close()


def test_struct_is_little_endian_fp32(served, images):
    """Binary tensors are raw little-endian values, as the protocol specifies."""
    server, _, _ = served
    x = images[:1]
    raw = struct.pack("<64f", *x.ravel().tolist())
    header = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    status, _, body = _request(server, "POST", "/v2/models/digits/infer", header + raw,
                               {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200 and json.loads(body)["outputs"][0]["shape"] == [1, 10]


def test_registry_reconfigure_applies_to_serving_models(served):
    """What set-config's batching patch does: new limits apply to the serving batcher at once."""
    _, registry, _ = served
    registry.reconfigure(max_batch=4, max_delay_ms=1.0, max_queue=9)
    batcher = registry.get("digits").batcher
    assert (batcher.max_batch, batcher.max_queue, batcher.max_delay) == (4, 9, 0.001)
    registry.reconfigure(enabled=False)
    assert registry.get("digits").batcher.max_batch == 1


def test_max_batch_defaults_to_the_package_profile(digits_model):
    registry = ModelRegistry(limits=BatchLimits(max_batch=None))
    manifest = type("M", (), {"profile": {"batch_size": 8}, "runtime": "onnxruntime"})()
    entry = registry.swap("digits", "1.0.0", _load(digits_model), manifest)
    assert entry.batcher.max_batch == 8
    registry.close()
