"""Exact tests of `dashboard/ingest_writer.py`: the timestamp window at its edges, each rejection's reason and
text, the rows `prepare` makes, `status_applies` case by case, and what one write changes on the device row
(docs/mutation.md). The broker-level and two-session tests are in test_ingest_*.py.
"""
from __future__ import annotations

import json
import types
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from edgeopt.dashboard import histograms
from edgeopt.dashboard import ingest_writer as W
from edgeopt.dashboard import models as m
from edgeopt.dashboard.ingest_writer import (NO_TEXT, BatchWriter, Incoming, Limits, mark_heartbeat_offline, prepare,
                                           status_applies)
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.dashboard.stats import ingest_counters
from edgeopt.sdk.telemetry import (LATENCY_BUCKETS_MS, MAX_PAYLOAD_BYTES, CommandResultPayload, EventPayload,
                                   StatusPayload)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
US = timedelta(microseconds=1)


def msg(topic, payload, received=T0) -> Incoming:
    return Incoming(topic, payload if isinstance(payload, bytes) else payload.to_json(), received)


def one_rejection(items, limits=None):
    out = prepare(items, limits)
    (r,) = out.rejected
    assert out.counters == {r.reason: 1} and out.size == 0
    return r.reason, r.error


# --------------------------------------------------------------------------- prepare: the window and rejections


def test_limits_defaults():
    assert Limits() == Limits(max_bytes=MAX_PAYLOAD_BYTES, max_ahead=timedelta(days=1), max_age=timedelta(days=7))


@pytest.mark.parametrize("kind", ["telemetry", "status"])
def test_ts_ahead_of_receipt_at_the_edge(kind):
    d = SimDevice("dev-1")
    make = (lambda ts: d.telemetry(ts=ts)[0]) if kind == "telemetry" else (lambda ts: d.status("online", ts=ts))
    edge = T0 + timedelta(days=1)
    assert prepare([msg(d.topic(kind), make(edge))]).size == 1
    late = edge + US
    assert one_rejection([msg(d.topic(kind), make(late))]) == (
        "ts_out_of_window", f"ts {late.isoformat()} is more than 1 day, 0:00:00 ahead of its receipt at {T0.isoformat()}")


def test_ts_behind_receipt_at_the_edge_and_status_exempt():
    d = SimDevice("dev-1")
    edge = T0 - timedelta(days=7)
    assert prepare([msg(d.topic("telemetry"), d.telemetry(ts=edge)[0])]).size == 1
    old = edge - US
    assert one_rejection([msg(d.topic("telemetry"), d.telemetry(ts=old)[0])]) == (
        "ts_out_of_window", f"ts {old.isoformat()} is more than 7 days, 0:00:00 before its receipt at {T0.isoformat()}")
    # a retained birth carries the time the device came online, however long ago
    assert prepare([msg(d.topic("status"), d.status("online", ts=T0 - timedelta(days=400)))]).size == 1
    # no age bound at all
    assert prepare([msg(d.topic("telemetry"), d.telemetry(ts=old)[0])], Limits(max_age=None)).size == 1
    custom = Limits(max_ahead=timedelta(seconds=5), max_age=timedelta(seconds=5))
    assert prepare([msg(d.topic("events"), EventPayload(device_id="dev-1", session_id="s", seq=1, ts=T0 + timedelta(
        seconds=5), event="install"))], custom).size == 1
    assert one_rejection([msg(d.topic("events"), EventPayload(device_id="dev-1", session_id="s", seq=1,
                                                              ts=T0 - timedelta(seconds=6), event="install"))],
                         custom)[0] == "ts_out_of_window"


def test_rejections_name_their_reason():
    d = SimDevice("dev-1")
    good = d.telemetry(ts=T0)[0]
    assert one_rejection([msg("edgeopt/v1/sim/dev-1/cmd", good)]) == ("unexpected_kind",
                                                                       "ingest does not take 'cmd' messages")
    reason, error = one_rejection([msg("nonsense", good)])
    assert reason == "bad_topic" and error
    other = good.model_copy(update={"device_id": "dev-2"})
    assert one_rejection([msg(d.topic("telemetry"), other)]) == (
        "device_mismatch", "payload device_id 'dev-2' on the topic of 'dev-1'")
    assert one_rejection([msg(d.topic("telemetry"), b"{")])[0] == "bad_json"


