"""The probe's attacks on the control channel, replayed against a real agent through a real Mosquitto.

In the probe, ``mosquitto_pub`` to a device's ``cmd`` topic rolled its model back, set its telemetry
interval to 3600 s and made it fetch ``http://127.0.0.1:5432/`` (the error quoted what answered there).
Here the same messages, sent with the same tool, change nothing; signed commands still work; a captured
signed command cannot be replayed, not even after an agent restart.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import urllib.request

import numpy as np
import pytest

from agent_support import Broker, Subscriber, agent_config, agent_test_fixtures, infer, publish_command, send_command, \
    wait_for
from edgeopt.agent.daemon import Agent

_fx = agent_test_fixtures()
make_package = _fx.make_package
agent_keys = _fx.agent_keys
command_keys = _fx.command_keys

MOSQUITTO_PUB = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"


class Banner:
    """Another service on the LAN (a database): answers every connection with a secret, counts them."""

    SECRET = b"SFATAL secret banner of another service"

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(self.SECRET + b"\r\n\r\n")


@pytest.fixture
def banner():
    b = Banner()
    yield b
    b.sock.close()


@pytest.fixture
def images(digits_heldout):
    return np.load(digits_heldout)["images"][:2]


@pytest.fixture
def broker(tmp_path):
    b = Broker(tmp_path / "broker").start()
    yield b
    b.stop()


def _mosquitto_pub(port: int, topic: str, doc: dict) -> None:
    """What the attacker ran: the stock client, anonymous, QoS 1."""
    subprocess.run([MOSQUITTO_PUB, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic,
                    "-m", json.dumps(doc)], check=True, timeout=30)


def _served(agent, images) -> str:
    code, body = infer(agent.server.address, images[:1])
    assert code == 200, body
    return body["model_version"]


def _metric(agent, name: str) -> float:
    host, port = agent.server.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_unsigned_commands_from_the_broker_change_nothing(tmp_path, broker, agent_keys, command_keys, make_package,
                                                          images, banner):
    store = f"http://127.0.0.1:{banner.port + 1}/dl/"  # the package store is elsewhere; the banner is not it
    config = agent_config(tmp_path / "state", agent_keys, broker.url, telemetry_interval_s=0.5,
                          control={"trust_keys": [str(command_keys.public)]}, download={"allowed_urls": [store]})
    sub = Subscriber("127.0.0.1", broker.port, config.fleet, config.device_id)
    agent = Agent(config).start()
    try:
        agent.installer.install_file(make_package("1.0.0"))
        agent.installer.install_file(make_package("1.1.0"))
        wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
        cmd_topic = f"edgeopt/v1/{config.fleet}/{config.device_id}/cmd"
        _mosquitto_pub(broker.port, cmd_topic, {"id": "a1", "command": "rollback", "args": {"model": "digits"}})
        _mosquitto_pub(broker.port, cmd_topic, {"id": "a2", "command": "set-config",
                                                "args": {"telemetry_interval_s": 3600}})
        _mosquitto_pub(broker.port, cmd_topic, {"id": "a3", "command": "deploy", "args": {
            "package_url": f"http://127.0.0.1:{banner.port}/", "sha256": "0" * 64}})
        # A signed ping after them: once it is answered, the agent has read (and refused) all three.
        send_command("127.0.0.1", broker.port, command_keys.private, config.fleet, config.device_id, "ok-1", "ping")
        wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "ok-1"], 30, what="the signed ping")

        assert _served(agent, images) == "1.1.0"  # not rolled back
        assert agent.reporter.interval_s == 0.5  # not 3600
        assert banner.connections == 0  # never fetched
        assert {r.command_id for r in sub.of("cmd/result")} == {"ok-1"}  # forged ids get no result
        assert agent.commands.refusals.by_reason == {"unsigned": 3}
        assert _metric(agent, "edgeopt_commands_refused_total") == 3
        refused = wait_for(lambda: [e for e in sub.of("events") if e.event == "refused"], 15, what="refused event")
        assert refused[0].details["reason"] == "unsigned" and refused[0].details["claimed_command_id"] == "a1"
        assert refused[0].message.startswith("command refused: unsigned command")

        # Signed (a dashboard bug, or its key misused) but pointing at another service: refused before
        # any connection, and nothing that service would say can appear in the result.
        send_command("127.0.0.1", broker.port, command_keys.private, config.fleet, config.device_id, "ok-2",
                     "deploy", {"package_url": f"http://127.0.0.1:{banner.port}/", "sha256": "0" * 64})
        (res,) = wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "ok-2"], 30,
                          what="the result of the deploy outside the store")
        assert res.status == "rejected" and "outside the package store" in res.message
        assert banner.connections == 0 and "SFATAL" not in res.message
        assert _served(agent, images) == "1.1.0"
    finally:
        agent.stop(flush_timeout=2)
        sub.close()


def test_a_captured_signed_command_cannot_be_replayed_even_after_a_restart(tmp_path, broker, agent_keys,
                                                                          command_keys, make_package, images):
    config = agent_config(tmp_path / "state", agent_keys, broker.url,
                          control={"trust_keys": [str(command_keys.public)]})
    sub = Subscriber("127.0.0.1", broker.port, config.fleet, config.device_id)
    agent = Agent(config).start()
    fleet, dev = config.fleet, config.device_id
    try:
        agent.installer.install_file(make_package("1.0.0"))
        agent.installer.install_file(make_package("1.1.0"))
        wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
        captured = send_command("127.0.0.1", broker.port, command_keys.private, fleet, dev, "rb-1", "rollback",
                                {"model": "digits", "version": "1.0.0"})
        wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "rb-1" and r.status == "succeeded"],
                 60, what="the legitimate rollback")
        assert _served(agent, images) == "1.0.0"
        agent.installer.install_file(make_package("1.2.0"))
        assert _served(agent, images) == "1.2.0"

        publish_command("127.0.0.1", broker.port, fleet, dev, captured)  # the attacker replays the bytes
        wait_for(lambda: agent.commands.refusals.by_reason.get("replayed") == 1, 30, what="the replay refused")
        assert _served(agent, images) == "1.2.0"
    finally:
        agent.stop(flush_timeout=2)

    second = Agent(config).start()  # a restart must not reopen the window
    try:
        wait_for(second.link.connected.is_set, 15, what="the restarted agent's connection")
        publish_command("127.0.0.1", broker.port, fleet, dev, captured)
        send_command("127.0.0.1", broker.port, command_keys.private, fleet, dev, "ok-after", "ping")
        wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "ok-after"], 30,
                 what="the ping after the replay")
        assert second.commands.refusals.by_reason == {"replayed": 1}
        assert _served(second, images) == "1.2.0"
        assert [r.status for r in sub.of("cmd/result") if r.command_id == "rb-1"] == ["accepted", "succeeded"]
    finally:
        second.stop(flush_timeout=2)
        sub.close()
