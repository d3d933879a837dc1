"""Turns a batch of received MQTT messages into rows, in one transaction per batch.

Separate from the MQTT client (``ingest.py``) so it can be tested and benchmarked without a broker.

- :func:`prepare` validates every message against the contracts (``sdk.topics.parse``,
  ``sdk.telemetry.parse_payload``) and its timestamp against a window around its receipt, and sorts it
  into rows. It never raises for one message: a rejected message (or one that hits a bug) is counted by
  reason and set aside in ``Prepared.rejected``, which the writer stores as a dead letter.
- :meth:`BatchWriter.write` writes the rows with dialect-specific ``INSERT .. ON CONFLICT DO NOTHING``
  (SQLite and PostgreSQL), so a redelivered message (QoS 1) is counted once as ``duplicate`` and
  changes nothing else.
- Status messages (``online`` birth / ``offline`` last will) are applied in session order
  (:func:`status_applies`): a late last will of an old session never marks a newer session offline.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import bindparam, case, delete, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from edgeopt.sdk import topics
from edgeopt.sdk.telemetry import (MAX_PAYLOAD_BYTES, PAYLOAD_BY_KIND, CommandResultPayload,
                                   EventPayload, PayloadError, StatusPayload, TelemetryPayload, TextStats,
                                   json_too_deep, parse_payload)

from . import dead_letters, histograms
from . import models as m

log = logging.getLogger(__name__)

HEARTBEAT_INTERVALS = 3  # no telemetry for this many intervals -> offline


@dataclass
class Incoming:
    """One received message: its topic, raw payload and the server time it arrived; for MQTT, its packet
    id, QoS and the connection it came on (it is acknowledged on that connection once committed)."""

    topic: str
    payload: bytes
    received: datetime
    mid: int = 0
    qos: int = 0
    conn: int = 0


@dataclass(frozen=True)
class Limits:
    """What :func:`prepare` accepts besides the contracts: payload size, and how far a payload's ``ts``
    may be ahead of or behind its receipt. A ts far ahead (9999-12-31) would pin ``last_seen`` and session
    ordering and overflow date arithmetic; ``max_age`` (None: no bound) does not apply to ``status``,
    whose retained births carry the time the device came online, however long ago."""

    max_bytes: int = MAX_PAYLOAD_BYTES
    max_ahead: timedelta = timedelta(days=1)
    max_age: timedelta | None = timedelta(days=7)


@dataclass
class Rejected:
    """A message set aside: the counter reason and a one-line description."""

    item: Incoming
    reason: str
    error: str


@dataclass
class Prepared:
    """The rows of one batch, before device ids are resolved to keys."""

    telemetry: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (device_id, row)
    telemetry_msgs: dict[tuple[str, str, int], int] = field(default_factory=dict)  # msg key -> rows
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    results: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    statuses: list[tuple[str, StatusPayload, datetime]] = field(default_factory=list)
    fleets: dict[str, str] = field(default_factory=dict)  # device_id -> fleet
    touch: dict[str, dict[str, Any]] = field(default_factory=dict)  # device_id -> newest telemetry facts
    counters: Counter = field(default_factory=Counter)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.telemetry_msgs) + len(self.events) + len(self.results) + len(self.statuses)

    def reject(self, item: Incoming, reason: str, error: str) -> None:
        self.counters[reason] += 1
        self.rejected.append(Rejected(item, reason, error))


def _telemetry_rows(p: TelemetryPayload) -> list[dict[str, Any]]:
    """One row per model. The histogram is stored in the 1.1 layout whatever the payload's version (a 1.0
    histogram is converted here), and p50/p95/p99 are recomputed from it: every percentile the dashboard
    shows comes from the same sketch, not from figures a device computed its own way."""
    base = dict(ts=p.ts, session_id=p.session_id, seq=p.seq, interval_s=p.interval_s,
                cpu_percent=p.system.cpu_percent, rss_bytes=p.system.rss_bytes,
                temperature_c=p.system.temperature_c)
    if not p.models:
        return [dict(base, model="", model_version=None, requests=0, errors=0, throughput_ips=0.0,
                     hist_counts=b"", hist_sum_ms=0.0, p50_ms=None,
                     p95_ms=None, p99_ms=None, queue_depth=0, batch_sizes={}, live_sequences=None, **NO_TEXT)]
    rows = []
    for s in p.models:
        h = s.latency.to_histogram()
        p50, p95, p99 = h.quantiles(_QS)
        rows.append(dict(base, model=s.model, model_version=s.version, requests=s.requests, errors=s.errors,
                         throughput_ips=s.throughput_ips, hist_counts=histograms.pack(h), hist_sum_ms=h.sum_ms,
                         p50_ms=p50, p95_ms=p95, p99_ms=p99, queue_depth=s.queue_depth,
                         batch_sizes=dict(s.batch_sizes), live_sequences=s.live_sequences,
                         **_text_columns(s.text)))
    return rows


_QS = (0.5, 0.95, 0.99)
# The text-generation columns of a row whose model sent no ``text`` (every other model).
NO_TEXT: dict[str, Any] = dict(ttft_counts=None, ttft_sum_ms=None, tpot_counts=None, tpot_sum_ms=None,
                               prompt_tokens=None, generated_tokens=None, kv_cache_usage=None, kv_cache_peak=None,
                               running_requests=None, waiting_requests=None, cancelled=None, preemptions=None)


def _text_columns(t: TextStats | None) -> dict[str, Any]:
    """A text-generation model's figures as raw columns: the two sketches packed like the latency histogram
    (the device's own ttft/tpot percentiles are not kept: pages compute them from the merged sketches)."""
    if t is None:
        return NO_TEXT
    ttft, tpot = t.ttft.to_histogram(), t.tpot.to_histogram()
    return dict(ttft_counts=histograms.pack(ttft), ttft_sum_ms=ttft.sum_ms, tpot_counts=histograms.pack(tpot),
                tpot_sum_ms=tpot.sum_ms, prompt_tokens=t.prompt_tokens, generated_tokens=t.generated_tokens,
                kv_cache_usage=t.kv_cache_usage, kv_cache_peak=t.kv_cache_peak, running_requests=t.running,
                waiting_requests=t.waiting, cancelled=t.cancelled, preemptions=t.preemptions)


def _parse(kind: str, data: bytes, max_bytes: int):
    """``parse_payload`` with a fast path: pydantic's own JSON parser validates a good payload in one step
    (about twice as fast as ``json.loads`` + validation); anything it refuses, and anything the contract's
    bounds (depth, NUL) might refuse, goes through ``parse_payload`` itself, so the accepted payloads and
    the rejection reasons are exactly the contract's."""
    model = PAYLOAD_BY_KIND.get(kind)
    if model is not None and len(data) <= max_bytes and b"\\u0000" not in data and not json_too_deep(data):
        try:
            return model.model_validate_json(data)
        except ValueError:
            pass
    return parse_payload(kind, data, max_bytes=max_bytes)


def _ts_error(kind: str, ts: datetime, received: datetime, limits: Limits) -> str | None:
    if ts > received + limits.max_ahead:
        return f"ts {ts.isoformat()} is more than {limits.max_ahead} ahead of its receipt at {received.isoformat()}"
    if limits.max_age is not None and kind != "status" and ts < received - limits.max_age:
        return f"ts {ts.isoformat()} is more than {limits.max_age} before its receipt at {received.isoformat()}"
    return None


def prepare(items: Iterable[Incoming], limits: Limits | None = None) -> Prepared:
    """Validate and sort a batch. Never raises for one message: a bad one is counted by reason and kept in
    ``rejected``; an unexpected error on one message (a bug) is counted as ``ingest_error`` the same way."""
    limits = limits or Limits()
    out = Prepared()
    for item in items:
        try:
            _prepare_one(out, item, limits)
        except Exception as exc:  # noqa: BLE001 - one message must never stop the batch or the writer
            log.warning("unexpected error on a message from %r (%d bytes): %s: %s", item.topic[:200],
                        len(item.payload), type(exc).__name__, exc)
            out.reject(item, "ingest_error", f"{type(exc).__name__}: {exc}")
    return out


def _prepare_one(out: Prepared, item: Incoming, limits: Limits) -> None:
    """Sort one message into ``out``. Everything is computed before ``out`` is touched, so an exception
    half-way leaves the batch as it was."""
    try:
        t = topics.parse(item.topic)
    except topics.TopicError as exc:
        return out.reject(item, "bad_topic", str(exc))
    if t.kind == "cmd":  # our own commands, if someone subscribed us to them
        return out.reject(item, "unexpected_kind", f"ingest does not take {t.kind!r} messages")
    try:
        p = _parse(t.kind, item.payload, limits.max_bytes)
    except PayloadError as exc:
        return out.reject(item, exc.reason, str(exc))
    if getattr(p, "device_id", None) != t.device_id:
        # A device may only speak for itself: the topic (which ACLs can restrict) is authoritative.
        return out.reject(item, "device_mismatch", f"payload device_id {getattr(p, 'device_id', None)!r} "
                                                   f"on the topic of {t.device_id!r}")
    bad_ts = _ts_error(t.kind, p.ts, item.received, limits)
    if bad_ts:
        return out.reject(item, "ts_out_of_window", bad_ts)
    if isinstance(p, TelemetryPayload):
        key = (t.device_id, p.session_id, p.seq)
        if key in out.telemetry_msgs:
            out.counters["duplicate"] += 1
            return
        rows = _telemetry_rows(p)
        p95 = [r["p95_ms"] for r in rows if r["p95_ms"] is not None]
        facts = dict(ts=p.ts, session=p.session_id, interval=p.interval_s, received=item.received,
                     p95=max(p95) if p95 else None, cpu=p.system.cpu_percent, rss=p.system.rss_bytes)
        out.fleets.setdefault(t.device_id, t.fleet)
        out.telemetry_msgs[key] = len(rows)
        out.telemetry.extend((t.device_id, r) for r in rows)
        old = out.touch.get(t.device_id)
        if old is None or old["ts"] <= p.ts:
            out.touch[t.device_id] = facts
    elif isinstance(p, EventPayload):
        row = dict(ts=p.ts, session_id=p.session_id, seq=p.seq, kind=p.event, ok=p.ok, model=p.model,
                   version=p.version, from_version=p.from_version, message=p.message[:4000],
                   command_id=p.command_id, deployment_id=p.deployment_id, details=p.details,
                   received_at=item.received)
        out.fleets.setdefault(t.device_id, t.fleet)
        out.events.append((t.device_id, row))
    elif isinstance(p, CommandResultPayload):
        row = dict(ts=p.ts, session_id=p.session_id, seq=p.seq, command_id=p.command_id, command=p.command,
                   ok=p.ok, status=p.status, message=p.message[:4000], deployment_id=p.deployment_id,
                   details=p.details, received_at=item.received)
        out.fleets.setdefault(t.device_id, t.fleet)
        out.results.append((t.device_id, row))
    elif isinstance(p, StatusPayload):
        out.fleets.setdefault(t.device_id, t.fleet)
        out.statuses.append((t.device_id, p, item.received))


def status_applies(dev: m.Device, p: StatusPayload) -> bool:
    """Whether a status payload is newer than what the device row holds.

    Within one session an ``offline`` (the last will) always applies and an ``online`` only with a larger
    seq (a replayed retained birth changes nothing). A different session applies only when its ``ts`` is
    newer than the newest ts of the device's current session, so the late last will of an old session
    (sent when the old session started) never marks the new session offline.
    """
    if dev.session_id is None or dev.session_ts is None:
        return True
    if p.session_id == dev.session_id:
        if p.state == "offline":
            return dev.status != "offline" or dev.offline_reason != "will"
        return dev.status_seq is None or p.seq > dev.status_seq
    return p.ts > dev.session_ts


def _insert(dialect: str, table):
    return (postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table))


