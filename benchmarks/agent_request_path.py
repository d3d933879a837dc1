"""The agent API's own per-request cost, in two parts, each against a baseline timed in the same run.

1. The Python request path without sockets: the real ``HttpConnection`` and ``Api`` decode one binary
   digits request, queue it, and encode and frame the answer (the runtime call is replaced by a finished
   result, so only the agent's own work is timed). "first sight" clears the parse-once caches before every
   request, which is what every request cost before they existed; "repeat" is a client sending the same
   kind of request again, the usual case; "head parsed again" keeps every cache but the request-head one,
   so llhttp parses each head (the cost the head cache saves).
2. The event loop's transport alone: a bare protocol that answers every request with fixed bytes, on the
   standard library's asyncio loop and on uvloop (when installed), driven by 16 keep-alive connections on
   one epoll thread in another process. Server CPU per request from the process's CPU time.

Rounds alternate the variants; the tables show medians of rounds.

Run:  .venv/bin/python benchmarks/agent_request_path.py [--requests 20000] [--rounds 5] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import DIGITS_ONNX, binary_request, epoll_clients, free_port, http_request_bytes, machine  # noqa: E402


def request_path(n: int, rounds: int) -> dict[str, float]:
    """Microseconds per request through the protocol and the API, caches warm vs cleared."""
    from edgeopt.agent import connection, kserve
    from edgeopt.agent.api import Api
    from edgeopt.agent.caches import BoundedCache
    from edgeopt.agent.batcher import Pending
    from edgeopt.agent.metrics import Metrics
    from edgeopt.agent.runtimes import get_runtime

    loaded = get_runtime("onnxruntime").load(DIGITS_ONNX)
    x = np.load(DIGITS_ONNX.parent / "digits_heldout.npz")["images"][:1]
    result = loaded.infer({"images": x})

    class Finished:
        """Stands in for the batcher: the request is answered with a real result at once."""
        batchable, max_batch = True, 16

        def submit(self, feeds, signature=None):
            pending = Pending(feeds, 1, signature or ())
            pending.finish(outputs=result)
            return pending

    metrics = Metrics()
    entry = types.SimpleNamespace(name="digits", version="1.0.0", loaded=loaded, batcher=Finished(),
                                  metrics=metrics.model("digits"))
    registry = types.SimpleNamespace(metrics=metrics, get=lambda name: entry, entries=lambda: [entry])

    class Transport:
        def write(self, data):
            pass

    class Server:
        api = Api(registry)
        limits = connection.HttpLimits()
        heads = BoundedCache(1024)

        def admit(self, conn):
            return True

        def _await(self, conn, deferred, keep):
            conn.finished(deferred, keep)

    body, headers = binary_request(x)
    raw = http_request_bytes(8470, "/v2/models/digits/infer", body, headers)
    srv = Server()
    proto = connection.HttpConnection(srv)
    proto.connection_made(Transport())

    def clear() -> None:
        for cache in (srv.heads, connection._RESPONSE_HEADS, kserve._BINARY_PLANS, kserve._RESPONSE_HEADERS):
            cache.clear()

    def repeat() -> float:
        t = time.perf_counter()
        for _ in range(n):
            proto.data_received(raw)
        return (time.perf_counter() - t) / n * 1e6

    def first_sight() -> float:
        total = 0.0
        for _ in range(n):
            clear()
            t = time.perf_counter()
            proto.data_received(raw)
            total += time.perf_counter() - t
        return total / n * 1e6

    def no_head_cache() -> float:
        """Every cache warm but the request-head one: llhttp parses every head (does that cache still pay?)."""
        total = 0.0
        for _ in range(n):
            srv.heads.clear()
            t = time.perf_counter()
            proto.data_received(raw)
            total += time.perf_counter() - t
        return total / n * 1e6

    variants = {"first sight (caches cleared)": first_sight, "repeat, head parsed again (llhttp)": no_head_cache,
                "repeat (caches warm)": repeat}
    for _ in range(2):  # warm up all
        for fn in variants.values():
            fn()
    runs: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            runs[name].append(fn())
    loaded.close()
    return {k: statistics.median(v) for k, v in runs.items()}


_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100\r\n\r\n" + b"x" * 100


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(_RESPONSE)


def _serve(port: int, kind: str, ready) -> None:
    if kind == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    loop.run_until_complete(loop.create_server(_Echo, "127.0.0.1", port))
    ready.set()
    loop.run_forever()


def _clients(port: int, request: bytes, start_at: float, stop_at: float, out) -> None:
    out.put(epoll_clients(port, request, 16, start_at, stop_at))


def transport(kind: str, seconds: float) -> tuple[float, float]:
    """(requests/s, server CPU us per request) for the bare protocol on ``kind``'s loop."""
    import psutil

    ctx = multiprocessing.get_context("fork")
    port, ready, out = free_port(), ctx.Event(), ctx.Queue()
    srv = ctx.Process(target=_serve, args=(port, kind, ready), daemon=True)
    srv.start()
    ready.wait(10)
    request = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3000\r\n\r\n" + b"y" * 3000
    start_at = time.time() + 0.5
    client = ctx.Process(target=_clients, args=(port, request, start_at, start_at + seconds, out))
    client.start()
    proc = psutil.Process(srv.pid)
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = sum(proc.cpu_times()[:2])
    latencies, _ = out.get(timeout=seconds + 60)
    cpu1 = sum(proc.cpu_times()[:2])
    client.join(10)
    srv.kill()
    srv.join(5)
    return len(latencies) / seconds, (cpu1 - cpu0) / max(1, len(latencies)) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000, help="requests per round of the request-path part")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per round of the transport part")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    path = request_path(args.requests, args.rounds)
    kinds = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        kinds.append("uvloop")
    except ImportError:
        pass
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            runs[kind].append(transport(kind, args.seconds))
    loops = {k: {"throughput": statistics.median(r[0] for r in v), "cpu_us": statistics.median(r[1] for r in v)}
             for k, v in runs.items()}
    doc = {"machine": machine(), "request_path_us": path, "transport": loops}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=140)
    table = Table(title=f"Agent request path without sockets, binary digits request ({machine()})")
    for col in ("variant", "us per request", "ratio vs first sight"):
        table.add_column(col)
    base = path["first sight (caches cleared)"]
    for name, us in path.items():
        table.add_row(name, f"{us:.1f}", f"{base / us:.2f}x")
    console.print(table)
    table = Table(title="Event loop transport alone: bare protocol, 16 keep-alive connections")
    for col in ("loop", "requests/s", "server CPU us/request", "CPU ratio vs asyncio"):
        table.add_column(col)
    for kind, r in loops.items():
        table.add_row(kind, f"{r['throughput']:.0f}", f"{r['cpu_us']:.1f}",
                      f"{loops['asyncio']['cpu_us'] / r['cpu_us']:.2f}x")
    console.print(table)


if __name__ == "__main__":
    main()
