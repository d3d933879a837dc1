"""The faults and attacks that broke the ingest (issue 9), reproduced against the real parts: a private
Mosquitto, the real `edgeopt-dashboard ingest` process, SQLite and PostgreSQL, the real CLI and web app.

Each of these failed on the code before the fix: a deeply nested message killed the writer thread; a
ts of 9999-12-31 was stored and then broke every rollup; NUL-bearing telemetry was stored (SQLite) or
refused a whole batch (PostgreSQL); a kill -9 during a database outage lost every message in hand; no
thread was supervised and /healthz knew nothing of the ingest.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import datetime, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from dashboard_web_fixtures import app, client, trusted_keys  # noqa: F401
from edgeopt.dashboard import models as m
from edgeopt.dashboard.simulate import Publisher, SimDevice
from edgeopt.sdk.telemetry import EventPayload
from test_ingest_mqtt import EXE, counters, ingest, n_rows, wait_until  # noqa: F401 (ingest: fixture)

pytestmark = pytest.mark.timeout(240)
DEEP = b'{"details": ' + b"[" * 2000 + b"]" * 2000 + b"}"  # the probe's ~4 KB message


@pytest.fixture
def start_ingest(ingest):
    """test_ingest_mqtt's ingest starter (group edgeopt-ingest; processes killed at teardown)."""
    return ingest


def cli(db_url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *args], env=dict(os.environ, EDGEOPT_DATABASE_URL=db_url), capture_output=True,
                          timeout=60)


def seqs(engine, device_id: str) -> list[int]:
    with Session(engine) as s:
        return sorted(s.scalars(select(m.TelemetryRaw.seq).join(m.Device).where(m.Device.device_id == device_id)))


def test_deeply_nested_message_is_set_aside_and_ingest_goes_on(engine, db_url, mqtt_broker, start_ingest):
    proc = start_ingest()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    d = SimDevice("deep-1", fleet="plant")
    pub.publish(d.topic("events"), DEEP)
    for _ in range(20):
        pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
    assert pub.wait_acked()
    # Before the fix the writer thread died here with RecursionError and none of these was ever stored.
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 20, 30, proc.text)
    assert counters(engine).get("too_deep") == 1
    listed = json.loads(cli(db_url, "dead-letters", "list", "--json").stdout)
    assert listed["totals"] == {"too_deep": 1}
    (item,) = listed["items"]
    assert (item["reason"], item["topic"], item["payload_bytes"]) == ("too_deep", d.topic("events"), len(DEEP))
    assert item["error"] == "payload nests deeper than 32 levels" and item["ingest"].startswith("edgeopt-ingest-")
    shown = cli(db_url, "dead-letters", "show", str(item["id"]), "--raw")
    assert shown.returncode == 0 and shown.stdout == DEEP  # kept as received, for inspection
    assert proc.proc.poll() is None
    pub.close()
    st = proc.stop()
    assert st["telemetry"] == 20 and st["dead_letters"] == 1


def test_far_future_timestamp_is_refused_and_rollups_keep_running(engine, db_url, mqtt_broker, start_ingest):
    proc = start_ingest()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    d = SimDevice("future-1", fleet="plant")
    far = d.telemetry(ts=datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc))[0]
    pub.publish(d.topic("telemetry"), far.to_json())
    for _ in range(5):
        pub.publish(d.topic("telemetry"), d.telemetry()[0].to_json())
    assert pub.wait_acked()
    wait_until(lambda: d.seq in seqs(engine, "future-1"), 30, proc.text)
    assert seqs(engine, "future-1") == list(range(2, d.seq + 1))  # the 9999 one was not stored
    assert counters(engine).get("ts_out_of_window") == 1
    (item,) = json.loads(cli(db_url, "dead-letters", "list", "--reason", "ts_out_of_window", "--json").stdout)["items"]
    assert item["error"].startswith("ts 9999-12-31T23:59:59+00:00 is more than 1 day, 0:00:00 ahead of its receipt")
    with Session(engine) as s:
        last_seen = s.scalar(select(m.Device.last_seen).where(m.Device.device_id == "future-1"))
    assert last_seen.year < 9999
    res = cli(db_url, "rollup", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["buckets_1m"] >= 1
    pub.close()
    proc.stop()


def test_nul_bearing_messages_are_refused_and_counted(engine, db_url, mqtt_broker, start_ingest):
    proc = start_ingest()
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    d = SimDevice("nul-1", fleet="plant", models=("dig\u0000its",))
    bad = d.telemetry()[0]
    ev = EventPayload(device_id="nul-1", session_id=d.session_id, seq=d.next_seq(), event="error", message="a\u0000b")
    d.models = ("digits",)
    pub.publish(d.topic("telemetry"), bad.to_json())
    pub.publish(d.topic("events"), ev.to_json())
    for _ in range(10):
        pub.publish(d.topic("telemetry"), d.telemetry()[0].to_json())
    assert pub.wait_acked()
    wait_until(lambda: d.seq in seqs(engine, "nul-1"), 30, proc.text)
    assert n_rows(engine, m.TelemetryRaw) == 10 and n_rows(engine, m.Event) == 0
    got = counters(engine)
    assert got.get("nul_char") == 2 and "db_refused" not in got, got
    totals = json.loads(cli(db_url, "dead-letters", "list", "--json").stdout)["totals"]
    assert totals == {"nul_char": 2}
    # Refused before the database: no batch was refused and written again message by message.
    assert "one by one" not in proc.text()
    pub.close()
    proc.stop()


class _Outage:
    """The database refuses work: PostgreSQL refuses connections; SQLite is locked by another writer."""

    def __init__(self, db_url: str):
        self.url = make_url(db_url)
        self.lock: sqlite3.Connection | None = None

    def _admin(self):
        from edgeopt.dashboard.db import make_engine

        return make_engine(self.url.set(database="postgres").render_as_string(hide_password=False),
                           isolation_level="AUTOCOMMIT")

    def begin(self) -> None:
        if self.url.get_backend_name() == "sqlite":
            self.lock = sqlite3.connect(self.url.database, timeout=30, isolation_level=None)
            self.lock.execute("BEGIN EXCLUSIVE")
            return
        admin = self._admin()
        with admin.connect() as c:
            c.execute(text(f'ALTER DATABASE "{self.url.database}" ALLOW_CONNECTIONS false'))
            c.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                      {"n": self.url.database})
        admin.dispose()

    def end(self) -> None:
        if self.lock is not None:
            self.lock.execute("ROLLBACK")
            self.lock.close()
            self.lock = None
        elif self.url.get_backend_name() == "postgresql":
            admin = self._admin()
            with admin.connect() as c:
                c.execute(text(f'ALTER DATABASE "{self.url.database}" ALLOW_CONNECTIONS true'))
            admin.dispose()


