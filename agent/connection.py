"""One HTTP/1.1 client connection of the local inference API: framing, limits, answers.

Request heads are parsed by llhttp (Node.js's parser, through ``httptools``, what uvicorn uses). The
hand-written parser it replaces took a duplicate ``Content-Length`` (last wins), read ``1_0`` as 10,
accepted ``+3``, a space before the colon and NUL in values, and never answered bare-LF requests: the
openings of request smuggling behind a proxy. llhttp in its default strict mode refuses all of them.

Framing: a head is the bytes up to the first CRLF CRLF (at most ``max_header_bytes``, else 431); llhttp
parses exactly those bytes, and the body is the next ``Content-Length`` bytes (llhttp has checked that
header: digits only, once, not beside ``Transfer-Encoding``). Chunked uploads are refused with 411.
Every framing error is answered with one JSON line and the connection closed, since the stream position
can no longer be trusted.

Parse once: a keep-alive client sends the same head for every request of one kind, so a head llhttp
accepted is remembered by its bytes (bounded, per server) and the same bytes later skip parsing. Equal
bytes at a message boundary parse the same way, so this changes nothing llhttp decides.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httptools

from .api import AGENT_VERSION, Response, error_response
from .caches import BoundedCache
from .inflate import INLINE_BYTES, content_coding, inflate
from .kserve import ApiError
from .text_api import Stream

if TYPE_CHECKING:
    from .server import InferenceServer

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 100: "Continue", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 411: "Length Required", 413: "Payload Too Large",
            415: "Unsupported Media Type", 422: "Unprocessable Content", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable", 505: "HTTP Version Not Supported"}
_SERVER = f"Server: edgeopt-agent/{AGENT_VERSION}\r\n".encode()
# Response heads by status, type, length and extra headers (bounded; the same few repeat).
_RESPONSE_HEADS = BoundedCache(1024)
_MAX_CACHED_HEAD = 2048
# Headers the API reads: two copies would leave it to guess which one a proxy in front acted on.
_SINGLE = frozenset({"host", "content-length", "content-encoding", "inference-header-content-length", "expect"})
_BUSY_BODY = b'{"error": "too many open connections, every one busy; retry later"}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\n" + _SERVER + b"Content-Type: application/json\r\n"
         b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(_BUSY_BODY) + _BUSY_BODY)


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one client can make the API hold ([api] in the agent config)."""

    max_header_bytes: int = 16 * 1024
    max_body_bytes: int = 256 * 1024 * 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    max_connections: int = 512


class _Head:
    """llhttp's callbacks for one request head (a fresh parser per head; see the module doc)."""

    __slots__ = ("parser", "url", "headers", "complete", "fed")

    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False
        self.fed = 0  # bytes of the connection's buffer given to the parser

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True

    def feed(self, data: bytes) -> str | None:
        """Parse more head bytes; the parser's one-line complaint, or None."""
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # Upgrade/CONNECT: answered as a plain request (RFC 9110 lets a server ignore Upgrade)
        except httptools.HttpParserError as exc:
            return str(exc) or type(exc).__name__
        return None


