"""`edgeopt-dashboard broker-config` run for real, and a real Mosquitto started with what it wrote.

Shown through that broker (TLS, per-account passwords, ACL): a client without an account is refused; a
device cannot publish another device's status or telemetry (so a spoofed retained ``offline`` never
reaches ingest) nor read another device's commands; the ingest account cannot send commands; the real
agent and the real ingest work through it, and a signed command from the dashboard account is answered.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agent_support import MOSQUITTO, agent_test_fixtures, free_port, wait_for
from edgeopt.agent.daemon import Agent
from edgeopt.sdk import topics
from edgeopt.sdk.telemetry import StatusPayload, TelemetryPayload

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

_fx = agent_test_fixtures()
agent_keys = _fx.agent_keys
command_keys = _fx.command_keys
BIN = Path(sys.executable).parent
FLEET = "plant"


@pytest.fixture
def acl_broker(tmp_path):
    """broker-config's output (via the real CLI) and a Mosquitto running it on a free port."""
    out, port = tmp_path / "broker", free_port()
    run = subprocess.run([str(BIN / "edgeopt-dashboard"), "broker-config", "--out", str(out), "--fleet", FLEET,
                          "--device", "cam-01", "--device", "cam-02", "--tls-generate", "127.0.0.1",
                          "--public-host", "127.0.0.1", "--port", str(port), "--bind", "127.0.0.1", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["accounts"] == ["edgeopt-dashboard", "edgeopt-ingest", "plant/cam-01",
                                                  "plant/cam-02"]
    # As root, mosquitto would switch to the "mosquitto" user, who cannot read pytest's tmp folders.
    conf = tmp_path / "run.conf"
    conf.write_text(f"user root\nlog_dest file {tmp_path / 'mosquitto.log'}\n"
                    + (out / "mosquitto.conf").read_text())
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening():
        if proc.poll() is not None:
            raise AssertionError(f"mosquitto exited: {proc.stderr.read().decode()[-800:]}")
        import socket

        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(listening, 15, what="mosquitto with the generated config")
    accounts = json.loads((out / "credentials.json").read_text())["accounts"]
    yield {"dir": out, "port": port, "ca": out / "ca.pem", "pw": {u: a["password"] for u, a in accounts.items()}}
    proc.terminate()
    proc.wait(10)
    proc.stderr.close()


class Client:
    """A paho MQTT 5 client over TLS that records connection outcome, SUBACKs and messages."""

    def __init__(self, broker, user: str | None, password: str | None = None, tls: bool = True):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.refused: str | None = None
        self.connected, self.done = threading.Event(), threading.Event()
        self.suback: list = []
        self.subscribed = threading.Event()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv5)
        if tls:
            self.c.tls_set(ca_certs=str(broker["ca"]))
        if user is not None:
            self.c.username_pw_set(user, password if password is not None else broker["pw"][user])
        self.c.on_connect = self._on_connect
        self.c.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload), m.retain))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: (self.suback.extend(rcs), self.subscribed.set())
        self.c.on_disconnect = lambda *a: self.done.set()
        try:
            self.c.connect("127.0.0.1", broker["port"], keepalive=10)
        except OSError as exc:  # e.g. plain MQTT against the TLS listener
            self.refused = f"{type(exc).__name__}: {exc}"
            self.done.set()
            return
        self.c.loop_start()
        assert wait_for(lambda: self.connected.is_set() or self.done.is_set(), 15, what="a CONNACK")

    def _on_connect(self, c, u, flags, rc, props):
        if rc.is_failure:
            self.refused = str(rc)
            self.done.set()
        else:
            self.connected.set()

    def publish(self, topic: str, payload: bytes, retain: bool = False):
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        return info

    def subscribe(self, *filters: str) -> list:
        self.subscribed.clear()
        self.c.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(10)
        return list(self.suback)

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


def _agent_config(tmp_path, broker, device: str, agent_keys, command_keys):
    from edgeopt.agent.config import AgentConfig

    section = tomllib.loads((broker["dir"] / "devices" / FLEET / f"{device}.toml").read_text())["broker"]
    section["keepalive_s"] = 5
    return AgentConfig.model_validate({
        "device_id": device, "fleet": FLEET, "broker": section, "state_dir": str(tmp_path / f"state-{device}"),
        "trusted_keys": [str(agent_keys.trusted_public)], "telemetry_interval_s": 0.3,
        "api": {"host": "127.0.0.1", "port": 0}, "control": {"trust_keys": [str(command_keys.public)]}})


def test_foreign_clients_are_refused(acl_broker):
    for user, password in ((None, None), ("plant/cam-01", "wrong-password"), ("intruder", "guess")):
        c = Client(acl_broker, user, password)
        try:
            assert c.refused in ("Not authorized", "Bad user name or password") and not c.connected.is_set(), user
        finally:
            c.close()
    plain = Client(acl_broker, "plant/cam-01", tls=False)  # the right password, in clear: no TLS, no session
    try:
        assert plain.done.is_set() and not plain.connected.is_set()
    finally:
        plain.close()
    good = Client(acl_broker, "plant/cam-01")
    assert good.connected.is_set() and good.refused is None  # the control: the right account gets in
    good.close()


