"""HTTP/1.1 framing of the agent's API on raw sockets: pipelining, Connection: close, 100-continue,
chunked uploads refused, malformed requests, and a clean stop that finishes requests in progress."""
from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest

from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import BatchLimits, InferenceServer, ModelRegistry


@pytest.fixture(params=["asyncio", "uvloop"])
def server(request, digits_model):
    """The same transport on both event loops the agent can run (asyncio by default, uvloop if chosen)."""
    registry = ModelRegistry(limits=BatchLimits(max_batch=4))
    registry.swap("digits", "1.0.0", get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider"))
    srv = InferenceServer(registry, "127.0.0.1", 0, event_loop=request.param).start()
    yield srv
    srv.stop()
    registry.close()


def _conn(srv) -> socket.socket:
    s = socket.create_connection(srv.address, timeout=10)
    return s


def _read_response(sock: socket.socket, buf: bytearray) -> tuple[int, dict, bytes]:
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    end = buf.index(b"\r\n\r\n")
    lines = buf[:end].decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(buf) < end + 4 + length:
        buf += sock.recv(65536)
    body = bytes(buf[end + 4:end + 4 + length])
    del buf[:end + 4 + length]
    return int(lines[0].split()[1]), headers, body


def _infer_bytes(connection: str | None = None, expect: bool = False) -> tuple[bytes, bytes]:
    body = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "data": [0.5] * 64}]}).encode()
    head = f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
    if connection:
        head += f"Connection: {connection}\r\n"
    if expect:
        head += "Expect: 100-continue\r\n"
    return (head + "\r\n").encode(), body