def test_payload_size_limit_is_the_limits():
    d = SimDevice("dev-1")
    data = d.telemetry(ts=T0)[0].to_json()
    assert prepare([msg(d.topic("telemetry"), data)], Limits(max_bytes=len(data))).size == 1
    assert one_rejection([msg(d.topic("telemetry"), data)], Limits(max_bytes=len(data) - 1))[0] == "oversize"


def test_the_fast_path_refuses_what_the_contract_refuses():
    """pydantic's JSON parser alone would take a NUL or a deep nest inside an ignored field: the contract does not."""
    d = SimDevice("dev-1")
    doc = json.loads(d.telemetry(ts=T0)[0].to_json())
    nul = json.dumps(dict(doc, extra="a\u0000b")).encode()
    assert b"\\u0000" in nul
    deep = json.dumps(dict(doc, extra=json.loads("[" * 200 + "]" * 200))).encode()
    from edgeopt.sdk.telemetry import PayloadError, parse_payload

    for data in (nul, deep):
        with pytest.raises(PayloadError) as err:
            parse_payload("telemetry", data)
        assert one_rejection([msg(d.topic("telemetry"), data)])[0] == err.value.reason
    assert prepare([msg(d.topic("telemetry"), json.dumps(doc).encode())]).size == 1


def test_a_bug_on_one_message_is_set_aside_as_ingest_error(monkeypatch):
    d = SimDevice("dev-1")

    def broken(p):
        raise KeyError("boom")

    monkeypatch.setattr(W, "_telemetry_rows", broken)
    ev = EventPayload(device_id="dev-1", session_id="s", seq=9, ts=T0, event="install")
    out = prepare([msg(d.topic("telemetry"), d.telemetry(ts=T0)[0]), msg(d.topic("events"), ev)])
    (r,) = out.rejected
    assert (r.reason, r.error) == ("ingest_error", "KeyError: 'boom'")
    assert out.counters == {"ingest_error": 1} and out.size == 1 and out.telemetry == [] and out.telemetry_msgs == {}


# --------------------------------------------------------------------------- prepare: rows


def test_telemetry_rows_and_in_batch_duplicates():
    d = SimDevice("dev-1", fleet="f1", models=("a", "b"))
    p = d.telemetry(ts=T0)[0]
    out = prepare([msg(d.topic("telemetry"), p), msg(d.topic("telemetry"), p)])
    assert out.counters == {"duplicate": 1} and out.size == 1
    assert out.telemetry_msgs == {("dev-1", p.session_id, p.seq): 2}
    assert [(dev, r["model"]) for dev, r in out.telemetry] == [("dev-1", "a"), ("dev-1", "b")]
    row = out.telemetry[0][1]
    s = p.models[0]
    h = s.latency.to_histogram()
    p50, p95, p99 = h.quantiles((0.5, 0.95, 0.99))
    assert row == dict(ts=T0, session_id=p.session_id, seq=p.seq, interval_s=10.0, cpu_percent=p.system.cpu_percent,
                       rss_bytes=p.system.rss_bytes, temperature_c=None, model="a", model_version="1.0.0",
                       requests=s.requests, errors=s.errors, throughput_ips=s.throughput_ips,
                       hist_counts=histograms.pack(h), hist_sum_ms=h.sum_ms, p50_ms=p50, p95_ms=p95, p99_ms=p99,
                       queue_depth=s.queue_depth, batch_sizes=s.batch_sizes, live_sequences=None, **NO_TEXT)
    # stored in the 1.1 layout, and every percentile recomputed from it (not the device's own figures)
    assert histograms.unpack(row["hist_counts"], row["hist_sum_ms"]).bins == h.bins and h.count > 0
    assert out.fleets == {"dev-1": "f1"}
    assert out.touch["dev-1"] == dict(ts=T0, session=p.session_id, interval=10.0, received=T0,
                                      p95=max(s.p95_ms for s in p.models), cpu=p.system.cpu_percent,
                                      rss=p.system.rss_bytes)


