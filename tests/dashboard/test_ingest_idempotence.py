"""Idempotence is per (device, session, seq): a device that restarts starts a new session whose sequence
numbers begin again, and those messages are new, not duplicates. On SQLite and PostgreSQL, through the real
writer (``prepare`` + ``BatchWriter``)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select

from edgeopt.dashboard import models as m
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.simulate import SimDevice
from edgeopt.dashboard.stats import ingest_counters
from edgeopt.sdk.telemetry import CommandResultPayload, EventPayload

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _messages(d: SimDevice, start: datetime) -> list[Incoming]:
    """Two telemetry messages, an event and a command result of one session (seqs from 1 on)."""
    out = []
    for k in range(2):
        p, _ = d.telemetry(ts=start + timedelta(seconds=10 * k))
        out.append(Incoming(d.topic("telemetry"), p.to_json(), start))
    ev = EventPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), ts=start, event="install",
                      ok=True, model="digits", version="1.0")
    res = CommandResultPayload(device_id=d.device_id, session_id=d.session_id, seq=d.next_seq(), ts=start,
                               command_id=f"c-{d.session_id}", command="ping", ok=True, status="succeeded")
    out += [Incoming(d.topic("events"), ev.to_json(), start), Incoming(d.topic("cmd/result"), res.to_json(), start)]
    return out


def _stored(session) -> dict[str, set]:
    session.expire_all()
    return {
        "telemetry": set(session.execute(select(m.TelemetryRaw.session_id, m.TelemetryRaw.seq)).all()),
        "events": set(session.execute(select(m.Event.session_id, m.Event.seq)).all()),
        "results": set(session.execute(select(m.CommandResult.session_id, m.CommandResult.seq)).all()),
    }


def _sessions(device_id="dev-1"):
    # Two sessions of one device (a restart in between): the same sequence numbers, 1 to 4, in both.
    old = SimDevice(device_id, session_id="aaaaaaaaaaaaaaaa")
    new = SimDevice(device_id, session_id="bbbbbbbbbbbbbbbb")
    return old, new


def test_two_sessions_reusing_seqs_in_one_batch_are_both_stored(engine, session):
    old, new = _sessions()
    items = _messages(old, T0) + _messages(new, T0 + timedelta(minutes=1))
    assert [i.payload for i in items[:4]] != [i.payload for i in items[4:]]
    st = BatchWriter(engine).write(prepare(items), T0 + timedelta(minutes=2))
    assert (st.telemetry_msgs, st.duplicates) == (4, 0)
    stored = _stored(session)
    tel = {(old.session_id, 1), (old.session_id, 2), (new.session_id, 1), (new.session_id, 2)}
    assert stored["telemetry"] == tel
    assert stored["events"] == {(old.session_id, 3), (new.session_id, 3)}
    assert stored["results"] == {(old.session_id, 4), (new.session_id, 4)}
    assert ingest_counters(session).get("duplicate", 0) == 0
    # QoS 1 redelivers both sessions' messages: nothing new, each counted once as a duplicate.
    BatchWriter(engine).write(prepare(items + items), T0 + timedelta(minutes=3))
    assert _stored(session) == stored
    assert ingest_counters(session)["duplicate"] == 2 * len(items)


def test_two_sessions_reusing_seqs_in_separate_batches_are_both_stored(engine, session):
    old, new = _sessions("dev-2")
    writer = BatchWriter(engine)
    writer.write(prepare(_messages(old, T0)), T0 + timedelta(seconds=30))
    st = writer.write(prepare(_messages(new, T0 + timedelta(minutes=1))), T0 + timedelta(minutes=2))
    assert (st.telemetry_msgs, st.duplicates) == (2, 0)
    stored = _stored(session)
    assert len(stored["telemetry"]) == 4 and len(stored["events"]) == 2 and len(stored["results"]) == 2
    assert session.scalar(select(func.count()).select_from(m.Device)) == 1