def test_pipelined_requests_are_answered_in_order(server):
    s, buf = _conn(server), bytearray()
    head, body = _infer_bytes()
    s.sendall((head + body) * 3 + b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
    statuses = [_read_response(s, buf) for _ in range(4)]
    assert [st for st, _, _ in statuses] == [200, 200, 200, 200]
    assert [json.loads(b).get("live") for _, _, b in statuses] == [None, None, None, True]
    s.close()


def test_connection_close_is_honoured(server):
    s, buf = _conn(server), bytearray()
    head, body = _infer_bytes("close")
    s.sendall(head + body)
    status, headers, _ = _read_response(s, buf)
    assert status == 200 and headers["connection"] == "close"
    assert s.recv(10) == b""  # the server closed its side
    s.close()


def test_expect_100_continue(server):
    s, buf = _conn(server), bytearray()
    head, body = _infer_bytes(expect=True)
    s.sendall(head)
    status, _, _ = _read_response(s, buf)
    assert status == 100
    s.sendall(body)
    assert _read_response(s, buf)[0] == 200
    s.close()


_INFER = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"


@pytest.mark.parametrize("raw, status, message", [
    (_INFER + b"Transfer-Encoding: chunked\r\n\r\n", 411,
     "chunked request bodies are not supported: send Content-Length"),
    (_INFER + b"Content-Length: lots\r\n\r\n", 400,
     "malformed request head: Invalid character in Content-Length"),
    (b"HELLO\r\n\r\n", 400, "malformed request head: Invalid method encountered"),
    (b"GET / HTTP/2.0\r\n\r\n", 505, "HTTP/2.0 is not supported; use HTTP/1.1"),
    (b"GET /v2 HTTP/1.1\r\nno colon here\r\n\r\n", 400, "malformed request head: Invalid header token"),
    (_INFER + b"Content-Length: 999999999999\r\n\r\n", 413,
     "request body of 999999999999 bytes is over the 268435456-byte limit"),
    # Request-smuggling openings the hand-written parser let through (issue 9): each must be refused.
    (_INFER + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400,
     "malformed request head: Duplicate Content-Length"),
    (_INFER + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400,
     "malformed request head: Duplicate Content-Length"),
    (_INFER + b"Content-Length: 1_0\r\n\r\n0123456789", 400,
     "malformed request head: Invalid character in Content-Length"),
    (_INFER + b"Content-Length: +3\r\n\r\nabc", 400,
     "malformed request head: Invalid character in Content-Length"),
    (_INFER + b"Content-Length : 3\r\n\r\nabc", 400, "malformed request head: Invalid header field char"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n", 400,
     "malformed request head: Invalid header value char"),
    (_INFER + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc", 400,
     "malformed request head: Content-Length can't be present with Transfer-Encoding"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n", 400,
     "malformed request head: Unexpected whitespace after header value"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, "malformed request head: duplicate Host header"),
    (_INFER + b"Inference-Header-Content-Length: 1\r\nInference-Header-Content-Length: 2\r\n\r\n", 400,
     "malformed request head: duplicate Inference-Header-Content-Length header"),
    # Bare-LF line ends: answered at once, not left waiting for a CRLF CRLF that never comes.
    (b"GET /v2 HTTP/1.1\nHost: x\n\n", 400, "malformed request head: Expected CRLF after version"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\n\n", 400, "malformed request head: Missing expected CR after header value"),
    # A head over the size cap (16 KiB by default), whole or still arriving.
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431,
     "request head is over the 16384-byte limit"),
    (b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000, 431, "request head is over the 16384-byte limit"),
], ids=["chunked", "cl-word", "bad-method", "http2", "no-colon", "too-long", "dup-cl", "dup-cl-same", "cl-underscore",
        "cl-plus", "space-before-colon", "nul-in-value", "te-and-cl", "obs-fold", "dup-host", "dup-ihcl",
        "bare-lf", "bare-lf-headers", "head-100k", "head-100k-partial"])
def test_framing_errors_answer_and_close(server, raw, status, message):
    s, buf = _conn(server), bytearray()
    s.sendall(raw)
    got, headers, body = _read_response(s, buf)
    assert got == status and json.loads(body) == {"error": message}
    assert headers["connection"] == "close"
    assert _closed(s)  # nothing after the error is read as a request
    s.close()


def _closed(s: socket.socket) -> bool:
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:  # the server closed with our unread bytes still queued
        pass
    return True


def test_same_head_different_bodies(server, digits_model):
    """Heads are parsed once per distinct head bytes; each request still gets its own tensors' answer."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(digits_model), providers=["CPUExecutionProvider"])
    s, buf = _conn(server), bytearray()
    rng = np.random.default_rng(3)
    for _ in range(4):
        x = rng.standard_normal((1, 1, 8, 8)).astype(np.float32)
        header = json.dumps({"inputs": [{"name": "images", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        body = header + x.tobytes()
        s.sendall(f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  f"Inference-Header-Content-Length: {len(header)}\r\n\r\n".encode() + body)
        status, headers, out = _read_response(s, buf)
        assert status == 200
        json_len = int(headers["inference-header-content-length"])
        got = np.frombuffer(out[json_len:], np.float32)
        np.testing.assert_allclose(got, session.run(None, {"images": x})[0].ravel(), rtol=1e-5, atol=1e-5)
    s.close()


def test_uvloop_required_but_missing_is_one_clear_error(monkeypatch, digits_model):
    import sys

    from edgeopt.sdk.errors import UnsupportedError

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    registry = ModelRegistry()
    with pytest.raises(UnsupportedError, match=r'\[api\] event_loop = "uvloop" but uvloop is not installed'):
        InferenceServer(registry, "127.0.0.1", 0, event_loop="uvloop")
    srv = InferenceServer(registry, "127.0.0.1", 0).start()  # the default needs nothing more
    try:
        assert type(srv._loop).__module__.startswith("asyncio")
        s, buf = _conn(srv), bytearray()
        s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s, buf)[0] == 200
        s.close()
    finally:
        srv.stop()


def test_wrong_method_is_405(server):
    s, buf = _conn(server), bytearray()
    s.sendall(b"GET /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = _read_response(s, buf)
    assert status == 405 and json.loads(body) == {"error": "GET /v2/models/digits/infer is not supported"}
    s.close()


def test_gzip_request_body(server):
    import gzip

    s, buf = _conn(server), bytearray()
    _, body = _infer_bytes()
    packed = gzip.compress(body)
    s.sendall(f"POST /v2/models/digits/infer HTTP/1.1\r\nContent-Encoding: gzip\r\nContent-Length: {len(packed)}"
              f"\r\n\r\n".encode() + packed)
    status, _, out = _read_response(s, buf)
    assert status == 200 and np.array(json.loads(out)["outputs"][0]["data"]).shape == (10,)
    s.close()


def test_stop_finishes_requests_in_progress(digits_model):
    gate = threading.Event()
    real = get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider")

    class Held:
        inputs, outputs = real.inputs, real.outputs

        def infer(self, feeds):
            gate.wait(10)
            return real.infer(feeds)

        def describe(self):
            return real.describe()

        def close(self):
            pass

    registry = ModelRegistry(limits=BatchLimits(max_batch=1))
    registry.swap("digits", "1.0.0", Held())
    srv = InferenceServer(registry, "127.0.0.1", 0).start()
    s, buf = _conn(srv), bytearray()
    head, body = _infer_bytes()
    s.sendall(head + body)
    stopper = threading.Thread(target=srv.stop)
    for _ in range(100):
        if registry.get("digits").batcher.queue_depth == 0 and srv.connections and \
                any(c.busy for c in srv.connections):
            break
        threading.Event().wait(0.02)
    stopper.start()
    threading.Event().wait(0.1)
    gate.set()
    status, _, _ = _read_response(s, buf)
    stopper.join(15)
    assert status == 200 and not stopper.is_alive()
    s.close()
    registry.close()