def test_telemetry_without_models_is_one_empty_row():
    d = SimDevice("dev-1", models=())
    p = d.telemetry(ts=T0)[0]
    out = prepare([msg(d.topic("telemetry"), p)])
    ((_, row),) = out.telemetry
    assert {k: row[k] for k in ("model", "model_version", "requests", "errors", "throughput_ips", "hist_sum_ms",
                                "p50_ms", "p95_ms", "p99_ms", "queue_depth", "batch_sizes", "live_sequences")} == dict(
        model="", model_version=None, requests=0, errors=0, throughput_ips=0.0, hist_sum_ms=0.0, p50_ms=None,
        p95_ms=None, p99_ms=None, queue_depth=0, batch_sizes={}, live_sequences=None)
    assert {k: row[k] for k in NO_TEXT} == NO_TEXT
    assert row["hist_counts"] == b""
    assert out.touch["dev-1"]["p95"] is None


def test_touch_keeps_the_newest_telemetry_and_the_first_fleet():
    d = SimDevice("dev-1", fleet="f1")
    newer, older, same = d.telemetry(ts=T0)[0], d.telemetry(ts=T0 - timedelta(seconds=5))[0], d.telemetry(ts=T0)[0]
    out = prepare([msg(d.topic("telemetry"), newer), msg(d.topic("telemetry"), older)])
    assert out.touch["dev-1"]["ts"] == T0 and out.touch["dev-1"]["interval"] == newer.interval_s
    out = prepare([msg(d.topic("telemetry"), newer), msg(d.topic("telemetry"), same, received=T0 + US)])
    assert out.touch["dev-1"]["received"] == T0 + US  # the same ts: the later message's facts
    other = SimDevice("dev-1", fleet="f2")
    out = prepare([msg(d.topic("telemetry"), newer), msg(other.topic("telemetry"), other.telemetry(ts=T0)[0])])
    assert out.fleets == {"dev-1": "f1"}


def test_event_and_result_rows():
    ev = EventPayload(device_id="dev-1", session_id="s", seq=3, ts=T0, event="install", ok=False, model="digits",
                      version="2", from_version="1", message="x" * 5000, command_id="c", deployment_id="d",
                      details={"k": 1})
    res = CommandResultPayload(device_id="dev-1", session_id="s", seq=4, ts=T0, command_id="c", command="deploy",
                               ok=True, status="succeeded", message="y" * 4001, deployment_id="d", details={"j": 2})
    got = T0 + timedelta(seconds=1)
    out = prepare([msg("edgeopt/v1/f/dev-1/events", ev, got), msg("edgeopt/v1/f/dev-1/cmd/result", res, got)])
    assert out.events == [("dev-1", dict(ts=T0, session_id="s", seq=3, kind="install", ok=False, model="digits",
                                         version="2", from_version="1", message="x" * 4000, command_id="c",
                                         deployment_id="d", details={"k": 1}, received_at=got))]
    assert out.results == [("dev-1", dict(ts=T0, session_id="s", seq=4, command_id="c", command="deploy", ok=True,
                                          status="succeeded", message="y" * 4000, deployment_id="d",
                                          details={"j": 2}, received_at=got))]
    assert out.fleets == {"dev-1": "f"} and out.size == 2 and out.touch == {}


def test_status_is_kept_with_its_receipt():
    d = SimDevice("dev-1", fleet="f9")
    st = d.status("online", ts=T0)
    out = prepare([msg(d.topic("status"), st, T0 + US)])
    assert out.statuses == [("dev-1", st, T0 + US)] and out.fleets == {"dev-1": "f9"} and out.size == 1


# --------------------------------------------------------------------------- status_applies


def _dev(session_id="s1", session_ts=T0, status="online", offline_reason=None, status_seq=5):
    return types.SimpleNamespace(session_id=session_id, session_ts=session_ts, status=status,
                                 offline_reason=offline_reason, status_seq=status_seq)