@dataclass
class WriteStats:
    telemetry_msgs: int = 0
    telemetry_rows: int = 0
    events: int = 0
    results: int = 0
    statuses: int = 0
    duplicates: int = 0
    dead_letters: int = 0


class BatchWriter:
    """Writes prepared batches; keeps a cache of device id -> primary key."""

    def __init__(self, engine: Engine, name: str = "", dead_letters_per_minute: int = 1000):
        self.engine = engine
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database dialect {self.dialect!r}")
        self._pks: dict[str, int] = {}
        self.name = name  # written with each dead letter: which ingest process set it aside
        self.dead_letter_budget = dead_letters.Budget(dead_letters_per_minute)

    def forget_devices(self) -> None:
        self._pks.clear()

    # ------------------------------------------------------------------------------------------ write
    def write(self, batch: Prepared, now: datetime) -> WriteStats:
        """Write one prepared batch; raises on database errors (the batch can then be written again).

        Several ingest processes write at once, so the transactions are shaped to neither deadlock nor
        serialize: new devices and status changes (rare) commit in their own short transactions first
        (statuses before telemetry: a birth resets the heartbeat deadline the telemetry then sets); the
        main transaction inserts rows (no row locks on devices), and only at its end locks the batch's
        device rows in id order for one UPDATE and then the counter rows (sorted) before committing.
        Every step is idempotent, so a batch retried after a failure counts everything once.
        """
        stats = WriteStats()
        counters = Counter(batch.counters)
        device_ids = set(batch.fleets)
        letters = dead_letters.rows(batch.rejected, self.name, self.dead_letter_budget, counters)
        if any(d not in self._pks for d in device_ids):
            with Session(self.engine) as session, session.begin():
                self._resolve(session, device_ids, batch.fleets, now)
        pks = {d: self._pks[d] for d in device_ids}
        if batch.statuses:
            with Session(self.engine) as session, session.begin():
                # Stable sort by device: one device's statuses keep their order; rows lock in id order.
                for device_id, p, received in sorted(batch.statuses, key=lambda s: pks[s[0]]):
                    if self._apply_status(session, pks[device_id], p, received):
                        stats.statuses += 1
        counters["status"] += len(batch.statuses)
        with Session(self.engine) as session, session.begin():
            if batch.telemetry:
                inserted = self._insert_telemetry(session, batch, pks)
                stats.telemetry_msgs = len(inserted)
                stats.telemetry_rows = sum(batch.telemetry_msgs[k] for k in inserted)
                dup = len(batch.telemetry_msgs) - len(inserted)
                counters["telemetry"] += len(inserted)
                counters["duplicate"] += dup
                stats.duplicates += dup
            for rows, model, name in ((batch.events, m.Event, "events"),
                                      (batch.results, m.CommandResult, "cmd_result")):
                if not rows:
                    continue
                n = self._insert_unique(session, model, [dict(r, device_pk=pks[d]) for d, r in rows])
                counters[name] += n
                counters["duplicate"] += len(rows) - n
                stats.duplicates += len(rows) - n
                if name == "events":
                    stats.events = n
                else:
                    stats.results = n
            if batch.touch:
                self._touch_devices(session, batch, pks)
            # Set aside in the same transaction as the batch: committed (and then acknowledged) together.
            dead_letters.insert(session, letters)
            stats.dead_letters = len(letters)
            self._count(session, counters, now)
        return stats

    def _resolve(self, session: Session, device_ids: set[str], fleets: dict[str, str],
                 now: datetime) -> dict[str, int]:
        missing = [d for d in device_ids if d not in self._pks]
        if missing:
            table = m.Device.__table__
            stmt = _insert(self.dialect, table).on_conflict_do_nothing(index_elements=["device_id"])
            session.execute(stmt, [dict(device_id=d, fleet=fleets.get(d, "default"), first_seen=now,
                                        status="offline", capabilities={}) for d in sorted(missing)])
            for pk, device_id in session.execute(select(table.c.id, table.c.device_id)
                                                 .where(table.c.device_id.in_(missing))):
                self._pks[device_id] = pk
        return {d: self._pks[d] for d in device_ids}

    def _insert_telemetry(self, session: Session, batch: Prepared, pks: dict[str, int]) -> set:
        by_pk = {pk: d for d, pk in pks.items()}
        if self.dialect == "postgresql":
            return {(by_pk[pk], s, q) for pk, s, q in _pg_copy_insert(session, batch, pks)}
        table = m.TelemetryRaw.__table__
        stmt = (_insert(self.dialect, table).on_conflict_do_nothing(
            index_elements=["device_pk", "session_id", "seq", "model", "ts"])
            .returning(table.c.device_pk, table.c.session_id, table.c.seq))
        rows = [dict(r, device_pk=pks[d]) for d, r in batch.telemetry]
        return {(by_pk[pk], s, q) for pk, s, q in session.execute(stmt, rows)}

    def _insert_unique(self, session: Session, model, rows: list[dict[str, Any]]) -> int:
        table = model.__table__
        stmt = (_insert(self.dialect, table)
                .on_conflict_do_nothing(index_elements=["device_pk", "session_id", "seq"])
                .returning(table.c.id))
        return len(session.execute(stmt, rows).all())

    def _touch_devices(self, session: Session, batch: Prepared, pks: dict[str, int]) -> None:
        """Newest telemetry facts onto each device row; revives a heartbeat-offline device of the same
        session. One executemany UPDATE whose CASEs keep newer values already stored."""
        c = m.Device.__table__.c
        ts = bindparam("b_ts", type_=m.UTCDateTime())
        deadline = bindparam("b_deadline", type_=m.UTCDateTime())
        sess = bindparam("b_session")
        newer = or_(c.last_seen.is_(None), c.last_seen <= ts)
        revive = or_(c.session_id.is_(None), (c.session_id == sess) & (c.offline_reason == "heartbeat"))
        stmt = (update(m.Device.__table__).where(c.id == bindparam("b_id")).values(
            last_seen=case((newer, ts), else_=c.last_seen),
            heartbeat_deadline=case((or_(c.heartbeat_deadline.is_(None), c.heartbeat_deadline < deadline),
                                     deadline), else_=c.heartbeat_deadline),
            telemetry_interval_s=case((newer, bindparam("b_interval")), else_=c.telemetry_interval_s),
            last_p95_ms=case((newer, bindparam("b_p95")), else_=c.last_p95_ms),
            last_cpu_percent=case((newer, bindparam("b_cpu")), else_=c.last_cpu_percent),
            last_rss_bytes=case((newer, bindparam("b_rss")), else_=c.last_rss_bytes),
            status=case((revive, "online"), else_=c.status),
            offline_reason=case((revive, None), else_=c.offline_reason),
            status_changed_at=case(((c.status == "offline") & revive, bindparam("b_now", type_=m.UTCDateTime())),
                                   else_=c.status_changed_at),
            session_id=case((c.session_id.is_(None), sess), else_=c.session_id),
            session_ts=case((c.session_id.is_(None), ts), else_=c.session_ts),
        ).execution_options(synchronize_session=False))
        params = []
        for device_id, f in batch.touch.items():
            params.append(dict(
                b_id=pks[device_id], b_ts=f["ts"], b_session=f["session"], b_interval=f["interval"],
                b_deadline=f["received"] + timedelta(seconds=HEARTBEAT_INTERVALS * f["interval"]),
                b_p95=f["p95"], b_cpu=f["cpu"], b_rss=f["rss"], b_now=f["received"]))
        if self.dialect == "postgresql":
            _pg_copy_touch(session, params)
        else:
            session.connection().execute(stmt, params)

    def _apply_status(self, session: Session, pk: int, p: StatusPayload, received: datetime) -> bool:
        dev = session.scalars(select(m.Device).where(m.Device.id == pk).with_for_update()).one()
        # Every status is also kept as an event for the device's log; ON CONFLICT drops replays.
        self._insert_unique(session, m.Event, [dict(
            device_pk=pk, ts=p.ts, session_id=p.session_id, seq=p.seq, kind=p.state, ok=p.state == "online",
            message=f"agent {p.agent_version or '?'} {p.state}", details={}, received_at=received)])
        if not status_applies(dev, p):
            return False
        if dev.status != p.state:
            dev.status_changed_at = received
        if dev.session_id != p.session_id:
            dev.session_ts, dev.status_seq = p.ts, p.seq
        else:
            # Keep the largest seq: a will (prepared at connect, small seq) must not let a replayed birth in.
            dev.session_ts = max(dev.session_ts or p.ts, p.ts)
            dev.status_seq = max(dev.status_seq if dev.status_seq is not None else p.seq, p.seq)
        dev.session_id = p.session_id
        dev.status = p.state
        dev.offline_reason = "will" if p.state == "offline" else None
        if p.state == "online":
            dev.last_seen = max(dev.last_seen or p.ts, p.ts)
            dev.heartbeat_deadline = None  # telemetry sets it; a birth alone never times out
            self._sync_inventory(session, dev, p, received)
        return True

    def _sync_inventory(self, session: Session, dev: m.Device, p: StatusPayload, now: datetime) -> None:
        dev.agent_version = p.agent_version
        dev.capabilities = dict(p.capabilities)
        profile = p.capabilities.get("profile") if isinstance(p.capabilities.get("profile"), str) else None
        dev.profile = profile or (p.packages[0].profile if p.packages else dev.profile)
        session.execute(delete(m.InstalledPackage).where(m.InstalledPackage.device_pk == dev.id))
        seen: set[str] = set()
        for pkg in p.packages:
            if pkg.name in seen:
                continue
            seen.add(pkg.name)
            session.add(m.InstalledPackage(device_pk=dev.id, name=pkg.name, version=pkg.version,
                                           profile=pkg.profile, runtime=pkg.runtime, precision=pkg.precision,
                                           sha256=pkg.sha256, previous_version=pkg.previous_version,
                                           updated_at=now))
        # Groups reported by the agent replace its earlier reported ones; manual memberships stay.
        wanted = set(p.groups)
        if wanted:
            session.execute(_insert(self.dialect, m.DeviceGroup.__table__).on_conflict_do_nothing(
                index_elements=["name"]), [dict(name=g, description="", created_at=now) for g in sorted(wanted)])
        group_ids = dict(session.execute(select(m.DeviceGroup.name, m.DeviceGroup.id)
                                         .where(m.DeviceGroup.name.in_(wanted))).all()) if wanted else {}
        for member in list(dev.memberships):
            if member.source == "agent" and member.group_id not in group_ids.values():
                session.delete(member)
        have = {mb.group_id for mb in dev.memberships}
        for name, gid in group_ids.items():
            if gid not in have:
                session.add(m.DeviceGroupMember(group_id=gid, device_pk=dev.id, source="agent"))
        # Tags are only added (an operator may tag devices in the dashboard too).
        have_tags = {t.tag for t in dev.tag_rows}
        for tag in sorted(set(p.tags) - have_tags):
            session.add(m.DeviceTag(device_pk=dev.id, tag=tag))
        session.flush()

    def _count(self, session: Session, counters: Counter, now: datetime) -> None:
        counters = +counters
        if counters:
            add_counters(session, counters, now, self.dialect)


