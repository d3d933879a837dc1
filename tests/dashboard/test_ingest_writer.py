"""The ingest's batch writer on a real database (SQLite and PostgreSQL): validation, idempotence,
status ordering, heartbeat timeout, inventory."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from edgeopt.dashboard import models as m
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, mark_heartbeat_offline, prepare
from edgeopt.dashboard.histograms import unpack_pairs
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.dashboard.stats import ingest_counters
from edgeopt.sdk.telemetry import CommandResultPayload, EventPayload, Histogram

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def msg(topic: str, payload, received: datetime = T0) -> Incoming:
    data = payload if isinstance(payload, bytes) else payload.to_json()
    return Incoming(topic, data, received)


def write(engine, items, now=T0):
    return BatchWriter(engine).write(prepare(items), now)


def count(session, model) -> int:
    session.expire_all()
    return session.scalar(select(func.count()).select_from(model))


def test_telemetry_creates_device_and_rows(engine, session):
    d = SimDevice("dev-1", fleet="f1", models=("a", "b"))
    p, _ = d.telemetry(ts=T0)
    st = write(engine, [msg(d.topic("telemetry"), p)])
    assert (st.telemetry_msgs, st.telemetry_rows) == (1, 2)
    dev = session.scalars(select(m.Device)).one()
    assert (dev.device_id, dev.fleet, dev.status, dev.session_id) == ("dev-1", "f1", "online", d.session_id)
    assert dev.last_seen == T0 and dev.heartbeat_deadline == T0 + timedelta(seconds=30)
    assert dev.last_p95_ms == max(s.p95_ms for s in p.models)
    rows = session.scalars(select(m.TelemetryRaw).order_by(m.TelemetryRaw.model)).all()
    assert [r.model for r in rows] == ["a", "b"]
    assert unpack_pairs(rows[0].hist_counts) == p.models[0].latency.to_histogram().to_pairs()
    assert rows[0].requests == 50
    assert rows[0].batch_sizes == {"1": 25, "4": 25} and rows[0].cpu_percent == p.system.cpu_percent
    assert ingest_counters(session) == {"telemetry": 1}


def test_schema_1_0_telemetry_is_converted_and_its_percentiles_recomputed(engine, session):
    """A device still on schema 1.0 (29 fixed buckets) keeps working: its histogram is stored in the 1.1
    layout and p50/p95/p99 come from that histogram, not from the figures the device computed."""
    d = SimDevice("old-1", models=("a",))
    p, _ = d.telemetry(ts=T0)
    doc = json.loads(p.to_json())
    counts = [0] * 29
    counts[10], counts[20] = 90, 10  # 3..5 ms and 150..200 ms
    doc["schema_version"] = "1.0"
    doc["models"][0].update(latency={"counts": counts, "sum_ms": 2000.0}, requests=100, p95_ms=1.0, p99_ms=1.0)
    st = write(engine, [msg(d.topic("telemetry"), json.dumps(doc).encode())])
    assert st.telemetry_rows == 1
    row = session.scalars(select(m.TelemetryRaw)).one()
    h = Histogram.from_pairs(unpack_pairs(row.hist_counts))
    assert h.count == 100 and row.hist_sum_ms == 2000.0
    assert 3.0 <= row.p50_ms <= 5.0 and 150.0 <= row.p95_ms <= 200.0  # not the device's 1.0
    assert row.p95_ms == h.quantile(0.95) and row.p99_ms == h.quantile(0.99)
    assert session.scalars(select(m.Device)).one().last_p95_ms == row.p95_ms


def test_qos1_redelivery_is_counted_once(engine, session):
    d = SimDevice("dev-2")
    items = []
    for k in range(5):
        p, _ = d.telemetry(ts=T0 + timedelta(seconds=10 * k))
        items.append(msg(d.topic("telemetry"), p))
    ev = EventPayload(device_id="dev-2", session_id=d.session_id, seq=d.next_seq(), ts=T0, event="install",
                      ok=True, model="digits", version="1.1", command_id="c1", deployment_id="dep1")
    res = CommandResultPayload(device_id="dev-2", session_id=d.session_id, seq=d.next_seq(), ts=T0,
                               command_id="c1", command="deploy", ok=True, status="succeeded", deployment_id="dep1")
    items += [msg(d.topic("events"), ev), msg(d.topic("cmd/result"), res)]
    write(engine, items)
    before = (count(session, m.TelemetryRaw), count(session, m.Event), count(session, m.CommandResult))
    # The same messages again, in one batch and then duplicated inside a batch.
    write(engine, items)
    write(engine, items + items[:2])
    after = (count(session, m.TelemetryRaw), count(session, m.Event), count(session, m.CommandResult))
    assert before == after == (5, 1, 1)
    c = ingest_counters(session)
    assert c["telemetry"] == 5 and c["events"] == 1 and c["cmd_result"] == 1
    assert c["duplicate"] == 7 + 9
    e = session.scalars(select(m.Event)).one()
    assert (e.kind, e.command_id, e.deployment_id, e.version) == ("install", "c1", "dep1", "1.1")
    r = session.scalars(select(m.CommandResult)).one()
    assert (r.status, r.ok, r.deployment_id) == ("succeeded", True, "dep1")


def test_malformed_barrage_only_counts(engine, session):
    d = SimDevice("dev-3")
    good, _ = d.telemetry(ts=T0)
    doc = json.loads(good.to_json())
    wrong_type = dict(doc, seq="three")
    unknown_major = dict(doc, schema_version="2.0")
    neg = json.loads(good.to_json())
    neg["models"][0]["requests"] = -1
    other_device = dict(doc, device_id="someone-else")
    t = d.topic("telemetry")
    items = [msg(t, b"{not json"), msg(t, b"\xff\xfe"), msg(t, b"[1,2]"), msg(t, json.dumps(wrong_type).encode()),
             msg(t, json.dumps(unknown_major).encode()), msg(t, json.dumps(neg).encode()),
             msg(t, b"{" + b" " * (300 * 1024) + b"}"), msg("edgeopt/v1/f/dev-3/nonsense", good.to_json()),
             msg("other/topic", good.to_json()), msg("edgeopt/v1/f/bad+id/telemetry", good.to_json()),
             msg(t, json.dumps(other_device).encode()), msg(d.topic("status"), b'{"state": "sideways"}')]
    write(engine, items)
    assert count(session, m.TelemetryRaw) == 0 and count(session, m.Device) == 0
    assert ingest_counters(session) == {"bad_json": 3, "bad_schema": 3, "bad_version": 1, "oversize": 1,
                                        "bad_topic": 3, "device_mismatch": 1}


def _device(session, device_id="dev-s"):
    session.expire_all()
    return session.scalars(select(m.Device).where(m.Device.device_id == device_id)).one()


def test_late_last_will_of_old_session_does_not_mark_new_session_offline(engine, session):
    old = SimDevice("dev-s", session_id="old")
    will_old = old.status("offline", ts=T0, seq=0)  # prepared when the old session connected
    write(engine, [msg(old.topic("status"), old.status("online", ts=T0, seq=1))])
    new = SimDevice("dev-s", session_id="new")
    write(engine, [msg(new.topic("status"), new.status("online", ts=T0 + timedelta(minutes=5), seq=1))])
    write(engine, [msg(old.topic("status"), will_old)])  # arrives late
    dev = _device(session)
    assert (dev.status, dev.session_id) == ("online", "new")
    # The new session's own will does apply.
    write(engine, [msg(new.topic("status"), new.status("offline", ts=T0 + timedelta(minutes=5), seq=0))])
    dev = _device(session)
    assert (dev.status, dev.offline_reason, dev.session_id) == ("offline", "will", "new")
    # A replay of the retained birth of the same session changes nothing.
    write(engine, [msg(new.topic("status"), new.status("online", ts=T0 + timedelta(minutes=5), seq=1))])
    assert _device(session).status == "offline"
    # Status changes are in the event log, replays once.
    kinds = session.scalars(select(m.Event.kind).order_by(m.Event.ts, m.Event.seq)).all()
    assert sorted(kinds) == ["offline", "offline", "online", "online"]


def test_status_syncs_inventory(engine, session):
    d = SimDevice("dev-i", models=("digits", "yolo"), profile="npu", groups=("line-1", "line-2"), tags=("canary",))
    write(engine, [msg(d.topic("status"), d.status("online", ts=T0))])
    dev = _device(session, "dev-i")
    assert dev.profile == "npu" and dev.agent_version == "0.1.0" and dev.capabilities["cpu_flags"] == ["avx2"]
    assert [(p.name, p.version) for p in dev.packages] == [("digits", "1.0.0"), ("yolo", "1.0.0")]
    assert dev.groups == ["line-1", "line-2"] and dev.tags == ["canary"]
    d.groups = ("line-2",)
    d.models = ("digits",)
    write(engine, [msg(d.topic("status"), d.status("online", ts=T0 + timedelta(seconds=1)))])
    dev = _device(session, "dev-i")
    assert dev.groups == ["line-2"] and [p.name for p in dev.packages] == ["digits"]


def test_heartbeat_timeout_and_revival(engine, session):
    d = SimDevice("dev-h")
    write(engine, [msg(d.topic("status"), d.status("online", ts=T0))])
    p, _ = d.telemetry(ts=T0, interval_s=10)
    write(engine, [msg(d.topic("telemetry"), p, received=T0)])
    assert mark_heartbeat_offline(session, T0 + timedelta(seconds=29)) == 0
    session.commit()
    assert _device(session, "dev-h").status == "online"
    assert mark_heartbeat_offline(session, T0 + timedelta(seconds=31)) == 1
    session.commit()
    dev = _device(session, "dev-h")
    assert (dev.status, dev.offline_reason) == ("offline", "heartbeat")
    # Telemetry of the same session brings it back; a device offline by its will is not revived.
    p, _ = d.telemetry(ts=T0 + timedelta(seconds=40))
    write(engine, [msg(d.topic("telemetry"), p, received=T0 + timedelta(seconds=40))])
    assert _device(session, "dev-h").status == "online"
    write(engine, [msg(d.topic("status"), d.status("offline", ts=T0))])
    p, _ = d.telemetry(ts=T0 + timedelta(seconds=50))
    write(engine, [msg(d.topic("telemetry"), p, received=T0 + timedelta(seconds=50))])
    assert _device(session, "dev-h").status == "offline"


def test_telemetry_without_models_keeps_system_figures(engine, session):
    d = SimDevice("dev-n", models=())
    p, _ = d.telemetry(ts=T0)
    write(engine, [msg(d.topic("telemetry"), p)])
    row = session.scalars(select(m.TelemetryRaw)).one()
    assert row.model == "" and row.requests == 0 and row.cpu_percent == p.system.cpu_percent