def _st(state="online", session_id="s1", seq=5, ts=T0):
    return StatusPayload(device_id="d", session_id=session_id, seq=seq, ts=ts, state=state)


@pytest.mark.parametrize("dev,p,applies", [
    (_dev(session_id=None), _st(), True),
    (_dev(session_ts=None), _st(), True),
    (_dev(status="offline", offline_reason="will"), _st("offline"), False),
    (_dev(status="offline", offline_reason="heartbeat"), _st("offline"), True),
    (_dev(status="online"), _st("offline", seq=0), True),
    (_dev(status_seq=None), _st("online", seq=0), True),
    (_dev(status_seq=5), _st("online", seq=5), False),
    (_dev(status_seq=5), _st("online", seq=6), True),
    (_dev(), _st("online", session_id="s2", ts=T0), False),
    (_dev(), _st("offline", session_id="s2", ts=T0 + US), True),
    (_dev(), _st("online", session_id="s2", ts=T0 - US), False),
])
def test_status_applies(dev, p, applies):
    assert status_applies(dev, p) is applies


# --------------------------------------------------------------------------- the writer


def _device(session, device_id="dev-1"):
    session.expire_all()
    return session.scalars(select(m.Device).where(m.Device.device_id == device_id)).one()


def test_writer_refuses_other_databases():
    with pytest.raises(ValueError) as err:
        BatchWriter(types.SimpleNamespace(dialect=types.SimpleNamespace(name="mysql")))
    assert str(err.value) == "unsupported database dialect 'mysql'"


def test_write_stats_and_counters(engine, session):
    d = SimDevice("dev-1", models=("a", "b"))
    p = d.telemetry(ts=T0)[0]
    ev = EventPayload(device_id="dev-1", session_id=d.session_id, seq=d.next_seq(), ts=T0, event="install")
    res = CommandResultPayload(device_id="dev-1", session_id=d.session_id, seq=d.next_seq(), ts=T0, command_id="c",
                               ok=True, status="succeeded")
    items = [msg(d.topic("telemetry"), p), msg(d.topic("events"), ev), msg(d.topic("cmd/result"), res),
             msg(d.topic("status"), d.status("online", ts=T0)), msg(d.topic("telemetry"), b"{")]
    writer = BatchWriter(engine, name="ingest-a")
    st = writer.write(prepare(items), T0)
    assert st == W.WriteStats(telemetry_msgs=1, telemetry_rows=2, events=1, results=1, statuses=1, duplicates=0,
                              dead_letters=1)
    st = writer.write(prepare(items), T0)
    assert st == W.WriteStats(telemetry_msgs=0, telemetry_rows=0, events=0, results=0, statuses=0, duplicates=3,
                              dead_letters=1)
    assert ingest_counters(session) == {"telemetry": 1, "events": 1, "cmd_result": 1, "status": 2, "duplicate": 3,
                                        "bad_json": 2}
    writer.forget_devices()
    assert writer._pks == {}
    assert writer.write(prepare(items[:1]), T0).duplicates == 1  # the device is found again, not made twice
    assert session.scalars(select(m.Device.device_id)).all() == ["dev-1"]


def test_new_device_row(engine, session):
    d = SimDevice("dev-1", fleet="f1")
    BatchWriter(engine).write(prepare([msg(d.topic("events"), EventPayload(
        device_id="dev-1", session_id="s", seq=1, ts=T0, event="install"))]), T0 + US)
    dev = _device(session)
    assert (dev.fleet, dev.first_seen, dev.status, dev.capabilities) == ("f1", T0 + US, "offline", {})


