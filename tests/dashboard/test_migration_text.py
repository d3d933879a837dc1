"""Migration 0007: the text-generation columns on raw telemetry (every PostgreSQL partition included) and the
rollups, on SQLite and PostgreSQL; rows written before it read as "no text figures"; the ingest and the
rollup write the new columns on a migrated database; downgrade and upgrade again."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from edgeopt.dashboard import stats
from edgeopt.dashboard.db import alembic_config, make_engine, session_factory
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.rollup import run_rollup
from edgeopt.dashboard.simulate import SimDevice

T0 = datetime.now(timezone.utc).replace(second=0, microsecond=0) - timedelta(minutes=20)
TABLES = ("telemetry_raw", "rollup_1m", "rollup_1h", "fleet_rollup")
SHARED = {"ttft_counts", "ttft_sum_ms", "tpot_counts", "tpot_sum_ms", "prompt_tokens", "generated_tokens",
          "cancelled", "preemptions"}
ADDED = {"telemetry_raw": SHARED | {"kv_cache_usage", "kv_cache_peak", "running_requests", "waiting_requests"},
         "rollup_1m": SHARED | {"kv_cache_usage_avg", "kv_cache_peak_max", "running_max", "waiting_max"},
         "rollup_1h": SHARED | {"kv_cache_usage_avg", "kv_cache_peak_max", "running_max", "waiting_max"},
         "fleet_rollup": SHARED | {"kv_cache_usage_avg", "kv_cache_peak_max"}}


@pytest.fixture
def engine_at_0006(db_backend, tmp_path, request):
    if db_backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = request.getfixturevalue("pg_server").new_database(migrated=False)
    engine = make_engine(url)
    command.upgrade(alembic_config(engine), "0006_live_sequences")
    yield engine
    engine.dispose()


def _columns(engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def _partitions(engine) -> list[str]:
    with engine.connect() as c:
        return sorted(c.scalars(sa.text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                        "WHERE i.inhparent = 'telemetry_raw'::regclass")))


def test_upgrade_adds_the_columns_keeps_old_rows_and_downgrade_removes_them(engine_at_0006, db_backend):
    engine = engine_at_0006
    # rows written by the 0006 schema (by hand: today's code writes the new columns): a device, a raw row, rollups
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO devices (id, device_id, fleet, status, first_seen, capabilities) "
                          "VALUES (100, 'old-1', 'f', 'online', :t, '{}')"), {"t": T0})
        c.execute(sa.text(
            "INSERT INTO telemetry_raw (device_pk, model, ts, session_id, seq, interval_s, requests, errors, "
            "throughput_ips, hist_counts, hist_sum_ms, queue_depth, batch_sizes) "
            "VALUES (100, 'digits', :ts, 's', 5, 60, 10, 0, 0.2, :h, 1.0, 0, '{}')"),
            {"ts": T0 + timedelta(seconds=5), "h": b""})
        for table in ("rollup_1m", "rollup_1h"):
            c.execute(sa.text(
                f"INSERT INTO {table} (device_pk, model, bucket_start, requests, errors, samples, hist_counts, "
                "hist_sum_ms, queue_depth_max, batch_sizes) VALUES (100, 'digits', :b, 10, 0, 1, :h, 1.0, 0, '{}')"),
                {"b": T0, "h": b""})
        c.execute(sa.text("INSERT INTO fleet_rollup (resolution, model, bucket_start, devices, requests, errors, "
                          "hist_counts, hist_sum_ms) VALUES ('1m', 'digits', :b, 1, 10, 0, :h, 1.0)"),
                  {"b": T0, "h": b""})
    for t in TABLES:
        assert not ADDED[t] & _columns(engine, t)

    command.upgrade(alembic_config(engine), "head")
    for t in TABLES:
        assert ADDED[t] <= _columns(engine, t), t
    if db_backend == "postgresql":
        parts = _partitions(engine)
        assert "telemetry_raw_default" in parts and len(parts) >= 2  # default and daily partitions
        for part in parts:
            assert ADDED["telemetry_raw"] <= _columns(engine, part), part
    with engine.connect() as c:
        assert c.execute(sa.text("SELECT generated_tokens, ttft_counts, preemptions FROM telemetry_raw")).all() == [
            (None, None, None)]
        assert c.execute(sa.text("SELECT generated_tokens FROM rollup_1m")).all() == [(None,)]

    # at head: a language model's telemetry goes through the ingest (PostgreSQL: COPY into the partitions)
    # and the rollups, next to the old rows
    new = SimDevice("llm-1", models=("chat",), text=("chat",), seed=2)
    items = [Incoming(new.topic("status"), new.status(ts=T0).to_json(), T0)]
    items += [Incoming(new.topic("telemetry"), new.telemetry(ts=T0 + timedelta(minutes=k, seconds=5),
                                                             interval_s=60)[0].to_json(), T0 + timedelta(minutes=k))
              for k in range(3)]
    BatchWriter(engine).write(prepare(items), T0 + timedelta(minutes=3))
    run_rollup(engine, now=T0 + timedelta(minutes=5))
    with session_factory(engine)() as s:
        series = stats.device_series(s, "llm-1", T0, T0 + timedelta(minutes=3), resolution="1m")
        assert series["text_models"] == ["chat"] and all(p["ttft_p95"] for p in series["points"])
        assert stats.fleet_summary(s)["text_models"] == ["chat"]
        assert stats.device_detail(s, "old-1")["text_models"] == []
    with engine.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM telemetry_raw WHERE generated_tokens IS NOT NULL")) == 3

    command.downgrade(alembic_config(engine), "0006_live_sequences")
    for t in TABLES:
        assert not ADDED[t] & _columns(engine, t), t
    if db_backend == "postgresql":
        for part in _partitions(engine):
            assert not ADDED["telemetry_raw"] & _columns(engine, part), part
    with engine.connect() as c:
        assert c.scalar(sa.text("SELECT count(*) FROM telemetry_raw")) == 4  # every row kept, its text dropped
    command.upgrade(alembic_config(engine), "head")
    assert ADDED["telemetry_raw"] <= _columns(engine, "telemetry_raw")
