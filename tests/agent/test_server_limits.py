"""What one hostile client can make the agent's API hold, on raw sockets against the real server:
header/body/idle timeouts, the connection cap, and gzip/deflate bodies (bombs refused with 413, inflated
off the event loop so other clients are served meanwhile)."""
from __future__ import annotations

import gzip
import json
import select
import socket
import threading
import time
import zlib

import numpy as np
import pytest

from edgeopt.agent import server as server_module
from edgeopt.agent.connection import HttpLimits
from edgeopt.agent.runtimes import get_runtime
from edgeopt.agent.server import BatchLimits, InferenceServer, ModelRegistry

from test_server_http import _infer_bytes, _read_response  # noqa: E402  (same folder)


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        threading.Event().wait(0.02)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def serve(digits_model):
    """``serve(limits=HttpLimits(...), runtime=None, event_loop=...)`` -> a started server on the digits model."""
    made = []

    def start(limits: HttpLimits | None = None, runtime=None, event_loop: str = "asyncio") -> InferenceServer:
        registry = ModelRegistry(limits=BatchLimits(max_batch=1))
        loaded = runtime or get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider")
        registry.swap("digits", "1.0.0", loaded)
        srv = InferenceServer(registry, "127.0.0.1", 0, event_loop=event_loop, limits=limits).start()
        made.append((srv, registry))
        return srv

    yield start
    for srv, registry in made:
        srv.stop(grace_s=1)
        registry.close()


def _connect(srv) -> socket.socket:
    return socket.create_connection(srv.address, timeout=20)


def _eof(s: socket.socket) -> bool:
    """Read until the server closes; True then (a socket timeout fails the test instead)."""
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def _infer_ok(srv) -> int:
    s, buf = _connect(srv), bytearray()
    try:
        head, body = _infer_bytes()
        s.sendall(head + body)
        return _read_response(s, buf)[0]
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------- timeouts
@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_slow_head_gets_408_and_close(serve, event_loop):
    srv = serve(HttpLimits(header_timeout_s=0.3), event_loop=event_loop)
    s, buf = _connect(srv), bytearray()
    s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # slowloris: the head never ends
    status, headers, body = _read_response(s, buf)
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body) == {"error": "request head not complete within 0.3 s"}
    assert _eof(s)


def test_silent_new_connection_is_closed_after_the_header_timeout(serve):
    srv = serve(HttpLimits(header_timeout_s=0.3))
    s = _connect(srv)
    assert _eof(s) and s.recv(1) == b""


def test_stalled_body_gets_408(serve):
    srv = serve(HttpLimits(body_timeout_s=0.3))
    s, buf = _connect(srv), bytearray()
    head, body = _infer_bytes()
    s.sendall(head + body[:10])
    status, _, out = _read_response(s, buf)
    assert status == 408 and json.loads(out) == {"error": "request body stalled: no data for 0.3 s"}
    assert _eof(s)


def test_idle_keep_alive_is_closed_after_the_idle_timeout(serve):
    srv = serve(HttpLimits(idle_timeout_s=0.3))
    s, buf = _connect(srv), bytearray()
    head, body = _infer_bytes()
    s.sendall(head + body)
    assert _read_response(s, buf)[0] == 200
    assert _eof(s)  # no request for 0.3 s: the server closed it
    assert _infer_ok(srv) == 200


# ------------------------------------------------------------------------------------- connection cap
def test_idle_flood_at_the_cap_evicts_idle_connections_and_serves_a_new_client(serve):
    srv = serve(HttpLimits(max_connections=8))
    flood = [_connect(srv) for _ in range(40)]
    _wait_for(lambda: srv.evicted >= 32, what="idle connections evicted")
    assert len(srv.connections) <= 8
    assert _infer_ok(srv) == 200  # a new client still gets inference
    s, buf = _connect(srv), bytearray()
    s.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(s, buf)[0] == 200
    _wait_for(lambda: sum(map(_closed_by_server, flood)) >= 32, what="the evicted sockets closed")
    for c in flood + [s]:
        c.close()