def test_telemetry_sets_the_heartbeat_deadline_and_keeps_newer_facts(engine, session):
    d = SimDevice("dev-1")
    w = BatchWriter(engine)
    p = d.telemetry(ts=T0, interval_s=7)[0]
    w.write(prepare([msg(d.topic("telemetry"), p, T0 + US)]), T0)
    dev = _device(session)
    assert dev.heartbeat_deadline == T0 + US + timedelta(seconds=3 * 7)
    assert (dev.last_seen, dev.telemetry_interval_s, dev.status, dev.session_id, dev.session_ts) == (
        T0, 7.0, "online", d.session_id, T0)
    assert dev.status_changed_at == T0 + US
    # an older message later: the newer facts stay, the deadline never moves back
    old = d.telemetry(ts=T0 - timedelta(seconds=30), interval_s=1)[0]
    w.write(prepare([msg(d.topic("telemetry"), old, T0)]), T0)
    dev = _device(session)
    assert (dev.last_seen, dev.telemetry_interval_s, dev.heartbeat_deadline) == (T0, 7.0, T0 + US + timedelta(seconds=21))
    # a newer one moves everything on
    new = d.telemetry(ts=T0 + timedelta(seconds=10), interval_s=2)[0]
    w.write(prepare([msg(d.topic("telemetry"), new, T0 + timedelta(seconds=10))]), T0)
    dev = _device(session)
    assert (dev.last_seen, dev.telemetry_interval_s) == (T0 + timedelta(seconds=10), 2.0)
    assert dev.heartbeat_deadline == T0 + timedelta(seconds=21) + US  # max(old deadline, 10 s + 3 * 2 s)


def test_heartbeat_offline_boundary(engine, session):
    d = SimDevice("dev-1")
    BatchWriter(engine).write(prepare([msg(d.topic("telemetry"), d.telemetry(ts=T0, interval_s=10)[0])]), T0)
    deadline = T0 + timedelta(seconds=30)
    assert mark_heartbeat_offline(session, deadline) == 0
    assert mark_heartbeat_offline(session, deadline + US) == 1
    session.commit()
    dev = _device(session)
    assert (dev.status, dev.offline_reason, dev.status_changed_at) == ("offline", "heartbeat", deadline + US)
    assert mark_heartbeat_offline(session, deadline + timedelta(hours=1)) == 0


def test_status_rows_and_session_bookkeeping(engine, session):
    d = SimDevice("dev-1", session_id="s1")
    w = BatchWriter(engine)
    w.write(prepare([msg(d.topic("status"), d.status("online", ts=T0, seq=4), T0 + US)]), T0)
    dev = _device(session)
    assert (dev.status, dev.offline_reason, dev.session_id, dev.session_ts, dev.status_seq) == (
        "online", None, "s1", T0, 4)
    assert (dev.status_changed_at, dev.last_seen, dev.heartbeat_deadline) == (T0 + US, T0, None)
    ev = session.scalars(select(m.Event)).one()
    assert (ev.kind, ev.ok, ev.message, ev.seq, ev.received_at) == ("online", True, "agent 0.1.0 online", 4, T0 + US)
    # the will of the same session, prepared at connect (smaller seq, older ts): applies, keeps the larger seq
    w.write(prepare([msg(d.topic("status"), d.status("offline", ts=T0 - timedelta(seconds=1), seq=1),
                         T0 + timedelta(seconds=2))]), T0)
    dev = _device(session)
    assert (dev.status, dev.offline_reason, dev.status_seq, dev.session_ts) == ("offline", "will", 4, T0)
    assert dev.status_changed_at == T0 + timedelta(seconds=2)
    assert session.scalars(select(m.Event.message).where(m.Event.kind == "offline")).one() == "agent 0.1.0 offline"
    # a new session's birth
    n = SimDevice("dev-1", session_id="s2")
    w.write(prepare([msg(n.topic("status"), n.status("online", ts=T0 + timedelta(minutes=1), seq=2))]), T0)
    dev = _device(session)
    assert (dev.session_id, dev.session_ts, dev.status_seq, dev.last_seen) == (
        "s2", T0 + timedelta(minutes=1), 2, T0 + timedelta(minutes=1))
    # a birth of the same session with a larger seq but an older ts keeps the newest session ts
    w.write(prepare([msg(n.topic("status"), n.status("online", ts=T0, seq=9), T0 + timedelta(hours=1))]), T0)
    dev = _device(session)
    assert (dev.session_ts, dev.status_seq, dev.last_seen) == (T0 + timedelta(minutes=1), 9, T0 + timedelta(minutes=1))
    assert dev.status_changed_at == T0  # when s2's birth arrived; online to online changes nothing


