"""The local inference API's HTTP/1.1 transport: one asyncio event loop in a background thread.

Standard library only (the agent must not depend on flask or a web framework). An event loop rather
than ``http.server.ThreadingHTTPServer``: with one thread per keep-alive connection, 16 concurrent
clients spent most of the agent's CPU in thread switches and ``email`` header parsing, and batching
could not show its gain (measured in BENCHMARKS.md). Here each connection is a small protocol object;
inference waits on the model's batcher without holding a thread.

HTTP/1.1 subset: keep-alive (default) and ``Connection: close``, ``Content-Length`` bodies (chunked
uploads are refused with 411), ``Expect: 100-continue``, one request at a time per connection (pipelined
requests are answered in order). Routes and payloads are in :mod:`edgeopt.agent.api`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import socket
import threading
from types import MappingProxyType
from typing import Callable

from ..sdk.errors import UnsupportedError
from .api import AGENT_VERSION, Api, Deferred, Response, error_response
from .caches import BoundedCache
from .registry import BatchLimits, ModelEntry, ModelRegistry

__all__ = ["InferenceServer", "ModelRegistry", "ModelEntry", "BatchLimits", "AGENT_VERSION"]

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 256 * 1024 * 1024
_REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            411: "Length Required", 413: "Payload Too Large", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_SERVER = f"Server: edgeopt-agent/{AGENT_VERSION}\r\n".encode()
# Parsed request heads by their bytes. A keep-alive client sends the same head for every request of one
# kind (same path, headers and body length), so parsing is done once; the api treats `headers` as
# read-only. Response heads likewise, by status, type, length and extra headers. Both are bounded.
_HEADS = BoundedCache(1024)
_RESPONSE_HEADS = BoundedCache(1024)
_MAX_CACHED_HEAD = 2048


class _HttpProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, server: "InferenceServer"):
        self.server = server
        self.api = server.api
        self.buf = bytearray()
        self.head: tuple[str, str, dict[str, str], int, bool] | None = None
        self.busy = False
        self.closing = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server._connections.add(self)

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server._connections.discard(self)

    # A client that sends requests but does not read the answers must not grow our write buffer without
    # bound: stop reading from it until it has drained.
    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._process()

    # ------------------------------------------------------------------ parsing
    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD_BYTES:
                self._fail(431, f"request headers are over {MAX_HEAD_BYTES} bytes")
            return False
        raw = bytes(self.buf[:end])
        del self.buf[:end + 4]
        cached = _HEADS.get(raw)
        if cached is None:
            cached = self._parse_raw_head(raw)
            if cached is None:
                return False
            if len(raw) <= _MAX_CACHED_HEAD:
                _HEADS.put(raw, cached)
        method, target, headers, length, keep, expect = cached
        if expect and len(self.buf) < length:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.head = (method, target, headers, length, keep)
        return True

    def _parse_raw_head(self, raw: bytes) -> tuple | None:
        """Request line and headers; None after answering a framing error."""
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            self._fail(400 if len(parts) != 3 else 505, f"malformed request line {lines[0][:100]!r}")
            return None
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._fail(400, f"malformed header line {line[:100]!r}")
                return None
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(411, "chunked request bodies are not supported: send Content-Length")
            return None
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400, "Content-Length is not a number")
            return None
        if length < 0 or length > MAX_BODY_BYTES:
            self._fail(413, f"request body of {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
            return None
        conn = headers.get("connection", "").lower()
        keep = "close" not in conn if version == "HTTP/1.1" else "keep-alive" in conn
        expect = headers.get("expect", "").lower() == "100-continue"
        # read-only: a cached head's headers are shared by every later request with the same head bytes
        return method, target, MappingProxyType(headers), length, keep, expect

    def _process(self) -> None:
        while not self.busy and not self.closing:
            if self.head is None and not self._parse_head():
                return
            method, target, headers, length, keep = self.head  # type: ignore[misc]
            if len(self.buf) < length:
                return
            body = bytes(self.buf[:length])
            del self.buf[:length]
            self.head = None
            self.busy = True
            try:
                result = self.api.handle(method, target, headers, body)
            except Exception as exc:  # a bug must answer 500, not drop the connection silently
                log.exception("unexpected error on %s %s", method, target)
                result = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
            if isinstance(result, Response):
                self._respond(result, keep)
            else:
                self.server._await(self, result, keep)
                return

    def finished(self, deferred: Deferred, keep: bool) -> None:
        """The batcher has run this connection's request: answer it, then read the next one."""
        try:
            response = deferred.finish()
        except Exception as exc:
            log.exception("unexpected error building an inference response")
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        self._respond(response, keep)
        if not self.busy and not self.closing:
            self._process()

    # ------------------------------------------------------------------ responses
    def _respond(self, r: Response, keep: bool) -> None:
        if self.closing or self.transport is None:
            self.busy = False
            return
        key = (r.status, r.content_type, len(r.body), keep, *r.headers.items())
        head = _RESPONSE_HEADS.get(key)
        if head is None:
            parts = [f"HTTP/1.1 {r.status} {_REASONS.get(r.status, '')}\r\n".encode(), _SERVER,
                     f"Content-Type: {r.content_type}\r\nContent-Length: {len(r.body)}\r\n".encode()]
            for k, v in r.headers.items():
                parts.append(f"{k}: {v}\r\n".encode("latin-1"))
            if not keep:
                parts.append(b"Connection: close\r\n")
            parts.append(b"\r\n")
            head = b"".join(parts)
            _RESPONSE_HEADS.put(key, head)
        self.transport.write(head + r.body)
        self.busy = False
        if not keep:
            self.closing = True
            self.transport.close()

    def _fail(self, status: int, message: str) -> None:
        """A framing error: answer and close (the stream position can no longer be trusted)."""
        self._respond(error_response(status, message), keep=False)


