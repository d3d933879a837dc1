"""latency histograms in the DDSketch layout (telemetry schema 1.1), stored packed

Every stored histogram (raw telemetry, 1-minute and 1-hour rollups, fleet rollups) goes from the 1.0
layout's 29 counts in a JSON column to the contract's DDSketch layout in a binary column (``bytea`` /
``BLOB``: 10-byte records of int16 key and int64 count, :mod:`edgeopt.dashboard.histograms`), which pages
read back with one ``numpy.frombuffer`` for all rows instead of decoding JSON per row. 1.0 counts are
converted by :func:`edgeopt.sdk.telemetry.legacy_to_bins` (each count spread over the keys its bucket
covers): the converted rows read back what the 1.0 layout showed (no more accurate than it was) and merge
with new rows by adding counts; the raw rows' p50/p95/p99 are recomputed from the converted histogram. A
value that is not a 29-count list is stored as an empty histogram and counted in the log.

The conversion runs in Python in keyset-paged chunks: about 20 s per million rows on one core.
The downgrade puts each key's count into the 1.0 bucket holding the key's value (a key straddling a bucket
edge goes to one side, so a round trip can move a few counts to the neighbouring bucket).

Revision ID: 0004_ddsketch_histograms
Revises: 0003
Create Date: 2026-12-02
"""
from __future__ import annotations

import bisect
import json
import logging

import sqlalchemy as sa
from alembic import op

from edgeopt.dashboard.histograms import pack_pairs, unpack_pairs
from edgeopt.sdk.telemetry import LEGACY_BUCKETS_MS, Histogram, legacy_to_bins, sketch_value

log = logging.getLogger("alembic.runtime.migration")

revision = '0004_ddsketch_histograms'
down_revision = '0003'
branch_labels = None
depends_on = None

CHUNK = 5000
LEGACY_LEN = len(LEGACY_BUCKETS_MS) + 1

# table -> primary key columns (keyset paging order)
TABLES = {
    "telemetry_raw": ("id",),
    "rollup_1m": ("device_pk", "model", "bucket_start"),
    "rollup_1h": ("device_pk", "model", "bucket_start"),
    "fleet_rollup": ("resolution", "model", "bucket_start"),
}


def _to_packed(counts) -> bytes | None:
    """1.0 JSON counts -> packed bytes; None (stored empty, counted) for anything else."""
    if isinstance(counts, str):
        try:
            counts = json.loads(counts)
        except ValueError:
            return None
    if not isinstance(counts, list) or len(counts) != LEGACY_LEN:
        return None
    try:
        bins = legacy_to_bins([int(c) for c in counts])
    except (TypeError, ValueError):
        return None
    return pack_pairs(Histogram(bins).to_pairs())


def _to_legacy(data) -> list[int] | None:
    out = [0] * LEGACY_LEN
    try:
        pairs = unpack_pairs(data)
    except ValueError:
        return None
    for i in range(0, len(pairs), 2):
        out[bisect.bisect_left(LEGACY_BUCKETS_MS, sketch_value(pairs[i]))] += pairs[i + 1]
    return out


def _convert(table_name: str, pk: tuple[str, ...], src: sa.types.TypeEngine, dst: sa.types.TypeEngine,
             fn, empty, with_percentiles: bool) -> None:
    """``hist_new`` = fn(``hist_counts``) for every row, keyset-paged by primary key."""
    bind = op.get_bind()
    extra = ["p50_ms", "p95_ms", "p99_ms"] if with_percentiles else []
    table = sa.table(table_name, *(sa.column(c) for c in pk), sa.column("hist_counts", src),
                     sa.column("hist_new", dst), *(sa.column(c, sa.Float) for c in extra))
    keycols = [table.c[c] for c in pk]
    update = table.update().where(*(table.c[c] == sa.bindparam(f"k_{c}") for c in pk)).values(
        hist_new=sa.bindparam("h"), **{c: sa.bindparam(f"v_{c}") for c in extra})
    last, malformed = None, 0
    while True:
        q = sa.select(*keycols, table.c.hist_counts).order_by(*keycols).limit(CHUNK)
        if last is not None:
            q = q.where(sa.tuple_(*keycols) > sa.tuple_(*(sa.literal(v) for v in last)))
        rows = bind.execute(q).all()
        if not rows:
            break
        params = []
        for row in rows:
            new = fn(row[-1])
            if new is None:
                malformed += 1
                new = empty
            p = {f"k_{c}": v for c, v in zip(pk, row)}
            p["h"] = new
            if extra:
                h = Histogram.from_pairs(unpack_pairs(new))
                p.update({f"v_{c}": v for c, v in zip(extra, h.quantiles((0.5, 0.95, 0.99)))})
            params.append(p)
        bind.execute(update, params)
        last = tuple(rows[-1][:len(pk)])
    if malformed:
        log.warning("%s: %d histograms were not in the expected layout and are stored empty", table_name, malformed)


def _swap(table_name: str, new_type: sa.types.TypeEngine) -> None:
    with op.batch_alter_table(table_name) as b:
        b.drop_column("hist_counts")
        b.alter_column("hist_new", new_column_name="hist_counts", existing_type=new_type, nullable=False)


def upgrade() -> None:
    for name, pk in TABLES.items():
        op.add_column(name, sa.Column("hist_new", sa.LargeBinary(), nullable=True))
        _convert(name, pk, sa.JSON(), sa.LargeBinary(), _to_packed, b"", with_percentiles=name == "telemetry_raw")
        _swap(name, sa.LargeBinary())


def downgrade() -> None:
    for name, pk in TABLES.items():
        op.add_column(name, sa.Column("hist_new", sa.JSON(), nullable=True))
        _convert(name, pk, sa.LargeBinary(), sa.JSON(), _to_legacy, [0] * LEGACY_LEN, with_percentiles=False)
        _swap(name, sa.JSON())