# PostgreSQL fast path: COPY into temporary tables, then one INSERT .. SELECT and one UPDATE .. FROM, instead of statements
# with thousands of placeholders (psycopg parses such a statement in Python for every batch: 5x slower).
_TEL_COLS = (("device_pk", "int"), ("model", "text"), ("model_version", "text"), ("ts", "timestamptz"),
             ("session_id", "text"), ("seq", "bigint"), ("interval_s", "float8"), ("requests", "bigint"),
             ("errors", "bigint"), ("throughput_ips", "float8"), ("hist_counts", "bytea"),
             ("hist_sum_ms", "float8"), ("p50_ms", "float8"), ("p95_ms", "float8"), ("p99_ms", "float8"),
             ("queue_depth", "int"), ("batch_sizes", "json"), ("cpu_percent", "float8"), ("rss_bytes", "bigint"),
             ("temperature_c", "float8"), ("live_sequences", "int"), ("ttft_counts", "bytea"),
             ("ttft_sum_ms", "float8"), ("tpot_counts", "bytea"), ("tpot_sum_ms", "float8"),
             ("prompt_tokens", "bigint"), ("generated_tokens", "bigint"), ("kv_cache_usage", "float8"),
             ("kv_cache_peak", "float8"), ("running_requests", "int"), ("waiting_requests", "int"),
             ("cancelled", "bigint"), ("preemptions", "bigint"))
