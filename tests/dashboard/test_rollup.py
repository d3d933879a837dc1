"""Rollups on a real database: sums exact, merged percentiles right against numpy on the raw samples,
idempotent reruns, late data, retention."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import func, select

from edgeopt.dashboard import models as m
from edgeopt.dashboard import stats
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.rollup import RetentionSettings, run_rollup
from edgeopt.dashboard.histograms import pack_pairs, unpack_pairs
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.sdk.telemetry import RELATIVE_ACCURACY, SKETCH_KEY_MIN, Histogram

T0 = datetime(2026, 3, 1, 11, 30, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=2)


def _hist(samples: np.ndarray) -> Histogram:
    """The contract's histogram of the raw samples, built in one go (what every merge must come back to)."""
    h = Histogram()
    for v in samples.tolist():
        h.observe(v)
    return h


@pytest.fixture
def fleet(engine):
    """3 devices (2 in group 'slow' with 4x latency), 2 models, telemetry every 60 s for 90 minutes
    from 11:30 (crossing the 12:00 hour), written through the ingest writer."""
    devs = [SimDevice(f"d{i}", models=("a", "b"), median_ms=2.0 * (4 if i else 1), seed=i,
                      groups=("slow",) if i else (), profile="npu" if i else "cpu") for i in range(3)]
    writer = BatchWriter(engine)
    samples: dict[tuple[str, str], list[np.ndarray]] = {}
    items = [Incoming(d.topic("status"), d.status(ts=T0).to_json(), T0) for d in devs]
    for k in range(90):
        ts = T0 + timedelta(minutes=k, seconds=5)
        for d in devs:
            p, s = d.telemetry(ts=ts, interval_s=60, requests=30)
            items.append(Incoming(d.topic("telemetry"), p.to_json(), ts))
            for mo, arr in s.items():
                samples.setdefault((d.device_id, mo), []).append(arr)
    for i in range(0, len(items), 100):
        writer.write(prepare(items[i:i + 100]), NOW)
    return devs, {k: np.concatenate(v) for k, v in samples.items()}


def _snapshot(session):
    session.expire_all()
    out = []
    for model in (m.Rollup1m, m.Rollup1h, m.FleetRollup):
        rows = session.execute(select(model.__table__)).all()
        out.append(sorted(tuple(str(x) for x in r) for r in rows))
    return out


def test_rollup_sums_and_idempotent(engine, session, fleet):
    devs, samples = fleet
    st = run_rollup(engine, now=NOW)
    assert st.raw_rows_scanned == 90 * 3 * 2 and st.buckets_1m == 90 * 3 * 2
    assert session.scalar(select(func.count()).select_from(m.Rollup1h)) == 2 * 3 * 2
    raw_req = session.scalar(select(func.sum(m.TelemetryRaw.requests)))
    assert session.scalar(select(func.sum(m.Rollup1m.requests))) == raw_req == 90 * 3 * 2 * 30
    assert session.scalar(select(func.sum(m.Rollup1h.requests))) == raw_req
    # 1 h histogram of one device and model == numpy over its raw samples of that hour (30 + 60 minutes)
    first_hour = session.scalars(select(m.Rollup1h).where(m.Rollup1h.model == "a",
                                                          m.Rollup1h.bucket_start == T0.replace(minute=0))).all()
    assert len(first_hour) == 3
    d0 = next(r for r in first_hour if r.device_pk == min(x.device_pk for x in first_hour))
    assert unpack_pairs(d0.hist_counts) == _hist(samples[("d0", "a")][:30 * 30]).to_pairs() and d0.samples == 30
    snap = _snapshot(session)
    again = run_rollup(engine, now=NOW)
    assert again.raw_rows_scanned == st.raw_rows_scanned  # overlap rescans, recomputes the same
    assert _snapshot(session) == snap


def test_fleet_percentiles_are_merged_not_averaged(engine, session, fleet):
    devs, samples = fleet
    run_rollup(engine, now=NOW)
    every = np.concatenate([samples[(d.device_id, "a")] for d in devs])
    series = stats.fleet_latency_series(session, T0.replace(minute=0), NOW, model="a", resolution="1h",
                                        max_points=1)
    assert len(series["points"]) == 1
    pt = series["points"][0]
    assert pt["requests"] == len(every) and pt["devices"] == 3
    h = _hist(every)
    for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
        assert pt[key] == pytest.approx(h.quantile(q), abs=1e-3)
        # and within the stated 1% of numpy's exact percentile (the lower one: DDSketch's rank q * (n - 1))
        exact = float(np.quantile(every, q, method="lower"))
        assert abs(pt[key] - exact) <= RELATIVE_ACCURACY * exact + 1e-3
    avg_p95 = np.mean([np.percentile(samples[(d.device_id, "a")], 95) for d in devs])
    assert abs(avg_p95 - np.percentile(every, 95)) > 1.0  # averaging percentiles would be wrong here
    # Per group (device rollups of the group's members) and 1-minute resolution agree with numpy too.
    slow = np.concatenate([samples[(d, "a")] for d in ("d1", "d2")])
    g = stats.fleet_latency_series(session, T0, NOW, model="a", group="slow", resolution="1m", max_points=1)
    assert g["points"][0]["requests"] == len(slow)
    assert g["points"][0]["p95"] == pytest.approx(_hist(slow).quantile(0.95), abs=1e-3)
    p = stats.fleet_latency_series(session, T0, NOW, model="a", profile="cpu", resolution="1m", max_points=1)
    assert p["points"][0]["requests"] == len(samples[("d0", "a")])


