"""How latency histograms are stored: packed binary, read back without per-row decoding.

A stored histogram (``hist_counts``, a ``bytea`` / ``BLOB`` column) is the contract's sparse DDSketch
histogram (:class:`edgeopt.sdk.telemetry.Histogram`) as little-endian records of 10 bytes each, keys
ascending: ``int16`` key, ``int64`` count. Because the records carry no header, the histograms of any
number of rows concatenate into one valid buffer: a chart joins the bytes of its 1,440 rows and hands them
to numpy in one call (:func:`sum_into`) instead of decoding 1,440 JSON documents. An empty histogram is
``b""``.

Every reader treats the bytes as untrusted (a row may come from an older version, a bad restore or a
hand edit): a length that is not a multiple of 10, a key outside the layout or a negative count makes
the row malformed, and it is left out and counted by the caller, never allowed to stop a page or a rollup.
"""
from __future__ import annotations

import struct
from typing import Iterable

import numpy as np

from edgeopt.sdk.telemetry import SKETCH_BINS, SKETCH_KEY_MAX, SKETCH_KEY_MIN, Histogram

RECORD = np.dtype([("k", "<i2"), ("c", "<i8")])
RECORD_BYTES = RECORD.itemsize  # 10
_STRUCTS: dict[int, struct.Struct] = {}


def _struct(n: int) -> struct.Struct:
    s = _STRUCTS.get(n)
    if s is None:
        s = _STRUCTS[n] = struct.Struct("<" + "hq" * n)
    return s


def pack_pairs(pairs: list[int]) -> bytes:
    """``[key, count, ...]`` (keys ascending) as stored bytes."""
    return _struct(len(pairs) // 2).pack(*pairs)


def pack(h: Histogram) -> bytes:
    return pack_pairs(h.to_pairs())


def unpack_pairs(data: bytes | memoryview | None) -> list[int]:
    """Stored bytes as ``[key, count, ...]``; ValueError when they are not a valid histogram."""
    data = bytes(data or b"")
    if len(data) % RECORD_BYTES:
        raise ValueError(f"stored histogram of {len(data)} bytes is not a whole number of {RECORD_BYTES}-byte records")
    pairs = list(_struct(len(data) // RECORD_BYTES).unpack(data))
    for i in range(0, len(pairs), 2):
        if not SKETCH_KEY_MIN <= pairs[i] <= SKETCH_KEY_MAX or pairs[i + 1] < 0:
            raise ValueError(f"stored histogram holds an invalid record (key {pairs[i]}, count {pairs[i + 1]})")
    return pairs


def unpack(data: bytes | memoryview | None, sum_ms: float = 0.0) -> Histogram:
    return Histogram.from_pairs(unpack_pairs(data), sum_ms)


def sum_into(idx: np.ndarray, blobs: Iterable[bytes | memoryview | None], n_pts: int) -> tuple[np.ndarray, int]:
    """The histograms of many rows summed into ``n_pts`` dense rows of SKETCH_BINS counts, row r going to
    point ``idx[r]``: one ``bytes.join`` and one ``numpy.frombuffer`` for all rows. Returns the counts and
    how many rows were left out as malformed (see the module docstring)."""
    H = np.zeros((n_pts, SKETCH_BINS), dtype=np.int64)
    blobs = [bytes(b) if b else b"" for b in blobs]
    lens = np.fromiter((len(b) for b in blobs), dtype=np.int64, count=len(blobs))
    whole = lens % RECORD_BYTES == 0
    bad = int((~whole).sum())
    if not whole.all():
        blobs = [b for b, ok in zip(blobs, whole.tolist()) if ok]
        idx, lens = np.asarray(idx)[whole], lens[whole]
    if not blobs:
        return H, bad
    rec = np.frombuffer(b"".join(blobs), dtype=RECORD)
    per_row = lens // RECORD_BYTES
    rows = np.repeat(np.asarray(idx, dtype=np.int64), per_row)
    keys = rec["k"].astype(np.int64) - SKETCH_KEY_MIN
    counts = rec["c"]
    ok = (keys >= 0) & (keys < SKETCH_BINS) & (counts >= 0)
    if not ok.all():
        # a row with one invalid record is left out whole, as the rollup leaves it out
        row_of = np.repeat(np.arange(len(blobs)), per_row)
        bad_rows = np.unique(row_of[~ok])
        bad += len(bad_rows)
        keep = ~np.isin(row_of, bad_rows)
        rows, keys, counts = rows[keep], keys[keep], counts[keep]
    if not len(keys):
        return H, bad
    # bincount over (point, key) is several times faster than np.add.at (float64 weights are exact below
    # 2**53); over the keys present only, which a device's histograms keep to a narrow band
    lo, hi = int(keys.min()), int(keys.max())
    width = hi - lo + 1
    flat = np.bincount(rows * width + (keys - lo), weights=counts, minlength=n_pts * width)
    H[:, lo:hi + 1] = flat.astype(np.int64).reshape(n_pts, width)
    return H, bad
