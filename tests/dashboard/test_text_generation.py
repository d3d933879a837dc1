"""Text-generation figures of language models (issue 14, telemetry ``ModelStats.text``): stored from telemetry,
rolled up (sketches merged by adding counts, tokens summed, KV peak the max, KV use the mean), served by the
series API twins with TTFT / TPOT percentiles of the merged sketches, and refused when malformed."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from sqlalchemy import func, select, update

from edgeopt.dashboard import histograms, stats
from edgeopt.dashboard import models as m
from edgeopt.dashboard.ingest_writer import NO_TEXT, BatchWriter, Incoming, prepare
from edgeopt.dashboard.rollup import run_rollup
from edgeopt.dashboard.simulate import SimDevice, minute_series
from edgeopt.sdk.telemetry import RELATIVE_ACCURACY, Histogram, TelemetryPayload

from dashboard_web_fixtures import api_token, app, bearer, client, ingest, trusted_keys  # noqa: F401

T0 = datetime(2026, 3, 1, 11, 30, tzinfo=timezone.utc)
NOW = T0 + timedelta(hours=1)
MINUTES = 40


def _merged(texts, which: str) -> Histogram:
    h = Histogram()
    for t in texts:
        h.merge(getattr(t, which).to_histogram())
    return h


@pytest.fixture
def llm(engine):
    """g0 serves 'digits' and the language model 'chat' (TTFT around 60 ms), g1 only 'chat' (around 600 ms,
    and its runtime does not count preemptions), n0 only 'digits'. Telemetry every 60 s for 40 minutes from
    11:30, through the ingest writer, rolled up. Returns {device: [(ts, TextStats, samples)]} for 'chat'."""
    g0 = SimDevice("g0", models=("digits", "chat"), text=("chat",), median_ms=3.0, seed=1)
    g1 = SimDevice("g1", models=("chat",), text=("chat",), median_ms=30.0, seed=2)
    n0 = SimDevice("n0", models=("digits",), seed=3)
    items = [Incoming(d.topic("status"), d.status(ts=T0).to_json(), T0) for d in (g0, g1, n0)]
    sent: dict[str, list] = {"g0": [], "g1": []}
    for k in range(MINUTES):
        ts = T0 + timedelta(minutes=k, seconds=5)
        for d in (g0, g1, n0):
            p, _ = d.telemetry(ts=ts, interval_s=60, requests=20)
            for s in p.models:
                if s.text is not None:
                    if d is g1:
                        s.text.preemptions = None
                    sent[d.device_id].append((ts, s.text, d.text_samples[s.model]))
            items.append(Incoming(d.topic("telemetry"), p.to_json(), ts))
    BatchWriter(engine).write(prepare(items), NOW)
    run_rollup(engine, now=NOW)
    return sent


def test_raw_rows_keep_the_figures_as_sent_and_other_models_none(session, llm):
    ts, t, _ = llm["g0"][7]
    rows = {(dev, r.model): r for r, dev in session.execute(
        select(m.TelemetryRaw, m.Device.device_id).join(m.Device).where(m.TelemetryRaw.ts == ts))}
    r = rows[("g0", "chat")]
    assert histograms.unpack(r.ttft_counts, r.ttft_sum_ms).bins == t.ttft.to_histogram().bins
    assert histograms.unpack(r.tpot_counts, r.tpot_sum_ms).bins == t.tpot.to_histogram().bins
    assert r.ttft_sum_ms == pytest.approx(t.ttft.sum_ms) and r.ttft_sum_ms > 0
    assert (r.prompt_tokens, r.generated_tokens, r.kv_cache_usage, r.kv_cache_peak, r.running_requests,
            r.waiting_requests, r.cancelled, r.preemptions) == (
        t.prompt_tokens, t.generated_tokens, t.kv_cache_usage, t.kv_cache_peak, t.running, t.waiting, t.cancelled,
        t.preemptions)
    assert rows[("g1", "chat")].preemptions is None and rows[("g1", "chat")].generated_tokens > 0
    for key in (("g0", "digits"), ("n0", "digits")):
        assert {c: getattr(rows[key], c) for c in NO_TEXT} == NO_TEXT


def test_rollups_merge_sketches_sum_counts_average_use_and_keep_the_peak(session, llm):
    g0 = session.scalar(select(m.Device.id).where(m.Device.device_id == "g0"))
    hour = session.get(m.Rollup1h, (g0, "chat", T0.replace(minute=0)))
    texts = [t for ts, t, _ in llm["g0"] if ts.hour == 11]  # minutes 30..59 of 11:00
    assert len(texts) == 30
    assert histograms.unpack(hour.ttft_counts).bins == _merged(texts, "ttft").bins
    assert histograms.unpack(hour.tpot_counts).bins == _merged(texts, "tpot").bins
    assert hour.ttft_sum_ms == pytest.approx(sum(t.ttft.sum_ms for t in texts))
    assert hour.prompt_tokens == sum(t.prompt_tokens for t in texts)
    assert hour.generated_tokens == sum(t.generated_tokens for t in texts)
    assert hour.cancelled == sum(t.cancelled for t in texts)
    assert hour.preemptions == sum(t.preemptions for t in texts)
    # use: the mean of the end-of-interval values (not the last one); peak, running, waiting: the most
    assert hour.kv_cache_usage_avg == pytest.approx(np.mean([t.kv_cache_usage for t in texts]))
    assert hour.kv_cache_usage_avg != pytest.approx(texts[-1].kv_cache_usage)
    assert hour.kv_cache_peak_max == max(t.kv_cache_peak for t in texts)
    assert (hour.running_max, hour.waiting_max) == (max(t.running for t in texts), max(t.waiting for t in texts))
    minute = session.get(m.Rollup1m, (g0, "chat", T0 + timedelta(minutes=3)))
    assert histograms.unpack(minute.ttft_counts).bins == llm["g0"][3][1].ttft.to_histogram().bins
    # a runtime that does not count preemptions: None, not 0
    g1 = session.scalar(select(m.Device.id).where(m.Device.device_id == "g1"))
    assert session.get(m.Rollup1h, (g1, "chat", T0.replace(minute=0))).preemptions is None
    assert session.get(m.Rollup1h, (g0, "digits", T0.replace(minute=0))).generated_tokens is None

    # fleet-wide: both devices' sketches added; preemptions of the device that counts them only
    fleet = session.get(m.FleetRollup, ("1h", "chat", T0.replace(minute=0)))
    both = texts + [t for ts, t, _ in llm["g1"] if ts.hour == 11]
    assert histograms.unpack(fleet.ttft_counts).bins == _merged(both, "ttft").bins
    assert fleet.generated_tokens == sum(t.generated_tokens for t in both)
    assert fleet.preemptions == hour.preemptions
    assert fleet.kv_cache_peak_max == max(t.kv_cache_peak for t in both)
    assert session.get(m.FleetRollup, ("1h", "digits", T0.replace(minute=0))).ttft_counts is None


@pytest.mark.parametrize("res", ["raw", "1m", "1h"])
def test_device_series_percentiles_come_from_the_merged_sketches(session, llm, res):
    s = stats.device_series(session, "g0", T0.replace(minute=0), NOW, model="chat", resolution=res, max_points=200)
    assert s["text_models"] == ["chat"]
    by_point: dict[str, list] = {}
    for ts, t, samples in llm["g0"]:
        key = ts.replace(minute=0, second=0) if res == "1h" else ts.replace(second=0)
        by_point.setdefault(key, []).append((t, samples))
    pts = [p for p in s["points"] if p["ttft_p95"] is not None]
    assert len(pts) == len(by_point) == (2 if res == "1h" else MINUTES)
    for p, (key, group) in zip(pts, sorted(by_point.items())):
        texts = [t for t, _ in group]
        ttft, tpot = _merged(texts, "ttft"), _merged(texts, "tpot")
        assert (p["ttft_p50"], p["ttft_p95"]) == pytest.approx(ttft.quantiles((0.5, 0.95)), rel=1e-4)
        assert (p["tpot_p50"], p["tpot_p95"]) == pytest.approx(tpot.quantiles((0.5, 0.95)), rel=1e-4)
        # ... within the sketch's relative accuracy of the exact (lower) percentile of the very samples
        exact = np.quantile(np.concatenate([smp["ttft"] for _, smp in group]), 0.95, method="lower")
        assert abs(p["ttft_p95"] - exact) <= (RELATIVE_ACCURACY + 1e-4) * exact
        generated = sum(t.generated_tokens for t in texts)
        assert p["generated_tokens"] == generated
        assert p["prompt_tokens"] == sum(t.prompt_tokens for t in texts)
        # tokens over the time the point covers: an hour, a minute, or a raw row's 60 s interval
        assert p["tokens_per_s"] == pytest.approx(generated / (3600 if res == "1h" else 60), abs=1e-3)
        assert p["kv_cache_peak"] == pytest.approx(max(t.kv_cache_peak for t in texts), abs=1e-4)
        assert p["kv_cache_usage"] == pytest.approx(np.mean([t.kv_cache_usage for t in texts]), abs=1e-4)
        assert p["cancelled"] == sum(t.cancelled for t in texts)
        assert p["preemptions"] == sum(t.preemptions for t in texts)
        assert p["running"] == max(t.running for t in texts)
    # a device without a language model: every text figure None, and no text model named
    other = stats.device_series(session, "n0", T0.replace(minute=0), NOW, resolution=res, max_points=200)
    assert other["text_models"] == [] and other["points"]
    assert all(p[f] is None for p in other["points"] for f in ("ttft_p95", "tpot_p95", "tokens_per_s", "kv_cache_usage"))


@pytest.mark.parametrize("where", [{}, {"profile": "cpu"}])
def test_fleet_series_merges_the_devices_sketches_not_their_percentiles(session, llm, where):
    s = stats.fleet_latency_series(session, T0.replace(minute=0), NOW, model="chat", resolution="1h", **where)
    assert s["text_models"] == ["chat"]
    p = s["points"][0]
    texts = {d: [t for ts, t, _ in llm[d] if ts.hour == 11] for d in ("g0", "g1")}
    merged = _merged(texts["g0"] + texts["g1"], "ttft")
    assert p["ttft_p95"] == pytest.approx(merged.quantile(0.95), rel=1e-4)
    mean_of_p95 = np.mean([_merged(texts[d], "ttft").quantile(0.95) for d in texts])
    assert abs(p["ttft_p95"] - mean_of_p95) > 0.2 * mean_of_p95  # what averaging percentiles would have shown
    assert p["tpot_p50"] == pytest.approx(_merged(texts["g0"] + texts["g1"], "tpot").quantile(0.5), rel=1e-4)
    generated = sum(t.generated_tokens for d in texts for t in texts[d])
    assert p["generated_tokens"] == generated and p["tokens_per_s"] == pytest.approx(generated / 3600, abs=1e-3)
    assert p["preemptions"] == sum(t.preemptions for t in texts["g0"])
    assert "running" not in p
    # the latency-only model: no text figures
    d = stats.fleet_latency_series(session, T0.replace(minute=0), NOW, model="digits", resolution="1h", **where)
    assert d["text_models"] == [] and all(q["ttft_p95"] is None and q["tokens_per_s"] is None for q in d["points"])


def test_redelivery_is_written_once_and_rollups_rerun_the_same(engine, session):
    d = SimDevice("r0", models=("chat",), text=("chat",), seed=5)
    p, _ = d.telemetry(ts=T0 + timedelta(seconds=5), interval_s=60)
    items = [Incoming(d.topic("telemetry"), p.to_json(), T0) for _ in range(2)]
    w = BatchWriter(engine)
    st = w.write(prepare(items), T0)
    st2 = w.write(prepare(items[:1]), T0)
    assert (st.telemetry_rows, st2.telemetry_rows, st2.duplicates) == (1, 0, 1)
    assert stats.ingest_counters(session)["duplicate"] == 2  # one in the batch, one redelivered later
    run_rollup(engine, now=T0 + timedelta(minutes=2))
    first = session.scalars(select(m.Rollup1m)).one()
    before = (bytes(first.ttft_counts), first.generated_tokens, first.kv_cache_usage_avg)
    session.expire_all()
    run_rollup(engine, now=T0 + timedelta(minutes=3), overlap_ids=100)
    again = session.scalars(select(m.Rollup1m)).one()
    assert (bytes(again.ttft_counts), again.generated_tokens, again.kv_cache_usage_avg) == before
    assert before[1] == p.models[0].text.generated_tokens


def _bad_text_payloads(d: SimDevice) -> dict[str, bytes]:
    good = json.loads(d.telemetry(ts=T0, interval_s=60)[0].to_json())

    def variant(fn) -> bytes:
        doc = json.loads(json.dumps(good))
        doc["seq"] = d.next_seq()
        fn(doc["models"][0]["text"], doc["models"][0])
        return json.dumps(doc).encode()

    return {
        "text.ttft": variant(lambda t, s: t["ttft"].update(keys=[5, 3], counts=[1, 1])),  # not ascending
        "text.tpot": variant(lambda t, s: t["tpot"].update(layout="ddsketch-log-0.02")),  # another layout
        "text.kv_cache_usage": variant(lambda t, s: t.update(kv_cache_usage=1.5)),  # a share above 1
        "text.generated_tokens": variant(lambda t, s: t.update(generated_tokens=-3)),
        "text": variant(lambda t, s: s.update(text="fast")),
    }


def test_a_malformed_text_block_is_dead_lettered_and_the_rest_written(engine, session):
    d = SimDevice("bad-1", models=("chat",), text=("chat",), seed=6)
    plain = SimDevice("plain-1", models=("digits",), seed=7)
    bad = _bad_text_payloads(d)
    items = [Incoming(d.topic("telemetry"), d.telemetry(ts=T0, interval_s=60)[0].to_json(), T0)]
    items += [Incoming(d.topic("telemetry"), b, T0) for b in bad.values()]
    items += [Incoming(plain.topic("telemetry"), plain.telemetry(ts=T0)[0].to_json(), T0),
              Incoming(d.topic("telemetry"), d.telemetry(ts=T0, interval_s=60)[0].to_json(), T0)]
    st = BatchWriter(engine).write(prepare(items), T0)
    assert (st.telemetry_msgs, st.dead_letters) == (3, len(bad))
    assert stats.ingest_counters(session) == {"bad_schema": len(bad), "telemetry": 3}
    letters = session.scalars(select(m.DeadLetter).order_by(m.DeadLetter.id)).all()
    assert [x.payload for x in letters] == list(bad.values())
    for x, where in zip(letters, bad):
        assert x.reason == "bad_schema" and x.error.startswith(f"invalid telemetry payload at models.0.{where}"), x.error
    assert session.scalar(select(func.count()).where(m.TelemetryRaw.generated_tokens.is_not(None))) == 2


def test_a_token_count_the_database_cannot_hold_is_dead_lettered(db_url):
    """prompt_tokens = 2**70 passes the contract (no upper bound) but fits no BIGINT: that message alone is set
    aside (db_refused) and the rest of its batch is written."""
    from sqlalchemy.orm import Session

    from edgeopt.dashboard import ingest as ingest_mod
    from test_ingest_unit import _run_writer

    svc = ingest_mod.IngestService(ingest_mod.IngestSettings(database_url=db_url, flush_ms=20, batch_size=50))
    d = SimDevice("huge-t", models=("chat",), text=("chat",), seed=8)
    now = datetime.now(timezone.utc)
    items = [Incoming(d.topic("telemetry"), d.telemetry(ts=now)[0].to_json(), now) for _ in range(4)]
    doc = json.loads(items[1].payload)
    doc["models"][0]["text"]["prompt_tokens"] = 2**70
    items[1].payload = json.dumps(doc).encode()
    assert _run_writer(svc, items, want_rows=3) == 3
    with Session(svc.engine) as s:
        assert [(x.reason, x.payload) for x in s.scalars(select(m.DeadLetter))] == [("db_refused", items[1].payload)]
    svc.engine.dispose()


def test_a_malformed_stored_sketch_is_left_out_not_fatal(engine, session, llm, caplog, monkeypatch):
    """A raw row whose TTFT bytes are not a sketch (an old restore, a hand edit): the rollup skips that row
    and goes on, and the raw chart leaves its sketch out."""
    import logging

    from edgeopt.dashboard import rollup as rollup_module

    # an earlier test's logging.config (Alembic's env.py) may have disabled existing loggers: the warning is
    # part of what this test checks, so the logger is switched back on
    monkeypatch.setattr(rollup_module.log, "disabled", False)
    caplog.set_level(logging.WARNING, logger=rollup_module.log.name)
    ts = llm["g0"][38][0]
    g0 = session.scalar(select(m.Device.id).where(m.Device.device_id == "g0"))
    session.execute(update(m.TelemetryRaw).where(m.TelemetryRaw.device_pk == g0, m.TelemetryRaw.model == "chat",
                                                 m.TelemetryRaw.ts == ts).values(ttft_counts=b"\x01\x02\x03"))
    session.execute(update(m.RollupState).values(value=0))
    session.commit()
    st = run_rollup(engine, now=NOW)
    assert st.buckets_1m > 0 and "malformed raw row of device" in caplog.text
    hour = session.get(m.Rollup1h, (g0, "chat", ts.replace(minute=0, second=0)))
    assert hour.generated_tokens == sum(t.generated_tokens for t_s, t, _ in llm["g0"] if t_s.hour == 12)
    s = stats.device_series(session, "g0", ts.replace(second=0), ts.replace(second=0) + timedelta(minutes=1),
                            model="chat", resolution="raw")
    (p,) = s["points"]
    assert p["ttft_p95"] is None and p["tpot_p95"] is not None and p["generated_tokens"] > 0


# ------------------------------------------------------------------------------------ API twins and pages
@pytest.fixture
def llm_app(app):
    """'llm-0' (digits + chat) and 'cnn-0' (digits) with 30 minutes of telemetry ending now, rolled up."""
    engine = app.extensions["edgeopt_engine"]
    now = datetime.now(timezone.utc).replace(microsecond=0)
    start = now - timedelta(minutes=30)
    devices = [SimDevice("llm-0", models=("digits", "chat"), text=("chat",), seed=1), SimDevice("cnn-0", seed=2)]
    ingest(engine, [(d.topic("status"), d.status("online", ts=start - timedelta(seconds=1)).to_json())
                    for d in devices], start)
    series = minute_series(devices, start, 30, interval_s=60.0, requests=10)
    ingest(engine, [(t, p) for t, p, _ in series], now)
    run_rollup(engine, now + timedelta(minutes=2))
    return [TelemetryPayload.model_validate_json(p).models[1].text for t, p, _ in series if "llm-0" in t]


def test_api_twins_return_the_text_figures(app, client, llm_app):
    viewer = bearer(api_token(app, "viewer"))
    assert client.get("/api/v1/devices/llm-0", headers=viewer).get_json()["text_models"] == ["chat"]
    assert client.get("/api/v1/devices/cnn-0", headers=viewer).get_json()["text_models"] == []
    assert client.get("/api/v1/fleet", headers=viewer).get_json()["text_models"] == ["chat"]

    doc = client.get("/api/v1/devices/llm-0/series?range=24h&model=chat", headers=viewer).get_json()
    assert doc["text_models"] == ["chat"] and doc["resolution"] == "1m"
    pts = [p for p in doc["points"] if p["ttft_p95"] is not None]
    assert len(pts) >= 10  # 30 minutes in the 3-minute steps of a 24 h chart
    assert sum(p["generated_tokens"] for p in doc["points"]) == sum(t.generated_tokens for t in llm_app)
    for p in pts:
        assert p["ttft_p50"] <= p["ttft_p95"] and p["tpot_p50"] <= p["tpot_p95"] and p["tokens_per_s"] > 0
        assert 0 < p["kv_cache_usage"] <= p["kv_cache_peak"] <= 1 and p["preemptions"] is not None
    csv = client.get("/api/v1/devices/llm-0/series?range=24h&model=chat&format=csv", headers=viewer).data.decode()
    head, *lines = csv.splitlines()
    cols = head.split(",")
    assert {"ttft_p50", "ttft_p95", "tpot_p95", "tokens_per_s", "kv_cache_usage", "preemptions"} <= set(cols)
    assert [float(x.split(",")[cols.index("ttft_p95")]) for x in lines if x.split(",")[cols.index("ttft_p95")]] == [
        p["ttft_p95"] for p in pts]

    other = client.get("/api/v1/devices/cnn-0/series?range=24h", headers=viewer).get_json()
    assert other["text_models"] == [] and all(p["ttft_p95"] is None for p in other["points"])

    fleet = client.get("/api/v1/fleet/series?range=24h&model=chat", headers=viewer).get_json()
    assert fleet["text_models"] == ["chat"]
    fpts = [p for p in fleet["points"] if p["ttft_p95"] is not None]
    assert len(fpts) >= 6 and all(p["ttft_p50"] <= p["ttft_p95"] and p["tokens_per_s"] > 0 for p in fpts)
    assert sum(p["generated_tokens"] for p in fpts) == sum(t.generated_tokens for t in llm_app)
    fcsv = client.get("/api/v1/fleet/series?range=24h&format=csv", headers=viewer).data.decode().splitlines()[0]
    assert fcsv.split(",")[-len(("ttft_p50",)) - 10:] == ["ttft_p50", "ttft_p95", "tpot_p50", "tpot_p95",
                                                           "tokens_per_s", "prompt_tokens", "generated_tokens",
                                                           "kv_cache_usage", "kv_cache_peak", "cancelled",
                                                           "preemptions"]
