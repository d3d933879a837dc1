"""Version against version for a deployment: before/after each device's switch, per device group, from
merged 1-minute rollup histograms; the API (JSON and CSV) and the deployment page show it."""
from __future__ import annotations

import csv
import io
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from dashboard_web_fixtures import api_token, app, bearer, client, db, ingest, login, trusted_keys  # noqa: F401
from edgeopt.dashboard import models as m
from edgeopt.dashboard.rollup import run_rollup
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.sdk.telemetry import RELATIVE_ACCURACY, EventPayload


def _seed(app):
    """3 target devices (groups fast: d0, d1; slow: d2), telemetry every minute for 2 h; each switches
    from 1.0.0 to 2.0.0 at its own time in the middle, and its latency halves from then on."""
    engine = app.extensions["edgeopt_engine"]
    now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    start = now - timedelta(hours=2)
    created = start + timedelta(minutes=30)
    devs = [SimDevice(f"cmp-{i}", fleet="test", median_ms=(4.0 if i < 2 else 20.0), seed=i,
                      groups=("fast",) if i < 2 else ("slow",)) for i in range(3)]
    switch_at = {d.device_id: created + timedelta(minutes=20 + 7 * i) for i, d in enumerate(devs)}
    ingest(engine, [(d.topic("status"), d.status("online", ts=start - timedelta(seconds=1)).to_json()) for d in devs],
           start)
    samples = {"before": {}, "after": {}}
    msgs = []
    base = {d.device_id: d.median_ms for d in devs}
    for k in range(120):
        ts = start + timedelta(minutes=k, seconds=30)
        for d in devs:
            sw = switch_at[d.device_id]
            d.median_ms = base[d.device_id] / (2 if ts >= sw else 1)
            p, s = d.telemetry(ts=ts, interval_s=60, requests=40)
            msgs.append((d.topic("telemetry"), p.to_json()))
            lat = s["digits"]
            minute = ts.replace(second=0)
            if sw - timedelta(hours=1) <= minute and minute + timedelta(minutes=1) <= sw:
                samples["before"].setdefault(d.device_id, []).append(lat)
            elif sw + timedelta(minutes=1) <= minute < sw + timedelta(hours=1):
                samples["after"].setdefault(d.device_id, []).append(lat)
    for d in devs:
        ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), ts=switch_at[d.device_id],
                          event="switch", model="digits", version="2.0.0", from_version="1.0.0")
        msgs.append((d.topic("events"), ev.to_json()))
    ingest(engine, msgs, now)
    run_rollup(engine, now + timedelta(minutes=2))
    with app.extensions["edgeopt_sessionmaker"]() as s:
        pkg = m.Package(name="digits", version="2.0.0", profile="cpu", runtime="onnxruntime", sha256="ab" * 32,
                        size=1, storage_path="x")
        dep = m.Deployment(package=pkg, target_kind="group", target_value={"group": "fast"}, created_at=created)
        s.add_all([pkg, dep])
        s.flush()
        pks = dict(s.query(m.Device.device_id, m.Device.id).all())
        s.add_all([m.DeploymentTarget(deployment_id=dep.id, device_pk=pks[d.device_id], state="succeeded")
                   for d in devs])
        s.commit()
        dep_id = dep.id
    return dep_id, {side: {dev: np.concatenate(v) for dev, v in by.items()} for side, by in samples.items()}


def _exact(arrays, q):
    return float(np.quantile(np.concatenate(arrays), q, method="lower"))


def test_before_after_per_group_within_one_percent(app, client):
    dep_id, samples = _seed(app)
    viewer = bearer(api_token(app, "viewer"))
    r = client.get(f"/api/v1/deployments/{dep_id}/latency?window=1h", headers=viewer).get_json()
    assert (r["model"], r["version"], r["from_versions"], r["switched"], r["targets"]) == ("digits", "2.0.0", ["1.0.0"], 3, 3)
    by = {g["group"]: g for g in r["groups"]}
    assert set(by) == {"(all switched devices)", "fast", "slow"}
    members = {"(all switched devices)": ["cmp-0", "cmp-1", "cmp-2"], "fast": ["cmp-0", "cmp-1"], "slow": ["cmp-2"]}
    for group, devs in members.items():
        for side in ("before", "after"):
            got = by[group][side]
            assert got["devices"] == len(devs)
            assert got["requests"] == sum(len(samples[side][d]) for d in devs)
            for q, key in ((0.5, "p50"), (0.95, "p95"), (0.99, "p99")):
                exact = _exact([samples[side][d] for d in devs], q)
                assert abs(got[key] - exact) <= RELATIVE_ACCURACY * exact + 1e-6, (group, side, key)
        assert by[group]["p95_change"] == pytest.approx(by[group]["after"]["p95"] / by[group]["before"]["p95"] - 1,
                                                        abs=1e-4)
        assert -0.6 < by[group]["p95_change"] < -0.4  # the latency halved

    resp = client.get(f"/api/v1/deployments/{dep_id}/latency?format=csv", headers=viewer)
    rows = list(csv.DictReader(io.StringIO(resp.get_data(as_text=True))))
    assert resp.mimetype == "text/csv" and [row["group"] for row in rows] == [g["group"] for g in r["groups"]]
    assert float(rows[0]["after_p95"]) == by["(all switched devices)"]["after"]["p95"]
    bad = client.get(f"/api/v1/deployments/{dep_id}/latency?window=2d", headers=viewer)
    assert bad.status_code == 400 and bad.get_json()["message"] == "unknown window '2d'; expected one of 15m, 1h, 6h, 24h"

    login(client, "viewer")
    page = client.get(f"/deployments/{dep_id}").get_data(as_text=True)
    assert 'id="version-latency"' in page and "1.0.0 vs 2.0.0" in page and "fast (2)" in page