_STAGE_SQL = ("CREATE TEMP TABLE IF NOT EXISTS telemetry_stage "
              "(LIKE telemetry_raw INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
_STAGE_COLS = ", ".join(c for c, _ in _TEL_COLS)
_FROM_STAGE_SQL = (f"INSERT INTO telemetry_raw ({_STAGE_COLS}) SELECT {_STAGE_COLS} FROM telemetry_stage "
                   "ON CONFLICT (device_pk, session_id, seq, model, ts) DO NOTHING RETURNING device_pk, session_id, seq")


def _pg_copy_insert(session: Session, batch: Prepared, pks: dict[str, int]) -> list:
    """COPY the rows into a per-connection temporary table, then INSERT .. SELECT .. ON CONFLICT: COPY
    is formatted in C by psycopg, where a multi-VALUES insert or array parameters are formatted in Python."""
    conn = session.connection()
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(_STAGE_SQL)
        with cur.copy(f"COPY telemetry_stage ({_STAGE_COLS}) FROM STDIN") as copy:
            for device_id, row in batch.telemetry:
                copy.write_row([pks[device_id] if c == "device_pk" else
                                json.dumps(row[c], separators=(",", ":")) if t == "json" else row[c]
                                for c, t in _TEL_COLS])
        cur.execute(_FROM_STAGE_SQL)
        return cur.fetchall()  # the stage empties itself at commit (ON COMMIT DELETE ROWS)


_TOUCH_SQL = """
UPDATE devices AS d SET
  last_seen = CASE WHEN d.last_seen IS NULL OR d.last_seen <= u.ts THEN u.ts ELSE d.last_seen END,
  heartbeat_deadline = GREATEST(d.heartbeat_deadline, u.deadline),
  telemetry_interval_s = CASE WHEN d.last_seen IS NULL OR d.last_seen <= u.ts THEN u.intv ELSE d.telemetry_interval_s END,
  last_p95_ms = CASE WHEN d.last_seen IS NULL OR d.last_seen <= u.ts THEN u.p95 ELSE d.last_p95_ms END,
  last_cpu_percent = CASE WHEN d.last_seen IS NULL OR d.last_seen <= u.ts THEN u.cpu ELSE d.last_cpu_percent END,
  last_rss_bytes = CASE WHEN d.last_seen IS NULL OR d.last_seen <= u.ts THEN u.rss ELSE d.last_rss_bytes END,
  status = CASE WHEN d.session_id IS NULL OR (d.session_id = u.sess AND d.offline_reason = 'heartbeat')
                THEN 'online' ELSE d.status END,
  offline_reason = CASE WHEN d.session_id IS NULL OR (d.session_id = u.sess AND d.offline_reason = 'heartbeat')
                THEN NULL ELSE d.offline_reason END,
  status_changed_at = CASE WHEN d.status = 'offline' AND (d.session_id IS NULL OR
                (d.session_id = u.sess AND d.offline_reason = 'heartbeat')) THEN u.now ELSE d.status_changed_at END,
  session_id = COALESCE(d.session_id, u.sess),
  session_ts = CASE WHEN d.session_id IS NULL THEN u.ts ELSE d.session_ts END
FROM touch_stage AS u
WHERE d.id = u.id
"""
_TOUCH_STAGE_SQL = ("CREATE TEMP TABLE IF NOT EXISTS touch_stage (id int, ts timestamptz, sess text, intv float8, "
                    "deadline timestamptz, p95 float8, cpu float8, rss bigint, now timestamptz) "
                    "ON COMMIT DELETE ROWS")


def _pg_copy_touch(session: Session, params: list[dict[str, Any]]) -> None:
    """The device UPDATE from a COPY-filled temporary table (array parameters are dumped in Python)."""
    keys = ("id", "ts", "session", "interval", "deadline", "p95", "cpu", "rss", "now")
    raw = session.connection().connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(_TOUCH_STAGE_SQL)
        with cur.copy("COPY touch_stage (id, ts, sess, intv, deadline, p95, cpu, rss, now) FROM STDIN") as copy:
            for p in params:
                copy.write_row([p[f"b_{k}"] for k in keys])
        # Lock the rows in id order first: two ingest processes updating overlapping devices in plan order
        # would deadlock each other (PostgreSQL then aborts one batch after a second; it is retried). NO KEY
        # UPDATE is the lock the UPDATE takes anyway, and unlike FOR UPDATE it does not conflict with the
        # KEY SHARE locks the other process's telemetry inserts hold on the same devices (foreign keys).
        cur.execute("SELECT d.id FROM devices d JOIN touch_stage u ON u.id = d.id ORDER BY d.id FOR NO KEY UPDATE OF d")
        cur.execute(_TOUCH_SQL)


def add_counters(session: Session, counters: dict[str, int], now: datetime, dialect: str) -> None:
    """Add to the ingest counters (upsert: count = count + n)."""
    table = m.IngestCounter.__table__
    stmt = _insert(dialect, table)
    stmt = stmt.on_conflict_do_update(index_elements=["reason"],
                                      set_=dict(count=table.c.count + stmt.excluded.count,
                                                updated_at=stmt.excluded.updated_at))
    session.execute(stmt, [dict(reason=k, count=v, updated_at=now) for k, v in sorted(counters.items())])


def mark_heartbeat_offline(session: Session, now: datetime) -> int:
    """Devices online whose telemetry stopped for 3 intervals become offline (reason ``heartbeat``)."""
    d = m.Device.__table__.c
    res = session.execute(update(m.Device.__table__)
                          .where(d.status == "online", d.heartbeat_deadline.is_not(None),
                                 d.heartbeat_deadline < now)
                          .values(status="offline", offline_reason="heartbeat", status_changed_at=now))
    return res.rowcount or 0
