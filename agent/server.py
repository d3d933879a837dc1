"""The local inference API's HTTP/1.1 transport: one asyncio event loop in a background thread.

No web framework (the agent must not depend on flask): an event loop rather than
``http.server.ThreadingHTTPServer``, because with one thread per keep-alive connection 16 concurrent
clients spent most of the agent's CPU in thread switches and batching could not show its gain
(BENCHMARKS.md). Each connection is a small protocol object (:mod:`edgeopt.agent.connection`, heads
parsed by llhttp); inference waits on the model's batcher without holding a thread. uvicorn was measured
too: 1.56-1.66x the CPU per request of this transport, against 1.09-1.11x for llhttp inside it.

What one client can hold is bounded (:class:`HttpLimits`): head size, body size (compressed bodies too,
inflated off the loop), header/body/idle timeouts enforced by a sweep about once a second, and the number
of open connections. At the cap a new connection closes the longest-idle one (an idle keep-alive or a
half-sent head) rather than being refused, so a flood of idle sockets cannot lock out a real client;
only when every connection is busy is the new one answered 503. The cap is also kept below the
process's open-file limit (``RLIMIT_NOFILE``, and 1024, since the MQTT client uses ``select()``) minus a
reserve for the agent's own files and broker connection: running out of descriptors stopped telemetry
too. Routes and payloads are in :mod:`edgeopt.agent.api`.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import resource
import socket
import threading
import time
from typing import Any, Callable

from ..sdk.errors import UnsupportedError
from .api import AGENT_VERSION, Api, Deferred
from .caches import BoundedCache
from .connection import HttpConnection, HttpLimits
from .inflate import inflate
from .registry import BatchLimits, ModelEntry, ModelRegistry

__all__ = ["InferenceServer", "HttpLimits", "ModelRegistry", "ModelEntry", "BatchLimits", "AGENT_VERSION"]

log = logging.getLogger(__name__)

# Descriptors kept for the agent itself when the connection cap is derived from the open-file limit: model
# and runtime files, the broker connection, the outbox, downloads (17 in all with one model on ONNX Runtime),
# plus the accepted sockets allowed above the cap while their evicted victims close (ACCEPT_SLACK).
RESERVED_FDS = 160
# Sockets accepted per readiness event of the listening socket, and how many accepted sockets may be open
# above the connection cap (a new one is admitted at once, but the idle one it evicts is closed on the
# event loop's next turn). asyncio's own accept loop takes 100 a turn and keeps accepting on every turn
# before the evictions land: under a flood of connects it went ~200 descriptors past the cap (peak 214 with
# a cap of 96 measured here; past 256 on the CI machine, where accept() then failed with EMFILE). Here the
# accepted-but-not-closed count is bounded: at cap + ACCEPT_SLACK the listening socket is not read until
# connections close.
ACCEPT_BATCH = 16
ACCEPT_SLACK = 32
# paho-mqtt waits on its socket with select(), which cannot watch a descriptor numbered 1024 or more: if API
# sockets took every low number, the broker connection (opened again at each reconnect) would fail. So the
# API's sockets stay below this whatever LimitNOFILE allows.
SELECT_FD_LIMIT = 1024


def effective_max_connections(wanted: int) -> int:
    """``wanted``, lowered so the API's sockets plus :data:`RESERVED_FDS` fit under the soft open-file limit
    (``RLIMIT_NOFILE``) and under :data:`SELECT_FD_LIMIT`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = SELECT_FD_LIMIT if soft == resource.RLIM_INFINITY else min(soft, SELECT_FD_LIMIT)
    if room - RESERVED_FDS >= wanted:
        return wanted
    cap = max(8, room - RESERVED_FDS)
    log.warning("[api] max_connections = %d does not fit: open-file limit %d (descriptors from %d are out of "
                "reach of the MQTT client's select()), %d kept for the agent; using %d", wanted, soft,
                SELECT_FD_LIMIT, RESERVED_FDS, cap)
    return cap


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
                 event_loop: str = "asyncio", limits: HttpLimits | None = None):
        self._new_loop = event_loop_factory(event_loop)
        self.registry = registry
        self.api = Api(registry)
        self.limits = limits or HttpLimits()
        self.max_connections = effective_max_connections(self.limits.max_connections)
        # Parsed request heads by their bytes (per server: a head's checks depend on this server's limits).
        self.heads = BoundedCache(1024)
        self._sock = socket.create_server((host, port), backlog=1024)
        self._sock.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = False  # the listening socket is watched by the loop
        self._stopping = False
        self.sockets_open = 0  # accepted sockets not yet closed (admitted, refused or evicted but not closed)
        self.sockets_peak = 0  # the most accepted sockets open at once
        self.accept_paused = 0  # times accepting paused at cap + ACCEPT_SLACK or on an accept() error
        self._thread: threading.Thread | None = None
        self.connections: set[HttpConnection] = set()
        self.evicted = 0  # connections closed to make room for a new one
        self.refused = 0  # new connections answered 503 because every open one was busy
        self.inflating = 0  # request bodies being inflated on the worker thread now
        gauges = registry.metrics.extra_gauges
        gauges["edgeopt_api_connections"] = lambda: len(self.connections)
        gauges["edgeopt_api_connections_max"] = lambda: self.max_connections
        gauges["edgeopt_api_connections_evicted"] = lambda: self.evicted
        gauges["edgeopt_api_connections_refused"] = lambda: self.refused
        gauges["edgeopt_api_inflating"] = lambda: self.inflating
        gauges["edgeopt_api_sockets_open"] = lambda: self.sockets_open
        gauges["edgeopt_api_sockets_peak"] = lambda: self.sockets_peak
        gauges["edgeopt_api_accept_paused"] = lambda: self.accept_paused
        # One worker: compressed bodies inflate one at a time, so memory stays within one body limit.
        self._inflater = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="api-inflate")
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
        self._watch_listener()
        lim = self.limits
        self._tick = max(0.05, min(1.0, lim.header_timeout_s / 4, lim.body_timeout_s / 4, lim.idle_timeout_s / 4))
        loop.call_later(self._tick, self._sweep)
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # ------------------------------------------------------------------ accepting (event loop thread)
    def _watch_listener(self) -> None:
        if not self._accepting and not self._stopping and self._loop is not None:
            self._accepting = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _unwatch_listener(self) -> None:
        if self._accepting and self._loop is not None:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())
            self.accept_paused += 1

    def _accept(self) -> None:
        """The listening socket is readable: accept up to :data:`ACCEPT_BATCH` sockets while the open ones stay
        within the cap plus :data:`ACCEPT_SLACK`; past that, stop watching it until connections close."""
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            if self.sockets_open >= self.max_connections + ACCEPT_SLACK:
                self._unwatch_listener()  # :meth:`released` watches it again
                return
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait for descriptors to come back
                log.warning("[api] accepting a connection failed (%s); pausing new connections for 1 s", exc)
                self._unwatch_listener()
                self._loop.call_later(1.0, self._watch_listener)
                return
            sock.setblocking(False)
            self.sockets_open += 1
            self.sockets_peak = max(self.sockets_peak, self.sockets_open)
            self._loop.create_task(self._connect(sock))

    async def _connect(self, sock: socket.socket) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(lambda: HttpConnection(self), sock=sock)
        except Exception:  # the client went away before the transport existed
            sock.close()
            self.released()

    def released(self) -> None:
        """An accepted socket was closed (:meth:`HttpConnection.connection_lost`)."""
        self.sockets_open -= 1
        if not self._accepting and self.sockets_open < self.max_connections + ACCEPT_SLACK:
            self._watch_listener()

    # ------------------------------------------------------------------ connections (event loop thread)
    def admit(self, conn: HttpConnection) -> bool:
        """A new connection: make room at the cap by closing the longest-idle one; False when all are busy."""
        if len(self.connections) >= self.max_connections:
            # Idle keep-alives first, then half-sent heads, then stalled bodies; oldest first in each.
            victim = min((c for c in self.connections if not c.busy and not c.closing),
                         key=lambda c: (c.head is not None, not c.idle, c.mark), default=None)
            if victim is None:
                self.refused += 1
                return False
            self.evicted += 1
            victim.closing = True
            self.connections.discard(victim)
            if victim.transport is not None:
                victim.transport.abort()
        self.connections.add(conn)
        return True

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.connections):
            try:
                conn.expire(now)
            except Exception:  # one broken connection must not end the sweep for all
                log.exception("connection timeout check failed")
        assert self._loop is not None
        if self._loop.is_running():
            self._loop.call_later(self._tick, self._sweep)

    def inflate_later(self, conn: HttpConnection, coding: str, method: str, target: str, headers: Any,
                      body: bytes, keep: bool) -> None:
        """Inflate ``body`` on the worker thread; the connection continues when it is done."""
        assert self._loop is not None
        self.inflating += 1
        future = self._loop.run_in_executor(self._inflater, inflate, coding, body, self.limits.max_body_bytes)

        def done(f: Any) -> None:
            self.inflating -= 1
            conn.inflated(f, method, target, headers, keep)

        future.add_done_callback(done)

    def _await(self, conn: HttpConnection, deferred: Deferred, keep: bool) -> None:
        deferred.pending.on_done(lambda: self._completed(conn, deferred, keep))

    def _completed(self, conn: HttpConnection, deferred: Deferred, keep: bool) -> None:
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
        self._inflater.shutdown(wait=False, cancel_futures=True)
        if loop is None or not loop.is_running():
            self._sock.close()
            return

        async def shutdown() -> None:
            self._stopping = True
            self._unwatch_listener()
            self._sock.close()
            deadline = loop.time() + grace_s
            while any(c.busy for c in self.connections) and loop.time() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            await asyncio.sleep(0)
            loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), loop)
        if self._thread is not None:
            self._thread.join(grace_s + 5)

