"""The agent end to end with real parts: the Mosquitto on 127.0.0.1:1883 (or one started here on a free
port for outage tests), real signed digits packages, real ONNX Runtime, a plain paho subscriber standing
in for the dashboard."""
from __future__ import annotations

import hashlib
import http.server
import json
import platform
import threading
from functools import partial

import numpy as np
import pytest

from agent_support import (Broker, Subscriber, agent_config, agent_test_fixtures, infer, publish_command,
                           send_command, wait_for)
from edgeopt.agent.daemon import Agent

_fx = agent_test_fixtures()
make_package = _fx.make_package
agent_keys = _fx.agent_keys
command_keys = _fx.command_keys

SHARED_BROKER = ("127.0.0.1", 1883)


@pytest.fixture(scope="module")
def images(digits_heldout):
    return np.load(digits_heldout)["images"][:16]


@pytest.fixture
def started(tmp_path, agent_keys, command_keys):
    """Factory: start an Agent (stopped at teardown) with a subscriber on the same broker. The agent trusts
    ``command_keys.public`` for commands."""
    running: list = []

    def start(broker_url: str = "mqtt://127.0.0.1:1883", sub_port: int = 1883, **overrides):
        overrides.setdefault("control", {"trust_keys": [str(command_keys.public)]})
        config = agent_config(tmp_path / f"state-{len(running)}", agent_keys, broker_url, **overrides)
        sub = Subscriber("127.0.0.1", sub_port, config.fleet, config.device_id)
        agent = Agent(config).start()
        running.append((agent, sub))
        return agent, sub

    yield start
    for agent, sub in running:
        if not agent._stop.is_set():
            agent.stop(flush_timeout=2)
        sub.close()


def test_install_serve_and_telemetry_reach_a_plain_subscriber(started, make_package, images):
    agent, sub = started()
    wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
    status = wait_for(lambda: sub.of("status"), 10, what="the birth message")[-1]
    assert status.state == "online" and status.session_id == agent.envelope.session_id
    # The probe's report, as the agent holds it (after a JSON round trip), with this machine's ONNX Runtime.
    caps = status.capabilities
    assert caps == json.loads(json.dumps(agent.capabilities, default=str))
    assert caps["arch"] == platform.machine() and caps["os"] == platform.system()
    assert caps["runtimes"]["onnxruntime"]["available"] is True
    assert caps["ort_providers"] == caps["runtimes"]["onnxruntime"]["devices"]
    assert "CPUExecutionProvider" in caps["ort_providers"]
    assert status.packages == []

    installed = agent.installer.install_file(make_package("1.0.0"))
    assert installed.version == "1.0.0"
    for i in range(6):
        code, body = infer(agent.server.address, images[i:i + 1])
        assert code == 200 and body["model_version"] == "1.0.0"

    def telemetry_with_requests():
        return [t for t in sub.of("telemetry") if any(m.model == "digits" and m.requests for m in t.models)]

    tel = wait_for(telemetry_with_requests, 15, what="telemetry with digits requests")
    stats = next(m for m in tel[0].models if m.model == "digits")
    assert sum(m.requests for t in sub.of("telemetry") for m in t.models if m.model == "digits") == 6
    assert stats.version == "1.0.0" and stats.p50_ms is not None and stats.p99_ms >= stats.p50_ms
    assert sum(stats.latency.counts) == stats.requests and sum(stats.batch_sizes.values()) >= 1
    assert tel[0].system.rss_bytes > 0 and tel[0].system.cpu_percent is not None
    events = {(e.event, e.ok) for e in sub.of("events")}
    assert {("started", True), ("self_test", True), ("switch", True), ("install", True)} <= events
    # The birth is re-published after the switch with the installed package.
    wait_for(lambda: any(s.packages and s.packages[0].version == "1.0.0" for s in sub.of("status")), 10,
             what="a status listing digits 1.0.0")

    agent.stop()
    offline = wait_for(lambda: [s for s in sub.of("status") if s.state == "offline"], 10, what="offline status")
    assert offline[-1].session_id == agent.envelope.session_id
    stopped = [e for e in sub.of("events") if e.event == "stopped"]
    assert stopped, "the stopped event is flushed before disconnecting"
    # Every payload of the session carries a distinct seq.
    seqs = [p.seq for _, p in sub.messages if p.session_id == agent.envelope.session_id]
    assert len(seqs) == len(set(seqs))


