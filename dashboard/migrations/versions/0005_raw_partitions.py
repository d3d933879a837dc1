"""raw telemetry partitioned by day on PostgreSQL; the message key includes ts

PostgreSQL: ``telemetry_raw`` becomes a table partitioned by range of ``ts`` (one partition per UTC day,
``telemetry_raw_pYYYYMMDD``, and ``telemetry_raw_default``; see :mod:`edgeopt.dashboard.partitions`). A
unique key on a partitioned table must contain the partition key, so the idempotence key becomes
(device, session, seq, model, ts) on both databases: a QoS 1 redelivery repeats the payload, ts included,
and is still a conflict. The primary key becomes (id, ts) on PostgreSQL; ids keep their sequence.

The existing rows are copied into the new table (``INSERT .. SELECT``; raw rows are kept 48 h by default,
so this is at most a few days of data) with partitions for the days of the last 30 days that hold rows,
today and the next two days; older or far-future rows go to the default partition.

SQLite: only the unique key changes (the table is rebuilt by Alembic's batch mode).

Revision ID: 0005_raw_partitions
Revises: 0004_ddsketch_histograms
Create Date: 2026-12-02
"""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from alembic import op

revision = '0005_raw_partitions'
down_revision = '0004_ddsketch_histograms'
branch_labels = None
depends_on = None

OLD_KEY = ['device_pk', 'session_id', 'seq', 'model']
NEW_KEY = OLD_KEY + ['ts']


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table('telemetry_raw') as b:
            b.drop_constraint('uq_telemetry_raw_msg', type_='unique')
            b.create_unique_constraint('uq_telemetry_raw_msg', NEW_KEY)
        return
    ex = op.execute
    ex("ALTER TABLE telemetry_raw RENAME TO telemetry_raw_unpartitioned")
    ex("DROP INDEX ix_telemetry_raw_device_ts")
    ex("DROP INDEX ix_telemetry_raw_ts")
    ex("ALTER TABLE telemetry_raw_unpartitioned DROP CONSTRAINT uq_telemetry_raw_msg")
    ex("ALTER TABLE telemetry_raw_unpartitioned DROP CONSTRAINT telemetry_raw_pkey")
    ex("ALTER TABLE telemetry_raw_unpartitioned DROP CONSTRAINT telemetry_raw_device_pk_fkey")
    ex("CREATE TABLE telemetry_raw (LIKE telemetry_raw_unpartitioned INCLUDING DEFAULTS) PARTITION BY RANGE (ts)")
    ex("ALTER SEQUENCE telemetry_raw_id_seq OWNED BY telemetry_raw.id")
    ex("ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_pkey PRIMARY KEY (id, ts)")
    ex(f"ALTER TABLE telemetry_raw ADD CONSTRAINT uq_telemetry_raw_msg UNIQUE ({', '.join(NEW_KEY)})")
    ex("ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_device_pk_fkey FOREIGN KEY (device_pk) "
       "REFERENCES devices (id) ON DELETE CASCADE")
    ex("CREATE INDEX ix_telemetry_raw_device_ts ON telemetry_raw (device_pk, ts)")
    ex("CREATE INDEX ix_telemetry_raw_ts ON telemetry_raw (ts)")
    ex("CREATE TABLE telemetry_raw_default PARTITION OF telemetry_raw DEFAULT")
    now = datetime.now(timezone.utc)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    days = {today + timedelta(days=k) for k in range(3)}
    bind = op.get_bind()
    for (day,) in bind.execute(sa.text(
            "SELECT DISTINCT date_trunc('day', ts AT TIME ZONE 'UTC') FROM telemetry_raw_unpartitioned "
            "WHERE ts >= :lo AND ts < :hi"), {"lo": today - timedelta(days=30), "hi": today + timedelta(days=3)}):
        days.add(day.replace(tzinfo=timezone.utc))
    for day in sorted(days):
        ex(f"CREATE TABLE telemetry_raw_p{day:%Y%m%d} PARTITION OF telemetry_raw "
           f"FOR VALUES FROM ('{day.isoformat()}') TO ('{(day + timedelta(days=1)).isoformat()}')")
    ex("INSERT INTO telemetry_raw SELECT * FROM telemetry_raw_unpartitioned")
    ex("DROP TABLE telemetry_raw_unpartitioned")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        with op.batch_alter_table('telemetry_raw') as b:
            b.drop_constraint('uq_telemetry_raw_msg', type_='unique')
            b.create_unique_constraint('uq_telemetry_raw_msg', OLD_KEY)
        return
    ex = op.execute
    ex("ALTER TABLE telemetry_raw RENAME TO telemetry_raw_partitioned")
    ex("ALTER TABLE telemetry_raw_partitioned RENAME CONSTRAINT telemetry_raw_pkey TO telemetry_raw_partitioned_pkey")
    ex("ALTER TABLE telemetry_raw_partitioned RENAME CONSTRAINT uq_telemetry_raw_msg TO uq_telemetry_raw_msg_p")
    ex("ALTER INDEX ix_telemetry_raw_device_ts RENAME TO ix_telemetry_raw_device_ts_p")
    ex("ALTER INDEX ix_telemetry_raw_ts RENAME TO ix_telemetry_raw_ts_p")
    ex("CREATE TABLE telemetry_raw (LIKE telemetry_raw_partitioned INCLUDING DEFAULTS)")
    ex("ALTER SEQUENCE telemetry_raw_id_seq OWNED BY telemetry_raw.id")
    # A redelivery with another ts is a duplicate under the old key: keep the first row of each message.
    ex("INSERT INTO telemetry_raw SELECT DISTINCT ON (device_pk, session_id, seq, model) * "
       "FROM telemetry_raw_partitioned ORDER BY device_pk, session_id, seq, model, id")
    ex("DROP TABLE telemetry_raw_partitioned")
    ex("ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_pkey PRIMARY KEY (id)")
    ex(f"ALTER TABLE telemetry_raw ADD CONSTRAINT uq_telemetry_raw_msg UNIQUE ({', '.join(OLD_KEY)})")
    ex("ALTER TABLE telemetry_raw ADD CONSTRAINT telemetry_raw_device_pk_fkey FOREIGN KEY (device_pk) "
       "REFERENCES devices (id) ON DELETE CASCADE")
    ex("CREATE INDEX ix_telemetry_raw_device_ts ON telemetry_raw (device_pk, ts)")
    ex("CREATE INDEX ix_telemetry_raw_ts ON telemetry_raw (ts)")
