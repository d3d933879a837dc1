"""End to end with real parts: a private Mosquitto, the real `edgeopt-dashboard ingest` process(es) and a
real database (SQLite and PostgreSQL). Publishers use the contracts (sdk.topics, sdk.telemetry)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, text

from edgeopt.dashboard import models as m
from edgeopt.dashboard.simulate import Publisher, SimDevice
from edgeopt.dashboard.stats import ingest_counters
from edgeopt.sdk.telemetry import CommandResultPayload, EventPayload

EXE = str(Path(sys.executable).with_name("edgeopt-dashboard"))
pytestmark = pytest.mark.timeout(180)


class IngestProc:
    """`edgeopt-dashboard ingest` as a subprocess, its log in a file."""

    def __init__(self, db_url: str, broker_url: str, log: Path, group: str = "edgeopt-ingest", *extra: str):
        self.log = log
        # One data directory per test: processes started again in it take the same slot, so the same MQTT
        # client id and session (ingest_health), as on a real host.
        env = dict(os.environ, EDGEOPT_DATABASE_URL=db_url, EDGEOPT_DATA_DIR=str(log.parent / "ingest-data"))
        self.proc = subprocess.Popen(
            [EXE, "ingest", "--broker", broker_url, "--group", group, "--flush-ms", "50", "--batch-size", "200",
             "--rollup-every", "0", "--heartbeat-check", "0.3", *extra],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_subscribed(self, times: int = 1, timeout: float = 30) -> None:
        wait_until(lambda: self.text().count("subscriptions granted") >= times, timeout,
                   lambda: f"ingest did not subscribe; log:\n{self.text()}")

    def stop(self) -> dict[str, int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        line = [ln for ln in self.text().splitlines() if "ingest stopped:" in ln]
        assert line, self.text()
        return {k: int(v) for k, v in (kv.split("=") for kv in line[-1].split("ingest stopped: ")[1].split())}


def wait_until(pred, timeout: float = 30, why=lambda: "condition not met") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s: {why()}")


def scalar(engine, stmt):
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        return s.scalar(stmt)


def n_rows(engine, model) -> int:
    return scalar(engine, select(func.count()).select_from(model))


def counters(engine) -> dict[str, int]:
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        return ingest_counters(s)


@pytest.fixture
def ingest(db_url, mqtt_broker, tmp_path):
    procs: list[IngestProc] = []

    def start(*extra: str, group: str = "edgeopt-ingest") -> IngestProc:
        p = IngestProc(db_url, mqtt_broker.url, tmp_path / f"ingest{len(procs)}.log", group, *extra)
        procs.append(p)
        p.wait_subscribed()
        return p

    yield start
    for p in procs:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def test_pipeline_duplicates_and_malformed_barrage(engine, mqtt_broker, ingest):
    proc = ingest()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    devs = [SimDevice(f"dev-{i}", fleet="plant", seed=i, groups=("line",)) for i in range(5)]
    msgs = []
    for d in devs:
        msgs.append((d.topic("status"), d.status().to_json()))
        for _ in range(20):
            msgs.append((d.topic("telemetry"), d.telemetry(interval_s=60)[0].to_json()))
        ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), event="install",
                          command_id=f"c-{d.device_id}", deployment_id="dep-1", version="2.0", model="digits")
        res = CommandResultPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(),
                                   command_id=f"c-{d.device_id}", ok=True, status="succeeded", deployment_id="dep-1")
        msgs += [(d.topic("events"), ev.to_json()), (d.topic("cmd/result"), res.to_json())]
    for topic, payload in msgs + msgs:  # every message twice: what QoS 1 redelivery looks like to us
        pub.publish(topic, payload)
    assert pub.wait_acked()
    wait_until(lambda: counters(engine).get("telemetry") == 100 and counters(engine).get("duplicate") == 110,
               why=lambda: str(counters(engine)))
    rows = (n_rows(engine, m.TelemetryRaw), n_rows(engine, m.Event), n_rows(engine, m.CommandResult),
            n_rows(engine, m.Device))
    assert rows == (100, 5 + 5, 5, 5)  # 5 installs and the 5 "online" status events
    assert scalar(engine, select(func.count()).select_from(m.Device).where(m.Device.status == "online")) == 5
    before = counters(engine)

    # The barrage: every kind of bad payload, and topics that are not ours.
    good = json.loads(devs[0].telemetry()[0].to_json())
    t = devs[0].topic("telemetry")
    bad = [(t, b"{nope"), (t, b"\x00\xff"), (t, b'"a string"'), (t, json.dumps(dict(good, seq=-1)).encode()),
           (t, json.dumps(dict(good, interval_s="often")).encode()),
           (t, json.dumps(dict(good, schema_version="9.0")).encode()),
           (t, b'{"x": "' + b"y" * (300 * 1024) + b'"}'),
           ("edgeopt/v1/plant/bad id/telemetry", json.dumps(good).encode()),
           ("edgeopt/v1/plant/dev-0/unknown", json.dumps(good).encode()),
           ("elsewhere/v1/plant/dev-0/telemetry", json.dumps(good).encode()),
           (devs[1].topic("telemetry"), json.dumps(good).encode()),  # dev-0's payload on dev-1's topic
           (devs[0].topic("events"), b'{"event": "teleport"}'),
           (devs[0].topic("status"), b"[]")] * 5
    for topic, payload in bad:
        pub.publish(topic, payload)
    assert pub.wait_acked()
    expected = {"bad_json": 20, "bad_schema": 15, "bad_version": 5, "oversize": 5, "bad_topic": 5,
                "device_mismatch": 5}
    # A good message published after the barrage is the marker that the ingest got past all of it (one
    # connection delivers in order; the writer commits a batch's counters with its rows): then nothing
    # more may be counted than expected, without waiting for "nothing else happens" in a time window.
    pub.publish(devs[1].topic("telemetry"), devs[1].telemetry(interval_s=60)[0].to_json())
    assert pub.wait_acked()
    wait_until(lambda: counters(engine).get("telemetry") == 101, why=lambda: str(counters(engine)))
    after = counters(engine)
    assert {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)} == \
        {**expected, "telemetry": 1}
    assert (n_rows(engine, m.TelemetryRaw), n_rows(engine, m.Event), n_rows(engine, m.CommandResult),
            n_rows(engine, m.Device)) == (rows[0] + 1, *rows[1:])
    assert proc.proc.poll() is None  # still running
    pub.close()
    st = proc.stop()
    assert st["telemetry"] == 101 and st["rejected"] == 55


def test_two_processes_split_the_load(engine, mqtt_broker, ingest):
    a, b = ingest(), ingest()
    devs = [SimDevice(f"split-{i}", fleet="plant", seed=i) for i in range(20)]
    pubs = [Publisher("127.0.0.1", mqtt_broker.port) for _ in range(4)]
    for k in range(60):
        for j, d in enumerate(devs):
            pubs[j % 4].publish(d.topic("telemetry"), d.telemetry(requests=5)[0].to_json())
    assert all(p.wait_acked(60) for p in pubs)
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) >= 1200, 60, lambda: str(counters(engine)))
    sa, sb = a.stop(), b.stop()
    # Zero loss, zero duplicates: every (device, seq) exactly once, nothing counted twice.
    got = scalar(engine, select(func.count()).select_from(
        select(m.TelemetryRaw.device_pk, m.TelemetryRaw.seq).distinct().subquery()))
    assert got == n_rows(engine, m.TelemetryRaw) == 1200
    assert counters(engine).get("duplicate", 0) == 0
    assert sa["telemetry"] + sb["telemetry"] == 1200
    assert sa["telemetry"] > 100 and sb["telemetry"] > 100, (sa, sb)
    for p in pubs:
        p.close()


AGENT = textwrap.dedent("""
    import sys, time
    from edgeopt.dashboard.simulate import Publisher, SimDevice
    from datetime import datetime, timezone, timedelta
    port, session, ts = int(sys.argv[1]), sys.argv[2], datetime.fromisoformat(sys.argv[3])
    d = SimDevice("agent-1", fleet="plant", session_id=session)
    will = d.status("offline", ts=ts, seq=0)
    pub = Publisher("127.0.0.1", port, will=(d.topic("status"), will.to_json()))
    pub.publish(d.topic("status"), d.status("online", ts=ts, seq=1).to_json(), retain=True)
    pub.wait_acked()
    print("ready", flush=True)
    time.sleep(600)