def test_commands_over_mqtt_garbage_ping_set_config(started, command_keys):
    agent, sub = started()
    wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
    fleet, dev = agent.config.fleet, agent.config.device_id
    key = command_keys.private
    publish_command(*SHARED_BROKER, fleet, dev, b"\x00garbage")
    # Signed by the dashboard, but for another device: someone replaying it here is refused.
    other = agent_test_fixtures().signed_command(key, "ping", fleet=fleet, device_id="someone-else", command_id="c-x")
    publish_command(*SHARED_BROKER, fleet, dev, other)
    send_command(*SHARED_BROKER, key, fleet, dev, "c-bad-args", "deploy", {"url": 1})
    send_command(*SHARED_BROKER, key, fleet, dev, "c-ping", "ping")
    send_command(*SHARED_BROKER, key, fleet, dev, "c-cfg", "set-config",
                 {"telemetry_interval_s": 5, "batching": {"max_batch": 4}})
    results = wait_for(lambda: len(sub.of("cmd/result")) >= 3 and sub.of("cmd/result"), 15,
                       what="three command results")
    by_id = {r.command_id: r for r in results}
    assert by_id["c-bad-args"].status == "rejected"
    assert by_id["c-bad-args"].message.startswith("bad deploy arguments:")
    assert by_id["c-ping"].status == "succeeded" and by_id["c-ping"].message == "pong"
    assert by_id["c-cfg"].status == "succeeded"
    assert agent.reporter.interval_s == 5.0 and agent.registry.limits.max_batch == 4
    # Garbage and the command for another device get no result, only a refused event and a count.
    assert set(by_id) == {"c-bad-args", "c-ping", "c-cfg"}
    refused = wait_for(lambda: [e for e in sub.of("events") if e.event == "refused"], 15, what="a refused event")
    assert refused[0].details["reason"] == "malformed" and refused[0].command_id is None
    assert agent.commands.refusals.total == 2
    assert agent.link.connected.is_set()  # still alive and connected after the garbage


def test_deploy_command_downloads_installs_and_serves(started, make_package, images, tmp_path, command_keys):
    pkg = make_package("2.0.0")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(pkg.parent))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    store = f"http://127.0.0.1:{httpd.server_address[1]}/"
    agent, sub = started(download={"allowed_urls": [store]})
    wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
    fleet, dev, key = agent.config.fleet, agent.config.device_id, command_keys.private
    try:
        url = store + pkg.name
        sha = hashlib.sha256(pkg.read_bytes()).hexdigest()
        send_command(*SHARED_BROKER, key, fleet, dev, "dep-1", "deploy",
                     {"package_url": url, "sha256": sha, "size": pkg.stat().st_size}, deployment_id="D1")
        done = wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "dep-1"
                                 and r.status in ("succeeded", "failed")], 60, what="the deploy result")
        assert done[0].status == "succeeded", done[0].message
        statuses = [r.status for r in sub.of("cmd/result") if r.command_id == "dep-1"]
        assert statuses == ["accepted", "succeeded"]
        assert any(e.event == "download" and e.command_id == "dep-1" for e in sub.of("events"))
        code, body = infer(agent.server.address, images[:1])
        assert code == 200 and body["model_version"] == "2.0.0"
        # A deploy of a package whose hash does not match fails with a result naming the command.
        send_command(*SHARED_BROKER, key, fleet, dev, "dep-2", "deploy", {"package_url": url, "sha256": "0" * 64})
        failed = wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "dep-2"
                                   and r.status == "failed"], 60, what="the failed deploy result")
        assert "sha256" in failed[0].message
        assert infer(agent.server.address, images[:1])[1]["model_version"] == "2.0.0"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_hot_swap_by_install_under_load_fails_no_request(started, make_package, images):
    agent, _ = started()
    agent.installer.install_file(make_package("1.0.0"))
    pkg2 = make_package("1.1.0")
    stop = threading.Event()
    failures: list = []
    seen: set = set()

    def client(k):
        import http.client

        conn = http.client.HTTPConnection(*agent.server.address, timeout=30)
        while not stop.is_set():
            code, body = infer(agent.server.address, images[k:k + 1], conn=conn)
            if code != 200:
                failures.append((code, body))
            else:
                seen.add(body["model_version"])
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: "1.0.0" in seen, 10, what="requests on 1.0.0")
        agent.installer.install_file(pkg2)
        wait_for(lambda: "1.1.0" in seen, 10, what="requests on 1.1.0")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert failures == []
    assert seen == {"1.0.0", "1.1.0"}


