"""Query functions behind the pages: device list (search, filters, sort, paging), fleet summary,
device detail and events."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from edgeopt.dashboard import stats
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.sdk.telemetry import EventPayload

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def fleet(engine):
    """12 devices: even ones npu in group 'line-a' with package digits 2.0, odd ones cpu; three offline."""
    items = []
    for i in range(12):
        d = SimDevice(f"cam-{i:02d}" if i < 10 else f"gate_{i}", models=("digits",), profile="npu" if i % 2 == 0 else "cpu",
                      groups=("line-a",) if i % 2 == 0 else ("line-b",), tags=("canary",) if i == 4 else (),
                      median_ms=0.5 * 2 ** i, seed=i)
        st = d.status("online", ts=T0)
        if i % 2 == 0:
            st.packages[0].version = "2.0"
        items.append(Incoming(d.topic("status"), st.to_json(), T0))
        p, _ = d.telemetry(ts=T0 + timedelta(seconds=i))
        items.append(Incoming(d.topic("telemetry"), p.to_json(), T0))
        if i in (3, 7, 11):
            items.append(Incoming(d.topic("status"), d.status("offline", ts=T0).to_json(), T0))
        if i == 0:
            for k, kind in enumerate(("download", "install", "switch")):
                ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(),
                                  ts=T0 + timedelta(seconds=k + 1), event=kind, model="digits", version="2.0")
                items.append(Incoming(d.topic("events"), ev.to_json(), T0))
    BatchWriter(engine).write(prepare(items), T0)


def ids(page):
    return [d["device_id"] for d in page["items"]]


def test_list_filters_and_search(session, fleet):
    assert stats.list_devices(session)["total"] == 12
    assert ids(stats.list_devices(session, status="offline")) == ["cam-03", "cam-07", "gate_11"]
    assert stats.list_devices(session, profile="npu")["total"] == 6
    assert ids(stats.list_devices(session, group="line-a", search="cam-0")) == ["cam-00", "cam-02", "cam-04",
                                                                               "cam-06", "cam-08"]
    assert stats.list_devices(session, package="digits@2.0")["total"] == 6
    assert stats.list_devices(session, package="digits")["total"] == 12
    assert stats.list_devices(session, package="nothing")["total"] == 0
    # LIKE wildcards in the search are literal
    assert ids(stats.list_devices(session, search="e_1")) == ["gate_10", "gate_11"]
    assert stats.list_devices(session, search="%")["total"] == 0
    assert ids(stats.list_devices(session, search="CAM-1")) == []
    assert ids(stats.list_devices(session, search="CAM-01")) == ["cam-01"]


def test_list_sort_and_paging(session, fleet):
    p1 = stats.list_devices(session, sort="p95", order="desc", per_page=5)
    p2 = stats.list_devices(session, sort="p95", order="desc", per_page=5, page=2)
    p3 = stats.list_devices(session, sort="p95", order="desc", per_page=5, page=3)
    assert (p1["pages"], len(p3["items"])) == (3, 2)
    p95s = [d["p95_ms"] for d in p1["items"] + p2["items"] + p3["items"]]
    assert p95s == sorted(p95s, reverse=True) and len(set(ids(p1) + ids(p2) + ids(p3))) == 12
    row = p1["items"][0]
    assert set(row) >= {"device_id", "status", "last_seen", "profile", "groups", "tags", "packages", "p95_ms"}
    with pytest.raises(ValueError, match="unknown sort key 'color'"):
        stats.list_devices(session, sort="color")
    with pytest.raises(ValueError, match="order must be"):
        stats.list_devices(session, order="up")
    with pytest.raises(ValueError, match="per_page 1..500"):
        stats.list_devices(session, per_page=10_000)


def test_fleet_summary(session, fleet):
    s = stats.fleet_summary(session, slowest=3)
    assert (s["devices"], s["online"], s["offline"]) == (12, 9, 3)
    assert {p["profile"]: p["devices"] for p in s["profiles"]} == {"npu": 6, "cpu": 6}
    assert {(p["name"], p["version"]): p["devices"] for p in s["package_versions"]} == {
        ("digits", "2.0"): 6, ("digits", "1.0.0"): 6}
    assert [d["device_id"] for d in s["slowest"]] == ["gate_11", "gate_10", "cam-09"]
    assert s["open_alerts"] == 0 and s["models"] == ["digits"]


def test_device_detail_and_events(session, fleet):
    d = stats.device_detail(session, "cam-04")
    assert d["tags"] == ["canary"] and d["groups"] == ["line-a"] and d["capabilities"]["profile"] == "npu"
    assert d["packages"][0]["runtime"] == "onnxruntime" and d["status"] == "online"
    assert stats.device_detail(session, "nope") is None
    ev = stats.device_events(session, "cam-00")
    assert [e["kind"] for e in ev] == ["switch", "install", "download", "online"]
    older = stats.device_events(session, "cam-00", before_id=ev[1]["id"], limit=2)
    assert [e["kind"] for e in older] == ["download", "online"]


def test_choose_resolution():
    t = T0
    assert stats.choose_resolution(t - timedelta(hours=1), t, now=t) == "raw"
    assert stats.choose_resolution(t - timedelta(minutes=15), t, now=t) == "raw"
    # raw rows only within the last hour: a longer range, or an old short one, reads the rollups
    assert stats.choose_resolution(t - timedelta(hours=6), t, now=t) == "1m"
    assert stats.choose_resolution(t - timedelta(hours=3), t - timedelta(hours=2, minutes=30), now=t) == "1m"
    assert stats.choose_resolution(t - timedelta(hours=24), t) == "1m"
    assert stats.choose_resolution(t - timedelta(days=30), t) == "1h"
    assert stats.choose_resolution(t - timedelta(hours=24), t, kind="fleet") == "1m"
    assert stats.choose_resolution(t - timedelta(days=3), t, kind="fleet") == "1h"


def test_naive_range_is_refused(session):
    with pytest.raises(ValueError, match="naive datetime"):
        stats.fleet_latency_series(session, datetime(2026, 1, 1), datetime(2026, 1, 2))


def test_vectorized_quantiles_match_the_contract():
    """The charts' numpy quantiles are exactly sdk.telemetry.Histogram.quantiles, row by row."""
    import numpy as np

    from edgeopt.sdk.telemetry import SKETCH_BINS, SKETCH_KEY_MIN, Histogram

    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5, size=(300, SKETCH_BINS)) * (rng.random((300, SKETCH_BINS)) < 0.05)
    counts[0] = 0
    counts[1] = 0
    counts[1][-1] = 3  # only the top key (>= 100 s)
    counts[2] = 0
    counts[2][0] = 1  # only the lowest key (<= 10 us), a single count
    qs = (0.0, 0.01, 0.5, 0.95, 0.99, 1.0)
    got = stats.quantiles(counts, qs)
    for i, row in enumerate(counts):
        h = Histogram({SKETCH_KEY_MIN + k: int(c) for k, c in enumerate(row.tolist()) if c})
        for j, q in enumerate(qs):
            want = h.quantile(q)
            assert (want is None and np.isnan(got[i, j])) or got[i, j] == pytest.approx(want, abs=1e-9)
