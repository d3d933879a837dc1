"""The real `edgeopt-agent` daemon against hostile API clients: what it costs the other clients.

1. Gzip bomb: one 1 MB ``Content-Encoding: gzip`` body that inflates to 1 GiB. Reported: the answer, the
   daemon's resident memory before and its peak (VmHWM) after, and the slowest ``/v2/health/live`` answer a
   second client saw while the bomb was being handled (how long the event loop was blocked).
2. Idle flood: the daemon started with ``RLIMIT_NOFILE`` = 1024 (systemd's default) and 1,100 idle
   connections opened to it; then one inference from a new client (answered, or timed out after 10 s),
   and the daemon's open descriptors.

Run:  .venv/bin/python benchmarks/agent_hostile_clients.py [--json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agent_common import (DIGITS_ONNX, Daemon, build_package, free_port, install, json_request,  # noqa: E402
                          machine, write_config)


class LimitedDaemon(Daemon):
    """The daemon with its open-file limit (soft and hard) set to ``nofile``."""

    def __init__(self, config_path: Path, api_port: int, nofile: int):
        super().__init__(config_path, api_port)
        self.nofile = nofile

    def __enter__(self) -> "LimitedDaemon":
        real = subprocess.Popen

        def popen(*args, **kw):
            kw["preexec_fn"] = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
            return real(*args, **kw)

        subprocess.Popen = popen  # type: ignore[misc]
        try:
            super().__enter__()
        finally:
            subprocess.Popen = real  # type: ignore[misc]
        return self


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def gzip_bomb(daemon: Daemon) -> dict:
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(16 * 1024 * 1024)
    bomb = b"".join(comp.compress(zeros) for _ in range(64)) + comp.flush()
    rss_before = _status_kb(daemon.pid, "VmRSS")
    stop, worst = threading.Event(), [0.0]

    def prober() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        while not stop.is_set():
            t = time.perf_counter()
            conn.request("GET", "/v2/health/live")
            conn.getresponse().read()
            worst[0] = max(worst[0], time.perf_counter() - t)
            time.sleep(0.005)
        conn.close()

    probe = threading.Thread(target=prober)
    probe.start()
    time.sleep(0.2)
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    t = time.perf_counter()
    conn.request("POST", "/v2/models/digits/infer", body=bomb, headers={"Content-Encoding": "gzip"})
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.perf_counter() - t
    time.sleep(0.2)
    stop.set()
    probe.join(60)
    conn.close()
    return {"compressed_bytes": len(bomb), "status": resp.status, "answer": body[:120].decode(errors="replace"),
            "seconds": round(elapsed, 2), "rss_before_mb": round(rss_before / 1024),
            "peak_rss_mb": round(_status_kb(daemon.pid, "VmHWM") / 1024),
            "slowest_health_answer_s": round(worst[0], 3)}


def idle_flood(daemon: Daemon, count: int) -> dict:
    flood = []
    for _ in range(count):
        try:
            flood.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        except OSError:
            break
    time.sleep(1.0)
    x = np.zeros((1, 1, 8, 8), np.float32)
    body, headers = json_request(x)
    t = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        conn.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
        outcome = f"HTTP {conn.getresponse().status}"
        conn.close()
    except OSError as exc:
        outcome = f"failed: {type(exc).__name__} {exc}"
    elapsed = time.perf_counter() - t
    fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    for s in flood:
        s.close()
    return {"idle_connections": len(flood), "new_client_inference": outcome, "seconds": round(elapsed, 3),
            "daemon_open_fds": fds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--flood", type=int, default=1100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        package, pub = build_package(DIGITS_ONNX, work / "pkg", name="digits", runtime="onnxruntime")
        port = free_port()
        config = write_config(work, pub, api_port=port, broker_port=free_port())
        install(config, package)
        with Daemon(config, port) as daemon:
            bomb = gzip_bomb(daemon)
        with LimitedDaemon(config, port, 1024) as daemon:
            flood = idle_flood(daemon, args.flood)
    doc = {"machine": machine(), "gzip_bomb": bomb, "idle_flood_nofile_1024": flood}
    print(json.dumps(doc, indent=2) if args.json else doc)


if __name__ == "__main__":
    main()
