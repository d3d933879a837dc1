"""Raw telemetry on PostgreSQL: partitioned by day; rows land in their day, a missing day is created with
the rows the default partition held, redeliveries still conflict, and retention drops whole partitions."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from edgeopt.dashboard import models as m
from edgeopt.dashboard import partitions
from edgeopt.dashboard.db import make_engine
from edgeopt.dashboard.ingest_writer import BatchWriter, Incoming, prepare
from edgeopt.dashboard.rollup import run_rollup
from edgeopt.dashboard.simulate import SimDevice

pytestmark = pytest.mark.postgres


def _where(session: Session) -> dict[str, int]:
    """Rows per partition (by table name)."""
    return dict(session.execute(text("SELECT tableoid::regclass::text, count(*) FROM telemetry_raw "
                                      "GROUP BY 1")).all())


def _write(engine, dev: SimDevice, ts: datetime, seq: int, received: datetime) -> None:
    p, _ = dev.telemetry(ts=ts, seq=seq)
    BatchWriter(engine).write(prepare([Incoming(dev.topic("telemetry"), p.to_json(), received)]), received)


def test_days_partitions_default_and_retention_by_drop(pg_only_url):
    engine = make_engine(pg_only_url)
    now = datetime.now(timezone.utc)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    with Session(engine) as s:
        assert partitions.is_partitioned(s)
        have = partitions.existing(s)
        assert {today + timedelta(days=k) for k in range(3)} <= set(have)  # made by the migration

    dev = SimDevice("part-1", models=("a",))
    _write(engine, dev, now - timedelta(minutes=1), 1, now)
    old = today - timedelta(days=10) + timedelta(hours=5)
    _write(engine, dev, old, 2, old)          # no partition for that day: the default partition takes it
    _write(engine, dev, old, 2, old)          # a redelivery: still one row (the key holds ts)
    with Session(engine) as s:
        where = _where(s)
        assert where == {partitions.partition_name(today): 1, partitions.DEFAULT: 1}

    # The rollup job at that old time creates its day and moves the row out of the default partition.
    st = run_rollup(engine, now=old + timedelta(hours=1))
    assert st.partitions_created == 3
    with Session(engine) as s:
        assert _where(s) == {partitions.partition_name(today): 1,
                             partitions.partition_name(today - timedelta(days=10)): 1}
        assert s.scalar(select(func.count()).select_from(m.TelemetryRaw)) == 2

    # Five days on: every day that ended before the raw cutoff (48 h) is dropped as a table, not deleted.
    later = now + timedelta(days=5)
    st = run_rollup(engine, now=later)
    with Session(engine) as s:
        left = partitions.existing(s)
        assert partitions.partition_name(today) not in left.values()
        assert partitions.partition_name(today - timedelta(days=10)) not in left.values()
        assert s.scalar(text("SELECT to_regclass(:n)"), {"n": partitions.partition_name(today)}) is None
        assert s.scalar(select(func.count()).select_from(m.TelemetryRaw)) == 0
        # the days ahead of "later" exist for what comes next
        assert {partitions._day(later) + timedelta(days=k) for k in range(3)} <= set(left)
    assert st.partitions_dropped >= 2 and st.deleted == 0  # nothing was deleted row by row
    engine.dispose()


def test_rows_in_the_default_partition_are_deleted_by_retention(pg_only_url):
    engine = make_engine(pg_only_url)
    now = datetime.now(timezone.utc)
    far = now - timedelta(days=40)
    dev = SimDevice("part-2", models=("a",))
    _write(engine, dev, far, 1, far)
    st = run_rollup(engine, now=now)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(m.TelemetryRaw)) == 0
    assert st.deleted == 1
    engine.dispose()


def test_a_reader_holding_the_table_does_not_stall_the_rollup(pg_only_url):
    """Partition upkeep waits at most the lock timeout for a transaction that holds telemetry_raw, then
    leaves it to the next run; the rollup itself completes."""
    engine = make_engine(pg_only_url)
    now = datetime.now(timezone.utc)
    dev = SimDevice("part-3", models=("a",))
    _write(engine, dev, now - timedelta(minutes=3), 1, now)
    with Session(engine) as reader:
        reader.execute(text("SELECT count(*) FROM telemetry_raw")).scalar()  # holds its lock until rollback
        st = run_rollup(engine, now=now + timedelta(days=10))  # wants to create and drop days
        assert (st.partitions_created, st.partitions_dropped) == (0, 0) and st.raw_rows_scanned == 1
        reader.rollback()
    st = run_rollup(engine, now=now + timedelta(days=10))
    assert st.partitions_created == 3 and st.partitions_dropped >= 3
    engine.dispose()
