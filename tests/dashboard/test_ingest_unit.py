"""Ingest process pieces that need no broker: subscriptions, settings, the deployment hook lookup."""
from __future__ import annotations

import importlib

import pytest

from edgeopt.dashboard import ingest
from edgeopt.sdk.errors import ConfigError


def test_subscriptions_share_all_but_status():
    assert ingest.subscriptions("edgeopt-ingest") == [
        "$share/edgeopt-ingest/edgeopt/v1/+/+/telemetry", "$share/edgeopt-ingest/edgeopt/v1/+/+/events",
        "$share/edgeopt-ingest/edgeopt/v1/+/+/cmd/result", "edgeopt/v1/+/+/status"]
    assert ingest.subscriptions("")[0] == "edgeopt/v1/+/+/telemetry"


def test_settings_are_validated():
    assert ingest.IngestSettings(broker="mqtt://h:1884").broker_address() == ("h", 1884)
    assert ingest.IngestSettings(broker="mqtt://h").broker_address() == ("h", 1883)
    with pytest.raises(ConfigError, match="invalid broker URL 'ws://h'"):
        ingest.IngestSettings(broker="ws://h").broker_address()
    with pytest.raises(ValueError, match="extra"):
        ingest.IngestSettings(batchsize=3)
    with pytest.raises(ValueError, match="batch_size"):
        ingest.IngestSettings(batch_size=0)


def test_deployment_hook_is_optional(monkeypatch):
    from edgeopt.dashboard import deployments

    assert ingest._load_tick() is deployments.tick
    real = importlib.import_module

    def missing(name, *a, **kw):
        if name == "edgeopt.dashboard.deployments":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", missing)
    assert ingest._load_tick() is None

    def broken(name, *a, **kw):
        if name == "edgeopt.dashboard.deployments":
            raise ModuleNotFoundError("No module named 'somedependency'", name="somedependency")
        return real(name, *a, **kw)

    # A missing dependency INSIDE the controller is a real error, not "no controller".
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="somedependency"):
        ingest._load_tick()


def test_classify_database_errors():
    import sqlite3

    import psycopg
    from sqlalchemy.exc import IntegrityError, OperationalError

    c = ingest._classify
    assert c(psycopg.errors.DeadlockDetected("d")) == "conflict"
    assert c(OperationalError("s", {}, psycopg.errors.SerializationFailure("s"))) == "conflict"
    assert c(psycopg.OperationalError("down")) == "unavailable"
    assert c(OperationalError("s", {}, sqlite3.OperationalError("database is locked"))) == "unavailable"
    assert c(psycopg.errors.UniqueViolation("u")) == "refused"
    assert c(IntegrityError("s", {}, sqlite3.IntegrityError("fk"))) == "refused"
    assert c(psycopg.errors.NumericValueOutOfRange("bigint")) == "refused"
    assert c(OverflowError("Python int too large to convert to SQLite INTEGER")) == "refused"
    assert c(ValueError("bug")) == "unexpected"


def _incoming(n: int):
    from datetime import datetime, timezone

    from edgeopt.dashboard.ingest_writer import Incoming
    from edgeopt.dashboard.simulate import SimDevice

    d = SimDevice("w-1", fleet="f")
    return [Incoming(d.topic("telemetry"), d.telemetry(requests=2)[0].to_json(), datetime.now(timezone.utc))
            for _ in range(n)]


def _run_writer(svc, items, want_rows, timeout=20.0):
    import threading
    import time

    from sqlalchemy import func, select

    from edgeopt.dashboard import models as m
    from sqlalchemy.orm import Session

    t = threading.Thread(target=svc.loop.run, daemon=True)
    t.start()
    for it in items:
        svc.queue.put(it)
    deadline = time.monotonic() + timeout
    rows = 0
    while time.monotonic() < deadline:
        with Session(svc.engine) as s:
            rows = s.scalar(select(func.count()).select_from(m.TelemetryRaw))
        if rows >= want_rows:
            break
        time.sleep(0.05)
    svc.stop_event.set()
    t.join(5)
    return rows


def test_writer_survives_deadlocks_and_unexpected_errors(db_url, caplog):
    """Unit test with an injected failure: the writer thread retries a deadlocked batch, and a batch that
    keeps failing for an unknown reason is written message by message instead of blocking ingest."""
    import logging

    import psycopg

    svc = ingest.IngestService(ingest.IngestSettings(database_url=db_url, flush_ms=20, batch_size=50))
    real = svc.writer.write
    calls = {"n": 0}

    def flaky(batch, now):
        calls["n"] += 1
        if calls["n"] == 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        if batch.size > 1:
            raise ValueError("poison batch")
        return real(batch, now)

    svc.writer.write = flaky
    with caplog.at_level(logging.INFO, logger="edgeopt.dashboard"):
        assert _run_writer(svc, _incoming(10), want_rows=10) == 10
    text = caplog.text
    assert "batch rolled back by the database (deadlock detected); retrying" in text
    assert "unexpected error writing a batch of 10 messages (attempt 3)" in text
    svc.engine.dispose()


def test_a_value_the_database_cannot_hold_is_dead_lettered(db_url, caplog):
    """rss_bytes = 2**70 passes the contract but fits no BIGINT: that message alone is set aside (db_refused),
    at once, and the rest of its batch is written."""
    import json
    import logging
    from datetime import datetime, timezone

    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from edgeopt.dashboard import models as m
    from edgeopt.dashboard.ingest_writer import Incoming
    from edgeopt.dashboard.simulate import SimDevice

    svc = ingest.IngestService(ingest.IngestSettings(database_url=db_url, flush_ms=20, batch_size=50))
    d = SimDevice("huge-1")
    items = [Incoming(d.topic("telemetry"), d.telemetry()[0].to_json(), datetime.now(timezone.utc)) for _ in range(6)]
    doc = json.loads(items[2].payload)
    doc["system"]["rss_bytes"] = 2**70
    items[2].payload = json.dumps(doc).encode()
    with caplog.at_level(logging.INFO, logger="edgeopt.dashboard"):
        assert _run_writer(svc, items, want_rows=5) == 5
    with Session(svc.engine) as s:
        letters = s.scalars(select(m.DeadLetter)).all()
        assert [(x.reason, x.payload) for x in letters] == [("db_refused", items[2].payload)]
    assert "batch refused by the database" in caplog.text and "unexpected error" not in caplog.text
    svc.engine.dispose()