def test_status_without_agent_version(engine, session):
    st = StatusPayload(device_id="dev-1", session_id="s", seq=1, ts=T0, state="online")
    BatchWriter(engine).write(prepare([msg("edgeopt/v1/f/dev-1/status", st)]), T0)
    assert session.scalars(select(m.Event.message)).one() == "agent ? online"
    assert _device(session).profile is None


def test_inventory_profile_packages_groups_and_tags(engine, session):
    d = SimDevice("dev-1", models=("digits", "yolo"), profile="npu", groups=("g1", "g2"), tags=("t1",))
    w = BatchWriter(engine)
    st = d.status("online", ts=T0)
    st = st.model_copy(update={"packages": st.packages + [st.packages[0].model_copy(update={"version": "9"})]})
    w.write(prepare([msg(d.topic("status"), st)]), T0)
    dev = _device(session)
    assert [(p.name, p.version) for p in dev.packages] == [("digits", "1.0.0"), ("yolo", "1.0.0")]
    assert dev.profile == "npu" and dev.groups == ["g1", "g2"] and dev.tags == ["t1"]
    # a manual membership stays when the agent stops reporting groups; agent ones go; tags only grow
    manual = m.DeviceGroup(name="manual", description="", created_at=T0)
    session.add(manual)
    session.flush()
    session.add(m.DeviceGroupMember(group_id=manual.id, device_pk=dev.id, source="manual"))
    session.commit()
    d.groups, d.tags, d.models = (), ("t2",), ("yolo",)
    st = d.status("online", ts=T0 + US)
    st = st.model_copy(update={"capabilities": {"profile": 5}})
    w.write(prepare([msg(d.topic("status"), st)]), T0)
    dev = _device(session)
    assert dev.groups == ["manual"] and dev.tags == ["t1", "t2"]
    assert [p.name for p in dev.packages] == ["yolo"] and dev.profile == "npu"  # from the first package
    st = d.status("online", ts=T0 + 2 * US).model_copy(update={"capabilities": {}, "packages": []})
    w.write(prepare([msg(d.topic("status"), st)]), T0)
    dev = _device(session)
    assert dev.profile == "npu" and dev.packages == []  # kept: nothing says otherwise
    assert dev.capabilities == {}


def test_offline_status_does_not_sync_inventory(engine, session):
    d = SimDevice("dev-1", models=("digits",), groups=("g1",))
    w = BatchWriter(engine)
    w.write(prepare([msg(d.topic("status"), d.status("online", ts=T0))]), T0)
    d.models, d.groups = (), ()
    w.write(prepare([msg(d.topic("status"), d.status("offline", ts=T0 + US))]), T0)
    dev = _device(session)
    assert [p.name for p in dev.packages] == ["digits"] and dev.groups == ["g1"] and dev.status == "offline"


def test_add_counters_sums(engine, session):
    with session.begin():
        W.add_counters(session, {"b": 2, "a": 1}, T0, engine.dialect.name)
    with session.begin():
        W.add_counters(session, {"a": 5}, T0 + US, engine.dialect.name)
    assert ingest_counters(session) == {"a": 6, "b": 2}
    session.expire_all()
    when = {c.reason: c.updated_at for c in session.scalars(select(m.IngestCounter))}
    assert when == {"a": T0 + US, "b": T0}  # the time of the batch that last added to it


# --------------------------------------------------------------------------- plain values (mutation survivors)


def test_incoming_defaults_and_frozen_limits():
    """A message from anything but MQTT (a test, a replay) has no packet id, QoS 0 and no connection."""
    item = Incoming("t", b"x", T0)
    assert (item.mid, item.qos, item.conn) == (0, 0, 0)
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError: one Limits is shared by every batch
        Limits().max_bytes = 1


