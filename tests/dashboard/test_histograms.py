"""Packed histogram storage: round trip, one-call summing of many rows, hostile bytes left out."""
from __future__ import annotations

import numpy as np
import pytest

from edgeopt.dashboard import histograms as hs
from edgeopt.sdk.telemetry import SKETCH_BINS, SKETCH_KEY_MAX, SKETCH_KEY_MIN, Histogram


def _h(*values: float) -> Histogram:
    h = Histogram()
    for v in values:
        h.observe(v)
    return h


def test_round_trip_and_record_size():
    h = _h(0.001, 1.0, 1.0, 250.0, 1e9)
    data = hs.pack(h)
    assert len(data) == 4 * hs.RECORD_BYTES == 40  # 4 distinct keys, 10 bytes each
    assert hs.unpack_pairs(data) == h.to_pairs()
    assert hs.unpack(data, 3.0).bins == h.bins and hs.pack(Histogram()) == b""


@pytest.mark.parametrize("data,message", [
    (b"\x00" * 11, "not a whole number"),
    (hs.pack_pairs([SKETCH_KEY_MAX + 1, 1]), "invalid record"),
    (hs.pack_pairs([SKETCH_KEY_MIN - 1, 1]), "invalid record"),
    (hs.pack_pairs([0, -5]), "invalid record"),
])
def test_hostile_bytes_are_refused(data, message):
    with pytest.raises(ValueError, match=message):
        hs.unpack_pairs(data)


def test_sum_into_equals_merging_row_by_row():
    rng = np.random.default_rng(0)
    rows = [_h(*rng.lognormal(1.0, 1.0, int(rng.integers(0, 60))).tolist()) for _ in range(300)]
    idx = rng.integers(0, 7, size=len(rows))
    H, bad = hs.sum_into(idx, [hs.pack(h) for h in rows], 7)
    assert bad == 0 and H.shape == (7, SKETCH_BINS)
    for p in range(7):
        want = Histogram()
        for h, i in zip(rows, idx.tolist()):
            if i == p:
                want.merge(h)
        got = {SKETCH_KEY_MIN + k: int(c) for k, c in enumerate(H[p].tolist()) if c}
        assert got == want.bins


def test_sum_into_leaves_malformed_rows_out_whole():
    good = hs.pack(_h(1.0, 2.0))
    torn = good + b"\x07"
    bad_key = hs.pack_pairs([0, 3, SKETCH_KEY_MAX + 5, 1])  # first record fine, second not
    negative = hs.pack_pairs([0, -1])
    H, bad = hs.sum_into(np.array([0, 0, 1, 1, 1]), [good, torn, bad_key, None, negative], 2)
    assert bad == 3
    assert H[0].sum() == 2 and H[1].sum() == 0  # nothing of the bad rows, not even their valid records
