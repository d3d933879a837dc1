"""latency histograms in the DDSketch layout (telemetry schema 1.1)

Every stored histogram (raw telemetry, 1-minute and 1-hour rollups, fleet rollups) goes from the 1.0
layout's 29 counts to ``[key, count, ...]`` pairs of the contract's DDSketch layout
(:func:`edgeopt.sdk.telemetry.legacy_to_bins`: each count spread over the keys its bucket covers). The
converted rows read back what the 1.0 layout showed (no more accurate than it was) and merge with new
rows by adding counts; the raw rows' p50/p95/p99 are recomputed from the converted histogram.

The conversion runs in Python in keyset-paged chunks: about 20 s per million rows on one core. A row that
is not a 29-count list (already converted, or malformed) is left as it is, so the upgrade can be rerun.
The downgrade puts each key's count into the 1.0 bucket holding the key's value (a key straddling a bucket
edge goes to one side, so a round trip can move a few counts to the neighbouring bucket).

Revision ID: 0004_ddsketch_histograms
Revises: 0003
Create Date: 2026-12-02
"""
from __future__ import annotations

import bisect

import sqlalchemy as sa
from alembic import op

from edgeopt.sdk.telemetry import LEGACY_BUCKETS_MS, Histogram, legacy_to_bins, sketch_value

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


def _to_pairs(counts) -> list[int] | None:
    if not isinstance(counts, list) or len(counts) != LEGACY_LEN:
        return None
    try:
        bins = legacy_to_bins([int(c) for c in counts])
    except (TypeError, ValueError):
        return None
    h = Histogram(bins)
    return h.to_pairs()


def _to_legacy(pairs) -> list[int] | None:
    if not isinstance(pairs, list) or len(pairs) % 2:
        return None
    out = [0] * LEGACY_LEN
    try:
        for i in range(0, len(pairs), 2):
            out[bisect.bisect_left(LEGACY_BUCKETS_MS, sketch_value(int(pairs[i])))] += int(pairs[i + 1])
    except (TypeError, ValueError, OverflowError):
        return None
    return out


def _convert(table_name: str, pk: tuple[str, ...], fn, with_percentiles: bool) -> None:
    bind = op.get_bind()
    cols = [sa.column(c) for c in pk] + [sa.column("hist_counts", sa.JSON)]
    extra = ["p50_ms", "p95_ms", "p99_ms"] if with_percentiles else []
    table = sa.table(table_name, *cols, *(sa.column(c, sa.Float) for c in extra))
    keycols = [table.c[c] for c in pk]
    update = table.update().where(*(table.c[c] == sa.bindparam(f"k_{c}") for c in pk)).values(
        hist_counts=sa.bindparam("h"), **{c: sa.bindparam(f"v_{c}") for c in extra})
    last = None
    while True:
        q = sa.select(*keycols, table.c.hist_counts).order_by(*keycols).limit(CHUNK)
        if last is not None:
            q = q.where(sa.tuple_(*keycols) > sa.tuple_(*(sa.literal(v) for v in last)))
        rows = bind.execute(q).all()
        if not rows:
            return
        params = []
        for row in rows:
            new = fn(row[-1])
            if new is None:
                continue
            p = {f"k_{c}": v for c, v in zip(pk, row)}
            p["h"] = new
            if extra:
                qs = Histogram.from_pairs(new).quantiles((0.5, 0.95, 0.99)) if fn is _to_pairs else [None] * 3
                p.update({f"v_{c}": v for c, v in zip(extra, qs)})
            params.append(p)
        if params:
            bind.execute(update, params)
        last = tuple(rows[-1][:len(pk)])


def upgrade() -> None:
    for name, pk in TABLES.items():
        _convert(name, pk, _to_pairs, with_percentiles=name == "telemetry_raw")


def downgrade() -> None:
    for name, pk in TABLES.items():
        _convert(name, pk, _to_legacy, with_percentiles=False)