def test_prepared_size_and_reject():
    out = W.Prepared()
    assert (out.telemetry, out.telemetry_msgs, out.events, out.results, out.statuses, out.fleets, out.touch,
            out.rejected, out.size) == ([], {}, [], [], [], {}, {}, [], 0)
    assert W.Prepared().counters is not out.counters
    item = Incoming("t", b"x", T0)
    out.reject(item, "why", "because")
    out.reject(item, "why", "again")
    assert out.counters == {"why": 2} and [(r.reason, r.error) for r in out.rejected] == [("why", "because"),
                                                                                         ("why", "again")]
    out.telemetry_msgs[("d", "s", 1)] = 3
    out.events.append(("d", {}))
    out.results.append(("d", {}))
    out.statuses.append(("d", None, T0))
    assert out.size == 4  # messages, not rows: the telemetry message of 3 rows counts once


def test_writer_defaults_and_dialects():
    def engine(name):
        return types.SimpleNamespace(dialect=types.SimpleNamespace(name=name))

    w = BatchWriter(engine("sqlite"))
    assert (w.name, w.dialect, w._pks, w.dead_letter_budget.per_minute) == ("", "sqlite", {}, 1000)
    assert BatchWriter(engine("postgresql"), name="i2", dead_letters_per_minute=5).dead_letter_budget.per_minute == 5
    assert W.WriteStats() == W.WriteStats(0, 0, 0, 0, 0, 0, 0)
    from sqlalchemy.dialects import postgresql, sqlite

    assert isinstance(W._insert("postgresql", m.Event.__table__), postgresql.Insert)
    assert isinstance(W._insert("sqlite", m.Event.__table__), sqlite.Insert)


def test_statuses_of_one_batch_apply_in_order_per_device(engine, session):
    a, b = SimDevice("dev-a", session_id="sa"), SimDevice("dev-b", session_id="sb")
    items = [msg(b.topic("status"), b.status("online", ts=T0, seq=1)),
             msg(a.topic("status"), a.status("online", ts=T0, seq=1)),
             msg(a.topic("status"), a.status("offline", ts=T0 + US, seq=2)),
             msg(b.topic("status"), b.status("online", ts=T0 + US, seq=2))]
    st = BatchWriter(engine).write(prepare(items), T0)
    assert st.statuses == 4
    assert (_device(session, "dev-a").status, _device(session, "dev-a").offline_reason) == ("offline", "will")
    assert (_device(session, "dev-b").status, _device(session, "dev-b").status_seq) == ("online", 2)


def test_results_without_events_and_events_without_results(engine, session):
    d = SimDevice("dev-1")
    res = CommandResultPayload(device_id="dev-1", session_id="s", seq=1, ts=T0, command_id="c", ok=True,
                               status="succeeded")
    ev = EventPayload(device_id="dev-1", session_id="s", seq=2, ts=T0, event="install")
    w = BatchWriter(engine)
    assert w.write(prepare([msg(d.topic("cmd/result"), res)]), T0) == W.WriteStats(results=1)
    assert w.write(prepare([msg(d.topic("events"), ev)]), T0) == W.WriteStats(events=1)
    assert ingest_counters(session) == {"cmd_result": 1, "events": 1}


def test_telemetry_of_the_same_ts_replaces_the_device_facts(engine, session):
    """``last_seen <= ts``: a second message with the same ts (another model's interval) is as new."""
    d = SimDevice("dev-1")
    w = BatchWriter(engine)
    w.write(prepare([msg(d.topic("telemetry"), d.telemetry(ts=T0, interval_s=7)[0])]), T0)
    p = d.telemetry(ts=T0, interval_s=3)[0]
    w.write(prepare([msg(d.topic("telemetry"), p)]), T0)
    dev = _device(session)
    assert (dev.last_seen, dev.telemetry_interval_s, dev.last_cpu_percent, dev.last_rss_bytes) == (
        T0, 3.0, p.system.cpu_percent, p.system.rss_bytes)
    assert dev.last_p95_ms == max(s.p95_ms for s in p.models)