class HttpConnection(asyncio.Protocol):
    """One client connection: one request at a time, pipelined requests answered in order."""

    def __init__(self, server: "InferenceServer"):
        self.server = server
        self.api = server.api
        self.limits: HttpLimits = server.limits
        self.heads: BoundedCache = server.heads
        self.buf = bytearray()
        # (method, target, headers, body length, keep-alive, expect 100-continue, Content-Encoding or None)
        self.head: tuple[str, str, Any, int, bool, bool, str | None] | None = None
        self.parsing: _Head | None = None
        self.busy = False
        self.closing = False
        self.served = 0
        # Kept by the server's timeout sweep, not on the request path: since when the connection has been in
        # its present state (idle, head arriving, body arriving with no new bytes), and when closing began.
        self.mark = self.closed_at = time.monotonic()
        self.sweep_key: tuple = ()
        self.transport: asyncio.Transport | None = None
        # A request in progress that can be stopped when the client goes away (a text generation), and a
        # streamed answer being written (server-sent events).
        self.inflight_cancel = None
        self.stream: Stream | None = None
        self.stream_keep = False
        self._pump_pending = False
        self._pump_lock = threading.Lock()

    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.server.admit(self):
            self.closing = True
            transport.write(_BUSY)
            transport.close()

    def connection_lost(self, exc) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.released()
        # The client went away: a generation it was waiting for (streamed or not) stops, freeing its KV cache.
        cancel, self.inflight_cancel = self.inflight_cancel, None
        if self.stream is not None:
            self.stream.cancel()
        elif cancel is not None:
            cancel()

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

    # ------------------------------------------------------------------ framing
    def _parse_head(self) -> bool:
        """Take one request head off the buffer into ``self.head``; False when more bytes are needed or
        after answering a framing error."""
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if not self.buf:
                return False
            limit = self.limits.max_header_bytes
            if len(self.buf) > limit:
                self._fail(431, f"request head is over the {limit}-byte limit")
                return False
            # Not complete yet: parse what came so far, so a malformed head (bare LF line ends, which
            # never end in CRLF CRLF) is answered now instead of waiting for bytes that never come.
            head = self.parsing = self.parsing or _Head()
            problem = head.feed(bytes(self.buf[head.fed:]))
            head.fed = len(self.buf)
            if problem is not None or head.complete:
                self._fail(400, f"malformed request head: {problem or 'it must end with CRLF CRLF'}")
            return False
        size = end + 4
        raw = bytes(self.buf[:size])
        cached = self.heads.get(raw)
        if cached is None:
            limit = self.limits.max_header_bytes
            if size > limit:
                self._fail(431, f"request head is over the {limit}-byte limit")
                return False
            cached = self._parse_raw_head(raw)
            if cached is None:
                return False
            if size <= _MAX_CACHED_HEAD:
                self.heads.put(raw, cached)
        if self.parsing is not None:
            self.parsing = None
        del self.buf[:size]
        if cached[5] and len(self.buf) < cached[3]:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self.head = cached
        return True

    def _parse_raw_head(self, raw: bytes) -> tuple | None:
        """llhttp's reading of one complete head; None after answering a framing error."""
        head = self.parsing or _Head()
        problem = head.feed(raw[head.fed:])
        if problem is not None or not head.complete:
            self._fail(400, f"malformed request head: {problem or 'incomplete'}")
            return None
        version = head.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._fail(505, f"HTTP/{version} is not supported; use HTTP/1.1")
            return None
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1").strip()
            if key in headers:
                if key in _SINGLE:
                    self._fail(400, f"malformed request head: duplicate {name.decode('latin-1')} header")
                    return None
                text = f"{headers[key]}, {text}"
            headers[key] = text
        if "transfer-encoding" in headers:
            self._fail(411, "chunked request bodies are not supported: send Content-Length")
            return None
        length = int(headers.get("content-length", "0"))  # llhttp accepted it: decimal digits only
        if length > self.limits.max_body_bytes:
            self._fail(413, f"request body of {length} bytes is over the {self.limits.max_body_bytes}-byte limit")
            return None
        expect = headers.get("expect", "").lower() == "100-continue"
        # read-only: a cached head's headers are shared by every later request with the same head bytes
        return (head.parser.get_method().decode("ascii"), head.url.decode("latin-1"), MappingProxyType(headers),
                length, head.parser.should_keep_alive(), expect, headers.get("content-encoding"))

    def _process(self) -> None:
        while not self.busy and not self.closing:
            if self.head is None and not self._parse_head():
                return
            method, target, headers, length, keep, _, encoding = self.head  # type: ignore[misc]
            if len(self.buf) < length:
                return
            if len(self.buf) == length:
                # The usual case (no pipelined request behind it): hand the buffer itself over instead of
                # copying the body twice (a 600 KB image tensor costs two 600 KB copies otherwise).
                body, self.buf = self.buf, bytearray()
            else:
                body = bytes(self.buf[:length])
                del self.buf[:length]
            self.head = None
            self.busy = True
            self.served += 1
            if encoding and body:
                try:
                    coding = content_coding(encoding)
                    if coding is not None and len(body) > INLINE_BYTES:
                        # Off the event loop: other clients are served while this one inflates.
                        self.server.inflate_later(self, coding, method, target, headers, body, keep)
                        return
                    if coding is not None:
                        body = inflate(coding, body, self.limits.max_body_bytes)
                except ApiError as exc:
                    self._respond(error_response(exc.status, exc.message, exc.headers), keep)
                    continue
            # _dispatch inlined: this is the per-request path
            try:
                result = self.api.handle(method, target, headers, body)
            except Exception as exc:  # a bug must answer 500, not drop the connection silently
                log.exception("unexpected error on %s %s", method, target)
                result = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
            if isinstance(result, Response):
                self._respond(result, keep)
            elif isinstance(result, Stream):
                self._stream_start(result, keep)
                return
            else:
                self.inflight_cancel = getattr(result, "cancel", None)
                self.server._await(self, result, keep)
                return

    def _dispatch(self, method: str, target: str, headers: Any, body: bytes | bytearray, keep: bool) -> bool:
        """Hand one request to the API; False while its answer is pending (inference)."""
        try:
            result = self.api.handle(method, target, headers, body)
        except Exception as exc:  # a bug must answer 500, not drop the connection silently
            log.exception("unexpected error on %s %s", method, target)
            result = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        if isinstance(result, Response):
            self._respond(result, keep)
            return True
        if isinstance(result, Stream):
            self._stream_start(result, keep)
            return False
        self.inflight_cancel = getattr(result, "cancel", None)
        self.server._await(self, result, keep)
        return False

    def inflated(self, future: Any, method: str, target: str, headers: Any, keep: bool) -> None:
        """Event loop: a body inflated on the worker thread is ready (or refused)."""
        if self.closing:
            self.busy = False
            return
        try:
            body = future.result()
        except ApiError as exc:
            self._respond(error_response(exc.status, exc.message, exc.headers), keep)
        except Exception as exc:  # MemoryError and the like: answer, keep the loop alive
            log.exception("inflating a request body failed")
            self._respond(error_response(500, f"internal error: {type(exc).__name__}: {exc}"), keep)
        else:
            if not self._dispatch(method, target, headers, body, keep):
                return
        if not self.busy and not self.closing:
            self._process()

    def finished(self, deferred: Any, keep: bool) -> None:
        """The batcher has run this connection's request: answer it, then read the next one."""
        self.inflight_cancel = None
        try:
            response = deferred.finish()
        except Exception as exc:
            log.exception("unexpected error building an inference response")
            response = error_response(500, f"internal error: {type(exc).__name__}: {exc}")
        self._respond(response, keep)
        if not self.busy and not self.closing:
            self._process()

    # ------------------------------------------------------------------ answers
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
            self.close()

    # ------------------------------------------------------------------ streamed answers (server-sent events)
    def _stream_start(self, st: Stream, keep: bool) -> None:
        """Write the head of a chunked answer, then each batch of events as the generation produces them."""
        if self.closing or self.transport is None:
            st.cancel()
            self.busy = False
            return
        parts = [f"HTTP/1.1 {st.status} {_REASONS.get(st.status, '')}\r\n".encode(), _SERVER,
                 f"Content-Type: {st.content_type}\r\nTransfer-Encoding: chunked\r\n".encode()]
        parts += [f"{k}: {v}\r\n".encode("latin-1") for k, v in st.headers.items()]
        if not keep:
            parts.append(b"Connection: close\r\n")
        self.transport.write(b"".join(parts) + b"\r\n")
        self.stream, self.stream_keep = st, keep
        loop = asyncio.get_running_loop()

        def notify() -> None:  # the engine thread: one wake-up of the loop per batch of events
            with self._pump_lock:
                if self._pump_pending:
                    return
                self._pump_pending = True
            loop.call_soon_threadsafe(self._pump)

        st.subscribe(notify)
        self._pump()  # what is already there (the first event of a chat stream)

    def _pump(self) -> None:
        with self._pump_lock:
            self._pump_pending = False
        st = self.stream
        if st is None:
            return
        data, done = st.pull()
        if self.closing or self.transport is None:
            st.cancel()
            if done:
                self.stream = None
            return
        if data:
            self.transport.write(b"%x\r\n" % len(data) + data + b"\r\n")
        if done:
            self.transport.write(b"0\r\n\r\n")
            self.stream = None
            self.busy = False
            if not self.stream_keep:
                self.close()
            elif not self.closing:
                self._process()

    def _fail(self, status: int, message: str) -> None:
        """A framing error: answer and close (the stream position can no longer be trusted)."""
        self._respond(error_response(status, message), keep=False)

    def close(self) -> None:
        """Close after what is written has gone out (the server aborts it if the client never reads)."""
        if self.transport is not None and not self.closing:
            self.closing = True
            self.closed_at = time.monotonic()
            self.transport.close()

    def expire(self, now: float) -> None:
        """Called by the server's sweep a few times a second at most: enforce the header, body and idle
        timeouts. The state is sampled here, so the request path pays for no clock reads; the timeouts are
        exact to one sweep interval."""
        if self.closing:
            if now - self.closed_at > 5.0 and self.transport is not None:
                self.transport.abort()  # it would not read what we wrote: drop it
            return
        if self.busy:
            phase = "busy"
        elif self.head is not None:
            phase = "body"
        elif self.buf or self.parsing is not None:
            phase = "head"
        else:
            phase = "idle"
        # A head's clock runs from its first bytes; a body's from its last bytes (it only grows in buf).
        key = (self.served, phase, len(self.buf) if phase == "body" else 0)
        if key != self.sweep_key:
            self.sweep_key, self.mark = key, now
            return
        lim, waited = self.limits, now - self.mark
        if phase == "body" and waited > lim.body_timeout_s:
            self._fail(408, f"request body stalled: no data for {lim.body_timeout_s:g} s")
        elif phase == "head" and waited > lim.header_timeout_s:
            self._fail(408, f"request head not complete within {lim.header_timeout_s:g} s")
        elif phase == "idle" and waited > (lim.idle_timeout_s if self.served else lim.header_timeout_s):
            self.close()

    @property
    def idle(self) -> bool:
        """Nothing in progress: no request being served, no bytes of the next one received."""
        return not self.busy and self.head is None and not self.buf and self.parsing is None