def test_late_data_lands_in_its_bucket(engine, session, fleet):
    devs, _ = fleet
    run_rollup(engine, now=NOW)
    late_ts = T0 + timedelta(minutes=10, seconds=30)
    p, _ = devs[0].telemetry(ts=late_ts, interval_s=60, requests=7)
    BatchWriter(engine).write(prepare([Incoming(devs[0].topic("telemetry"), p.to_json(), NOW)]), NOW)
    run_rollup(engine, now=NOW, overlap_ids=0)
    session.expire_all()
    r = session.scalars(select(m.Rollup1m).join(m.Device).where(
        m.Device.device_id == "d0", m.Rollup1m.model == "a", m.Rollup1m.bucket_start == late_ts.replace(second=0))).one()
    assert (r.requests, r.samples) == (37, 2)
    assert session.scalar(select(func.sum(m.Rollup1h.requests))) == session.scalar(
        select(func.sum(m.TelemetryRaw.requests)))


def test_retention(engine, session, fleet):
    run_rollup(engine, now=NOW)
    later = NOW + timedelta(days=3)
    st = run_rollup(engine, now=later, retention=RetentionSettings(raw_hours=48))
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(m.TelemetryRaw)) == 0
    assert session.scalar(select(func.count()).select_from(m.Rollup1m)) == 540  # kept 30 days
    session.rollback()  # end the read transaction: dropping a partition waits for readers (PostgreSQL)
    st = run_rollup(engine, now=NOW + timedelta(days=31), retention=RetentionSettings())
    assert st.deleted >= 540
    assert session.scalar(select(func.count()).select_from(m.Rollup1m)) == 0
    assert session.scalar(select(func.count()).select_from(m.Rollup1h)) == 12


def test_retention_settings_are_validated():
    with pytest.raises(Exception, match="raw_hours"):
        RetentionSettings(raw_hours=0)
    with pytest.raises(Exception, match="extra"):
        RetentionSettings(raw=3)


def test_device_series_resolutions_agree(engine, session, fleet):
    run_rollup(engine, now=NOW)
    total = 90 * 30 * 2
    for res in ("raw", "1m", "1h"):
        s = stats.device_series(session, "d1", T0.replace(minute=0), NOW, resolution=res, max_points=50)
        assert s["resolution"] == res and sum(p["requests"] for p in s["points"]) == total
        assert s["models"] == ["a", "b"] and all(p["cpu_percent"] is not None for p in s["points"])
    auto = stats.device_series(session, "d1", NOW - timedelta(hours=24), NOW)
    assert auto["resolution"] == "1m" and auto["step_s"] >= 60
    with pytest.raises(LookupError, match="unknown device 'nope'"):
        stats.device_series(session, "nope", T0, NOW)


def test_no_stored_row_stops_the_rollup(engine, session, fleet):
    """Rows the ingest refuses today but may have stored before (ts 9999-12-31: OverflowError in every run,
    the watermark never moved) or that are malformed are skipped and counted; the rest rolls up."""
    run_rollup(engine, now=NOW)
    dev = session.scalars(select(m.Device).where(m.Device.device_id == "d0")).one()
    base = dict(device_pk=dev.id, session_id="old", interval_s=60.0, requests=5, errors=0, throughput_ips=0.1,
                hist_sum_ms=1.0, queue_depth=0, batch_sizes={})
    good = pack_pairs([SKETCH_KEY_MIN + 300, 5])
    session.add_all([
        m.TelemetryRaw(**base, model="a", seq=10_001, ts=datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc),
                       hist_counts=good),
        m.TelemetryRaw(**dict(base, batch_sizes={"1": "many"}), model="a", seq=10_002, ts=NOW - timedelta(minutes=2),
                       hist_counts=good),
        m.TelemetryRaw(**base, model="a", seq=10_003, ts=NOW - timedelta(minutes=1), hist_counts=good),
        # stored bytes that are not a histogram: a torn record, a key out of range, a negative count
        m.TelemetryRaw(**base, model="a", seq=10_004, ts=NOW - timedelta(minutes=3), hist_counts=good + b"\x01"),
        m.TelemetryRaw(**base, model="a", seq=10_005, ts=NOW - timedelta(minutes=4),
                       hist_counts=pack_pairs([10_000, 1])),
        m.TelemetryRaw(**base, model="a", seq=10_006, ts=NOW - timedelta(minutes=5),
                       hist_counts=pack_pairs([SKETCH_KEY_MIN, -1])),
    ])
    session.commit()
    st = run_rollup(engine, now=NOW, overlap_ids=0)
    assert st.skipped_rows == 1
    mark = session.get(m.RollupState, "rollup_raw_id")
    session.refresh(mark)
    assert mark.value == session.scalar(select(func.max(m.TelemetryRaw.id)))  # the watermark moved past them
    minute = session.scalars(select(m.Rollup1m).where(m.Rollup1m.device_pk == dev.id, m.Rollup1m.model == "a",
                                                      m.Rollup1m.bucket_start == (NOW - timedelta(minutes=1)))).one()
    assert (minute.requests, minute.hist_counts) == (5, good)
    # The malformed rows' minutes got no bucket at all (not an empty one).
    for minutes in (2, 3, 4, 5):
        assert session.scalar(select(func.count()).select_from(m.Rollup1m).where(
            m.Rollup1m.bucket_start == NOW - timedelta(minutes=minutes))) == 0, minutes
    # Retention runs in the same transaction: it works again too (the reads above end first: on PostgreSQL
    # dropping a partition waits for readers of telemetry_raw, at most 1 s, then leaves it to the next run).
    session.rollback()
    st = run_rollup(engine, now=NOW + timedelta(days=3))
    assert st.deleted + st.partitions_dropped > 0  # rows deleted (SQLite) or their day dropped (PostgreSQL)