def test_birth_after_telemetry_of_the_same_session(engine, session):
    """Telemetry sets the session (no status seq yet); the birth of that session then sets the seq."""
    d = SimDevice("dev-1", session_id="s1")
    w = BatchWriter(engine)
    w.write(prepare([msg(d.topic("telemetry"), d.telemetry(ts=T0, seq=1)[0])]), T0)
    dev = _device(session)
    assert (dev.session_id, dev.status_seq) == ("s1", None)
    w.write(prepare([msg(d.topic("status"), d.status("online", ts=T0 + US, seq=0))]), T0)
    dev = _device(session)
    assert (dev.status, dev.status_seq, dev.session_ts) == ("online", 0, T0 + US)


def test_inventory_rows_carry_the_receipt_and_skip_repeated_names(engine, session):
    d = SimDevice("dev-1", models=("a", "b"), groups=("g1",))
    st = d.status("online", ts=T0)
    first = st.packages[0]
    st = st.model_copy(update={"packages": [first, first.model_copy(update={"version": "9"}), st.packages[1]]})
    got = T0 + timedelta(seconds=3)
    BatchWriter(engine).write(prepare([msg(d.topic("status"), st, got)]), T0)
    dev = _device(session)
    assert [(p.name, p.version, p.updated_at) for p in dev.packages] == [("a", "1.0.0", got), ("b", "1.0.0", got)]
    g = session.scalars(select(m.DeviceGroup)).one()
    assert (g.name, g.description, g.created_at) == ("g1", "", got)
    assert [mb.source for mb in dev.memberships] == ["agent"]


def test_a_good_payload_takes_the_fast_path(monkeypatch):
    """pydantic's own JSON parser validates a good payload in one step; parse_payload (json.loads, then
    validation: twice the time) is only for what that step refuses or may wrongly accept."""
    calls = []
    real = W.parse_payload
    monkeypatch.setattr(W, "parse_payload", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    d = SimDevice("dev-1")
    data = d.telemetry(ts=T0)[0].to_json()
    assert prepare([msg(d.topic("telemetry"), data)], Limits(max_bytes=len(data))).size == 1
    assert calls == []  # exactly at the size limit still goes the fast way
    assert one_rejection([msg(d.topic("telemetry"), b"{")])[0] == "bad_json"
    assert calls == ["telemetry"]


def test_telemetry_after_a_will_neither_revives_nor_restamps(engine, session):
    """A device offline by its last will stays offline on late telemetry of that session, and the time its
    status changed stays the will's (only a heartbeat-offline device of the same session is revived)."""
    d = SimDevice("dev-1", session_id="s1")
    w = BatchWriter(engine)
    w.write(prepare([msg(d.topic("status"), d.status("online", ts=T0, seq=1), T0)]), T0)
    will_at = T0 + timedelta(seconds=5)
    w.write(prepare([msg(d.topic("status"), d.status("offline", ts=T0 + US, seq=0), will_at)]), T0)
    late = T0 + timedelta(seconds=9)
    w.write(prepare([msg(d.topic("telemetry"), d.telemetry(ts=T0 + timedelta(seconds=2), seq=2)[0], late)]), T0)
    dev = _device(session)
    assert (dev.status, dev.offline_reason, dev.status_changed_at) == ("offline", "will", will_at)
    assert dev.last_seen == T0 + timedelta(seconds=2)


def test_reported_profile_comes_before_the_packages_and_a_will_is_not_ok(engine, session):
    d = SimDevice("dev-1", models=("digits",), profile="cpu")
    w = BatchWriter(engine)
    st = d.status("online", ts=T0).model_copy(update={"capabilities": {"profile": "igpu"}})
    assert st.packages[0].profile == "cpu"
    w.write(prepare([msg(d.topic("status"), st)]), T0)
    assert _device(session).profile == "igpu"
    w.write(prepare([msg(d.topic("status"), d.status("offline", ts=T0 + US))]), T0)
    assert [(e.kind, e.ok) for e in session.scalars(select(m.Event).order_by(m.Event.seq))] == [
        ("online", True), ("offline", False)]