def event_loop_factory(kind: str = "asyncio") -> Callable[[], asyncio.AbstractEventLoop]:
    """``asyncio`` (default): the standard library's loop. ``uvloop``: uvloop's, which must be installed.

    uvloop's transport is a little cheaper on its own (a bare protocol: 9.1 us of CPU per request against
    10.4 us on the 2-core test host), but in the agent, whose cost is dominated by the hand-offs between the
    loop and the batcher threads, it measured no faster with batching on and slower with batching off
    (BENCHMARKS.md), so it is not the default and not a dependency; it stays selectable, and tested."""
    if kind == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        raise UnsupportedError("[api] event_loop = \"uvloop\" but uvloop is not installed",
                               hint="pip install uvloop, or set event_loop = \"asyncio\"") from None
    return uvloop.new_event_loop


class InferenceServer:
    """The API server. The port is bound in the constructor, so "port in use" fails before anything starts."""

    def __init__(self, registry: ModelRegistry, host: str = "127.0.0.1", port: int = 8470,
                 event_loop: str = "asyncio"):
        self._new_loop = event_loop_factory(event_loop)
        self.registry = registry
        self.api = Api(registry)
        self._sock = socket.create_server((host, port), backlog=1024)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[_HttpProtocol] = set()
        self._started = threading.Event()
        # Finished inferences, handed from batcher threads to the event loop. One wake-up per batch
        # instead of one per request: each call_soon_threadsafe writes to the loop's self-pipe.
        self._done: collections.deque = collections.deque()
        self._wake_pending = False
        self._wake_lock = threading.Lock()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self, ready: bool = True) -> "InferenceServer":
        self._thread = threading.Thread(target=self._run, name="inference-api", daemon=True)
        self._thread.start()
        self._started.wait(10)
        if ready:
            self.api.ready.set()
        return self

    def _run(self) -> None:
        loop = self._loop = self._new_loop()
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(loop.create_server(lambda: _HttpProtocol(self), sock=self._sock))
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _await(self, conn: _HttpProtocol, deferred: Deferred, keep: bool) -> None:
        deferred.pending.on_done(lambda: self._completed(conn, deferred, keep))

    def _completed(self, conn: _HttpProtocol, deferred: Deferred, keep: bool) -> None:
        """Batcher thread: queue the completion; wake the loop unless a wake-up is already on its way."""
        self._done.append((conn, deferred, keep))
        with self._wake_lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._wake_lock:
            self._wake_pending = False
        while self._done:
            conn, deferred, keep = self._done.popleft()
            conn.finished(deferred, keep)

    def set_ready(self, ready: bool) -> None:
        (self.api.ready.set if ready else self.api.ready.clear)()

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, give requests in progress ``grace_s`` to finish, close connections, end the loop."""
        self.api.ready.clear()
        loop = self._loop
        if loop is None or not loop.is_running():
            self._sock.close()
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            deadline = loop.time() + grace_s
            while any(c.busy for c in self._connections) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.sleep(0)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(grace_s + 5)