def _closed_by_server(c: socket.socket) -> bool:
    if not select.select([c], [], [], 0)[0]:
        return False
    try:
        return c.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def test_when_every_connection_is_busy_a_new_one_gets_503(serve, digits_model):
    gate = threading.Event()
    real = get_runtime("onnxruntime").load(digits_model, device="CPUExecutionProvider")

    class Held:
        """The digits model, held until the test opens the gate."""
        inputs, outputs = real.inputs, real.outputs

        def infer(self, feeds):
            gate.wait(30)
            return real.infer(feeds)

        def describe(self):
            return real.describe()

        def close(self):
            pass

    srv = serve(HttpLimits(max_connections=3), runtime=Held())
    busy = []
    head, body = _infer_bytes()
    for _ in range(3):
        c = _connect(srv)
        c.sendall(head + body)
        busy.append(c)
    _wait_for(lambda: len(srv.connections) == 3 and all(c.busy for c in srv.connections), what="3 busy connections")
    extra, buf = _connect(srv), bytearray()
    status, headers, out = _read_response(extra, buf)
    assert status == 503 and headers["retry-after"] == "1"
    assert json.loads(out) == {"error": "too many open connections, every one busy; retry later"}
    assert srv.refused == 1
    gate.set()
    for c in busy:
        assert _read_response(c, bytearray())[0] == 200
        c.close()
    extra.close()


# ------------------------------------------------------------------------------------ compressed bodies
def _bomb(size: int) -> bytes:
    """``size`` zero bytes, gzip'd in a streaming way (about 1 MB per GiB)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(16 * 1024 * 1024)
    parts = [comp.compress(chunk) for _ in range(size // len(chunk))]
    return b"".join(parts) + comp.flush()


def _post(s: socket.socket, body: bytes, encoding: str, extra: str = "") -> None:
    s.sendall(f"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Encoding: {encoding}\r\n"
              f"Content-Length: {len(body)}\r\n{extra}\r\n".encode() + body)


def test_gzip_bomb_is_413_and_the_connection_stays_usable(serve):
    srv = serve()
    bomb = _bomb(1024**3)  # 1 GiB of zeros in ~1 MB
    s, buf = _connect(srv), bytearray()
    _post(s, bomb, "gzip")
    status, _, out = _read_response(s, buf)
    assert status == 413
    assert json.loads(out) == {"error": f"request body inflates to more than the 268435456-byte limit "
                                        f"({len(bomb)} bytes of gzip)"}
    head, body = _infer_bytes()
    s.sendall(head + body)  # framing was intact: the same connection goes on
    assert _read_response(s, buf)[0] == 200
    s.close()


@pytest.mark.parametrize("body, encoding, status, message", [
    (gzip.compress(b'{"inputs": []}')[:-6], "gzip", 400,
     "request body is not valid gzip: the compressed stream is truncated"),
    (b"not gzip at all", "gzip", 400, "request body is not valid gzip: Error -3 while decompressing data: "
                                      "incorrect header check"),
    (gzip.compress(b"{}") + b"junk", "gzip", 400,
     "request body is not valid gzip: 4 bytes follow the end of the compressed stream"),
    (b"{}", "br", 415, "unsupported Content-Encoding 'br'; use gzip, deflate or none"),
])
def test_bad_compressed_bodies(serve, body, encoding, status, message):
    srv = serve()
    s, buf = _connect(srv), bytearray()
    _post(s, body, encoding)
    got, _, out = _read_response(s, buf)
    assert (got, json.loads(out)) == (status, {"error": message})
    s.close()


def test_deflate_body_over_the_inline_size_is_inflated_on_the_worker(serve):
    srv = serve()
    x = np.random.default_rng(1).standard_normal((64, 1, 8, 8)).astype(np.float32)
    doc = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                  "data": x.ravel().tolist()}]}).encode()
    packed = zlib.compress(doc)
    assert len(packed) > 4096
    s, buf = _connect(srv), bytearray()
    _post(s, packed, "deflate")
    status, _, out = _read_response(s, buf)
    assert status == 200 and np.array(json.loads(out)["outputs"][0]["data"]).shape == (640,)
    s.close()


def test_other_clients_are_served_while_a_big_body_inflates(serve, monkeypatch):
    """The inflation is held at its start: on the event loop (the old code) nobody else would be answered."""
    entered, release = threading.Event(), threading.Event()
    real = server_module.inflate

    def held(*args):
        entered.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(server_module, "inflate", held)
    srv = serve()
    head, body = _infer_bytes()
    x = np.random.default_rng(2).standard_normal((64, 1, 8, 8)).astype(np.float32)
    packed = gzip.compress(json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                                   "data": x.ravel().tolist()}]}).encode())
    assert len(packed) > 4096  # over the inline size: inflated on the worker thread
    a, abuf = _connect(srv), bytearray()
    _post(a, packed, "gzip")
    assert entered.wait(20)
    b, bbuf = _connect(srv), bytearray()
    b.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, metrics = _read_response(b, bbuf)
    assert status == 200 and b"\nedgeopt_api_inflating 1\n" in metrics
    b.sendall(head + body)
    assert _read_response(b, bbuf)[0] == 200
    release.set()
    assert _read_response(a, abuf)[0] == 200
    a.close()
    b.close()
