"""Helpers for the agent integration tests: a Mosquitto broker of our own, a plain MQTT subscriber,
an HTTP client for the inference API. Imported by tests/integration/test_agent_*.py (pytest puts this
folder on sys.path)."""
from __future__ import annotations

import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeopt.sdk import topics
from edgeopt.sdk.telemetry import parse_payload

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Broker:
    """A Mosquitto process on a free port, with persistence so sessions survive a restart."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = ""):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            # As root mosquitto would drop to the "mosquitto" user, who cannot read pytest's private tmp
            # folders; the option has no effect when the tests run as a normal user.
            "user root\n"
            f"listener {self.port} 127.0.0.1\n"
            f"persistence true\npersistence_location {self.dir}/\nautosave_interval 1\n"
            f"log_dest file {self.dir / 'mosquitto.log'}\n"
            + (extra_conf or "allow_anonymous true\n"))
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode()[-500:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(listening, 10, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto saves its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None


class Subscriber:
    """A plain paho MQTT 5 client that records every edgeopt message of one device (what a dashboard sees).

    With ``persistent`` it keeps a broker session, so QoS 1 messages published while it was away (for
    example while both reconnect after a broker restart) are delivered when it returns.
    """

    def __init__(self, host: str, port: int, fleet: str, device_id: str, persistent: bool = False):
        self.messages: list[tuple[str, object]] = []
        self.raw: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.filter = f"{topics.PREFIX}/{topics.VERSION}/{fleet}/{device_id}/#"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.connected.clear()
        self.client.reconnect_delay_set(0.2, 1)
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 600
        self.client.connect_async(host, port, keepalive=10, clean_start=not persistent, properties=props)
        self.client.loop_start()
        wait_for(self.subscribed.is_set, 15, what="the test subscriber's subscription")

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            return
        client.subscribe(self.filter, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, msg):
        kind = topics.parse(msg.topic).kind
        with self.lock:
            self.raw.append((msg.topic, bytes(msg.payload), msg.retain))
            if kind == "cmd":
                return
            self.messages.append((kind, parse_payload(kind, msg.payload) if msg.payload else None))

    def of(self, kind: str) -> list:
        with self.lock:
            return [p for k, p in self.messages if k == kind and p is not None]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_command(host: str, port: int, fleet: str, device_id: str, payload: bytes | dict) -> None:
    """Publish one message (QoS 1) on a device's cmd topic, as it is (see :func:`send_command` for a signed one)."""
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect(host, port)
    client.loop_start()
    client.publish(topics.topic(fleet, device_id, "cmd"), body, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def send_command(host: str, port: int, key: Path, fleet: str, device_id: str, command_id: str, command: str,
                 args: dict | None = None, **fields) -> bytes:
    """Sign a command with ``key`` (as the dashboard does) and publish it; returns the bytes sent."""
    raw = agent_test_fixtures().signed_command(key, command, fleet=fleet, device_id=device_id, args=args,
                                               command_id=command_id, **fields)
    publish_command(host, port, fleet, device_id, raw)
    return raw


def infer(address: tuple[str, int], x: np.ndarray, model: str = "digits", conn=None) -> tuple[int, dict]:
    """POST one JSON inference request; returns (status, decoded body)."""
    own = conn is None
    conn = conn or http.client.HTTPConnection(*address, timeout=30)
    try:
        body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}).encode()
        conn.request("POST", f"/v2/models/{model}/infer", body=body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        if own:
            conn.close()


def agent_test_fixtures():
    """tests/agent/conftest.py as a module, so integration tests can reuse ``make_package`` and ``agent_keys``."""
    import importlib.util
    import sys

    name = "edgeopt_test_agent_conftest"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "agent" / "conftest.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def agent_config(state_dir: Path, keys, broker_url: str, device_id: str | None = None, **overrides):
    """An AgentConfig for tests: API on a free loopback port, fast telemetry, batching up to 8."""
    from edgeopt.agent.config import AgentConfig

    doc = {"device_id": device_id or f"it-{uuid.uuid4().hex[:8]}", "fleet": "itest",
           "broker": {"url": broker_url, "keepalive_s": 5}, "state_dir": str(state_dir),
           "trusted_keys": [str(keys.trusted_public)], "telemetry_interval_s": 0.3,
           "api": {"host": "127.0.0.1", "port": 0}, "batching": {"max_batch": 8, "max_delay_ms": 2}}
    doc.update(overrides)
    return AgentConfig.model_validate(doc)


def package_as_version(src: Path, dst: Path, version: str, private_key: Path) -> Path:
    """The same package as another version, signed again (what a rebuild with --version would give)."""
    import io
    import tarfile

    from edgeopt.sdk.package import load_private_key, sign_manifest

    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        members = {m.name: tin.extractfile(m).read() for m in tin.getmembers() if m.isfile()}
        doc = json.loads(members["manifest.json"])
        doc["version"] = version
        members["manifest.json"] = json.dumps(doc, indent=1).encode()
        members["manifest.sig"] = sign_manifest(members["manifest.json"], load_private_key(private_key))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tout.addfile(info, io.BytesIO(data))
    return dst


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM every process, then wait for each (killing one that outlives ``grace_s``)."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
