"""live sequences of stateful models in raw telemetry and the rollups

Telemetry schema 1.1 carries ``live_sequences`` per model (a stateful model's streams with state on the
device, issue 16). ``telemetry_raw.live_sequences`` stores it; ``rollup_1m`` / ``rollup_1h`` keep the most
reported in the bucket (``live_sequences_max``). All nullable: rows of models without state, and every row
written before this revision, have none. On PostgreSQL adding a column to the partitioned ``telemetry_raw``
adds it to every partition.

Revision ID: 0006_live_sequences
Revises: 0005_raw_partitions
Create Date: 2026-12-03
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006_live_sequences'
down_revision = '0005_raw_partitions'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('telemetry_raw', sa.Column('live_sequences', sa.Integer(), nullable=True))
    op.add_column('rollup_1m', sa.Column('live_sequences_max', sa.Integer(), nullable=True))
    op.add_column('rollup_1h', sa.Column('live_sequences_max', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('rollup_1h') as b:
        b.drop_column('live_sequences_max')
    with op.batch_alter_table('rollup_1m') as b:
        b.drop_column('live_sequences_max')
    with op.batch_alter_table('telemetry_raw') as b:
        b.drop_column('live_sequences')
