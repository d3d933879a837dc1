"""Daily partitions of raw telemetry on PostgreSQL (native declarative partitioning by range of ``ts``).

``telemetry_raw`` is partitioned by migration 0005 on PostgreSQL: one partition per UTC day, named
``telemetry_raw_pYYYYMMDD``, plus ``telemetry_raw_default`` for rows outside every day created (an agent's
outbox drained weeks later, a clock far off). The rollup job, which already runs every 30 s under an
advisory lock, keeps :data:`DAYS_AHEAD` days of partitions ahead of now (:func:`ensure_partitions`) and
applies raw retention by dropping whole partitions whose day ended before the cutoff
(:func:`drop_expired`): no DELETE, no vacuum debt, whatever the row count. Raw rows are therefore kept
between ``raw_hours`` and ``raw_hours`` + 1 day. Rows of the default partition are deleted row by row
(there are few).

A day whose rows already sit in the default partition (it did not exist when they came) is created
detached, the rows are moved into it, and it is attached: PostgreSQL refuses a new partition whose range
the default partition holds rows of.

On SQLite nothing here applies: ``telemetry_raw`` is a plain table and retention deletes rows.
"""
from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta, timezone

from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

TABLE = "telemetry_raw"
DEFAULT = f"{TABLE}_default"
DAYS_AHEAD = 2
# Creating or dropping a partition needs an exclusive lock on telemetry_raw; while it waits, every insert
# of the ingest queues behind it. So it waits at most this long and is retried at the next rollup run.
LOCK_TIMEOUT = "1s"
_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")


def is_partitioned(session: Session) -> bool:
    if session.bind.dialect.name != "postgresql":
        return False
    return bool(session.scalar(text("SELECT EXISTS (SELECT 1 FROM pg_partitioned_table "
                                    "WHERE partrelid = to_regclass(:t))"), {"t": TABLE}))


def _day(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)


def partition_name(day: datetime) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def existing(session: Session) -> dict[datetime, str]:
    """The daily partitions there are, by their day (UTC midnight)."""
    rows = session.execute(text("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                "WHERE i.inhparent = to_regclass(:t)"), {"t": TABLE}).scalars()
    out = {}
    for name in rows:
        m = _NAME.match(name)
        if m:
            out[datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=timezone.utc)] = name
    return out


def create_day(session: Session, day: datetime) -> str:
    """Create the partition of ``day``, moving any rows of that day out of the default partition first."""
    name, lo, hi = partition_name(day), day, day + timedelta(days=1)
    bounds = {"lo": lo, "hi": hi}
    in_default = session.scalar(text(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE ts >= :lo AND ts < :hi)"),
                                bounds)
    if not in_default:
        session.execute(text(f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF {TABLE} "
                             f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"))
        return name
    session.execute(text(f"CREATE TABLE {name} (LIKE {TABLE} INCLUDING DEFAULTS)"))
    moved = session.execute(text(f"WITH moved AS (DELETE FROM {DEFAULT} WHERE ts >= :lo AND ts < :hi "
                                 f"RETURNING *) INSERT INTO {name} SELECT * FROM moved"), bounds).rowcount
    session.execute(text(f"ALTER TABLE {TABLE} ATTACH PARTITION {name} "
                         f"FOR VALUES FROM ('{lo.isoformat()}') TO ('{hi.isoformat()}')"))
    log.info("partitions: %s created with %d rows moved from the default partition", name, moved)
    return name


def ensure_range(session: Session, start: datetime, end: datetime) -> list[str]:
    """Create the partitions of every day from ``start``'s to ``end``'s that does not exist yet."""
    have = existing(session)
    made = []
    day = _day(start)
    while day <= end:
        if day not in have:
            made.append(create_day(session, day))
        day += timedelta(days=1)
    return made


def ensure_partitions(session: Session, now: datetime, days_ahead: int = DAYS_AHEAD) -> list[str]:
    """Create the partitions of today and the next ``days_ahead`` days that do not exist yet."""
    return ensure_range(session, now, _day(now) + timedelta(days=days_ahead))


def drop_expired(session: Session, cutoff: datetime) -> tuple[int, int]:
    """Drop the daily partitions whose day ended at or before ``cutoff`` and delete older rows of the
    default partition. Returns (partitions dropped, rows deleted from the default partition)."""
    dropped = 0
    for day, name in sorted(existing(session).items()):
        if day + timedelta(days=1) <= cutoff:
            session.execute(text(f"DROP TABLE {name}"))
            dropped += 1
    deleted = session.execute(text(f"DELETE FROM {DEFAULT} WHERE ts < :c"), {"c": cutoff}).rowcount or 0
    if dropped:
        log.info("partitions: %d raw telemetry partitions dropped (before %s)", dropped, cutoff)
    return dropped, deleted


def maintain(session: Session, now: datetime, cutoff: datetime) -> tuple[int, int, int]:
    """:func:`ensure_partitions` then :func:`drop_expired`, in a savepoint with a short lock timeout: when
    a long transaction elsewhere holds telemetry_raw, this run leaves the partitions as they are (logged)
    instead of stalling the ingest. Returns (created, dropped, rows deleted from the default partition)."""
    try:
        with session.begin_nested():
            session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
            made = ensure_partitions(session, now)
            dropped, deleted = drop_expired(session, cutoff)
            session.execute(text("SET LOCAL lock_timeout = DEFAULT"))
        return len(made), dropped, deleted
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        session.execute(text("SET LOCAL lock_timeout = DEFAULT"))
        log.warning("partitions: telemetry_raw is locked by another transaction; partition upkeep waits for "
                    "the next rollup run")
        return 0, 0, 0