""")


def _agent(port: int, session: str, ts: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", AGENT, str(port), session, ts], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def _device(engine, device_id="agent-1"):
    from sqlalchemy.orm import Session

    with Session(engine) as s:
        return s.scalars(select(m.Device).where(m.Device.device_id == device_id)).first()


def test_late_last_will_and_real_will(engine, mqtt_broker, ingest):
    ingest()
    old = _agent(mqtt_broker.port, "session-old", "2026-03-01T12:00:00+00:00")
    wait_until(lambda: (_device(engine) or m.Device()).session_id == "session-old")
    # The agent restarts: the new session comes up while the broker still thinks the old one is alive...
    new = _agent(mqtt_broker.port, "session-new", "2026-03-01T12:05:00+00:00")
    wait_until(lambda: _device(engine).session_id == "session-new")
    # ...and then the old connection dies: the broker sends the OLD session's last will, late.
    old.kill()
    old.wait()
    wait_until(lambda: scalar(engine, select(func.count()).select_from(m.Event).where(
        m.Event.session_id == "session-old", m.Event.kind == "offline")) == 1)
    dev = _device(engine)
    assert (dev.status, dev.session_id) == ("online", "session-new")
    # The current session's own will does mark it offline.
    new.kill()
    new.wait()
    wait_until(lambda: _device(engine).status == "offline")
    assert (_device(engine).offline_reason, _device(engine).session_id) == ("will", "session-new")


def test_heartbeat_timeout(engine, mqtt_broker, ingest):
    ingest()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    d = SimDevice("hb-1", fleet="plant")
    pub.publish(d.topic("status"), d.status().to_json())
    for _ in range(3):
        pub.publish(d.topic("telemetry"), d.telemetry(interval_s=0.5)[0].to_json())
    assert pub.wait_acked()
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 3)
    # Silence for 3 intervals (1.5 s) -> offline by heartbeat, though no will was ever sent.
    wait_until(lambda: _device(engine, "hb-1").status == "offline", 15)
    assert _device(engine, "hb-1").offline_reason == "heartbeat"
    pub.publish(d.topic("telemetry"), d.telemetry(interval_s=0.5)[0].to_json())
    wait_until(lambda: _device(engine, "hb-1").status == "online")
    pub.close()


def test_broker_restart_mid_stream(engine, mqtt_broker, ingest):
    proc = ingest()
    d = SimDevice("br-1", fleet="plant")
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    for _ in range(50):
        pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
    assert pub.wait_acked()
    pub.close()
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 50)
    mqtt_broker.stop()
    # the marker that the ingest noticed the outage (and retries with backoff), instead of a 2 s sleep
    wait_until(lambda: "disconnected from broker" in proc.text(), 30, proc.text)
    assert proc.proc.poll() is None
    mqtt_broker.start()
    proc.wait_subscribed(times=2, timeout=60)
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    for _ in range(50):
        pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
    assert pub.wait_acked()
    pub.close()
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 100)
    assert "disconnected from broker" in proc.text()
    assert proc.stop()["telemetry"] == 100


@pytest.mark.postgres
def test_database_outage_loses_nothing(pg_only_url, mqtt_broker, tmp_path):
    """PostgreSQL refuses connections for a while: the ingest holds the messages and writes them later."""
    from edgeopt.dashboard.db import make_engine
    from sqlalchemy.engine import make_url

    engine = make_engine(pg_only_url)
    name = make_url(pg_only_url).database
    admin = make_engine(make_url(pg_only_url).set(database="postgres").render_as_string(hide_password=False),
                        isolation_level="AUTOCOMMIT")
    proc = IngestProc(pg_only_url, mqtt_broker.url, tmp_path / "ingest.log")
    try:
        proc.wait_subscribed()
        d = SimDevice("db-1", fleet="plant")
        pub = Publisher("127.0.0.1", mqtt_broker.port)
        for _ in range(20):
            pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
        assert pub.wait_acked()
        wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 20)
        engine.dispose()
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name})
        for _ in range(200):
            pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
        assert pub.wait_acked()
        wait_until(lambda: "unavailable" in proc.text(), 20, proc.text)
        time.sleep(1)
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 220, 60, proc.text)
        log = proc.text()
        assert log.count("holding") == 1 and "database is back after" in log
        pub.close()
        assert proc.stop()["telemetry"] == 220
    finally:
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        if proc.proc.poll() is None:
            proc.proc.kill()
        engine.dispose()
        admin.dispose()


def test_refused_connection_backs_off_and_keeps_running(db_url, tmp_path):
    """A broker that refuses the session (no anonymous access): one clear line per attempt, with backoff,
    never 'subscribed', and the process keeps running."""
    # Loaded by path: `from conftest import` would find whichever conftest.py pytest imported first.
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("dashboard_conftest_broker", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Mosquitto = module.Mosquitto

    broker = Mosquitto(tmp_path)
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous false\n")
    broker.start()
    proc = IngestProc(db_url, broker.url, tmp_path / "ingest.log")
    try:
        # Attempts at 0, 1, 3, 7 s (backoff): the third attempt is the marker that two backoff waits
        # passed. Sampled every 0.1 s from then, a busy loop would have made hundreds by now; with the
        # backoff the next attempt is 4 s away, so the count is 3 (4 at most if it just happened).
        wait_until(lambda: proc.text().count("refused the connection") >= 3, 30, proc.text)
        log = proc.text()
        assert proc.proc.poll() is None and "subscriptions granted" not in log
        assert log.count("refused the connection") <= 4, log
        assert f"broker 127.0.0.1:{broker.port} refused the connection: Not authorized" in log
    finally:
        proc.proc.kill()
        proc.proc.wait()
        broker.stop()
