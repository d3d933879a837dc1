"""Shared by the agent benchmarks: build a real signed package, install it into a state directory, run
the real `edgeopt-agent` daemon as a subprocess, and drive its API with keep-alive HTTP clients.

Nothing here is a stand-in: the agent under test is the same process a device runs.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DIGITS_ONNX = ROOT / "tests" / "assets" / "digits" / "digits_cnn.onnx"
RESNET18_ONNX = ROOT / ".cache" / "assets" / "resnet18_v1.onnx"
DEVICE = {"onnxruntime": "CPUExecutionProvider", "openvino": "CPU"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resnet18_path() -> Path:
    """The ResNet-18-class test model (built once by tests/assets/make_resnet18.py into .cache/assets)."""
    if not RESNET18_ONNX.exists():
        # its progress goes to stderr: stdout may be a benchmark's --json document
        subprocess.run([sys.executable, str(ROOT / "tests" / "assets" / "make_resnet18.py"), str(RESNET18_ONNX)],
                       check=True, stdout=sys.stderr)
    return RESNET18_ONNX


def build_package(onnx_path: Path, work: Path, *, name: str, runtime: str, version: str = "1.0.0",
                  threads: int | None = None, spinning: bool | None = None) -> tuple[Path, Path]:
    """A signed package of ``onnx_path`` for ``runtime`` (ONNX as is, or converted to OpenVINO IR), with the
    shipped cpu profile (``spinning`` sets its ONNX Runtime block's ``intra_op_spinning``). Returns
    (package path, public key path)."""
    from edgeopt.agent.runtimes import get_runtime
    from edgeopt.sdk.package import Manifest, SourceModel, generate_keypair, load_private_key, sha256_file, \
        write_package
    from edgeopt.sdk.profile import load_profile

    work.mkdir(parents=True, exist_ok=True)
    priv, pub = generate_keypair(work / "keys", overwrite=True)
    if runtime == "openvino":
        import openvino as ov

        model_file = work / "model.xml"
        ov.save_model(ov.convert_model(str(onnx_path)), str(model_file), compress_to_fp16=False)
        artifacts: dict[str, Any] = {"model.xml": model_file, "model.bin": work / "model.bin"}
    else:
        model_file = onnx_path
        artifacts = {"model.onnx": onnx_path}
    loaded = get_runtime(runtime).load(model_file, device=DEVICE[runtime])
    profile = load_profile("cpu").to_dict()
    if threads:
        profile["threads"] = {"policy": "fixed", "count": threads}
    if spinning is not None:
        for block in profile["runtimes"]:
            if block["runtime"] == "onnxruntime":
                block["intra_op_spinning"] = spinning
    manifest = Manifest(name=name, version=version, profile=profile, runtime=runtime,
                        runtime_version=get_runtime(runtime).version(), device=DEVICE[runtime], precision="fp32",
                        model_file="model.xml" if runtime == "openvino" else "model.onnx",
                        inputs=loaded.inputs, outputs=loaded.outputs,
                        source_model=SourceModel(filename=onnx_path.name, format="onnx",
                                                 sha256=sha256_file(onnx_path)))
    loaded.close()
    out = work / f"{name}-{runtime}.eopkg"
    write_package(out, manifest, artifacts, load_private_key(priv))
    return out, pub


def write_config(work: Path, pub: Path, *, api_port: int, broker_port: int = 1883, interval_s: float = 10.0,
                 batching: dict[str, Any] | None = None, device_id: str = "bench-1",
                 event_loop: str = "asyncio") -> Path:
    b = {"enabled": True, "max_delay_ms": 2.0, "max_queue": 1024, **(batching or {})}
    lines = [f'device_id = "{device_id}"', 'fleet = "bench"', f'state_dir = "{work / "state"}"',
             f'trusted_keys = ["{pub}"]', f"telemetry_interval_s = {interval_s}",
             "[broker]", f'url = "mqtt://127.0.0.1:{broker_port}"',
             "[api]", 'host = "127.0.0.1"', f"port = {api_port}", f'event_loop = "{event_loop}"', "[batching]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in b.items()]
    path = work / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def install(config_path: Path, package: Path) -> None:
    from edgeopt.agent.config import load_config
    from edgeopt.agent.installer import Installer
    from edgeopt.agent.store import Store

    config = load_config(config_path)
    store = Store(config.state_dir)
    if store.current(package.stem.split("-")[0]) is None:
        Installer(store, config).install_file(package)


class Daemon:
    """`python -m edgeopt.agent.daemon --config FILE` as a subprocess, ready when /v2/health/ready is 200."""

    def __init__(self, config_path: Path, api_port: int):
        self.config_path, self.port = config_path, api_port
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Daemon":
        self.proc = subprocess.Popen([sys.executable, "-m", "edgeopt.agent.daemon", "--config", str(self.config_path),
                                      "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited: {self.proc.stderr.read().decode()[-1000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/v2/health/ready")
                if conn.getresponse().status == 200:
                    conn.close()
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("agent did not become ready in 120 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        if self.proc.stderr:
            self.proc.stderr.close()


def binary_request(x: np.ndarray, input_name: str = "images") -> tuple[bytes, dict[str, str]]:
    """A pre-encoded binary-tensor request (the client's encoding cost is not the agent's overhead)."""
    datatype = {"float32": "FP32", "float16": "FP16"}[x.dtype.name]
    header = json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": datatype,
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def json_request(x: np.ndarray, input_name: str = "images") -> tuple[bytes, dict[str, str]]:
    return json.dumps({"inputs": [{"name": input_name, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode(), {"Content-Type": "application/json"}


def post(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> int:
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    resp.read()
    return resp.status


class RawClient:
    """A minimal keep-alive HTTP/1.1 client on a raw socket with the request bytes built once.

    Load generators share the machine with the agent; http.client costs ~130 us of CPU per request on
    the 2-core test box, which would be charged to the agent's throughput. This costs a fraction of it.
    """

    def __init__(self, port: int, path: str, body: bytes, headers: dict[str, str]):
        self.request = http_request_bytes(port, path, body, headers)
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self) -> int:
        """Send the request, read the whole response; returns the HTTP status."""
        self.sock.sendall(self.request)
        buf = self.buf
        while True:
            end = buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("agent closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status = int(head[9:12])
        length = int(head.lower().split("content-length:", 1)[1].split("\r\n", 1)[0])
        need = end + 4 + length
        while len(buf) < need:
            chunk = self.sock.recv(max(65536, need - len(buf)))
            if not chunk:
                raise ConnectionError("agent closed the connection")
            buf += chunk
        self.buf = buf[need:]
        return status

    def close(self) -> None:
        self.sock.close()


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000.0
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "n": int(ms.size)}


def median_of(runs: list[dict[str, float]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def machine() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, load {os.getloadavg()[0]:.1f}"


def http_request_bytes(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """A keep-alive POST, built once and sent as is by the load generators."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def epoll_clients(port: int, request: bytes, connections: int, start_at: float,
                  stop_at: float) -> tuple[list[float], int]:
    """``connections`` closed-loop keep-alive clients driven by one thread on epoll (the way wrk drives its
    connections): each sends ``request``, reads the whole response, and sends again, from wall-clock
    ``start_at`` to ``stop_at``. Returns the latencies (s) of requests completed inside the window and the
    count of non-200 answers. One thread, no GIL hand-offs: about 15 us of CPU per request, a fraction of a
    thread-per-client generator's, so the agent, not the load generator, is what the run measures."""
    import selectors

    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(connections):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)  # blocking: sendall may wait on a large request; recv runs only once readable
    latencies: list[float] = []
    errors = 0
    time.sleep(max(0.0, start_at - time.time()))
    state = {}
    for s in socks:
        state[s] = [b"", time.perf_counter()]
        s.sendall(request)
        sel.register(s, selectors.EVENT_READ)
    live = len(socks)
    while live:
        for key, _ in sel.select(5.0):
            s = key.fileobj
            st = state[s]
            chunk = s.recv(1 << 20)
            if not chunk:
                raise ConnectionError("agent closed the connection")
            buf = st[0] + chunk
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                st[0] = buf
                continue
            i = buf.lower().find(b"content-length:", 0, end)
            need = end + 4 + int(buf[i + 15:buf.find(b"\r\n", i)])
            if len(buf) < need:
                st[0] = buf
                continue
            now = time.perf_counter()
            if buf[9:12] != b"200":
                errors += 1
            elif time.time() <= stop_at:  # only requests completed inside the window count
                latencies.append(now - st[1])
            st[0] = buf[need:]
            if time.time() < stop_at:
                st[1] = now
                s.sendall(request)
            else:
                sel.unregister(s)
                s.close()
                live -= 1
    return latencies, errors