def test_devices_are_confined_and_agent_and_ingest_work_through_the_broker(tmp_path, acl_broker, agent_keys,
                                                                          command_keys):
    from edgeopt.dashboard import models as m
    from edgeopt.dashboard.db import init_db, make_engine
    from edgeopt.dashboard.ingest import IngestService, IngestSettings
    from edgeopt.dashboard.mqtt_publish import mqtt_publisher

    port, ca, pw = acl_broker["port"], str(acl_broker["ca"]), acl_broker["pw"]
    db_url = f"sqlite:///{tmp_path / 'dash.db'}"
    init_db(db_url)
    engine = make_engine(db_url)
    ingest = IngestService(IngestSettings(broker=f"mqtts://edgeopt-ingest:{pw['edgeopt-ingest']}@127.0.0.1:{port}",
                                          ca_file=ca, database_url=db_url, group="edgeopt-ingest", flush_ms=50,
                                          rollup_every_s=0))
    ingest.start()
    agent = Agent(_agent_config(tmp_path, acl_broker, "cam-01", agent_keys, command_keys)).start()
    spy = Client(acl_broker, "plant/cam-02")
    try:
        def device(dev_id):
            with Session(engine) as s:
                return s.scalar(select(m.Device).where(m.Device.device_id == dev_id))

        def telemetry_rows():
            with Session(engine) as s:
                return s.scalar(select(func.count()).select_from(m.TelemetryRaw))

        wait_for(lambda: (d := device("cam-01")) is not None and d.status == "online", 30, what="cam-01 online")
        wait_for(lambda: telemetry_rows() >= 2, 30, what="cam-01 telemetry stored by ingest")

        # cam-02 (or whoever stole its password) tries to read cam-01's commands...
        # (Mosquitto grants the subscription and then delivers nothing the ACL does not let it read.)
        spy.subscribe(topics.topic(FLEET, "cam-01", "cmd"), "edgeopt/v1/#")
        # ...and to speak for cam-01: a retained offline status and forged telemetry, newest session/seq.
        sid = agent.envelope.session_id
        spoof = StatusPayload(device_id="cam-01", session_id=sid, seq=10**9, state="offline")
        spy.publish(topics.topic(FLEET, "cam-01", "status"), spoof.to_json(), retain=True)
        forged = TelemetryPayload(device_id="cam-01", session_id="forged", seq=1, interval_s=1.0)
        spy.publish(topics.topic(FLEET, "cam-01", "telemetry"), forged.to_json())
        spy.publish(topics.topic(FLEET, "cam-01", "cmd"), b'{"id": "x", "command": "ping"}')
        # Then its own status, which it may publish: once ingest has it, ingest got everything before it
        # (one connection, one status subscription: the broker keeps the order).
        own = StatusPayload(device_id="cam-02", session_id="s2", seq=1, state="online")
        spy.publish(topics.topic(FLEET, "cam-02", "status"), own.to_json(), retain=True)
        wait_for(lambda: (d := device("cam-02")) is not None and d.status == "online", 30, what="cam-02's own status")
        assert device("cam-01").status == "online"
        with Session(engine) as s:
            assert s.scalar(select(func.count()).select_from(m.TelemetryRaw)
                            .where(m.TelemetryRaw.session_id == "forged")) == 0

        # A fresh reader (the ingest account) sees cam-01's real retained status, not the spoof.
        reader = Client(acl_broker, "edgeopt-ingest")
        try:
            reader.subscribe(topics.topic(FLEET, "cam-01", "status"))
            (t, raw, retained), = wait_for(lambda: reader.messages, 10, what="the retained status")
            assert retained and json.loads(raw)["state"] == "online" and json.loads(raw)["seq"] < 10**9
            # The ingest account may not send commands.
            reader.publish(topics.topic(FLEET, "cam-01", "cmd"), b'{"id": "y", "command": "ping"}')
        finally:
            reader.close()

        # The dashboard account's signed command reaches cam-01, the result reaches the database via
        # ingest, and cam-02 never sees the command.
        raw = _fx.signed_command(command_keys.private, "ping", fleet=FLEET, device_id="cam-01", command_id="dash-1")
        with mqtt_publisher(f"mqtts://edgeopt-dashboard:{pw['edgeopt-dashboard']}@127.0.0.1:{port}",
                            ca_file=ca) as publish:
            publish(topics.topic(FLEET, "cam-01", "cmd"), raw)

        def result():
            with Session(engine) as s:
                return s.scalar(select(m.CommandResult).where(m.CommandResult.command_id == "dash-1"))

        res = wait_for(result, 30, what="the agent's result in the database")
        assert res.status == "succeeded" and res.message == "pong"
        assert spy.messages == []
        # Nothing forged reached the agent: not the spy's, not the ingest account's.
        assert agent.commands.refusals.total == 0
    finally:
        spy.close()
        agent.stop(flush_timeout=2)
        ingest.stop()
        engine.dispose()
