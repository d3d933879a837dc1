"""text-generation figures (TTFT, time per output token, tokens, KV cache) in raw telemetry and the rollups

Telemetry schema 1.1 carries ``ModelStats.text`` for text-generation models (issue 14). Its two sketches
(time to first token, time per output token) are stored like the latency histogram: packed DDSketch
pairs (``*_counts``, :mod:`edgeopt.dashboard.histograms`) and their sum (``*_sum_ms``), so rollups and
fleet charts merge them by adding counts. Beside them: token counts, KV cache use and peak, running and
waiting requests, cancelled requests and preemptions.

- ``telemetry_raw``: the payload's figures as sent (``kv_cache_usage`` at the end of the interval).
- ``rollup_1m`` / ``rollup_1h``: sketches merged, token counts and cancellations summed, ``preemptions``
  summed over the rows that reported them, ``kv_cache_usage_avg`` the mean of the end-of-interval values
  (weighted by the raw rows behind each one), ``kv_cache_peak_max`` / ``running_max`` / ``waiting_max``
  the most reported.
- ``fleet_rollup``: the same over every device of a model (the usage there is the mean over devices).

All nullable: rows of other models, and every row written before this revision, have none
(``generated_tokens IS NULL`` means "no text figures"). On PostgreSQL adding a column to the partitioned
``telemetry_raw`` adds it to every partition, default partition included.

Revision ID: 0007_text_generation
Revises: 0006_live_sequences
Create Date: 2026-12-04
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007_text_generation'
down_revision = '0006_live_sequences'
branch_labels = None
depends_on = None


def _shared() -> list[sa.Column]:
    """Columns every table gets (fresh objects for each table)."""
    return [sa.Column('ttft_counts', sa.LargeBinary(), nullable=True),
            sa.Column('ttft_sum_ms', sa.Float(), nullable=True),
            sa.Column('tpot_counts', sa.LargeBinary(), nullable=True),
            sa.Column('tpot_sum_ms', sa.Float(), nullable=True),
            sa.Column('prompt_tokens', sa.BigInteger(), nullable=True),
            sa.Column('generated_tokens', sa.BigInteger(), nullable=True)]


def _columns(table: str) -> list[sa.Column]:
    tail = [sa.Column('cancelled', sa.BigInteger(), nullable=True),
            sa.Column('preemptions', sa.BigInteger(), nullable=True)]
    if table == 'telemetry_raw':
        return _shared() + [sa.Column('kv_cache_usage', sa.Float(), nullable=True),
                            sa.Column('kv_cache_peak', sa.Float(), nullable=True),
                            sa.Column('running_requests', sa.Integer(), nullable=True),
                            sa.Column('waiting_requests', sa.Integer(), nullable=True)] + tail
    kv = [sa.Column('kv_cache_usage_avg', sa.Float(), nullable=True),
          sa.Column('kv_cache_peak_max', sa.Float(), nullable=True)]
    if table == 'fleet_rollup':
        return _shared() + kv + tail
    return _shared() + kv + [sa.Column('running_max', sa.Integer(), nullable=True),
                             sa.Column('waiting_max', sa.Integer(), nullable=True)] + tail


TABLES = ('telemetry_raw', 'rollup_1m', 'rollup_1h', 'fleet_rollup')


def upgrade() -> None:
    for table in TABLES:
        for col in _columns(table):
            op.add_column(table, col)


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as b:
            for col in reversed(_columns(table)):
                b.drop_column(col.name)
