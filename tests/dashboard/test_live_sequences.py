"""Live sequences of stateful models (issue 16): stored from telemetry, rolled up, charted on the device page."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from edgeopt.dashboard import models as m
from edgeopt.dashboard import stats
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.rollup import run_rollup
from edgeopt.dashboard.simulate import SimDevice, minute_series
from edgeopt.sdk.telemetry import TelemetryPayload

from dashboard_web_fixtures import api_token, app, bearer, client, db, ingest, trusted_keys  # noqa: F401

T0 = datetime(2026, 3, 1, 11, 30, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1)


@pytest.fixture
def viewer(app):
    return bearer(api_token(app, "viewer"))


@pytest.fixture
def streams(engine):
    """d0 serves 'vad' (k live sequences at minute k), 'kws' (2) and 'img' (stateless: none reported);
    d1 serves only stateless models. Telemetry every 60 s for 40 minutes from 11:30, through the ingest writer."""
    d0 = SimDevice("d0", models=("vad", "kws", "img"), seed=1)
    d1 = SimDevice("d1", models=("img",), seed=2)
    items = [Incoming(d.topic("status"), d.status(ts=T0).to_json(), T0) for d in (d0, d1)]
    for k in range(40):
        ts = T0 + timedelta(minutes=k, seconds=5)
        p, _ = d0.telemetry(ts=ts, interval_s=60, requests=10)
        p.models[0].live_sequences = k
        p.models[1].live_sequences = 2
        items.append(Incoming(d0.topic("telemetry"), p.to_json(), ts))
        q, _ = d1.telemetry(ts=ts, interval_s=60, requests=10)
        items.append(Incoming(d1.topic("telemetry"), q.to_json(), ts))
    BatchWriter(engine).write(prepare(items), NOW)
    run_rollup(engine, now=NOW)


def test_stored_per_model_and_rolled_up_as_the_most_reported(engine, session, streams):
    raw = {(r.model, r.live_sequences) for r in session.scalars(
        select(m.TelemetryRaw).where(m.TelemetryRaw.ts == T0 + timedelta(minutes=7, seconds=5)))}
    assert raw == {("vad", 7), ("kws", 2), ("img", None)}
    hours = {(r.model, r.bucket_start.hour): r.live_sequences_max for r in session.scalars(select(m.Rollup1h))}
    assert hours[("vad", 11)] == 29 and hours[("vad", 12)] == 39  # the most in each hour, not the last or mean
    assert hours[("kws", 11)] == 2 and hours[("img", 11)] is None and hours[("img", 12)] is None


@pytest.mark.parametrize("res", ["raw", "1m", "1h"])
def test_device_series_sums_the_models_at_every_resolution(session, streams, res):
    s = stats.device_series(session, "d0", T0.replace(minute=0), NOW, resolution=res, max_points=200)
    live = [p["live_sequences"] for p in s["points"]]
    if res == "1h":
        assert live == [29 + 2, 39 + 2]
    else:
        assert live == [k + 2 for k in range(40)]
    other = stats.device_series(session, "d1", T0.replace(minute=0), NOW, resolution=res, max_points=200)
    assert other["points"] and all(p["live_sequences"] is None for p in other["points"])


def test_device_series_csv_has_the_column(app, client, viewer):
    from edgeopt.dashboard.api.fleet import DEVICE_CSV

    col = DEVICE_CSV.index("live_sequences")  # the text-generation columns (issue 14) come after it
    now = datetime.now(timezone.utc).replace(microsecond=0)
    d = SimDevice("seq-0", models=("vad",), stateful=("vad",), seed=3)
    series = minute_series([d], now - timedelta(minutes=5), 5, interval_s=60.0, requests=10)
    ingest(app.extensions["edgeopt_engine"], [(t, p) for t, p, _ in series], now)
    sent = [TelemetryPayload.model_validate_json(p).models[0].live_sequences for _, p, _ in series]
    r = client.get("/api/v1/devices/seq-0/series?range=1h&format=csv", headers=viewer)
    assert r.status_code == 200, r.data
    lines = r.data.decode().splitlines()
    assert lines[0].split(",")[col] == "live_sequences"
    assert [int(x.split(",")[col]) for x in lines[1:]] == sent and all(0 <= v <= 16 for v in sent)