def test_kill_9_during_a_database_outage_loses_nothing(engine, db_url, mqtt_broker, start_ingest):
    """Messages received but not yet in the database survive a kill -9: they were never acknowledged, so
    the broker delivers them again to the restarted process (same host, same slot, same session)."""
    proc = start_ingest()
    d = SimDevice("k9-1", fleet="plant")
    pub = Publisher("127.0.0.1", mqtt_broker.port)
    for _ in range(20):
        pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
    assert pub.wait_acked()
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 20, 30, proc.text)
    engine.dispose()
    outage = _Outage(db_url)
    outage.begin()
    try:
        for _ in range(200):
            pub.publish(d.topic("telemetry"), d.telemetry(requests=3)[0].to_json())
        assert pub.wait_acked()  # the broker has them all
        wait_until(lambda: "holding" in proc.text(), 60, proc.text)  # the ingest has them in hand
        proc.proc.kill()
        proc.proc.wait(10)
    finally:
        outage.end()
    again = start_ingest()
    wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 220, 60, again.text)
    assert seqs(engine, "k9-1") == list(range(1, 221))  # every message once
    assert "session resumed" in again.text()
    pub.close()
    again.stop()


def test_healthz_reports_a_dead_ingest(client, db_url, mqtt_broker, start_ingest):  # noqa: F811
    proc = start_ingest("--health-every", "0.3")

    def ingest_status() -> str:
        return client.get("/healthz").get_json()["ingest"]["status"]

    wait_until(lambda: ingest_status() == "ok", 30, proc.text)
    assert client.get("/healthz?ingest=required").status_code == 200
    proc.proc.kill()  # kill -9: no goodbye, the health row just goes stale
    proc.proc.wait(10)
    wait_until(lambda: ingest_status() == "down", 30)
    body = client.get("/healthz")
    assert body.status_code == 200 and body.get_json()["status"] == "degraded"
    assert client.get("/healthz?ingest=required").status_code == 503
    res = cli(db_url, "ingest-status")
    assert res.returncode == 8 and b"ingest is down: 0 of 1 processes healthy" in res.stderr


class _Fatal(BaseException):
    """What ``except Exception`` does not catch (as SystemExit, or an error a C extension raises)."""


def test_supervisor_restarts_a_dead_writer_and_reports_it(engine, db_url, mqtt_broker, tmp_path):
    """The writer thread dies anyway, with a batch in hand: the supervisor restarts it, the restarted
    writer finishes that batch message by message, and the health row says what happened."""
    from edgeopt.dashboard.ingest import IngestService, IngestSettings
    from edgeopt.dashboard.ingest_health import summary

    svc = IngestService(IngestSettings(broker=mqtt_broker.url, database_url=db_url, data_dir=str(tmp_path),
                                       flush_ms=50, health_every_s=0.2, rollup_every_s=0))
    real, calls = svc.writer.write, []

    def dies_once(batch, now):
        calls.append(batch.size)
        if len(calls) == 1:
            raise _Fatal("writer killed")
        return real(batch, now)

    svc.writer.write = dies_once
    svc.start()
    try:
        wait_until(svc.connected.is_set, 30)
        d = SimDevice("sup-1", fleet="plant")
        pub = Publisher("127.0.0.1", mqtt_broker.port)
        for _ in range(10):
            pub.publish(d.topic("telemetry"), d.telemetry()[0].to_json())
        assert pub.wait_acked()
        wait_until(lambda: n_rows(engine, m.TelemetryRaw) == 10, 30)
        assert seqs(engine, "sup-1") == list(range(1, 11))
        assert svc.restarts["writer"] == 1 and svc.deaths["writer"] == "_Fatal: writer killed"

        def reported() -> dict:
            with Session(engine) as s:
                return summary(s, datetime.now(timezone.utc), details=True)

        wait_until(lambda: reported()["list"][0]["details"]["restarts"] == {"writer": 1}, 30)
        assert reported()["status"] == "ok"  # restarted, so healthy again; the restart stays on record
        pub.close()
    finally:
        svc.stop()