def test_broker_outage_loses_no_telemetry(tmp_path, agent_keys, make_package, images):
    """Stop the broker for a while, restart it: after dedupe by (session, seq) every telemetry message of
    the session has arrived, and every seq from the first to the last is present."""
    broker = Broker(tmp_path / "broker").start()
    config = agent_config(tmp_path / "state", agent_keys, broker.url, telemetry_interval_s=0.2)
    sub = Subscriber("127.0.0.1", broker.port, config.fleet, config.device_id, persistent=True)
    agent = Agent(config).start()
    try:
        wait_for(agent.link.connected.is_set, 15, what="the agent's MQTT connection")
        agent.installer.install_file(make_package("1.0.0"))
        wait_for(lambda: len(sub.of("telemetry")) >= 3, 15, what="telemetry before the outage")
        broker.stop()
        wait_for(lambda: not agent.link.connected.is_set(), 15, what="the agent to notice the outage")
        for i in range(5):  # keep serving while the broker is away
            assert infer(agent.server.address, images[i:i + 1])[0] == 200
        wait_for(lambda: len(agent.outbox) >= 8, 15, what="telemetry buffered in the outbox")
        buffered = len(agent.outbox)
        broker.start()
        wait_for(agent.link.connected.is_set, 45, what="the agent to reconnect")
        wait_for(lambda: len(agent.outbox) == 0, 30, what="the outbox to drain")
        last_seq = agent.envelope.next_seq() - 1  # every seq up to here has been used by a payload
        sid = agent.envelope.session_id

        def complete():
            got = {p.seq for _, p in sub.messages if p is not None and p.session_id == sid}
            return got if set(range(1, last_seq + 1)) <= got else None

        wait_for(complete, 30, what="every seq of the session at the subscriber")
        telemetry = [t for t in sub.of("telemetry") if t.session_id == sid]
        unique = {t.seq for t in telemetry}
        assert len(unique) >= 8 + 3 and buffered >= 8
        served = sum(m.requests for t in {t.seq: t for t in telemetry}.values() for m in t.models)
        assert served == 5  # the requests served during the outage are all counted once
        assert all(t.dropped == 0 for t in telemetry)
    finally:
        agent.stop(flush_timeout=2)
        sub.close()
        broker.stop()


def test_full_outbox_drops_the_oldest_and_telemetry_counts_them(tmp_path, agent_keys):
    """Broker unreachable, outbox bounded at 10: the newest 10 messages are kept, in order, and the
    telemetry payloads carry the number dropped so far."""
    from agent_support import free_port
    from edgeopt.sdk.telemetry import parse_payload

    config = agent_config(tmp_path / "state", agent_keys, f"mqtt://127.0.0.1:{free_port()}",
                          telemetry_interval_s=0.1, outbox={"max_messages": 10})
    agent = Agent(config).start()
    try:
        wait_for(lambda: agent.outbox.dropped >= 5, 30, what="outbox drops")
        agent.reporter.report()
        rows = agent.outbox.peek(100)
        assert len(rows) == 10
        kinds = [r.topic.rsplit("/", 1)[1] for r in rows]
        payloads = [parse_payload(k, r.payload) for k, r in zip(kinds, rows)]
        seqs = [p.seq for p in payloads]
        assert seqs == sorted(seqs)
        last = payloads[-1]
        assert last.kind == "telemetry" and 5 <= last.dropped <= agent.outbox.dropped
        assert not agent.link.connected.is_set()
    finally:
        agent.stop(flush_timeout=0.5)


def test_command_sent_while_the_agent_is_down_is_answered_after_restart(tmp_path, agent_keys, command_keys):
    """The agent keeps a broker session: a command published while it is stopped is delivered when it
    starts again (and held until its command handler is ready), then answered."""
    config = agent_config(tmp_path / "state", agent_keys, "mqtt://127.0.0.1:1883",
                          control={"trust_keys": [str(command_keys.public)]})
    sub = Subscriber(*SHARED_BROKER, config.fleet, config.device_id)
    first = Agent(config).start()
    try:
        wait_for(first.link.connected.is_set, 15, what="the first connection")
    finally:
        first.stop(flush_timeout=2)
    send_command(*SHARED_BROKER, command_keys.private, config.fleet, config.device_id, "while-down", "ping")
    second = Agent(config).start()
    try:
        result = wait_for(lambda: [r for r in sub.of("cmd/result") if r.command_id == "while-down"], 30,
                          what="the result of the command sent while the agent was down")
        assert result[0].status == "succeeded" and result[0].session_id == second.envelope.session_id
    finally:
        second.stop(flush_timeout=2)
        sub.close()
