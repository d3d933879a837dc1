"""Migration 0004: stored 1.0 histograms (29 fixed buckets) become DDSketch-layout pairs, on SQLite and
PostgreSQL; converted rows read back the 1.0 percentiles and merge with new rows; downgrade goes back."""
from __future__ import annotations

import bisect
import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from edgeopt.dashboard.db import alembic_config, make_engine
from edgeopt.dashboard.histograms import pack_pairs, unpack_pairs
from edgeopt.sdk.telemetry import LEGACY_BUCKETS_MS, Histogram, sketch_value

T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


def _legacy_quantile(counts: list[int], q: float) -> float:
    """The 1.0 reader's estimate (linear interpolation inside the bucket), copied from the 1.0 Histogram."""
    total = sum(counts)
    rank, seen = q * total, 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lo = LEGACY_BUCKETS_MS[i - 1] if i > 0 else 0.0
            hi = LEGACY_BUCKETS_MS[i] if i < len(LEGACY_BUCKETS_MS) else LEGACY_BUCKETS_MS[-1] * 2
            return lo + (hi - lo) * max(0.0, min(1.0, (rank - seen) / c))
        seen += c
    raise AssertionError("empty")


@pytest.fixture
def engine_at_0003(db_backend, tmp_path, request):
    if db_backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'old.db'}"
    else:
        url = request.getfixturevalue("pg_server").new_database(migrated=False)
    engine = make_engine(url)
    command.upgrade(alembic_config(engine), "0003")
    yield engine
    engine.dispose()


def _legacy(i: int) -> list[int]:
    counts = [0] * (len(LEGACY_BUCKETS_MS) + 1)
    counts[8 + i % 5] = 40 + i   # 2..7.5 ms
    counts[20] = 3               # 150..200 ms
    counts[-1] = i % 2           # overflow (> 10 s)
    return counts


def test_upgrade_converts_every_stored_histogram_and_downgrade_restores(engine_at_0003):
    engine = engine_at_0003
    n_raw = 12
    with engine.begin() as c:
        c.execute(sa.text("INSERT INTO devices (id, device_id, fleet, status, first_seen, capabilities) "
                          "VALUES (1, 'd1', 'f', 'online', :t, '{}')"), {"t": T0})
        for i in range(n_raw):
            c.execute(sa.text(
                "INSERT INTO telemetry_raw (device_pk, model, ts, session_id, seq, interval_s, requests, errors, "
                "throughput_ips, hist_counts, hist_sum_ms, queue_depth, batch_sizes, p95_ms) VALUES "
                "(1, 'm', :ts, 's', :seq, 10, 5, 0, 0.5, :h, 1.0, 0, '{}', 123.0)"),
                {"ts": T0 + timedelta(seconds=10 * i), "seq": i, "h": str(_legacy(i))})
        for table in ("rollup_1m", "rollup_1h"):
            c.execute(sa.text(f"INSERT INTO {table} (device_pk, model, bucket_start, requests, errors, samples, "
                              "hist_counts, hist_sum_ms, queue_depth_max, batch_sizes) VALUES "
                              "(1, 'm', :t, 5, 0, 1, :h, 1.0, 0, '{}')"), {"t": T0, "h": str(_legacy(3))})
        c.execute(sa.text("INSERT INTO fleet_rollup (resolution, model, bucket_start, devices, requests, errors, "
                          "hist_counts, hist_sum_ms) VALUES ('1m', 'm', :t, 1, 5, 0, :h, 1.0), "
                          "('1h', 'm', :t, 1, 5, 0, '[1, 2, 3]', 1.0)"), {"t": T0, "h": str(_legacy(4))})
    command.upgrade(alembic_config(engine), "head")

    with engine.connect() as c:
        raw = c.execute(sa.text("SELECT seq, hist_counts, p95_ms FROM telemetry_raw ORDER BY seq")).all()
        assert len(raw) == n_raw
        for seq, pairs, p95 in raw:
            legacy = _legacy(seq)
            h = Histogram.from_pairs(unpack_pairs(pairs))
            assert h.count == sum(legacy)  # nothing lost, nothing invented
            # the converted histogram reads back what the 1.0 reader showed (within the sketch's 1% + one key)
            for q in (0.5, 0.9):
                assert h.quantile(q) == pytest.approx(_legacy_quantile(legacy, q), rel=0.03)
            assert p95 == pytest.approx(h.quantile(0.95))  # recomputed, not the 123 stored before
        for table, resolution in (("rollup_1m", None), ("rollup_1h", None), ("fleet_rollup", "1m")):
            where = f" WHERE resolution = '{resolution}'" if resolution else ""
            pairs = c.execute(sa.text(f"SELECT hist_counts FROM {table}{where}")).scalar_one()
            assert Histogram.from_pairs(unpack_pairs(pairs)).count == sum(_legacy(3 if table != "fleet_rollup" else 4))
        # a value that was not a 1.0 histogram becomes an empty one (nothing is guessed from it)
        odd = c.execute(sa.text("SELECT hist_counts FROM fleet_rollup WHERE resolution = '1h'")).scalar_one()
        assert bytes(odd) == b""

    command.downgrade(alembic_config(engine), "0003")
    with engine.connect() as c:
        for seq, counts in c.execute(sa.text("SELECT seq, hist_counts FROM telemetry_raw ORDER BY seq")):
            counts = counts if isinstance(counts, list) else json.loads(counts)
            legacy = _legacy(seq)
            assert sum(counts) == sum(legacy)
            # Only the key straddling each bucket edge can change sides (its value lies in one of the two):
            # with ~1.3 counts per key here, the running totals differ by at most 2 at any edge.
            run_a = run_b = 0
            for a, b in zip(counts, legacy):
                run_a, run_b = run_a + a, run_b + b
                assert abs(run_a - run_b) <= 2


def test_downgrade_puts_each_key_in_the_bucket_of_its_value():
    from importlib import import_module

    mig = import_module("edgeopt.dashboard.migrations.versions.0004_ddsketch_histograms")
    h = Histogram()
    for v in (0.004, 0.5, 7.4, 160.0, 99_999.0):
        h.observe(v)
    legacy = mig._to_legacy(pack_pairs(h.to_pairs()))
    want = [0] * (len(LEGACY_BUCKETS_MS) + 1)
    for k in h.bins:
        want[bisect.bisect_left(LEGACY_BUCKETS_MS, sketch_value(k))] += 1
    assert legacy == want and sum(legacy) == 5
    assert mig._to_legacy(b"\x00" * 11) is None and mig._to_packed([1] * 5) is None
    assert mig._to_packed("not json") is None and mig._to_packed(str([0] * 29)) == b""
